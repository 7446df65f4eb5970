//! Cost of one shared rate-limit check (not a test).
//!
//! `cargo run --release -p plinth --example bench_ratelimit`
//!
//! Uses database `plinth_bench` on the zero-configuration server (or
//! `DATABASE_URL`'s server), recreated on every run. Prints, for the same run
//! on the same machine, per check (p50, p99, mean over 20,000 sequential
//! checks on 1,000 keys):
//! - a check counted in the shared `rate_limits` table;
//! - the ceiling: one `SELECT 1` through the same pool, the round trip any
//!   shared check costs at least;
//! - a check of an in-memory limiter of this process, for scale.

use std::time::{Duration, Instant};

use plinth_http::ratelimit::{Limit, RateLimiter};
use plinth_tenants::{Db, DbConfig};

mod common;

use common::Result;

const CHECKS: usize = 20_000;

fn report(name: &str, mut times: Vec<Duration>) {
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    let mean = times.iter().sum::<Duration>().as_secs_f64() * 1e6 / times.len() as f64;
    println!("{name:<28} p50 {:>8.1} µs   p99 {:>8.1} µs   mean {mean:>8.1} µs", at(0.5), at(0.99));
}

#[tokio::main]
async fn main() -> Result {
    let (url, _client, _admin) = common::fresh_database("plinth_bench").await?;
    let db = Db::connect(&DbConfig { pool_size: 1, ..DbConfig::new(&url) })?;
    // Never refuses: every check writes, as a passing check does.
    let limit = Limit::new(1_000_000, Duration::from_secs(1));
    let shared = RateLimiter::shared("bench", limit, db.clone());
    let local = RateLimiter::local("bench", limit);
    let keys: Vec<String> = (0..1_000).map(|i| format!("198.51.100.{i}")).collect();

    // Warm up the connection and the table.
    for key in &keys {
        shared.check(key).await.map_err(|e| format!("{e:?}"))?;
    }
    let mut ceiling = Vec::with_capacity(CHECKS);
    for _ in 0..CHECKS {
        let started = Instant::now();
        db.statement(async |c| {
            use diesel_async::RunQueryDsl as _;
            diesel::sql_query("SELECT 1").execute(c).await.map_err(plinth_http::ApiError::from)
        })
        .await
        .map_err(|e| format!("{e:?}"))?;
        ceiling.push(started.elapsed());
    }
    let mut checks = Vec::with_capacity(CHECKS);
    for i in 0..CHECKS {
        let started = Instant::now();
        shared.check(&keys[i % keys.len()]).await.map_err(|e| format!("{e:?}"))?;
        checks.push(started.elapsed());
    }
    let mut in_memory = Vec::with_capacity(CHECKS);
    for i in 0..CHECKS {
        let started = Instant::now();
        local.check(&keys[i % keys.len()]).await.map_err(|e| format!("{e:?}"))?;
        in_memory.push(started.elapsed());
    }
    report("shared check (PostgreSQL)", checks);
    report("ceiling: SELECT 1", ceiling);
    report("local check (memory)", in_memory);
    Ok(())
}

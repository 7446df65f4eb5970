//! Many tenants on several shards (not a test): the no-op `plinth migrate`
//! over all of them, and the write pause of `plinth tenants move` under a
//! steady write load.
//!
//! `EXAMPLE=bench_shards WAL_LEVEL=logical scripts/bench-scale.sh` (a
//! private cluster with `wal_level = logical`, which moves need), or
//! `cargo build --release -p plinth --bins --example bench_shards && target/release/examples/bench_shards`
//! against a server that has it.
//!
//! `TENANTS` (10,000), `SHARDS` (3), `RUNS` (5), `MOVES` (6), `WRITERS`
//! (4). Uses database `plinth_bench_shards` (the platform database,
//! drained) and `plinth_bench_shards_1` … `_SHARDS` (the shards) on the
//! zero-configuration server or `DATABASE_URL`'s, recreated on every run:
//! the shards are databases of one server here, so a round trip to each
//! is a local one.
//!
//! 1. Declares the shards (`plinth shards add`), drains the primary and
//!    provisions `TENANTS` tenants over the shards.
//! 2. Runs `plinth migrate` (the release binary beside this one) `RUNS`
//!    times with nothing to do, and `plinth shards list` as often: the
//!    same start, connection and platform-migration check with one query,
//!    the floor of any command. Prints the medians and maxima.
//! 3. Starts `WRITERS` tasks that insert a project into one tenant, one
//!    after the other, through `Db::tenant` with the tenant re-read from
//!    the registry before each write (as an instance's cache would follow
//!    it), a refused write retried. Measures their latency for a while,
//!    then moves the tenant between shards `MOVES` times, and prints the
//!    pause each move reports, the slowest write during the moves, and
//!    the writes' p99 outside them (the ceiling to compare with).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plinth_tenants::{Db, DbConfig, ShardName, Slug, registry};

mod common;

use common::Result;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the `plinth` binary beside this one; its output, failing unless it succeeded.
fn plinth(url: &str, args: &[&str]) -> Result<String> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(|p| p.parent()).ok_or("no target directory")?.join("plinth");
    let out = Command::new(bin).args(args).env("DATABASE_URL", url).env("RUST_LOG", "warn").output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("plinth {}: {text}", args.join(" ")).into());
    }
    Ok(text)
}

/// Wall times of `RUNS` runs of a command, in ms.
fn timed(url: &str, args: &[&str], runs: u64) -> Result<Vec<f64>> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            plinth(url, args)?;
            Ok(started.elapsed().as_secs_f64() * 1000.0)
        })
        .collect()
}

/// One write of the load: a project in `slug`'s schema, on the shard the
/// registry names now. `false` when it was refused (the tenant moved under
/// it) and must be retried.
async fn write(db: &Db, slug: &str) -> Result<bool> {
    let tenant = db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, slug).await?))
        .await?
        .ok_or("no such tenant")?;
    let written = db
        .tenant(tenant.scope(), async |c| {
            use diesel_async::RunQueryDsl as _;
            diesel::sql_query("INSERT INTO projects (id, name) VALUES (gen_random_uuid(), 'load')")
                .execute(c.pg())
                .await
                .map_err(plinth_http::ApiError::from)
        })
        .await;
    match written {
        Ok(_) => Ok(true),
        Err(plinth_http::ApiError::Unavailable(_)) => Ok(false),
        Err(other) => Err(format!("{other:?}").into()),
    }
}

#[tokio::main]
async fn main() -> Result {
    let tenants = usize::try_from(env_num("TENANTS", 10_000))?;
    let shards = env_num("SHARDS", 3);
    let runs = env_num("RUNS", 5);
    let moves = env_num("MOVES", 6);
    let writers = env_num("WRITERS", 4);
    let (url, admin_client, admin) = common::fresh_database("plinth_bench_shards").await?;
    let db = Db::connect(&DbConfig { pool_size: 8, ..DbConfig::new(&url) })?;
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b).to_owned();
    for n in 1..=shards {
        let name = format!("plinth_bench_shards_{n}");
        admin_client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        admin_client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        plinth(&url, &["shards", "add", &format!("s{n}"), "--url", &format!("{base}/{name}")])?;
    }
    plinth(&url, &["shards", "drain", "primary"])?;

    let started = Instant::now();
    let mut made = 0;
    while made < tenants {
        let batch: Vec<usize> = (made..tenants.min(made + 8)).collect();
        futures_util::future::try_join_all(batch.iter().map(|i| {
            let db = db.clone();
            async move {
                let slug = Slug::parse(&format!("shard-{i:05}"))?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(registry::create(&db, &slug, "Shards").await?)
            }
        }))
        .await?;
        made += batch.len();
        if made % 1000 == 0 {
            eprintln!("{made} tenants");
        }
    }
    println!(
        "provisioned {tenants} tenants over {shards} shards in {:.0} s\n{}",
        started.elapsed().as_secs_f64(),
        plinth(&url, &["shards", "list"])?.trim_end()
    );

    let out = plinth(&url, &["migrate"])?;
    if !out.contains(&format!("{tenants} already current, 0 migrated, 0 failed")) {
        return Err(format!("the run was not a no-op: {out}").into());
    }
    let migrate = timed(&url, &["migrate"], runs)?;
    let floor = timed(&url, &["shards", "list"], runs)?;
    let show =
        |v: &[f64]| format!("median {:.0} ms, max {:.0} ms", median(v.to_vec()), v.iter().copied().fold(0.0, f64::max));
    println!("no-op plinth migrate over {tenants} tenants on {shards} shards ({runs} runs): {}", show(&migrate));
    println!("plinth shards list (start, connect, one query; {runs} runs): {}", show(&floor));

    // Moves under writes.
    let slug = "shard-00000";
    let stop = Arc::new(AtomicBool::new(false));
    let moving = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (db, stop, moving) = (db.clone(), Arc::clone(&stop), Arc::clone(&moving));
            tokio::spawn(async move {
                let (mut outside, mut during, mut refused) = (Vec::new(), Vec::new(), 0_u64);
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let in_move = moving.load(Ordering::Relaxed);
                    while !write(&db, slug).await? {
                        refused += 1;
                    }
                    let ms = began.elapsed().as_secs_f64() * 1000.0;
                    if in_move || moving.load(Ordering::Relaxed) { during.push(ms) } else { outside.push(ms) }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((outside, during, refused))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut pauses = Vec::new();
    let first = db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, slug).await?))
        .await?
        .ok_or("no such tenant")?
        .shard;
    let other = ShardName::parse(if first.as_str() == "s1" { "s2" } else { "s1" })?;
    for n in 0..moves {
        let to = if n % 2 == 0 { &other } else { &first };
        moving.store(true, Ordering::Relaxed);
        let out = plinth(&url, &["tenants", "move", slug, "--to", to.as_str()])?;
        moving.store(false, Ordering::Relaxed);
        let held = out
            .split("writes held for ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|ms| ms.parse::<f64>().ok())
            .ok_or_else(|| format!("no pause in {out}"))?;
        pauses.push(held);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut outside, mut during, mut refused) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (o, d, r) = task.await??;
        outside.extend(o);
        during.extend(d);
        refused += r;
    }
    outside.sort_by(f64::total_cmp);
    let p99 = outside.get(outside.len() * 99 / 100).copied().unwrap_or(f64::NAN);
    println!(
        "{moves} moves of {slug} under {writers} writers: writes held for median {:.0} ms, max {:.0} ms (as the moves report); \
         slowest write during the moves {:.0} ms; writes outside the moves: p99 {p99:.1} ms over {}; {refused} writes refused once and retried",
        median(pauses.clone()),
        pauses.iter().copied().fold(0.0, f64::max),
        during.iter().copied().fold(0.0, f64::max),
        outside.len()
    );
    admin.shutdown();
    Ok(())
}

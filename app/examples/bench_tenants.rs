//! Provisioning and migrate-all benchmark (not a test).
//!
//! `cargo run --release -p plinth --example bench_tenants`
//!
//! Uses database `plinth_bench` on the zero-configuration server (or
//! `DATABASE_URL`'s server), recreated on every run. Prints, for the same run
//! on the same machine:
//! - provisioning 200 tenants through Plinth (p50/p95 per tenant) beside the
//!   ceiling: the same SQL (CREATE SCHEMA + the tenant migrations + ledger
//!   rows) sent raw in one transaction per tenant on one connection;
//! - a no-op `migrate` over 1,000 tenants beside the ceiling: the one
//!   "who is behind" query it runs, sent raw.

use std::time::{Duration, Instant};

use plinth_tenants::migrate::{self, MigrateOptions, TENANT_MIGRATIONS};
use plinth_tenants::{Db, DbConfig, Slug, registry};

mod common;

use common::Result;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result {
    let (url, client, admin) = common::fresh_database("plinth_bench").await?;
    let db = Db::connect(&DbConfig::new(&url))?;

    // Ceiling: the provisioning SQL, raw, on one connection.
    let (raw, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let ddl: String = TENANT_MIGRATIONS.iter().map(|m| format!("{};\n", m.up)).collect();
    let mut ceiling = Vec::new();
    for i in 0..200 {
        let started = Instant::now();
        raw.batch_execute(&format!(
            "BEGIN; CREATE SCHEMA raw_{i}; SET LOCAL search_path TO raw_{i}; {ddl} \
             CREATE TABLE IF NOT EXISTS public.raw_ledger (s text, v text); \
             INSERT INTO public.raw_ledger VALUES ('raw_{i}', '1'); COMMIT;"
        ))
        .await?;
        ceiling.push(started.elapsed());
    }
    ceiling.sort();

    let mut times = Vec::new();
    for i in 0..200 {
        let slug = Slug::parse(&format!("bench-{i:04}"))?;
        let started = Instant::now();
        registry::create(&db, &slug, "Bench").await?;
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "provisioning 200 tenants (schema + {} migration(s) + ledger, one transaction each)",
        TENANT_MIGRATIONS.len()
    );
    println!(
        "  plinth:            p50 {:6.2} ms   p95 {:6.2} ms",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.95))
    );
    println!(
        "  ceiling (raw SQL): p50 {:6.2} ms   p95 {:6.2} ms   -> plinth p50 is {:.2}x the raw SQL",
        ms(percentile(&ceiling, 0.5)),
        ms(percentile(&ceiling, 0.95)),
        percentile(&times, 0.5).as_secs_f64() / percentile(&ceiling, 0.5).as_secs_f64()
    );

    for i in 200..1000 {
        registry::create(&db, &Slug::parse(&format!("bench-{i:04}"))?, "Bench").await?;
    }
    let options = MigrateOptions::default();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let report = migrate::migrate_tenants(&db, TENANT_MIGRATIONS, &options, &|_| {}).await?;
        runs.push(started.elapsed());
        assert_eq!((report.total, report.up_to_date), (1000, 1000), "everything is current");
    }
    runs.sort();
    let versions: Vec<&str> = TENANT_MIGRATIONS.iter().map(|m| m.version).collect();
    let mut raw_runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        raw.query(
            "SELECT t.id FROM public.tenants t WHERE t.status <> 'deleting' AND (SELECT count(*) FROM \
             public.tenant_migrations m WHERE m.tenant_id = t.id AND m.version = ANY($1)) < $2",
            &[&versions, &(versions.len() as i64)],
        )
        .await?;
        raw_runs.push(started.elapsed());
    }
    raw_runs.sort();
    println!("no-op migrate over 1000 tenants (median of 5)");
    println!("  plinth:            {:7.2} ms", ms(runs[2]));
    println!("  ceiling (raw SQL): {:7.2} ms (the one query that finds tenants behind)", ms(raw_runs[2]));

    drop(db);
    client.batch_execute("DROP DATABASE IF EXISTS plinth_bench WITH (FORCE)").await?;
    admin.shutdown();
    Ok(())
}

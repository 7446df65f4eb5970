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
//! - provisioning 200 tenants from spares of the warm pool, 200 with a
//!   template's rows through the migrations and 200 through spares, beside
//!   the same ceiling;
//! - a no-op `migrate` over 1,601 tenants beside the ceiling: the one
//!   "who is behind" query it runs, sent raw.

use std::time::{Duration, Instant};

use plinth_tenants::migrate::{self, MigrateOptions, TENANT_MIGRATIONS};
use plinth_tenants::{Db, DbConfig, Slug, registry, spares, template};

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

    // The warm pool: 200 spares made first (not timed: the filler makes
    // them in the background), then 200 tenants provisioned from them.
    let made = spares::fill(&db, 200, TENANT_MIGRATIONS).await?;
    assert_eq!(made, 200);
    let mut from_spares = Vec::new();
    for i in 0..200 {
        let slug = Slug::parse(&format!("spare-{i:04}"))?;
        let started = Instant::now();
        registry::create(&db, &slug, "Bench").await?;
        from_spares.push(started.elapsed());
    }
    from_spares.sort();
    let left = db.platform(async |c| Ok::<_, anyhow::Error>(spares::ready(c, TENANT_MIGRATIONS).await?)).await?;
    assert_eq!(left, 0, "every tenant took a spare");

    // A template with a few seed rows (3 projects with 5 tasks each),
    // through the migrations and through spares.
    let template = registry::create(&db, &Slug::parse("template")?, "Template").await?;
    let t = template.schema.quoted();
    for p in 0..3 {
        raw.batch_execute(&format!(
            "INSERT INTO {t}.projects (id, name) VALUES ('018f0000-0000-7000-8000-00000000000{p}', 'Sample {p}');
             INSERT INTO {t}.tasks (id, project_id, title) SELECT gen_random_uuid(), \
                 '018f0000-0000-7000-8000-00000000000{p}', 'Step ' || n FROM generate_series(1, 5) n;"
        ))
        .await?;
    }
    db.platform(async |c| Ok::<_, anyhow::Error>(template::set(c, Some(template.id)).await?)).await?;
    let mut templated = Vec::new();
    for i in 0..200 {
        let slug = Slug::parse(&format!("seeded-{i:04}"))?;
        let started = Instant::now();
        registry::create(&db, &slug, "Bench").await?;
        templated.push(started.elapsed());
    }
    templated.sort();
    spares::fill(&db, 200, TENANT_MIGRATIONS).await?;
    let mut templated_spares = Vec::new();
    for i in 0..200 {
        let slug = Slug::parse(&format!("seeded-spare-{i:04}"))?;
        let started = Instant::now();
        registry::create(&db, &slug, "Bench").await?;
        templated_spares.push(started.elapsed());
    }
    templated_spares.sort();
    db.platform(async |c| Ok::<_, anyhow::Error>(template::set(c, None).await?)).await?;
    let line = |what: &str, times: &[Duration]| {
        println!(
            "  {what:<32} p50 {:6.2} ms   p95 {:6.2} ms   -> {:.2}x the raw SQL's p50",
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.95)),
            percentile(times, 0.5).as_secs_f64() / percentile(&ceiling, 0.5).as_secs_f64()
        );
    };
    println!("provisioning 200 tenants each way (one transaction each)");
    line("migrations (as above)", &times);
    line("a spare from the warm pool", &from_spares);
    line("migrations + template rows", &templated);
    line("a spare + template rows", &templated_spares);

    for i in 200..1000 {
        registry::create(&db, &Slug::parse(&format!("bench-{i:04}"))?, "Bench").await?;
    }
    let options = MigrateOptions::default();
    let mut runs = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let report = migrate::migrate_tenants(&db, TENANT_MIGRATIONS, &options, &|_| {}).await?;
        runs.push(started.elapsed());
        assert_eq!((report.total, report.up_to_date), (1601, 1601), "everything is current");
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
    println!("no-op migrate over 1601 tenants (median of 5)");
    println!("  plinth:            {:7.2} ms", ms(runs[2]));
    println!("  ceiling (raw SQL): {:7.2} ms (the one query that finds tenants behind)", ms(raw_runs[2]));

    drop(db);
    client.batch_execute("DROP DATABASE IF EXISTS plinth_bench WITH (FORCE)").await?;
    admin.shutdown();
    Ok(())
}

//! Metered usage: units recorded with the work, and sent to Stripe's meter
//! events API in batches (not a test).
//!
//! `cargo run --release -p plinth --example bench_meters`
//!
//! Uses database `plinth_bench_meters` on the zero-configuration server (or
//! `DATABASE_URL`'s server), recreated on every run, and a local HTTP
//! server standing in for Stripe. Prints, for the same run on the same
//! machine:
//! - units recorded per second (two rounds, alternating which goes
//!   first): 20,000 units over 100 tenants, one per
//!   transaction as creating a task records it (`usage::record`), from 8
//!   concurrent callers; beside its ceiling, the same rows inserted bare
//!   (one per transaction, the same prepared insert, no plan lookup) into
//!   a copy of the table without its indexes;
//! - units sent per second: every unit reported by the sender
//!   (`usage::send`: one meter event per tenant and meter); beside the
//!   same units reported one meter event each, as a sender without
//!   batches would (2,000 of them, through the same client).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use diesel::ExpressionMethods as _;
use diesel_async::RunQueryDsl as _;
use plinth_access::Catalog;
use plinth_billing::config::StripeConfig;
use plinth_billing::stripe::Stripe;
use plinth_tenants::crypto::Secret;
use plinth_tenants::ids::Slug;
use plinth_tenants::{Db, DbConfig, TenantId, registry};

mod common;

use common::Result;

const TENANTS: usize = 100;
const UNITS: usize = 20_000;
const CALLERS: usize = 8;
const SINGLES: usize = 2_000;
const ROUNDS: usize = 2;

// A copy of `public.usage_events` (its columns, none of its indexes),
// written with the same prepared statement `usage::record` uses.
diesel::table! {
    public.bench_ceiling (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        meter -> Text,
        quantity -> BigInt,
    }
}

const PLANS: &str = r#"
[[plan]]
name = "free"

[[plan]]
name = "pro"
includes = "free"
meters = { tasks = { event_name = "plinth_tasks", soft_limit = 1000000 } }
"#;

/// Runs `work(i)` for i in 0..n from `CALLERS` concurrent callers; the
/// elapsed time.
async fn spread<F, Fut>(n: usize, work: F) -> Result<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result> + Send,
{
    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..CALLERS {
        let work = work.clone();
        callers.spawn(async move {
            for i in (caller..n).step_by(CALLERS) {
                work(i).await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
    while let Some(done) = callers.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> Result {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, _client, _admin) = common::fresh_database("plinth_bench_meters").await?;
    let db = Db::connect(&DbConfig { pool_size: CALLERS + 2, ..DbConfig::new(&url) })?;
    let catalog = Catalog::parse(PLANS)?;
    let plan = catalog.get("pro").ok_or("no pro plan")?.clone();
    db.platform(async |c| {
        diesel::sql_query("CREATE TABLE public.bench_ceiling (LIKE public.usage_events INCLUDING DEFAULTS)")
            .execute(c)
            .await
            .map_err(plinth_http::ApiError::from)
    })
    .await
    .map_err(|e| format!("{e:?}"))?;
    let mut tenants = Vec::with_capacity(TENANTS);
    for i in 0..TENANTS {
        let tenant =
            registry::create(&db, &Slug::parse(&format!("meter{i}"))?, "Bench").await.map_err(|e| format!("{e}"))?;
        let customer = format!("cus_bench_{i}");
        db.platform(async |c| {
            plinth_billing::customers::link(c, tenant.id, &customer, "bench").await?.map_err(|_| "taken")?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await?;
        tenants.push(tenant.id);
    }
    let tenants: Arc<Vec<TenantId>> = Arc::new(tenants);

    // Recording, and its ceiling, in alternating rounds.
    let plan = Arc::new(plan);
    let (mut recorded, mut ceiling) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for bare in [round % 2 == 0, round % 2 == 1] {
            let (db, tenants, plan) = (db.clone(), Arc::clone(&tenants), Arc::clone(&plan));
            let took = spread(UNITS, move |i| {
                let (db, tenant, plan) = (db.clone(), tenants[i % TENANTS], Arc::clone(&plan));
                async move {
                    db.platform(async |c| match bare {
                        true => diesel::insert_into(bench_ceiling::table)
                            .values((
                                bench_ceiling::id.eq(uuid::Uuid::now_v7()),
                                bench_ceiling::tenant_id.eq(tenant.0),
                                bench_ceiling::meter.eq("tasks"),
                                bench_ceiling::quantity.eq(1_i64),
                            ))
                            .execute(c)
                            .await
                            .map(drop)
                            .map_err(plinth_http::ApiError::from),
                        false => plinth_billing::usage::record(c, tenant, &plan, "tasks", 1).await,
                    })
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                    Ok(())
                }
            })
            .await?;
            if bare { ceiling.push(took) } else { recorded.push(took) }
        }
    }

    // The stand-in Stripe: answers every meter event.
    let received = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&received);
    let server = HttpServer::new(move || {
        let counter = Arc::clone(&counter);
        App::new().default_service(web::to(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            async { HttpResponse::Ok().json(serde_json::json!({ "object": "billing.meter_event" })) }
        }))
    })
    .workers(1)
    .bind("127.0.0.1:0")?;
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    let config = StripeConfig {
        secret_key: Some(Secret::new("sk_test_bench")),
        api_base: format!("http://127.0.0.1:{port}"),
        breaker_open: Duration::from_secs(30),
        ..StripeConfig::default()
    };
    let api = Stripe::new(&config, "http://localhost")?.ok_or("no Stripe client")?;

    // Sending, batched: until every unit is reported.
    let started = Instant::now();
    let (mut batches, mut units) = (0, 0);
    loop {
        let sent = plinth_billing::usage::send(&db, &api, &catalog, 10_000).await?;
        batches += sent.batches;
        units += sent.units;
        if sent.batches == 0 {
            break;
        }
    }
    let batched = started.elapsed();
    // One meter event per unit, for comparison.
    let started = Instant::now();
    for i in 0..SINGLES {
        api.meter_event("plinth_tasks", &format!("single-{i}"), "cus_bench_0", 1, 0).await?;
    }
    let singles = started.elapsed();

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    println!("metered usage: {UNITS} units over {TENANTS} tenants, {CALLERS} concurrent callers, {ROUNDS} rounds");
    for (recorded, ceiling) in recorded.iter().zip(&ceiling) {
        println!(
            "  recorded: {:>8.0} units/s  ({:.2} s; one unit per transaction, with the plan's meter)",
            rate(UNITS, *recorded),
            recorded.as_secs_f64()
        );
        println!(
            "  ceiling:  {:>8.0} rows/s   ({:.2} s; the same rows inserted bare, one per transaction)",
            rate(UNITS, *ceiling),
            ceiling.as_secs_f64()
        );
    }
    println!(
        "  sent:     {:>8.0} units/s  ({:.2} s; {units} units in {batches} meter events, {} requests received)",
        rate(units as usize, batched),
        batched.as_secs_f64(),
        AtomicUsize::load(&received, Ordering::Relaxed)
    );
    println!(
        "  unbatched:{:>8.0} units/s  ({:.2} s; {SINGLES} units, one meter event each)",
        rate(SINGLES, singles),
        singles.as_secs_f64()
    );
    Ok(())
}

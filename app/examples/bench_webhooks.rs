//! Webhook intake benchmark (not a test).
//!
//! `cargo run --release -p plinth --example bench_webhooks`
//!
//! Starts Plinth in this process (2 workers, as on this machine by default)
//! and sends 20,000 signed Stripe events plus 5,000 redeliveries of some of
//! them (25,000 requests) to `POST /v1/webhooks/stripe` over 32 connections;
//! each is verified, stored (or found stored) and acknowledged. The ceiling,
//! measured in the same run, is the same inserts sent straight to
//! PostgreSQL over 32 connections: no HTTP, no signature. Uses database
//! `plinth_bench_webhooks` on the zero-configuration server (or
//! `DATABASE_URL`'s server), recreated on every run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use hmac::{KeyInit, Mac};
use plinth::config::Settings;
use plinth::startup::Application;

mod common;

use common::Result;

const EVENTS: usize = 20_000;
const REDELIVERIES: usize = 5_000;
const CONNECTIONS: usize = 32;
const SECRET: &str = "whsec_bench";
const FIXTURES: &str = include_str!("../../tests/fixtures/stripe/fixtures.json");

fn sign(body: &str, t: i64) -> Result<String> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes())?;
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("t={t},v1={hex}"))
}

#[tokio::main]
async fn main() -> Result {
    let (url, _client, admin) = common::fresh_database("plinth_bench_webhooks").await?;

    // Events built on Stripe's example subscription event.
    let fixtures: serde_json::Value = serde_json::from_str(FIXTURES)?;
    let t = chrono::Utc::now().timestamp();
    let mut bodies = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let mut event = fixtures["resources"]["event"].clone();
        let mut sub = fixtures["resources"]["subscription"].clone();
        sub["id"] = format!("sub_bench_{}", i % 1000).into();
        event["id"] = format!("evt_bench_{i:06}").into();
        event["type"] = "customer.subscription.updated".into();
        event["created"] = t.into();
        event["data"] = serde_json::json!({ "object": sub });
        bodies.push(event.to_string());
    }
    let mut deliveries: Vec<(String, String)> = Vec::with_capacity(EVENTS + REDELIVERIES);
    for body in &bodies {
        deliveries.push((body.clone(), sign(body, t)?));
    }
    for i in 0..REDELIVERIES {
        let body = &bodies[(i * 7) % EVENTS];
        deliveries.push((body.clone(), sign(body, t)?));
    }
    // Redeliveries arrive among the first deliveries, not all at the end.
    let n = deliveries.len();
    for i in 0..n {
        deliveries.swap(i, (i * 7919) % n);
    }

    let values: HashMap<String, String> = [
        ("PLINTH_LISTEN", "127.0.0.1:0"),
        ("PLINTH_STRIPE_WEBHOOK_SECRET", SECRET),
        ("PLINTH_WORKER", "false"),
        ("PLINTH_DB_POOL_SIZE", "32"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let settings = Settings::from_values(&values)?;
    let config = plinth::cli::db_config(&settings, &url);
    let app = Application::build(&settings, &config, url.clone(), plinth_tenants::notify::Listener::new()).await?;
    let endpoint = format!("http://127.0.0.1:{}/v1/webhooks/stripe", app.port());
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // reqwest's rustls has no built-in crypto provider: the one the app uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().pool_max_idle_per_host(CONNECTIONS).build()?;
    let started = Instant::now();
    let results: Vec<Result<(u16, Duration)>> = futures_util::stream::iter(deliveries.iter())
        .map(|(body, signature)| {
            let (http, endpoint) = (&http, &endpoint);
            async move {
                let sent = Instant::now();
                let res = http
                    .post(endpoint.as_str())
                    .header("content-type", "application/json")
                    .header("stripe-signature", signature.as_str())
                    .body(body.clone())
                    .send()
                    .await?;
                let status = res.status().as_u16();
                res.bytes().await?;
                Ok((status, sent.elapsed()))
            }
        })
        .buffer_unordered(CONNECTIONS)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let mut latencies = Vec::with_capacity(results.len());
    for result in results {
        let (status, latency) = result?;
        if status != 200 {
            return Err(format!("a delivery was answered {status}").into());
        }
        latencies.push(latency);
    }
    latencies.sort();
    let stored: i64 = client_for(&url).await?.query_one("SELECT count(*) FROM public.stripe_events", &[]).await?.get(0);
    let duplicates: i64 = client_for(&url)
        .await?
        .query_one("SELECT sum(duplicates)::bigint FROM public.stripe_events", &[])
        .await?
        .get(0);
    handle.stop(true).await;

    // Ceiling: the same rows, straight into PostgreSQL, 32 connections.
    let ceiling = client_for(&url).await?;
    ceiling
        .batch_execute(
            "CREATE TABLE raw_events (id text PRIMARY KEY, payload text NOT NULL, duplicates int NOT NULL DEFAULT 0)",
        )
        .await?;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(client_for(&url).await?);
    }
    let started_raw = Instant::now();
    let chunks: Vec<_> = deliveries.chunks(n.div_ceil(CONNECTIONS)).collect();
    let tasks = clients.iter().zip(chunks).map(|(c, chunk)| async move {
        let insert = c
            .prepare(
                "INSERT INTO raw_events (id, payload) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET duplicates = raw_events.duplicates + 1",
            )
            .await?;
        for (body, _) in chunk {
            let id = &body[body.find("evt_bench_").unwrap_or(0)..][..16];
            c.execute(&insert, &[&id, body]).await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    });
    for r in futures_util::future::join_all(tasks).await {
        r?;
    }
    let raw = started_raw.elapsed();

    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "webhook intake: {n} deliveries ({EVENTS} events, {REDELIVERIES} redeliveries), {CONNECTIONS} connections"
    );
    println!(
        "  plinth:  {:>7.0} deliveries/s  ({:.2} s; p50 {:.2} ms, p99 {:.2} ms; stored {stored}, duplicates counted {duplicates})",
        n as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
    println!(
        "  ceiling: {:>7.0} inserts/s     ({:.2} s; the same rows straight to PostgreSQL, no HTTP, no signature)",
        n as f64 / raw.as_secs_f64(),
        raw.as_secs_f64()
    );
    admin.shutdown();
    Ok(())
}

async fn client_for(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

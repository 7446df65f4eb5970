//! PostgreSQL lost for five seconds under load: two `plinth serve` instances
//! on a cluster the test owns, a bounded load of reads, writes and
//! invitations (which queue mail), and the server stopped at once (as a crash
//! or a failover would) and started again.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{TestResult, eventually};
use crate::processes::{Cluster, Serve};
use crate::smtp::SmtpServer;

#[derive(Debug)]
struct Answer {
    kind: &'static str,
    status: u16,
    retry_after: bool,
    took: Duration,
    /// The project id or invited address a 201 acknowledged.
    acknowledged: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_costs_503s_only_and_loses_no_write_or_mail() -> TestResult {
    let cluster = Cluster::init(&[])?;
    cluster.start()?;
    let smtp = SmtpServer::start().await?;
    let url = cluster.url("127.0.0.1", "postgres");
    let smtp_url = smtp.url();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("PLINTH_SMTP_URL", smtp_url.as_str()),
        ("PLINTH_DB_WAIT_TIMEOUT_MS", "2000"),
        ("PLINTH_DB_CONNECT_TIMEOUT_MS", "2000"),
        ("PLINTH_LIMIT_INVITATIONS_PER_TENANT", "100000/1h"),
        ("RUST_LOG", "warn"),
    ];
    let first = Serve::start(&env).await?;
    let second = Serve::start(&env).await?;
    let instances = [&first, &second];
    let http = crate::harness::http_client().timeout(Duration::from_secs(30)).build()?;
    let signed: serde_json::Value = http
        .post(format!("{}/v1/signup", first.base))
        .json(&json!({
            "email": "owner@restart.example.com", "password": "a long enough password",
            "organization": "Steady", "slug": "steady",
        }))
        .send()
        .await?
        .json()
        .await?;
    let token = signed["token"].as_str().ok_or_else(|| format!("no token: {signed}"))?.to_owned();
    // The signup's verification mail, so that later counts are the invitations'.
    eventually(Duration::from_secs(30), || async { Ok(smtp.accepted().len() == 1) }).await?;
    // Enterprise: no plan limit stops the load.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    client.execute("UPDATE public.tenants SET plan = 'enterprise' WHERE slug = 'steady'", &[]).await?;
    drop(client);
    driver.await??;

    let stop = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::<(Instant, Answer)>::new());
    let load = || async {
        while !stop.load(Ordering::SeqCst) {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let base = &instances[i % 2].base;
            let (kind, request) = match i % 3 {
                0 => ("read", http.get(format!("{base}/v1/projects"))),
                1 => ("write", http.post(format!("{base}/v1/projects")).json(&json!({ "name": format!("p-{i}") }))),
                _ => (
                    "invite",
                    http.post(format!("{base}/v1/invitations"))
                        .json(&json!({ "email": format!("invitee-{i}@restart.example.com"), "role": "member" })),
                ),
            };
            let started = Instant::now();
            let res = request.header("x-tenant", "steady").bearer_auth(&token).send().await;
            let took = started.elapsed();
            let answer = match res {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let retry_after = res.headers().contains_key("retry-after");
                    let body: serde_json::Value = res.json().await.unwrap_or_default();
                    let acknowledged = (status == 201).then(|| match kind {
                        "write" => body["id"].as_str().unwrap_or_default().to_owned(),
                        _ => format!("invitee-{i}@restart.example.com"),
                    });
                    Answer { kind, status, retry_after, took, acknowledged }
                }
                Err(_) => Answer { kind, status: 0, retry_after: false, took, acknowledged: None },
            };
            if let Ok(mut answers) = answers.lock() {
                answers.push((started, answer));
            }
        }
    };
    let successes_since = |since: Instant| {
        answers.lock().map_or(0, |a| a.iter().filter(|(at, a)| *at >= since && a.status < 300).count())
    };

    let script = async {
        let began = Instant::now();
        eventually(Duration::from_secs(60), || async { Ok(successes_since(began) >= 30) }).await?;
        // Down for five seconds: the outage is the scenario, not a wait.
        let down = Instant::now();
        cluster.stop()?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.start()?;
        let up = Instant::now();
        // Every instance answers a read again.
        let mut recovered = Vec::new();
        for instance in instances {
            let took = eventually(Duration::from_secs(30), || async {
                let res = http
                    .get(format!("{}/v1/projects", instance.base))
                    .header("x-tenant", "steady")
                    .bearer_auth(&token)
                    .send()
                    .await;
                Ok(res.is_ok_and(|r| r.status() == 200))
            })
            .await?;
            recovered.push(up.elapsed().max(took));
        }
        eventually(Duration::from_secs(60), || async { Ok(successes_since(up) >= 30) }).await?;
        stop.store(true, Ordering::SeqCst);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((down, up, recovered))
    };
    let (script, _, _, _) = tokio::join!(script, load(), load(), load());
    let (down, up, recovered) = script?;
    let answers = answers.into_inner().map_err(|_| "poisoned")?;

    // While it was down: 503 `unavailable` with Retry-After, or success
    // (caches); never a 500, never a hang past the pool's wait.
    let mut seen = BTreeMap::<(&str, u16), u32>::new();
    for (_, answer) in &answers {
        *seen.entry((answer.kind, answer.status)).or_default() += 1;
    }
    let during: Vec<_> = answers.iter().filter(|(at, _)| *at >= down && *at < up).collect();
    assert!(!during.is_empty(), "the load went on while PostgreSQL was down");
    for (_, answer) in &answers {
        assert!(matches!(answer.status, 200 | 201 | 503), "{answer:?}; all answers: {seen:?}");
        if answer.status == 503 {
            assert!(answer.retry_after, "503 without Retry-After: {answer:?}");
        }
        assert!(answer.took < Duration::from_secs(10), "a request hung: {answer:?}");
    }
    eprintln!(
        "answers {seen:?}; {} while down; recovered after {:?} (PostgreSQL back) per instance",
        during.len(),
        recovered
    );

    assert!(recovered.iter().all(|d| *d < Duration::from_secs(5)), "recovery took {recovered:?}");
    // Every instance is ready again: its NOTIFY listener reconnected.
    for instance in instances {
        instance.ready(Duration::from_secs(30)).await?;
    }
    // ... and its caches follow changes again: a suspension made in the
    // database reaches both instances.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client.execute("UPDATE public.tenants SET status = 'suspended' WHERE slug = 'steady'", &[]).await?;
    for instance in instances {
        eventually(Duration::from_secs(5), || async {
            let res = http
                .get(format!("{}/v1/projects", instance.base))
                .header("x-tenant", "steady")
                .bearer_auth(&token)
                .send()
                .await?;
            Ok(res.status() == 403)
        })
        .await?;
    }

    // Every acknowledged write is there.
    let schema: String =
        client.query_one("SELECT schema_name FROM public.tenants WHERE slug = 'steady'", &[]).await?.get(0);
    let stored: HashSet<String> = client
        .query(&format!("SELECT id::text FROM \"{schema}\".projects"), &[])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let written: Vec<&String> =
        answers.iter().filter(|(_, a)| a.kind == "write").filter_map(|(_, a)| a.acknowledged.as_ref()).collect();
    assert!(!written.is_empty());
    for id in &written {
        assert!(stored.contains(*id), "acknowledged project {id} is missing");
    }

    // The job worker went on: every acknowledged invitation's mail was
    // delivered, once.
    let invited: Vec<&String> =
        answers.iter().filter(|(_, a)| a.kind == "invite").filter_map(|(_, a)| a.acknowledged.as_ref()).collect();
    assert!(!invited.is_empty());
    let delivered_to = |address: &str| smtp.accepted().iter().filter(|m| m.contains(address)).count();
    eventually(Duration::from_secs(60), || async { Ok(invited.iter().all(|a| delivered_to(a) >= 1)) }).await?;
    for address in &invited {
        assert_eq!(delivered_to(address), 1, "{address} was mailed more than once");
    }
    Ok(())
}

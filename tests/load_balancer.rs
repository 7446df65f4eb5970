//! Three `plinth serve` instances behind HAProxy, restarted one after
//! another with SIGTERM under a mixed load (reads, writes, logins, Stripe
//! webhooks): no request fails (HAProxy retries what never reached a
//! server), no acknowledged write is lost, and afterwards every instance
//! sees every change within a second.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plinth_access::Role;
use plinth_tenants::registry;
use serde_json::json;

use crate::harness::{TEST_ENCRYPTION_KEY, TestDb, TestResult, eventually, member};
use crate::processes::{Haproxy, Serve};
use crate::stripe::{event, now, object, signature};

const SECRET: &str = "whsec_plinth_load_balancer";

#[derive(Debug)]
struct Answer {
    kind: &'static str,
    status: u16,
    acknowledged: Option<String>,
    /// Why no answer came (status 0).
    error: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_behind_haproxy_restart_in_turn_and_no_request_fails() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let env = [
        ("DATABASE_URL", testdb.url.as_str()),
        ("PLINTH_ENCRYPTION_KEY", TEST_ENCRYPTION_KEY),
        ("PLINTH_STRIPE_WEBHOOK_SECRET", SECRET),
        ("PLINTH_LIMIT_LOGIN_PER_IP", "100000/1m"),
        ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP", "100000/1m"),
        ("PLINTH_SHUTDOWN_TIMEOUT_SECS", "30"),
        // Not ready for a second before the listener closes: HAProxy checks
        // every 200 ms and takes a server out after two failed checks.
        ("PLINTH_SHUTDOWN_DRAIN_MS", "1000"),
        ("RUST_LOG", "warn"),
    ];
    let ports: Vec<u16> = (0..3)
        .map(|_| Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()))
        .collect::<std::io::Result<_>>()?;
    let mut instances = Vec::new();
    for port in &ports {
        let serve = Serve::spawn_on(*port, &env)?;
        serve.ready(Duration::from_secs(60)).await?;
        instances.push(serve);
    }
    let proxy = Haproxy::start(&ports).await?;
    let http = crate::harness::http_client().timeout(Duration::from_secs(60)).build()?;
    let base = proxy.base.clone();

    let (email, password) = ("owner@lb.example.com", "a long enough password");
    let signed: serde_json::Value = http
        .post(format!("{base}/v1/signup"))
        .json(&json!({ "email": email, "password": password, "organization": "Balanced", "slug": "balanced" }))
        .send()
        .await?
        .json()
        .await?;
    let token = signed["token"].as_str().ok_or_else(|| format!("no token: {signed}"))?.to_owned();
    let db = testdb.db(1)?;
    let tenant = db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, "balanced").await?))
        .await?
        .ok_or("no tenant")?;
    db.platform(async |c| {
        Ok::<_, plinth_http::ApiError>(
            registry::set_plan(c, tenant.id, "enterprise", registry::PlanSource::Operator).await?,
        )
    })
    .await?;
    let member_token = member(&db, &tenant, Role::Member).await?;

    let stop = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::<Answer>::new());
    let load = || async {
        while !stop.load(Ordering::SeqCst) {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let (kind, request) = match i % 4 {
                0 => {
                    ("read", http.get(format!("{base}/v1/projects")).header("x-tenant", "balanced").bearer_auth(&token))
                }
                1 => (
                    "write",
                    http.post(format!("{base}/v1/projects"))
                        .header("x-tenant", "balanced")
                        .bearer_auth(&token)
                        .json(&json!({ "name": format!("p-{i}") })),
                ),
                2 => (
                    "login",
                    http.post(format!("{base}/v1/auth/login")).json(&json!({ "email": email, "password": password })),
                ),
                _ => {
                    let mut subscription = object("subscription");
                    subscription["id"] = json!(format!("sub_lb_{i}"));
                    subscription["customer"] = json!(format!("cus_lb_{i}"));
                    let body =
                        event(&format!("evt_lb_{i}"), "customer.subscription.updated", now(), subscription).to_string();
                    let signed = signature(&body, SECRET, now());
                    (
                        "webhook",
                        http.post(format!("{base}/v1/webhooks/stripe"))
                            .header("content-type", "application/json")
                            .header("stripe-signature", signed)
                            .body(body),
                    )
                }
            };
            let answer = match request.send().await {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let body: serde_json::Value = res.json().await.unwrap_or_default();
                    let acknowledged = match (kind, status) {
                        ("write", 201) => body["id"].as_str().map(str::to_owned),
                        ("webhook", 200) => Some(format!("evt_lb_{i}")),
                        _ => None,
                    };
                    Answer { kind, status, acknowledged, error: None }
                }
                Err(err) => Answer { kind, status: 0, acknowledged: None, error: Some(format!("{err:#}")) },
            };
            if let Ok(mut answers) = answers.lock() {
                answers.push(answer);
            }
        }
    };
    let count = || answers.lock().map_or(0, |a| a.len());

    let script = async {
        let mut restarted = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let before = count();
            eventually(Duration::from_secs(60), || async { Ok(count() >= before + 100) }).await?;
            let started = Instant::now();
            let status = instances[i].terminate().await?;
            assert!(status.success(), "instance {i} exited with {status}");
            let serve = Serve::spawn_on(*port, &env)?;
            serve.ready(Duration::from_secs(60)).await?;
            instances[i] = serve;
            restarted.push(started.elapsed());
        }
        let before = count();
        eventually(Duration::from_secs(60), || async { Ok(count() >= before + 100) }).await?;
        stop.store(true, Ordering::SeqCst);
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(restarted)
    };
    let (restarted, _, _, _, _) = tokio::join!(script, load(), load(), load(), load());
    let restarted = restarted?;
    let answers = answers.into_inner().map_err(|_| "poisoned")?;

    let mut seen = BTreeMap::<(&str, u16), u32>::new();
    for answer in &answers {
        *seen.entry((answer.kind, answer.status)).or_default() += 1;
    }
    let failed: Vec<&Answer> = answers
        .iter()
        .filter(|a| !matches!((a.kind, a.status), ("read", 200) | ("write", 201) | ("login", 200) | ("webhook", 200)))
        .collect();
    eprintln!(
        "{} requests through HAProxy, {} failed: {seen:?}; restarts took {restarted:?}",
        answers.len(),
        failed.len()
    );
    let errors: Vec<&str> = failed.iter().filter_map(|a| a.error.as_deref()).collect();
    if !failed.is_empty() {
        let log = proxy.log();
        let unusual: Vec<&str> = log.lines().filter(|l| !l.contains(" 200 ") && !l.contains(" 201 ")).collect();
        panic!("failed requests: {failed:?}; without an answer: {errors:?}; HAProxy's log of others: {unusual:#?}");
    }

    // Every acknowledged write and webhook is stored.
    let client = testdb.client().await?;
    let projects: Vec<String> = client
        .query(&format!("SELECT id::text FROM {}.projects", tenant.schema.quoted()), &[])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let events: Vec<String> =
        client.query("SELECT id FROM public.stripe_events", &[]).await?.into_iter().map(|r| r.get(0)).collect();
    for answer in &answers {
        match (answer.kind, &answer.acknowledged) {
            ("write", Some(id)) => assert!(projects.contains(id), "acknowledged project {id} lost"),
            ("webhook", Some(id)) => assert!(events.contains(id), "acknowledged event {id} lost"),
            _ => {}
        }
    }

    // Every instance (asked directly) sees each change within a second.
    let me = |serve: &Serve, token: &str| {
        http.get(format!("{}/v1/tenant", serve.base))
            .header("x-tenant", "balanced")
            .bearer_auth(token.to_owned())
            .send()
    };
    let member_id = {
        let me: serde_json::Value =
            http.get(format!("{base}/v1/me")).bearer_auth(&member_token).send().await?.json().await?;
        me["user"]["id"].as_str().ok_or("no user id")?.to_owned()
    };
    for serve in &instances {
        assert_eq!(me(serve, &member_token).await?.json::<serde_json::Value>().await?["role"], "member");
    }
    let everywhere = |check: &'static str| {
        let instances = &instances;
        let me = &me;
        let member_token = &member_token;
        async move {
            let changed = Instant::now();
            for serve in instances {
                eventually(Duration::from_secs(1), || async {
                    let res = me(serve, member_token).await?;
                    let status = res.status().as_u16();
                    let body: serde_json::Value = res.json().await.unwrap_or_default();
                    Ok(match check {
                        "role" => body["role"] == "admin",
                        "plan" => body["plan"] == "pro",
                        _ => status == 403,
                    })
                })
                .await
                .map_err(|e| format!("{check} on {}: {e}", serve.base))?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(changed.elapsed())
        }
    };
    let res = http
        .patch(format!("{base}/v1/members/{member_id}"))
        .header("x-tenant", "balanced")
        .bearer_auth(&token)
        .json(&json!({ "role": "admin" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let role = everywhere("role").await?;
    db.platform(async |c| {
        Ok::<_, plinth_http::ApiError>(registry::set_plan(c, tenant.id, "pro", registry::PlanSource::Operator).await?)
    })
    .await?;
    let plan = everywhere("plan").await?;
    client.execute("UPDATE public.tenants SET status = 'suspended' WHERE slug = 'balanced'", &[]).await?;
    let suspended = everywhere("suspension").await?;
    eprintln!("seen by all three instances after: role {role:?}, plan {plan:?}, suspension {suspended:?}");
    Ok(())
}

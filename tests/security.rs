//! What a hostile probe found, each closed and kept closed: login timing,
//! bodies that never finish, unbounded hashing, racing guesses, keys that
//! outlive their creator, lock-outs, mail floods, stolen sessions, limiter
//! keys, NUL bytes, lost connections, a silent start, the HTTP layer's own
//! errors, wrong methods, look-alike names, client request ids, readiness.

use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{AppOptions, TestApp, TestDb, TestResult, assert_error, eventually, member};
use crate::world::{PASSWORD, World, world_with};
use plinth_access::Role;

/// Rate limits out of the way, for tests about something else.
const NO_LIMITS: [(&str, &str); 4] = [
    ("PLINTH_LIMIT_LOGIN_PER_IP", "100000/1m"),
    ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP", "100000/1m"),
    ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT", "100000/1m"),
    ("PLINTH_LIMIT_VERIFY_PER_IP", "100000/1m"),
];

/// A server on a database of its own, with these settings.
async fn app_with(settings: Vec<(&'static str, &'static str)>) -> TestResult<TestApp> {
    let testdb = TestDb::migrated().await?;
    let mut app = TestApp::spawn_on(&testdb, AppOptions { settings, ..Default::default() }).await?;
    app.testdb = Some(testdb);
    Ok(app)
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Result<reqwest::Response> {
    app.http.post(app.url("/v1/auth/login")).json(&json!({ "email": email, "password": password })).send().await
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

// 1. Every failed login costs the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_login_costs_the_same() -> TestResult {
    let w = world_with(AppOptions { settings: NO_LIMITS.to_vec(), ..Default::default() }).await?;
    w.signup("ada@example.com", "acme").await?;
    let long = "x".repeat(2_000);
    let cases: [(&str, &str, &str); 4] = [
        ("existing, wrong password", "ada@example.com", "wrong password, long"),
        ("unknown address", "nobody@example.com", "wrong password, long"),
        ("malformed address", "not an address", "wrong password, long"),
        ("over-long password", "ada@example.com", &long),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    // Interleaved, so a busy moment of the machine hits every case alike.
    for _ in 0..13 {
        for (i, (_, email, password)) in cases.iter().enumerate() {
            let started = Instant::now();
            let res = login(&w.app, email, password).await?;
            times[i].push(started.elapsed());
            assert_error(res, 401, "invalid_credentials").await?;
        }
    }
    let medians: Vec<Duration> = times.into_iter().map(median).collect();
    let (slowest, fastest) = (medians.iter().max().ok_or("none")?, medians.iter().min().ok_or("none")?);
    let report: Vec<String> = cases.iter().zip(&medians).map(|(c, m)| format!("{}: {m:?}", c.0)).collect();
    eprintln!("failed-login medians: {report:?}");
    assert!(slowest.as_secs_f64() <= fastest.as_secs_f64() * 3.0, "medians differ: {report:?}");
    w.worker.stop().await?;
    Ok(())
}

/// Sends `bytes` on a new raw connection and reads one answer (or what came
/// before the server closed or `within` passed).
async fn raw_exchange(addr: &str, bytes: &[u8], within: Duration) -> TestResult<String> {
    let mut stream = tokio::net::TcpStream::connect(addr.trim_start_matches("http://")).await?;
    stream.write_all(bytes).await?;
    read_answer(&mut stream, within).await
}

/// Reads one whole answer from `stream`.
async fn read_answer(stream: &mut tokio::net::TcpStream, within: Duration) -> TestResult<String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got);
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length = text[..head_end]
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_owned))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        if length.is_some_and(|n| got.len() >= head_end + 4 + n) {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    if read.is_err() && got.is_empty() {
        return Err(format!("no answer within {within:?}").into());
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

// 2. A body that never finishes is cut off; a webhook without a well-formed
//    signature is refused before its body is read.
#[tokio::test]
async fn a_body_that_never_finishes_is_answered_408() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let options = AppOptions {
        settings: vec![("PLINTH_BODY_TIMEOUT_SECS", "1"), ("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_test")],
        ..Default::default()
    };
    let app = TestApp::spawn_on(&testdb, options).await?;
    let head =
        "POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let answer = raw_exchange(&app.addr, format!("{head}{{\"email\":").as_bytes(), Duration::from_secs(20)).await?;
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    assert!(answer.contains("request_timeout") && answer.to_ascii_lowercase().contains("x-request-id"), "{answer}");

    // The webhook looks at Stripe-Signature before it waits for a body.
    for signature in ["", "Stripe-Signature: nonsense\r\n", &format!("Stripe-Signature: t=1,v1={}\r\n", "z".repeat(64))]
    {
        let head = format!(
            "POST /v1/webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{signature}Content-Length: 1000000\r\n\r\n"
        );
        let answer = raw_exchange(&app.addr, head.as_bytes(), Duration::from_secs(20)).await?;
        assert_eq!(status_of(&answer), Some(400), "{signature:?}: {answer}");
    }
    // The connection cap: with every slot held by a stalled body, a new
    // client waits in the backlog and is served once a stalled one is cut.
    let capped = TestApp::spawn_on(
        &testdb,
        AppOptions {
            settings: vec![("PLINTH_BODY_TIMEOUT_SECS", "2"), ("PLINTH_MAX_CONNECTIONS", "4")],
            ..Default::default()
        },
    )
    .await?;
    // Each stalled client first has a request answered, so it has surely
    // been accepted and holds a slot, then sends a head whose body never comes.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(capped.addr.trim_start_matches("http://")).await?;
        stream.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        assert_eq!(status_of(&read_answer(&mut stream, Duration::from_secs(30)).await?), Some(200));
        stream.write_all(head.as_bytes()).await?;
        stalled.push(stream);
    }
    let stalled = stalled.into_iter().map(|mut stream| async move {
        let answer = read_answer(&mut stream, Duration::from_secs(30)).await;
        (Instant::now(), answer)
    });
    let fresh = async {
        let answer =
            raw_exchange(&capped.addr, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(30)).await;
        (Instant::now(), answer)
    };
    let (stalled, (fresh_at, fresh)) = tokio::join!(futures_util::future::join_all(stalled), fresh);
    assert_eq!(status_of(&fresh?), Some(200));
    let first_cut = stalled.iter().map(|(at, _)| *at).min().ok_or("none")?;
    for (_, answer) in stalled {
        assert_eq!(status_of(&answer?), Some(408));
    }
    assert!(fresh_at >= first_cut, "the fifth client was served before any slot was freed");

    // A well-formed header with a stalled body meets the same timeout.
    let head = format!(
        "POST /v1/webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nStripe-Signature: t=1,v1={}\r\nContent-Length: 1000\r\n\r\n{{",
        "a".repeat(64)
    );
    let answer = raw_exchange(&app.addr, head.as_bytes(), Duration::from_secs(20)).await?;
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    Ok(())
}

/// `plinth serve` as a process of its own, on a test database.
struct Served {
    child: tokio::process::Child,
    addr: String,
}

impl Served {
    async fn start(testdb: &TestDb, env: &[(&str, &str)]) -> TestResult<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("plinth-served-{}", uuid::Uuid::new_v4().simple()));
        // Started with the soft file limit lowered (to 256, or under the
        // hard limit), so raising it at start is seen.
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", r#"ulimit -Sn 256 && exec "$0" serve"#, env!("CARGO_BIN_EXE_plinth")])
            .env("DATABASE_URL", &testdb.url)
            .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
            .env("PLINTH_DATA_DIR", &dir)
            .env("PLINTH_WORKER", "false")
            .env("PLINTH_WORKERS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let served = Self { child, addr: format!("http://127.0.0.1:{port}") };
        let http = crate::harness::http_client().build()?;
        eventually(Duration::from_secs(60), || async {
            Ok(http.get(format!("{}/health/ready", served.addr)).send().await.is_ok_and(|r| r.status() == 200))
        })
        .await?;
        Ok(served)
    }

    fn proc_file(&self, name: &str) -> TestResult<String> {
        let pid = self.child.id().ok_or("exited")?;
        Ok(std::fs::read_to_string(format!("/proc/{pid}/{name}"))?)
    }

    /// Peak resident memory (VmHWM), in MiB.
    fn peak_mib(&self) -> TestResult<u64> {
        let status = self.proc_file("status")?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .ok_or("no VmHWM")?
            .parse()?;
        Ok(kb / 1024)
    }
}

// 2 and 3. The file limit is raised at start; password hashing is bounded,
// and a reset token is checked before the new password is hashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_is_bounded_under_bursts() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let mut env = NO_LIMITS.to_vec();
    env.push(("PLINTH_HASH_CONCURRENCY", "2"));
    let served = Served::start(&testdb, &env).await?;
    let limits = served.proc_file("limits")?;
    let files = limits.lines().find(|l| l.starts_with("Max open files")).ok_or("no file limit")?;
    let numbers: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.first(), numbers.get(1), "soft file limit raised to the hard one: {files}");

    let http = crate::harness::http_client().timeout(Duration::from_secs(120)).build()?;
    let res = http
        .post(format!("{}/v1/signup", served.addr))
        .json(&json!({ "email": "ada@example.com", "password": PASSWORD, "organization": "Acme", "slug": "acme" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let before = served.peak_mib()?;
    let logins = (0..120).map(|i| {
        let (http, url) = (http.clone(), format!("{}/v1/auth/login", served.addr));
        let email = if i % 2 == 0 { "ada@example.com".to_owned() } else { format!("nobody{i}@example.com") };
        async move { http.post(url).json(&json!({ "email": email, "password": "wrong password, long" })).send().await }
    });
    let resets = (0..40).map(|i| {
        let (http, url) = (http.clone(), format!("{}/v1/auth/password-reset/confirm", served.addr));
        let body = json!({ "token": format!("pls_random{i}"), "password": "a brand new passphrase" });
        async move { http.post(url).json(&body).send().await }
    });
    let (logins, resets) = tokio::join!(futures_util::future::join_all(logins), futures_util::future::join_all(resets));
    let mut statuses = std::collections::BTreeMap::new();
    for res in logins.into_iter().chain(resets) {
        let res = res?;
        let status = res.status().as_u16();
        if status == 503 {
            assert!(res.headers().contains_key("retry-after"), "a 503 says when to come back");
        }
        *statuses.entry(status).or_insert(0) += 1;
    }
    assert!(statuses.keys().all(|s| [400, 401, 503].contains(s)), "{statuses:?}");
    assert_eq!(statuses.get(&400), Some(&40), "every random reset token is refused: {statuses:?}");
    let peak = served.peak_mib()?;
    eprintln!("peak memory: {before} MiB before the burst, {peak} MiB after; answers {statuses:?}");
    // Two hashes at 19 MiB each, over a debug build's footprint.
    assert!(peak < before + 200, "peak {peak} MiB, {before} MiB before the burst");
    Ok(())
}

// 4. Concurrent guesses meet the failed-login limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_meet_the_failed_login_limit() -> TestResult {
    let w = world_with(AppOptions {
        settings: vec![
            ("PLINTH_LIMIT_LOGIN_PER_IP", "1000/1m"),
            ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP", "5/15m"),
        ],
        ..Default::default()
    })
    .await?;
    w.signup("ada@example.com", "acme").await?;
    let guesses = (0..120).map(|_| login(&w.app, "ada@example.com", "wrong password, long"));
    let mut verified = 0;
    for res in futures_util::future::join_all(guesses).await {
        match res?.status().as_u16() {
            401 => verified += 1,
            429 => {}
            other => return Err(format!("unexpected {other}").into()),
        }
    }
    eprintln!("{verified} of 120 concurrent guesses verified against a limit of 5");
    assert!(verified <= 5, "{verified} guesses were verified against a limit of 5");
    // A success gives its reservation back: the owner is not slowed by their own logins.
    let w2 = world_with(AppOptions {
        settings: vec![("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP", "2/15m")],
        ..Default::default()
    })
    .await?;
    w2.signup("bob@example.com", "bobco").await?;
    for _ in 0..5 {
        assert_eq!(login(&w2.app, "bob@example.com", PASSWORD).await?.status(), 200);
    }
    w.worker.stop().await?;
    w2.worker.stop().await?;
    Ok(())
}

fn user_id_of(me: &Value) -> TestResult<String> {
    Ok(me["user"]["id"].as_str().ok_or("no user id")?.to_owned())
}

// 5. A key acts with at most its creator's current role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_do_not_outlive_their_creators_role() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    let as_token = |token: &str, method: Method, path: &str| {
        app.http.request(method, app.url(path)).header("x-tenant", "acme").bearer_auth(token)
    };
    let new_key = |token: String, role: &'static str| {
        let req = as_token(&token, Method::POST, "/v1/api-keys").json(&json!({ "name": "k", "role": role }));
        async move {
            let res = req.send().await?;
            assert_eq!(res.status(), 201);
            let body: Value = res.json().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(body["key"].as_str().ok_or("no key")?.to_owned())
        }
    };
    let me = |token: &str| app.http.get(app.url("/v1/me")).bearer_auth(token).send();

    // Removed: the admin's key stops working.
    let removed = member(&app.db, &acme, Role::Admin).await?;
    let removed_id = user_id_of(&me(&removed).await?.json().await?)?;
    let removed_key = new_key(removed.clone(), "admin").await?;
    // The same person is an admin of another tenant, with a key there.
    let globex = app.create_tenant_on("globex", "pro").await?;
    crate::harness::add_member(&app.db, &globex, &removed).await?;
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    client
        .execute(
            "UPDATE public.memberships SET role = 'admin' WHERE tenant_id = $1 AND user_id = $2::text::uuid",
            &[&globex.id.0, &removed_id],
        )
        .await?;
    let in_globex = |token: &str, method: Method, path: &str| {
        app.http.request(method, app.url(path)).header("x-tenant", "globex").bearer_auth(token)
    };
    // The policy on this instance follows the role change within a second.
    eventually(Duration::from_secs(2), || async {
        Ok(in_globex(&removed, Method::GET, "/v1/members").send().await?.status() == 200)
    })
    .await?;
    let res =
        in_globex(&removed, Method::POST, "/v1/api-keys").json(&json!({ "name": "g", "role": "admin" })).send().await?;
    assert_eq!(res.status(), 201);
    let globex_key = res.json::<Value>().await?["key"].as_str().ok_or("no key")?.to_owned();
    // ... and so does a key minted by that key.
    let minted = new_key(removed_key.clone(), "member").await?;
    assert_eq!(as_token(&minted, Method::GET, "/v1/projects").send().await?.status(), 200);
    let res = app.req(Method::DELETE, "acme", &format!("/v1/members/{removed_id}")).send().await?;
    assert_eq!(res.status(), 204);
    for key in [&removed_key, &minted] {
        eventually(Duration::from_secs(2), || async {
            Ok(as_token(key, Method::GET, "/v1/projects").send().await?.status() == 401)
        })
        .await?;
    }
    // Leaving one tenant touches no key of another.
    assert_eq!(in_globex(&globex_key, Method::GET, "/v1/members").send().await?.status(), 200);
    for (method, path, body) in [
        (Method::GET, "/v1/members", None),
        (Method::POST, "/v1/api-keys", Some(json!({ "name": "k2", "role": "admin" }))),
        (Method::POST, "/v1/invitations", Some(json!({ "email": "eve@example.com", "role": "admin" }))),
    ] {
        let mut req = as_token(&removed_key, method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        assert_error(req.send().await?, 401, "unauthenticated").await?;
    }

    // Demoted: keys above the new role stop working, the rest go on.
    let demoted = member(&app.db, &acme, Role::Admin).await?;
    let demoted_id = user_id_of(&me(&demoted).await?.json().await?)?;
    let admin_key = new_key(demoted.clone(), "admin").await?;
    let viewer_key = new_key(demoted.clone(), "viewer").await?;
    let res = app
        .req(Method::PATCH, "acme", &format!("/v1/members/{demoted_id}"))
        .json(&json!({ "role": "member" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    eventually(Duration::from_secs(2), || async {
        Ok(as_token(&admin_key, Method::GET, "/v1/members").send().await?.status() == 401)
    })
    .await?;
    assert_eq!(as_token(&viewer_key, Method::GET, "/v1/projects").send().await?.status(), 200);
    // An account deleted outright takes its keys with it (its memberships
    // cascade away and the keys lose their creator).
    client.execute("DELETE FROM public.users WHERE id = $1::text::uuid", &[&demoted_id]).await?;
    eventually(Duration::from_secs(2), || async {
        Ok(as_token(&viewer_key, Method::GET, "/v1/projects").send().await?.status() == 401)
    })
    .await?;

    // Revoking a key revokes what it minted.
    let parent = new_key(app.token("acme").ok_or("no token")?, "admin").await?;
    let child = new_key(parent.clone(), "viewer").await?;
    let listed: Value = app.req(Method::GET, "acme", "/v1/api-keys").send().await?.json().await?;
    let parent_id = listed["data"]
        .as_array()
        .ok_or("no keys")?
        .iter()
        .find(|k| parent.starts_with(k["prefix"].as_str().unwrap_or("-")))
        .and_then(|k| k["id"].as_str())
        .ok_or("parent not listed")?
        .to_owned();
    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/api-keys/{parent_id}")).send().await?.status(), 204);
    eventually(Duration::from_secs(2), || async {
        Ok(as_token(&child, Method::GET, "/v1/projects").send().await?.status() == 401)
    })
    .await?;
    Ok(())
}

// 6. Guesses from many addresses slow the attackers, not the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_from_many_addresses_do_not_lock_out_the_owner() -> TestResult {
    let w =
        world_with(AppOptions { settings: vec![("PLINTH_CLIENT_IP_HEADER", "x-test-client")], ..Default::default() })
            .await?;
    w.signup("ada@example.com", "acme").await?;
    let from = |ip: String, password: &'static str| {
        w.app
            .http
            .post(w.app.url("/v1/auth/login"))
            .header("x-test-client", ip)
            .json(&json!({ "email": "ada@example.com", "password": password }))
            .send()
    };
    for i in 0..50 {
        from(format!("203.0.113.{}", i % 10), "guess guess guess").await?;
    }
    // The account is over its limit: a guess from a fresh address is refused ...
    assert_error(from("198.51.100.7".into(), "guess guess guess").await?, 429, "rate_limited").await?;
    // ... and the owner, from an address with no failures, gets in.
    assert_eq!(from("192.0.2.10".into(), PASSWORD).await?.status(), 200);
    // An attacker's address stays refused, even with the right password.
    assert_error(from("203.0.113.3".into(), PASSWORD).await?, 429, "rate_limited").await?;
    w.worker.stop().await?;
    Ok(())
}

async fn outbox_count(w: &World, like: &str) -> TestResult<i64> {
    let client = w.app.testdb.as_ref().ok_or("no db")?.client().await?;
    Ok(client
        .query_one("SELECT count(*) FROM public.mail_outbox WHERE idempotency_key LIKE $1", &[&like])
        .await?
        .get(0))
}

// 7. Invitation mails are limited per address and per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitation_resends_are_limited() -> TestResult {
    let w = world_with(AppOptions {
        settings: vec![
            ("PLINTH_LIMIT_INVITATIONS_PER_ADDRESS", "3/1h"),
            ("PLINTH_LIMIT_INVITATIONS_PER_TENANT", "5/1h"),
        ],
        ..Default::default()
    })
    .await?;
    w.app.create_tenant_on("acme", "pro").await?;
    w.app.create_tenant_on("globex", "pro").await?;
    for _ in 0..3 {
        assert_eq!(w.invite("acme", "eve@example.com", "member").await?.status(), 201);
    }
    assert_error(w.invite("acme", "eve@example.com", "member").await?, 429, "rate_limited").await?;
    // The recipient's limit holds across organizations.
    assert_error(w.invite("globex", "eve@example.com", "member").await?, 429, "rate_limited").await?;
    assert_eq!(w.invite("acme", "fay@example.com", "member").await?.status(), 201);
    assert_eq!(w.invite("acme", "gus@example.com", "member").await?.status(), 201);
    assert_error(w.invite("acme", "hal@example.com", "member").await?, 429, "rate_limited").await?;
    assert_eq!(outbox_count(&w, "invitation:%").await?, 5, "a refused invitation sends nothing");
    w.worker.stop().await?;
    Ok(())
}

// 8. Organizations per user are limited; a failed login is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_per_user_are_limited_and_failures_recorded_once() -> TestResult {
    let w = world_with(AppOptions {
        settings: vec![("PLINTH_MAX_ORGANIZATIONS_PER_USER", "4"), ("PLINTH_LIMIT_ORGANIZATIONS_PER_USER", "3/1h")],
        ..Default::default()
    })
    .await?;
    let token = w.signup("ada@example.com", "acme").await?["token"].as_str().ok_or("no token")?.to_owned();
    let create = |slug: String| {
        w.app
            .http
            .post(w.app.url("/v1/tenants"))
            .bearer_auth(&token)
            .json(&json!({ "organization": "More", "slug": slug }))
            .send()
    };
    for i in 0..3 {
        assert_eq!(create(format!("more{i}")).await?.status(), 201);
    }
    assert_error(create("more3".into()).await?, 429, "rate_limited").await?;
    let w2 =
        world_with(AppOptions { settings: vec![("PLINTH_MAX_ORGANIZATIONS_PER_USER", "4")], ..Default::default() })
            .await?;
    let token2 = w2.signup("bob@example.com", "bobco").await?["token"].as_str().ok_or("no token")?.to_owned();
    for i in 0..4 {
        let res = w2
            .app
            .http
            .post(w2.app.url("/v1/tenants"))
            .bearer_auth(&token2)
            .json(&json!({ "organization": "More", "slug": format!("bob{i}") }))
            .send()
            .await?;
        if i < 3 {
            assert_eq!(res.status(), 201);
        } else {
            assert_error(res, 403, "forbidden").await?;
        }
    }

    // Ada belongs to four organizations; three failed logins are three records.
    for _ in 0..3 {
        assert_error(login(&w.app, "ada@example.com", "wrong password, long").await?, 401, "invalid_credentials")
            .await?;
    }
    let client = w.app.testdb.as_ref().ok_or("no db")?.client().await?;
    let recorded: i64 = client.query_one("SELECT count(*) FROM public.login_failures", &[]).await?.get(0);
    assert_eq!(recorded, 3);
    let schemas = client.query("SELECT schema_name FROM public.tenants", &[]).await?;
    assert_eq!(schemas.len(), 4);
    for row in schemas {
        let schema: String = row.get(0);
        let sql = format!("SELECT count(*) FROM \"{schema}\".audit_log WHERE action = 'auth.login_failed'");
        assert_eq!(client.query_one(&sql, &[]).await?.get::<_, i64>(0), 0, "nothing per organization");
    }
    w.worker.stop().await?;
    w2.worker.stop().await?;
    Ok(())
}

/// The code an authenticator app would show now.
fn code_now(secret_base32: &str) -> TestResult<String> {
    let secret = totp_rs::Secret::try_from_base32(secret_base32)?;
    let totp = totp_rs::Builder::new().with_secret(secret).build()?;
    Ok(totp.generate_current().to_string())
}

// 9. A stolen session cannot turn on two-factor login; turning it on ends the
//    other sessions; an operator can turn it off for a verified owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_session_cannot_turn_on_two_factor_login() -> TestResult {
    let w = world_with(AppOptions::default()).await?;
    let owner = w.signup("ada@example.com", "acme").await?["token"].as_str().ok_or("no token")?.to_owned();
    let stolen: Value = login(&w.app, "ada@example.com", PASSWORD).await?.json().await?;
    let stolen = stolen["token"].as_str().ok_or("no token")?.to_owned();
    let call =
        |token: &str, path: &str, body: Value| w.app.http.post(w.app.url(path)).bearer_auth(token).json(&body).send();
    assert_error(call(&stolen, "/v1/auth/totp/enroll", json!({})).await?, 400, "invalid_request").await?;
    let wrong = json!({ "password": "not the password at all" });
    assert_error(call(&stolen, "/v1/auth/totp/enroll", wrong).await?, 401, "invalid_credentials").await?;

    let enrolled: Value = call(&owner, "/v1/auth/totp/enroll", json!({ "password": PASSWORD })).await?.json().await?;
    let secret = enrolled["secret"].as_str().ok_or("no secret")?.to_owned();
    let no_password = json!({ "code": code_now(&secret)? });
    assert_error(call(&owner, "/v1/auth/totp/confirm", no_password).await?, 400, "invalid_request").await?;
    let res =
        call(&owner, "/v1/auth/totp/confirm", json!({ "code": code_now(&secret)?, "password": PASSWORD })).await?;
    assert_eq!(res.status(), 200);
    // The other session has ended; this one goes on.
    eventually(Duration::from_secs(2), || async { Ok(w.me(&stolen).await?.status() == 401) }).await?;
    assert_eq!(w.me(&owner).await?.status(), 200);

    // The recovery path for a lost authenticator and lost recovery codes: an
    // operator, having verified the owner, turns the second factor off.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["admin", "reset-second-factor", "--email", "ada@example.com"])
        .env("DATABASE_URL", &w.app.testdb.as_ref().ok_or("no db")?.url)
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(login(&w.app, "ada@example.com", PASSWORD).await?.status(), 200);
    w.worker.stop().await?;
    Ok(())
}

// 10. IPv6 clients are counted per /64.
#[tokio::test]
async fn ipv6_clients_are_counted_per_64() -> TestResult {
    let app =
        app_with(vec![("PLINTH_CLIENT_IP_HEADER", "x-test-client"), ("PLINTH_LIMIT_LOGIN_PER_IP", "3/1h")]).await?;
    let from = |ip: &'static str| {
        app.http
            .post(app.url("/v1/auth/login"))
            .header("x-test-client", ip)
            .json(&json!({ "email": "nobody@example.com", "password": "wrong password, long" }))
            .send()
    };
    for ip in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
        assert_eq!(from(ip).await?.status(), 401);
    }
    assert_error(from("2001:db8:1:2:abcd::9").await?, 429, "rate_limited").await?;
    assert_eq!(from("2001:db8:1:3::1").await?.status(), 401, "another /64 is another client");
    Ok(())
}

// 11. NUL in text input is refused at the edge.
#[tokio::test]
async fn nul_bytes_in_text_input_are_refused() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant_on("acme", "pro").await?;
    for path in ["/v1/audit-log?action=%00", "/v1/audit-log?actor=a%00b", "/v1/projects?cursor=%00"] {
        assert_error(app.req(Method::GET, "acme", path).send().await?, 400, "invalid_request").await?;
    }
    for (path, body) in [
        ("/v1/auth/login", json!({ "email": "a\u{0}@example.com", "password": "wrong password, long" })),
        ("/v1/auth/password-reset", json!({ "email": "a\u{0}@example.com" })),
        (
            "/v1/signup",
            json!({ "email": "a@example.com", "password": PASSWORD, "organization": "A\u{0}", "slug": "abc" }),
        ),
        ("/v1/auth/verify-email", json!({ "token": "pls_\u{0}" })),
    ] {
        let res = app.http.post(app.url(path)).json(&body).send().await?;
        assert_error(res, 400, "invalid_request").await?;
    }
    Ok(())
}

// 12. A signed webhook whose id or type holds a NUL is stored, parked.
#[tokio::test]
async fn signed_webhooks_with_nul_are_stored_parked() -> TestResult {
    let secret = "whsec_nul_test";
    let app = app_with(vec![("PLINTH_STRIPE_WEBHOOK_SECRET", secret)]).await?;
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    for body in [
        r#"{"id":"evt_\u0000a","object":"event","type":"customer.updated","created":1,"data":{"object":{"id":"cus_1"}}}"#,
        r#"{"id":"evt_nul_type","object":"event","type":"customer.\u0000","created":1,"data":{"object":{"id":"cus_\u0000"}}}"#,
        "{\"id\":\"evt_raw\u{0}\"}",
    ] {
        let t = crate::stripe::now();
        let res = app
            .http
            .post(app.url("/v1/webhooks/stripe"))
            .header("content-type", "application/json")
            .header("stripe-signature", crate::stripe::signature(body, secret, t))
            .body(body.to_owned())
            .send()
            .await?;
        assert_eq!(res.status(), 200, "{body}: {}", res.text().await?);
    }
    let parked: i64 =
        client.query_one("SELECT count(*) FROM public.stripe_events WHERE status = 'parked'", &[]).await?.get(0);
    assert_eq!(parked, 3);
    Ok(())
}

// 13. Lost connections answer 503, never 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_database_connections_answer_503() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    for _ in 0..5 {
        // Warm every pooled connection, then end them all from the server's side.
        let warm = (0..8).map(|_| app.req(Method::GET, "acme", "/v1/projects").send());
        for res in futures_util::future::join_all(warm).await {
            assert_eq!(res?.status(), 200);
        }
        client
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend' \
                 AND query NOT ILIKE '%LISTEN%'",
            )
            .await?;
        let after = (0..8).map(|_| app.req(Method::GET, "acme", "/v1/projects").send());
        for res in futures_util::future::join_all(after).await {
            let res = res?;
            let status = res.status().as_u16();
            assert!(status == 200 || status == 503, "got {status}: {}", res.text().await?);
        }
    }
    Ok(())
}

/// A TCP listener that accepts and never answers: a database that hangs.
async fn black_hole() -> TestResult<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    Ok((port, task))
}

async fn run_plinth(args: &[&str], env: &[(&str, String)], within: Duration) -> TestResult<std::process::Output> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"));
    cmd.args(args).kill_on_drop(true).stdin(Stdio::null());
    let dir = std::env::temp_dir().join(format!("plinth-run-{}", uuid::Uuid::new_v4().simple()));
    cmd.env("PLINTH_DATA_DIR", dir).env("PLINTH_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    match tokio::time::timeout(within, cmd.output()).await {
        Ok(out) => Ok(out?),
        Err(_) => Err(format!("plinth {args:?} still running after {within:?}").into()),
    }
}

// 14. `serve` against a database that does not answer stops with a message;
//     with migrations off it does not migrate; a held migration lock is waited
//     for, with a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_does_not_hang_on_a_silent_database() -> TestResult {
    let (port, hole) = black_hole().await?;
    let env = [
        ("DATABASE_URL", format!("postgres://postgres@127.0.0.1:{port}/plinth")),
        ("PLINTH_DB_CONNECT_TIMEOUT_MS", "1000".to_owned()),
    ];
    let out = run_plinth(&["serve"], &env, Duration::from_secs(60)).await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out") || stderr.contains("timeout"), "{stderr}");
    hole.abort();

    let empty = TestDb::empty().await?;
    let env = [("DATABASE_URL", empty.url.clone()), ("PLINTH_MIGRATE_ON_START", "false".to_owned())];
    let out = run_plinth(&["serve"], &env, Duration::from_secs(60)).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plinth migrate"), "says what to run");
    let client = empty.client().await?;
    let tables: i64 = client
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'tenants'", &[])
        .await?
        .get(0);
    assert_eq!(tables, 0, "nothing was migrated");

    // Another instance holds the migration lock: wait, bounded, and say so.
    let testdb = TestDb::migrated().await?;
    let holder = testdb.client().await?;
    holder.batch_execute("SELECT pg_advisory_lock(72170001)").await?;
    let env = [("DATABASE_URL", testdb.url.clone()), ("PLINTH_MIGRATION_LOCK_TIMEOUT_MS", "1000".to_owned())];
    let out = run_plinth(&["migrate"], &env, Duration::from_secs(60)).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

// 15. Errors of the HTTP layer itself answer in the envelope, with a request id.
#[tokio::test]
async fn http_layer_errors_use_the_envelope() -> TestResult {
    let secret = "whsec_envelope";
    let app = app_with(vec![("PLINTH_STRIPE_WEBHOOK_SECRET", secret)]).await?;
    let big = "x".repeat(2 * 1024 * 1024);
    let res = app
        .http
        .post(app.url("/v1/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", crate::stripe::signature(&big, secret, crate::stripe::now()))
        .body(big)
        .send()
        .await?;
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 413, "payload_too_large").await?;
    let res = app.http.put(app.url("/v1/auth/login")).send().await?;
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 405, "method_not_allowed").await?;
    // A query string that does not decode.
    app.create_tenant("acme").await?;
    let res = app.req(Method::GET, "acme", "/v1/projects?limit=%ZZ").send().await?;
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 400, "invalid_request").await?;
    Ok(())
}

// 15. Client mistakes, however malformed, never log at ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_do_not_log_at_error() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = crate::harness::TempDir::new("logs")?;
    let log = dir.path.join("serve.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("serve")
        .env("DATABASE_URL", &testdb.url)
        .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("PLINTH_DATA_DIR", &dir.path)
        .env("PLINTH_WORKER", "false")
        .env("PLINTH_LOG_FORMAT", "json")
        .env("PLINTH_BODY_TIMEOUT_SECS", "1")
        .env("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_logs")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    let addr = format!("http://127.0.0.1:{port}");
    let http = crate::harness::http_client().build()?;
    eventually(Duration::from_secs(60), || async {
        Ok(http.get(format!("{addr}/health/ready")).send().await.is_ok_and(|r| r.status() == 200))
    })
    .await?;
    let within = Duration::from_secs(20);
    let mistakes: [&[u8]; 5] = [
        b"GARBAGE\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{\"a\":1, \"b\": [1, 2, 3]}",
        b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        b"PUT /v1/auth/login HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for bytes in mistakes {
        let _ = raw_exchange(&addr, bytes, within).await;
    }
    let big = "x".repeat(2 * 1024 * 1024);
    let signature = format!("t=1,v1={}", "a".repeat(64));
    let res =
        http.post(format!("{addr}/v1/webhooks/stripe")).header("stripe-signature", signature).body(big).send().await?;
    assert_eq!(res.status(), 413);
    let res = http.get(format!("{addr}/v1/audit-log?action=%00")).send().await?;
    assert_eq!(res.status(), 400);
    // The last answer is in: every line about these requests has been written.
    child.start_kill()?;
    child.wait().await?;
    let text = std::fs::read_to_string(&log)?;
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("\"level\":\"ERROR\"")).collect();
    assert!(errors.is_empty(), "client mistakes logged at ERROR: {errors:#?}");
    assert!(text.contains("request finished"), "the log was written at all");
    Ok(())
}

// 16. A wrong method is 405 on every route.
#[tokio::test]
async fn a_wrong_method_is_405_everywhere() -> TestResult {
    let app = TestApp::spawn().await?;
    for (method, path) in [
        (Method::GET, "/v1/signup"),
        (Method::GET, "/v1/auth/login"),
        (Method::PUT, "/v1/me"),
        (Method::PUT, "/v1/members"),
        (Method::GET, "/v1/invitations"),
        (Method::PUT, "/v1/api-keys/0192f0c5-0000-7000-8000-000000000000"),
        (Method::GET, "/v1/webhooks/stripe"),
        (Method::POST, "/v1/tenant"),
        (Method::POST, "/v1/admin/tenants"),
        (Method::POST, "/health/live"),
        (Method::DELETE, "/v1/billing/checkout"),
    ] {
        let res = app.http.request(method.clone(), app.url(path)).send().await?;
        let allow = res.headers().get("allow").and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_error(res, 405, "method_not_allowed").await?;
        assert!(allow.is_some_and(|a| !a.contains(method.as_str())), "{method} {path}: Allow names the others");
    }
    assert_error(app.http.get(app.url("/v1/nothing-here")).send().await?, 404, "not_found").await?;
    Ok(())
}

// 17. Look-alike slugs, hidden characters in names, IP-literal email domains.
#[tokio::test]
async fn look_alikes_and_ip_literals_are_refused() -> TestResult {
    let app = app_with(NO_LIMITS.to_vec()).await?;
    let signup = |email: &str, organization: &str, slug: &str| {
        app.http
            .post(app.url("/v1/signup"))
            .json(&json!({ "email": email, "password": PASSWORD, "organization": organization, "slug": slug }))
            .send()
    };
    for (email, organization, slug, field) in [
        ("a@example.com", "Acme", "xn--80ak6aa92e", "slug"),
        ("a@example.com", "Acme", "ab--cd", "slug"),
        ("a@example.com", "Acme\u{202e}gnp.exe", "acme", "organization"),
        ("a@example.com", "Ac\u{200b}me", "acme", "organization"),
        ("a@example.com", "Acme\u{feff}", "acme", "organization"),
        ("a@[10.0.0.5]", "Acme", "acme", "email"),
        ("a@[IPv6:::1]", "Acme", "acme", "email"),
        ("a@10.0.0.5", "Acme", "acme", "email"),
    ] {
        let body = assert_error(signup(email, organization, slug).await?, 400, "invalid_request").await?;
        let fields: Vec<&str> =
            body["error"]["details"].as_array().into_iter().flatten().filter_map(|d| d["field"].as_str()).collect();
        assert!(fields.contains(&field), "{email} {organization:?} {slug}: {body}");
    }
    assert_eq!(signup("a@example.com", "Acme Ltd. — Zürich", "acme-zurich").await?.status(), 201);
    Ok(())
}

// 18. The audit log records the server's request id, not the client's.
#[tokio::test]
async fn the_audit_log_records_the_servers_request_id() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant_on("acme", "pro").await?;
    let res = app
        .req(Method::POST, "acme", "/v1/api-keys")
        .header("x-request-id", "forged-by-the-client")
        .json(&json!({ "name": "k", "role": "viewer" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let server_id = res.headers().get("x-request-id").and_then(|v| v.to_str().ok()).ok_or("no id")?.to_owned();
    assert!(uuid::Uuid::parse_str(&server_id).is_ok(), "the answer carries the server's id: {server_id}");
    let log: Value = app.req(Method::GET, "acme", "/v1/audit-log").send().await?.json().await?;
    let entry = &log["data"][0];
    assert_eq!(entry["request_id"], server_id.as_str(), "{entry}");
    assert_eq!(entry["details"]["client_request_id"], "forged-by-the-client", "{entry}");
    Ok(())
}

// 19. Readiness checks that no platform migration of the binary is pending;
// one newer than the binary (a newer version migrated during a rolling
// deploy) keeps it ready.
#[tokio::test]
async fn readiness_checks_the_platform_schema() -> TestResult {
    let app = TestApp::spawn().await?;
    assert_eq!(app.http.get(app.url("/health/ready")).send().await?.status(), 200);
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    client.batch_execute("INSERT INTO __diesel_schema_migrations (version) VALUES ('29991231000000')").await?;
    assert_eq!(app.http.get(app.url("/health/ready")).send().await?.status(), 200, "a newer schema is fine");
    client
        .batch_execute(
            "DELETE FROM __diesel_schema_migrations WHERE version = \
             (SELECT max(version) FROM __diesel_schema_migrations WHERE version < '2999')",
        )
        .await?;
    let res = app.http.get(app.url("/health/ready")).send().await?;
    let body = assert_error(res, 503, "unavailable").await?;
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("migrations")), "{body}");
    Ok(())
}

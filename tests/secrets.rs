//! Secrets: every secret setting read from a file (`<NAME>_FILE`), and none
//! of them anywhere in the logs of a real server's run at DEBUG, through
//! sign-up, mail delivery that fails on the SMTP password, Stripe calls
//! that succeed and fail, webhooks, metrics and shutdown; nor in the error
//! of a failed start.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt as _;

use crate::harness::{TempDir, TestDb, TestResult, eventually};
use crate::smtp::SmtpServer;
use crate::stripe::{StripeMock, now, signature};

/// `url` with `password` given to its user.
fn with_password(url: &str, password: &str) -> TestResult<String> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let (user, host) = rest.split_once('@').ok_or("the test database URL names no user")?;
    Ok(format!("{scheme}://{user}:{password}@{host}"))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn no_secret_reaches_the_logs_of_a_whole_run() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let stripe = StripeMock::start().await?;
    let smtp = SmtpServer::start().await?;
    let dir = TempDir::new("secrets")?;
    // PostgreSQL here trusts local connections: the passwords are sent and
    // ignored, which is enough to see whether they leak.
    // 32 random bytes in base64: 42 free characters, then one whose low
    // bits are zero, and the padding.
    let random = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let key = format!("{}A=", &random[..42]);
    let secrets = [
        ("DATABASE_URL", with_password(&testdb.url, &unique("dbpass"))?),
        ("PLINTH_LISTEN_DATABASE_URL", with_password(&testdb.url, &unique("listenpass"))?),
        ("PLINTH_STRIPE_SECRET_KEY", unique("sk_test_")),
        ("PLINTH_STRIPE_WEBHOOK_SECRET", unique("whsec_")),
        ("PLINTH_SMTP_URL", format!("smtp://mailer:{}@127.0.0.1:{}", unique("smtppass"), smtp.port)),
        ("PLINTH_METRICS_TOKEN", unique("metrics")),
        ("PLINTH_ENCRYPTION_KEY", key),
    ];
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"));
    command
        .arg("serve")
        .env("PLINTH_LISTEN", format!("127.0.0.1:{port}"))
        .env("PLINTH_WORKERS", "1")
        .env("PLINTH_DATA_DIR", &dir.path)
        .env("PLINTH_STRIPE_API_BASE", &stripe.url)
        .env("PLINTH_STRIPE_PRICE_PRO", "price_secrets_pro")
        .env("PLINTH_BILLING_SYNC_MINUTES", "0")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in &secrets {
        let path = dir.path.join(name);
        std::fs::write(&path, format!("{value}\n"))?;
        command.env(format!("{name}_FILE"), &path).env_remove(name);
    }
    let mut server = command.spawn()?;
    let mut stderr = server.stderr.take().ok_or("no stderr")?;
    let mut stdout = server.stdout.take().ok_or("no stdout")?;
    let logs = tokio::spawn(async move {
        let (mut err, mut out) = (Vec::new(), Vec::new());
        let _ = tokio::join!(stderr.read_to_end(&mut err), stdout.read_to_end(&mut out));
        err.extend(out);
        String::from_utf8_lossy(&err).into_owned()
    });
    let http = crate::harness::http_client().build()?;
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(30), || async {
        Ok(http.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status() == 200))
    })
    .await?;

    // Sign up: a verification mail is queued, and its delivery fails on the
    // SMTP password (this server offers no AUTH).
    let signed: serde_json::Value = http
        .post(format!("{base}/v1/signup"))
        .header("idempotency-key", "secrets-signup")
        .json(&json!({
            "email": "owner@secrets.example.com", "password": "a long enough password",
            "organization": "Secrets", "slug": "secrets",
        }))
        .send()
        .await?
        .json()
        .await?;
    let token = signed["token"].as_str().ok_or("no token")?.to_owned();
    let client = testdb.client().await?;
    eventually(Duration::from_secs(30), || async {
        let row =
            client.query_one("SELECT count(*) FROM public.jobs WHERE kind = 'mail.deliver' AND attempts > 0", &[]);
        Ok(row.await?.get::<_, i64>(0) > 0)
    })
    .await?;
    // A failed login, a checkout that reaches Stripe, one while Stripe is down.
    let res = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({ "email": "owner@secrets.example.com", "password": "wrong password here" }))
        .send()
        .await?;
    assert_eq!(res.status(), 401);
    let checkout = || {
        http.post(format!("{base}/v1/billing/checkout"))
            .header("x-tenant", "secrets")
            .bearer_auth(&token)
            .json(&json!({ "plan": "pro" }))
            .send()
    };
    assert_eq!(checkout().await?.status(), 200);
    stripe.set_down(true);
    assert_eq!(checkout().await?.status(), 503);
    // Webhooks: a forged one and a signed one.
    let webhook_secret = &secrets[3].1;
    let body = crate::stripe::event("evt_secrets", "customer.created", now(), crate::stripe::object("customer"));
    let body = body.to_string();
    for sig in [signature(&body, "whsec_forged", now()), signature(&body, webhook_secret, now())] {
        let res = http.post(format!("{base}/v1/webhooks/stripe")).header("stripe-signature", sig).body(body.clone());
        assert!(res.send().await?.status().as_u16() < 500);
    }
    // Metrics with a wrong token and the right one.
    let metrics = |token: &str| http.get(format!("{base}/metrics")).bearer_auth(token.to_owned()).send();
    assert_eq!(metrics("wrong").await?.status(), 401);
    assert_eq!(metrics(&secrets[5].1).await?.status(), 200);

    let pid = server.id().ok_or("no pid")?;
    tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    server.wait().await?;
    let logs = logs.await?;
    assert!(logs.contains("SMTP"), "the mail delivery failure was logged: {logs}");
    for (name, value) in &secrets {
        // The password part of a URL, or the whole value.
        let secret = value.rsplit_once(':').map_or(value.as_str(), |(_, tail)| tail.split('@').next().unwrap_or(tail));
        assert!(!logs.contains(secret), "{name} appears in the logs");
    }
    assert!(!logs.contains(&token), "a session token appears in the logs");

    // A start that fails on the database names it without its password.
    let password = unique("unreachable");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .arg("migrate")
        .env("DATABASE_URL", format!("postgres://plinth:{password}@127.0.0.1:1/plinth"))
        .env("PLINTH_DB_CONNECT_TIMEOUT_MS", "2000")
        .env("RUST_LOG", "debug")
        .output()
        .await?;
    assert!(!out.status.success());
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("error"), "{printed}");
    assert!(!printed.contains(&password), "the password is in the error: {printed}");
    Ok(())
}

/// RFC 4648 base32, without padding (as the enrolment answer gives it).
fn base32(text: &str) -> TestResult<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut bits, mut value, mut out) = (0u32, 0u64, Vec::new());
    for c in text.trim_end_matches('=').bytes() {
        let digit = ALPHABET.iter().position(|&a| a == c).ok_or("not base32")?;
        value = (value << 5) | digit as u64;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((value >> bits) as u8);
        }
    }
    Ok(out)
}

/// The code an authenticator app shows now.
fn code_now(secret_base32: &str) -> TestResult<String> {
    let secret = totp_rs::Secret::try_from_base32(secret_base32)?;
    Ok(totp_rs::Builder::new().with_secret(secret).build()?.generate_current().to_string())
}

#[tokio::test]
async fn two_factor_secrets_are_sealed_plain_ones_get_sealed_and_keys_rotate() -> TestResult {
    use crate::harness::{AppOptions, TEST_ENCRYPTION_KEY, TestApp};
    const PASSWORD: &str = "a long enough password";
    const NEW_KEY: &str = "bmV3IGtleTogcGxpbnRoIHJvdGF0ZXMgdG8gdGhpcyE=";
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let signed: serde_json::Value = app
        .http
        .post(app.url("/v1/signup"))
        .json(&json!({ "email": "ada@sealed.example.com", "password": PASSWORD, "organization": "Sealed", "slug": "sealed" }))
        .send()
        .await?
        .json()
        .await?;
    let session = signed["token"].as_str().ok_or("no token")?.to_owned();
    let call =
        |path: &str, body: serde_json::Value| app.http.post(app.url(path)).bearer_auth(&session).json(&body).send();
    let enrolled: serde_json::Value =
        call("/v1/auth/totp/enroll", json!({ "password": PASSWORD })).await?.json().await?;
    let secret = enrolled["secret"].as_str().ok_or("no secret")?.to_owned();
    let raw = base32(&secret)?;
    let db = testdb.client().await?;
    let stored = async || -> TestResult<Vec<u8>> {
        let row = db
            .query_one(
                "SELECT coalesce(totp_secret, totp_pending) FROM public.users WHERE email = 'ada@sealed.example.com'",
                &[],
            )
            .await?;
        Ok(row.get(0))
    };
    let pending = stored().await?;
    assert!(pending.len() > raw.len() && !pending.windows(raw.len()).any(|w| w == raw), "the pending secret is sealed");
    let res = call("/v1/auth/totp/confirm", json!({ "code": code_now(&secret)?, "password": PASSWORD })).await?;
    assert_eq!(res.status(), 200);
    let sealed = stored().await?;
    assert!(!sealed.windows(raw.len()).any(|w| w == raw), "the confirmed secret is sealed");

    // Each login uses up its step: forget it so the same code serves again.
    let login = |app: &TestApp| {
        let body = json!({ "email": "ada@sealed.example.com", "password": PASSWORD, "totp_code": code_now(&secret).unwrap_or_default() });
        let request = app.http.post(app.url("/v1/auth/login")).json(&body);
        async {
            db.execute("UPDATE public.users SET totp_last_step = NULL", &[]).await?;
            Ok::<_, Box<dyn std::error::Error>>(request.send().await?.status().as_u16())
        }
    };
    assert_eq!(login(&app).await.map_err(|e| e.to_string())?, 200);

    // A secret stored in the clear (before sealing began) still works, and
    // the next start seals it.
    db.execute("UPDATE public.users SET totp_secret = $1 WHERE email = 'ada@sealed.example.com'", &[&raw]).await?;
    assert_eq!(login(&app).await.map_err(|e| e.to_string())?, 200);
    let restarted = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let resealed = stored().await?;
    assert!(resealed.len() > raw.len() && !resealed.windows(raw.len()).any(|w| w == raw));
    assert_eq!(login(&restarted).await.map_err(|e| e.to_string())?, 200);

    // A new key first: rotate-keys seals everything under it, and then the
    // new key alone opens what the old one sealed.
    let both = format!("{NEW_KEY},{TEST_ENCRYPTION_KEY}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["admin", "rotate-keys"])
        .env("DATABASE_URL", &testdb.url)
        .env("PLINTH_ENCRYPTION_KEY", &both)
        .env("RUST_LOG", "warn")
        .output()
        .await?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("two-factor secrets of 1 accounts"), "{printed}");
    assert_ne!(stored().await?, resealed);
    let new_only = TestApp::spawn_on(
        &testdb,
        AppOptions { settings: vec![("PLINTH_ENCRYPTION_KEY", NEW_KEY)], ..Default::default() },
    )
    .await?;
    assert_eq!(login(&new_only).await.map_err(|e| e.to_string())?, 200);
    // The old key alone no longer opens it: the login fails, and says nothing.
    assert_eq!(login(&app).await.map_err(|e| e.to_string())?, 500);
    Ok(())
}

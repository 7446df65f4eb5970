//! Accounts and sessions over HTTP, with mail delivered to a real SMTP
//! listener and the tokens taken from the links that arrived.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AppOptions, TestApp, TestResult, assert_error, eventually};
use crate::world::{PASSWORD, world, world_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_verify_login_logout() -> TestResult {
    let w = world().await?;
    let body = w.signup("  Ada@Example.COM ", "acme").await?;
    assert_eq!(body["tenant"]["slug"], "acme");
    assert_eq!(body["user"]["email"], "ada@example.com");
    assert!(body["user"]["email_verified_at"].is_null());
    let first = body["token"].as_str().ok_or("no token")?.to_owned();
    assert!(first.starts_with("pls_") && body["expires_at"].is_string());

    let me: Value = w.me(&first).await?.json().await?;
    assert_eq!(me["memberships"][0]["tenant"]["slug"], "acme");
    assert_eq!(me["memberships"][0]["role"], "owner");

    // The verification mail carries a single-use token.
    let token = w.mailed_token("ada@example.com", "https://app.plinth.test/verify-email").await?;
    assert!(token.starts_with("pls_"));
    assert_eq!(w.post("/v1/auth/verify-email", json!({ "token": token })).await?.status(), 200);
    let again = w.post("/v1/auth/verify-email", json!({ "token": token })).await?;
    assert_eq!(assert_error(again, 400, "invalid_request").await?["error"]["details"][0]["field"], "token");
    let me: Value = w.me(&first).await?.json().await?;
    assert!(me["user"]["email_verified_at"].is_string());

    // Wrong password and unknown account look the same.
    for (email, password) in
        [("ada@example.com", "wrong password, long"), ("nobody@example.com", PASSWORD), ("not an email", PASSWORD)]
    {
        let res = w.post("/v1/auth/login", json!({ "email": email, "password": password })).await?;
        assert_error(res, 401, "invalid_credentials").await?;
    }
    let huge = w.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": "x".repeat(20_000) })).await?;
    assert_error(huge, 401, "invalid_credentials").await?;
    let login: Value =
        w.post("/v1/auth/login", json!({ "email": "ADA@example.com", "password": PASSWORD })).await?.json().await?;
    let second = login["token"].as_str().ok_or("no token")?.to_owned();
    assert_ne!(first, second);

    // Logout revokes that session only.
    let res = w.app.http.post(w.app.url("/v1/auth/logout")).bearer_auth(&first).send().await?;
    assert_eq!(res.status(), 204);
    eventually(Duration::from_secs(1), || async { Ok(w.me(&first).await?.status() == 401) }).await?;
    assert_eq!(w.me(&second).await?.status(), 200);
    for bad in ["", "pls_forged", "Bearer", &format!("{second}x")] {
        assert_error(w.me(bad).await?, 401, "unauthenticated").await?;
    }
    assert_error(w.app.http.get(w.app.url("/v1/me")).send().await?, 401, "unauthenticated").await?;
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_signup_leaves_nothing_behind() -> TestResult {
    let w = world().await?;
    w.signup("ada@example.com", "acme").await?;
    // Slug taken: 409, and the new account is not half-made.
    let res = w
        .post(
            "/v1/signup",
            json!({ "email": "bob@example.com", "password": PASSWORD, "organization": "Bob", "slug": "acme" }),
        )
        .await?;
    assert_error(res, 409, "conflict").await?;
    let res = w
        .post(
            "/v1/signup",
            json!({ "email": "ADA@example.com", "password": PASSWORD, "organization": "Other", "slug": "other" }),
        )
        .await?;
    assert_error(res, 409, "conflict").await?;
    w.signup("bob@example.com", "bobco").await?;
    let client = w.app.testdb.as_ref().ok_or("no db")?.client().await?;
    let counts: (i64, i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM public.users), (SELECT count(*) FROM public.tenants), \
                 (SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%')",
                &[],
            )
            .await?;
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(counts, (2, 2, 2), "users, tenants, schemas");
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signups_get_every_problem_at_once() -> TestResult {
    let w = world().await?;
    let res = w
        .post(
            "/v1/signup",
            json!({ "email": "ada@@example", "password": "password123", "organization": "  ", "slug": "acme'; DROP TABLE x;--" }),
        )
        .await?;
    let body = assert_error(res, 400, "invalid_request").await?;
    let fields: Vec<&str> =
        body["error"]["details"].as_array().ok_or("no details")?.iter().filter_map(|d| d["field"].as_str()).collect();
    assert_eq!(fields, ["email", "password", "organization", "slug"]);
    for (password, code) in
        [("short", "too_short"), ("qwertyuiop", "too_common"), (&"é".repeat(300) as &str, "too_long")]
    {
        let res = w
            .post(
                "/v1/signup",
                json!({ "email": "ada@example.com", "password": password, "organization": "A", "slug": "acme" }),
            )
            .await?;
        let body = assert_error(res, 400, "invalid_request").await?;
        assert_eq!(body["error"]["details"][0]["code"], code, "{password}");
    }
    // Unicode is fine where it belongs.
    let res = w
        .post("/v1/signup", json!({ "email": "zoë@example.com", "password": "ünïcødé pässwörd 😀", "organization": "Ⓐⓒⓜⓔ 🚀", "slug": "acme" }))
        .await?;
    assert_eq!(res.status(), 201);
    let res = w.post("/v1/signup", json!({ "email": "x@example.com", "password": PASSWORD, "organization": "X", "slug": "x-co", "admin": true })).await?;
    assert_error(res, 400, "invalid_request").await?;
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_reset_is_single_use_and_revokes_every_session() -> TestResult {
    let w = world().await?;
    let session = w.signup("ada@example.com", "acme").await?["token"].as_str().ok_or("no token")?.to_owned();
    let res = w.post("/v1/auth/password-reset", json!({ "email": "nobody@example.com" })).await?;
    assert_eq!(res.status(), 202, "no account: the same answer");
    let res = w.post("/v1/auth/password-reset", json!({ "email": "Ada@Example.com" })).await?;
    assert_eq!(res.status(), 202);
    let token = w.mailed_token("ada@example.com", "https://app.plinth.test/password-reset").await?;
    assert!(!w.smtp.accepted().iter().any(|m| m.contains("nobody@example.com")), "no mail to an unknown address");

    let res = w.post("/v1/auth/password-reset/confirm", json!({ "token": token, "password": "password123" })).await?;
    assert_eq!(assert_error(res, 400, "invalid_request").await?["error"]["details"][0]["code"], "too_common");
    let new_password = "a completely new passphrase";
    let res = w.post("/v1/auth/password-reset/confirm", json!({ "token": token, "password": new_password })).await?;
    assert_eq!(res.status(), 200);
    eventually(Duration::from_secs(1), || async { Ok(w.me(&session).await?.status() == 401) }).await?;
    let res = w
        .post("/v1/auth/password-reset/confirm", json!({ "token": token, "password": "yet another passphrase" }))
        .await?;
    assert_error(res, 400, "invalid_request").await?;
    let res = w
        .post(
            "/v1/auth/password-reset/confirm",
            json!({ "token": "pls_made_up", "password": "yet another passphrase" }),
        )
        .await?;
    assert_error(res, 400, "invalid_request").await?;
    let old = w.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": PASSWORD })).await?;
    assert_error(old, 401, "invalid_credentials").await?;
    let new = w.post("/v1/auth/login", json!({ "email": "ada@example.com", "password": new_password })).await?;
    assert_eq!(new.status(), 200);
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_is_seen_by_another_instance_within_a_second() -> TestResult {
    let w = world().await?;
    let other = TestApp::spawn_on(w.app.testdb.as_ref().ok_or("no db")?, AppOptions::default()).await?;
    let token = w.signup("ada@example.com", "acme").await?["token"].as_str().ok_or("no token")?.to_owned();
    let on_other = || async {
        Ok::<_, reqwest::Error>(other.http.get(other.url("/v1/me")).bearer_auth(&token).send().await?.status())
    };
    assert_eq!(on_other().await?, 200); // now cached there
    let res = w.app.http.post(w.app.url("/v1/auth/logout")).bearer_auth(&token).send().await?;
    assert_eq!(res.status(), 204);
    let took = eventually(Duration::from_secs(1), || async { Ok(on_other().await? == 401) }).await?;
    eprintln!("logout seen by the other instance after {took:?}");
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_user_creates_another_organization() -> TestResult {
    let w = world().await?;
    let token = w.signup("ada@example.com", "acme").await?["token"].as_str().ok_or("no token")?.to_owned();
    let body = json!({ "organization": "Second", "slug": "second" });
    let res = w.app.http.post(w.app.url("/v1/tenants")).json(&body).send().await?;
    assert_error(res, 401, "unauthenticated").await?;
    let res = w.app.http.post(w.app.url("/v1/tenants")).bearer_auth(&token).json(&body).send().await?;
    assert_eq!(res.status(), 201);
    let res = w.app.http.post(w.app.url("/v1/tenants")).bearer_auth(&token).json(&body).send().await?;
    assert_error(res, 409, "conflict").await?;
    let me: Value = w.me(&token).await?.json().await?;
    let slugs: Vec<&str> =
        me["memberships"].as_array().ok_or("none")?.iter().filter_map(|m| m["tenant"]["slug"].as_str()).collect();
    assert_eq!(slugs, ["acme", "second"]);
    w.worker.stop().await?;
    Ok(())
}

fn retry_after(res: &reqwest::Response) -> Option<u64> {
    res.headers().get("retry-after")?.to_str().ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_slow_down_the_attacker_not_the_owner() -> TestResult {
    let w = world_with(AppOptions {
        settings: vec![
            ("PLINTH_CLIENT_IP_HEADER", "x-test-client"),
            ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT_IP", "3/1h"),
            ("PLINTH_LIMIT_LOGIN_FAILURES_PER_ACCOUNT", "6/1h"),
        ],
        ..Default::default()
    })
    .await?;
    w.signup("ada@example.com", "acme").await?;
    let login = |from: &'static str, password: &'static str| {
        w.app
            .http
            .post(w.app.url("/v1/auth/login"))
            .header("x-test-client", format!("198.51.100.1, {from}"))
            .json(&json!({ "email": "ada@example.com", "password": password }))
            .send()
    };
    for _ in 0..3 {
        assert_error(login("203.0.113.66", "guess guess guess").await?, 401, "invalid_credentials").await?;
    }
    // The attacker's address is now refused, even with the right password.
    for password in ["guess guess guess", PASSWORD] {
        let res = login("203.0.113.66", password).await?;
        assert!(retry_after(&res).is_some_and(|s| s >= 1), "Retry-After");
        assert_error(res, 429, "rate_limited").await?;
    }
    // The owner, from their own address, is not.
    assert_eq!(login("192.0.2.10", PASSWORD).await?.status(), 200);
    // Guesses spread over many addresses still meet the per-account limit.
    for i in 0..3 {
        let from: &'static str = ["203.0.113.1", "203.0.113.2", "203.0.113.3"][i];
        assert_error(login(from, "guess guess guess").await?, 401, "invalid_credentials").await?;
    }
    assert_error(login("203.0.113.4", "guess guess guess").await?, 429, "rate_limited").await?;
    w.worker.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signups_and_reset_requests_are_limited() -> TestResult {
    let w = world_with(AppOptions {
        settings: vec![("PLINTH_LIMIT_SIGNUP_PER_IP", "2/1h"), ("PLINTH_LIMIT_PASSWORD_RESET_PER_ACCOUNT", "1/1h")],
        ..Default::default()
    })
    .await?;
    w.signup("ada@example.com", "acme").await?;
    w.signup("bob@example.com", "bobco").await?;
    let res = w
        .post(
            "/v1/signup",
            json!({ "email": "eve@example.com", "password": PASSWORD, "organization": "E", "slug": "eve" }),
        )
        .await?;
    assert!(retry_after(&res).is_some_and(|s| s > 60), "an hour-long window");
    assert_error(res, 429, "rate_limited").await?;

    for email in ["ada@example.com", "nobody@example.com"] {
        assert_eq!(w.post("/v1/auth/password-reset", json!({ "email": email })).await?.status(), 202);
        let again = w.post("/v1/auth/password-reset", json!({ "email": email })).await?;
        assert_error(again, 429, "rate_limited").await?;
    }
    w.worker.stop().await?;
    Ok(())
}

/// The code an authenticator app would show `offset_steps` steps from now.
fn code_for(secret_base32: &str, offset_steps: i64) -> TestResult<String> {
    let secret = totp_rs::Secret::try_from_base32(secret_base32)?;
    let totp = totp_rs::Builder::new().with_secret(secret).build()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let at = now.checked_add_signed(offset_steps * 30).ok_or("time")?;
    Ok(totp.generate(at).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_factor_login_with_codes_and_recovery_codes() -> TestResult {
    let w = world().await?;
    let session = w.signup("ada@example.com", "acme").await?["token"].as_str().ok_or("no token")?.to_owned();
    let call = |path: &str, body: Value| w.app.http.post(w.app.url(path)).bearer_auth(&session).json(&body).send();
    let enrolled: Value = call("/v1/auth/totp/enroll", json!({ "password": PASSWORD })).await?.json().await?;
    let secret = enrolled["secret"].as_str().ok_or("no secret")?.to_owned();
    assert!(enrolled["otpauth_url"].as_str().is_some_and(|u| u.starts_with("otpauth://totp/Plinth:")));
    let wrong = json!({ "code": "12345", "password": PASSWORD });
    assert_error(call("/v1/auth/totp/confirm", wrong).await?, 400, "invalid_request").await?;
    let confirm_code = code_for(&secret, 0)?;
    let res = call("/v1/auth/totp/confirm", json!({ "code": confirm_code, "password": PASSWORD })).await?;
    assert_eq!(res.status(), 200);
    let recovery: Vec<String> = res.json::<Value>().await?["recovery_codes"]
        .as_array()
        .ok_or("no codes")?
        .iter()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    assert_eq!(recovery.len(), 10);
    assert_error(call("/v1/auth/totp/enroll", json!({ "password": PASSWORD })).await?, 409, "conflict").await?;
    let me: Value = w.me(&session).await?.json().await?;
    assert_eq!(me["totp_enabled"], true);

    let login = |code: Option<String>| {
        let mut body = json!({ "email": "ada@example.com", "password": PASSWORD });
        if let Some(code) = code {
            body["totp_code"] = json!(code);
        }
        w.app.http.post(w.app.url("/v1/auth/login")).json(&body).send()
    };
    assert_error(login(None).await?, 401, "totp_required").await?;
    assert_error(login(Some("000000".into())).await?, 401, "invalid_credentials").await?;
    // The code used to confirm cannot log in (replay); the next step's can, once.
    assert_error(login(Some(confirm_code.clone())).await?, 401, "invalid_credentials").await?;
    let next = code_for(&secret, 1)?;
    assert_eq!(login(Some(next.clone())).await?.status(), 200);
    assert_error(login(Some(next)).await?, 401, "invalid_credentials").await?;
    // A recovery code works once, in any case.
    assert_eq!(login(Some(recovery[0].to_uppercase())).await?.status(), 200);
    assert_error(login(Some(recovery[0].clone())).await?, 401, "invalid_credentials").await?;

    // Turning it off takes a code too.
    assert_error(call("/v1/auth/totp/disable", json!({ "code": "nope-nope" })).await?, 400, "invalid_request").await?;
    assert_eq!(call("/v1/auth/totp/disable", json!({ "code": recovery[1] })).await?.status(), 200);
    assert_eq!(login(None).await?.status(), 200);
    assert_error(call("/v1/auth/totp/disable", json!({ "code": recovery[2] })).await?, 409, "conflict").await?;
    w.worker.stop().await?;
    Ok(())
}

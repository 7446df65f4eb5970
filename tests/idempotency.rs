//! `Idempotency-Key`: a retry of the same request replays the first answer
//! without doing the work again; another request with the key is 422; keys
//! are the caller's own; concurrent requests with one key do the work once;
//! a key never carries an answer into another tenant.

use plinth_access::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, member};

/// A connection to the test's database.
async fn sql(app: &TestApp) -> TestResult<tokio_postgres::Client> {
    app.testdb.as_ref().ok_or("no test database")?.client().await
}

async fn project_count(app: &TestApp, slug: &str) -> TestResult<usize> {
    let page: Value = app.req(Method::GET, slug, "/v1/projects?limit=100").send().await?.json().await?;
    Ok(page["data"].as_array().ok_or("no data")?.len())
}

#[tokio::test]
async fn a_retry_replays_the_first_answer_and_another_request_is_refused() -> TestResult {
    let app = TestApp::spawn().await?;
    // A plan with room for the projects below.
    app.create_tenant_on("acme", "enterprise").await?;
    let create = |name: &str, key: &str| {
        app.req(Method::POST, "acme", "/v1/projects").header("idempotency-key", key).json(&json!({ "name": name }))
    };
    let first = create("Launch", "key-1").send().await?;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await?;
    let again = create("Launch", "key-1").send().await?;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await?, first, "the same answer, byte for byte");
    assert_eq!(project_count(&app, "acme").await?, 1, "the work was done once");

    // The same key with another body, path or method.
    assert_error(create("Other", "key-1").send().await?, 422, "idempotency_key_reused").await?;
    let id = first["id"].as_str().ok_or("no id")?;
    let task = app
        .req(Method::POST, "acme", &format!("/v1/projects/{id}/tasks"))
        .header("idempotency-key", "key-1")
        .json(&json!({ "name": "Launch" }))
        .send()
        .await?;
    assert_eq!(task.status(), 400, "the body is checked before the key");
    let task = app
        .req(Method::POST, "acme", &format!("/v1/projects/{id}/tasks"))
        .header("idempotency-key", "key-1")
        .json(&json!({ "title": "Launch" }))
        .send()
        .await?;
    assert_error(task, 422, "idempotency_key_reused").await?;
    // Without a key, or with a new one, the work is done each time.
    assert_eq!(create("Launch", "key-2").send().await?.status(), 201);
    let plain = app.req(Method::POST, "acme", "/v1/projects").json(&json!({ "name": "Launch" }));
    assert_eq!(plain.send().await?.status(), 201);
    assert_eq!(project_count(&app, "acme").await?, 3);
    // A key Plinth cannot keep is refused.
    for bad in ["x".repeat(256), "has space".into(), "ключ".into()] {
        let res = app
            .req(Method::POST, "acme", "/v1/projects")
            .header("idempotency-key", bad.as_bytes())
            .json(&json!({ "name": "Launch" }))
            .send()
            .await?;
        assert_error(res, 400, "invalid_request").await?;
    }
    // A failed request leaves the key free: the retry does the work.
    let over = create(&"x".repeat(201), "key-3").send().await?;
    assert_error(over, 400, "invalid_request").await?;
    assert_eq!(create("Fixed", "key-3").send().await?.status(), 201);
    Ok(())
}

#[tokio::test]
async fn keys_are_the_callers_own_and_never_cross_tenants() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    app.create_tenant("globex").await?;
    let body = json!({ "name": "Launch" });
    let first = app.req(Method::POST, "acme", "/v1/projects").header("idempotency-key", "k").json(&body).send().await?;
    assert_eq!(first.status(), 201);
    // Another member of acme with the same key and body: their own request.
    let colleague = member(&app.db, &acme, Role::Member).await?;
    let theirs = app
        .http
        .post(app.url("/v1/projects"))
        .header("x-tenant", "acme")
        .bearer_auth(&colleague)
        .header("idempotency-key", "k")
        .json(&body)
        .send()
        .await?;
    assert_eq!(theirs.status(), 201);
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    assert_eq!(project_count(&app, "acme").await?, 2);

    // Acme's owner's token used in globex: the acme session is not a
    // member there (404), so nothing of acme's answer reaches globex.
    let acme_token = app.token("acme").ok_or("no token")?;
    let crossed = app
        .http
        .post(app.url("/v1/projects"))
        .header("x-tenant", "globex")
        .bearer_auth(&acme_token)
        .header("idempotency-key", "k")
        .json(&body)
        .send()
        .await?;
    assert_error(crossed, 404, "not_found").await?;
    // A user of both tenants, with one key in each: the second is another
    // request (its tenant differs), refused rather than answered with the
    // first tenant's project.
    let globex = app.create_tenant("initech").await?;
    let both = member(&app.db, &globex, Role::Owner).await?;
    let me: Value =
        app.http.get(app.url("/v1/me")).bearer_auth(&both).header("x-tenant", "initech").send().await?.json().await?;
    let user: uuid::Uuid = me["user"]["id"].as_str().ok_or("no id")?.parse()?;
    sql(&app)
        .await?
        .execute(
            "INSERT INTO public.memberships (tenant_id, user_id, role) VALUES ($1, $2, 'owner')",
            &[&acme.id.0, &user],
        )
        .await?;
    let in_tenant = |slug: &str| {
        app.http
            .post(app.url("/v1/projects"))
            .header("x-tenant", slug)
            .bearer_auth(&both)
            .header("idempotency-key", "shared")
            .json(&body)
    };
    let in_initech = in_tenant("initech").send().await?;
    assert_eq!(in_initech.status(), 201);
    assert_error(in_tenant("acme").send().await?, 422, "idempotency_key_reused").await?;
    assert_eq!(project_count(&app, "acme").await?, 2, "nothing was made in acme");
    Ok(())
}

#[tokio::test]
async fn concurrent_requests_with_one_key_do_the_work_once() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let requests = (0..12).map(|_| {
        app.req(Method::POST, "acme", "/v1/projects")
            .header("idempotency-key", "same")
            .json(&json!({ "name": "Launch" }))
            .send()
    });
    let answers = futures_util::future::join_all(requests).await;
    let mut bodies = Vec::new();
    for answer in answers {
        let answer = answer?;
        assert_eq!(answer.status(), 201);
        bodies.push(answer.json::<Value>().await?);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every answer is the first one: {bodies:#?}");
    assert_eq!(project_count(&app, "acme").await?, 1);

    // Inviting twice with one key sends one invitation and one mail.
    let invite = || {
        app.req(Method::POST, "acme", "/v1/invitations")
            .header("idempotency-key", "invite-1")
            .json(&json!({ "email": "new@acme.example.com", "role": "member" }))
            .send()
    };
    let (a, b) = futures_util::join!(invite(), invite());
    let (a, b) = (a?, b?);
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201));
    assert_eq!(a.json::<Value>().await?, b.json::<Value>().await?);
    let mails: i64 =
        sql(&app).await?.query_one("SELECT count(*) FROM public.jobs WHERE kind = 'mail.deliver'", &[]).await?.get(0);
    assert_eq!(mails, 1, "one invitation mail");
    Ok(())
}

#[tokio::test]
async fn a_key_expires_after_a_day() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let create = |name: &str| {
        app.req(Method::POST, "acme", "/v1/projects").header("idempotency-key", "daily").json(&json!({ "name": name }))
    };
    assert_eq!(create("Monday").send().await?.status(), 201);
    sql(&app)
        .await?
        .execute("UPDATE public.idempotency_keys SET created_at = now() - interval '25 hours'", &[])
        .await?;
    let tuesday = create("Tuesday").send().await?;
    assert_eq!(tuesday.status(), 201, "an expired key is free again");
    assert!(tuesday.headers().get("idempotent-replayed").is_none());
    assert_eq!(project_count(&app, "acme").await?, 2);
    Ok(())
}

#[tokio::test]
async fn creating_an_organization_twice_with_one_key_makes_one() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let create = || {
        app.http
            .post(app.url("/v1/tenants"))
            .bearer_auth(app.token("acme").unwrap_or_default())
            .header("idempotency-key", "new-org")
            .json(&json!({ "organization": "Globex", "slug": "globex" }))
            .send()
    };
    let first = create().await?;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await?;
    let again = create().await?;
    assert_eq!(again.status(), 201, "not 409 slug taken: the first answer again");
    assert_eq!(again.json::<Value>().await?, first);
    Ok(())
}

#[tokio::test]
async fn checkout_with_a_key_opens_one_stripe_session_for_its_caller() -> TestResult {
    use crate::harness::{AppOptions, TestDb};
    let stripe = crate::stripe::StripeMock::start().await?;
    let testdb = TestDb::migrated().await?;
    let url: &'static str = Box::leak(stripe.url.clone().into_boxed_str());
    let settings = vec![
        ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth"),
        ("PLINTH_STRIPE_API_BASE", url),
        ("PLINTH_STRIPE_PRICE_PRO", "price_plinth_pro"),
        ("PLINTH_STRIPE_PRICE_ENTERPRISE", "price_plinth_enterprise"),
    ];
    let app = TestApp::spawn_on(&testdb, AppOptions { settings, ..Default::default() }).await?;
    app.create_tenant("acme").await?;
    app.create_tenant("bravo").await?;
    let checkout = |slug: &str, key: &str, plan: &str| {
        app.req(Method::POST, slug, "/v1/billing/checkout")
            .header("idempotency-key", key)
            .json(&json!({ "plan": plan }))
            .send()
    };
    let url_of = async |res: reqwest::Response| -> TestResult<String> {
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await?;
        Ok(body["url"].as_str().ok_or("no url")?.to_owned())
    };

    // Two at once with one key, then a retry: one session, one URL.
    let (a, b) = tokio::join!(checkout("acme", "k1", "pro"), checkout("acme", "k1", "pro"));
    let (a, b) = (url_of(a?).await?, url_of(b?).await?);
    let retry = checkout("acme", "k1", "pro").await?;
    assert_eq!(retry.headers().get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    let retried = url_of(retry).await?;
    assert_eq!((&a, &b), (&retried, &retried));
    let first = a;
    let sessions: Vec<_> = stripe.requests().into_iter().filter(|r| r.path == "/v1/checkout/sessions").collect();
    assert!((1..=2).contains(&sessions.len()), "the retry never reached Stripe: {sessions:?}");
    assert!(sessions.iter().all(|s| s.idempotency_key.is_some() && s.idempotency_key == sessions[0].idempotency_key));

    // The key with another plan: 422, whether Plinth or Stripe notices first.
    let res = checkout("acme", "k1", "enterprise").await?;
    assert_error(res, 422, "idempotency_key_reused").await?;
    let (a, b) = tokio::join!(checkout("acme", "k2", "pro"), checkout("acme", "k2", "enterprise"));
    let mut statuses = [a?.status().as_u16(), b?.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 422]);

    // Another caller's key of the same name is theirs: a session of their own.
    let bravo = url_of(checkout("bravo", "k1", "pro").await?).await?;
    assert_ne!(bravo, first);
    // Without a key, each request opens a session.
    let plain = || app.req(Method::POST, "acme", "/v1/billing/checkout").json(&json!({ "plan": "pro" })).send();
    assert_ne!(url_of(plain().await?).await?, url_of(plain().await?).await?);
    Ok(())
}

/// Answers that carry a credential are replayed, and stored sealed: the
/// key table never holds the token or the API key in the clear.
#[tokio::test]
async fn signup_and_api_keys_replay_their_credential_which_is_stored_sealed() -> TestResult {
    let app = TestApp::spawn().await?;
    let signup = |slug: &str, password: &str| {
        app.http
            .post(app.url("/v1/signup"))
            .header("idempotency-key", "signup-1")
            .json(&json!({
                "email": "founder@globex.example.com", "password": password,
                "organization": "Globex", "slug": slug,
            }))
            .send()
    };
    let (a, b) =
        futures_util::join!(signup("globex", "correct horse battery"), signup("globex", "correct horse battery"));
    let (a, b) = (a?, b?);
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201), "not 409: the first answer again");
    let (a, b) = (a.json::<Value>().await?, b.json::<Value>().await?);
    assert_eq!(a, b);
    let token = a["token"].as_str().ok_or("no token")?.to_owned();
    let again = signup("globex", "correct horse battery").await?;
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert_eq!(again.json::<Value>().await?["token"], token.as_str());
    // Another password or slug with the key: 422, no second account.
    assert_error(signup("globex", "another password here").await?, 422, "idempotency_key_reused").await?;
    assert_error(signup("initech", "correct horse battery").await?, 422, "idempotency_key_reused").await?;
    // The same key from another address is another caller's.
    let other = app
        .http
        .post(app.url("/v1/signup"))
        .header("idempotency-key", "signup-1")
        .json(&json!({
            "email": "founder@initech.example.com", "password": "correct horse battery",
            "organization": "Initech", "slug": "initech",
        }))
        .send()
        .await?;
    assert_eq!(other.status(), 201);
    let db = sql(&app).await?;
    let accounts: i64 = db.query_one("SELECT count(*) FROM public.users", &[]).await?.get(0);
    assert_eq!(accounts, 2);

    // API keys: the same key twice shows the same secret, created once.
    app.create_tenant_on("acme", "enterprise").await?;
    app.create_tenant_on("bravo", "enterprise").await?;
    let mint = |slug: &str| {
        app.req(Method::POST, slug, "/v1/api-keys")
            .header("idempotency-key", "deploy-key")
            .json(&json!({ "name": "deploy", "role": "member" }))
            .send()
    };
    let (first, second) = futures_util::join!(mint("acme"), mint("acme"));
    let (first, second) = (first?, second?);
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (201, 201));
    let (first, second) = (first.json::<Value>().await?, second.json::<Value>().await?);
    assert_eq!(first, second);
    let secret = first["key"].as_str().ok_or("no key")?.to_owned();
    let keys: i64 = db.query_one("SELECT count(*) FROM public.api_keys", &[]).await?.get(0);
    assert_eq!(keys, 1);
    // The replayed key works.
    let listed = app.http.get(app.url("/v1/projects")).header("x-tenant", "acme").bearer_auth(&secret).send().await?;
    assert_eq!(listed.status(), 200);
    // Bravo's owner is another caller: a key of their own.
    let bravo = mint("bravo").await?;
    assert_eq!(bravo.status(), 201);
    assert_ne!(bravo.json::<Value>().await?["key"], secret.as_str());

    let stored: Vec<Vec<u8>> =
        db.query("SELECT body FROM public.idempotency_keys", &[]).await?.iter().map(|r| r.get(0)).collect();
    assert_eq!(stored.len(), 4, "two signups and two API keys");
    for body in &stored {
        for secret in [token.as_bytes(), secret.as_bytes(), b"founder@", b"Globex"] {
            assert!(!body.windows(secret.len()).any(|w| w == secret), "a stored answer holds a secret in the clear");
        }
    }
    Ok(())
}

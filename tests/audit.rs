//! The audit log: security-relevant actions recorded in the tenant's own
//! schema, in the action's transaction; append-only; admins only.

use plinth_access::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, member};

async fn log(app: &TestApp, tenant: &str, query: &str) -> TestResult<Value> {
    let res = app.req(Method::GET, tenant, &format!("/v1/audit-log{query}")).send().await?;
    assert_eq!(res.status(), 200);
    Ok(res.json().await?)
}

fn actions(page: &Value) -> Vec<String> {
    page["data"].as_array().into_iter().flatten().filter_map(|e| e["action"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn security_actions_are_recorded_with_actor_address_and_request() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    let viewer = member(&app.db, &acme, Role::Viewer).await?;
    let members: Value = app.req(Method::GET, "acme", "/v1/members").send().await?.json().await?;
    let viewer_id = members["data"]
        .as_array()
        .ok_or("none")?
        .iter()
        .find(|m| m["role"] == "viewer")
        .and_then(|m| m["user_id"].as_str())
        .ok_or("no viewer")?
        .to_owned();

    let res = app
        .req(Method::PATCH, "acme", &format!("/v1/members/{viewer_id}"))
        .header("x-request-id", "audit-req-1")
        .json(&json!({ "role": "member" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let key: Value = app
        .req(Method::POST, "acme", "/v1/api-keys")
        .json(&json!({ "name": "k", "role": "viewer" }))
        .send()
        .await?
        .json()
        .await?;
    let key_id = key["api_key"]["id"].as_str().ok_or("no key")?.to_owned();
    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/api-keys/{key_id}")).send().await?.status(), 204);
    assert_eq!(
        app.req(Method::POST, "acme", "/v1/invitations")
            .json(&json!({ "email": "new@example.com", "role": "viewer" }))
            .send()
            .await?
            .status(),
        201
    );
    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/members/{viewer_id}")).send().await?.status(), 204);
    drop(viewer);

    let page = log(&app, "acme", "").await?;
    assert_eq!(
        actions(&page),
        ["member.removed", "invitation.sent", "api_key.revoked", "api_key.created", "member.role_changed"]
    );
    let change = &page["data"][4];
    // Plinth's own request id; the client's is kept beside it.
    assert!(change["request_id"].as_str().is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()), "{change}");
    assert_eq!(change["ip"], "127.0.0.1");
    assert_eq!(change["actor_type"], "user");
    assert_eq!(change["target_id"], viewer_id.as_str());
    assert_eq!(change["details"], json!({ "from": "viewer", "to": "member", "client_request_id": "audit-req-1" }));

    // A refused action leaves no entry: the entry shares its transaction.
    let owner_id = members["data"]
        .as_array()
        .ok_or("none")?
        .iter()
        .find(|m| m["role"] == "owner")
        .and_then(|m| m["user_id"].as_str())
        .ok_or("no owner")?
        .to_owned();
    let res = app
        .req(Method::PATCH, "acme", &format!("/v1/members/{owner_id}"))
        .json(&json!({ "role": "viewer" }))
        .send()
        .await?;
    assert_error(res, 409, "conflict").await?;
    assert_eq!(actions(&log(&app, "acme", "").await?).len(), 5);

    // Filters and pagination.
    let only = log(&app, "acme", "?action=api_key.created").await?;
    assert_eq!(actions(&only), ["api_key.created"]);
    let first = log(&app, "acme", "?limit=2").await?;
    let cursor = first["next_cursor"].as_str().ok_or("no cursor")?.to_owned();
    let second = log(&app, "acme", &format!("?limit=2&cursor={cursor}")).await?;
    assert_eq!(actions(&second), ["api_key.revoked", "api_key.created"]);
    let res = app.req(Method::GET, "acme", "/v1/audit-log?actor=nobody").send().await?;
    assert_error(res, 400, "invalid_request").await?;
    Ok(())
}

#[tokio::test]
async fn logins_and_suspensions_reach_the_tenants_log() -> TestResult {
    let app = TestApp::spawn().await?;
    let signup = app.http.post(app.url("/v1/signup"))
        .json(&json!({ "email": "ada@example.com", "password": "correct horse battery staple", "organization": "Acme", "slug": "acme" }))
        .send().await?;
    let owner = signup.json::<Value>().await?["token"].as_str().ok_or("no token")?.to_owned();
    let login = |password: &'static str| {
        app.http
            .post(app.url("/v1/auth/login"))
            .json(&json!({ "email": "ada@example.com", "password": password }))
            .send()
    };
    assert_eq!(login("wrong but long enough").await?.status(), 401);
    // A failed login is the account's, recorded once (security.rs checks
    // it is in no organization's log).
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    let failures: i64 = client
        .query_one(
            "SELECT count(*) FROM public.login_failures f JOIN public.users u ON u.id = f.user_id \
             WHERE u.email = 'ada@example.com'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(failures, 1);
    assert_eq!(login("correct horse battery staple").await?.status(), 200);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["tenants", "suspend", "acme"])
        .env("DATABASE_URL", &app.testdb.as_ref().ok_or("no db")?.url)
        .output()
        .await?;
    assert!(out.status.success());
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    let schema: String =
        client.query_one("SELECT schema_name FROM public.tenants WHERE slug = 'acme'", &[]).await?.get(0);
    let rows = client.query(&format!("SELECT action, actor_type FROM \"{schema}\".audit_log ORDER BY id"), &[]).await?;
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want = [("auth.login", "user"), ("tenant.suspended", "system")];
    assert_eq!(got, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    drop(owner);

    // Append-only, even for someone with SQL access.
    for sql in [
        format!("UPDATE \"{schema}\".audit_log SET action = 'nothing'"),
        format!("DELETE FROM \"{schema}\".audit_log"),
        format!("TRUNCATE \"{schema}\".audit_log"),
    ] {
        let err = client.batch_execute(&sql).await.err().ok_or("the change went through")?;
        assert!(
            err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"),
            "{sql}: {err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn only_a_tenants_admins_read_its_log() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    app.create_tenant_on("globex", "pro").await?;
    app.req(Method::POST, "acme", "/v1/api-keys").json(&json!({ "name": "k", "role": "viewer" })).send().await?;
    assert!(actions(&log(&app, "globex", "").await?).is_empty(), "one tenant's entries stay in its log");
    let globex_owner = app.token("globex").ok_or("no token")?;
    let res =
        app.http.get(app.url("/v1/audit-log")).header("x-tenant", "acme").bearer_auth(&globex_owner).send().await?;
    assert_error(res, 404, "not_found").await?;
    let plain = member(&app.db, &acme, Role::Member).await?;
    let res = app.http.get(app.url("/v1/audit-log")).header("x-tenant", "acme").bearer_auth(&plain).send().await?;
    assert_error(res, 403, "forbidden").await?;
    Ok(())
}

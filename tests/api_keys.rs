//! API keys: shown once, hashed, acting in their one tenant with their role,
//! revoked at once.

use std::time::Duration;

use plinth_access::Role;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, eventually, member};

#[tokio::test]
async fn a_key_acts_in_its_tenant_with_its_role_until_revoked() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant_on("acme", "pro").await?;
    app.create_tenant_on("globex", "pro").await?;
    let res = app
        .req(Method::POST, "acme", "/v1/api-keys")
        .json(&json!({ "name": "CI deploys", "role": "member" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await?;
    let key = created["key"].as_str().ok_or("no key")?.to_owned();
    let id = created["api_key"]["id"].as_str().ok_or("no id")?.to_owned();
    assert!(key.starts_with("plk_") && created["api_key"]["prefix"] == key[..12]);

    let with_key = |method: Method, tenant: &str, path: &str| {
        app.http.request(method, app.url(path)).header("x-tenant", tenant.to_owned()).bearer_auth(&key)
    };
    assert_eq!(
        with_key(Method::POST, "acme", "/v1/projects").json(&json!({ "name": "by key" })).send().await?.status(),
        201
    );
    // Its role is member: no deletes, no key management.
    let projects: Value = with_key(Method::GET, "acme", "/v1/projects").send().await?.json().await?;
    let project = projects["data"][0]["id"].as_str().ok_or("no project")?.to_owned();
    assert_error(with_key(Method::DELETE, "acme", &format!("/v1/projects/{project}")).send().await?, 403, "forbidden")
        .await?;
    assert_error(with_key(Method::GET, "acme", "/v1/api-keys").send().await?, 403, "forbidden").await?;
    // Another tenant does not know it.
    assert_error(with_key(Method::GET, "globex", "/v1/projects").send().await?, 404, "not_found").await?;
    // A key is no session.
    assert_error(app.http.get(app.url("/v1/me")).bearer_auth(&key).send().await?, 401, "unauthenticated").await?;

    // Listed without its secret, with when it was last used.
    let listed: Value = app.req(Method::GET, "acme", "/v1/api-keys").send().await?.json().await?;
    assert!(!listed.to_string().contains(&key), "the secret is never shown again");
    eventually(Duration::from_secs(2), || async {
        let listed: Value = app.req(Method::GET, "acme", "/v1/api-keys").send().await?.json().await?;
        Ok(listed["data"][0]["last_used_at"].is_string())
    })
    .await?;

    // Another tenant's admin cannot revoke it; its own can, at once.
    assert_error(app.req(Method::DELETE, "globex", &format!("/v1/api-keys/{id}")).send().await?, 404, "not_found")
        .await?;
    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/api-keys/{id}")).send().await?.status(), 204);
    eventually(Duration::from_secs(1), || async {
        Ok(with_key(Method::GET, "acme", "/v1/projects").send().await?.status() == 401)
    })
    .await?;
    assert_error(app.req(Method::DELETE, "acme", &format!("/v1/api-keys/{id}")).send().await?, 404, "not_found")
        .await?;
    Ok(())
}

#[tokio::test]
async fn who_may_create_which_keys() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant_on("acme", "pro").await?;
    let admin = member(&app.db, &acme, Role::Admin).await?;
    let plain = member(&app.db, &acme, Role::Member).await?;
    let create = |token: &str, role: &str| {
        app.http
            .post(app.url("/v1/api-keys"))
            .header("x-tenant", "acme")
            .bearer_auth(token.to_owned())
            .json(&json!({ "name": "k", "role": role }))
            .send()
    };
    assert_eq!(create(&admin, "admin").await?.status(), 201);
    assert_error(create(&plain, "viewer").await?, 403, "forbidden").await?;
    for (role, field) in [("owner", "role"), ("root", "role")] {
        let body = assert_error(create(&admin, role).await?, 400, "invalid_request").await?;
        assert_eq!(body["error"]["details"][0]["field"], field);
    }
    let res = app
        .http
        .post(app.url("/v1/api-keys"))
        .header("x-tenant", "acme")
        .bearer_auth(&admin)
        .json(&json!({ "name": "", "role": "viewer" }))
        .send()
        .await?;
    assert_error(res, 400, "invalid_request").await?;
    for forged in ["plk_", "plk_forged-key", "plk_x'; DROP TABLE public.api_keys;--"] {
        let res = app.http.get(app.url("/v1/projects")).header("x-tenant", "acme").bearer_auth(forged).send().await?;
        assert_error(res, 401, "unauthenticated").await?;
    }
    Ok(())
}

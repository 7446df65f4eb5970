//! Who may call tenant routes: authentication first, then membership, then
//! the access policy (the whole route table is in `policy`).

use std::time::Duration;

use plinth_access::Role;
use reqwest::Method;
use serde_json::json;

use crate::harness::{TestApp, TestResult, assert_error, eventually, member};

/// Every tenant route with a body that would be valid.
fn routes(project: &str, task: &str) -> Vec<(Method, String, Option<serde_json::Value>)> {
    vec![
        (Method::GET, "/v1/projects".into(), None),
        (Method::POST, "/v1/projects".into(), Some(json!({ "name": "x" }))),
        (Method::GET, format!("/v1/projects/{project}"), None),
        (Method::PATCH, format!("/v1/projects/{project}"), Some(json!({ "name": "y" }))),
        (Method::GET, format!("/v1/projects/{project}/tasks"), None),
        (Method::POST, format!("/v1/projects/{project}/tasks"), Some(json!({ "title": "t" }))),
        (Method::PATCH, format!("/v1/tasks/{task}"), Some(json!({ "done": true }))),
        (Method::DELETE, format!("/v1/tasks/{task}"), None),
        (Method::DELETE, format!("/v1/projects/{project}"), None),
    ]
}

async fn seed(app: &TestApp, tenant: &str) -> TestResult<(String, String)> {
    let project = app.create_project(tenant, "seed").await?["id"].as_str().ok_or("no id")?.to_owned();
    let res = app
        .req(Method::POST, tenant, &format!("/v1/projects/{project}/tasks"))
        .json(&json!({ "title": "t" }))
        .send()
        .await?;
    let task: serde_json::Value = res.json().await?;
    Ok((project, task["id"].as_str().ok_or("no id")?.to_owned()))
}

#[tokio::test]
async fn every_tenant_route_needs_a_member_token() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("alpha").await?;
    app.create_tenant("bravo").await?;
    let (project, task) = seed(&app, "bravo").await?;
    let alpha_owner = app.token("alpha").ok_or("no token")?;
    for (method, path, body) in routes(&project, &task) {
        let send = |token: Option<&str>| {
            let mut req = app.http.request(method.clone(), app.url(&path)).header("x-tenant", "bravo");
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = &body {
                req = req.json(body);
            }
            req.send()
        };
        assert_error(send(None).await?, 401, "unauthenticated").await?;
        assert_error(send(Some("pls_not-a-session")).await?, 401, "unauthenticated").await?;
        // The owner of alpha is nobody in bravo.
        let res = send(Some(&alpha_owner)).await?;
        assert_eq!(res.status(), 404, "{method} {path} with another tenant's token");
        assert_error(res, 404, "not_found").await?;
    }
    Ok(())
}

#[tokio::test]
async fn roles_decide_reads_writes_and_deletes() -> TestResult {
    let app = TestApp::spawn().await?;
    let tenant = app.create_tenant("acme").await?;
    let (project, task) = seed(&app, "acme").await?;
    for (role, can_write, can_delete) in
        [(Role::Viewer, false, false), (Role::Member, true, false), (Role::Admin, true, true)]
    {
        let token = member(&app.db, &tenant, role).await?;
        for (method, path, body) in routes(&project, &task) {
            let mut req =
                app.http.request(method.clone(), app.url(&path)).header("x-tenant", "acme").bearer_auth(&token);
            if let Some(body) = &body {
                req = req.json(body);
            }
            let status = req.send().await?.status().as_u16();
            let allowed = match method {
                Method::GET => true,
                Method::DELETE => can_delete,
                _ => can_write,
            };
            if allowed {
                assert!(status < 400 || status == 404, "{role:?} {method} {path}: {status}");
            } else {
                assert_eq!(status, 403, "{role:?} {method} {path}");
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn role_changes_and_removals_apply_within_a_second() -> TestResult {
    let app = TestApp::spawn().await?;
    let tenant = app.create_tenant("acme").await?;
    let token = member(&app.db, &tenant, Role::Member).await?;
    let create = || {
        app.http
            .post(app.url("/v1/projects"))
            .header("x-tenant", "acme")
            .bearer_auth(&token)
            .json(&json!({ "name": "p" }))
            .send()
    };
    assert_eq!(create().await?.status(), 201); // the role is now cached
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    client
        .execute(
            "UPDATE public.memberships SET role = 'viewer' WHERE tenant_id = $1 AND role = 'member'",
            &[&tenant.id.0],
        )
        .await?;
    eventually(Duration::from_secs(1), || async { Ok(create().await?.status() == 403) }).await?;
    client.execute("DELETE FROM public.memberships WHERE tenant_id = $1 AND role = 'viewer'", &[&tenant.id.0]).await?;
    eventually(Duration::from_secs(1), || async { Ok(create().await?.status() == 404) }).await?;
    Ok(())
}

#[tokio::test]
async fn only_members_learn_that_a_tenant_is_suspended() -> TestResult {
    let app = TestApp::spawn().await?;
    let acme = app.create_tenant("acme").await?;
    app.create_tenant("globex").await?;
    crate::harness::set_status(&app.db, acme.id, plinth_tenants::TenantStatus::Suspended).await?;
    let globex_owner = app.token("globex").ok_or("no token")?;
    eventually(Duration::from_secs(1), || async {
        Ok(app.req(Method::GET, "acme", "/v1/projects").send().await?.status() == 403)
    })
    .await?;
    let outsider = app.http.get(app.url("/v1/projects")).header("x-tenant", "acme").bearer_auth(&globex_owner);
    assert_error(outsider.send().await?, 404, "not_found").await?;
    Ok(())
}

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error};

#[tokio::test]
async fn projects_and_tasks_crud() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let res = app
        .req(Method::POST, "acme", "/v1/projects")
        .json(&json!({ "name": "  Launch  ", "description": "line one\nline two" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let project: Value = res.json().await?;
    assert_eq!(
        (project["name"].as_str(), project["description"].as_str()),
        (Some("Launch"), Some("line one\nline two"))
    );
    let id = project["id"].as_str().ok_or("no id")?;

    let res = app
        .req(Method::PATCH, "acme", &format!("/v1/projects/{id}"))
        .json(&json!({ "name": "Liftoff" }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let patched: Value = res.json().await?;
    assert_eq!(
        (patched["name"].as_str(), patched["description"].as_str()),
        (Some("Liftoff"), Some("line one\nline two"))
    );

    let res = app
        .req(Method::POST, "acme", &format!("/v1/projects/{id}/tasks"))
        .json(&json!({ "title": "Fuel" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let task: Value = res.json().await?;
    assert_eq!((task["done"].as_bool(), task["project_id"].as_str()), (Some(false), Some(id)));
    let task_id = task["id"].as_str().ok_or("no id")?;
    let res =
        app.req(Method::PATCH, "acme", &format!("/v1/tasks/{task_id}")).json(&json!({ "done": true })).send().await?;
    let task: Value = res.json().await?;
    assert_eq!((task["done"].as_bool(), task["title"].as_str()), (Some(true), Some("Fuel")));

    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/tasks/{task_id}")).send().await?.status(), 204);
    assert_error(app.req(Method::DELETE, "acme", &format!("/v1/tasks/{task_id}")).send().await?, 404, "not_found")
        .await?;
    // Deleting a project deletes its tasks.
    app.req(Method::POST, "acme", &format!("/v1/projects/{id}/tasks")).json(&json!({ "title": "x" })).send().await?;
    assert_eq!(app.req(Method::DELETE, "acme", &format!("/v1/projects/{id}")).send().await?.status(), 204);
    assert_error(app.req(Method::GET, "acme", &format!("/v1/projects/{id}")).send().await?, 404, "not_found").await?;
    let client = app.testdb.as_ref().ok_or("no db")?.client().await?;
    let orphans: i64 = client
        .query_one("SELECT count(*) FROM pg_stat_user_tables WHERE relname = 'tasks' AND n_live_tup > 0", &[])
        .await?
        .get(0);
    assert_eq!(orphans, 0);
    // Ids that are not ids name nothing.
    for path in [
        "/v1/projects/not-a-uuid",
        "/v1/projects/1%27%20OR%20%271%27=%271",
        "/v1/tasks/00000000-0000-0000-0000-000000000000",
    ] {
        let method = if path.starts_with("/v1/tasks") { Method::DELETE } else { Method::GET };
        assert_error(app.req(method, "acme", path).send().await?, 404, "not_found").await?;
    }
    Ok(())
}

#[tokio::test]
async fn lists_paginate_with_cursors() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant_on("acme", "pro").await?;
    for i in 0..25 {
        app.create_project("acme", &format!("p{i:02}")).await?;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/projects?limit=10&cursor={c}"),
            None => "/v1/projects?limit=10".to_owned(),
        };
        let body: Value = app.req(Method::GET, "acme", &path).send().await?.json().await?;
        pages += 1;
        seen.extend(
            body["data"].as_array().ok_or("no data")?.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)),
        );
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("p{i:02}")).collect();
    assert_eq!((pages, seen), (3, expected), "every project once, in creation order");

    for bad in ["limit=0", "limit=101", "limit=ten", "cursor=nonsense"] {
        let res = app.req(Method::GET, "acme", &format!("/v1/projects?{bad}")).send().await?;
        let body = assert_error(res, 400, "invalid_request").await?;
        assert!(body["error"]["details"][0]["field"].is_string(), "{body}");
    }
    Ok(())
}

#[tokio::test]
async fn bad_bodies_are_refused_with_field_details() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let post = |body: &'static str| {
        app.req(Method::POST, "acme", "/v1/projects").header("content-type", "application/json").body(body)
    };
    let body = assert_error(post(r#"{"name": 5}"#).send().await?, 400, "invalid_request").await?;
    assert_eq!(body["error"]["details"][0]["field"], "name");
    let body = assert_error(post(r#"{"name": ""}"#).send().await?, 400, "invalid_request").await?;
    assert_eq!(body["error"]["details"][0]["code"], "too_short");
    let long = format!(r#"{{"name": "{}"}}"#, "x".repeat(201));
    let res = app
        .req(Method::POST, "acme", "/v1/projects")
        .header("content-type", "application/json")
        .body(long)
        .send()
        .await?;
    let body = assert_error(res, 400, "invalid_request").await?;
    assert_eq!(body["error"]["details"][0]["code"], "too_long");
    let body = assert_error(post(r#"{"name": "ok\u0007"}"#).send().await?, 400, "invalid_request").await?;
    assert_eq!(body["error"]["details"][0]["code"], "control_characters");
    assert_error(post(r#"{"name": "x", "owner": "me"}"#).send().await?, 400, "invalid_request").await?;
    assert_error(post(r#"{"name": "#).send().await?, 400, "invalid_request").await?;
    assert_error(post("[]").send().await?, 400, "invalid_request").await?;
    assert_error(post("").send().await?, 400, "invalid_request").await?;
    let res =
        app.req(Method::POST, "acme", "/v1/projects").header("content-type", "text/plain").body("{}").send().await?;
    assert_error(res, 415, "unsupported_media_type").await?;

    // Metacharacters and unicode are stored and returned verbatim.
    for name in [r#"'; DROP TABLE projects; --"#, "名前 🚀 ﬁ", r#"\"quoted\" $1 %s"#] {
        let res = app.req(Method::POST, "acme", "/v1/projects").json(&json!({ "name": name })).send().await?;
        assert_eq!(res.status(), 201);
        let project: Value = res.json().await?;
        let id = project["id"].as_str().ok_or("no id")?;
        let fetched: Value = app.req(Method::GET, "acme", &format!("/v1/projects/{id}")).send().await?.json().await?;
        assert_eq!(fetched["name"], name);
    }
    Ok(())
}

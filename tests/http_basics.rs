use reqwest::Method;

use std::time::Duration;

use crate::harness::{AppOptions, TestApp, TestDb, TestResult, assert_error, eventually};

#[tokio::test]
async fn every_response_carries_the_servers_request_id() -> TestResult {
    let app = TestApp::spawn().await?;
    // The client's own id is kept beside Plinth's (see security.rs), never in its place.
    for sent in ["client-abc_1.2", "has space", &"x".repeat(65), "semi;colon"] {
        let res = app.http.get(app.url("/health/live")).header("x-request-id", sent).send().await?;
        let id = res.headers()["x-request-id"].to_str()?;
        assert!(id != sent && uuid::Uuid::parse_str(id).is_ok(), "{sent:?} → {id:?}");
    }
    // Errors carry it too, and unknown routes answer in the JSON envelope.
    let res = app.http.get(app.url("/nope")).send().await?;
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 404, "not_found").await?;
    let res = app.req(Method::PUT, "anyone", "/v1/projects").send().await?;
    assert!(res.headers().contains_key("x-request-id"));
    assert_error(res, 405, "method_not_allowed").await?;
    Ok(())
}

#[tokio::test]
async fn health_endpoints() -> TestResult {
    let app = TestApp::spawn().await?;
    assert_eq!(app.http.get(app.url("/health/live")).send().await?.status(), 200);
    assert_eq!(app.http.get(app.url("/health/ready")).send().await?.status(), 200);

    // A server whose database has gone away is live but not ready.
    let testdb = TestDb::migrated().await?;
    let app2 = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    drop(testdb);
    assert_eq!(app2.http.get(app2.url("/health/live")).send().await?.status(), 200);
    let res = app2.http.get(app2.url("/health/ready")).send().await?;
    assert!(res.headers().contains_key("retry-after"));
    let body = assert_error(res, 503, "unavailable").await?;
    assert!(!body.to_string().contains("plinth_test"), "no internal detail leaks: {body}");
    Ok(())
}

/// Readiness fails, with the reason, once the notification listener has
/// been unable to reconnect for a few seconds, and recovers when it is back.
#[tokio::test]
async fn readiness_fails_while_the_notification_listener_stays_down() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(&testdb, AppOptions::default()).await?;
    let admin = testdb.server_client().await?;
    let listeners = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2";
    let name = plinth_tenants::notify::APPLICATION_NAME;
    eventually(Duration::from_secs(20), || async {
        Ok(admin.query_one(listeners, &[&testdb.name, &name]).await?.get::<_, i64>(0) == 1)
    })
    .await?;
    let status = || async { Ok::<_, reqwest::Error>(app.http.get(app.url("/health/ready")).send().await?.status()) };
    assert_eq!(status().await?, 200);

    // No new connection to this database (the pool keeps its own), and the
    // listener's is ended: it cannot come back.
    admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", testdb.name)).await?;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[&testdb.name, &name],
        )
        .await?;
    let waited = eventually(Duration::from_secs(30), || async {
        let res = app.http.get(app.url("/health/ready")).send().await?;
        if res.status() != 503 {
            return Ok(false);
        }
        let body = assert_error(res, 503, "unavailable").await?;
        Ok(body["error"]["message"].as_str().is_some_and(|m| m.contains("notification listener")))
    })
    .await?;
    // Not at once: a listener that reconnects within a few seconds (a
    // database restart) leaves the instance ready.
    assert!(waited >= Duration::from_secs(5), "unready after {waited:?}");
    // Live is not readiness: still 200.
    assert_eq!(app.http.get(app.url("/health/live")).send().await?.status(), 200);

    admin.batch_execute(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", testdb.name)).await?;
    eventually(Duration::from_secs(30), || async { Ok(status().await? == 200) }).await?;
    Ok(())
}

#[tokio::test]
async fn oversize_bodies_get_413() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(&testdb, AppOptions { max_body_bytes: Some(1024), ..Default::default() }).await?;
    app.create_tenant("acme").await?;
    let big = format!(r#"{{"name": "x", "description": "{}"}}"#, "y".repeat(2000));
    let res = app
        .req(Method::POST, "acme", "/v1/projects")
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await?;
    assert_error(res, 413, "payload_too_large").await?;
    // Without a Content-Length (chunked), the limit holds while reading.
    let stream = futures_util::stream::iter(
        big.into_bytes().chunks(100).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>(),
    );
    let res = app
        .req(Method::POST, "acme", "/v1/projects")
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await?;
    assert_error(res, 413, "payload_too_large").await?;
    // Just under the limit is fine.
    let res =
        app.req(Method::POST, "acme", "/v1/projects").json(&serde_json::json!({ "name": "small" })).send().await?;
    assert_eq!(res.status(), 201);
    Ok(())
}

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

/// The headers every answer carries, whatever its status; HSTS only when the
/// public URL is https.
#[tokio::test]
async fn every_answer_carries_the_security_headers() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let answers = [
        app.http.get(app.url("/health/live")).send().await?,
        app.http.get(app.url("/nope")).send().await?,
        app.http.get(app.url("/v1/me")).send().await?,
        app.req(Method::GET, "acme", "/v1/projects").send().await?,
        app.req(Method::PUT, "acme", "/v1/projects").send().await?,
        app.http.get(app.url("/v1/projects%00")).send().await?,
    ];
    let mut statuses = Vec::new();
    for res in answers {
        statuses.push(res.status().as_u16());
        let h = res.headers();
        let at = format!("{} {}", res.status(), res.url().path());
        assert_eq!(h["x-content-type-options"], "nosniff", "{at}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{at}");
        assert_eq!(h["x-frame-options"], "DENY", "{at}");
        assert_eq!(h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'", "{at}");
        assert_eq!(h["cache-control"], "no-store", "{at}");
        assert!(!h.contains_key("strict-transport-security"), "{at}: HSTS over http");
    }
    assert_eq!(statuses, [200, 404, 401, 200, 405, 400]);

    let testdb = TestDb::migrated().await?;
    let https = AppOptions { settings: vec![("PLINTH_PUBLIC_URL", "https://plinth.example")], ..Default::default() };
    let app = TestApp::spawn_on(&testdb, https).await?;
    for path in ["/health/live", "/nope"] {
        let res = app.http.get(app.url(path)).send().await?;
        assert_eq!(res.headers()["strict-transport-security"], "max-age=31536000; includeSubDomains", "{path}");
    }
    Ok(())
}

/// Browsers get cross-origin access for the listed origins only, and none
/// when no origin is listed.
#[tokio::test]
async fn cross_origin_access_is_for_the_listed_origins() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let listed = AppOptions {
        settings: vec![("PLINTH_CORS_ORIGINS", "https://app.example.com, http://localhost:3000")],
        ..Default::default()
    };
    let app = TestApp::spawn_on(&testdb, listed).await?;
    app.create_tenant("acme").await?;
    let preflight = |origin: &str, method: &str| {
        app.http
            .request(Method::OPTIONS, app.url("/v1/projects"))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization, content-type, x-tenant")
    };

    let res = preflight("https://app.example.com", "POST").send().await?;
    assert_eq!(res.status(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert!(h["access-control-allow-methods"].to_str()?.contains("POST"), "{h:?}");
    let allowed = h["access-control-allow-headers"].to_str()?.to_ascii_lowercase();
    for header in ["authorization", "content-type", "x-tenant"] {
        assert!(allowed.contains(header), "{header} not in {allowed}");
    }
    assert_eq!(h["access-control-max-age"], "600");
    assert!(!h.contains_key("access-control-allow-credentials"), "bearer tokens, not cookies");

    // The request itself: the web app may read the answer and its request id.
    let res = app.req(Method::GET, "acme", "/v1/projects").header("origin", "http://localhost:3000").send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], "http://localhost:3000");
    let exposed = res.headers()["access-control-expose-headers"].to_str()?.to_ascii_lowercase();
    assert!(exposed.contains("x-request-id") && exposed.contains("retry-after"), "{exposed}");

    // Another origin, or a method or header not offered, gets no access.
    let res = preflight("https://evil.example", "POST").send().await?;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert_error(res, 400, "invalid_request").await?;
    let res = preflight("https://app.example.com", "TRACE").send().await?;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert!(res.status().is_client_error());

    // Unset: no origin is allowed.
    let app = TestApp::spawn().await?;
    let res = app
        .http
        .request(Method::OPTIONS, app.url("/v1/projects"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await?;
    assert!(!res.headers().contains_key("access-control-allow-origin"));
    assert_error(res, 405, "method_not_allowed").await?;
    Ok(())
}

/// Found by schemathesis: serde fills a struct from an array of its fields
/// (`[null, null]` changed nothing and answered 200), and lengths were
/// counted after trimming, so a name longer than the documented maximum
/// was taken.
#[tokio::test]
async fn a_body_is_an_object_and_a_length_counts_what_was_sent() -> TestResult {
    let app = TestApp::spawn().await?;
    app.create_tenant("acme").await?;
    let project = app.create_project("acme", "Launch").await?;
    let url = format!("/v1/projects/{}", project["id"].as_str().ok_or("no id")?);
    for body in ["[null, null]", "[\"Renamed\", \"\"]", "null", "\"Renamed\""] {
        let res =
            app.req(Method::PATCH, "acme", &url).header("content-type", "application/json").body(body).send().await?;
        assert_error(res, 400, "invalid_request").await?;
    }
    let unchanged: serde_json::Value = app.req(Method::GET, "acme", &url).send().await?.json().await?;
    assert_eq!(unchanged["name"], "Launch");
    let long = format!(" {}", "x".repeat(200));
    let res = app.req(Method::POST, "acme", "/v1/projects").json(&serde_json::json!({ "name": long })).send().await?;
    let body = assert_error(res, 400, "invalid_request").await?;
    assert_eq!(body["error"]["details"][0]["code"], "too_long", "{body}");
    let fits = format!(" {} ", "x".repeat(198));
    let res = app.req(Method::POST, "acme", "/v1/projects").json(&serde_json::json!({ "name": fits })).send().await?;
    assert_eq!(res.status(), 201);
    assert_eq!(res.json::<serde_json::Value>().await?["name"], "x".repeat(198), "stored trimmed");
    Ok(())
}

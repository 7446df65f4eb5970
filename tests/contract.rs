//! The API contract: `GET /openapi.json` is valid OpenAPI 3.1, holds every
//! route actix serves and no other, `/docs` draws it, and schemathesis,
//! run over every operation against a real Plinth with a signed-in tenant,
//! finds no server error and no answer that breaks the document.
//!
//! The validator and schemathesis come from PyPI, installed by
//! `scripts/test.sh` in a virtual environment under `target/tools`.

use actix_web::{App, HttpRequest, HttpResponse, web};
use reqwest::Method;
use std::collections::BTreeSet;
use utoipa_actix_web::AppExt as _;

use crate::harness::{TempDir, TestApp, TestResult};

/// The served document.
async fn document(app: &TestApp) -> TestResult<serde_json::Value> {
    let res = app.http.get(app.url("/openapi.json")).send().await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    Ok(res.json().await?)
}

/// (method, path) of every operation in the document.
fn operations(doc: &serde_json::Value) -> TestResult<BTreeSet<(String, String)>> {
    let paths = doc["paths"].as_object().ok_or("no paths")?;
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().ok_or("a path item is not an object")?.keys() {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    Ok(ops)
}

/// A tool from the test environment (`scripts/test.sh` installs it).
fn tool(name: &str) -> std::process::Command {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/bin").join(name);
    std::process::Command::new(if venv.exists() { venv.into_os_string() } else { name.into() })
}

#[tokio::test]
async fn the_document_is_valid_openapi_3_1() -> TestResult {
    let app = TestApp::spawn().await?;
    let doc = document(&app).await?;
    assert_eq!(doc["openapi"], "3.1.0");
    let dir = TempDir::new("openapi")?;
    let file = dir.path.join("openapi.json");
    std::fs::write(&file, serde_json::to_vec(&doc)?)?;
    let out = tool("openapi-spec-validator")
        .arg(&file)
        .output()
        .map_err(|e| format!("running openapi-spec-validator (scripts/test.sh installs it): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(": OK"), "{text}{}", String::from_utf8_lossy(&out.stderr));

    // What a client needs to know is there: both bearer schemes, the tenant
    // header, pagination, Retry-After, and the error envelope with its codes.
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["session"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["scheme"], "bearer");
    let get_project = &doc["paths"]["/v1/projects/{id}"]["get"];
    let params: Vec<&str> = get_project["parameters"]
        .as_array()
        .ok_or("no parameters")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(params.contains(&"X-Tenant") && params.contains(&"id"), "{params:?}");
    for status in ["401", "403", "404", "500", "503"] {
        assert!(get_project["responses"][status].is_object(), "GET /v1/projects/{{id}} lacks {status}");
    }
    let list = &doc["paths"]["/v1/projects"]["get"]["parameters"];
    assert!(list.to_string().contains("\"limit\"") && list.to_string().contains("\"cursor\""));
    let limited = &doc["paths"]["/v1/auth/login"]["post"]["responses"]["429"];
    assert!(limited["headers"]["Retry-After"].is_object(), "{limited}");
    let codes = &doc["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"];
    assert!(codes.to_string().contains("\"quota_exceeded\""), "{codes}");
    let name = &doc["components"]["schemas"]["NewProject"]["properties"]["name"];
    assert_eq!((name["minLength"].as_u64(), name["maxLength"].as_u64()), (Some(1), Some(200)), "{name}");
    Ok(())
}

/// What answers a request no route takes, in the route-coverage test.
const UNROUTED: u16 = 599;

async fn unrouted(req: HttpRequest) -> HttpResponse {
    // The pretty Debug form of actix's resource map: every registered
    // resource, nested under the scopes it is in.
    let tree = format!("{:#?}", req.resource_map());
    HttpResponse::build(actix_web::http::StatusCode::from_u16(UNROUTED).unwrap_or_default()).body(tree)
}

/// The full patterns of every resource in actix's resource map, from its
/// pretty Debug form: each `ResourceDef` shows its pattern and whether it is
/// a prefix (a scope), and nesting shows as indentation.
fn patterns(tree: &str) -> TestResult<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    // (indentation, prefix) of the scopes around the current line.
    let mut scopes: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let mut lines = tree.lines();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        let line = line.trim();
        if line == "patterns: Single(" {
            let value = lines.next().ok_or("a pattern line ends the tree")?.trim();
            let pattern = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix("\","))
                .ok_or_else(|| format!("unexpected pattern: {value}"))?;
            pending = Some((indent, pattern.to_owned()));
        } else if let Some(prefix) = line.strip_prefix("is_prefix: ") {
            let (indent, pattern) = pending.take().ok_or("is_prefix before a pattern")?;
            scopes.retain(|(i, _)| *i < indent);
            let outer: String = scopes.iter().map(|(_, p)| p.as_str()).collect();
            if prefix.starts_with("true") {
                scopes.push((indent, pattern));
            } else {
                found.insert(format!("{outer}{pattern}"));
            }
        }
    }
    Ok(found)
}

/// Every route actix serves is in the document and every operation of the
/// document is served: the resource map gives each pattern, and a request
/// with each method tells which methods a pattern takes.
#[tokio::test]
async fn the_document_holds_exactly_the_routes_actix_serves() -> TestResult {
    let (app, doc) = App::new().into_utoipa_app().configure(plinth::api::routes).split_for_parts();
    let service = actix_web::test::init_service(app.default_service(web::to(unrouted))).await;
    let tree = actix_web::test::call_and_read_body(
        &service,
        actix_web::test::TestRequest::get().uri("/no/route/has/this/path").to_request(),
    )
    .await;
    let patterns = patterns(std::str::from_utf8(&tree)?)?;
    assert!(patterns.contains("/v1/admin/tenants/{id}"), "scopes are read: {patterns:?}");
    let mut served = BTreeSet::new();
    for pattern in &patterns {
        let path = pattern
            .replace("{id}", "0192f0c5-0000-7000-8000-000000000000")
            .replace("{user_id}", "0192f0c5-0000-7000-8000-000000000001");
        for method in [Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let method = actix_web::http::Method::from_bytes(method.as_str().as_bytes())?;
            let req = actix_web::test::TestRequest::default().method(method.clone()).uri(&path).to_request();
            let res = actix_web::test::call_service(&service, req).await;
            if res.status().as_u16() != UNROUTED {
                served.insert((method.to_string(), pattern.clone()));
            }
        }
    }
    let documented = operations(&serde_json::to_value(&doc)?)?;
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in the document: {undocumented:?}");
    assert!(unserved.is_empty(), "in the document but not served: {unserved:?}");
    assert!(served.len() >= 47, "{} routes", served.len());

    // And the running server serves the same document.
    let running = TestApp::spawn().await?;
    assert_eq!(operations(&document(&running).await?)?, documented);
    Ok(())
}

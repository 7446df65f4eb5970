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
use std::time::Duration;
use utoipa_actix_web::AppExt as _;

use crate::harness::{AppOptions, TempDir, TestApp, TestDb, TestResult, platform_admin, tool};
use crate::stripe::StripeMock;

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

/// `/docs` in a real browser (Chromium, headless; `scripts/test.sh` installs
/// it): Redoc draws every operation from `/openapi.json` under the page's
/// strict CSP, with nothing from another origin.
#[tokio::test]
async fn the_reference_page_draws_the_document_in_a_browser() -> TestResult {
    let app = TestApp::spawn().await?;
    let res = app.http.get(app.url("/docs")).send().await?;
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"].to_str()?.to_owned();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"), "{csp}");
    let profile = TempDir::new("chromium")?;
    let mut command = tokio::process::Command::new("chromium");
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", profile.path.display()))
        // Virtual time runs the page's scripts to their end, however busy the machine.
        .args(["--virtual-time-budget=30000", "--dump-dom", &app.url("/docs")])
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .map_err(|_| "chromium ran for 2 minutes")?
        .map_err(|e| format!("running chromium (scripts/test.sh installs it): {e}"))?;
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    for summary in [
        "Signs up: an account, its organization, and a session",
        "The tenant's projects, oldest first.",
        "Every tenant, oldest first (platform admins)",
        "Receives Stripe's webhook events",
    ] {
        assert!(dom.contains(summary), "{summary:?} is not on the page; the browser said:\n{log}");
    }
    // Redoc links its own logo from its CDN; the policy blocks it, and
    // nothing else is blocked.
    let violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Content Security Policy") && !l.contains("https://cdn.redoc.ly/redoc/logo-mini.svg"))
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
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

/// Each schema name is one type's: utoipa files schemas by name, so a second
/// type of the same name would silently replace the first in the document.
#[test]
fn schema_names_are_unique() -> TestResult {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    let mut dirs = vec![root.join("app/src"), root.join("tenants"), root.join("admin"), root.join("billing/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut seen: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let mut count = 0;
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for (i, line) in lines.iter().enumerate() {
            if !(line.starts_with("#[derive(") && line.contains("ToSchema")) {
                continue;
            }
            // The attributes and the item after the derive.
            let mut renamed = None;
            let item = lines[i + 1..].iter().find_map(|l| {
                if let Some(name) = l.strip_prefix("#[schema(as = ") {
                    renamed = name.strip_suffix(")]").map(str::to_owned);
                }
                let l = l.strip_prefix("pub ").or_else(|| l.strip_prefix("pub(crate) ")).unwrap_or(l);
                let rest = l.strip_prefix("struct ").or_else(|| l.strip_prefix("enum "))?;
                Some(rest.split(|c: char| !c.is_alphanumeric() && c != '_').next().unwrap_or_default().to_owned())
            });
            let name = renamed.or(item).ok_or_else(|| format!("{}: a derive without an item", file.display()))?;
            let place = format!("{}:{}", file.display(), i + 1);
            if let Some(first) = seen.insert(name.clone(), place.clone()) {
                return Err(format!("the schema name {name} is used at {first} and at {place}").into());
            }
            count += 1;
        }
    }
    assert!(count >= 50, "{count} schemas found");
    Ok(())
}

/// The checks a schemathesis run must pass: no 5xx, and every answer's
/// status, content type, headers and body as the document says.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,negative_data_rejection";

/// Runs schemathesis against `app` as `token` in tenant `acme`, with
/// `filter` arguments; fails with its report unless it finds nothing.
async fn schemathesis(app: &TestApp, token: &str, filter: &[&str]) -> TestResult {
    // A fixed seed, so that a run can be repeated; `PLINTH_SCHEMATHESIS_SEED`
    // explores others, `PLINTH_SCHEMATHESIS_EXAMPLES` more cases per operation.
    let seed = std::env::var("PLINTH_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261202".into());
    let examples = std::env::var("PLINTH_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    let mut command = tokio::process::Command::from(tool("schemathesis"));
    command
        .args(["run", &app.url("/openapi.json"), "--checks", CHECKS, "--mode", "all"])
        .args(["--max-examples", &examples, "--request-timeout", "10", "--seed", &seed, "--no-color"])
        .args(["-H", &format!("Authorization: Bearer {token}"), "-H", "X-Tenant: acme"])
        .args(filter)
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(900), command.output()).await;
    let out = run
        .map_err(|_| "schemathesis ran for 15 minutes")?
        .map_err(|e| format!("running schemathesis (scripts/test.sh installs it): {e}"))?;
    let report = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("schemathesis found problems:\n{report}{}", String::from_utf8_lossy(&out.stderr)).into());
    }
    assert!(report.contains(" passed") && !report.contains("failures"), "{report}");
    Ok(())
}

/// Every operation, with examples that fit the document and examples that
/// break it, and the stateful links between them, as the owner of a tenant
/// on the enterprise plan with Stripe (a local stand-in) configured.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() -> TestResult {
    let stripe = StripeMock::start().await?;
    let testdb = TestDb::migrated().await?;
    let api_base: &'static str = Box::leak(stripe.url.clone().into_boxed_str());
    let settings = vec![
        ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth_contract"),
        ("PLINTH_STRIPE_API_BASE", api_base),
        ("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_plinth_contract"),
        ("PLINTH_STRIPE_PRICE_PRO", "price_plinth_pro"),
        ("PLINTH_STRIPE_PRICE_ENTERPRISE", "price_plinth_enterprise"),
    ];
    let app = TestApp::spawn_on(&testdb, AppOptions { settings, ..Default::default() }).await?;
    app.create_tenant_on("acme", "enterprise").await?;
    let token = app.token("acme").ok_or("no token")?;
    // Another tenant's data, which a run as acme's owner must not touch.
    app.create_tenant("globex").await?;
    let globex = app.create_project("globex", "Globex's own").await?;
    let globex_url = format!("/v1/projects/{}", globex["id"].as_str().ok_or("no id")?);

    // The SCIM routes run with acme's SCIM token, first: the other run may
    // end the session that makes it.
    let scim_routes = "^/scim/v2/";
    // Acme's domain, so that its directory provisions `ada@example.com`
    // (the document's example) and the runs reach past 400.
    let domain = "INSERT INTO public.tenant_email_domains (tenant_id, domain, token, verified_at, verified_by) \
                  SELECT id, 'example.com', 'contract', now(), 'dns' FROM public.tenants WHERE slug = 'acme'";
    testdb.client().await?.execute(domain, &[]).await?;
    let res = app.req(Method::POST, "acme", "/v1/scim/tokens").send().await?;
    assert_eq!(res.status(), 201);
    let scim = res.json::<serde_json::Value>().await?["token"].as_str().ok_or("no SCIM token")?.to_owned();
    schemathesis(&app, &scim, &["--include-path-regex", scim_routes]).await?;
    // Signing out ends the session the run uses, and a platform admin may
    // delete acme: those operations run after the others.
    let everything_else =
        ["--exclude-operation-id", "logout", "--exclude-tag", "platform", "--exclude-path-regex", scim_routes];
    schemathesis(&app, &token, &everything_else).await?;
    let res = app.req(Method::GET, "globex", &globex_url).send().await?;
    assert_eq!(res.status(), 200, "globex's project is still there");
    assert_eq!(res.json::<serde_json::Value>().await?, globex, "and unchanged");
    let lobby = app.create_tenant("lobby").await?;
    let admin = platform_admin(&app, &lobby).await?;
    schemathesis(&app, &admin, &["--include-tag", "platform"]).await?;
    schemathesis(&app, &token, &["--include-operation-id", "logout", "--phases", "examples,coverage,fuzzing"]).await?;
    Ok(())
}

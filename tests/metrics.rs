//! `GET /metrics`: behind its token, counters that move with the work, and
//! no tenant, user, address, id or token in any label.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;

use crate::harness::{AppOptions, TempDir, TestApp, TestDb, TestResult, assert_error, eventually};
use crate::mail_and_jobs::{Running, fast, settings};
use crate::stripe::{event, now, object, signature};

const TOKEN: &str = "metrics-token-for-the-test";
const SECRET: &str = "whsec_plinth_metrics_secret";

/// One sample: its name and labels.
pub(crate) type Sample = (String, BTreeMap<String, String>);

/// Parses Prometheus text: `name{k="v",...} value` lines (a label value may
/// hold braces, as route patterns do).
pub(crate) fn parse(text: &str) -> TestResult<Vec<(Sample, f64)>> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("no value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').ok_or_else(|| format!("unclosed: {line}"))?),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((key, after)) = rest.split_once("=\"") {
            let end = after.find('"').ok_or_else(|| format!("unquoted: {line}"))?;
            map.insert(key.trim_start_matches(',').to_owned(), after[..end].to_owned());
            rest = &after[end + 1..];
        }
        samples.push(((name.to_owned(), map), value.parse::<f64>()?));
    }
    Ok(samples)
}

/// The value of the sample named `name` whose labels include `labels` (0
/// when there is none yet).
pub(crate) fn value(samples: &[(Sample, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|((n, l), _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
        .sum()
}

/// A file under `deploy/`.
fn deploy(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

/// Every `plinth_*` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for (at, _) in text.match_indices("plinth_") {
        let name: String =
            text[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        names.insert(name);
    }
    names
}

async fn scrape(app: &TestApp) -> TestResult<Vec<(Sample, f64)>> {
    let res = app.http.get(app.url("/metrics")).bearer_auth(TOKEN).send().await?;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str()?.starts_with("text/plain"));
    parse(&res.text().await?)
}

#[tokio::test]
async fn metrics_need_their_token_move_with_the_work_and_name_nobody() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let options = AppOptions {
        settings: vec![
            ("PLINTH_METRICS_TOKEN", TOKEN),
            ("PLINTH_STRIPE_WEBHOOK_SECRET", SECRET),
            ("PLINTH_LIMIT_LOGIN_PER_IP", "2/1h"),
        ],
        ..Default::default()
    };
    let app = TestApp::spawn_on(&testdb, options).await?;
    assert_error(app.http.get(app.url("/metrics")).send().await?, 401, "unauthenticated").await?;
    let wrong = app.http.get(app.url("/metrics")).bearer_auth("another-token").send().await?;
    assert_error(wrong, 401, "unauthenticated").await?;

    let before = scrape(&app).await?;
    // The recorder is the process's: other tests count too, so each check
    // is "at least what this test did".
    let tenant = app.create_tenant("acme").await?;
    let project = app.create_project("acme", "Launch").await?;
    let id = project["id"].as_str().ok_or("no project id")?.to_owned();
    for _ in 0..5 {
        assert_eq!(app.req(Method::GET, "acme", &format!("/v1/projects/{id}")).send().await?.status(), 200);
    }
    assert_error(app.req(Method::GET, "acme", "/v1/audit-log").send().await?, 402, "plan_required").await?;
    let mut sub = object("subscription");
    sub["id"] = serde_json::json!("sub_plinth_metrics");
    let body = event("evt_plinth_metrics", "customer.subscription.updated", now(), sub).to_string();
    for _ in 0..2 {
        let res = app
            .http
            .post(app.url("/v1/webhooks/stripe"))
            .header("content-type", "application/json")
            .header("stripe-signature", signature(&body, SECRET, now()))
            .body(body.clone())
            .send()
            .await?;
        assert_eq!(res.status(), 200);
    }
    let login = serde_json::json!({ "email": "nobody@example.com", "password": "not the password" });
    let mut refused = false;
    for _ in 0..3 {
        let res = app.http.post(app.url("/v1/auth/login")).json(&login).send().await?;
        refused |= res.status() == 429;
    }
    assert!(refused, "the third login from this address is over the limit");
    // A signup queues a verification mail; a worker delivers it.
    let signup = serde_json::json!({
        "email": "owner@globex.example.com",
        "password": "a long enough passphrase",
        "organization": "Globex",
        "slug": "globex",
    });
    assert_eq!(app.http.post(app.url("/v1/signup")).json(&signup).send().await?.status(), 201);
    // Waiting in the queue, counted by kind and state.
    let queued = scrape(&app).await?;
    assert!(value(&queued, "plinth_jobs", &[("kind", "mail.deliver"), ("state", "queued")]) >= 1.0);
    assert!(value(&queued, "plinth_jobs_oldest_due_seconds", &[]) >= 0.0);
    let dir = TempDir::new("mail")?;
    let worker = Running::mail(&testdb, &settings(None, &dir.path)?, fast())?;
    let done = [("kind", "mail.deliver"), ("outcome", "done")];
    let runs_before = value(&before, "plinth_job_runs_total", &done);
    eventually(Duration::from_secs(30), || async {
        Ok(value(&scrape(&app).await?, "plinth_job_runs_total", &done) > runs_before)
    })
    .await?;
    // The same worker processes the Stripe event (applied or parked, as
    // this test's Stripe knows no customer).
    let processed_before = value(&before, "plinth_stripe_events_processed_total", &[]);
    eventually(Duration::from_secs(30), || async {
        Ok(value(&scrape(&app).await?, "plinth_stripe_events_processed_total", &[]) > processed_before)
    })
    .await?;
    worker.stop().await?;

    let after = scrape(&app).await?;
    let moved = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    let read = [("method", "GET"), ("route", "/v1/projects/{id}"), ("status", "200")];
    assert!(
        moved("plinth_http_requests_total", &read) >= 5.0,
        "requests: {}",
        moved("plinth_http_requests_total", &read)
    );
    let read_latency = [("method", "GET"), ("route", "/v1/projects/{id}"), ("le", "+Inf")];
    assert!(moved("plinth_http_request_duration_seconds_bucket", &read_latency) >= 5.0);
    assert!(moved("plinth_policy_checks_total", &[("decision", "allowed")]) >= 6.0);
    assert!(moved("plinth_policy_checks_total", &[("decision", "plan_required")]) >= 1.0);
    assert!(moved("plinth_stripe_webhooks_total", &[("outcome", "stored")]) >= 1.0);
    assert!(moved("plinth_stripe_webhooks_total", &[("outcome", "duplicate")]) >= 1.0);
    assert!(moved("plinth_rate_limited_total", &[]) >= 1.0);
    assert!(moved("plinth_mail_total", &[("outcome", "sent")]) >= 1.0);
    assert!(moved("plinth_tenant_transactions_total", &[("kind", "schema"), ("outcome", "commit")]) >= 6.0);
    assert!(moved("plinth_cache_requests_total", &[("cache", "sessions"), ("result", "hit")]) >= 5.0);
    assert!(moved("plinth_cache_requests_total", &[("cache", "tenants")]) >= 1.0);
    assert_eq!(value(&after, "plinth_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(value(&after, "plinth_db_pool_max_connections", &[]) > 0.0);
    assert_eq!(value(&after, "plinth_notify_listener_up", &[]), 1.0);
    assert_eq!(value(&after, "plinth_jobs_stats_up", &[]), 1.0);
    assert_eq!(value(&after, "plinth_ready", &[]), 1.0);
    // Every metric the alerts and the dashboard query is one Plinth reports.
    for file in ["prometheus/alerts.yml", "grafana/plinth.json"] {
        let text = std::fs::read_to_string(deploy(file))?;
        for name in metric_names(&text) {
            assert!(
                after.iter().any(|((n, _), _)| *n == name),
                "{file} queries {name}, which /metrics does not report"
            );
        }
    }

    // Nobody in the labels: no id, address, slug or token, in any series.
    let token = app.token("acme").ok_or("no token")?;
    for ((name, labels), _) in &after {
        for value in labels.values() {
            let named = value.contains('@')
                || uuid::Uuid::parse_str(value).is_ok()
                || value.contains(&id)
                || value.contains(&tenant.id.to_string())
                || value == "acme"
                || value == "globex"
                || value.contains(&token)
                || value.contains("evt_");
            assert!(!named, "{name} has the label value {value:?}");
        }
    }
    Ok(())
}

/// Runs promtool (installed by `scripts/test.sh`) in `deploy/prometheus`.
fn promtool(args: &[&str]) -> TestResult<String> {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .map_err(|e| format!("running promtool (scripts/test.sh installs it): {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("promtool {args:?} failed:\n{text}").into());
    }
    Ok(text)
}

#[test]
fn alert_rules_pass_their_tests_and_dashboard_queries_parse() -> TestResult {
    let checked = promtool(&["check", "rules", "alerts.yml"])?;
    assert!(checked.contains("SUCCESS: 11 rules found"), "{checked}");
    promtool(&["test", "rules", "alerts.test.yml"])?;
    // Every alert has a test and a runbook.
    let alerts = std::fs::read_to_string(deploy("prometheus/alerts.yml"))?;
    let tests = std::fs::read_to_string(deploy("prometheus/alerts.test.yml"))?;
    let runbooks = std::fs::read_to_string(deploy("../docs/operations.md"))?;
    for name in alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {name}")), "{name} has no promtool test");
        assert!(runbooks.contains(&format!("### {name}\n")), "{name} has no runbook in docs/operations.md");
    }
    // The dashboard's queries, as recording rules, pass promtool's parser.
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(deploy("grafana/plinth.json"))?)?;
    let panels = dashboard["panels"].as_array().ok_or("no panels")?;
    let rules: Vec<serde_json::Value> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .enumerate()
        .map(|(i, t)| {
            let expr = t["expr"].as_str().unwrap_or_default();
            let expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*");
            serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": expr })
        })
        .collect();
    assert!(rules.len() >= 20, "{} queries", rules.len());
    let dir = TempDir::new("dashboard")?;
    let file = dir.path.join("dashboard.rules.json");
    std::fs::write(&file, serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] }).to_string())?;
    let file = file.to_str().ok_or("temp path")?;
    promtool(&["check", "rules", file])?;
    Ok(())
}

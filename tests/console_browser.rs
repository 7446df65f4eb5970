//! The operator console end to end in a real browser: Debian's chromium,
//! driven by playwright-core (`tests/browser/console.mjs`; both installed
//! by `scripts/test.sh`). This test prepares a server and its data — a
//! platform admin with two-factor sign-in, tenants, a parked Stripe event,
//! a migrate-all run that died on a broken tenant — runs the script, and
//! checks in the database what the clicks did. Screenshots of each page go
//! to `target/tmp/console-screenshots/`.

use std::collections::HashMap;
use std::time::Duration;

use plinth_access::Role;
use plinth_tenants::{Tenant, registry};
use serde_json::Value;

use crate::billing::post;
use crate::console::operator;
use crate::harness::{AppOptions, TempDir, TestApp, TestDb, TestResult, browser_script, eventually, member};
use crate::mail_and_jobs::{Running, fast};
use crate::smtp::SmtpServer;
use crate::stripe::{checkout_session, event, now, signature, subscription};
use crate::world::PASSWORD;

const SECRET: &str = "whsec_console_browser";

async fn deliver(app: &TestApp, id: &str, kind: &str, created: i64, object: Value) -> TestResult {
    let body = event(id, kind, created, object).to_string();
    let res = post(app, &body, Some(&signature(&body, SECRET, now()))).await?;
    assert_eq!(res.status(), 200, "{kind}");
    Ok(())
}

async fn one(testdb: &TestDb, sql: &str, id: &str) -> TestResult<String> {
    Ok(testdb.client().await?.query_one(sql, &[&id]).await?.get(0))
}

async fn tenant(app: &TestApp, slug: &str) -> TestResult<Tenant> {
    Ok(app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, slug).await?))
        .await?
        .ok_or("no tenant")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_console_in_a_browser() -> TestResult {
    let testdb = TestDb::migrated().await?;
    // The web instance maps the price Stripe now sends to pro; the worker
    // that first processed the event did not (it was deployed before), so
    // the event waits parked until an operator replays it.
    let stripe_settings =
        [("PLINTH_STRIPE_WEBHOOK_SECRET", SECRET), ("PLINTH_STRIPE_PRICE_ENTERPRISE", "price_plinth_enterprise")];
    let mut app_settings = stripe_settings.to_vec();
    app_settings.push(("PLINTH_STRIPE_PRICE_PRO", "price_new"));
    let app = TestApp::spawn_on(&testdb, AppOptions { settings: app_settings, ..Default::default() }).await?;
    let smtp = SmtpServer::start().await?;
    let dir = TempDir::new("console-browser")?;
    let mut values: HashMap<String, String> =
        stripe_settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    values.insert("PLINTH_STRIPE_PRICE_PRO".into(), "price_plinth_pro".into());
    values.insert("PLINTH_SMTP_URL".into(), smtp.url());
    values.insert("PLINTH_MAIL_FROM".into(), "Plinth <noreply@plinth.test>".into());
    values.insert("PLINTH_DATA_DIR".into(), dir.path.display().to_string());
    let worker = Running::mail(&testdb, &plinth::config::Settings::from_values(&values)?, fast())?;

    let ops = operator(&app, "ops@example.com", "ops").await?;
    let acme = app.create_tenant("acme-corp").await?;
    for slug in ["globex", "initech", "broken-co"] {
        app.create_tenant(slug).await?;
    }
    let sam = member(&app.db, &acme, Role::Member).await?;
    let me: Value = app.http.get(app.url("/v1/me")).bearer_auth(&sam).send().await?.json().await?;
    let sam_email = me["user"]["email"].as_str().ok_or("no email")?.to_owned();

    // A parked event: globex's subscription at a price the worker does not know.
    let globex = tenant(&app, "globex").await?;
    let t = now() - 100;
    deliver(
        &app,
        "evt_link",
        "checkout.session.completed",
        t,
        checkout_session(&globex.id.to_string(), "cus_g", "sub_g"),
    )
    .await?;
    deliver(
        &app,
        "evt_new_price",
        "customer.subscription.created",
        t + 1,
        subscription("sub_g", "cus_g", "active", "price_new"),
    )
    .await?;
    let status = "SELECT status FROM public.stripe_events WHERE id = $1";
    eventually(Duration::from_secs(20), || async { Ok(one(&testdb, status, "evt_new_price").await? == "parked") })
        .await?;

    // A migrate-all run that died: broken-co lost the record of a
    // migration whose table it still has, so applying it again fails.
    let broken = tenant(&app, "broken-co").await?;
    let last = plinth_tenants::migrate::TENANT_MIGRATIONS.last().ok_or("no tenant migrations")?;
    let client = testdb.client().await?;
    client
        .execute(
            "DELETE FROM public.tenant_migrations WHERE tenant_id = $1 AND version = $2",
            &[&broken.id.0, &last.version],
        )
        .await?;
    let job = app
        .db
        .platform(async |c| {
            let job = plinth_jobs::NewJob {
                max_attempts: 1,
                ..plinth_jobs::NewJob::new(plinth_admin::console::operations::MIGRATE_ALL_JOB, serde_json::json!({}))
            };
            Ok::<_, plinth_http::ApiError>(plinth_jobs::enqueue(c, job).await?)
        })
        .await?
        .ok_or("the job was not queued")?;
    let job_id = job.to_string();
    let job_status = "SELECT status FROM public.jobs WHERE id::text = $1";
    eventually(Duration::from_secs(30), || async { Ok(one(&testdb, job_status, &job_id).await? == "dead") }).await?;
    // The operator's fix: the half-applied migration's own down script.
    client
        .batch_execute(&format!("BEGIN; SET LOCAL search_path TO {}; {} COMMIT;", broken.schema.quoted(), last.down))
        .await?;

    // The browser.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    browser_script(
        "console.mjs",
        &[
            ("CONSOLE_URL", &app.url("")),
            ("OPERATOR_EMAIL", &ops.email),
            ("OPERATOR_PASSWORD", PASSWORD),
            ("TOTP_SECRET", &ops.secret),
            ("TENANT_SLUG", "acme-corp"),
            ("MEMBER_EMAIL", &sam_email),
            ("PARKED_EVENT", "evt_new_price"),
            ("DEAD_JOB", &job_id),
            ("SHOTS", shots.to_str().ok_or("the screenshot folder is not UTF-8")?),
        ],
    )
    .await?;
    for page in [
        "01-sign-in",
        "02-tenants",
        "03-tenant",
        "04-impersonation",
        "05-stripe-inbox",
        "06-jobs",
        "07-migrations",
        "08-mail",
        "09-admins",
        "10-operator-log",
    ] {
        assert!(shots.join(format!("{page}.png")).metadata()?.len() > 1000, "screenshot {page}");
    }

    // What the clicks did, as the database has it.
    let acme_now = tenant(&app, "acme-corp").await?;
    assert_eq!((acme_now.status.as_str(), acme_now.plan.as_str()), ("active", "enterprise"));
    assert_eq!(one(&testdb, status, "evt_new_price").await?, "processed");
    assert_eq!(tenant(&app, "globex").await?.plan, "pro", "the replayed event moved globex to pro");
    assert_eq!(one(&testdb, job_status, &job_id).await?, "done");
    let behind = testdb
        .client()
        .await?
        .query_one(
            "SELECT count(*) FROM public.tenant_migrations WHERE tenant_id = $1 AND version = $2",
            &[&broken.id.0, &last.version],
        )
        .await?
        .get::<_, i64>(0);
    assert_eq!(behind, 1, "broken-co is up to date");
    let trail: Vec<(String, Value)> = app
        .db
        .tenant(acme.scope(), async |c| {
            let entries =
                plinth_tenants::audit::read(c, plinth_tenants::audit::Filter { limit: 50, ..Default::default() })
                    .await?;
            Ok::<_, plinth_http::ApiError>(entries.into_iter().map(|e| (e.action, e.details)).collect())
        })
        .await?;
    let actions: Vec<&str> = trail.iter().map(|(a, _)| a.as_str()).collect();
    for action in ["tenant.suspended", "tenant.reactivated", "plan.changed", "impersonation.started"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    let started = trail.iter().find(|(a, _)| a == "impersonation.started").map(|(_, d)| d).ok_or("started")?;
    assert_eq!(started["reason"], "ticket 4711: the export button does nothing");
    worker.stop().await?;
    Ok(())
}

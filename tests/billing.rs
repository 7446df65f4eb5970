//! The Stripe webhook inbox: verified, stored once, acknowledged after the
//! commit; refused and not stored otherwise.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{AppOptions, TestApp, TestDb, TestResult, assert_error};
use crate::stripe::{event, now, object, signature, v1};

pub(crate) const SECRET: &str = "whsec_plinth_test_secret";
const OLD_SECRET: &str = "whsec_plinth_previous_secret";

async fn app() -> TestResult<(TestApp, TestDb)> {
    let testdb = TestDb::migrated().await?;
    let app = TestApp::spawn_on(
        &testdb,
        AppOptions {
            settings: vec![("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_plinth_test_secret, whsec_plinth_previous_secret")],
            ..Default::default()
        },
    )
    .await?;
    Ok((app, testdb))
}

pub(crate) async fn post(app: &TestApp, body: &str, signature: Option<&str>) -> TestResult<reqwest::Response> {
    let mut req =
        app.http.request(Method::POST, app.url("/v1/webhooks/stripe")).header("content-type", "application/json");
    if let Some(signature) = signature {
        req = req.header("stripe-signature", signature);
    }
    Ok(req.body(body.to_owned()).send().await?)
}

async fn stored(testdb: &TestDb) -> TestResult<Vec<(String, String, i32, Option<String>, String)>> {
    let client = testdb.client().await?;
    let rows = client
        .query(
            "SELECT id, status, duplicates, parked_reason, payload FROM public.stripe_events ORDER BY received_at",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect())
}

fn subscription_event(id: &str) -> String {
    let mut sub = object("subscription");
    sub["id"] = json!("sub_plinth_1");
    event(id, "customer.subscription.updated", now(), sub).to_string()
}

#[tokio::test]
async fn a_signed_event_is_stored_once_and_a_redelivery_acknowledged() -> TestResult {
    let (app, testdb) = app().await?;
    let body = subscription_event("evt_plinth_1");
    let res = post(&app, &body, Some(&signature(&body, SECRET, now()))).await?;
    assert_eq!(res.status(), 200);
    let answer: Value = res.json().await?;
    assert_eq!((answer["id"].as_str(), answer["duplicate"].as_bool()), (Some("evt_plinth_1"), Some(false)));
    // Acknowledged after the commit: the row is there, byte for byte.
    let rows = stored(&testdb).await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str(), rows[0].4.as_str()),
        ("evt_plinth_1", "received", body.as_str())
    );

    // Stripe delivers it again (a new signature, the same event).
    let res = post(&app, &body, Some(&signature(&body, SECRET, now()))).await?;
    let answer: Value = res.json().await?;
    assert_eq!(answer["duplicate"], true);
    let rows = stored(&testdb).await?;
    assert_eq!((rows.len(), rows[0].2), (1, 1), "still one row, one duplicate counted");
    Ok(())
}

#[tokio::test]
async fn bad_missing_and_stale_signatures_are_refused_and_nothing_is_stored() -> TestResult {
    let (app, testdb) = app().await?;
    let body = subscription_event("evt_plinth_2");
    // Each header is signed when it is sent. The timestamps keep 30 s from
    // the 300 s tolerance, so a slow machine cannot move them across it
    // between signing and receiving; `webhook::tests` checks the boundary
    // itself to the second against a fixed clock.
    type Header<'a> = Box<dyn Fn() -> Option<String> + 'a>;
    let cases: [(&str, Header); 7] = [
        ("wrong secret", Box::new(|| Some(signature(&body, "whsec_someone_else", now())))),
        ("another body", Box::new(|| Some(signature(&subscription_event("evt_other"), SECRET, now())))),
        ("no v1", Box::new(|| Some(format!("t={}", now())))),
        ("garbage", Box::new(|| Some("nonsense".to_owned()))),
        ("stale: 330 s old", Box::new(|| Some(signature(&body, SECRET, now() - 330)))),
        ("from the future: 330 s ahead", Box::new(|| Some(signature(&body, SECRET, now() + 330)))),
        ("missing", Box::new(|| None)),
    ];
    for (why, header) in cases {
        let res = post(&app, &body, header().as_deref()).await?;
        assert_eq!(res.status(), 400, "{why}");
        assert_error(res, 400, "invalid_request").await?;
    }
    // A body changed after signing.
    let tampered = body.replace("sub_plinth_1", "sub_plinth_9");
    assert_eq!(post(&app, &tampered, Some(&signature(&body, SECRET, now()))).await?.status(), 400);
    assert!(stored(&testdb).await?.is_empty());
    // 270 s old is still within the tolerance.
    assert_eq!(post(&app, &body, Some(&signature(&body, SECRET, now() - 270))).await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn secrets_rotate_without_losing_events() -> TestResult {
    let (app, testdb) = app().await?;
    let t = now();
    // The previous endpoint secret is still accepted while both are configured.
    let body = subscription_event("evt_plinth_3");
    assert_eq!(post(&app, &body, Some(&signature(&body, OLD_SECRET, t))).await?.status(), 200);
    // During a roll Stripe signs with several secrets: any matching v1 counts.
    let body = subscription_event("evt_plinth_4");
    let header = format!("t={t},v1={},v1={}", v1(&body, "whsec_retired", t), v1(&body, SECRET, t));
    assert_eq!(post(&app, &body, Some(&header)).await?.status(), 200);
    assert_eq!(stored(&testdb).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_signed_body_that_is_not_an_event_is_kept_parked() -> TestResult {
    let (app, testdb) = app().await?;
    let t = now();
    let malformed = r#"{"id": "evt_plinth_5", "object": "event", "type": "customer.subscription.updated", "data": "#;
    let res = post(&app, malformed, Some(&signature(malformed, SECRET, t))).await?;
    assert_eq!(res.status(), 200, "signed: acknowledged, so Stripe stops retrying");
    // An event whose object is not what its type says.
    let wrong =
        event("evt_plinth_6", "customer.subscription.updated", t, json!({ "id": "sub_x", "object": "nonsense" }))
            .to_string();
    assert_eq!(post(&app, &wrong, Some(&signature(&wrong, SECRET, t))).await?.status(), 200);
    let rows = stored(&testdb).await?;
    assert_eq!(rows.len(), 2);
    let malformed_row = rows.iter().find(|r| r.4 == malformed).ok_or("the raw body is kept as received")?;
    assert_eq!(malformed_row.1, "parked", "{malformed_row:?}");
    assert!(malformed_row.3.as_deref().is_some_and(|r| !r.is_empty()));
    // An event envelope is queued for processing whatever its object looks
    // like (processing reads it by field, and parks it if it cannot).
    let wrong_row = rows.iter().find(|r| r.0 == "evt_plinth_6").ok_or("evt_plinth_6 stored")?;
    assert_eq!((wrong_row.1.as_str(), wrong_row.3.as_deref()), ("received", None));
    let jobs: i64 = testdb
        .client()
        .await?
        .query_one("SELECT count(*) FROM public.jobs WHERE kind = 'billing.event' AND dedup_key = 'evt_plinth_6'", &[])
        .await?
        .get(0);
    assert_eq!(jobs, 1);
    // Delivered again: recognised, still one row each.
    assert_eq!(post(&app, malformed, Some(&signature(malformed, SECRET, now()))).await?.status(), 200);
    assert_eq!(stored(&testdb).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn without_a_webhook_secret_billing_is_not_configured() -> TestResult {
    let app = TestApp::spawn().await?;
    let body = subscription_event("evt_plinth_7");
    let res = post(&app, &body, Some(&signature(&body, SECRET, now()))).await?;
    assert_error(res, 503, "billing_not_configured").await?;
    Ok(())
}

pub(crate) mod processing {
    use std::time::Duration;

    use reqwest::Method;
    use serde_json::Value;

    use super::{SECRET, post};
    use crate::harness::{AppOptions, TempDir, TestApp, TestDb, TestResult, eventually};
    use crate::mail_and_jobs::{Running, fast};
    use crate::smtp::SmtpServer;
    use crate::stripe::{StripeMock, checkout_session, event, invoice, now, signature, subscription};

    pub(crate) const PRO: &str = "price_plinth_pro";
    pub(crate) const ENTERPRISE: &str = "price_plinth_enterprise";

    pub(crate) struct Billing {
        pub(crate) app: TestApp,
        pub(crate) smtp: SmtpServer,
        _worker: Running,
        pub(crate) testdb: TestDb,
        /// The worker's settings (to start another worker like it).
        pub(crate) settings: plinth::config::Settings,
        _dir: TempDir,
    }

    pub(crate) async fn billing(grace_days: &'static str) -> TestResult<Billing> {
        billing_with(grace_days, None).await
    }

    /// With `api`, subscriptions are re-read from that stand-in Stripe.
    pub(crate) async fn billing_with(grace_days: &'static str, api: Option<&StripeMock>) -> TestResult<Billing> {
        billing_polling(grace_days, api, fast(), Vec::new()).await
    }

    /// With more settings (`PLINTH_STRIPE_MODE`, ...).
    pub(crate) async fn billing_setting(
        grace_days: &'static str,
        api: Option<&StripeMock>,
        more: Vec<(&'static str, &'static str)>,
    ) -> TestResult<Billing> {
        billing_polling(grace_days, api, fast(), more).await
    }

    async fn billing_polling(
        grace_days: &'static str,
        api: Option<&StripeMock>,
        worker: plinth_jobs::WorkerConfig,
        more: Vec<(&'static str, &'static str)>,
    ) -> TestResult<Billing> {
        let testdb = TestDb::migrated().await?;
        let mut stripe = vec![
            ("PLINTH_STRIPE_WEBHOOK_SECRET", SECRET),
            ("PLINTH_STRIPE_PRICE_PRO", PRO),
            ("PLINTH_STRIPE_PRICE_ENTERPRISE", ENTERPRISE),
            ("PLINTH_BILLING_GRACE_DAYS", grace_days),
        ];
        stripe.extend(more);
        if let Some(api) = api {
            stripe.push(("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth"));
            stripe.push(("PLINTH_STRIPE_API_BASE", Box::leak(api.url.clone().into_boxed_str())));
        }
        let app = TestApp::spawn_on(&testdb, AppOptions { settings: stripe.clone(), ..Default::default() }).await?;
        let smtp = SmtpServer::start().await?;
        let dir = TempDir::new("billing")?;
        let mut values: std::collections::HashMap<String, String> =
            stripe.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        values.insert("PLINTH_SMTP_URL".into(), smtp.url());
        values.insert("PLINTH_MAIL_FROM".into(), "Plinth <noreply@plinth.test>".into());
        values.insert("PLINTH_DATA_DIR".into(), dir.path.display().to_string());
        let settings = plinth::config::Settings::from_values(&values)?;
        let worker = Running::mail(&testdb, &settings, worker)?;
        Ok(Billing { app, smtp, _worker: worker, testdb, settings, _dir: dir })
    }

    impl Billing {
        /// Delivers an event as Stripe would, and then again (Stripe
        /// delivers at least once): every test sees every event twice.
        pub(crate) async fn deliver(&self, id: &str, kind: &str, created: i64, object: Value) -> TestResult {
            let body = event(id, kind, created, object).to_string();
            for duplicate in [false, true] {
                let res = post(&self.app, &body, Some(&signature(&body, SECRET, now()))).await?;
                assert_eq!(res.status(), 200, "{kind}");
                let answer: Value = res.json().await?;
                assert_eq!(answer["duplicate"], duplicate, "{kind}");
            }
            Ok(())
        }

        pub(crate) async fn plan(&self, slug: &str) -> TestResult<String> {
            let body: Value = self.app.req(Method::GET, slug, "/v1/tenant").send().await?.json().await?;
            Ok(body["plan"].as_str().unwrap_or_default().to_owned())
        }

        pub(crate) async fn plan_becomes(&self, slug: &str, plan: &str) -> TestResult {
            eventually(Duration::from_secs(10), || async { Ok(self.plan(slug).await? == plan) }).await?;
            Ok(())
        }

        pub(crate) async fn event_status(&self, id: &str) -> TestResult<(String, Option<String>)> {
            let row = self
                .testdb
                .client()
                .await?
                .query_one("SELECT status, parked_reason FROM public.stripe_events WHERE id = $1", &[&id])
                .await?;
            Ok((row.get(0), row.get(1)))
        }

        pub(crate) async fn processed(&self, id: &str) -> TestResult {
            eventually(Duration::from_secs(10), || async { Ok(self.event_status(id).await?.0 == "processed") }).await?;
            Ok(())
        }

        pub(crate) fn mails_to(&self, template_words: &str) -> usize {
            self.smtp.accepted().iter().filter(|m| m.contains(template_words)).count()
        }
    }

    #[tokio::test]
    async fn checkout_subscription_payment_failure_and_cancellation_move_the_plan() -> TestResult {
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        let audit = || b.app.req(Method::GET, "acme", "/v1/audit-log").send();
        assert_eq!(audit().await?.status(), 402, "free: no audit log");
        let t = now() - 100;
        b.deliver(
            "evt_checkout",
            "checkout.session.completed",
            t,
            checkout_session(&acme.id.to_string(), "cus_acme", "sub_acme"),
        )
        .await?;
        b.deliver(
            "evt_created",
            "customer.subscription.created",
            t + 1,
            subscription("sub_acme", "cus_acme", "active", PRO),
        )
        .await?;
        b.plan_becomes("acme", "pro").await?;
        assert_eq!(audit().await?.status(), 200, "pro features on");

        // A failed payment: the owner is told once, however often Stripe delivers it.
        b.deliver("evt_failed", "invoice.payment_failed", t + 2, invoice("in_1", "cus_acme")).await?;
        b.processed("evt_failed").await?;
        b.deliver(
            "evt_trial",
            "customer.subscription.trial_will_end",
            t + 2,
            subscription("sub_acme", "cus_acme", "active", PRO),
        )
        .await?;
        b.processed("evt_trial").await?;
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("payment") >= 1) }).await?;
        // Past due: the plan holds during the grace period.
        b.deliver(
            "evt_past_due",
            "customer.subscription.updated",
            t + 3,
            subscription("sub_acme", "cus_acme", "past_due", PRO),
        )
        .await?;
        b.processed("evt_past_due").await?;
        assert_eq!(b.plan("acme").await?, "pro");

        // Upgraded to enterprise, then cancelled.
        b.deliver(
            "evt_upgrade",
            "customer.subscription.updated",
            t + 4,
            subscription("sub_acme", "cus_acme", "active", ENTERPRISE),
        )
        .await?;
        b.plan_becomes("acme", "enterprise").await?;
        assert_eq!(b.app.req(Method::GET, "acme", "/v1/export").send().await?.status(), 200);
        b.deliver(
            "evt_deleted",
            "customer.subscription.deleted",
            t + 5,
            subscription("sub_acme", "cus_acme", "canceled", ENTERPRISE),
        )
        .await?;
        b.plan_becomes("acme", "free").await?;
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("cancel") >= 1) }).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(b.mails_to("Payment failed for acme"), 1, "one payment-failed mail");
        assert_eq!(b.mails_to("trial ends on"), 1, "one trial-ending mail");
        assert_eq!(b.mails_to("subscription was cancelled"), 1, "one cancellation mail");
        // Every change is in the tenant's audit log.
        b.app.set_plan("acme", "pro").await?;
        let log: Value = audit().await?.json().await?;
        let by_stripe = log["data"]
            .as_array()
            .map(|a| a.iter().filter(|e| e["action"] == "plan.changed" && e["details"]["by"] == "stripe").count());
        assert_eq!(by_stripe, Some(3), "{log}");
        Ok(())
    }

    #[tokio::test]
    async fn the_inbox_wakes_the_worker_instead_of_leaving_events_to_its_poll() -> TestResult {
        // A worker that would poll only every 30 s.
        let slow = plinth_jobs::WorkerConfig { poll_interval: Duration::from_secs(30), ..fast() };
        let b = billing_polling("7", None, slow, Vec::new()).await?;
        let acme = b.app.create_tenant("acme").await?;
        // The worker hears wake-ups only once its LISTEN is in place: wait
        // for it (it polls every 30 s, so a missed wake-up would fail below).
        let client = b.testdb.client().await?;
        eventually(Duration::from_secs(10), || async {
            let listening: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND query LIKE '%LISTEN \"plinth_jobs\"%'",
                    &[],
                )
                .await?
                .get(0);
            Ok(listening >= 1)
        })
        .await?;
        let t = now() - 100;
        b.deliver("evt_w1", "checkout.session.completed", t, checkout_session(&acme.id.to_string(), "cus_w", "sub_w"))
            .await?;
        b.deliver("evt_w2", "customer.subscription.created", t + 1, subscription("sub_w", "cus_w", "active", PRO))
            .await?;
        // Two events 0 ms apart: the second is covered by the trailing wake.
        // Well within the 30 s poll, however busy the machine.
        let took = eventually(Duration::from_secs(10), || async { Ok(b.plan("acme").await? == "pro") }).await?;
        eprintln!("plan changed {took:?} after the last delivery");
        Ok(())
    }

    #[tokio::test]
    async fn late_and_reordered_events_cannot_roll_a_subscription_back() -> TestResult {
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        // The newest state arrives first, the older ones after it.
        b.deliver(
            "evt_new",
            "customer.subscription.updated",
            t + 20,
            subscription("sub_r", "cus_r", "active", ENTERPRISE),
        )
        .await?;
        b.deliver(
            "evt_link",
            "checkout.session.completed",
            t,
            checkout_session(&acme.id.to_string(), "cus_r", "sub_r"),
        )
        .await?;
        b.plan_becomes("acme", "enterprise").await?;
        b.deliver("evt_old", "customer.subscription.created", t + 1, subscription("sub_r", "cus_r", "active", PRO))
            .await?;
        b.deliver(
            "evt_older",
            "customer.subscription.updated",
            t + 10,
            subscription("sub_r", "cus_r", "canceled", PRO),
        )
        .await?;
        b.processed("evt_old").await?;
        b.processed("evt_older").await?;
        assert_eq!(b.plan("acme").await?, "enterprise", "older events were recorded, not applied");
        Ok(())
    }

    #[tokio::test]
    async fn unknown_prices_and_customers_are_parked_not_guessed() -> TestResult {
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        // No tenant is linked to this customer yet: parked, then applied once
        // the checkout that links it arrives.
        b.deliver("evt_early", "customer.subscription.created", t + 1, subscription("sub_u", "cus_u", "active", PRO))
            .await?;
        eventually(Duration::from_secs(10), || async { Ok(b.event_status("evt_early").await?.0 == "parked") }).await?;
        let (_, reason) = b.event_status("evt_early").await?;
        assert!(reason.is_some_and(|r| r.contains("unknown customer")));
        b.deliver(
            "evt_link",
            "checkout.session.completed",
            t,
            checkout_session(&acme.id.to_string(), "cus_u", "sub_u"),
        )
        .await?;
        b.plan_becomes("acme", "pro").await?;
        b.processed("evt_early").await?;

        // A price no plan names: parked with the reason, the plan unchanged.
        b.deliver(
            "evt_price",
            "customer.subscription.updated",
            t + 2,
            subscription("sub_u", "cus_u", "active", "price_mystery"),
        )
        .await?;
        eventually(Duration::from_secs(10), || async { Ok(b.event_status("evt_price").await?.0 == "parked") }).await?;
        let (_, reason) = b.event_status("evt_price").await?;
        assert!(reason.is_some_and(|r| r.contains("unknown price price_mystery")));
        assert_eq!(b.plan("acme").await?, "pro");
        Ok(())
    }

    pub(crate) async fn cli(b: &Billing, args: &[&str], env: &[(&str, &str)]) -> TestResult<(bool, String)> {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(args)
            .env("DATABASE_URL", &b.testdb.url)
            .envs(env.iter().copied())
            .output()
            .await?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    #[tokio::test]
    async fn parked_events_are_listed_and_replayed_once_the_cause_is_fixed() -> TestResult {
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        b.deliver(
            "evt_link",
            "checkout.session.completed",
            t,
            checkout_session(&acme.id.to_string(), "cus_p", "sub_p"),
        )
        .await?;
        b.deliver(
            "evt_team",
            "customer.subscription.created",
            t + 1,
            subscription("sub_p", "cus_p", "active", "price_new"),
        )
        .await?;
        eventually(Duration::from_secs(10), || async { Ok(b.event_status("evt_team").await?.0 == "parked") }).await?;
        let (ok, listed) = cli(&b, &["billing", "events", "--parked"], &[]).await?;
        assert!(ok && listed.contains("evt_team") && listed.contains("unknown price price_new"), "{listed}");
        assert!(!listed.contains("evt_link"), "only parked events: {listed}");
        // Replaying without a fix parks it again (and says so).
        let (ok, out) = cli(&b, &["billing", "replay", "evt_team"], &[]).await?;
        assert!(!ok, "{out}");
        // The operator maps the new price to pro, then replays.
        let (ok, out) =
            cli(&b, &["billing", "replay", "evt_team"], &[("PLINTH_STRIPE_PRICE_PRO", "price_new")]).await?;
        assert!(ok && out.contains("Applied"), "{out}");
        b.plan_becomes("acme", "pro").await?;
        assert_eq!(b.event_status("evt_team").await?.0, "processed");
        let (ok, out) = cli(&b, &["billing", "replay", "evt_missing"], &[]).await?;
        assert!(!ok, "{out}");
        Ok(())
    }

    #[tokio::test]
    async fn with_stripe_configured_events_apply_what_stripe_has_now() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        // The owner checks out; Stripe then reports the session completed
        // and the subscription, for the customer Plinth created.
        let res = b
            .app
            .req(Method::POST, "acme", "/v1/billing/checkout")
            .json(&serde_json::json!({ "plan": "pro" }))
            .send()
            .await?;
        assert_eq!(res.status(), 200);
        let customer = stripe
            .requests()
            .into_iter()
            .find(|r| r.path == "/v1/checkout/sessions")
            .and_then(|r| r.field("customer").map(str::to_owned))
            .ok_or("no checkout session")?;
        assert_eq!(b.app.req(Method::GET, "acme", "/v1/audit-log").send().await?.status(), 402);
        stripe.set_subscription(subscription("sub_live", &customer, "active", PRO));
        let session = checkout_session(&acme.id.to_string(), &customer, "sub_live");
        b.deliver("evt_link", "checkout.session.completed", t, session).await?;
        // The event's own payload is out of date; Stripe's answer counts.
        let stale = subscription("sub_live", &customer, "canceled", PRO);
        b.deliver("evt_stale", "customer.subscription.created", t + 1, stale).await?;
        b.plan_becomes("acme", "pro").await?;
        assert_eq!(b.app.req(Method::GET, "acme", "/v1/audit-log").send().await?.status(), 200);
        let sub: Value = b.app.req(Method::GET, "acme", "/v1/billing/subscription").send().await?.json().await?;
        assert_eq!((sub["plan"].as_str(), sub["status"].as_str()), (Some("pro"), Some("active")));
        assert!(stripe.requests().iter().any(|r| r.method == "GET" && r.path == "/v1/subscriptions/sub_live"));

        // Stripe down while processing: the event waits, then completes.
        stripe.set_down(true);
        stripe.set_subscription(subscription("sub_live", &customer, "active", ENTERPRISE));
        b.deliver(
            "evt_up",
            "customer.subscription.updated",
            t + 2,
            subscription("sub_live", &customer, "active", ENTERPRISE),
        )
        .await?;
        eventually(Duration::from_secs(20), || async { Ok(b.event_status("evt_up").await?.0 == "parked") }).await?;
        assert!(b.event_status("evt_up").await?.1.is_some_and(|r| r.contains("Stripe unavailable")));
        assert_eq!(b.plan("acme").await?, "pro");
        stripe.set_down(false);
        b.plan_becomes("acme", "enterprise").await?;
        b.processed("evt_up").await?;
        Ok(())
    }

    #[tokio::test]
    async fn sync_repairs_drift_from_what_stripe_has() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        let globex = b.app.create_tenant("globex").await?;
        b.app.create_tenant_on("manual", "pro").await?;
        let t = now() - 100;
        // Links arrive; the subscription events were missed.
        b.deliver("evt_a", "checkout.session.completed", t, checkout_session(&acme.id.to_string(), "cus_a", "sub_a"))
            .await?;
        b.deliver("evt_g", "checkout.session.completed", t, checkout_session(&globex.id.to_string(), "cus_g", "sub_g"))
            .await?;
        b.processed("evt_a").await?;
        b.processed("evt_g").await?;
        // Drift: a plan billing set, for a subscription Stripe no longer has.
        b.testdb
            .client()
            .await?
            .execute("UPDATE public.tenants SET plan = 'pro', plan_source = 'billing' WHERE slug = 'globex'", &[])
            .await?;
        stripe.set_subscription(subscription("sub_a", "cus_a", "active", ENTERPRISE));
        let (ok, out) = cli(
            &b,
            &["billing", "sync"],
            &[
                ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth"),
                ("PLINTH_STRIPE_API_BASE", &stripe.url),
                ("PLINTH_STRIPE_PRICE_PRO", PRO),
                ("PLINTH_STRIPE_PRICE_ENTERPRISE", ENTERPRISE),
            ],
        )
        .await?;
        assert!(ok, "{out}");
        assert!(out.contains("2 customer(s) read, 2 plan(s) changed"), "{out}");
        b.plan_becomes("acme", "enterprise").await?;
        b.plan_becomes("globex", "free").await?;
        assert_eq!(b.plan("manual").await?, "pro", "no Stripe customer: an operator's plan stays");
        Ok(())
    }

    #[tokio::test]
    async fn a_past_due_subscription_restricts_the_tenant_on_its_plan_when_the_grace_ends() -> TestResult {
        let b = billing("0").await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        b.deliver(
            "evt_link",
            "checkout.session.completed",
            t,
            checkout_session(&acme.id.to_string(), "cus_g", "sub_g"),
        )
        .await?;
        b.deliver("evt_active", "customer.subscription.created", t + 1, subscription("sub_g", "cus_g", "active", PRO))
            .await?;
        b.plan_becomes("acme", "pro").await?;
        b.deliver("evt_due", "customer.subscription.updated", t + 2, subscription("sub_g", "cus_g", "past_due", PRO))
            .await?;
        let write = || b.app.req(Method::POST, "acme", "/v1/projects").json(&serde_json::json!({ "name": "p" })).send();
        eventually(Duration::from_secs(10), || async { Ok(write().await?.status() == 402) }).await?;
        assert_eq!(b.plan("acme").await?, "pro", "restricted on its plan, not moved to free");
        // Offline, a paid invoice of the subscription lifts it.
        let mut paid = invoice("in_g", "cus_g");
        paid["status"] = serde_json::json!("paid");
        paid["parent"] = serde_json::json!({ "type": "subscription_details",
            "subscription_details": { "metadata": {}, "subscription": "sub_g" } });
        b.deliver("evt_paid", "invoice.paid", t + 3, paid).await?;
        eventually(Duration::from_secs(10), || async { Ok(write().await?.status() == 201) }).await?;
        Ok(())
    }
}

mod api {
    use std::time::{Duration, Instant};

    use reqwest::Method;
    use serde_json::Value;

    use crate::harness::{AppOptions, TestApp, TestDb, TestResult, assert_error, member};
    use crate::stripe::StripeMock;
    use plinth_access::Role;

    async fn app(stripe: &StripeMock) -> TestResult<(TestApp, TestDb)> {
        let testdb = TestDb::migrated().await?;
        let url: &'static str = Box::leak(stripe.url.clone().into_boxed_str());
        let settings = vec![
            ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth"),
            ("PLINTH_STRIPE_API_BASE", url),
            ("PLINTH_STRIPE_PRICE_PRO", "price_plinth_pro"),
            ("PLINTH_PUBLIC_URL", "https://app.plinth.test"),
        ];
        let app = TestApp::spawn_on(&testdb, AppOptions { settings, ..Default::default() }).await?;
        Ok((app, testdb))
    }

    #[tokio::test]
    async fn checkout_creates_one_customer_and_a_subscription_session() -> TestResult {
        let stripe = StripeMock::start().await?;
        let (app, testdb) = app(&stripe).await?;
        let acme = app.create_tenant("acme").await?;
        let checkout = || {
            app.req(Method::POST, "acme", "/v1/billing/checkout")
                .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .json(&serde_json::json!({ "plan": "pro" }))
                .send()
        };
        // Two at once: Stripe sees the same idempotency key for the customer.
        let (a, b) = tokio::join!(checkout(), checkout());
        for res in [a?, b?] {
            assert_eq!(res.status(), 200);
            let body: Value = res.json().await?;
            assert!(body["url"].as_str().is_some_and(|u| u.starts_with("https://checkout.stripe.test/")), "{body}");
        }
        let requests = stripe.requests();
        let customers: Vec<_> = requests.iter().filter(|r| r.path == "/v1/customers").collect();
        assert!(!customers.is_empty());
        let key = format!("plinth-customer-{}", acme.id);
        assert!(customers.iter().all(|r| r.idempotency_key.as_deref() == Some(key.as_str())), "{customers:?}");
        assert!(customers.iter().all(|r| r.field("metadata[tenant_id]") == Some(&acme.id.to_string()[..])));
        assert_eq!(customers[0].authorization.as_deref(), Some("Bearer sk_test_plinth"));
        // The API version async-stripe's types are generated for.
        assert!(requests.iter().all(|r| r.stripe_version.as_deref() == Some("2026-09-30.endive")), "{requests:?}");
        // No trace exporter in this process: a caller's trace is not passed on.
        assert!(requests.iter().all(|r| r.traceparent.is_none()));
        let linked: i64 = testdb
            .client()
            .await?
            .query_one("SELECT count(*) FROM public.billing_customers WHERE tenant_id = $1", &[&acme.id.0])
            .await?
            .get(0);
        assert_eq!(linked, 1, "one customer per tenant");
        let session = requests.iter().find(|r| r.path == "/v1/checkout/sessions").ok_or("no checkout session")?;
        assert_eq!(session.field("mode"), Some("subscription"));
        assert_eq!(session.field("client_reference_id"), Some(&acme.id.to_string()[..]));
        assert_eq!(session.field("line_items[0][price]"), Some("price_plinth_pro"));
        assert_eq!(session.field("line_items[0][quantity]"), Some("1"));
        assert!(session.field("customer").is_some_and(|c| c.starts_with("cus_mock_")));
        assert!(session.field("success_url").is_some_and(|u| u.starts_with("https://app.plinth.test/")));

        // The portal, for the same customer.
        let res = app.req(Method::POST, "acme", "/v1/billing/portal").send().await?;
        assert_eq!(res.status(), 200);
        let portal =
            stripe.requests().into_iter().find(|r| r.path == "/v1/billing_portal/sessions").ok_or("no portal")?;
        assert_eq!(portal.field("customer"), session.field("customer"));

        // A plan without a price, and only owners.
        let res = app
            .req(Method::POST, "acme", "/v1/billing/checkout")
            .json(&serde_json::json!({ "plan": "free" }))
            .send()
            .await?;
        assert_error(res, 400, "invalid_request").await?;
        let admin = member(&app.db, &acme, Role::Admin).await?;
        let res = app
            .http
            .post(app.url("/v1/billing/checkout"))
            .bearer_auth(admin)
            .header("x-tenant", "acme")
            .json(&serde_json::json!({ "plan": "pro" }))
            .send()
            .await?;
        assert_error(res, 403, "forbidden").await?;
        let sub: Value = app.req(Method::GET, "acme", "/v1/billing/subscription").send().await?.json().await?;
        assert_eq!((sub["plan"].as_str(), sub["status"].as_null()), (Some("free"), Some(())));
        Ok(())
    }

    #[tokio::test]
    async fn stripe_down_is_503_fast_and_the_breaker_stops_calling() -> TestResult {
        let stripe = StripeMock::start().await?;
        let (app, _db) = app(&stripe).await?;
        app.create_tenant("acme").await?;
        stripe.set_down(true);
        let checkout = || {
            app.req(Method::POST, "acme", "/v1/billing/checkout")
                .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .json(&serde_json::json!({ "plan": "pro" }))
                .send()
        };
        for _ in 0..5 {
            let started = Instant::now();
            assert_error(checkout().await?, 503, "unavailable").await?;
            assert!(started.elapsed() < Duration::from_secs(5), "fast: {:?}", started.elapsed());
        }
        let calls = stripe.requests().len();
        // Open: the next ones do not reach Stripe at all.
        for _ in 0..3 {
            assert_error(checkout().await?, 503, "unavailable").await?;
        }
        assert_eq!(stripe.requests().len(), calls, "the breaker held the calls back");
        Ok(())
    }

    #[tokio::test]
    async fn without_stripe_keys_billing_routes_say_so() -> TestResult {
        let app = TestApp::spawn().await?;
        app.create_tenant("acme").await?;
        let res = app
            .req(Method::POST, "acme", "/v1/billing/checkout")
            .json(&serde_json::json!({ "plan": "pro" }))
            .send()
            .await?;
        assert_error(res, 503, "billing_not_configured").await?;
        assert_error(app.req(Method::POST, "acme", "/v1/billing/portal").send().await?, 503, "billing_not_configured")
            .await?;
        Ok(())
    }
}

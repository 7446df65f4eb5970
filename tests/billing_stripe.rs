//! Billing against Stripe's documented behaviour: events in another API
//! version, several subscriptions per tenant, multi-item subscriptions,
//! deleted customers and tenants, Stripe's error classes and the breaker,
//! the subscription view while events wait, dunning mail, livemode,
//! metadata, and same-second ordering.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::billing::processing::{Billing, ENTERPRISE, PRO, billing, billing_setting, billing_with, cli};
use crate::billing::{SECRET, post};
use crate::harness::{TestResult, assert_error, eventually, platform_admin};
use crate::stripe::{StripeMock, checkout_session, event, invoice, now, signature, subscription};

/// A subscription with several items: `(item id, price)`.
fn with_items(id: &str, customer: &str, status: &str, prices: &[&str]) -> Value {
    let mut sub = subscription(id, customer, status, prices.first().copied().unwrap_or_default());
    let first = sub["items"]["data"][0].clone();
    let items: Vec<Value> = prices
        .iter()
        .enumerate()
        .map(|(n, price)| {
            let mut item = first.clone();
            item["id"] = json!(format!("si_{id}_{n}"));
            item["price"]["id"] = json!(price);
            item
        })
        .collect();
    sub["items"]["data"] = json!(items);
    sub
}

/// The same subscription as an endpoint on an older API version renders
/// it: the period on the subscription, none on its items, no
/// `billing_mode`.
fn old_version(mut sub: Value) -> Value {
    let end = sub["items"]["data"][0]["current_period_end"].clone();
    let start = sub["items"]["data"][0]["current_period_start"].clone();
    if let Some(object) = sub.as_object_mut() {
        object.remove("billing_mode");
        object.insert("current_period_end".into(), end);
        object.insert("current_period_start".into(), start);
    }
    for item in sub["items"]["data"].as_array_mut().into_iter().flatten() {
        if let Some(item) = item.as_object_mut() {
            item.remove("current_period_end");
            item.remove("current_period_start");
        }
    }
    sub
}

impl Billing {
    /// Delivers a whole event body as Stripe would.
    pub(crate) async fn deliver_body(&self, body: &Value) -> TestResult {
        let body = body.to_string();
        let res = post(&self.app, &body, Some(&signature(&body, SECRET, now()))).await?;
        assert_eq!(res.status(), 200);
        Ok(())
    }

    pub(crate) async fn link(&self, tenant: &plinth_tenants::Tenant, customer: &str, t: i64) -> TestResult {
        let id = format!("evt_link_{customer}");
        self.deliver(&id, "checkout.session.completed", t, checkout_session(&tenant.id.to_string(), customer, "sub_x"))
            .await?;
        self.processed(&id).await
    }

    pub(crate) async fn parked_with(&self, id: &str) -> TestResult<String> {
        eventually(Duration::from_secs(20), || async { Ok(self.event_status(id).await?.0 == "parked") }).await?;
        Ok(self.event_status(id).await?.1.unwrap_or_default())
    }

    pub(crate) async fn view(&self, slug: &str) -> TestResult<Value> {
        Ok(self.app.req(Method::GET, slug, "/v1/billing/subscription").send().await?.json().await?)
    }

    pub(crate) async fn sql_one<T: for<'a> tokio_postgres::types::FromSql<'a>>(&self, sql: &str) -> TestResult<T> {
        Ok(self.testdb.client().await?.query_one(sql, &[]).await?.get(0))
    }
}

#[tokio::test]
async fn an_event_in_an_older_api_version_is_applied_replayable_and_its_version_recorded() -> TestResult {
    let b = billing("7").await?;
    let acme = b.app.create_tenant("acme").await?;
    let t = now() - 100;
    b.link(&acme, "cus_v", t).await?;
    let mut body = event(
        "evt_old_version",
        "customer.subscription.created",
        t + 1,
        old_version(subscription("sub_v", "cus_v", "active", PRO)),
    );
    body["api_version"] = json!("2024-06-20");
    b.deliver_body(&body).await?;
    b.plan_becomes("acme", "pro").await?;
    b.processed("evt_old_version").await?;
    let version: Option<String> =
        b.sql_one("SELECT api_version FROM public.stripe_events WHERE id = 'evt_old_version'").await?;
    assert_eq!(version.as_deref(), Some("2024-06-20"));
    let period: Option<chrono::DateTime<chrono::Utc>> =
        b.sql_one("SELECT current_period_end FROM public.subscriptions WHERE id = 'sub_v'").await?;
    assert!(period.is_some(), "the period is read from the subscription in the older shape");
    // Replay reads the stored envelope the same way.
    let (ok, out) = cli(&b, &["billing", "replay", "evt_old_version"], &[("PLINTH_STRIPE_PRICE_PRO", PRO)]).await?;
    assert!(ok, "{out}");
    Ok(())
}

#[tokio::test]
async fn the_plan_is_the_best_of_the_live_subscriptions_and_free_only_when_none_is_left() -> TestResult {
    let b = billing("7").await?;
    let acme = b.app.create_tenant("acme").await?;
    let t = now() - 100;
    b.link(&acme, "cus_m", t).await?;
    b.deliver("evt_pro", "customer.subscription.created", t + 1, subscription("sub_pro", "cus_m", "active", PRO))
        .await?;
    b.plan_becomes("acme", "pro").await?;
    b.deliver(
        "evt_ent",
        "customer.subscription.created",
        t + 2,
        subscription("sub_ent", "cus_m", "active", ENTERPRISE),
    )
    .await?;
    b.plan_becomes("acme", "enterprise").await?;
    // The old pro subscription ends: enterprise is still paid for.
    b.deliver("evt_pro_end", "customer.subscription.deleted", t + 3, subscription("sub_pro", "cus_m", "canceled", PRO))
        .await?;
    b.processed("evt_pro_end").await?;
    assert_eq!(b.plan("acme").await?, "enterprise");
    let view = b.view("acme").await?;
    let live: Vec<&str> =
        view["subscriptions"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!((live, view["subscription"].as_str()), (vec!["sub_ent"], Some("sub_ent")), "{view}");
    // The last one ends: free, and one cancellation mail (none for the first).
    b.deliver(
        "evt_ent_end",
        "customer.subscription.deleted",
        t + 4,
        subscription("sub_ent", "cus_m", "canceled", ENTERPRISE),
    )
    .await?;
    b.plan_becomes("acme", "free").await?;
    eventually(Duration::from_secs(10), || async { Ok(b.mails_to("subscription was cancelled") >= 1) }).await?;
    assert_eq!(b.mails_to("subscription was cancelled"), 1);
    assert!(b.mails_to("the enterprise subscription") == 1 && b.mails_to("the pro subscription") == 0);
    Ok(())
}

#[tokio::test]
async fn only_items_with_a_known_price_count_and_the_best_one_wins() -> TestResult {
    let b = billing("7").await?;
    let acme = b.app.create_tenant("acme").await?;
    let t = now() - 100;
    b.link(&acme, "cus_i", t).await?;
    // An add-on first, then pro: pro.
    let sub = with_items("sub_i", "cus_i", "active", &["price_addon_support", PRO]);
    b.deliver("evt_items", "customer.subscription.created", t + 1, sub).await?;
    b.plan_becomes("acme", "pro").await?;
    // Pro and enterprise items: the better.
    let sub = with_items("sub_i", "cus_i", "active", &[PRO, "price_addon_support", ENTERPRISE]);
    b.deliver("evt_items2", "customer.subscription.updated", t + 2, sub).await?;
    b.plan_becomes("acme", "enterprise").await?;
    // Only add-ons: parked, the plan unchanged.
    let sub = with_items("sub_i", "cus_i", "active", &["price_addon_support", "price_addon_seats"]);
    b.deliver("evt_items3", "customer.subscription.updated", t + 3, sub).await?;
    let reason = b.parked_with("evt_items3").await?;
    assert!(reason.contains("unknown price price_addon_support, price_addon_seats"), "{reason}");
    assert_eq!(b.plan("acme").await?, "enterprise");
    // The subscription view says the tenant's events wait, and why.
    let view = b.view("acme").await?;
    assert!(view["pending"]["reason"].as_str().is_some_and(|r| r.contains("unknown price")), "{view}");
    assert_eq!(view["status"], "active", "{view}");
    // Another tenant sees none of it.
    b.app.create_tenant("globex").await?;
    let other = b.view("globex").await?;
    assert_eq!(
        (other["subscriptions"].clone(), other["pending"].clone(), other["status"].clone()),
        (json!([]), Value::Null, Value::Null),
        "{other}"
    );
    Ok(())
}

#[tokio::test]
async fn within_one_second_the_later_state_wins_whatever_the_arrival_order() -> TestResult {
    let b = billing("7").await?;
    let acme = b.app.create_tenant("acme").await?;
    let t = now() - 100;
    b.link(&acme, "cus_s", t).await?;
    let mut cancelling = subscription("sub_s", "cus_s", "active", PRO);
    cancelling["cancel_at"] = json!(t + 86_400 * 30);
    cancelling["pause_collection"] = json!({ "behavior": "void", "resumes_at": null });
    b.deliver("evt_active", "customer.subscription.updated", t + 5, cancelling).await?;
    b.plan_becomes("acme", "pro").await?;
    // The trial that preceded it, in the same second, arrives after it.
    b.deliver("evt_trial", "customer.subscription.updated", t + 5, subscription("sub_s", "cus_s", "trialing", PRO))
        .await?;
    b.deliver("evt_new", "customer.subscription.created", t + 5, subscription("sub_s", "cus_s", "incomplete", PRO))
        .await?;
    b.processed("evt_trial").await?;
    b.processed("evt_new").await?;
    let view = b.view("acme").await?;
    assert_eq!(view["status"], "active", "{view}");
    // cancel_at and pause_collection are kept and shown.
    assert!(view["cancel_at"].as_str().is_some(), "{view}");
    assert_eq!(view["subscriptions"][0]["pause_collection"]["behavior"], "void", "{view}");
    Ok(())
}

#[tokio::test]
async fn an_event_of_the_other_mode_is_parked_for_good() -> TestResult {
    let b = billing_setting("7", None, vec![("PLINTH_STRIPE_MODE", "live")]).await?;
    let acme = b.app.create_tenant("acme").await?;
    let t = now() - 100;
    // Test-mode events (livemode: false) for a live-mode server.
    b.deliver(
        "evt_test_mode",
        "checkout.session.completed",
        t,
        checkout_session(&acme.id.to_string(), "cus_l", "sub_l"),
    )
    .await?;
    let reason = b.parked_with("evt_test_mode").await?;
    assert!(reason.contains("test-mode event"), "{reason}");
    // Not retried: its job is dead at once.
    eventually(Duration::from_secs(10), || async {
        let status: String = b
            .sql_one("SELECT status FROM public.jobs WHERE kind = 'billing.event' AND dedup_key = 'evt_test_mode'")
            .await?;
        Ok(status == "dead")
    })
    .await?;
    let links: i64 = b.sql_one("SELECT count(*) FROM public.billing_customers").await?;
    assert_eq!(links, 0);
    Ok(())
}

mod dunning {
    use super::*;

    fn date(t: i64) -> String {
        chrono::DateTime::from_timestamp(t, 0).map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_default()
    }

    fn failed_invoice(id: &str, customer: &str, sub: &str, reason: &str) -> Value {
        let mut inv = invoice(id, customer);
        inv["status"] = json!("open");
        inv["billing_reason"] = json!(reason);
        inv["hosted_invoice_url"] = json!(format!("https://invoice.stripe.test/i/{id}"));
        inv["parent"] = json!({ "type": "subscription_details",
            "subscription_details": { "metadata": {}, "subscription": sub } });
        inv
    }

    #[tokio::test]
    async fn every_mail_of_one_episode_promises_the_downgrade_date_and_says_what_happened() -> TestResult {
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        let day = 86_400;
        let t = now() - 10 * day;
        b.link(&acme, "cus_d", t).await?;
        b.deliver("evt_on", "customer.subscription.created", t + 1, subscription("sub_d", "cus_d", "active", PRO))
            .await?;
        b.plan_becomes("acme", "pro").await?;
        b.deliver("evt_due", "customer.subscription.updated", t + 100, subscription("sub_d", "cus_d", "past_due", PRO))
            .await?;
        b.processed("evt_due").await?;
        // Stripe retries the payment three days later and fails again.
        let retry = failed_invoice("in_retry", "cus_d", "sub_d", "subscription_cycle");
        b.deliver("evt_retry_failed", "invoice.payment_failed", t + 100 + 3 * day, retry).await?;
        b.processed("evt_retry_failed").await?;
        let downgrade = date(t + 100 + 7 * day);
        let promised = date(t + 100 + 10 * day);
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("Payment failed for acme") == 1) }).await?;
        assert_eq!(b.mails_to(&format!("stays active until {downgrade}")), 1, "{:?}", b.smtp.accepted());
        assert_eq!(b.mails_to(&promised), 0);
        assert_eq!(b.mails_to("https://invoice.stripe.test/i/in_retry"), 1, "the invoice's own page");

        // The bank asks for authentication: its own words and link.
        let action = failed_invoice("in_auth", "cus_d", "sub_d", "subscription_cycle");
        b.deliver("evt_auth", "invoice.payment_action_required", t + 100 + 4 * day, action).await?;
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("Confirm the payment for acme") == 1) }).await?;
        assert_eq!(b.mails_to("https://invoice.stripe.test/i/in_auth"), 1);

        // Paid since (the subscription is active again after the failure
        // event): a late failure mail is not sent.
        b.deliver(
            "evt_paid",
            "customer.subscription.updated",
            t + 100 + 5 * day,
            subscription("sub_d", "cus_d", "active", PRO),
        )
        .await?;
        b.processed("evt_paid").await?;
        let late = failed_invoice("in_late", "cus_d", "sub_d", "subscription_cycle");
        b.deliver("evt_late_failure", "invoice.payment_failed", t + 100 + 4 * day, late).await?;
        b.processed("evt_late_failure").await?;
        assert_eq!(b.mails_to("in_late"), 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_new_subscriptions_first_failed_payment_says_it_has_not_started() -> TestResult {
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        b.link(&acme, "cus_f", t).await?;
        b.deliver("evt_inc", "customer.subscription.created", t + 1, subscription("sub_f", "cus_f", "incomplete", PRO))
            .await?;
        let first = failed_invoice("in_first", "cus_f", "sub_f", "subscription_create");
        b.deliver("evt_first_failed", "invoice.payment_failed", t + 2, first).await?;
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("has not started") == 1) }).await?;
        assert_eq!(b.mails_to("stays active"), 0);
        assert_eq!(b.mails_to("https://invoice.stripe.test/i/in_first"), 1);
        assert_eq!(b.plan("acme").await?, "free");
        Ok(())
    }
}

pub(crate) mod online {
    use super::*;

    pub(crate) fn stripe_env(stripe: &StripeMock) -> Vec<(&'static str, String)> {
        vec![
            ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth".to_owned()),
            ("PLINTH_STRIPE_API_BASE", stripe.url.clone()),
            ("PLINTH_STRIPE_PRICE_PRO", PRO.to_owned()),
            ("PLINTH_STRIPE_PRICE_ENTERPRISE", ENTERPRISE.to_owned()),
        ]
    }

    pub(crate) async fn checkout(b: &Billing, slug: &str, plan: &str) -> TestResult<reqwest::Response> {
        Ok(b.app.req(Method::POST, slug, "/v1/billing/checkout").json(&json!({ "plan": plan })).send().await?)
    }

    fn customer_of_last_checkout(stripe: &StripeMock) -> TestResult<String> {
        let session =
            stripe.requests().into_iter().rev().find(|r| r.path == "/v1/checkout/sessions" && r.method == "POST");
        Ok(session.and_then(|r| r.field("customer").map(str::to_owned)).ok_or("no checkout session")?)
    }

    #[tokio::test]
    async fn a_tenant_with_a_live_subscription_cannot_check_out_again() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        let customer = customer_of_last_checkout(&stripe)?;
        let form = stripe.requests().into_iter().rev().find(|r| r.path == "/v1/checkout/sessions").ok_or("session")?;
        assert_eq!(form.field("subscription_data[metadata][tenant_id]"), Some(&acme.id.to_string()[..]));
        // Paid, but the webhook has not arrived: Stripe's own list says so.
        stripe.set_subscription(subscription("sub_live", &customer, "active", PRO));
        assert_error(checkout(&b, "acme", "enterprise").await?, 409, "already_subscribed").await?;
        // And once it has.
        b.deliver(
            "evt_live",
            "customer.subscription.created",
            now(),
            subscription("sub_live", &customer, "active", PRO),
        )
        .await?;
        b.plan_becomes("acme", "pro").await?;
        assert_error(checkout(&b, "acme", "enterprise").await?, 409, "already_subscribed").await?;
        let sessions = stripe.requests().iter().filter(|r| r.path == "/v1/checkout/sessions").count();
        assert_eq!(sessions, 1, "no second subscription was opened");
        Ok(())
    }

    #[tokio::test]
    async fn sync_considers_every_subscription_and_leaves_an_operators_plan() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.app.create_tenant_on("manual", "enterprise").await?;
        let t = now() - 100;
        b.link(&acme, "cus_e", t).await?;
        // The newest subscription is cancelled; an older one is live.
        let mut old = subscription("sub_old", "cus_e", "active", PRO);
        old["created"] = json!(t - 1000);
        let mut new = subscription("sub_new", "cus_e", "canceled", ENTERPRISE);
        new["created"] = json!(t);
        stripe.set_subscription(old);
        stripe.set_subscription(new);
        // The operator's tenant opens the portal: Stripe now has a customer
        // for it, with no subscription.
        assert_eq!(b.app.req(Method::POST, "manual", "/v1/billing/portal").send().await?.status(), 200);
        let env = stripe_env(&stripe);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, out) = cli(&b, &["billing", "sync"], &env).await?;
        assert!(ok, "{out}");
        b.plan_becomes("acme", "pro").await?;
        assert_eq!(b.plan("manual").await?, "enterprise", "an operator's plan stays: {out}");
        Ok(())
    }

    #[tokio::test]
    async fn a_deleted_customer_is_unlinked_and_the_next_checkout_gets_a_new_one() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        let first = customer_of_last_checkout(&stripe)?;
        // Deleted in the Dashboard; the checkout comes before the event.
        stripe.delete_customer(&first);
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        let second = customer_of_last_checkout(&stripe)?;
        assert_ne!(first, second);
        let keys: Vec<String> = stripe
            .requests()
            .into_iter()
            .filter(|r| r.path == "/v1/customers" && r.method == "POST")
            .filter_map(|r| r.idempotency_key)
            .collect();
        assert!(keys.contains(&format!("plinth-customer-{}-1", acme.id)), "{keys:?}");
        // The portal follows the new customer.
        assert_eq!(b.app.req(Method::POST, "acme", "/v1/billing/portal").send().await?.status(), 200);
        // customer.deleted for the second: unlinked; the checkout after it
        // makes a third.
        stripe.delete_customer(&second);
        b.deliver(
            "evt_gone",
            "customer.deleted",
            now(),
            json!({ "id": second, "object": "customer", "deleted": true }),
        )
        .await?;
        b.processed("evt_gone").await?;
        let current: i64 = b.sql_one("SELECT count(*) FROM public.billing_customers WHERE detached_at IS NULL").await?;
        assert_eq!(current, 0);
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        let third = customer_of_last_checkout(&stripe)?;
        assert!(third != first && third != second);
        // A newer checkout for another customer replaces the link, and that
        // customer's subscription applies. Checkout made that customer,
        // without Plinth's metadata: if its subscription's event is
        // processed before the checkout's, it waits for it.
        stripe.add_customer("cus_dash", None);
        let t = now();
        b.deliver(
            "evt_relink",
            "checkout.session.completed",
            t,
            checkout_session(&acme.id.to_string(), "cus_dash", "sub_dash"),
        )
        .await?;
        stripe.set_subscription(subscription("sub_dash", "cus_dash", "active", PRO));
        b.deliver(
            "evt_dash",
            "customer.subscription.created",
            t + 1,
            subscription("sub_dash", "cus_dash", "active", PRO),
        )
        .await?;
        b.plan_becomes("acme", "pro").await?;
        b.processed("evt_dash").await?;
        Ok(())
    }

    #[tokio::test]
    async fn customers_are_found_by_metadata_before_one_is_created() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        let globex = b.app.create_tenant("globex").await?;
        // A customer Stripe already has for acme (an earlier install).
        stripe.add_customer("cus_existing", Some(&acme.id.to_string()));
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        assert_eq!(customer_of_last_checkout(&stripe)?, "cus_existing");
        assert!(!stripe.requests().iter().any(|r| r.path == "/v1/customers" && r.method == "POST"));
        // An event for a customer no link names: its metadata in Stripe
        // names globex.
        stripe.add_customer("cus_meta", Some(&globex.id.to_string()));
        stripe.set_subscription(subscription("sub_meta", "cus_meta", "active", ENTERPRISE));
        b.deliver(
            "evt_meta",
            "customer.subscription.created",
            now(),
            subscription("sub_meta", "cus_meta", "active", ENTERPRISE),
        )
        .await?;
        b.plan_becomes("globex", "enterprise").await?;
        assert_eq!(b.plan("acme").await?, "free", "acme's customers are not globex's");
        // An account Stripe does not offer search to: the customer is created.
        b.app.create_tenant("initech").await?;
        stripe.fail("GET", "/v1/customers/search", 400, 1);
        assert_eq!(checkout(&b, "initech", "pro").await?.status(), 200);
        assert!(stripe.requests().iter().any(|r| r.path == "/v1/customers" && r.method == "POST"));
        Ok(())
    }

    #[tokio::test]
    async fn deleting_a_tenant_cancels_its_subscriptions_or_does_not_delete() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let lobby = b.app.create_tenant("lobby").await?;
        let acme = b.app.create_tenant("acme").await?;
        let admin = platform_admin(&b.app, &lobby).await?;
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        let customer = customer_of_last_checkout(&stripe)?;
        stripe.set_subscription(subscription("sub_del", &customer, "active", PRO));
        b.deliver(
            "evt_del_on",
            "customer.subscription.created",
            now(),
            subscription("sub_del", &customer, "active", PRO),
        )
        .await?;
        b.plan_becomes("acme", "pro").await?;
        let delete = || {
            b.app
                .http
                .delete(b.app.url(&format!("/v1/admin/tenants/{}", acme.id)))
                .bearer_auth(&admin)
                .header("x-tenant", "lobby")
                .send()
        };
        // Stripe down: refused, nothing deleted.
        stripe.set_down(true);
        assert_error(delete().await?, 503, "unavailable").await?;
        assert_eq!(b.plan("acme").await?, "pro");
        stripe.set_down(false);
        assert_eq!(delete().await?.status(), 204);
        assert_eq!(stripe.subscription_now("sub_del").map(|s| s["status"].clone()), Some(json!("canceled")));
        let result: String = b
            .sql_one(&format!("SELECT result::text FROM public.billing_closures WHERE customer_id = '{customer}'"))
            .await?;
        let result: Value = serde_json::from_str(&result)?;
        assert_eq!(result["cancelled"], json!(["sub_del"]));
        // Stripe's event about the cancellation is recorded, not parked.
        b.deliver(
            "evt_after",
            "customer.subscription.deleted",
            now(),
            subscription("sub_del", &customer, "canceled", PRO),
        )
        .await?;
        b.processed("evt_after").await?;
        Ok(())
    }

    #[tokio::test]
    async fn stripe_refusals_park_for_good_with_stripes_message() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.link(&acme, "cus_404", now() - 100).await?;
        // Stripe has no such subscription (another account, another mode).
        b.deliver(
            "evt_404",
            "customer.subscription.created",
            now(),
            subscription("sub_nowhere", "cus_404", "active", PRO),
        )
        .await?;
        let reason = b.parked_with("evt_404").await?;
        assert!(reason.contains("404") && reason.contains("No such resource: 'sub_nowhere'"), "{reason}");
        assert!(!reason.contains("will retry"), "{reason}");
        // Not retried: its job died on its first attempt.
        eventually(Duration::from_secs(10), || async {
            let status: String = b
                .sql_one("SELECT status FROM public.jobs WHERE kind = 'billing.event' AND dedup_key = 'evt_404'")
                .await?;
            Ok(status == "dead")
        })
        .await?;
        let attempts: i32 = b
            .sql_one("SELECT attempts FROM public.jobs WHERE kind = 'billing.event' AND dedup_key = 'evt_404'")
            .await?;
        assert_eq!(attempts, 1);
        // A revoked key: 500 to the owner, and the breaker stays closed
        // (Stripe answered).
        let portal = || b.app.req(Method::POST, "globex", "/v1/billing/portal").send();
        b.app.create_tenant("globex").await?;
        assert_eq!(portal().await?.status(), 200);
        stripe.fail("POST", "/v1/billing_portal/sessions", 401, 6);
        for _ in 0..6 {
            assert_error(portal().await?, 500, "internal").await?;
        }
        assert_eq!(portal().await?.status(), 200);
        Ok(())
    }

    #[tokio::test]
    async fn rate_limits_and_concurrent_keys_are_retried_not_failed() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        b.app.create_tenant("acme").await?;
        // Two first checkouts at once: the customer creation's key is in
        // flight for one of them (409), which waits and gets the same customer.
        stripe.set_delay(Duration::from_millis(400));
        let (one, two) = tokio::join!(checkout(&b, "acme", "pro"), checkout(&b, "acme", "pro"));
        stripe.set_delay(Duration::ZERO);
        for res in [one?, two?] {
            assert_eq!(res.status(), 200, "{:?}", res.text().await);
        }
        let creations: Vec<_> = stripe.requests().into_iter().filter(|r| r.path == "/v1/customers").collect();
        let linked: i64 = b.sql_one("SELECT count(*) FROM public.billing_customers").await?;
        assert_eq!(linked, 1, "{creations:?}");
        // 429 once: retried, the owner never sees it.
        stripe.fail("POST", "/v1/billing_portal/sessions", 429, 1);
        let portal = || b.app.req(Method::POST, "acme", "/v1/billing/portal").send();
        // A portal session is made once (no key): a 429 is 503 with Retry-After.
        let res = portal().await?;
        assert_eq!(res.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
        assert_error(res, 503, "unavailable").await?;
        // Persistent 429s do not open the breaker: the next call reaches Stripe.
        stripe.fail("POST", "/v1/billing_portal/sessions", 429, 6);
        for _ in 0..6 {
            assert_error(portal().await?, 503, "unavailable").await?;
        }
        assert_eq!(portal().await?.status(), 200);
        // Reads retry a 429 by themselves.
        stripe.fail("GET", "/v1/subscriptions", 429, 1);
        let res = checkout(&b, "acme", "enterprise").await?;
        assert_eq!(res.status(), 200, "{:?}", res.text().await);
        Ok(())
    }

    #[tokio::test]
    async fn no_failure_mail_goes_out_for_an_invoice_stripe_has_since_seen_paid() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.link(&acme, "cus_inv", now() - 100).await?;
        for (id, now_status) in [("in_paid_since", "paid"), ("in_still_open", "open")] {
            let mut inv = invoice(id, "cus_inv");
            inv["status"] = json!("open");
            inv["billing_reason"] = json!("subscription_cycle");
            let mut current = inv.clone();
            current["status"] = json!(now_status);
            stripe.set_invoice(current);
            b.deliver(&format!("evt_{id}"), "invoice.payment_failed", now(), inv).await?;
            b.processed(&format!("evt_{id}")).await?;
        }
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("Payment failed for acme") == 1) }).await?;
        assert!(stripe.requests().iter().any(|r| r.path == "/v1/invoices/in_paid_since"));
        Ok(())
    }

    #[tokio::test]
    async fn a_half_open_breaker_lets_one_probe_through_and_closes_on_its_success() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_setting("7", Some(&stripe), vec![("PLINTH_STRIPE_BREAKER_SECS", "1")]).await?;
        b.app.create_tenant("acme").await?;
        let portal = || b.app.req(Method::POST, "acme", "/v1/billing/portal").send();
        assert_eq!(portal().await?.status(), 200, "the customer exists");
        stripe.set_down(true);
        for _ in 0..5 {
            assert_error(portal().await?, 503, "unavailable").await?;
        }
        // Open. Stripe comes back, slowly; once the second is over, ten
        // calls at once: one probes, nine fail fast.
        stripe.set_down(false);
        // The probe's answer takes long enough that the other nine are
        // surely sent while it is in flight, however busy the machine.
        stripe.set_delay(Duration::from_secs(3));
        // The breaker's open second, as configured.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = stripe.requests().len();
        let answers = futures_util::future::join_all((0..10).map(|_| portal())).await;
        let mut statuses: Vec<u16> = Vec::new();
        for res in answers {
            statuses.push(res?.status().as_u16());
        }
        statuses.sort_unstable();
        assert_eq!(stripe.requests().len() - before, 1, "{statuses:?}");
        assert_eq!(statuses, [200, 503, 503, 503, 503, 503, 503, 503, 503, 503]);
        // Closed by the probe's success.
        stripe.set_delay(Duration::ZERO);
        assert_eq!(portal().await?.status(), 200);
        Ok(())
    }
}

#[tokio::test]
async fn billing_jobs_with_a_malformed_payload_die_at_once_with_the_reason() -> TestResult {
    let b = billing("7").await?;
    let db = b.testdb.db(2)?;
    let bad = [
        ("billing.event", json!({})),
        ("billing.event", json!({ "id": 42 })),
        ("billing.grace", json!({ "subscription": "sub_x" })),
        ("billing.sync", json!({ "every": 60 })),
    ];
    for (kind, payload) in bad {
        db.platform(async |c| {
            plinth_jobs::enqueue(c, plinth_jobs::NewJob::new(kind, payload.clone())).await?;
            Ok::<_, plinth_http::ApiError>(())
        })
        .await?;
    }
    eventually(Duration::from_secs(20), || async {
        let dead: i64 = b.sql_one("SELECT count(*) FROM public.jobs WHERE status = 'dead' AND attempts = 1").await?;
        Ok(dead == 4)
    })
    .await?;
    let (ok, out) = cli(&b, &["jobs", "list", "--status", "dead"], &[]).await?;
    assert!(ok, "{out}");
    for field in ["no id in {}", "no id in {\"id\":42}", "no since in", "no every_secs in"] {
        assert!(out.contains(field), "{field}: {out}");
    }
    Ok(())
}

mod stripe_outside_transactions {
    use super::*;

    /// The stand-in Stripe's settings for the CLI.
    fn env(stripe: &StripeMock) -> [(&'static str, String); 4] {
        [
            ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth".to_owned()),
            ("PLINTH_STRIPE_API_BASE", stripe.url.clone()),
            ("PLINTH_STRIPE_PRICE_PRO", PRO.to_owned()),
            ("PLINTH_STRIPE_PRICE_ENTERPRISE", ENTERPRISE.to_owned()),
        ]
    }

    #[tokio::test]
    async fn a_slow_stripe_holds_no_transaction_and_no_lock() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.link(&acme, "cus_slow", now() - 100).await?;
        stripe.set_subscription(subscription("sub_slow", "cus_slow", "active", PRO));
        // Within the client's 5 s per attempt.
        stripe.slow_answers("/v1/subscriptions/sub_slow", Duration::from_secs(3));
        b.deliver(
            "evt_slow",
            "customer.subscription.created",
            now(),
            subscription("sub_slow", "cus_slow", "active", PRO),
        )
        .await?;
        // While Stripe takes its time over the re-read:
        eventually(Duration::from_secs(10), || async {
            Ok(stripe.requests().iter().any(|r| r.path == "/v1/subscriptions/sub_slow"))
        })
        .await?;
        // Other tests share the server: only this database's locks count.
        let (locks, open): (i64, i64) = {
            let client = b.testdb.client().await?;
            let this = "(SELECT oid FROM pg_database WHERE datname = current_database())";
            let locks = client
                .query_one(
                    &format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = {this}"),
                    &[],
                )
                .await?
                .get(0);
            // The event's row lock keeps its table locked until the
            // transaction ends.
            let open = client
                .query_one(
                    &format!(
                        "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation \
                         WHERE r.relname = 'stripe_events' AND l.database = {this} AND l.pid <> pg_backend_pid()"
                    ),
                    &[],
                )
                .await?
                .get(0);
            (locks, open)
        };
        assert_eq!((locks, open), (0, 0), "no customer lock and no open transaction while Stripe answers");
        b.plan_becomes("acme", "pro").await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_sync_that_read_stripe_before_an_event_does_not_roll_it_back() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.link(&acme, "cus_r", now() - 100).await?;
        stripe.set_subscription(subscription("sub_r", "cus_r", "active", PRO));
        b.deliver("evt_r1", "customer.subscription.created", now(), subscription("sub_r", "cus_r", "active", PRO))
            .await?;
        b.plan_becomes("acme", "pro").await?;
        // The sync reads the list (pro) and gets its answer only later...
        stripe.slow_answers("/v1/subscriptions", Duration::from_secs(4));
        let env = env(&stripe);
        let sync = tokio::process::Command::new(env!("CARGO_BIN_EXE_plinth"))
            .args(["billing", "sync"])
            .env("DATABASE_URL", &b.testdb.url)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output();
        let sync = tokio::spawn(sync);
        eventually(Duration::from_secs(20), || async {
            Ok(stripe.requests().iter().any(|r| r.path == "/v1/subscriptions" && r.method == "GET"))
        })
        .await?;
        // ...while the owner upgrades and the event is applied.
        stripe.set_subscription(subscription("sub_r", "cus_r", "active", ENTERPRISE));
        b.deliver(
            "evt_r2",
            "customer.subscription.updated",
            now(),
            subscription("sub_r", "cus_r", "active", ENTERPRISE),
        )
        .await?;
        b.plan_becomes("acme", "enterprise").await?;
        let out = sync.await??;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // From the registry itself: the API's view follows within a second.
        let plan: String = b.sql_one("SELECT plan FROM public.tenants WHERE slug = 'acme'").await?;
        assert_eq!(plan, "enterprise", "{}", String::from_utf8_lossy(&out.stdout));
        Ok(())
    }
}

#[tokio::test]
async fn a_payment_applied_while_the_grace_job_waits_for_the_customer_is_not_downgraded() -> TestResult {
    let b = billing("7").await?;
    let acme = b.app.create_tenant("acme").await?;
    let day = 86_400;
    b.link(&acme, "cus_gr", now() - 8 * day).await?;
    b.deliver(
        "evt_gr_on",
        "customer.subscription.created",
        now() - 8 * day,
        subscription("sub_gr", "cus_gr", "active", PRO),
    )
    .await?;
    // Past due since 7 days less 8 s: the grace ends (and its job runs) in 8 s.
    let since = now() - 7 * day + 8;
    b.deliver("evt_gr_due", "customer.subscription.updated", since, subscription("sub_gr", "cus_gr", "past_due", PRO))
        .await?;
    b.processed("evt_gr_due").await?;
    let registry_plan = || b.sql_one::<String>("SELECT plan FROM public.tenants WHERE slug = 'acme'");
    assert_eq!(registry_plan().await?, "pro", "within the grace");
    // Another transaction holds the customer (an event being applied)...
    let holder = b.testdb.client().await?;
    holder.execute("SELECT pg_advisory_lock(hashtext('stripe:' || 'cus_gr'))", &[]).await?;
    // ...when the grace job starts and waits for it.
    eventually(Duration::from_secs(30), || async {
        let waiting: i64 = b
            .sql_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .await?;
        Ok(waiting == 1)
    })
    .await?;
    // The payment is applied meanwhile.
    holder
        .execute("UPDATE public.subscriptions SET status = 'active', past_due_since = NULL WHERE id = 'sub_gr'", &[])
        .await?;
    holder.execute("SELECT pg_advisory_unlock(hashtext('stripe:' || 'cus_gr'))", &[]).await?;
    eventually(Duration::from_secs(10), || async {
        let done: i64 =
            b.sql_one("SELECT count(*) FROM public.jobs WHERE kind = 'billing.grace' AND status = 'done'").await?;
        Ok(done == 1)
    })
    .await?;
    assert_eq!(registry_plan().await?, "pro", "the grace job looked again under the lock");
    Ok(())
}

mod invoices {
    use super::*;

    fn stripe_invoice(id: &str, customer: &str, status: &str, created: i64) -> Value {
        let mut inv = invoice(id, customer);
        inv["status"] = json!(status);
        inv["number"] = json!(format!("PLN-{id}"));
        inv["created"] = json!(created);
        inv["amount_due"] = json!(2000);
        inv["amount_paid"] = json!(if status == "paid" { 2000 } else { 0 });
        inv["amount_remaining"] = json!(if status == "paid" { 0 } else { 2000 });
        inv["currency"] = json!("usd");
        inv["hosted_invoice_url"] = json!(format!("https://invoice.stripe.test/i/{id}"));
        inv["invoice_pdf"] = json!(format!("https://pay.stripe.test/invoice/{id}/pdf"));
        inv
    }

    async fn list(b: &Billing, slug: &str, query: &str) -> TestResult<reqwest::Response> {
        Ok(b.app.req(Method::GET, slug, &format!("/v1/billing/invoices{query}")).send().await?)
    }

    #[tokio::test]
    async fn invoices_are_listed_from_the_mirror_newest_first_page_by_page_and_per_tenant() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_with("7", Some(&stripe)).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.app.create_tenant("globex").await?;
        b.link(&acme, "cus_in", now() - 1000).await?;
        let t = now() - 500;
        for (n, id) in ["in_a1", "in_a2", "in_a3"].into_iter().enumerate() {
            let created = t + n as i64;
            // Stripe has it paid; the event's copy is older (open).
            stripe.set_invoice(stripe_invoice(id, "cus_in", "paid", created));
            let event_id = format!("evt_{id}");
            b.deliver(&event_id, "invoice.paid", created, stripe_invoice(id, "cus_in", "open", created)).await?;
            b.processed(&event_id).await?;
        }
        let calls = stripe.requests().len();
        let first: Value = list(&b, "acme", "?limit=2").await?.json().await?;
        let ids: Vec<&str> = first["data"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str()).collect();
        assert_eq!(ids, ["in_a3", "in_a2"], "{first}");
        assert_eq!(first["data"][0]["status"], "paid", "{first}");
        assert_eq!(first["data"][0]["amount_paid"], 2000);
        assert_eq!(first["data"][0]["hosted_url"], "https://invoice.stripe.test/i/in_a3");
        assert_eq!(first["data"][0]["pdf_url"], "https://pay.stripe.test/invoice/in_a3/pdf");
        let cursor = first["next_cursor"].as_str().ok_or("a second page")?.to_owned();
        let second: Value = list(&b, "acme", &format!("?limit=2&cursor={cursor}")).await?.json().await?;
        assert_eq!((second["data"][0]["id"].as_str(), second["next_cursor"].as_null()), (Some("in_a1"), Some(())));
        assert_eq!(stripe.requests().len(), calls, "listing reads the mirror, not Stripe");
        // Another tenant sees none of them, even with acme's cursor.
        let other: Value = list(&b, "globex", "").await?.json().await?;
        assert_eq!(other["data"], json!([]));
        assert_error(list(&b, "globex", &format!("?cursor={cursor}")).await?, 400, "invalid_request").await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_late_event_does_not_reopen_a_paid_invoice_and_sync_fills_the_gaps() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing("7").await?;
        let acme = b.app.create_tenant("acme").await?;
        b.link(&acme, "cus_late", now() - 1000).await?;
        let t = now() - 500;
        b.deliver("evt_late_paid", "invoice.paid", t + 10, stripe_invoice("in_late", "cus_late", "paid", t)).await?;
        b.deliver("evt_late_open", "invoice.finalized", t + 5, stripe_invoice("in_late", "cus_late", "open", t))
            .await?;
        b.processed("evt_late_open").await?;
        let status: String = b.sql_one("SELECT status FROM public.invoices WHERE id = 'in_late'").await?;
        assert_eq!(status, "paid");
        // An invoice whose events were missed: the sync brings it.
        stripe.set_invoice(stripe_invoice("in_missed", "cus_late", "open", t + 20));
        let env = [
            ("PLINTH_STRIPE_SECRET_KEY", "sk_test_plinth"),
            ("PLINTH_STRIPE_API_BASE", stripe.url.as_str()),
            ("PLINTH_STRIPE_PRICE_PRO", PRO),
        ];
        let (ok, out) = cli(&b, &["billing", "sync"], &env).await?;
        assert!(ok, "{out}");
        let listed: Value = list(&b, "acme", "").await?.json().await?;
        let ids: Vec<&str> = listed["data"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str()).collect();
        assert_eq!(ids, ["in_missed", "in_late"], "{listed}");
        Ok(())
    }
}

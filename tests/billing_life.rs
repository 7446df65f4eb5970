//! The subscription's life beyond checkout: per-seat quantities that follow
//! the team, trials, and dunning that restricts instead of deleting.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::billing::processing::{Billing, ENTERPRISE, PRO, billing_setting, cli};
use crate::billing_stripe::online::{checkout, stripe_env};
use crate::harness::{TestResult, eventually};
use crate::stripe::{StripeMock, now, subscription};

/// A per-seat subscription as Stripe has it: `quantity` seats.
fn seats(id: &str, customer: &str, status: &str, price: &str, quantity: u64) -> Value {
    let mut sub = subscription(id, customer, status, price);
    sub["items"]["data"][0]["quantity"] = json!(quantity);
    sub
}

impl Billing {
    /// A pending invitation with a known token, written to the database as
    /// inviting does.
    async fn invitation(&self, tenant: &plinth_tenants::Tenant, email: &str) -> TestResult<String> {
        let (token, hash) = plinth_identity::sessions::new_token()?;
        self.testdb
            .client()
            .await?
            .execute(
                "INSERT INTO public.invitations (id, tenant_id, email, role, token_hash, expires_at) \
                 VALUES ($1, $2, $3, 'member', $4, now() + interval '1 day')",
                &[&uuid::Uuid::now_v7(), &tenant.id.0, &email, &&hash[..]],
            )
            .await?;
        Ok(token)
    }

    /// Joins through `POST /v1/invitations/accept`; the new member's id.
    async fn join(&self, tenant: &plinth_tenants::Tenant, email: &str) -> TestResult<String> {
        let token = self.invitation(tenant, email).await?;
        let res = self
            .app
            .http
            .post(self.app.url("/v1/invitations/accept"))
            .json(&json!({ "token": token, "password": "a long enough passphrase" }))
            .send()
            .await?;
        assert_eq!(res.status(), 200, "joining");
        let body: Value = res.json().await?;
        Ok(body["user_id"].as_str().unwrap_or_default().to_owned())
    }

    /// Time passes for the queued seat updates: they are due now.
    async fn seats_due(&self) -> TestResult {
        self.testdb
            .client()
            .await?
            .execute("UPDATE public.jobs SET run_at = now() WHERE kind = 'billing.seats' AND status = 'queued'", &[])
            .await?;
        Ok(())
    }

    async fn seat_jobs_done(&self) -> TestResult {
        eventually(Duration::from_secs(20), || async {
            let waiting: i64 = self
                .sql_one("SELECT count(*) FROM public.jobs WHERE kind = 'billing.seats' AND status <> 'done'")
                .await?;
            Ok(waiting == 0)
        })
        .await?;
        Ok(())
    }
}

/// A plan catalog written to a file of its own, for `PLINTH_PLANS_FILE`
/// (the folder lives as long as the first value).
fn plans_file(text: &str) -> TestResult<(crate::harness::TempDir, &'static str)> {
    let dir = crate::harness::TempDir::new("plans")?;
    let file = dir.path.join("plans.toml");
    std::fs::write(&file, text)?;
    Ok((dir, Box::leak(file.display().to_string().into_boxed_str())))
}

/// The quantities Stripe was asked to set, in order: (item, quantity).
fn quantities(stripe: &StripeMock) -> Vec<(String, String)> {
    stripe
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/v1/subscription_items/"))
        .map(|r| {
            assert_eq!(r.field("proration_behavior"), Some("create_prorations"), "{r:?}");
            let key = r.idempotency_key.clone().unwrap_or_default();
            assert!(key.starts_with("plinth-seats-"), "every update has its key: {key}");
            (r.path["/v1/subscription_items/".len()..].to_owned(), r.field("quantity").unwrap_or_default().to_owned())
        })
        .collect()
}

fn item_quantity(stripe: &StripeMock, sub: &str) -> Option<u64> {
    stripe.subscription_now(sub).and_then(|s| s["items"]["data"][0]["quantity"].as_u64())
}

mod seats {
    use super::*;

    #[tokio::test]
    async fn the_quantity_follows_a_team_from_2_to_7_and_back_and_never_drops_on_a_failed_payment() -> TestResult {
        let stripe = StripeMock::start().await?;
        // A debounce no test waits out: time is moved on by `seats_due`.
        let b = billing_setting("14", Some(&stripe), vec![("PLINTH_BILLING_SEATS_DEBOUNCE_SECS", "3600")]).await?;
        let acme = b.app.create_tenant("acme").await?;
        let globex = b.app.create_tenant("globex").await?;
        b.join(&acme, "second@acme.example.com").await?;
        let t = now() - 100;
        stripe.add_customer("cus_acme", Some(&acme.id.to_string()));
        b.link(&acme, "cus_acme", t).await?;
        b.link(&globex, "cus_globex", t).await?;

        // Checkout opens with the team's two seats.
        assert_eq!(checkout(&b, "acme", "pro").await?.status(), 200);
        let session = stripe
            .requests()
            .into_iter()
            .find(|r| r.path == "/v1/checkout/sessions")
            .ok_or("a checkout session was opened")?;
        assert_eq!(session.field("line_items[0][quantity]"), Some("2"));
        let sub = seats("sub_acme", "cus_acme", "active", PRO, 2);
        stripe.set_subscription(sub.clone());
        b.deliver("evt_acme_sub", "customer.subscription.created", t + 1, sub).await?;
        let other = seats("sub_globex", "cus_globex", "active", ENTERPRISE, 1);
        stripe.set_subscription(other.clone());
        b.deliver("evt_globex_sub", "customer.subscription.created", t + 1, other).await?;
        b.plan_becomes("acme", "pro").await?;
        b.plan_becomes("globex", "enterprise").await?;

        // Five join: one update, to 7, once the last change has waited.
        let mut joined = Vec::new();
        for n in 3..=7 {
            joined.push(b.join(&acme, &format!("member{n}@acme.example.com")).await?);
        }
        let queued: i64 = b.sql_one("SELECT count(*) FROM public.jobs WHERE kind = 'billing.seats'").await?;
        assert_eq!(queued, 6, "one job per change (the second member's too), in the change's transaction");
        assert!(quantities(&stripe).is_empty(), "nothing is sent before the debounce");
        b.seats_due().await?;
        b.seat_jobs_done().await?;
        assert_eq!(quantities(&stripe), [("si_sub_acme".to_owned(), "7".to_owned())]);
        assert_eq!(item_quantity(&stripe, "sub_acme"), Some(7));

        // Payment fails; the subscription is past due. Nothing about the
        // seats changes, however often billing looks.
        let past_due = seats("sub_acme", "cus_acme", "past_due", PRO, 7);
        stripe.set_subscription(past_due.clone());
        b.deliver("evt_past_due", "customer.subscription.updated", t + 2, past_due).await?;
        b.processed("evt_past_due").await?;
        let env = stripe_env(&stripe);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, out) = cli(&b, &["billing", "sync"], &env).await?;
        assert!(ok, "{out}");
        b.seat_jobs_done().await?;
        assert_eq!(quantities(&stripe).len(), 1, "a past-due subscription keeps its seats");
        assert_eq!(item_quantity(&stripe, "sub_acme"), Some(7));

        // Back to two: members leave through the API.
        for user in &joined {
            let res = b.app.req(Method::DELETE, "acme", &format!("/v1/members/{user}")).send().await?;
            assert_eq!(res.status(), 204);
        }
        b.seats_due().await?;
        b.seat_jobs_done().await?;
        assert_eq!(item_quantity(&stripe, "sub_acme"), Some(2));
        let sent: Vec<String> = quantities(&stripe).into_iter().map(|(_, q)| q).collect();
        assert_eq!(sent, ["7", "2"]);

        // Someone edits the quantity in the Dashboard: the sync puts it back.
        stripe.set_subscription(seats("sub_acme", "cus_acme", "past_due", PRO, 9));
        let (ok, out) = cli(&b, &["billing", "sync"], &env).await?;
        assert!(ok, "{out}");
        b.seat_jobs_done().await?;
        assert_eq!(item_quantity(&stripe, "sub_acme"), Some(2), "drift repaired");

        // The other tenant's subscription was never touched.
        assert!(quantities(&stripe).iter().all(|(item, _)| item == "si_sub_acme"));
        assert_eq!(item_quantity(&stripe, "sub_globex"), Some(1));
        Ok(())
    }
}

mod dunning {
    use super::*;
    use crate::harness::{AppOptions, TestApp, assert_error};
    use crate::stripe::invoice;

    fn open_invoice(id: &str, customer: &str, sub: &str, status: &str) -> Value {
        let mut inv = invoice(id, customer);
        inv["status"] = json!(status);
        inv["billing_reason"] = json!("subscription_cycle");
        inv["hosted_invoice_url"] = json!(format!("https://invoice.stripe.test/i/{id}"));
        inv["parent"] = json!({ "type": "subscription_details",
            "subscription_details": { "metadata": {}, "subscription": sub } });
        inv
    }

    /// Time passes: the past-due episode of `sub` began `days` earlier, and
    /// its grace job (which carries its start) is due now.
    async fn days_pass(b: &Billing, sub: &str, days: i64) -> TestResult {
        let client = b.testdb.client().await?;
        let shift = days * 86_400;
        client
            .execute(
                "UPDATE public.subscriptions SET past_due_since = past_due_since - make_interval(secs => $2) \
                 WHERE id = $1",
                &[&sub, &(shift as f64)],
            )
            .await?;
        client
            .execute(
                "UPDATE public.jobs SET run_at = now(), \
                 payload = jsonb_set(payload, '{since}', to_jsonb((payload->>'since')::bigint - $2)) \
                 WHERE kind = 'billing.grace' AND payload->>'subscription' = $1 AND status = 'queued'",
                &[&sub, &shift],
            )
            .await?;
        Ok(())
    }

    async fn write(app: &TestApp, slug: &str, name: &str) -> TestResult<reqwest::Response> {
        Ok(app.req(Method::POST, slug, "/v1/projects").json(&json!({ "name": name })).send().await?)
    }

    async fn billing_state(app: &TestApp, slug: &str) -> TestResult<Value> {
        let body: Value = app.req(Method::GET, slug, "/v1/tenant").send().await?.json().await?;
        Ok(body["billing"].clone())
    }

    #[tokio::test]
    async fn three_failures_then_a_payment_grace_reminder_restriction_and_its_lifting_on_every_instance() -> TestResult
    {
        let stripe = StripeMock::start().await?;
        let b = billing_setting("14", Some(&stripe), vec![]).await?;
        let other = TestApp::spawn_on(
            &b.testdb,
            AppOptions {
                settings: vec![("PLINTH_STRIPE_PRICE_PRO", PRO), ("PLINTH_STRIPE_PRICE_ENTERPRISE", ENTERPRISE)],
                ..Default::default()
            },
        )
        .await?
        .with_tokens_of(&b.app);
        let acme = b.app.create_tenant("acme").await?;
        b.app.create_tenant("globex").await?;
        let t = now() - 100;
        stripe.add_customer("cus_d", Some(&acme.id.to_string()));
        b.link(&acme, "cus_d", t).await?;
        let active = subscription("sub_d", "cus_d", "active", PRO);
        stripe.set_subscription(active.clone());
        b.deliver("evt_on", "customer.subscription.created", t + 1, active.clone()).await?;
        b.plan_becomes("acme", "pro").await?;
        assert_eq!(billing_state(&b.app, "acme").await?["status"], "active");

        // The renewal fails; Stripe retries the same invoice twice more.
        let past_due = subscription("sub_d", "cus_d", "past_due", PRO);
        stripe.set_subscription(past_due.clone());
        stripe.set_invoice(open_invoice("in_d", "cus_d", "sub_d", "open"));
        b.deliver("evt_due", "customer.subscription.updated", t + 2, past_due).await?;
        for n in 1..=3 {
            let id = format!("evt_failed_{n}");
            b.deliver(&id, "invoice.payment_failed", t + 2 + n, open_invoice("in_d", "cus_d", "sub_d", "open")).await?;
            b.processed(&id).await?;
        }
        b.processed("evt_due").await?;
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to("Payment failed for acme") == 1) })
            .await
            .map_err(|e| format!("{e}: {:?}", b.smtp.accepted()))?;
        let state = billing_state(&b.app, "acme").await?;
        assert_eq!(state["status"], "past_due", "{state}");
        let grace_ends: chrono::DateTime<chrono::Utc> = serde_json::from_value(state["grace_ends_at"].clone())?;
        let expected = chrono::Utc::now() + chrono::Duration::days(14);
        assert!((grace_ends - expected).num_seconds().abs() < 600, "{grace_ends} vs {expected}");
        // Within the grace the plan holds, writes work.
        assert_eq!(write(&b.app, "acme", "during the grace").await?.status(), 201);

        // Three days before the grace ends, the owners are reminded once.
        b.testdb
            .client()
            .await?
            .execute("UPDATE public.jobs SET run_at = now() WHERE kind = 'billing.reminder'", &[])
            .await?;
        let date = grace_ends.format("%Y-%m-%d").to_string();
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to(&format!("becomes read-only on {date}")) == 1) })
            .await
            .map_err(|e| format!("{e}: {:?}", b.smtp.accepted()))?;

        // The grace ends: restricted on both instances. Reads work, writes
        // answer 402 with the way to pay; nothing moved to free, nothing
        // was deleted.
        days_pass(&b, "sub_d", 14).await?;
        for app in [&b.app, &other] {
            eventually(Duration::from_secs(10), || async {
                // A probe: written until the restriction reaches this instance.
                Ok(write(app, "acme", "probe").await?.status() == 402)
            })
            .await?;
            let body = assert_error(write(app, "acme", "refused").await?, 402, "payment_required").await?;
            assert_eq!(body["error"]["portal"], "/v1/billing/portal");
            let projects: Value = app.req(Method::GET, "acme", "/v1/projects").send().await?.json().await?;
            let names: Vec<&str> = projects["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .filter(|name| *name != "probe")
                .collect();
            assert_eq!(names, ["during the grace"], "reads work, nothing was deleted");
            assert_eq!(billing_state(app, "acme").await?["status"], "restricted");
            // Another tenant is untouched.
            assert_eq!(write(app, "globex", "globex works").await?.status(), 201);
        }
        assert_eq!(b.plan("acme").await?, "pro", "the plan holds: nothing is over a limit by surprise");
        // A member may still leave (a route that needs no more than reading).
        let leaver = crate::harness::member(&b.app.db, &acme, plinth_access::Role::Member).await?;
        let me: Value = b.app.http.get(b.app.url("/v1/me")).bearer_auth(&leaver).send().await?.json().await?;
        let id = me["user"]["id"].as_str().or(me["id"].as_str()).ok_or("the member's id")?.to_owned();
        let res = b
            .app
            .http
            .delete(b.app.url(&format!("/v1/members/{id}")))
            .header("x-tenant", "acme")
            .bearer_auth(&leaver)
            .send()
            .await?;
        assert_eq!(res.status(), 204, "leaving a restricted organization");
        assert_eq!(b.app.req(Method::POST, "acme", "/v1/billing/portal").send().await?.status(), 200, "owners can pay");
        let audit: Value = b.app.req(Method::GET, "acme", "/v1/audit-log").send().await?.json().await?;
        assert!(audit.to_string().contains("billing.restricted"), "{audit}");

        // Paid: invoice.paid lifts it on every instance.
        stripe.set_subscription(active);
        stripe.set_invoice(open_invoice("in_d", "cus_d", "sub_d", "paid"));
        b.deliver("evt_paid", "invoice.paid", t + 10, open_invoice("in_d", "cus_d", "sub_d", "paid")).await?;
        b.processed("evt_paid").await?;
        for app in [&b.app, &other] {
            eventually(Duration::from_secs(10), || async { Ok(write(app, "acme", "paid").await?.status() == 201) })
                .await?;
            assert_eq!(billing_state(app, "acme").await?["status"], "active");
        }
        // A late past-due event does not bring the restriction back.
        let late = subscription("sub_d", "cus_d", "past_due", PRO);
        b.deliver("evt_late_due", "customer.subscription.updated", t + 3, late).await?;
        b.processed("evt_late_due").await?;
        assert_eq!(write(&b.app, "acme", "still fine").await?.status(), 201);
        assert_eq!(b.mails_to("Payment failed for acme"), 1, "once per failed invoice");
        Ok(())
    }
}

mod trials {
    use super::*;
    use crate::harness::assert_error;

    fn trialing(id: &str, customer: &str, days: i64) -> Value {
        let mut sub = subscription(id, customer, "trialing", PRO);
        sub["trial_start"] = json!(now());
        sub["trial_end"] = json!(now() + days * 86_400);
        sub
    }

    async fn checkout_with(b: &Billing, slug: &str, body: Value) -> TestResult<reqwest::Response> {
        Ok(b.app.req(Method::POST, slug, "/v1/billing/checkout").json(&body).send().await?)
    }

    fn last_session(stripe: &StripeMock) -> TestResult<crate::stripe::Recorded> {
        Ok(stripe.requests().into_iter().rev().find(|r| r.path == "/v1/checkout/sessions").ok_or("no session")?)
    }

    async fn tenant_billing(b: &Billing, slug: &str) -> TestResult<Value> {
        let body: Value = b.app.req(Method::GET, slug, "/v1/tenant").send().await?.json().await?;
        Ok(body["billing"].clone())
    }

    #[tokio::test]
    async fn a_trial_with_a_card_becomes_paid_and_one_without_lapses_to_free() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_setting("14", Some(&stripe), vec![]).await?;
        let acme = b.app.create_tenant("acme").await?;
        let globex = b.app.create_tenant("globex").await?;
        let t = now() - 100;
        stripe.add_customer("cus_card", Some(&acme.id.to_string()));
        stripe.add_customer("cus_nocard", Some(&globex.id.to_string()));
        b.link(&acme, "cus_card", t).await?;
        b.link(&globex, "cus_nocard", t).await?;

        // Enterprise has no trial; if_required needs one.
        let res = checkout_with(&b, "acme", json!({ "plan": "enterprise", "trial": true })).await?;
        let body = assert_error(res, 400, "invalid_request").await?;
        assert_eq!(body["error"]["details"][0]["field"], "trial", "{body}");
        let res = checkout_with(&b, "acme", json!({ "plan": "enterprise", "payment_method": "if_required" })).await?;
        assert_error(res, 400, "invalid_request").await?;

        // With a card (the default): the plan's 14 days, and a card asked for.
        assert_eq!(checkout_with(&b, "acme", json!({ "plan": "pro" })).await?.status(), 200);
        let session = last_session(&stripe)?;
        assert_eq!(session.field("subscription_data[trial_period_days]"), Some("14"));
        assert_eq!(session.field("payment_method_collection"), None, "Stripe's default: always");
        let sub = trialing("sub_card", "cus_card", 14);
        let trial_end = sub["trial_end"].as_i64().unwrap_or_default();
        stripe.set_subscription(sub.clone());
        b.deliver("evt_card_trial", "customer.subscription.created", t + 1, sub.clone()).await?;
        b.plan_becomes("acme", "pro").await?;
        let state = tenant_billing(&b, "acme").await?;
        assert_eq!(state["status"], "trialing", "{state}");
        let ends: chrono::DateTime<chrono::Utc> = serde_json::from_value(state["trial_ends_at"].clone())?;
        assert_eq!(ends.timestamp(), trial_end);
        let view = b.view("acme").await?;
        assert_eq!((view["status"].as_str(), view["billing"]["status"].as_str()), (Some("trialing"), Some("trialing")));

        // Three days before: the owners are told the date, with a link.
        b.deliver("evt_will_end", "customer.subscription.trial_will_end", t + 2, sub).await?;
        let date = ends.format("%Y-%m-%d").to_string();
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to(&format!("trial ends on {date}")) >= 1) })
            .await
            .map_err(|e| format!("{e}: {:?}", b.smtp.accepted()))?;
        assert!(b.smtp.accepted().iter().any(|m| m.contains("/billing")), "a link to pay");

        // The card is charged: paid.
        let paid = subscription("sub_card", "cus_card", "active", PRO);
        stripe.set_subscription(paid.clone());
        b.deliver("evt_card_paid", "customer.subscription.updated", t + 3, paid).await?;
        eventually(Duration::from_secs(10), || async { Ok(tenant_billing(&b, "acme").await?["status"] == "active") })
            .await?;
        assert_eq!(b.plan("acme").await?, "pro");

        // Without a card: Checkout asks for none and cancels at the end.
        let res = checkout_with(&b, "globex", json!({ "plan": "pro", "payment_method": "if_required" })).await?;
        assert_eq!(res.status(), 200);
        let session = last_session(&stripe)?;
        assert_eq!(session.field("payment_method_collection"), Some("if_required"));
        assert_eq!(session.field("subscription_data[trial_period_days]"), Some("14"));
        assert_eq!(
            session.field("subscription_data[trial_settings][end_behavior][missing_payment_method]"),
            Some("cancel")
        );
        let sub = trialing("sub_nocard", "cus_nocard", 14);
        stripe.set_subscription(sub.clone());
        b.deliver("evt_nocard_trial", "customer.subscription.created", t + 1, sub).await?;
        b.plan_becomes("globex", "pro").await?;
        // The trial ends with no payment method: Stripe cancels it.
        let mut ended = subscription("sub_nocard", "cus_nocard", "canceled", PRO);
        ended["trial_end"] = json!(now());
        stripe.set_subscription(ended.clone());
        b.deliver("evt_nocard_end", "customer.subscription.deleted", t + 4, ended).await?;
        b.plan_becomes("globex", "free").await?;
        assert_eq!(tenant_billing(&b, "globex").await?["status"], "none");
        let cancelled = "The globex Inc. subscription was cancelled";
        eventually(Duration::from_secs(10), || async { Ok(b.mails_to(cancelled) == 1) }).await?;

        // One trial per organization: asked again, it is refused; by default
        // the next checkout has none.
        let res = checkout_with(&b, "globex", json!({ "plan": "pro", "trial": true })).await?;
        let body = assert_error(res, 400, "invalid_request").await?;
        assert!(body.to_string().contains("has had its trial"), "{body}");
        assert_eq!(checkout_with(&b, "globex", json!({ "plan": "pro" })).await?.status(), 200);
        assert_eq!(last_session(&stripe)?.field("subscription_data[trial_period_days]"), None);
        // acme's trial never showed in globex's answers.
        assert!(b.view("globex").await?["subscriptions"].as_array().is_some_and(Vec::is_empty));
        Ok(())
    }
}

mod changes {
    use super::*;
    use crate::harness::assert_error;

    /// The default catalog, with pro limited to 2 projects: a downgrade
    /// the organization can be over.
    const PLANS: &str = r#"
[[plan]]
name = "free"
limits = { projects = 3, members = 3 }

[[plan]]
name = "pro"
includes = "free"
features = ["audit_log", "api_keys"]
limits = { projects = 2, members = 25 }
per_seat = true

[[plan]]
name = "enterprise"
includes = "pro"
features = ["custom_domains", "data_export"]
per_seat = true
"#;

    async fn post(b: &Billing, slug: &str, path: &str, body: Value) -> TestResult<reqwest::Response> {
        Ok(b.app.req(Method::POST, slug, path).json(&body).send().await?)
    }

    fn posted<'a>(stripe: &'a [crate::stripe::Recorded], path: &str) -> Vec<&'a crate::stripe::Recorded> {
        stripe.iter().filter(|r| r.method == "POST" && r.path == path).collect()
    }

    #[tokio::test]
    async fn a_preview_an_upgrade_a_downgrade_at_period_end_a_refused_one_and_cancel_and_resume() -> TestResult {
        let stripe = StripeMock::start().await?;
        stripe.set_price(PRO, 2000);
        stripe.set_price(ENTERPRISE, 5000);
        let (_dir, file) = plans_file(PLANS)?;
        let b = billing_setting("14", Some(&stripe), vec![("PLINTH_PLANS_FILE", file)]).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.app.create_tenant("globex").await?;
        b.join(&acme, "second@acme.example.com").await?;
        let t = now() - 100;
        stripe.add_customer("cus_c", Some(&acme.id.to_string()));
        b.link(&acme, "cus_c", t).await?;
        let period_end = now() + 20 * 86_400;
        let mut sub = seats("sub_c", "cus_c", "active", PRO, 2);
        sub["items"]["data"][0]["current_period_start"] = json!(now() - 10 * 86_400);
        sub["items"]["data"][0]["current_period_end"] = json!(period_end);
        stripe.set_subscription(sub.clone());
        b.deliver("evt_c_on", "customer.subscription.created", t + 1, sub).await?;
        b.plan_becomes("acme", "pro").await?;

        // The preview of an upgrade: the difference now, the new price next.
        let res = post(&b, "acme", "/v1/billing/preview", json!({ "plan": "enterprise" })).await?;
        assert_eq!(res.status(), 200);
        let preview: Value = res.json().await?;
        assert_eq!(preview["effective"], "now", "{preview}");
        assert_eq!(
            (preview["due_now"]["amount"].as_i64(), preview["next_invoice"]["amount"].as_i64()),
            (Some(6000), Some(10000))
        );
        assert_eq!(preview["next_invoice"]["currency"], "usd");
        let previews = stripe.requests();
        let previews = posted(&previews, "/v1/invoices/create_preview");
        assert_eq!(previews.len(), 2);
        for p in &previews {
            assert_eq!(p.field("subscription_details[items][0][id]"), Some("si_sub_c"));
            assert_eq!(p.field("subscription_details[items][0][price]"), Some(ENTERPRISE));
            assert_eq!(p.field("subscription_details[items][0][quantity]"), Some("2"));
        }
        assert!(previews.iter().any(|p| p.field("subscription_details[proration_behavior]") == Some("always_invoice")));

        // The upgrade, at once with its prorations invoiced now.
        let res = post(&b, "acme", "/v1/billing/change", json!({ "plan": "enterprise" })).await?;
        let changed: Value = res.json().await?;
        assert_eq!(changed["effective"], "now", "{changed}");
        let requests = stripe.requests();
        let update = posted(&requests, "/v1/subscriptions/sub_c");
        assert_eq!(update.len(), 1);
        assert_eq!(update[0].field("items[0][price]"), Some(ENTERPRISE));
        assert_eq!(update[0].field("proration_behavior"), Some("always_invoice"));
        let upgraded = stripe.subscription_now("sub_c").ok_or("sub_c")?;
        b.deliver("evt_c_up", "customer.subscription.updated", t + 2, upgraded).await?;
        b.plan_becomes("acme", "enterprise").await?;

        // Three projects: pro allows two. The downgrade says so, per limit.
        for n in 1..=3 {
            b.app.create_project("acme", &format!("p{n}")).await?;
        }
        for path in ["/v1/billing/preview", "/v1/billing/change"] {
            let body =
                assert_error(post(&b, "acme", path, json!({ "plan": "pro" })).await?, 409, "over_plan_limits").await?;
            assert_eq!(body["error"]["limits"], json!([{ "quota": "projects", "limit": 2, "used": 3 }]), "{body}");
        }
        assert!(stripe.subscription_now("sub_c").is_some_and(|s| s["schedule"].is_null()), "nothing was scheduled");

        // Down to two projects: the downgrade waits for the period's end.
        let projects: Value = b.app.req(Method::GET, "acme", "/v1/projects").send().await?.json().await?;
        let id = projects["data"][0]["id"].as_str().ok_or("a project")?.to_owned();
        assert_eq!(b.app.req(Method::DELETE, "acme", &format!("/v1/projects/{id}")).send().await?.status(), 204);
        let preview: Value = post(&b, "acme", "/v1/billing/preview", json!({ "plan": "pro" })).await?.json().await?;
        assert_eq!(
            (preview["effective"].as_str(), preview["due_now"]["amount"].as_i64()),
            (Some("period_end"), Some(0))
        );
        assert_eq!(preview["next_invoice"]["amount"].as_i64(), Some(4000));
        let changed: Value = post(&b, "acme", "/v1/billing/change", json!({ "plan": "pro" })).await?.json().await?;
        assert_eq!(changed["effective"], "period_end", "{changed}");
        let at: chrono::DateTime<chrono::Utc> = serde_json::from_value(changed["effective_at"].clone())?;
        assert_eq!(at.timestamp(), period_end);
        let schedule_id = stripe.subscription_now("sub_c").and_then(|s| s["schedule"].as_str().map(str::to_owned));
        let schedule = stripe.schedule_now(&schedule_id.ok_or("a schedule")?).ok_or("the schedule")?;
        assert_eq!(schedule["end_behavior"], "release");
        assert_eq!(schedule["phases"][0]["items"][0]["price"], ENTERPRISE);
        assert_eq!(schedule["phases"][0]["end_date"].as_i64(), Some(period_end));
        assert_eq!(schedule["phases"][1]["items"][0]["price"], PRO);
        assert_eq!(schedule["phases"][1]["items"][0]["quantity"].as_i64(), Some(2));
        assert_eq!(b.plan("acme").await?, "enterprise", "until the period ends");
        let view = b.view("acme").await?;
        assert_eq!(view["pending_change"]["plan"], "pro", "{view}");
        // Taken back (the current plan asked for): the schedule is released.
        let kept: Value = post(&b, "acme", "/v1/billing/change", json!({ "plan": "enterprise" })).await?.json().await?;
        assert_eq!(kept["effective"], "now", "{kept}");
        let first = schedule["id"].as_str().ok_or("a schedule id")?.to_owned();
        assert_eq!(stripe.schedule_now(&first).map(|s| s["status"].clone()), Some(json!("released")));
        assert!(stripe.subscription_now("sub_c").is_some_and(|s| s["schedule"].is_null()));
        assert!(b.view("acme").await?["pending_change"].is_null());
        assert_eq!(posted(&stripe.requests(), "/v1/subscriptions/sub_c").len(), 1, "no price change for that");
        // And made again: a new schedule.
        let changed: Value = post(&b, "acme", "/v1/billing/change", json!({ "plan": "pro" })).await?.json().await?;
        assert_eq!(changed["effective"], "period_end", "{changed}");
        let second = stripe.subscription_now("sub_c").and_then(|s| s["schedule"].as_str().map(str::to_owned));
        assert!(second.as_deref().is_some_and(|s| s != first), "{second:?}");
        assert_eq!(b.view("acme").await?["pending_change"]["plan"], "pro");
        // The period ends; Stripe moves the subscription to pro.
        let mut renewed = seats("sub_c", "cus_c", "active", PRO, 2);
        renewed["items"]["data"][0]["current_period_end"] = json!(period_end + 30 * 86_400);
        stripe.set_subscription(renewed.clone());
        b.deliver("evt_c_down", "customer.subscription.updated", t + 3, renewed).await?;
        b.plan_becomes("acme", "pro").await?;
        assert!(b.view("acme").await?["pending_change"].is_null());

        // Cancel at the period's end, then take it back.
        let ending: Value = post(&b, "acme", "/v1/billing/cancel", json!({})).await?.json().await?;
        assert_eq!(ending["cancel_at_period_end"], true, "{ending}");
        assert_eq!(stripe.subscription_now("sub_c").map(|s| s["cancel_at_period_end"].clone()), Some(json!(true)));
        assert_eq!(b.view("acme").await?["cancel_at_period_end"], true);
        let ending: Value = post(&b, "acme", "/v1/billing/resume", json!({})).await?.json().await?;
        assert_eq!(ending["cancel_at_period_end"], false);
        assert_eq!(stripe.subscription_now("sub_c").map(|s| s["cancel_at_period_end"].clone()), Some(json!(false)));

        // Another organization has no subscription to change, and sees
        // none of acme's.
        let res = post(&b, "globex", "/v1/billing/change", json!({ "plan": "enterprise" })).await?;
        assert_error(res, 409, "conflict").await?;
        assert_error(post(&b, "globex", "/v1/billing/cancel", json!({})).await?, 409, "conflict").await?;
        assert!(b.view("globex").await?["pending_change"].is_null());
        Ok(())
    }
}

mod meters {
    use super::*;
    use crate::harness::{AppOptions, TestApp, assert_error};
    use crate::mail_and_jobs::{Running, fast};

    /// Pro meters tasks with a soft limit, enterprise with a hard one.
    const PLANS: &str = r#"
[[plan]]
name = "free"
limits = { projects = 3, members = 3 }

[[plan]]
name = "pro"
includes = "free"
features = ["audit_log", "api_keys"]
limits = { members = 25 }
meters = { tasks = { event_name = "plinth_tasks", soft_limit = 5 } }

[[plan]]
name = "enterprise"
includes = "pro"
features = ["custom_domains", "data_export"]
meters = { tasks = { event_name = "plinth_tasks", hard_limit = 3 } }
"#;

    async fn task(app: &TestApp, slug: &str, project: &str, n: usize) -> TestResult<reqwest::Response> {
        let path = format!("/v1/projects/{project}/tasks");
        Ok(app.req(Method::POST, slug, &path).json(&json!({ "title": format!("task {n}") })).send().await?)
    }

    async fn usage(app: &TestApp, slug: &str) -> TestResult<Value> {
        let body: Value = app.req(Method::GET, slug, "/v1/usage").send().await?.json().await?;
        Ok(body["meters"][0].clone())
    }

    #[tokio::test]
    async fn units_recorded_with_the_work_reach_stripe_once_each_across_an_outage_and_two_instances() -> TestResult {
        let stripe = StripeMock::start().await?;
        let (_dir, file) = plans_file(PLANS)?;
        // The breaker, opened by the outage, lets a probe through after a
        // second rather than 30.
        let settings =
            vec![("PLINTH_PLANS_FILE", file), ("PLINTH_BILLING_METER_SECS", "1"), ("PLINTH_STRIPE_BREAKER_SECS", "1")];
        let b = billing_setting("14", Some(&stripe), settings).await?;
        let other = TestApp::spawn_on(
            &b.testdb,
            AppOptions {
                settings: vec![
                    ("PLINTH_PLANS_FILE", file),
                    ("PLINTH_STRIPE_PRICE_PRO", PRO),
                    ("PLINTH_STRIPE_PRICE_ENTERPRISE", ENTERPRISE),
                ],
                ..Default::default()
            },
        )
        .await?
        .with_tokens_of(&b.app);
        let acme = b.app.create_tenant("acme").await?;
        let globex = b.app.create_tenant("globex").await?;
        let t = now() - 100;
        for (tenant, customer, sub, price) in
            [(&acme, "cus_m1", "sub_m1", PRO), (&globex, "cus_m2", "sub_m2", ENTERPRISE)]
        {
            stripe.add_customer(customer, Some(&tenant.id.to_string()));
            b.link(tenant, customer, t).await?;
            let s = subscription(sub, customer, "active", price);
            stripe.set_subscription(s.clone());
            b.deliver(&format!("evt_{sub}"), "customer.subscription.created", t + 1, s).await?;
        }
        b.plan_becomes("acme", "pro").await?;
        b.plan_becomes("globex", "enterprise").await?;

        // Stripe is down while the work is done, on both instances.
        stripe.set_down(true);
        let acme_project = b.app.create_project("acme", "metered").await?["id"].as_str().unwrap_or_default().to_owned();
        let globex_project =
            b.app.create_project("globex", "metered").await?["id"].as_str().unwrap_or_default().to_owned();
        for n in 0..7 {
            let app = if n % 2 == 0 { &b.app } else { &other };
            assert_eq!(task(app, "acme", &acme_project, n).await?.status(), 201, "soft limit: billed, not refused");
        }
        for n in 0..3 {
            assert_eq!(task(&other, "globex", &globex_project, n).await?.status(), 201);
        }
        // The hard limit: the fourth task of the month is refused, and
        // records nothing.
        let body = assert_error(task(&b.app, "globex", &globex_project, 3).await?, 402, "quota_exceeded").await?;
        assert_eq!((body["error"]["quota"].as_str(), body["error"]["limit"].as_u64()), (Some("tasks"), Some(3)));

        // The sender runs every second, on two workers.
        let _second = Running::mail(&b.testdb, &b.settings, fast())?;
        b.app
            .db
            .platform(async |c| {
                plinth_jobs::enqueue(c, plinth_billing::process::meters_job(Duration::from_secs(1))).await?;
                Ok::<_, plinth_http::ApiError>(())
            })
            .await?;
        // Batched while Stripe is down; nothing reaches it.
        eventually(Duration::from_secs(20), || async {
            let batched: i64 = b.sql_one("SELECT count(*) FROM public.usage_events WHERE batch_id IS NOT NULL").await?;
            Ok(batched == 10)
        })
        .await?;
        eventually(Duration::from_secs(20), || async {
            Ok(stripe.requests().iter().filter(|r| r.path == "/v1/billing/meter_events").count() >= 2)
        })
        .await?;
        assert!(stripe.meter_events().is_empty());
        let state = usage(&b.app, "acme").await?;
        assert_eq!((state["used"].as_i64(), state["reported"].as_i64()), (Some(7), Some(0)), "{state}");
        assert_eq!(state["soft_limit"].as_u64(), Some(5));

        // Stripe is back: every unit is counted once.
        stripe.set_down(false);
        eventually(Duration::from_secs(60), || async {
            let unsent: i64 = b.sql_one("SELECT count(*) FROM public.usage_events WHERE sent_at IS NULL").await?;
            Ok(unsent == 0)
        })
        .await?;
        let events = stripe.meter_events();
        let total = |customer: &str| -> i64 {
            events
                .iter()
                .filter(|e| e["payload"]["stripe_customer_id"] == customer)
                .filter_map(|e| e["payload"]["value"].as_str().and_then(|v| v.parse::<i64>().ok()))
                .sum()
        };
        assert_eq!((total("cus_m1"), total("cus_m2")), (7, 3), "{events:?}");
        assert!(events.iter().all(|e| e["event_name"] == "plinth_tasks"));
        // Every resend of a batch carried the same identifier, value and
        // time (so Stripe's idempotency replays it).
        let sends: Vec<_> = stripe.requests().into_iter().filter(|r| r.path == "/v1/billing/meter_events").collect();
        for send in &sends {
            let id = send.field("identifier").ok_or("an identifier")?;
            let first = sends.iter().find(|s| s.field("identifier") == Some(id)).ok_or("a first send")?;
            assert_eq!(send.form, first.form, "a batch is resent as it was first sent");
            assert_eq!(send.idempotency_key.as_deref(), Some(format!("plinth-meter-{id}").as_str()));
        }
        let state = usage(&other, "acme").await?;
        assert_eq!((state["used"].as_i64(), state["reported"].as_i64()), (Some(7), Some(7)), "{state}");
        let state = usage(&other, "globex").await?;
        assert_eq!((state["used"].as_i64(), state["hard_limit"].as_u64()), (Some(3), Some(3)), "{state}");
        Ok(())
    }
}

mod entitlements {
    use super::*;
    use crate::billing::processing::billing;
    use crate::stripe::entitlement_summary;

    const SUMMARY: &str = "entitlements.active_entitlement_summary.updated";

    async fn audit_log(b: &Billing, slug: &str) -> TestResult<u16> {
        Ok(b.app.req(Method::GET, slug, "/v1/audit-log").send().await?.status().as_u16())
    }

    async fn features(b: &Billing, slug: &str) -> TestResult<Value> {
        let body: Value = b.app.req(Method::GET, slug, "/v1/tenant").send().await?.json().await?;
        Ok(body["features"].clone())
    }

    #[tokio::test]
    async fn with_features_from_stripe_the_entitlements_decide_in_order_and_per_tenant() -> TestResult {
        let stripe = StripeMock::start().await?;
        let b = billing_setting("14", Some(&stripe), vec![("PLINTH_BILLING_FEATURES", "stripe")]).await?;
        let acme = b.app.create_tenant("acme").await?;
        b.app.create_tenant("globex").await?;
        let t = now() - 100;
        stripe.add_customer("cus_ent", Some(&acme.id.to_string()));
        b.link(&acme, "cus_ent", t).await?;
        assert_eq!(audit_log(&b, "acme").await?, 402, "free: no audit log");

        // Stripe grants audit_log (and a feature Plinth does not know).
        stripe.set_entitlements("cus_ent", &["audit_log", "priority_support"]);
        b.deliver("evt_ent_1", SUMMARY, t + 1, entitlement_summary("cus_ent", &["audit_log", "priority_support"]))
            .await?;
        eventually(Duration::from_secs(10), || async { Ok(audit_log(&b, "acme").await? == 200) }).await?;
        assert_eq!(features(&b, "acme").await?, json!(["audit_log"]));
        assert_eq!(b.plan("acme").await?, "free", "the plan (and its limits) stay");
        assert_eq!(audit_log(&b, "globex").await?, 402, "another tenant has its plan's features");

        // Withdrawn; then an older summary arrives late: Stripe's current
        // list decides.
        stripe.set_entitlements("cus_ent", &[]);
        b.deliver("evt_ent_2", SUMMARY, t + 3, entitlement_summary("cus_ent", &[])).await?;
        eventually(Duration::from_secs(10), || async { Ok(audit_log(&b, "acme").await? == 402) }).await?;
        b.deliver("evt_ent_late", SUMMARY, t + 2, entitlement_summary("cus_ent", &["audit_log"])).await?;
        b.processed("evt_ent_late").await?;
        assert_eq!(audit_log(&b, "acme").await?, 402);
        assert_eq!(features(&b, "acme").await?, json!([]));
        Ok(())
    }

    #[tokio::test]
    async fn by_default_the_catalog_decides_and_a_summary_changes_nothing() -> TestResult {
        let b = billing("14").await?;
        let acme = b.app.create_tenant("acme").await?;
        let t = now() - 100;
        b.link(&acme, "cus_cat", t).await?;
        b.deliver("evt_cat", SUMMARY, t + 1, entitlement_summary("cus_cat", &["audit_log"])).await?;
        b.processed("evt_cat").await?;
        assert_eq!(audit_log(&b, "acme").await?, 402);
        assert_eq!(features(&b, "acme").await?, json!([]));
        Ok(())
    }
}

/// Issue 15's fifth defect: an attempt that parks must not turn an event
/// a concurrent replay applied meanwhile back into a waiting one. The
/// attempt here parks before it looks at the row (Stripe is down while it
/// reads), on an event already processed: the state a replay leaves.
#[tokio::test]
async fn an_attempt_that_parks_leaves_an_event_processed_meanwhile_processed() -> TestResult {
    let stripe = StripeMock::start().await?;
    let b = billing_setting("14", Some(&stripe), vec![]).await?;
    let acme = b.app.create_tenant("acme").await?;
    let t = now() - 100;
    b.link(&acme, "cus_park", t).await?;
    let sub = subscription("sub_park", "cus_park", "active", PRO);
    stripe.set_subscription(sub.clone());
    b.deliver("evt_park", "customer.subscription.created", t + 1, sub).await?;
    b.processed("evt_park").await?;

    stripe.set_down(true);
    let api = plinth_billing::stripe::Stripe::new(&b.settings.stripe, "http://localhost")?.ok_or("a Stripe key")?;
    let processor = plinth_billing::process::Processor::new(
        b.app.db.clone(),
        std::sync::Arc::new(b.settings.catalog()?),
        &b.settings.stripe,
        Some(std::sync::Arc::new(api)),
    );
    let outcome = processor.process("evt_park").await?;
    assert_eq!(outcome, plinth_billing::process::Outcome::AlreadyProcessed);
    assert_eq!(b.event_status("evt_park").await?, ("processed".to_owned(), None));
    Ok(())
}

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

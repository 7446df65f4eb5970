//! Stripe's API as billing calls it: a circuit breaker, Stripe's error
//! classes, and each call Plinth makes.
//!
//! - Each attempt has 5 s. Reads and requests with an idempotency key are
//!   tried up to 3 times with backoff (1 s, 2 s), on 409, 429, 5xx and
//!   connection errors; requests without a key once.
//! - Errors fall in three classes ([`Class`]): permanent (400, 401, 403,
//!   404: Stripe's message says what to fix; logged as errors and counted),
//!   later (409, 429: retried, then 503 with `Retry-After` to a client) and
//!   outage (5xx, timeouts, connection errors).
//! - The breaker counts outages only: after 5 in a row, calls fail at once
//!   with 503 `unavailable` for `PLINTH_STRIPE_BREAKER_SECS` (30 s); then
//!   one call probes while the others keep failing fast; an answer from
//!   Stripe closes it, an outage opens it again. A 429 neither counts nor
//!   resets it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel_async::AsyncPgConnection;
use plinth_tenants::{Db, Tenant, TenantId};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionPaymentMethodCollection,
    CreateCheckoutSessionSubscriptionData, CreateCheckoutSessionSubscriptionDataTrialSettings,
    CreateCheckoutSessionSubscriptionDataTrialSettingsEndBehavior,
    CreateCheckoutSessionSubscriptionDataTrialSettingsEndBehaviorMissingPaymentMethod,
};
use stripe_client_core::{RequestBuilder, RequestStrategy, StripeMethod, StripeRequest as _};
use stripe_core::customer::CreateCustomer;

use crate::client::{Class, Client, StripeError};
use crate::config::StripeConfig;
use crate::customers;
use crate::error::BillingError;
use crate::object;

const FAILURES_TO_OPEN: u32 = 5;
/// A probe that has not come back in this long is taken as lost (its
/// caller went away), and another call may probe.
const PROBE_LOST_AFTER: Duration = Duration::from_secs(60);

/// Subscription statuses that have ended for good.
pub const ENDED: [&str; 2] = ["canceled", "incomplete_expired"];

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One call is finding out whether Stripe is back.
    Probing {
        since: Instant,
    },
}

/// What a checkout sells: a plan's price, for `quantity` seats, maybe
/// with a trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub price: String,
    pub quantity: u64,
    /// Days of trial before the first payment.
    pub trial_days: Option<u32>,
    /// The trial starts without a card (`payment_method_collection=
    /// if_required`); the subscription is cancelled at its end if none
    /// was added.
    pub card_optional: bool,
}

/// A plan change on one subscription item: its new price and quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The item (`si_...`) whose price changes.
    pub item: String,
    pub price: String,
    pub quantity: u64,
}

/// Stripe's API, behind a circuit breaker. Registered as app data when
/// Stripe is configured.
pub struct Stripe {
    client: Client,
    state: Mutex<State>,
    open_for: Duration,
    public_url: String,
}

impl Stripe {
    /// `None` without a secret key.
    pub fn new(config: &StripeConfig, public_url: &str) -> anyhow::Result<Option<Self>> {
        let Some(key) = &config.secret_key else { return Ok(None) };
        let client = Client::new(key.expose(), &config.api_base, Duration::from_secs(5))
            .map_err(|e| anyhow::anyhow!("configuring the Stripe client: {e}"))?;
        Ok(Some(Self {
            client,
            state: Mutex::new(State::Closed { failures: 0 }),
            open_for: config.breaker_open,
            public_url: public_url.trim_end_matches('/').to_owned(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self) -> Result<(), BillingError> {
        let mut state = self.state();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(BillingError::StripePaused),
            State::Probing { since } if now.duration_since(since) < PROBE_LOST_AFTER => Err(BillingError::StripePaused),
            State::Open { .. } | State::Probing { .. } => {
                *state = State::Probing { since: now };
                Ok(())
            }
        }
    }

    fn record<T>(&self, result: Result<T, StripeError>, what: &'static str) -> Result<T, BillingError> {
        let err = match result {
            Ok(value) => {
                *self.state() = State::Closed { failures: 0 };
                return Ok(value);
            }
            Err(err) => err,
        };
        let class = err.class();
        let label = match class {
            Class::Permanent => "permanent",
            Class::Later => "later",
            Class::Outage => "outage",
        };
        metrics::counter!("plinth_stripe_errors_total", "class" => label).increment(1);
        {
            let mut state = self.state();
            *state = match (class, *state) {
                (Class::Outage, State::Closed { failures }) if failures + 1 < FAILURES_TO_OPEN => {
                    State::Closed { failures: failures + 1 }
                }
                (Class::Outage, _) => {
                    tracing::warn!(
                        "Stripe failed {FAILURES_TO_OPEN} times in a row; pausing calls for {:?}",
                        self.open_for
                    );
                    State::Open { until: Instant::now() + self.open_for }
                }
                // Stripe answered: it is up.
                (Class::Permanent, _) | (Class::Later, State::Probing { .. }) => State::Closed { failures: 0 },
                // A 429 says nothing about an outage.
                (Class::Later, other) => other,
            };
        }
        Err(match err {
            // The key was used before with other parameters.
            StripeError::Api { status: 400, error }
                if error.type_ == stripe_shared::ApiErrorsType::IdempotencyError =>
            {
                BillingError::StripeKeyReused
            }
            StripeError::Api { status, error } if class == Class::Later => {
                let message = error.message.unwrap_or_default();
                BillingError::StripeBusy { what, status, message }
            }
            StripeError::Api { status, error } if class == Class::Permanent => {
                let code = error.code.as_ref().map(|c| c.as_str().to_owned());
                let message = error.message.unwrap_or_else(|| "(no message)".into());
                tracing::error!(status, code, message, "Stripe refused {what}");
                BillingError::StripeRefused { what, status, code, message }
            }
            other => BillingError::StripeFailed { what, source: other },
        })
    }

    /// `GET /v1{path}` as JSON, retried with backoff.
    async fn get(&self, path: String, query: &[(&str, &str)], what: &'static str) -> Result<Value, BillingError> {
        self.admit()?;
        let mut req = RequestBuilder::new(StripeMethod::Get, path);
        if !query.is_empty() {
            // A map: serde_qs writes it as `key=value&...`.
            req = req.query(&query.iter().copied().collect::<std::collections::BTreeMap<_, _>>());
        }
        let read = self.client.json(req, RequestStrategy::ExponentialBackoff(3)).await;
        self.record(read, what)
    }

    /// The subscription as Stripe has it now.
    pub async fn subscription(&self, id: &str) -> Result<object::Subscription, BillingError> {
        let value = self.get(format!("/subscriptions/{id}"), &[], "reading a subscription").await?;
        object::Subscription::read(&value).map_err(BillingError::Internal)
    }

    /// The invoice as Stripe has it now.
    pub async fn invoice(&self, id: &str) -> Result<object::Invoice, BillingError> {
        let value = self.get(format!("/invoices/{id}"), &[], "reading an invoice").await?;
        object::Invoice::read(&value).map_err(BillingError::Internal)
    }

    /// The `tenant_id` Plinth put in a customer's metadata (none for a
    /// deleted customer).
    pub async fn customer_tenant(&self, customer: &str) -> Result<Option<String>, BillingError> {
        let value = self.get(format!("/customers/{customer}"), &[], "reading a customer").await?;
        Ok(value["metadata"]["tenant_id"].as_str().map(str::to_owned))
    }

    /// The lookup keys of a customer's active entitlements (up to 100).
    pub async fn entitlements_of(&self, customer: &str) -> Result<Vec<String>, BillingError> {
        let query = [("customer", customer), ("limit", "100")];
        let list = self.get("/entitlements/active_entitlements".into(), &query, "listing entitlements").await?;
        Ok(crate::object::lookup_keys(&list))
    }

    /// Every subscription of a customer, ended ones included (up to 100).
    pub async fn subscriptions_of(&self, customer: &str) -> Result<Vec<object::Subscription>, BillingError> {
        let query = [("customer", customer), ("status", "all"), ("limit", "100")];
        let list = self.get("/subscriptions".into(), &query, "listing subscriptions").await?;
        let data = list["data"].as_array().cloned().unwrap_or_default();
        data.iter().map(|s| object::Subscription::read(s).map_err(BillingError::Internal)).collect()
    }

    /// A customer's invoices, newest first (up to 100).
    pub async fn invoices_of(&self, customer: &str) -> Result<Vec<object::Invoice>, BillingError> {
        let query = [("customer", customer), ("limit", "100")];
        let list = self.get("/invoices".into(), &query, "listing invoices").await?;
        let data = list["data"].as_array().cloned().unwrap_or_default();
        data.iter().map(|i| object::Invoice::read(i).map_err(BillingError::Internal)).collect()
    }

    /// Sets a subscription item's quantity, with Stripe's proration. `key`
    /// names this one intent (its retries send the same key, and so are
    /// applied once).
    pub async fn set_quantity(&self, item: &str, quantity: u64, key: String) -> Result<(), BillingError> {
        let form = form([("quantity", quantity.to_string()), ("proration_behavior", "create_prorations".into())]);
        self.post(format!("/subscription_items/{item}"), &form, Some(key), "updating a seat quantity").await.map(drop)
    }

    /// `POST /v1{path}` with `form`, once, or under `key` (retried).
    async fn post(
        &self,
        path: String,
        form: &std::collections::BTreeMap<String, String>,
        key: Option<String>,
        what: &'static str,
    ) -> Result<Value, BillingError> {
        self.admit()?;
        let strategy = match key {
            Some(key) => RequestStrategy::Idempotent(
                stripe_client_core::IdempotencyKey::new(key)
                    .map_err(|e| BillingError::Internal(format!("idempotency key: {e}")))?,
            ),
            None => RequestStrategy::Once,
        };
        let answer = self.client.json(RequestBuilder::new(StripeMethod::Post, path).form(form), strategy).await;
        self.record(answer, what)
    }

    /// Stripe's preview of the invoice that putting `change` on `sub` would
    /// make: with `now`, the one charged at once (its prorations); else the
    /// next renewal's.
    pub async fn preview(&self, sub: &object::Subscription, change: &Change, now: bool) -> Result<Value, BillingError> {
        let form = form([
            ("customer", sub.customer.clone()),
            ("subscription", sub.id.clone()),
            ("subscription_details[items][0][id]", change.item.clone()),
            ("subscription_details[items][0][price]", change.price.clone()),
            ("subscription_details[items][0][quantity]", change.quantity.to_string()),
            ("subscription_details[proration_behavior]", if now { "always_invoice" } else { "none" }.to_owned()),
        ]);
        self.post("/invoices/create_preview".into(), &form, None, "previewing an invoice").await
    }

    /// Puts `change` on `sub` at once, invoicing the prorations now.
    pub async fn change_now(&self, sub: &str, change: &Change) -> Result<Value, BillingError> {
        let form = form([
            ("items[0][id]", change.item.clone()),
            ("items[0][price]", change.price.clone()),
            ("items[0][quantity]", change.quantity.to_string()),
            ("proration_behavior", "always_invoice".to_owned()),
        ]);
        self.post(format!("/subscriptions/{sub}"), &form, None, "changing a subscription").await
    }

    /// Puts `change` on `sub` at the end of its period, with a subscription
    /// schedule (made from the subscription, or its own): the current
    /// phase keeps the price it has until then, the next has the new one,
    /// and the schedule then releases the subscription. The schedule's id.
    pub async fn change_at_period_end(
        &self,
        sub: &object::Subscription,
        current_price: &str,
        change: &Change,
    ) -> Result<String, BillingError> {
        let schedule = match &sub.schedule {
            Some(id) => self.get(format!("/subscription_schedules/{id}"), &[], "reading a schedule").await?,
            // Not keyed: a released schedule's key would replay it. Stripe
            // refuses a second schedule for one subscription.
            None => {
                let form = form([("from_subscription", sub.id.clone())]);
                self.post("/subscription_schedules".into(), &form, None, "scheduling a change").await?
            }
        };
        let id = schedule["id"].as_str().ok_or_else(|| BillingError::Internal("a schedule without an id".into()))?;
        let phase = &schedule["phases"][0];
        let start = phase["start_date"].as_i64().or(schedule["current_phase"]["start_date"].as_i64());
        let end = phase["end_date"].as_i64().or(schedule["current_phase"]["end_date"].as_i64());
        let (Some(start), Some(end)) = (start, end) else {
            return Err(BillingError::Internal(format!("schedule {id} has no current phase")));
        };
        let current_quantity = sub.items.iter().find(|i| i.price == current_price).and_then(|i| i.quantity);
        let form = form([
            ("end_behavior", "release".to_owned()),
            ("proration_behavior", "none".to_owned()),
            ("phases[0][start_date]", start.to_string()),
            ("phases[0][end_date]", end.to_string()),
            ("phases[0][items][0][price]", current_price.to_owned()),
            ("phases[0][items][0][quantity]", current_quantity.unwrap_or(change.quantity).to_string()),
            ("phases[1][items][0][price]", change.price.clone()),
            ("phases[1][items][0][quantity]", change.quantity.to_string()),
        ]);
        self.post(format!("/subscription_schedules/{id}"), &form, None, "scheduling a change").await?;
        Ok(id.to_owned())
    }

    /// Releases a schedule: the subscription goes on as it is now, without
    /// the change the schedule held.
    pub async fn release_schedule(&self, id: &str) -> Result<(), BillingError> {
        let form = form([]);
        self.post(format!("/subscription_schedules/{id}/release"), &form, None, "releasing a schedule").await.map(drop)
    }

    /// Reports `value` units of a meter for `customer` at `timestamp`, once
    /// per `identifier`: Stripe counts an identifier once, and the request's
    /// idempotency key (the same identifier) makes a resend of the same
    /// batch replay Stripe's first answer.
    pub async fn meter_event(
        &self,
        event_name: &str,
        identifier: &str,
        customer: &str,
        value: i64,
        timestamp: i64,
    ) -> Result<(), BillingError> {
        let form = form([
            ("event_name", event_name.to_owned()),
            ("identifier", identifier.to_owned()),
            ("payload[stripe_customer_id]", customer.to_owned()),
            ("payload[value]", value.to_string()),
            ("timestamp", timestamp.to_string()),
        ]);
        let key = Some(format!("plinth-meter-{identifier}"));
        self.post("/billing/meter_events".into(), &form, key, "reporting metered usage").await.map(drop)
    }

    /// Sets whether `sub` ends at the end of its period; Stripe's answer.
    pub async fn cancel_at_period_end(&self, sub: &str, cancel: bool) -> Result<Value, BillingError> {
        let form = form([("cancel_at_period_end", cancel.to_string())]);
        self.post(format!("/subscriptions/{sub}"), &form, None, "changing a subscription").await
    }

    /// The tenant's current Stripe customer: its link; else a customer
    /// Stripe already has for it (searched by `metadata.tenant_id`, and not
    /// one Plinth detached); else a new one, with the tenant id in its
    /// metadata. The creation's idempotency key is the tenant's (and the
    /// count of its earlier customers), so two concurrent first requests
    /// get the same customer.
    pub async fn customer(&self, db: &Db, tenant: TenantId, name: &str) -> Result<String, BillingError> {
        let (current, earlier) = db
            .platform(async |c| {
                Ok::<_, BillingError>((customers::current(c, tenant).await?, customers::count(c, tenant).await?))
            })
            .await?;
        if let Some(id) = current {
            return Ok(id);
        }
        let query = format!("metadata['tenant_id']:'{}'", tenant.0);
        let found = match self.get("/customers/search".into(), &[("query", &query)], "searching customers").await {
            Ok(found) => found,
            // Search is not offered to every account (Stripe refuses it in
            // some countries): create as before.
            Err(BillingError::StripeRefused { .. }) => Value::Null,
            Err(other) => return Err(other),
        };
        let mut candidates = Vec::new();
        for customer in found["data"].as_array().into_iter().flatten() {
            if customer["deleted"].as_bool() == Some(true) {
                continue;
            }
            if let Some(id) = customer["id"].as_str() {
                candidates.push(id.to_owned());
            }
        }
        let mut existing = None;
        for id in candidates {
            let known = db.platform(async |c| Ok::<_, BillingError>(customers::detached(c, &id).await?)).await?;
            if !known {
                existing = Some(id);
                break;
            }
        }
        let id = match existing {
            Some(id) => id,
            None => {
                self.admit()?;
                let key = match earlier {
                    0 => format!("plinth-customer-{}", tenant.0),
                    n => format!("plinth-customer-{}-{n}", tenant.0),
                };
                let key = stripe_client_core::IdempotencyKey::new(key)
                    .map_err(|e| BillingError::Internal(format!("idempotency key: {e}")))?;
                let created = CreateCustomer::new()
                    .name(name)
                    .metadata([("tenant_id".to_owned(), tenant.0.to_string())])
                    .customize()
                    .request_strategy(RequestStrategy::Idempotent(key))
                    .send(&self.client)
                    .await;
                self.record(created, "creating a customer")?.id.as_str().to_owned()
            }
        };
        db.platform(async |c| {
            // Whoever linked first wins; with the shared key it is the same
            // customer anyway.
            if customers::current(c, tenant).await?.is_none() {
                let linked = customers::link(c, tenant, &id, "replaced").await?;
                if let Err(other) = linked {
                    return Err(BillingError::Internal(format!("customer {id} belongs to tenant {other}")));
                }
            }
            customers::current(c, tenant)
                .await?
                .ok_or_else(|| BillingError::Internal("the customer link vanished".into()))
        })
        .await
    }

    /// Whether the tenant has a subscription that has not ended, in
    /// Plinth's records or (for its current customer) in Stripe's.
    pub async fn has_live_subscription(&self, db: &Db, tenant: TenantId, customer: &str) -> Result<bool, BillingError> {
        let local = db.platform(async |c| Ok::<_, BillingError>(live_subscriptions(c, tenant).await?)).await?;
        if local > 0 {
            return Ok(true);
        }
        let subs = self.subscriptions_of(customer).await?;
        Ok(subs.iter().any(|s| !ENDED.contains(&s.status.as_str())))
    }

    /// A Checkout session subscribing the tenant's customer (created on
    /// first need) to `price`; its URL. With `once` (a caller's
    /// `Idempotency-Key`), Stripe creates one session for it however often
    /// it is asked, and refuses it with other parameters. A tenant with a
    /// live subscription gets `AlreadySubscribed`.
    pub async fn checkout_session(
        &self,
        db: &Db,
        tenant: &Tenant,
        item: &Purchase,
        once: Option<&plinth_http::idempotency::Keyed>,
    ) -> Result<String, BillingError> {
        let customer = self.customer(db, tenant.id, &tenant.name).await?;
        if self.has_live_subscription(db, tenant.id, &customer).await? {
            return Err(BillingError::AlreadySubscribed);
        }
        let created = self.create_checkout(tenant, &customer, item, once).await;
        let session = match created {
            // Deleted in Stripe before its `customer.deleted` arrived.
            Err(err) if missing_customer(&err) => {
                db.platform(async |c| {
                    Ok::<_, BillingError>(customers::detach(c, &customer, "deleted in Stripe").await?)
                })
                .await?;
                let customer = self.customer(db, tenant.id, &tenant.name).await?;
                self.create_checkout(tenant, &customer, item, once).await?
            }
            other => other?,
        };
        session.url.ok_or_else(|| BillingError::Internal("Stripe returned no checkout URL".into()))
    }

    async fn create_checkout(
        &self,
        tenant: &Tenant,
        customer: &str,
        purchase: &Purchase,
        once: Option<&plinth_http::idempotency::Keyed>,
    ) -> Result<stripe_shared::CheckoutSession, BillingError> {
        self.admit()?;
        let item = CreateCheckoutSessionLineItems {
            price: Some(purchase.price.clone()),
            quantity: Some(purchase.quantity),
            ..Default::default()
        };
        let strategy = match once {
            // Stripe's keys are per account and 255 characters at most: the
            // caller, their key and the customer, hashed (a new customer
            // is a new request).
            Some(keyed) => {
                let digest = Sha256::new()
                    .chain_update(keyed.caller().as_bytes())
                    .chain_update([0])
                    .chain_update(keyed.key().as_bytes())
                    .chain_update([0])
                    .chain_update(customer.as_bytes())
                    .finalize();
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                let key = stripe_client_core::IdempotencyKey::new(format!("plinth-checkout-{hex}"))
                    .map_err(|e| BillingError::Internal(format!("idempotency key: {e}")))?;
                RequestStrategy::Idempotent(key)
            }
            None => RequestStrategy::Once,
        };
        let mut subscription = CreateCheckoutSessionSubscriptionData::new();
        subscription.metadata = Some([("tenant_id".to_owned(), tenant.id.to_string())].into());
        subscription.trial_period_days = purchase.trial_days;
        let mut session = CreateCheckoutSession::new();
        if purchase.card_optional {
            // A trial without a card: cancelled at its end unless one was
            // added, which ends the paid plan.
            session = session.payment_method_collection(CreateCheckoutSessionPaymentMethodCollection::IfRequired);
            subscription.trial_settings = Some(CreateCheckoutSessionSubscriptionDataTrialSettings::new(
                CreateCheckoutSessionSubscriptionDataTrialSettingsEndBehavior::new(
                    CreateCheckoutSessionSubscriptionDataTrialSettingsEndBehaviorMissingPaymentMethod::Cancel,
                ),
            ));
        }
        let session = session
            .mode(stripe_shared::CheckoutSessionMode::Subscription)
            .customer(customer)
            .client_reference_id(tenant.id.to_string())
            .line_items(vec![item])
            .subscription_data(subscription)
            .success_url(format!("{}/billing/success?session_id={{CHECKOUT_SESSION_ID}}", self.public_url))
            .cancel_url(format!("{}/billing/cancelled", self.public_url))
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await;
        self.record(session, "creating a checkout session")
    }

    /// A Customer Portal session for the tenant's customer; its URL.
    pub async fn portal_session(&self, db: &Db, tenant: &Tenant) -> Result<String, BillingError> {
        let customer = self.customer(db, tenant.id, &tenant.name).await?;
        match self.create_portal(&customer).await {
            Err(err) if missing_customer(&err) => {
                db.platform(async |c| {
                    Ok::<_, BillingError>(customers::detach(c, &customer, "deleted in Stripe").await?)
                })
                .await?;
                let customer = self.customer(db, tenant.id, &tenant.name).await?;
                self.create_portal(&customer).await
            }
            other => other,
        }
    }

    async fn create_portal(&self, customer: &str) -> Result<String, BillingError> {
        self.admit()?;
        let session = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(format!("{}/billing", self.public_url))
            .send(&self.client)
            .await;
        Ok(self.record(session, "creating a portal session")?.url)
    }

    /// Cancels a subscription now (idempotent: keyed by the subscription).
    async fn cancel(&self, id: &str) -> Result<(), BillingError> {
        self.admit()?;
        let key = stripe_client_core::IdempotencyKey::new(format!("plinth-cancel-{id}"))
            .map_err(|e| BillingError::Internal(format!("idempotency key: {e}")))?;
        let req = RequestBuilder::new(StripeMethod::Delete, format!("/subscriptions/{id}"));
        let cancelled = self.client.json(req, RequestStrategy::Idempotent(key)).await;
        self.record(cancelled, "cancelling a subscription").map(drop)
    }

    /// Before a tenant is deleted: cancels every subscription of every
    /// customer it has had that has not ended, and records what was done
    /// per customer. Fails (and nothing is recorded for the customer that
    /// failed) when Stripe cannot be reached: the deletion must wait.
    async fn cancel_everything_of(&self, db: &Db, tenant: TenantId) -> Result<Vec<String>, BillingError> {
        let all = db.platform(async |c| Ok::<_, BillingError>(customers::all(c, tenant).await?)).await?;
        let mut cancelled = Vec::new();
        for customer in all {
            let subs = self.subscriptions_of(&customer).await?;
            let mut here = Vec::new();
            for sub in subs.iter().filter(|s| !ENDED.contains(&s.status.as_str())) {
                self.cancel(&sub.id).await?;
                here.push(sub.id.clone());
            }
            let result = json!({ "cancelled": here });
            db.platform(async |c| {
                Ok::<_, BillingError>(customers::record_closure(c, tenant, &customer, &result).await?)
            })
            .await?;
            cancelled.extend(here);
        }
        Ok(cancelled)
    }
}

/// Before a tenant is deleted: its live subscriptions are cancelled in
/// Stripe and the result recorded per customer (`public.billing_closures`),
/// so later events about those customers are recorded and ignored. Fails,
/// and the deletion must wait, when Stripe cannot be reached, or when the
/// tenant has live subscriptions and this server has no Stripe key. The ids
/// of the cancelled subscriptions.
pub async fn close_tenant(db: &Db, api: Option<&Stripe>, tenant: TenantId) -> Result<Vec<String>, BillingError> {
    let (all, live) = db
        .platform(async |c| {
            Ok::<_, BillingError>((customers::all(c, tenant).await?, live_subscriptions(c, tenant).await?))
        })
        .await?;
    if all.is_empty() {
        return Ok(Vec::new());
    }
    match api {
        Some(api) => api.cancel_everything_of(db, tenant).await,
        None if live == 0 => {
            let result = json!({ "cancelled": [], "stripe": "not configured; no live subscription known" });
            db.platform(async |c| {
                for customer in &all {
                    customers::record_closure(c, tenant, customer, &result).await?;
                }
                Ok::<_, BillingError>(())
            })
            .await?;
            Ok(Vec::new())
        }
        None => Err(BillingError::NotConfigured),
    }
}

/// A form body from its fields.
fn form<const N: usize>(fields: [(&str, String); N]) -> std::collections::BTreeMap<String, String> {
    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Stripe says the customer named in the request does not exist (deleted).
fn missing_customer(err: &BillingError) -> bool {
    matches!(err, BillingError::StripeRefused { code: Some(code), message, .. }
        if code == "resource_missing" && message.contains("customer"))
}

/// How many of the tenant's subscriptions have not ended, in Plinth's records.
pub async fn live_subscriptions(c: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<i64> {
    use diesel::{ExpressionMethods as _, QueryDsl as _};
    use diesel_async::RunQueryDsl as _;

    use crate::schema::subscriptions;
    subscriptions::table
        .filter(subscriptions::tenant_id.eq(tenant.0))
        .filter(subscriptions::deleted.eq(false))
        .filter(subscriptions::status.ne_all(ENDED))
        .count()
        .get_result(c)
        .await
}

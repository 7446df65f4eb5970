//! Processing stored Stripe events: subscription state → the tenant's plan.
//!
//! Each stored event is processed by a job (`billing.event`), exactly once
//! per event id: the inbox row is locked and marked `processed` in the same
//! transaction as everything the event changes, mail included (the outbox
//! is keyed by event id and recipient).
//!
//! An event is read by its `type` and its object's fields
//! ([`crate::object`]), in whatever API version it was rendered. Events of
//! one Stripe customer are processed one at a time (a transaction advisory
//! lock on the customer id). With Stripe configured, a subscription event
//! re-reads the subscription from Stripe's API and applies what Stripe has
//! now, so late and reordered deliveries cannot roll it back; while Stripe
//! is unreachable the event waits and its job retries. Offline (no secret
//! key, or `PLINTH_BILLING_OFFLINE=true`) the events' own payloads are
//! applied in order of Stripe's timestamps (within one second, in the order
//! a subscription lives: incomplete, trialing, active, ended): an event
//! older than the newest one applied to its subscription is recorded and
//! skipped.
//!
//! The tenant's plan comes from all its subscriptions: the best plan any
//! one in good standing pays for (`trialing`, `active`, or `past_due`
//! within the grace period); else, restricted (reads only), the best an
//! overdue one pays for (`past_due` past the grace, `unpaid`); free when
//! none is left. An operator's plan (set by a platform admin or the CLI)
//! stays until a subscription grants a different paid plan, and is never
//! restricted; the periodic sync changes only plans billing set.
//!
//! Every job's kind and handler are in `process/worker.rs`. Billing's
//! other jobs: `billing.grace` and `billing.reminder` (the end of
//! a past-due episode's grace, and the reminder before it), `billing.seats`
//! (per-seat quantities, `process/seats.rs`), `billing.sync` (the periodic
//! re-read, `process/sync.rs`) and `billing.meters` (metered usage,
//! [`crate::usage`]).
//!
//! An event naming a customer no tenant is linked to (yet), or a price the
//! catalog does not know on a live subscription, is parked with the reason
//! and retried with backoff. One that retrying cannot fix (Stripe refused
//! the re-read, another mode's event, a body that is not an event) is
//! parked for good: its job ends, and `plinth billing replay` runs it again
//! once the cause is fixed. Nothing is dropped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::Text;
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::Catalog;

use crate::config::StripeConfig;
use crate::customers;
use crate::error::BillingError;
use crate::object::{self, CheckoutSession, Invoice};
use crate::schema::{stripe_events, subscriptions};
use crate::stripe::ENDED;

use plinth_tenants::{Db, TenantId, registry};
use serde_json::{Value, json};

mod entitlements;
mod notices;
mod plan;
mod seats;
mod sync;
mod worker;
use notices::{cancelled_mail, notify_owners};
pub use seats::{QueueSeats, SEATS, billable, seats_job};
pub use sync::Synced;
pub use worker::{GRACE, METERS, PROCESS, REMINDER, SYNC, job, meters_job, sync_job};

/// What processing made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Older than what was applied already; recorded, nothing changed.
    Stale,
    /// Not an event Plinth acts on, or one about nothing Plinth has any
    /// more (a deleted tenant's customer, a paid invoice).
    Ignored,
    /// Processed before (a replayed job).
    AlreadyProcessed,
    /// Waiting, with the reason; retried later.
    Parked(String),
    /// Parked for good: retrying cannot help (Stripe refused, another
    /// mode's event). `plinth billing replay` once the cause is fixed.
    Refused(String),
}

impl Outcome {
    /// The outcome as a metric label.
    fn label(&self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Stale => "stale",
            Self::Ignored => "ignored",
            Self::AlreadyProcessed => "already_processed",
            Self::Parked(_) => "parked",
            Self::Refused(_) => "refused",
        }
    }
}

pub struct Processor {
    db: Db,
    catalog: Arc<Catalog>,
    grace: Duration,
    /// The mode events must be in (`None`: not compared).
    livemode: Option<bool>,
    /// Features come from Stripe's entitlements (`PLINTH_BILLING_FEATURES`).
    features_from_stripe: bool,
    /// Stripe's API, to re-read subscriptions; `None` applies the events'
    /// own payloads in timestamp order (offline).
    api: Option<Arc<crate::stripe::Stripe>>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = stripe_events)]
struct EventRow {
    payload: String,
    status: String,
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = subscriptions)]
struct SubscriptionRow {
    status: String,
    plan: Option<String>,
    last_event_at: DateTime<Utc>,
    deleted: bool,
    past_due_since: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
}

/// Why an event waits: `retry` when retrying later may help.
struct Park {
    reason: String,
    retry: bool,
}

impl Park {
    fn wait(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), retry: true }
    }

    fn refuse(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), retry: false }
    }
}

impl From<diesel::result::Error> for Park {
    fn from(e: diesel::result::Error) -> Self {
        Park::wait(format!("database: {e}"))
    }
}

impl From<BillingError> for Park {
    fn from(e: BillingError) -> Self {
        let (transient, database) = (e.transient(), matches!(e, BillingError::Db(_) | BillingError::Pool(_)));
        let reason = format!("{:#}", anyhow::Error::new(e));
        match (transient, database) {
            (true, true) => Park::wait(format!("database, will retry: {reason}")),
            (true, false) => Park::wait(format!("Stripe unavailable, will retry: {reason}")),
            (false, _) => Park::refuse(reason),
        }
    }
}

/// How processing an event's transaction ended without applying it: both
/// roll the transaction back.
enum Fail {
    Park(Park),
    Error(BillingError),
}

impl From<diesel::result::Error> for Fail {
    fn from(e: diesel::result::Error) -> Self {
        Fail::Error(e.into())
    }
}

impl From<plinth_tenants::db::PoolError> for Fail {
    fn from(e: plinth_tenants::db::PoolError) -> Self {
        Fail::Error(e.into())
    }
}

/// The subscription events: each re-reads the subscription where Stripe
/// is configured.
const SUBSCRIPTION_EVENTS: [&str; 7] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.pending_update_applied",
    "customer.subscription.pending_update_expired",
];

/// The invoice events: each keeps the invoice mirror (the failures also
/// mail the owners).
const INVOICE_EVENTS: [&str; 9] = [
    "invoice.created",
    "invoice.finalized",
    "invoice.updated",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.voided",
    "invoice.marked_uncollectible",
    "invoice.payment_failed",
    "invoice.payment_action_required",
];

/// The event that reports a customer's active entitlements.
const ENTITLEMENTS: &str = "entitlements.active_entitlement_summary.updated";

/// The invoice events that say it was paid: a past-due subscription's
/// payment lifts its restriction at once.
const PAID_EVENTS: [&str; 2] = ["invoice.paid", "invoice.payment_succeeded"];

/// What Stripe had for an event when it was read, before the event's
/// transaction (none offline).
#[derive(Default)]
struct Fetched {
    /// The subscription, and when it was read.
    subscription: Option<(object::Subscription, DateTime<Utc>)>,
    invoice: Option<Invoice>,
    /// The `tenant_id` in the metadata of a customer no tenant is linked to.
    customer_tenant: Option<String>,
    /// The customer's active entitlements (lookup keys), and when read.
    entitlements: Option<(Vec<String>, DateTime<Utc>)>,
}

/// The tenant an event's customer belongs to.
enum Owner {
    Tenant(TenantId),
    /// Its tenant was deleted (and its subscriptions cancelled then).
    Closed,
}

/// Why a subscription's state is being applied: an event (which may change
/// the plan and send mail) or the periodic sync (which records the state
/// and then settles the plan once per tenant).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Event,
    Sync,
}

impl Processor {
    pub fn new(
        db: Db,
        catalog: Arc<Catalog>,
        config: &StripeConfig,
        api: Option<Arc<crate::stripe::Stripe>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            db,
            catalog,
            grace: config.grace,
            livemode: config.livemode,
            features_from_stripe: config.features_from_stripe,
            api,
        })
    }

    fn grace(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.grace).unwrap_or_default()
    }

    /// Processes a stored event again (`plinth billing replay`): a parked
    /// or processed event is read afresh from its stored body. Applying it
    /// is idempotent: an older state than the applied one is skipped, and
    /// mail is keyed by event and recipient.
    pub async fn replay(&self, event_id: &str) -> Result<Outcome, BillingError> {
        let known = self
            .db
            .platform(async |c| {
                let n = diesel::update(stripe_events::table.find(event_id))
                    .set((stripe_events::status.eq("received"), stripe_events::parked_reason.eq(None::<String>)))
                    .execute(c)
                    .await?;
                Ok::<_, BillingError>(n)
            })
            .await?;
        if known == 0 {
            return Err(BillingError::NoSuchEvent(event_id.to_owned()));
        }
        self.process(event_id).await
    }

    /// What Stripe has now for an event, read before any transaction is
    /// opened: a slow Stripe holds no connection and no lock. Read again
    /// at each attempt; whatever was read is applied only if nothing newer
    /// was applied meanwhile (stamped with the time of the read).
    async fn fetch(&self, event_id: &str) -> Result<Fetched, Park> {
        let Some(api) = &self.api else { return Ok(Fetched::default()) };
        let payload: Option<String> = self
            .db
            .platform(async |c| {
                Ok::<_, BillingError>(
                    stripe_events::table.find(event_id).select(stripe_events::payload).first(c).await.optional()?,
                )
            })
            .await?;
        let Some(body) = payload.and_then(|p| serde_json::from_str::<Value>(&p).ok()) else {
            return Ok(Fetched::default());
        };
        // Another mode's event is parked for good without asking Stripe.
        if self.livemode.zip(body["livemode"].as_bool()).is_some_and(|(expected, live)| expected != live) {
            return Ok(Fetched::default());
        }
        let object = &body["data"]["object"];
        let mut fetched = Fetched::default();
        let customer = match body["type"].as_str().unwrap_or_default() {
            kind if SUBSCRIPTION_EVENTS.contains(&kind) => {
                let Ok(sub) = object::Subscription::read(object) else { return Ok(fetched) };
                let at = Utc::now();
                fetched.subscription = Some((api.subscription(&sub.id).await?, at));
                Some(sub.customer).filter(|_| sub.tenant.is_none())
            }
            ENTITLEMENTS if self.features_from_stripe => {
                let Some(customer) = object["customer"].as_str() else { return Ok(fetched) };
                let at = Utc::now();
                fetched.entitlements = Some((api.entitlements_of(customer).await?, at));
                Some(customer.to_owned())
            }
            kind if INVOICE_EVENTS.contains(&kind) => {
                let Ok(invoice) = Invoice::read(object) else { return Ok(fetched) };
                fetched.invoice = Some(api.invoice(&invoice.id).await?);
                // A payment may end a past-due episode: its subscription
                // as Stripe has it now, applied with the invoice.
                if PAID_EVENTS.contains(&kind)
                    && let Some(sub) = &invoice.subscription
                {
                    let at = Utc::now();
                    fetched.subscription = match api.subscription(sub).await {
                        Ok(current) => Some((current, at)),
                        // No such subscription: nothing for the payment to
                        // lift; the invoice is still mirrored.
                        Err(BillingError::StripeRefused { status: 404, .. }) => None,
                        Err(other) => return Err(other.into()),
                    };
                }
                invoice.customer
            }
            _ => None,
        };
        // A customer no tenant is linked to: its metadata may name one.
        if let Some(customer) = customer {
            let known = self
                .db
                .platform(async |c| {
                    Ok::<_, BillingError>(
                        customers::tenant_of(c, &customer).await?.is_some()
                            || customers::closure(c, &customer).await?.is_some(),
                    )
                })
                .await?;
            if !known {
                fetched.customer_tenant = api.customer_tenant(&customer).await?;
            }
        }
        Ok(fetched)
    }

    /// Processes one stored event (see the module documentation).
    pub async fn process(&self, event_id: &str) -> Result<Outcome, BillingError> {
        let fetched = self.fetch(event_id).await;
        let outcome = self
            .db
            .platform(async |c| {
                let fetched = fetched.map_err(Fail::Park)?;
                let row: Option<EventRow> = stripe_events::table
                    .find(event_id)
                    .select(EventRow::as_select())
                    .for_update()
                    .first(c)
                    .await
                    .optional()?;
                let Some(row) = row else { return Err(Fail::Park(Park::refuse("no such event"))) };
                if row.status == "processed" {
                    return Ok((Outcome::AlreadyProcessed, row.received_at));
                }
                let outcome = self.apply(c, event_id, &row, &fetched).await.map_err(Fail::Park)?;
                Ok((outcome, row.received_at))
            })
            .await;
        match outcome {
            Ok((outcome, received_at)) => {
                metrics::counter!("plinth_stripe_events_processed_total", "outcome" => outcome.label()).increment(1);
                if outcome != Outcome::AlreadyProcessed {
                    let delay = (Utc::now() - received_at).to_std().unwrap_or_default();
                    metrics::histogram!("plinth_stripe_event_delay_seconds").record(delay.as_secs_f64());
                }
                Ok(outcome)
            }
            // Whatever the event changed before it had to wait was rolled
            // back with its transaction; record why it waits.
            Err(Fail::Park(Park { reason, retry })) => {
                if !self.park(event_id, &reason).await? {
                    // A replay applied it between this attempt's
                    // transaction and now.
                    return Ok(Outcome::AlreadyProcessed);
                }
                if retry {
                    tracing::warn!(stripe.event = event_id, reason, "Stripe event parked");
                } else {
                    tracing::error!(stripe.event = event_id, reason, "Stripe event parked for good");
                }
                let outcome = if retry { Outcome::Parked(reason) } else { Outcome::Refused(reason) };
                metrics::counter!("plinth_stripe_events_processed_total", "outcome" => outcome.label()).increment(1);
                Ok(outcome)
            }
            Err(Fail::Error(err)) => Err(err),
        }
    }

    /// Records why an event waits, unless it has been processed since the
    /// attempt's transaction ended (a concurrent `plinth billing replay`):
    /// parking must not turn an applied event back into a waiting one.
    /// False when it was processed.
    async fn park(&self, event_id: &str, reason: &str) -> Result<bool, BillingError> {
        self.db
            .platform(async |c| {
                let n =
                    diesel::update(stripe_events::table.find(event_id).filter(stripe_events::status.ne("processed")))
                        .set((stripe_events::status.eq("parked"), stripe_events::parked_reason.eq(reason)))
                        .execute(c)
                        .await?;
                Ok::<_, BillingError>(n == 1)
            })
            .await
    }

    /// Applies one event in the caller's transaction; marks it processed.
    async fn apply(
        &self,
        c: &mut AsyncPgConnection,
        event_id: &str,
        row: &EventRow,
        fetched: &Fetched,
    ) -> Result<Outcome, Park> {
        let body: Value =
            serde_json::from_str(&row.payload).map_err(|_| Park::refuse("the event does not parse as JSON"))?;
        let object = &body["data"]["object"];
        let kind = body["type"].as_str().ok_or_else(|| Park::refuse("the event has no type"))?;
        if !object.is_object() {
            return Err(Park::refuse("the event has no data.object"));
        }
        let created = row.created_at.ok_or_else(|| Park::refuse("the event has no creation time"))?;
        if let (Some(expected), Some(live)) = (self.livemode, body["livemode"].as_bool())
            && expected != live
        {
            let (event, key) = if live { ("live", "test") } else { ("test", "live") };
            return Err(Park::refuse(format!("a {event}-mode event, and this server's Stripe mode is {key}")));
        }
        let outcome = match kind {
            "checkout.session.completed" => self.checkout_completed(c, object).await?,
            kind if SUBSCRIPTION_EVENTS.contains(&kind) => {
                let sub = object::Subscription::read(object).map_err(Park::refuse)?;
                lock_customer(c, &sub.customer).await?;
                let named = sub.tenant.clone().or_else(|| fetched.customer_tenant.clone());
                let tenant = match self.owner(c, &sub.customer, named.as_deref()).await? {
                    Owner::Tenant(tenant) => tenant,
                    Owner::Closed => return self.done(c, event_id, Outcome::Ignored).await,
                };
                match &fetched.subscription {
                    // Whatever this event says, apply what Stripe had when
                    // it was read (unless something newer was applied since).
                    Some((current, read_at)) => {
                        let kind = current.as_event();
                        let customer = current.customer.clone();
                        self.apply_subscription(c, event_id, kind, *read_at, tenant, &customer, current, Mode::Event)
                            .await?
                    }
                    None => {
                        self.apply_subscription(c, event_id, kind, created, tenant, &sub.customer, &sub, Mode::Event)
                            .await?
                    }
                }
            }
            "customer.subscription.trial_will_end" => {
                let sub = object::Subscription::read(object).map_err(Park::refuse)?;
                lock_customer(c, &sub.customer).await?;
                let tenant = match self.owner(c, &sub.customer, sub.tenant.as_deref()).await? {
                    Owner::Tenant(tenant) => tenant,
                    Owner::Closed => return self.done(c, event_id, Outcome::Ignored).await,
                };
                let plan = self.best_item(&sub).map(|(_, plan)| plan).unwrap_or_else(|| "paid".into());
                let trial_end = sub
                    .trial_end
                    .and_then(|t| DateTime::from_timestamp(t, 0))
                    .map(|t| t.format("%Y-%m-%d").to_string())
                    .unwrap_or_default();
                notify_owners(c, tenant, event_id, |to, t, org, key| {
                    crate::mail::trial_ending(to, t, org, &plan, &trial_end, key)
                })
                .await?;
                Outcome::Applied
            }
            "customer.deleted" => {
                let customer = object["id"].as_str().ok_or_else(|| Park::refuse("the customer has no id"))?;
                lock_customer(c, customer).await?;
                self.customer_deleted(c, event_id, customer).await?
            }
            kind if INVOICE_EVENTS.contains(&kind) => {
                let invoice = Invoice::read(object).map_err(Park::refuse)?;
                let customer = invoice.customer.clone().ok_or_else(|| Park::refuse("the invoice has no customer"))?;
                lock_customer(c, &customer).await?;
                let tenant = match self.owner(c, &customer, fetched.customer_tenant.as_deref()).await? {
                    Owner::Tenant(tenant) => tenant,
                    Owner::Closed => return self.done(c, event_id, Outcome::Ignored).await,
                };
                // The mirror keeps what Stripe had when it was read (or the
                // event's own copy, offline).
                crate::invoices::record(c, tenant, &customer, fetched.invoice.as_ref().unwrap_or(&invoice)).await?;
                match kind {
                    "invoice.payment_failed" | "invoice.payment_action_required" => {
                        self.dunning(c, kind, created, tenant, &invoice, fetched.invoice.as_ref()).await?
                    }
                    kind if PAID_EVENTS.contains(&kind) => {
                        self.paid(c, event_id, created, tenant, &invoice, fetched.subscription.as_ref()).await?
                    }
                    _ => Outcome::Applied,
                }
            }
            ENTITLEMENTS if self.features_from_stripe => {
                let customer = object["customer"]
                    .as_str()
                    .ok_or_else(|| Park::refuse("the entitlement summary has no customer"))?;
                lock_customer(c, customer).await?;
                let tenant = match self.owner(c, customer, fetched.customer_tenant.as_deref()).await? {
                    Owner::Tenant(tenant) => tenant,
                    Owner::Closed => return self.done(c, event_id, Outcome::Ignored).await,
                };
                // What Stripe had when it was read, else the summary's own.
                let (keys, at) = fetched
                    .entitlements
                    .clone()
                    .unwrap_or_else(|| (object::lookup_keys(&object["entitlements"]), created));
                self.entitlements(c, tenant, customer, keys, at).await?
            }
            // The plan follows the subscription's own events; features come
            // from the catalog unless PLINTH_BILLING_FEATURES=stripe.
            _ => Outcome::Ignored,
        };
        self.done(c, event_id, outcome).await
    }

    /// Marks the event processed with `outcome`.
    async fn done(&self, c: &mut AsyncPgConnection, event_id: &str, outcome: Outcome) -> Result<Outcome, Park> {
        diesel::update(stripe_events::table.find(event_id))
            .set((
                stripe_events::status.eq("processed"),
                stripe_events::parked_reason.eq(None::<String>),
                stripe_events::processed_at.eq(diesel::dsl::now),
            ))
            .execute(c)
            .await?;
        Ok(outcome)
    }

    /// `checkout.session.completed`: the session's customer becomes the
    /// tenant's current one (a newer checkout replaces an older customer).
    async fn checkout_completed(&self, c: &mut AsyncPgConnection, object: &Value) -> Result<Outcome, Park> {
        let session = CheckoutSession::read(object).map_err(Park::refuse)?;
        let customer = session.customer.ok_or_else(|| Park::refuse("the checkout session has no customer"))?;
        lock_customer(c, &customer).await?;
        let tenant = session
            .tenant
            .as_deref()
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
            .map(TenantId)
            .ok_or_else(|| Park::refuse("the checkout session names no tenant (client_reference_id)"))?;
        if registry::find_by_id(c, tenant).await?.is_none() {
            if customers::closure(c, &customer).await?.is_some() {
                return Ok(Outcome::Ignored);
            }
            return Err(Park::refuse(format!("no tenant {tenant}")));
        }
        if let Err(other) = customers::link(c, tenant, &customer, "replaced by a newer checkout").await? {
            return Err(Park::refuse(format!("customer {customer} belongs to another tenant ({other})")));
        }
        Ok(Outcome::Applied)
    }

    /// The tenant of a customer: its link; else the tenant `named` by the
    /// `tenant_id` Plinth puts in the subscription's metadata at checkout,
    /// or in the customer's (read from Stripe, where it is configured,
    /// before the transaction). A customer whose tenant was deleted is
    /// `Closed`.
    async fn owner(&self, c: &mut AsyncPgConnection, customer: &str, named: Option<&str>) -> Result<Owner, Park> {
        if let Some(tenant) = customers::tenant_of(c, customer).await? {
            return Ok(Owner::Tenant(tenant));
        }
        if customers::closure(c, customer).await?.is_some() {
            return Ok(Owner::Closed);
        }
        if let Some(tenant) = named.and_then(|m| uuid::Uuid::parse_str(m).ok()).map(TenantId)
            && registry::find_by_id(c, tenant).await?.is_some()
            && customers::link(c, tenant, customer, "replaced").await?.is_ok()
        {
            return Ok(Owner::Tenant(tenant));
        }
        Err(Park::wait(format!("unknown customer {customer}")))
    }

    /// `customer.deleted`: the customer is detached from its tenant (the
    /// next checkout creates a new one), and its subscriptions, which Stripe
    /// cancelled with it, end.
    async fn customer_deleted(
        &self,
        c: &mut AsyncPgConnection,
        event_id: &str,
        customer: &str,
    ) -> Result<Outcome, Park> {
        let Some(tenant) = customers::tenant_of(c, customer).await? else { return Ok(Outcome::Ignored) };
        customers::detach(c, customer, "deleted in Stripe").await?;
        let before = self.granted_plan(c, tenant).await?;
        let ended: Vec<Option<String>> = diesel::update(
            subscriptions::table
                .filter(subscriptions::customer_id.eq(customer))
                .filter(subscriptions::deleted.eq(false))
                .filter(subscriptions::status.ne_all(ENDED)),
        )
        .set((
            subscriptions::status.eq("canceled"),
            subscriptions::deleted.eq(true),
            subscriptions::updated_at.eq(diesel::dsl::now),
        ))
        .returning(subscriptions::plan)
        .get_results(c)
        .await?;
        let details = json!({ "by": "stripe", "event": event_id, "customer": "deleted" });
        let changed = self.settle(c, tenant, before, Mode::Event, details).await?;
        let plan = ended.into_iter().flatten().max_by_key(|p| self.rank(p));
        cancelled_mail(c, tenant, event_id, changed, plan).await?;
        Ok(Outcome::Applied)
    }
}

async fn lock_customer(c: &mut AsyncPgConnection, customer: &str) -> Result<(), Park> {
    // Raw SQL: an advisory-lock function diesel has no declaration for.
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext('stripe:' || $1))")
        .bind::<Text, _>(customer)
        .execute(c)
        .await?;
    Ok(())
}

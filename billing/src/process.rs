//! Processing stored Stripe events: subscription state → the tenant's plan.
//!
//! Each stored event is processed by a job (`billing.event`), exactly once
//! per event id: the inbox row is locked and marked `processed` in the same
//! transaction as everything the event changes, mail included (the outbox
//! is keyed by event id and recipient).
//!
//! Events of one Stripe customer are processed one at a time (a
//! transaction advisory lock on the customer id). With Stripe configured, a
//! subscription event re-reads the subscription from Stripe's API and
//! applies what Stripe has now, so late and reordered deliveries cannot
//! roll it back; while Stripe is unreachable the event waits and its job
//! retries. Offline (no secret key, or `PLINTH_BILLING_OFFLINE=true`) the
//! events' own payloads are applied in order of Stripe's timestamps: an
//! event older than the newest one applied to its subscription is recorded
//! and skipped.
//!
//! | subscription status | plan |
//! |---|---|
//! | `trialing`, `active` | the catalog plan of its price (an unknown price is parked) |
//! | `past_due` | kept for the grace period, then free |
//! | `unpaid`, `canceled`, `paused`, `incomplete_expired`, deleted | free |
//! | `incomplete` | unchanged |
//!
//! An event naming a customer no tenant is linked to (yet), a tenant that
//! does not exist, a price the catalog does not know, or a body that does
//! not parse is parked with the reason and retried with backoff; nothing is
//! dropped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::Text;
use diesel::upsert::excluded;
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{Catalog, catalog::FREE, change_plan};
use plinth_identity::members;

use crate::error::BillingError;
use crate::schema::{billing_customers, stripe_events, subscriptions};
use plinth_jobs::{self as jobs, ClaimedJob, JobError, NewJob};
use plinth_mail::{self as mail, EmailAddress, Mail};
use plinth_tenants::audit::Actor;
use plinth_tenants::{Db, TenantId, registry};
use serde_json::{Value, json};
use stripe_shared::{CheckoutSession, Invoice, Subscription, SubscriptionStatus};

mod sync;
pub use sync::Synced;

/// Job kind: process one stored event (payload `{"id": "evt_..."}`).
pub const PROCESS: &str = "billing.event";
/// Job kind: end a past-due subscription's grace (payload `{"subscription", "since"}`).
pub const GRACE: &str = "billing.grace";
/// Job kind: the periodic `sync` (payload `{"every_secs"}`), queued again
/// by each run; its dedup key is the period, so instances share one.
pub const SYNC: &str = "billing.sync";

/// The next periodic sync, `every` after the current period began.
pub fn sync_job(every: Duration) -> NewJob {
    let secs = every.as_secs().max(60);
    let now = Utc::now().timestamp();
    let next = (now / secs as i64 + 1) * secs as i64;
    NewJob {
        dedup_key: Some(format!("sync:{next}")),
        run_at: DateTime::from_timestamp(next, 0),
        max_attempts: 3,
        ..NewJob::new(SYNC, json!({ "every_secs": secs }))
    }
}

/// The job that processes a stored event, queued in the inbox's transaction.
pub fn job(event_id: &str) -> NewJob {
    NewJob { dedup_key: Some(event_id.to_owned()), max_attempts: 20, ..NewJob::new(PROCESS, json!({ "id": event_id })) }
}

/// What processing made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Older than what was applied already; recorded, nothing changed.
    Stale,
    /// Not an event Plinth acts on.
    Ignored,
    /// Processed before (a replayed job).
    AlreadyProcessed,
    /// Waiting, with the reason; retried later.
    Parked(String),
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
        }
    }
}

pub struct Processor {
    db: Db,
    catalog: Arc<Catalog>,
    grace: Duration,
    /// Stripe's API, to re-read subscriptions; `None` applies the events'
    /// own payloads in timestamp order (offline).
    api: Option<Arc<crate::api::Stripe>>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = stripe_events)]
struct EventRow {
    kind: Option<String>,
    payload: String,
    status: String,
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = subscriptions)]
struct SubscriptionRow {
    status: String,
    last_event_at: DateTime<Utc>,
    deleted: bool,
    past_due_since: Option<DateTime<Utc>>,
}

/// Why an event waits.
struct Park(String);

/// How processing an event's transaction ended without applying it: both
/// roll the transaction back.
enum Fail {
    Park(String),
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

impl From<diesel::result::Error> for Park {
    fn from(e: diesel::result::Error) -> Self {
        Park(format!("database: {e}"))
    }
}

fn parse<T: miniserde::Deserialize>(object: &Value, what: &str) -> Result<T, Park> {
    miniserde::json::from_str(&object.to_string()).map_err(|_| Park(format!("the {what} does not parse")))
}

fn status_name(status: &SubscriptionStatus) -> &str {
    status.as_str()
}

impl Processor {
    pub fn new(db: Db, catalog: Arc<Catalog>, grace: Duration, api: Option<Arc<crate::api::Stripe>>) -> Arc<Self> {
        Arc::new(Self { db, catalog, grace, api })
    }

    /// The job handlers of billing.
    pub fn handlers(self: &Arc<Self>) -> Vec<(&'static str, jobs::Handler)> {
        let process = Arc::clone(self);
        let grace = Arc::clone(self);
        let sync = Arc::clone(self);
        vec![
            (
                PROCESS,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&process);
                    Box::pin(async move {
                        let id = job.payload["id"].as_str().unwrap_or_default().to_owned();
                        match this.process(&id).await {
                            Ok(Outcome::Parked(reason)) => Err(JobError::Retry(anyhow::anyhow!("parked: {reason}"))),
                            Ok(_) => Ok(()),
                            Err(err) => Err(JobError::Retry(anyhow::Error::new(err).context("processing the event"))),
                        }
                    })
                }),
            ),
            (
                GRACE,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&grace);
                    Box::pin(async move {
                        this.end_grace(&job.payload)
                            .await
                            .map_err(|e| JobError::Retry(anyhow::Error::new(e).context("ending a grace period")))
                    })
                }),
            ),
            (
                SYNC,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&sync);
                    Box::pin(async move {
                        let every = Duration::from_secs(job.payload["every_secs"].as_u64().unwrap_or(3600));
                        let result = this.sync().await;
                        // The next run is queued whatever this one did.
                        this.db
                            .platform(async |c| {
                                jobs::enqueue(c, sync_job(every)).await?;
                                Ok::<_, BillingError>(())
                            })
                            .await
                            .map_err(|e| JobError::Retry(anyhow::Error::new(e).context("queueing the next sync")))?;
                        match result {
                            Ok(s) => {
                                tracing::info!(
                                    customers = s.customers,
                                    changed = s.changed.len(),
                                    failed = s.failed.len(),
                                    "billing sync done"
                                );
                                Ok(())
                            }
                            Err(e) => Err(JobError::Fatal(anyhow::Error::new(e).context("syncing with Stripe"))),
                        }
                    })
                }),
            ),
        ]
    }

    /// Processes a stored event again (`plinth billing replay`): a parked
    /// or processed event is read afresh. Applying it is idempotent: an
    /// older state than the applied one is skipped, and mail is keyed by
    /// event and recipient.
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

    /// Processes one stored event (see the module documentation).
    pub async fn process(&self, event_id: &str) -> Result<Outcome, BillingError> {
        let outcome = self
            .db
            .platform(async |c| {
                let row: Option<EventRow> = stripe_events::table
                    .find(event_id)
                    .select(EventRow::as_select())
                    .for_update()
                    .first(c)
                    .await
                    .optional()?;
                let Some(row) = row else { return Err(Fail::Park("no such event".into())) };
                if row.status == "processed" {
                    return Ok((Outcome::AlreadyProcessed, row.received_at));
                }
                let outcome = self.apply(c, event_id, &row).await.map_err(|Park(reason)| Fail::Park(reason))?;
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
            Err(Fail::Park(reason)) => {
                if !self.park(event_id, &reason).await? {
                    // A replay applied it between this attempt's
                    // transaction and now.
                    return Ok(Outcome::AlreadyProcessed);
                }
                metrics::counter!("plinth_stripe_events_processed_total", "outcome" => "parked").increment(1);
                tracing::warn!(stripe.event = event_id, reason, "Stripe event parked");
                Ok(Outcome::Parked(reason))
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
    async fn apply(&self, c: &mut AsyncPgConnection, event_id: &str, row: &EventRow) -> Result<Outcome, Park> {
        let body: Value =
            serde_json::from_str(&row.payload).map_err(|_| Park("the event does not parse as JSON".into()))?;
        let object = &body["data"]["object"];
        let created = row.created_at.ok_or_else(|| Park("the event has no creation time".into()))?;
        let kind = row.kind.as_deref().unwrap_or_default();
        let outcome = match kind {
            "checkout.session.completed" => {
                let session: CheckoutSession = parse(object, "checkout session")?;
                let customer = session.customer.as_ref().map(|c| c.id().as_str().to_owned());
                let customer = customer.ok_or_else(|| Park("the checkout session has no customer".into()))?;
                lock_customer(c, &customer).await?;
                let tenant = session
                    .client_reference_id
                    .as_deref()
                    .and_then(|id| uuid::Uuid::parse_str(id).ok())
                    .ok_or_else(|| Park("the checkout session names no tenant (client_reference_id)".into()))?;
                if registry::find_by_id(c, TenantId(tenant)).await?.is_none() {
                    return Err(Park(format!("no tenant {tenant}")));
                }
                link_customer(c, TenantId(tenant), &customer).await?;
                Outcome::Applied
            }
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted"
            | "customer.subscription.paused"
            | "customer.subscription.resumed" => {
                let sub: Subscription = parse(object, "subscription")?;
                let customer = sub.customer.id().as_str().to_owned();
                lock_customer(c, &customer).await?;
                let tenant = tenant_of(c, &customer, sub.metadata.get("tenant_id")).await?;
                match &self.api {
                    // Whatever this event says, apply what Stripe has now.
                    Some(api) => {
                        let current = api.subscription(sub.id.as_str()).await.map_err(|e| {
                            Park(format!("Stripe unavailable, will retry: {:#}", anyhow::Error::new(e)))
                        })?;
                        let kind = if current.status == SubscriptionStatus::Canceled {
                            "customer.subscription.deleted"
                        } else {
                            "customer.subscription.updated"
                        };
                        self.apply_subscription(c, event_id, kind, Utc::now(), tenant, &customer, &current).await?
                    }
                    None => self.apply_subscription(c, event_id, kind, created, tenant, &customer, &sub).await?,
                }
            }
            "customer.subscription.trial_will_end" => {
                let sub: Subscription = parse(object, "subscription")?;
                let customer = sub.customer.id().as_str().to_owned();
                lock_customer(c, &customer).await?;
                let tenant = tenant_of(c, &customer, sub.metadata.get("tenant_id")).await?;
                let plan = price_of(&sub).and_then(|p| self.catalog.plan_for_price(&p)).map(|p| p.name.clone());
                let trial_end = sub
                    .trial_end
                    .and_then(|t| DateTime::from_timestamp(t, 0))
                    .map(|t| t.format("%Y-%m-%d").to_string())
                    .unwrap_or_default();
                let plan = plan.unwrap_or_else(|| "paid".into());
                notify_owners(c, tenant, event_id, |to, t, org, key| {
                    crate::mail::trial_ending(to, t, org, &plan, &trial_end, key)
                })
                .await?;
                Outcome::Applied
            }
            "invoice.payment_failed" | "invoice.payment_action_required" => {
                let invoice: Invoice = parse(object, "invoice")?;
                let customer = invoice.customer.as_ref().map(|c| c.id().as_str().to_owned());
                let customer = customer.ok_or_else(|| Park("the invoice has no customer".into()))?;
                lock_customer(c, &customer).await?;
                let tenant = tenant_of(c, &customer, None).await?;
                let grace_until = (created + chrono::Duration::from_std(self.grace).unwrap_or_default())
                    .format("%Y-%m-%d")
                    .to_string();
                notify_owners(c, tenant, event_id, |to, t, org, key| {
                    crate::mail::payment_failed(to, t, org, &grace_until, key)
                })
                .await?;
                Outcome::Applied
            }
            // The plan follows the subscription's own events; Plinth's
            // features come from its catalog, not Stripe's entitlements.
            "invoice.paid" | "entitlements.active_entitlement_summary.updated" => Outcome::Ignored,
            _ => Outcome::Ignored,
        };
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

    #[allow(clippy::too_many_arguments)]
    async fn apply_subscription(
        &self,
        c: &mut AsyncPgConnection,
        event_id: &str,
        kind: &str,
        created: DateTime<Utc>,
        tenant: TenantId,
        customer: &str,
        sub: &Subscription,
    ) -> Result<Outcome, Park> {
        let id = sub.id.as_str();
        let known: Option<SubscriptionRow> =
            subscriptions::table.find(id).select(SubscriptionRow::as_select()).first(c).await.optional()?;
        let deleted = kind == "customer.subscription.deleted";
        if let Some(k) = &known {
            // Newer only; at the same second an update beats a creation; a
            // deletion is final.
            let newer = created > k.last_event_at
                || (created == k.last_event_at && kind != "customer.subscription.created" && k.status != "canceled");
            if k.deleted || !newer {
                return Ok(Outcome::Stale);
            }
        }
        let price = price_of(sub);
        let status = if deleted { "canceled" } else { status_name(&sub.status) };
        let paid_plan = match price.as_deref() {
            Some(price) => match self.catalog.plan_for_price(price) {
                Some(plan) => Some(plan.name.clone()),
                None => {
                    tracing::warn!(stripe.price = price, "a subscription is for a price no plan names");
                    None
                }
            },
            None => None,
        };
        let past_due_since = match (&sub.status, &known) {
            (SubscriptionStatus::PastDue, Some(SubscriptionRow { past_due_since: Some(since), .. })) => Some(*since),
            (SubscriptionStatus::PastDue, _) => Some(created),
            _ => None,
        };
        let target: Option<String> = match (&sub.status, deleted) {
            (_, true) => Some(FREE.to_owned()),
            (SubscriptionStatus::Active | SubscriptionStatus::Trialing, _) => match &paid_plan {
                Some(plan) => Some(plan.clone()),
                None => return Err(Park(format!("unknown price {}", price.unwrap_or_default()))),
            },
            (
                SubscriptionStatus::Unpaid
                | SubscriptionStatus::Canceled
                | SubscriptionStatus::Paused
                | SubscriptionStatus::IncompleteExpired,
                _,
            ) => Some(FREE.to_owned()),
            // past_due keeps the plan for the grace; incomplete changes nothing.
            _ => None,
        };
        let period_end = <[_]>::first(&sub.items.data).and_then(|i| DateTime::from_timestamp(i.current_period_end, 0));
        let trial_end = sub.trial_end.and_then(|t| DateTime::from_timestamp(t, 0));
        diesel::insert_into(subscriptions::table)
            .values((
                subscriptions::id.eq(id),
                subscriptions::tenant_id.eq(tenant.0),
                subscriptions::customer_id.eq(customer),
                subscriptions::status.eq(status),
                subscriptions::price_id.eq(price.as_deref()),
                subscriptions::plan.eq(paid_plan.as_deref()),
                subscriptions::trial_end.eq(trial_end),
                subscriptions::current_period_end.eq(period_end),
                subscriptions::cancel_at_period_end.eq(sub.cancel_at_period_end),
                subscriptions::past_due_since.eq(past_due_since),
                subscriptions::deleted.eq(deleted),
                subscriptions::last_event_at.eq(created),
            ))
            .on_conflict(subscriptions::id)
            .do_update()
            .set((
                subscriptions::tenant_id.eq(excluded(subscriptions::tenant_id)),
                subscriptions::customer_id.eq(excluded(subscriptions::customer_id)),
                subscriptions::status.eq(excluded(subscriptions::status)),
                subscriptions::price_id.eq(excluded(subscriptions::price_id)),
                subscriptions::plan.eq(excluded(subscriptions::plan)),
                subscriptions::trial_end.eq(excluded(subscriptions::trial_end)),
                subscriptions::current_period_end.eq(excluded(subscriptions::current_period_end)),
                subscriptions::cancel_at_period_end.eq(excluded(subscriptions::cancel_at_period_end)),
                subscriptions::past_due_since.eq(excluded(subscriptions::past_due_since)),
                subscriptions::deleted.eq(excluded(subscriptions::deleted)),
                subscriptions::last_event_at.eq(excluded(subscriptions::last_event_at)),
                subscriptions::updated_at.eq(diesel::dsl::now),
            ))
            .execute(c)
            .await?;
        if let Some(since) = past_due_since {
            let grace = chrono::Duration::from_std(self.grace).unwrap_or_default();
            let job = NewJob {
                dedup_key: Some(format!("{id}:{}", since.timestamp())),
                run_at: Some(since + grace),
                ..NewJob::new(GRACE, json!({ "subscription": id, "since": since.timestamp() }))
            };
            jobs::enqueue(c, job).await?;
        }
        if let Some(plan) = target {
            let details = json!({ "by": "stripe", "event": event_id, "subscription": id, "status": status });
            let changed = change_plan(c, &self.catalog, tenant, &plan, Actor::System, details)
                .await
                .map_err(|e| Park(format!("changing the plan: {:#}", anyhow::Error::new(e))))?;
            if let Some((_, true)) = changed {
                tracing::info!(tenant.id = %tenant, plan, stripe.event = event_id, "plan changed by Stripe");
            }
        }
        if deleted {
            let plan = paid_plan.unwrap_or_else(|| "paid".into());
            notify_owners(c, tenant, event_id, |to, t, org, key| {
                crate::mail::subscription_cancelled(to, t, org, &plan, key)
            })
            .await?;
        }
        Ok(Outcome::Applied)
    }

    /// Ends a past-due subscription's grace: free, unless it was paid (or
    /// changed) since.
    async fn end_grace(&self, payload: &Value) -> Result<(), BillingError> {
        let id = payload["subscription"].as_str().unwrap_or_default().to_owned();
        let since = payload["since"].as_i64().and_then(|t| DateTime::from_timestamp(t, 0));
        self.db
            .platform(async |c| {
                let row: Option<(uuid::Uuid, String)> = subscriptions::table
                    .find(&id)
                    .filter(subscriptions::status.eq("past_due"))
                    .filter(subscriptions::deleted.eq(false))
                    .filter(subscriptions::past_due_since.eq(since))
                    .select((subscriptions::tenant_id, subscriptions::customer_id))
                    .first(c)
                    .await
                    .optional()?;
                let Some((tenant, customer)) = row else { return Ok(()) };
                lock_customer(c, &customer).await.map_err(|Park(r)| BillingError::Unappliable(r))?;
                let details = json!({ "by": "stripe", "subscription": id, "status": "past_due", "grace": "ended" });
                change_plan(c, &self.catalog, TenantId(tenant), FREE, Actor::System, details).await?;
                tracing::info!(tenant.id = %tenant, "grace ended for a past-due subscription: free plan");
                Ok::<_, BillingError>(())
            })
            .await
    }
}

fn price_of(sub: &Subscription) -> Option<String> {
    <[_]>::first(&sub.items.data).map(|item| item.price.id.as_str().to_owned())
}

async fn lock_customer(c: &mut AsyncPgConnection, customer: &str) -> Result<(), Park> {
    // Raw SQL: an advisory-lock function diesel has no declaration for.
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext('stripe:' || $1))")
        .bind::<Text, _>(customer)
        .execute(c)
        .await?;
    Ok(())
}

/// Links a tenant to its Stripe customer (the first link stays).
async fn link_customer(c: &mut AsyncPgConnection, tenant: TenantId, customer: &str) -> Result<(), Park> {
    if let Some(other) = customer_tenant(c, customer).await?
        && other != tenant.0
    {
        return Err(Park(format!("customer {customer} belongs to another tenant")));
    }
    diesel::insert_into(billing_customers::table)
        .values((billing_customers::tenant_id.eq(tenant.0), billing_customers::customer_id.eq(customer)))
        .on_conflict_do_nothing()
        .execute(c)
        .await?;
    Ok(())
}

/// The tenant a customer is linked to.
async fn customer_tenant(c: &mut AsyncPgConnection, customer: &str) -> diesel::QueryResult<Option<uuid::Uuid>> {
    billing_customers::table
        .filter(billing_customers::customer_id.eq(customer))
        .select(billing_customers::tenant_id)
        .first(c)
        .await
        .optional()
}

/// The tenant of a customer: its link, else the `tenant_id` metadata Plinth
/// puts on the customers it creates.
async fn tenant_of(c: &mut AsyncPgConnection, customer: &str, metadata: Option<&String>) -> Result<TenantId, Park> {
    if let Some(tenant) = customer_tenant(c, customer).await? {
        return Ok(TenantId(tenant));
    }
    if let Some(tenant) = metadata.and_then(|m| uuid::Uuid::parse_str(m).ok())
        && registry::find_by_id(c, TenantId(tenant)).await?.is_some()
    {
        link_customer(c, TenantId(tenant), customer).await?;
        return Ok(TenantId(tenant));
    }
    Err(Park(format!("unknown customer {customer}")))
}

/// Queues `make(to, tenant, organization, key)` to every owner of `tenant`,
/// once per event and owner.
async fn notify_owners(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    event_id: &str,
    make: impl Fn(EmailAddress, TenantId, &str, String) -> Mail,
) -> Result<(), Park> {
    let t = registry::find_by_id(c, tenant).await?.ok_or_else(|| Park(format!("no tenant {tenant}")))?;
    for owner in members::owners(c, tenant).await? {
        let Ok(to) = EmailAddress::parse(&owner.email) else { continue };
        let key = format!("stripe:{event_id}:{}", owner.user_id);
        mail::queue(c, make(to, tenant, &t.name, key))
            .await
            .map_err(|e| Park(format!("queueing mail: {:#}", anyhow::Error::new(e))))?;
    }
    Ok(())
}

//! Per-seat plans: a subscription's quantity follows the tenant's members.
//!
//! The seats billed are the members who joined. Pending invitations are not
//! billed: they hold a seat against the plan's `members` limit until they
//! are accepted or expire, but Stripe charges only for people who joined.
//! A quantity is never below 1, and payment plays no part in it: a failed
//! payment, the grace period or a restriction never changes it.
//!
//! Each membership change queues a `billing.seats` job, in the change's
//! own transaction, for `PLINTH_BILLING_SEATS_DEBOUNCE_SECS` later; of a
//! burst, only the last job does the work (`jobs::superseded`), so a team
//! of twenty invited at once is one update. The job reads each of the
//! tenant's live per-seat subscriptions from Stripe and sets the item's
//! quantity where it differs, with Stripe's proration; its idempotency key
//! names the job and the quantity, so a retry is applied once. The periodic
//! sync queues the job for a tenant whose quantity drifted.

use std::time::Duration;

use chrono::Utc;
use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::BoxFuture;
use plinth_identity::members::{self, MembersChanged};
use plinth_jobs::{self as jobs, ClaimedJob, NewJob};
use plinth_tenants::TenantId;
use serde_json::json;

use super::Processor;
use crate::error::BillingError;
use crate::object;
use crate::schema::subscriptions;
use crate::stripe::ENDED;

/// Job kind: bring the tenant's per-seat quantities to its members
/// (payload `{"tenant"}`).
pub const SEATS: &str = "billing.seats";

/// The job that updates the tenant's seat quantities, `after` from now.
pub fn seats_job(tenant: TenantId, after: Duration) -> NewJob {
    let after = chrono::Duration::from_std(after).unwrap_or_default();
    NewJob {
        tenant: Some(tenant),
        run_at: Some(Utc::now() + after),
        ..NewJob::new(SEATS, json!({ "tenant": tenant.0 }))
    }
}

/// Queues the seat update after each membership change (registered by the
/// app as identity's [`MembersChanged`]).
pub struct QueueSeats {
    pub debounce: Duration,
}

impl MembersChanged for QueueSeats {
    fn changed<'a>(&'a self, conn: &'a AsyncPgConnection, tenant: TenantId) -> BoxFuture<'a, diesel::QueryResult<()>> {
        Box::pin(async move { jobs::enqueue(conn, seats_job(tenant, self.debounce)).await.map(drop) })
    }
}

/// The seats billed for `tenant`: its members, at least 1.
pub async fn billable(c: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<u64> {
    let counts = members::counts(c, &[tenant]).await?;
    Ok(counts.get(&tenant).copied().unwrap_or(0).max(1).unsigned_abs())
}

impl Processor {
    /// The per-seat items of `sub` whose quantity is not `seats`:
    /// (item id, its quantity). Only for a subscription that is running
    /// (not ended, not waiting for its first payment).
    pub(super) fn seat_drift(&self, sub: &object::Subscription, seats: u64) -> Vec<(String, Option<u64>)> {
        if ENDED.contains(&sub.status.as_str()) || sub.status == "incomplete" {
            return Vec::new();
        }
        sub.items
            .iter()
            .filter(|item| self.catalog.plan_for_price(&item.price).is_some_and(|plan| plan.per_seat))
            .filter(|item| item.quantity != Some(seats))
            .filter_map(|item| item.id.clone().map(|id| (id, item.quantity)))
            .collect()
    }

    /// The `billing.seats` job: each live per-seat subscription of the
    /// tenant is read from Stripe and its quantity set to the seats billed
    /// where it differs. Nothing to do offline, or when a later job of the
    /// same burst waits. Returns the quantities set: (item, quantity).
    pub(super) async fn update_seats(
        &self,
        job: &ClaimedJob,
        tenant: TenantId,
    ) -> Result<Vec<(String, u64)>, BillingError> {
        let Some(api) = &self.api else { return Ok(Vec::new()) };
        let read = self
            .db
            .platform(async |c| {
                if jobs::superseded(c, job).await? {
                    return Ok::<_, BillingError>(None);
                }
                let seats = billable(c, tenant).await?;
                let ids: Vec<String> = subscriptions::table
                    .filter(subscriptions::tenant_id.eq(tenant.0))
                    .filter(subscriptions::deleted.eq(false))
                    .filter(subscriptions::status.ne_all(ENDED))
                    .select(subscriptions::id)
                    .load(c)
                    .await?;
                Ok(Some((seats, ids)))
            })
            .await?;
        let Some((seats, ids)) = read else { return Ok(Vec::new()) };
        let mut set = Vec::new();
        for id in ids {
            let sub = api.subscription(&id).await?;
            for (item, was) in self.seat_drift(&sub, seats) {
                let key = format!("plinth-seats-{}-{item}-{seats}", job.id);
                api.set_quantity(&item, seats, key).await?;
                tracing::info!(
                    tenant.id = %tenant,
                    stripe.subscription = id,
                    from = was,
                    to = seats,
                    "seat quantity updated"
                );
                set.push((item, seats));
            }
        }
        Ok(set)
    }
}

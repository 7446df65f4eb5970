//! From subscriptions to the tenant's plan: which plan each subscription
//! pays for, the best of the live ones, where the plan came from, and the
//! end of a past-due subscription's grace.

use chrono::{DateTime, Utc};
use diesel::upsert::excluded;
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, SelectableHelper as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{catalog::FREE, change_plan};
use plinth_jobs::{self as jobs, NewJob};
use plinth_tenants::TenantId;
use plinth_tenants::audit::Actor;
use plinth_tenants::registry::{self, PlanSource};
use serde_json::{Value, json};

use super::notices::cancelled_mail;
use super::{GRACE, Mode, Outcome, Park, Processor, SubscriptionRow, lock_customer};
use crate::error::BillingError;
use crate::object;
use crate::schema::subscriptions;
use crate::stripe::ENDED;

impl Processor {
    /// The best-ranked item whose price the catalog knows: (price, plan).
    pub(super) fn best_item(&self, sub: &object::Subscription) -> Option<(String, String)> {
        sub.items
            .iter()
            .filter_map(|item| {
                self.catalog.plan_for_price(&item.price).map(|plan| (item.price.clone(), plan.name.clone()))
            })
            .max_by_key(|(_, plan)| self.rank(plan))
    }

    /// A plan's place in the catalog (cheapest first).
    pub(super) fn rank(&self, plan: &str) -> usize {
        self.catalog.plans().iter().position(|p| p.name == plan).unwrap_or(0)
    }

    /// The best plan the tenant's live subscriptions pay for.
    pub(super) async fn granted(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
    ) -> diesel::QueryResult<Option<String>> {
        let rows: Vec<(String, Option<String>, Option<DateTime<Utc>>)> = subscriptions::table
            .filter(subscriptions::tenant_id.eq(tenant.0))
            .filter(subscriptions::deleted.eq(false))
            .select((subscriptions::status, subscriptions::plan, subscriptions::past_due_since))
            .load(c)
            .await?;
        let now = Utc::now();
        Ok(rows
            .into_iter()
            .filter(|(status, _, since)| match status.as_str() {
                "active" | "trialing" => true,
                "past_due" => since.is_none_or(|since| since + self.grace() > now),
                _ => false,
            })
            .filter_map(|(_, plan, _)| plan)
            .max_by_key(|plan| self.rank(plan)))
    }

    /// Moves the tenant to the plan its subscriptions grant now, given what
    /// they granted `before` this change. A plan billing set follows them
    /// (free when none is left); an operator's plan changes only when
    /// subscriptions grant a different paid plan, and never in a sync.
    /// Returns (from, to) when the plan changed.
    pub(super) async fn settle(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
        before: Option<String>,
        mode: Mode,
        details: Value,
    ) -> Result<Option<(String, String)>, Park> {
        let after = self.granted(c, tenant).await?;
        let Some((plan, source)) = registry::plan_for_update(c, tenant).await? else { return Ok(None) };
        let target = match (source, mode) {
            (PlanSource::Billing, _) => after.unwrap_or_else(|| FREE.to_owned()),
            (PlanSource::Operator, Mode::Event) if after.is_some() && after != before => {
                after.unwrap_or_else(|| FREE.to_owned())
            }
            (PlanSource::Operator, _) => return Ok(None),
        };
        if target == plan && source == PlanSource::Billing {
            return Ok(None);
        }
        let changed = change_plan(c, &self.catalog, tenant, &target, PlanSource::Billing, Actor::System, details)
            .await
            .map_err(|e| Park::wait(format!("changing the plan: {:#}", anyhow::Error::new(e))))?;
        match changed {
            Some((_, true)) => {
                tracing::info!(tenant.id = %tenant, plan = target, "plan changed by Stripe");
                Ok(Some((plan, target)))
            }
            _ => Ok(None),
        }
    }

    /// Records a subscription's state and, for an event, settles the
    /// tenant's plan and tells the owners when the last paid one ended.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn apply_subscription(
        &self,
        c: &mut AsyncPgConnection,
        event_id: &str,
        kind: &str,
        created: DateTime<Utc>,
        tenant: TenantId,
        customer: &str,
        sub: &object::Subscription,
        mode: Mode,
    ) -> Result<Outcome, Park> {
        let id = sub.id.as_str();
        let known: Option<SubscriptionRow> =
            subscriptions::table.find(id).select(SubscriptionRow::as_select()).first(c).await.optional()?;
        let deleted = kind == "customer.subscription.deleted";
        let status = if deleted { "canceled" } else { sub.status.as_str() };
        let best = self.best_item(sub);
        let price =
            best.as_ref().map(|(price, _)| price.clone()).or_else(|| <[_]>::first(&sub.items).map(|i| i.price.clone()));
        let period_end = sub.period_end_of(price.as_deref()).and_then(|t| DateTime::from_timestamp(t, 0));
        if let Some(k) = &known {
            // Newer only; a deletion is final. Within one second, the
            // later stage of a subscription's life wins, then the later
            // period, then an update over a creation.
            let newer = created > k.last_event_at
                || (created == k.last_event_at && {
                    let (new, old) = (object::Subscription::stage(status), object::Subscription::stage(&k.status));
                    new > old
                        || (new == old && period_end > k.current_period_end)
                        || (new == old && period_end == k.current_period_end && kind != "customer.subscription.created")
                });
            if k.deleted || !newer {
                return Ok(Outcome::Stale);
            }
        }
        let paid_plan = best.map(|(_, plan)| plan);
        if paid_plan.is_none() && matches!(status, "active" | "trialing") {
            let prices: Vec<_> = sub.items.iter().map(|i| i.price.as_str()).collect();
            tracing::warn!(stripe.subscription = id, "a live subscription is for prices no plan names");
            return Err(Park::wait(format!("unknown price {}", prices.join(", "))));
        }
        let past_due_since = match (status, &known) {
            ("past_due", Some(SubscriptionRow { past_due_since: Some(since), .. })) => Some(*since),
            ("past_due", _) => Some(created),
            _ => None,
        };
        let at = |t: Option<i64>| t.and_then(|t| DateTime::from_timestamp(t, 0));
        let before = self.granted(c, tenant).await?;
        diesel::insert_into(subscriptions::table)
            .values((
                subscriptions::id.eq(id),
                subscriptions::tenant_id.eq(tenant.0),
                subscriptions::customer_id.eq(customer),
                subscriptions::status.eq(status),
                subscriptions::price_id.eq(price.as_deref()),
                subscriptions::plan.eq(paid_plan.as_deref()),
                subscriptions::trial_end.eq(at(sub.trial_end)),
                subscriptions::current_period_end.eq(period_end),
                subscriptions::cancel_at_period_end.eq(sub.cancel_at_period_end),
                subscriptions::cancel_at.eq(at(sub.cancel_at)),
                subscriptions::pause_collection.eq(sub.pause_collection.as_ref()),
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
                subscriptions::cancel_at.eq(excluded(subscriptions::cancel_at)),
                subscriptions::pause_collection.eq(excluded(subscriptions::pause_collection)),
                subscriptions::past_due_since.eq(excluded(subscriptions::past_due_since)),
                subscriptions::deleted.eq(excluded(subscriptions::deleted)),
                subscriptions::last_event_at.eq(excluded(subscriptions::last_event_at)),
                subscriptions::updated_at.eq(diesel::dsl::now),
            ))
            .execute(c)
            .await?;
        if let Some(since) = past_due_since {
            let job = NewJob {
                dedup_key: Some(format!("{id}:{}", since.timestamp())),
                run_at: Some(since + self.grace()),
                ..NewJob::new(GRACE, json!({ "subscription": id, "since": since.timestamp() }))
            };
            jobs::enqueue(c, job).await?;
        }
        if mode == Mode::Sync {
            return Ok(Outcome::Applied);
        }
        let details = json!({ "by": "stripe", "event": event_id, "subscription": id, "status": status });
        let changed = self.settle(c, tenant, before, mode, details).await?;
        if deleted || ENDED.contains(&status) {
            let plan = paid_plan.or_else(|| known.and_then(|k| k.plan));
            cancelled_mail(c, tenant, event_id, changed, plan).await?;
        }
        Ok(Outcome::Applied)
    }

    /// Ends a past-due subscription's grace: its plan no longer counts
    /// (the tenant keeps what its other subscriptions grant), unless it was
    /// paid (or changed) since. Checked under the customer's lock.
    pub(super) async fn end_grace(&self, id: &str, since: DateTime<Utc>) -> Result<(), BillingError> {
        self.db
            .platform(async |c| {
                let customer: Option<String> =
                    subscriptions::table.find(id).select(subscriptions::customer_id).first(c).await.optional()?;
                let Some(customer) = customer else { return Ok(()) };
                lock_customer(c, &customer).await.map_err(|p| BillingError::Unappliable(p.reason))?;
                let row: Option<(uuid::Uuid, Option<String>)> = subscriptions::table
                    .find(id)
                    .filter(subscriptions::status.eq("past_due"))
                    .filter(subscriptions::deleted.eq(false))
                    .filter(subscriptions::past_due_since.eq(since))
                    .select((subscriptions::tenant_id, subscriptions::plan))
                    .first(c)
                    .await
                    .optional()?;
                let Some((tenant, plan)) = row else { return Ok(()) };
                let details = json!({ "by": "stripe", "subscription": id, "status": "past_due", "grace": "ended" });
                self.settle(c, TenantId(tenant), plan, Mode::Event, details)
                    .await
                    .map_err(|p| BillingError::Unappliable(p.reason))?;
                tracing::info!(tenant.id = %tenant, "grace ended for a past-due subscription");
                Ok::<_, BillingError>(())
            })
            .await
    }
}

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

use super::notices::{cancelled_mail, notify_owners};
use super::{GRACE, Mode, Outcome, Park, Processor, REMINDER, SubscriptionRow, lock_customer};
use crate::error::BillingError;
use crate::object;
use crate::schema::{billing_plan_changes, subscriptions};
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

    /// What the tenant's subscriptions grant: the best plan of those in
    /// good standing (`active`, `trialing`, `past_due` within the grace),
    /// unrestricted; else the best of those whose payment is overdue past
    /// the grace (`past_due` after it, `unpaid`), restricted; else nothing.
    pub(super) async fn granted(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
    ) -> diesel::QueryResult<Option<(String, bool)>> {
        let rows: Vec<(String, Option<String>, Option<DateTime<Utc>>)> = subscriptions::table
            .filter(subscriptions::tenant_id.eq(tenant.0))
            .filter(subscriptions::deleted.eq(false))
            .select((subscriptions::status, subscriptions::plan, subscriptions::past_due_since))
            .load(c)
            .await?;
        let now = Utc::now();
        let best = |overdue: bool| {
            rows.iter()
                .filter(|(status, _, since)| {
                    let within = since.is_none_or(|since| since + self.grace() > now);
                    match status.as_str() {
                        "active" | "trialing" => !overdue,
                        "past_due" => within != overdue,
                        "unpaid" => overdue,
                        _ => false,
                    }
                })
                .filter_map(|(_, plan, _)| plan.clone())
                .max_by_key(|plan| self.rank(plan))
        };
        Ok(best(false).map(|plan| (plan, false)).or_else(|| best(true).map(|plan| (plan, true))))
    }

    /// The plan the tenant's subscriptions grant now (see [`Self::granted`]).
    pub(super) async fn granted_plan(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
    ) -> diesel::QueryResult<Option<String>> {
        Ok(self.granted(c, tenant).await?.map(|(plan, _)| plan))
    }

    /// Moves the tenant to the plan its subscriptions grant now, given what
    /// they granted `before` this change, and restricts it while that plan
    /// is only paid for by an overdue subscription (lifted when it is
    /// paid, or when no subscription is left). A plan billing set follows
    /// them (free when none is left); an operator's plan changes only when
    /// subscriptions grant a different paid plan, and never in a sync; it
    /// is never restricted. Returns (from, to) when the plan changed.
    pub(super) async fn settle(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
        before: Option<String>,
        mode: Mode,
        details: Value,
    ) -> Result<Option<(String, String)>, Park> {
        let granted = self.granted(c, tenant).await?;
        let restricted = granted.as_ref().is_some_and(|(_, restricted)| *restricted);
        let after = granted.map(|(plan, _)| plan);
        let Some((plan, source)) = registry::plan_for_update(c, tenant).await? else { return Ok(None) };
        let target = match (source, mode) {
            (PlanSource::Billing, _) => after.unwrap_or_else(|| FREE.to_owned()),
            (PlanSource::Operator, Mode::Event) if after.is_some() && after != before => {
                after.unwrap_or_else(|| FREE.to_owned())
            }
            (PlanSource::Operator, _) => return Ok(None),
        };
        let mut moved = None;
        if target != plan || source != PlanSource::Billing {
            let changed =
                change_plan(c, &self.catalog, tenant, &target, PlanSource::Billing, Actor::System, details.clone())
                    .await
                    .map_err(|e| Park::wait(format!("changing the plan: {:#}", anyhow::Error::new(e))))?;
            if let Some((_, true)) = changed {
                tracing::info!(tenant.id = %tenant, plan = target, "plan changed by Stripe");
                moved = Some((plan, target));
            }
        }
        self.restrict(c, tenant, restricted, details).await?;
        Ok(moved)
    }

    /// Restricts the tenant or lifts its restriction, recording the change
    /// in its audit log (`billing.restricted`, `billing.restriction_lifted`).
    async fn restrict(
        &self,
        c: &mut AsyncPgConnection,
        tenant: TenantId,
        restricted: bool,
        details: Value,
    ) -> Result<(), Park> {
        if !registry::set_restricted(c, tenant, restricted).await? {
            return Ok(());
        }
        let Some(t) = registry::find_by_id(c, tenant).await? else { return Ok(()) };
        let action = if restricted { "billing.restricted" } else { "billing.restriction_lifted" };
        let entry = plinth_tenants::audit::Entry::new(Actor::System, action).target("tenant", tenant).details(details);
        plinth_tenants::audit::record_as_system(c, t.scope(), entry).await?;
        if restricted {
            tracing::warn!(tenant.id = %tenant, "tenant restricted: a payment is overdue past its grace");
        } else {
            tracing::info!(tenant.id = %tenant, "tenant restriction lifted");
        }
        Ok(())
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
            // In whole seconds, as the grace and reminder jobs carry it
            // (a state read from Stripe is stamped with the read's time).
            ("past_due", _) => DateTime::from_timestamp(created.timestamp(), 0),
            _ => None,
        };
        let at = |t: Option<i64>| t.and_then(|t| DateTime::from_timestamp(t, 0));
        let before = self.granted_plan(c, tenant).await?;
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
        // A change that waited for the period's end has happened (or
        // will not, the subscription having ended).
        let pending = billing_plan_changes::table.filter(billing_plan_changes::subscription_id.eq(id));
        if deleted || ENDED.contains(&status) {
            diesel::delete(pending).execute(c).await?;
        } else if let Some(plan) = &paid_plan {
            diesel::delete(pending.filter(billing_plan_changes::plan.eq(plan))).execute(c).await?;
        }
        if let Some(since) = past_due_since {
            let payload = json!({ "subscription": id, "since": since.timestamp() });
            let job = NewJob {
                dedup_key: Some(format!("{id}:{}", since.timestamp())),
                run_at: Some(since + self.grace()),
                ..NewJob::new(GRACE, payload.clone())
            };
            jobs::enqueue(c, job).await?;
            // The reminder: three days before the grace ends (half-way
            // through a shorter one); none once it has ended.
            let lead = (self.grace() / 2).min(chrono::Duration::days(3));
            if since + self.grace() > Utc::now() {
                let reminder = NewJob {
                    dedup_key: Some(format!("{id}:{}", since.timestamp())),
                    run_at: Some(since + self.grace() - lead),
                    ..NewJob::new(REMINDER, payload)
                };
                jobs::enqueue(c, reminder).await?;
            }
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

    /// Under its customer's lock: the tenant and plan of subscription `id`,
    /// if it is still in the past-due episode that began at `since` (not
    /// paid, changed or ended since).
    async fn still_past_due(
        c: &mut AsyncPgConnection,
        id: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<(TenantId, Option<String>)>, BillingError> {
        let customer: Option<String> =
            subscriptions::table.find(id).select(subscriptions::customer_id).first(c).await.optional()?;
        let Some(customer) = customer else { return Ok(None) };
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
        Ok(row.map(|(tenant, plan)| (TenantId(tenant), plan)))
    }

    /// Ends a past-due subscription's grace: the tenant is restricted on
    /// its plan (unless another subscription in good standing pays for
    /// one), unless it was paid (or changed) since.
    pub(super) async fn end_grace(&self, id: &str, since: DateTime<Utc>) -> Result<(), BillingError> {
        self.db
            .platform(async |c| {
                let Some((tenant, plan)) = Self::still_past_due(c, id, since).await? else { return Ok(()) };
                let details = json!({ "by": "stripe", "subscription": id, "status": "past_due", "grace": "ended" });
                self.settle(c, tenant, plan, Mode::Event, details)
                    .await
                    .map_err(|p| BillingError::Unappliable(p.reason))?;
                tracing::info!(tenant.id = %tenant, "grace ended for a past-due subscription");
                Ok::<_, BillingError>(())
            })
            .await
    }

    /// Reminds the owners, before the grace ends, of a payment still
    /// overdue (once per episode), unless it was paid (or changed) since.
    pub(super) async fn remind(&self, id: &str, since: DateTime<Utc>) -> Result<(), BillingError> {
        self.db
            .platform(async |c| {
                let Some((tenant, _)) = Self::still_past_due(c, id, since).await? else { return Ok(()) };
                if since + self.grace() <= Utc::now() {
                    return Ok(());
                }
                let grace_until = (since + self.grace()).format("%Y-%m-%d").to_string();
                let key = format!("reminder:{id}:{}", since.timestamp());
                notify_owners(c, tenant, &key, |to, t, org, key| {
                    crate::mail::payment_reminder(to, t, org, &grace_until, key)
                })
                .await
                .map_err(|p| BillingError::Unappliable(p.reason))?;
                Ok::<_, BillingError>(())
            })
            .await
    }

    /// A paid invoice: its subscription as Stripe has it now is applied
    /// (online), or (offline) a past-due or unpaid subscription the
    /// invoice belongs to is active again, unless something newer was
    /// applied to it. Either lifts a restriction at once.
    pub(super) async fn paid(
        &self,
        c: &mut AsyncPgConnection,
        event_id: &str,
        created: DateTime<Utc>,
        tenant: TenantId,
        invoice: &object::Invoice,
        current: Option<&(object::Subscription, DateTime<Utc>)>,
    ) -> Result<Outcome, Park> {
        if let Some((sub, read_at)) = current {
            let kind = sub.as_event();
            let customer = sub.customer.clone();
            return match self
                .apply_subscription(c, event_id, kind, *read_at, tenant, &customer, sub, Mode::Event)
                .await?
            {
                Outcome::Stale => Ok(Outcome::Applied),
                other => Ok(other),
            };
        }
        let Some(id) = &invoice.subscription else { return Ok(Outcome::Applied) };
        let before = self.granted_plan(c, tenant).await?;
        let revived = diesel::update(
            subscriptions::table
                .find(id)
                .filter(subscriptions::tenant_id.eq(tenant.0))
                .filter(subscriptions::deleted.eq(false))
                .filter(subscriptions::status.eq_any(["past_due", "unpaid"]))
                .filter(subscriptions::last_event_at.le(created)),
        )
        .set((
            subscriptions::status.eq("active"),
            subscriptions::past_due_since.eq(None::<DateTime<Utc>>),
            subscriptions::last_event_at.eq(created),
            subscriptions::updated_at.eq(diesel::dsl::now),
        ))
        .execute(c)
        .await?;
        if revived == 1 {
            let details = json!({ "by": "stripe", "event": event_id, "subscription": id, "status": "active" });
            self.settle(c, tenant, before, Mode::Event, details).await?;
        }
        Ok(Outcome::Applied)
    }
}

//! The organization's billing at a glance: what `GET /v1/tenant` shows
//! (as admin's [`TenantBilling`]) and the subscription view builds on.

use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_admin::tenant::{BillingSummary, TenantBilling};
use plinth_http::ApiError;
use plinth_tenants::{Db, TenantId};
use serde::Serialize;
use utoipa::ToSchema;

use crate::schema::subscriptions;
use crate::stripe::ENDED;

/// One of the tenant's subscriptions as Stripe last reported it.
#[derive(Debug, Clone, Queryable, Selectable, Serialize, ToSchema)]
#[diesel(table_name = subscriptions)]
pub struct SubscriptionView {
    /// Stripe's subscription id.
    pub id: String,
    /// Stripe's status (`active`, `trialing`, `past_due`, ...).
    pub status: String,
    /// The catalog plan it pays for (null for prices no plan names).
    pub plan: Option<String>,
    pub trial_end: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    /// When Stripe will cancel it, if it is set to end on a date.
    pub cancel_at: Option<DateTime<Utc>>,
    /// Stripe's `pause_collection` ({behavior, resumes_at}) while payment
    /// collection is paused.
    #[schema(value_type = Option<Object>)]
    pub pause_collection: Option<serde_json::Value>,
    /// Since when its payment is overdue (while `past_due`).
    #[serde(skip)]
    pub past_due_since: Option<DateTime<Utc>>,
}

/// The tenant's subscriptions that have not ended, newest first, and of
/// them the main one: the one that pays for `plan`, else the newest.
pub async fn live(
    c: &mut AsyncPgConnection,
    tenant: TenantId,
    plan: &str,
) -> diesel::QueryResult<(Vec<SubscriptionView>, Option<usize>)> {
    let rows: Vec<SubscriptionView> = subscriptions::table
        .filter(subscriptions::tenant_id.eq(tenant.0))
        .filter(subscriptions::deleted.eq(false))
        .filter(subscriptions::status.ne_all(ENDED))
        .order(subscriptions::last_event_at.desc())
        .select(SubscriptionView::as_select())
        .load(c)
        .await?;
    let main = rows.iter().position(|s| s.plan.as_deref() == Some(plan)).or((!rows.is_empty()).then_some(0));
    Ok((rows, main))
}

/// Whether the tenant has had a trial (any subscription of its with one).
pub async fn had_trial(c: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<bool> {
    let trialled = subscriptions::table
        .filter(subscriptions::tenant_id.eq(tenant.0))
        .filter(subscriptions::trial_end.is_not_null());
    diesel::select(diesel::dsl::exists(trialled)).get_result(c).await
}

/// The organization's billing state from its main subscription and its
/// restriction.
pub fn state(main: Option<&SubscriptionView>, restricted: bool, grace: chrono::Duration) -> TenantBilling {
    let status = match (restricted, main) {
        (true, _) => "restricted".to_owned(),
        (false, Some(sub)) => sub.status.clone(),
        (false, None) => "none".to_owned(),
    };
    let past_due = main.filter(|s| s.status == "past_due");
    let trialing = main.filter(|s| s.status == "trialing");
    TenantBilling {
        status,
        grace_ends_at: past_due.and_then(|s| s.past_due_since).map(|since| since + grace).filter(|_| !restricted),
        trial_ends_at: trialing.and_then(|s| s.trial_end),
        cancels_at: main.and_then(|s| s.cancel_at.or(s.cancel_at_period_end.then_some(s.current_period_end).flatten())),
    }
}

/// Billing's answer to `GET /v1/tenant`'s question (registered by the app).
pub struct Summary {
    /// `PLINTH_BILLING_GRACE_DAYS`.
    pub grace: std::time::Duration,
}

impl BillingSummary for Summary {
    fn summary<'a>(
        &'a self,
        db: &'a Db,
        tenant: TenantId,
        plan: &'a str,
        restricted: bool,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<TenantBilling, ApiError>> + Send + 'a>> {
        Box::pin(async move {
            let grace = chrono::Duration::from_std(self.grace).unwrap_or_default();
            let (subs, main) = db.platform(async |c| Ok::<_, ApiError>(live(c, tenant, plan).await?)).await?;
            Ok(state(main.map(|i| &subs[i]), restricted, grace))
        })
    }
}

//! Plan changes from inside the product (owners): `POST /v1/billing/preview`
//! {plan} (what it costs now and at the next invoice, from Stripe's invoice
//! preview), `POST /v1/billing/change` {plan}, `POST /v1/billing/cancel`
//! and `POST /v1/billing/resume`.
//!
//! An upgrade (a plan later in the catalog) takes effect at once, and its
//! prorations are invoiced at once. A downgrade takes effect at the end of
//! the period: a Stripe subscription schedule holds it, and the
//! subscription view shows it as `pending_change` until then. A downgrade
//! to a plan whose limits the organization is over answers 409
//! `over_plan_limits` with each limit and its use: nothing is over a limit
//! by surprise. Asking for the current plan while a change waits takes
//! the waiting change back. Cancelling ends the subscription at the end of its period;
//! resuming takes that back.
//!
//! These take no `Idempotency-Key`: each is a state to reach, and asking
//! again reaches the same state (the same price changes nothing; a
//! schedule already made is updated, not made twice).

use actix_web::{HttpResponse, post, web};
use chrono::{DateTime, Utc};
use diesel::upsert::excluded;
use diesel::{ExpressionMethods as _, QueryDsl as _};
use diesel_async::RunQueryDsl;
use plinth_access::{Access, Allowed, Plan};
use plinth_http::openapi::{ErrorEnvelope, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_tenants::Db;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::api::ManageBilling;
use crate::object;
use crate::schema::{billing_plan_changes, subscriptions};
use crate::stripe::{Change, Stripe};
use crate::summary;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(preview).service(change).service(cancel).service(resume);
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PlanChangeBody {
    /// A plan of the catalog that has a Stripe price.
    plan: String,
}

/// An amount of money, in the currency's smallest unit (cents).
#[derive(Serialize, ToSchema)]
struct Amount {
    amount: i64,
    currency: String,
}

/// What a plan change costs.
#[derive(Serialize, ToSchema)]
struct Preview {
    plan: String,
    /// `now` (an upgrade) or `period_end` (a downgrade).
    effective: &'static str,
    /// When the change takes effect.
    effective_at: Option<DateTime<Utc>>,
    /// Charged at once (an upgrade's prorations); zero for a downgrade.
    due_now: Amount,
    /// The next renewal's invoice with the new plan.
    next_invoice: Amount,
    /// When the next invoice is due.
    next_invoice_at: Option<DateTime<Utc>>,
}

/// The change made.
#[derive(Serialize, ToSchema)]
struct Changed {
    plan: String,
    /// `now` or `period_end`.
    effective: &'static str,
    effective_at: Option<DateTime<Utc>>,
}

/// What a plan change is, worked out from the catalog and the subscription
/// as Stripe has it now.
struct Plotted {
    target: Plan,
    sub: object::Subscription,
    current_price: String,
    change: Change,
    upgrade: bool,
    /// The current plan asked for while a change waits on a schedule: the
    /// waiting change is taken back.
    keep: bool,
    period_end: Option<DateTime<Utc>>,
}

impl Plotted {
    /// `now` or `period_end`, as answers say it.
    fn effective(&self) -> &'static str {
        if self.upgrade || self.keep { "now" } else { "period_end" }
    }
}

fn stripe(data: Option<web::Data<Stripe>>) -> Result<web::Data<Stripe>, ApiError> {
    data.ok_or(ApiError::BillingNotConfigured)
}

/// The tenant's main live subscription (the one paying for its plan).
async fn main_subscription(ctx: &Allowed<ManageBilling>, db: &Db) -> Result<String, ApiError> {
    let plan = ctx.plan().name.clone();
    let tenant = ctx.tenant.id;
    let (live, main) = db.platform(async |c| Ok::<_, ApiError>(summary::live(c, tenant, &plan).await?)).await?;
    main.map(|i| live[i].id.clone())
        .ok_or_else(|| ApiError::Conflict("the organization has no subscription: check out first".into()))
}

/// Works out the change to `plan`: 400 for a plan without a price or the
/// current one, 409 `over_plan_limits` for a downgrade the organization
/// does not fit in.
async fn plot(
    ctx: &Allowed<ManageBilling>,
    db: &Db,
    access: &Access,
    api: &Stripe,
    plan: &str,
) -> Result<Plotted, ApiError> {
    let catalog = access.catalog();
    let invalid = |why: String| ApiError::invalid_fields(vec![FieldError::new("plan", "invalid", why)]);
    let target = catalog.get(plan).filter(|p| p.stripe_price.is_some()).cloned().ok_or_else(|| {
        let paid: Vec<_> =
            catalog.plans().iter().filter(|p| p.stripe_price.is_some()).map(|p| p.name.as_str()).collect();
        invalid(format!("must be a plan with a price: {}", paid.join(", ")))
    })?;
    let id = main_subscription(ctx, db).await?;
    let sub = api.subscription(&id).await?;
    let rank = |name: &str| catalog.plans().iter().position(|p| p.name == name).unwrap_or(0);
    let (item, current) = sub
        .items
        .iter()
        .filter_map(|item| catalog.plan_for_price(&item.price).map(|plan| (item, plan)))
        .max_by_key(|(_, plan)| rank(&plan.name))
        .ok_or_else(|| ApiError::Conflict("the subscription is for no plan of the catalog".into()))?;
    let keep = current.name == target.name;
    if keep && sub.schedule.is_none() {
        return Err(invalid(format!("the organization is on {} already", target.name)));
    }
    let item_id = item.id.clone().ok_or_else(|| ApiError::Internal(anyhow::anyhow!("an item without an id")))?;
    let upgrade = rank(&target.name) > rank(&current.name);
    if !upgrade && !keep {
        let usage = ctx.usage().await?;
        let over: Vec<(&'static str, u32, i64)> = usage
            .into_iter()
            .filter_map(|(quota, usage)| {
                let limit = target.limit(quota)?;
                (usage.used > i64::from(limit)).then_some((quota.as_str(), limit, usage.used))
            })
            .collect();
        if !over.is_empty() {
            return Err(ApiError::OverPlanLimits { over });
        }
    }
    let quantity = match target.per_seat {
        true => db.platform(async |c| Ok::<_, ApiError>(crate::process::billable(c, ctx.tenant.id).await?)).await?,
        false => 1,
    };
    let price = target.stripe_price.clone().unwrap_or_default();
    let period_end = sub.period_end_of(Some(&item.price)).and_then(|t| DateTime::from_timestamp(t, 0));
    Ok(Plotted {
        current_price: item.price.clone(),
        change: Change { item: item_id, price, quantity },
        target,
        sub,
        upgrade,
        keep,
        period_end,
    })
}

fn amount(invoice: &Value) -> Amount {
    Amount {
        amount: invoice["amount_due"].as_i64().unwrap_or(0),
        currency: invoice["currency"].as_str().unwrap_or_default().to_owned(),
    }
}

/// `POST /v1/billing/preview` {plan}: what the change costs now and at the
/// next invoice.
#[utoipa::path(
    operation_id = "billing_preview",
    tag = "billing",
    summary = "What changing to a plan costs now and at the next invoice, from Stripe's invoice preview (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = PlanChangeBody,
    responses(
        (status = 200, body = Preview),
        (status = 400, description = "Error: invalid_request (not a plan with a price, or the current plan).", body = ErrorEnvelope),
        (status = 409, description = "Error: over_plan_limits (a downgrade the organization does not fit in: each limit and its use), conflict (no subscription).", body = ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured, unavailable (Stripe is failing).", body = ErrorEnvelope),
    ),
)]
#[post("/v1/billing/preview")]
async fn preview(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    api: Option<web::Data<Stripe>>,
    body: Json<PlanChangeBody>,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let plotted = plot(&ctx, &db, &access, &api, &body.0.plan).await?;
    let next = api.preview(&plotted.sub, &plotted.change, false).await?;
    let due_now = match plotted.upgrade {
        true => amount(&api.preview(&plotted.sub, &plotted.change, true).await?),
        false => Amount { amount: 0, currency: amount(&next).currency },
    };
    let effective = plotted.effective();
    let next_at = next["next_payment_attempt"]
        .as_i64()
        .or(next["period_end"].as_i64())
        .and_then(|t| DateTime::from_timestamp(t, 0));
    Ok(HttpResponse::Ok().json(Preview {
        plan: plotted.target.name,
        effective,
        effective_at: if effective == "now" { Some(Utc::now()) } else { plotted.period_end },
        due_now,
        next_invoice: amount(&next),
        next_invoice_at: next_at,
    }))
}

/// `POST /v1/billing/change` {plan}: an upgrade at once (its prorations
/// invoiced now), a downgrade at the end of the period.
#[utoipa::path(
    operation_id = "billing_change",
    tag = "billing",
    summary = "Changes the plan: an upgrade at once with prorations, a downgrade at the end of the period (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = PlanChangeBody,
    responses(
        (status = 200, body = Changed),
        (status = 400, description = "Error: invalid_request (not a plan with a price, or the current plan).", body = ErrorEnvelope),
        (status = 409, description = "Error: over_plan_limits (a downgrade the organization does not fit in: each limit and its use), conflict (no subscription).", body = ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured, unavailable (Stripe is failing).", body = ErrorEnvelope),
    ),
)]
#[post("/v1/billing/change")]
async fn change(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    api: Option<web::Data<Stripe>>,
    body: Json<PlanChangeBody>,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let plotted = plot(&ctx, &db, &access, &api, &body.0.plan).await?;
    let tenant = ctx.tenant.id;
    let sub_id = plotted.sub.id.clone();
    let effective_at = if plotted.upgrade || plotted.keep {
        // A schedule on the subscription (a downgrade waiting for the
        // period's end, made here or in the portal) would undo an upgrade
        // when its next phase starts: released first. Asking for the
        // current plan only takes the waiting change back.
        if let Some(schedule) = &plotted.sub.schedule {
            api.release_schedule(schedule).await?;
        }
        if plotted.upgrade {
            api.change_now(&sub_id, &plotted.change).await?;
        }
        db.platform(async |c| {
            diesel::delete(billing_plan_changes::table.find(&sub_id)).execute(c).await?;
            Ok::<_, ApiError>(())
        })
        .await?;
        Some(Utc::now())
    } else {
        let schedule = api.change_at_period_end(&plotted.sub, &plotted.current_price, &plotted.change).await?;
        let (plan, at) = (plotted.target.name.clone(), plotted.period_end);
        db.platform(async |c| {
            diesel::insert_into(billing_plan_changes::table)
                .values((
                    billing_plan_changes::subscription_id.eq(&sub_id),
                    billing_plan_changes::tenant_id.eq(tenant.0),
                    billing_plan_changes::plan.eq(&plan),
                    billing_plan_changes::effective_at.eq(at),
                    billing_plan_changes::schedule_id.eq(&schedule),
                ))
                .on_conflict(billing_plan_changes::subscription_id)
                .do_update()
                .set((
                    billing_plan_changes::plan.eq(excluded(billing_plan_changes::plan)),
                    billing_plan_changes::effective_at.eq(excluded(billing_plan_changes::effective_at)),
                    billing_plan_changes::schedule_id.eq(excluded(billing_plan_changes::schedule_id)),
                    billing_plan_changes::created_at.eq(diesel::dsl::now),
                ))
                .execute(c)
                .await?;
            Ok::<_, ApiError>(())
        })
        .await?;
        plotted.period_end
    };
    tracing::info!(tenant.id = %tenant, plan = plotted.target.name, effective = plotted.effective(), "plan change made in Stripe");
    Ok(HttpResponse::Ok().json(Changed { effective: plotted.effective(), plan: plotted.target.name, effective_at }))
}

/// Whether the subscription ends at the end of its period.
#[derive(Serialize, ToSchema)]
struct Ending {
    subscription: String,
    cancel_at_period_end: bool,
    /// The end of the current period: when it ends, if it is cancelled.
    current_period_end: Option<DateTime<Utc>>,
}

async fn set_cancel(
    ctx: &Allowed<ManageBilling>,
    db: &Db,
    api: Option<web::Data<Stripe>>,
    ending: bool,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let id = main_subscription(ctx, db).await?;
    let answer = api.cancel_at_period_end(&id, ending).await?;
    let sub = object::Subscription::read(&answer).map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?;
    // Shown at once; the webhook that follows records the rest.
    db.platform(async |c| {
        diesel::update(subscriptions::table.find(&id))
            .set(subscriptions::cancel_at_period_end.eq(sub.cancel_at_period_end))
            .execute(c)
            .await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    let period_end = sub.period_end_of(None).and_then(|t| DateTime::from_timestamp(t, 0));
    tracing::info!(tenant.id = %ctx.tenant.id, cancel_at_period_end = ending, "subscription end changed in Stripe");
    Ok(HttpResponse::Ok().json(Ending {
        subscription: id,
        cancel_at_period_end: sub.cancel_at_period_end,
        current_period_end: period_end,
    }))
}

/// `POST /v1/billing/cancel`: the subscription ends at the end of its period.
#[utoipa::path(
    operation_id = "billing_cancel",
    tag = "billing",
    summary = "Cancels the subscription at the end of its period (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, body = Ending),
        (status = 409, description = "Error: conflict (no subscription).", body = ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured, unavailable (Stripe is failing).", body = ErrorEnvelope),
    ),
)]
#[post("/v1/billing/cancel")]
async fn cancel(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    api: Option<web::Data<Stripe>>,
) -> Result<HttpResponse, ApiError> {
    set_cancel(&ctx, &db, api, true).await
}

/// `POST /v1/billing/resume`: a cancellation at the period's end is taken back.
#[utoipa::path(
    operation_id = "billing_resume",
    tag = "billing",
    summary = "Takes back a cancellation at the end of the period (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, body = Ending),
        (status = 409, description = "Error: conflict (no subscription).", body = ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured, unavailable (Stripe is failing).", body = ErrorEnvelope),
    ),
)]
#[post("/v1/billing/resume")]
async fn resume(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    api: Option<web::Data<Stripe>>,
) -> Result<HttpResponse, ApiError> {
    set_cancel(&ctx, &db, api, false).await
}

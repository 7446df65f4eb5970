//! The billing routes: `POST /v1/billing/checkout` {plan},
//! `POST /v1/billing/portal`, `GET /v1/billing/subscription` (owners).
//! The calls to Stripe they make are [`crate::stripe`]'s. Without
//! `PLINTH_STRIPE_SECRET_KEY` they answer 503 `billing_not_configured`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, post, web};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::RunQueryDsl;
use plinth_access::Access;
use plinth_access::{Allowed, requirements};
use plinth_http::idempotency::{self, IdempotencyKey};
use plinth_http::openapi::{ErrorEnvelope, IdempotencyKeyHeader, KeyReuse, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_tenants::Db;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::customers;
use crate::schema::{billing_plan_changes, stripe_events};
use crate::summary::{self, SubscriptionView};
use plinth_admin::tenant::TenantBilling;

requirements! {
    /// Billing is the owners' business, on every plan.
    pub ManageBilling = "billing", Manage, feature: none;
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(checkout).service(portal).service(subscription).service(crate::invoices::list);
    crate::change::configure(cfg);
    crate::usage::configure(cfg);
}

pub use crate::stripe::{Purchase, Stripe};

fn stripe(data: Option<web::Data<Stripe>>) -> Result<web::Data<Stripe>, ApiError> {
    data.ok_or(ApiError::BillingNotConfigured)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    /// A plan of the catalog that has a Stripe price.
    plan: String,
    /// Start with the plan's trial (`trial_days` in the catalog). Default:
    /// yes when the plan has one and the organization has never had a
    /// trial; `true` otherwise is refused.
    trial: Option<bool>,
    /// Whether Checkout asks for a card: `always` (the default), or
    /// `if_required`, for a trial without one (the subscription ends with
    /// the trial unless a payment method was added by then).
    #[serde(default)]
    payment_method: CardCollection,
}

/// Whether Checkout asks for a payment method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum CardCollection {
    #[default]
    Always,
    IfRequired,
}

/// A Stripe page to send the owner to.
#[derive(Serialize, ToSchema)]
struct Redirect {
    /// An https URL on stripe.com.
    url: String,
}

/// `POST /v1/billing/checkout` {plan, trial?, payment_method?} → {url}: a
/// Checkout Session in subscription mode for the plan's price (per seat:
/// for the members), for the tenant's customer, with the plan's trial.
#[utoipa::path(
    operation_id = "billing_checkout",
    tag = "billing",
    summary = "A Stripe Checkout page that subscribes the organization to a paid plan (owners)",
    params(TenantHeader, IdempotencyKeyHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = CheckoutBody,
    responses(
        (status = 200, body = Redirect),
        (status = 400, description = "Error: invalid_request (not a plan with a price; a trial the plan does not have or the organization has had; if_required without a trial).", body = ErrorEnvelope),
        (status = 409, description = "Error: already_subscribed (the organization has a live subscription: change plans in the portal).", body = ErrorEnvelope),
        (status = 503, description = "Error: billing_not_configured (this server has no Stripe key), unavailable (Stripe or the database is failing).", body = ErrorEnvelope),
        KeyReuse,
    ),
)]
#[post("/v1/billing/checkout")]
async fn checkout(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    api: Option<web::Data<Stripe>>,
    body: Json<CheckoutBody>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let digest = body.digest();
    let plan = access.catalog().get(&body.0.plan).cloned();
    let Some(price) = plan.as_ref().and_then(|p| p.stripe_price.clone()) else {
        let paid: Vec<_> =
            access.catalog().plans().iter().filter(|p| p.stripe_price.is_some()).map(|p| p.name.as_str()).collect();
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "plan",
            "invalid",
            format!("must be a plan with a price: {}", paid.join(", ")),
        )]));
    };
    let keyed = key.keyed(ctx.principal.idempotency_caller(), digest)?;
    let keyed = keyed.as_ref();
    // No transaction is held across the call to Stripe: Stripe's own key
    // makes the session once; the answer is then recorded under the
    // caller's key, and a concurrent twin that loses the claim replays it.
    let (per_seat, trial_days) = plan.as_ref().map_or((false, None), |p| (p.per_seat, p.trial_days));
    let (seats, had_trial) = db
        .platform(async |c| {
            Ok::<_, ApiError>((
                crate::process::billable(c, ctx.tenant.id).await?,
                crate::summary::had_trial(c, ctx.tenant.id).await?,
            ))
        })
        .await?;
    let trial = match (body.0.trial, trial_days) {
        (Some(true), None) => Err("this plan has no trial"),
        (Some(true), Some(_)) if had_trial => Err("the organization has had its trial"),
        (Some(false), _) => Ok(None),
        (_, days) => Ok(days.filter(|_| !had_trial)),
    }
    .map_err(|why| ApiError::invalid_fields(vec![FieldError::new("trial", "unavailable", why)]))?;
    let card_optional = body.0.payment_method == CardCollection::IfRequired;
    if card_optional && trial.is_none() {
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "payment_method",
            "invalid",
            "if_required is for a trial; a checkout without one takes a payment method",
        )]));
    }
    // A per-seat plan opens with the seats billed now.
    let purchase = Purchase { price, quantity: if per_seat { seats } else { 1 }, trial_days: trial, card_optional };
    idempotency::once(&db, keyed, async || {
        let url = api.checkout_session(&db, &ctx.tenant, &purchase, keyed).await?;
        let json = db
            .platform(async |c| {
                idempotency::claim(c, keyed).await?;
                idempotency::record(c, keyed, StatusCode::OK, &Redirect { url }).await
            })
            .await?;
        Ok(idempotency::answer(StatusCode::OK, json))
    })
    .await
}

/// `POST /v1/billing/portal` → {url}: the Customer Portal for the tenant's
/// customer.
#[utoipa::path(
    operation_id = "billing_portal",
    tag = "billing",
    summary = "A Stripe Customer Portal page for the organization's subscription and invoices (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Redirect), (status = 503, description = "Error: billing_not_configured (this server has no Stripe key), unavailable (Stripe or the database is failing).", body = ErrorEnvelope)),
)]
#[post("/v1/billing/portal")]
async fn portal(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    api: Option<web::Data<Stripe>>,
) -> Result<HttpResponse, ApiError> {
    let api = stripe(api)?;
    let url = api.portal_session(&db, &ctx.tenant).await?;
    Ok(HttpResponse::Ok().json(Redirect { url }))
}

/// Why the tenant's billing may be behind Stripe.
#[derive(Serialize, ToSchema)]
struct Pending {
    /// Why Stripe's latest events for this organization are not applied
    /// yet (they are retried; an operator sees them in `plinth billing events`).
    reason: String,
}

/// The tenant's plan and its subscriptions.
#[derive(Serialize, ToSchema)]
struct Billing {
    plan: String,
    /// Of the subscription that gives the plan (else the newest live one):
    /// Stripe's status; null without one.
    status: Option<String>,
    /// The organization's billing state, as `GET /v1/tenant` shows it.
    billing: TenantBilling,
    trial_end: Option<chrono::DateTime<chrono::Utc>>,
    current_period_end: Option<chrono::DateTime<chrono::Utc>>,
    cancel_at_period_end: bool,
    cancel_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Stripe's subscription id.
    subscription: Option<String>,
    /// Every subscription that has not ended.
    subscriptions: Vec<SubscriptionView>,
    /// Set while Stripe events about this organization wait to be applied:
    /// what is shown may be behind what was paid.
    pending: Option<Pending>,
    /// A downgrade made with `POST /v1/billing/change`, waiting for the
    /// end of the period.
    pending_change: Option<PendingChange>,
}

/// A plan change waiting for the end of the period.
#[derive(Serialize, ToSchema, diesel::Queryable)]
struct PendingChange {
    plan: String,
    effective_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `GET /v1/billing/subscription`: the tenant's plan, its live
/// subscriptions as Stripe last reported them, and whether events wait.
#[utoipa::path(
    operation_id = "billing_subscription",
    tag = "billing",
    summary = "The organization's plan, its subscriptions as Stripe last reported them, and whether Stripe events wait (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Billing)),
)]
#[get("/v1/billing/subscription")]
async fn subscription(
    ctx: Allowed<ManageBilling>,
    db: web::Data<Db>,
    config: web::Data<crate::config::StripeConfig>,
) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id;
    let plan = ctx.plan().name.clone();
    let ((live, main), waiting, pending_change) = db
        .platform(async |c| {
            let live = summary::live(c, tenant, &plan).await?;
            let change: Option<PendingChange> = billing_plan_changes::table
                .filter(billing_plan_changes::tenant_id.eq(tenant.0))
                .order(billing_plan_changes::created_at.desc())
                .select((billing_plan_changes::plan, billing_plan_changes::effective_at))
                .first(c)
                .await
                .optional()?;
            let all = customers::all(c, tenant).await?;
            let waiting: Vec<(String, Option<String>)> = stripe_events::table
                .filter(stripe_events::customer_id.eq_any(all))
                .filter(stripe_events::status.ne("processed"))
                .order(stripe_events::received_at.desc())
                .select((stripe_events::status, stripe_events::parked_reason))
                .limit(20)
                .load(c)
                .await?;
            Ok::<_, ApiError>((live, waiting, change))
        })
        .await?;
    let pending = match waiting.iter().find_map(|(_, reason)| reason.clone()) {
        Some(reason) => Some(Pending { reason }),
        None if !waiting.is_empty() => Some(Pending { reason: "Stripe's latest events are being applied".into() }),
        None => None,
    };
    let main = main.map(|i| &live[i]);
    let grace = chrono::Duration::from_std(config.grace).unwrap_or_default();
    Ok(HttpResponse::Ok().json(Billing {
        status: main.map(|s| s.status.clone()),
        billing: summary::state(main, ctx.policy.restricted, grace),
        trial_end: main.and_then(|s| s.trial_end),
        current_period_end: main.and_then(|s| s.current_period_end),
        cancel_at_period_end: main.is_some_and(|s| s.cancel_at_period_end),
        cancel_at: main.and_then(|s| s.cancel_at),
        subscription: main.map(|s| s.id.clone()),
        plan,
        subscriptions: live,
        pending,
        pending_change,
    }))
}

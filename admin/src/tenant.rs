//! `GET /v1/tenant`: the caller's tenant, its plan, the features the plan
//! grants, each limit with what is used, and its billing state.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, get, web};
use plinth_access::quota::Usage;
use plinth_access::{Allowed, Role, requirements};
use plinth_http::ApiError;
use plinth_http::openapi::TenantHeader;
use plinth_tenants::Tenant;
use serde::Serialize;
use utoipa::ToSchema;

requirements! {
    /// Any member may see their tenant's plan and usage.
    ReadTenant = "tenant", Read, feature: none;
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(show);
}

/// The organization's billing, for a banner in the web app.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TenantBilling {
    /// `none` (no subscription), `trialing`, `active`, `past_due` (a
    /// payment failed; the plan holds until `grace_ends_at`), `restricted`
    /// (the grace ended: reads work, writes answer 402 `payment_required`
    /// until an owner pays), or another of Stripe's statuses (`incomplete`,
    /// `unpaid`, `paused`).
    pub status: String,
    /// While `past_due`: when the organization becomes restricted.
    pub grace_ends_at: Option<chrono::DateTime<chrono::Utc>>,
    /// While `trialing`: when the trial ends.
    pub trial_ends_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When the subscription ends, if it is cancelled at a date or at the
    /// end of its period.
    pub cancels_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Where `GET /v1/tenant` finds the organization's billing (billing
/// registers one as `web::Data<dyn BillingSummary>`; admin knows nothing of
/// Stripe).
pub trait BillingSummary: Send + Sync {
    /// The billing of `tenant`, on `plan` and `restricted` as the access
    /// policy has them.
    fn summary<'a>(
        &'a self,
        db: &'a plinth_tenants::Db,
        tenant: plinth_tenants::TenantId,
        plan: &'a str,
        restricted: bool,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<TenantBilling, ApiError>> + Send + 'a>>;
}

/// The caller's tenant as they see it.
#[derive(Serialize, ToSchema)]
struct TenantView<'a> {
    tenant: &'a Tenant,
    role: Role,
    /// The plan in effect (an unknown plan name falls back to `free`).
    plan: &'a str,
    /// The features the organization has (`api_keys`, `audit_log`, ...):
    /// its plan's, or its Stripe entitlements' where the server takes
    /// features from Stripe.
    features: &'a [String],
    /// Each limit: what is used, and what the plan allows (null: no limit).
    #[schema(value_type = BTreeMap<plinth_access::Quota, Usage>)]
    limits: BTreeMap<&'static str, Usage>,
    billing: TenantBilling,
}

#[utoipa::path(
    operation_id = "show_tenant",
    tag = "tenant",
    summary = "The organization: its plan, the features and limits the plan grants, and the usage of each",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = TenantView)),
)]
#[get("/v1/tenant")]
async fn show(
    ctx: Allowed<ReadTenant>,
    db: web::Data<plinth_tenants::Db>,
    billing: web::Data<dyn BillingSummary>,
) -> Result<HttpResponse, ApiError> {
    let plan = ctx.plan();
    let usage = ctx.usage().await?;
    let billing = billing.summary(&db, ctx.tenant.id, &plan.name, ctx.policy.restricted).await?;
    let limits: BTreeMap<&str, Usage> = usage.into_iter().map(|(q, u)| (q.as_str(), u)).collect();
    Ok(HttpResponse::Ok().json(TenantView {
        tenant: &ctx.tenant,
        role: ctx.role,
        plan: &plan.name,
        features: ctx.policy.features.as_deref().unwrap_or(&plan.features),
        limits,
        billing,
    }))
}

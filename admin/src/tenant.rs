//! `GET /v1/tenant`: the caller's tenant, its plan, the features the plan
//! grants and each limit with what is used.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, get};
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

/// The caller's tenant as they see it.
#[derive(Serialize, ToSchema)]
struct TenantView<'a> {
    tenant: &'a Tenant,
    role: Role,
    /// The plan in effect (an unknown plan name falls back to `free`).
    plan: &'a str,
    /// The features the plan includes (`api_keys`, `audit_log`, ...).
    features: &'a [String],
    /// Each limit: what is used, and what the plan allows (null: no limit).
    #[schema(value_type = BTreeMap<plinth_access::Quota, Usage>)]
    limits: BTreeMap<&'static str, Usage>,
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
async fn show(ctx: Allowed<ReadTenant>) -> Result<HttpResponse, ApiError> {
    let plan = ctx.plan();
    let usage = ctx.tx(async |c| ctx.usage(c.pg()).await).await?;
    let limits: BTreeMap<&str, Usage> = usage.into_iter().map(|(q, u)| (q.as_str(), u)).collect();
    Ok(HttpResponse::Ok().json(TenantView {
        tenant: &ctx.tenant,
        role: ctx.role,
        plan: &plan.name,
        features: &plan.features,
        limits,
    }))
}

//! `GET /v1/tenant`: the caller's tenant, its plan, the features the plan
//! grants and each limit with what is used.

use std::collections::BTreeMap;

use actix_web::HttpResponse;
use plinth_access::quota::Usage;
use plinth_access::{Allowed, requirements};
use plinth_http::ApiError;
use serde_json::json;

requirements! {
    /// Any member may see their tenant's plan and usage.
    ReadTenant = "tenant", Read, feature: none;
}

pub fn configure(cfg: &mut actix_web::web::ServiceConfig) {
    cfg.route("/v1/tenant", actix_web::web::get().to(show));
}

async fn show(ctx: Allowed<ReadTenant>) -> Result<HttpResponse, ApiError> {
    let plan = ctx.plan();
    let usage = ctx.tx(async |c| ctx.usage(c.pg()).await).await?;
    let limits: BTreeMap<&str, Usage> = usage.into_iter().map(|(q, u)| (q.as_str(), u)).collect();
    Ok(HttpResponse::Ok().json(json!({
        "tenant": &*ctx.tenant,
        "role": ctx.role,
        "plan": plan.name,
        "features": plan.features,
        "limits": limits,
    })))
}

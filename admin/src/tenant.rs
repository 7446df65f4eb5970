//! `GET /v1/tenant`: the caller's tenant, its plan, the features the plan
//! grants and each limit with what is used.

use std::collections::BTreeMap;

use actix_web::HttpResponse;
use plinth_access::Quota;
use plinth_access::quota::{self, Usage};
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
    let tenant = ctx.tenant.id;
    let limits: BTreeMap<&str, Usage> = ctx
        .tx(async |c| {
            let mut limits = BTreeMap::new();
            for q in Quota::ALL {
                limits.insert(q.as_str(), quota::usage(c.pg(), tenant, q, plan.limit(q)).await?);
            }
            Ok::<_, ApiError>(limits)
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({
        "tenant": &*ctx.tenant,
        "role": ctx.role,
        "plan": plan.name,
        "features": plan.features,
        "limits": limits,
    })))
}

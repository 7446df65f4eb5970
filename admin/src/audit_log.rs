//! `GET /v1/audit-log` (admins): the tenant's audit log, newest first, with
//! cursor pagination and filters (`action`, `actor`).

use actix_web::{HttpResponse, get, web};
use plinth_access::{Allowed, requirements};
use plinth_http::openapi::{PageQuery, PlanLimits, TenantHeader};
use plinth_http::request::{Page, PageParams};
use plinth_http::{ApiError, FieldError};
use plinth_tenants::audit;
use serde::Deserialize;
use utoipa::IntoParams;

requirements! {
    /// Reading the audit log: admins, on plans with `audit_log`.
    ReadAuditLog = "audit_log", Manage, feature: "audit_log";
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list);
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Query {
    /// See [`PageQuery`].
    #[param(ignore)]
    limit: Option<String>,
    #[param(ignore)]
    cursor: Option<String>,
    /// Only entries of this action (`member.removed`, `api_key.created`, ...).
    action: Option<String>,
    /// Only entries by this user or API key.
    #[param(schema_with = plinth_http::openapi::uuid_or_empty)]
    actor: Option<String>,
}

#[utoipa::path(
    operation_id = "list_audit_log",
    tag = "tenant",
    summary = "The organization's audit log, newest first (admins, on plans with `audit_log`)",
    params(TenantHeader, PageQuery, Query),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Page<audit::Stored>), PlanLimits),
)]
#[get("/v1/audit-log")]
async fn list(
    ctx: Allowed<ReadAuditLog>,
    db: web::Data<plinth_tenants::Db>,
    query: web::Query<Query>,
) -> Result<HttpResponse, ApiError> {
    let Query { limit, cursor, action, actor } = query.into_inner();
    // The cursor is the id of the last (oldest) entry of the previous page.
    let page = PageParams { limit, cursor }.validate()?;
    let actor = match actor.as_deref() {
        None | Some("") => None,
        Some(a) => Some(uuid::Uuid::parse_str(a).map_err(|_| {
            ApiError::invalid_fields(vec![FieldError::new("actor", "invalid", "is not a user or API key id")])
        })?),
    };
    // An erased user is filtered by the pseudonym the log shows.
    let actor = match actor {
        Some(id) => Some(plinth_identity::personal_data::stored_id(&db, id).await?),
        None => None,
    };
    let action = action.filter(|a| !a.is_empty());
    let filter = audit::Filter { before: page.after, action, actor, limit: page.limit + 1 };
    let mut rows = ctx.tx(async |c| Ok::<_, ApiError>(audit::read(c, filter).await?)).await?;
    // Erased users appear under their pseudonyms.
    plinth_identity::personal_data::pseudonymise(&db, &mut rows).await?;
    Ok(HttpResponse::Ok().json(Page::from_rows(rows, page, |e| e.id)))
}

//! Platform administration (super-admins only): list and inspect tenants,
//! suspend and reactivate them, change their plan, delete them, impersonate
//! a member. The actions are functions taking an [`Operator`], shared with
//! the console; each is recorded in the operator log.
//!
//! The grant is a row in `public.platform_admins` (`plinth admin
//! create-superuser`, kept by `plinth_access::grants`), separate from any
//! tenant role. A signed-in user without it gets 403 on every route here.

use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, delete, get, post, put, web};
use chrono::{DateTime, Utc};
use diesel_async::AsyncPgConnection;
use plinth_access::Access;
use plinth_access::{PlatformAllowed, requirements};
use plinth_http::ApiError;
use plinth_http::openapi::{ErrorEnvelope, Forbidden, NotFound, PageQuery};
use plinth_http::request::{Json, Page, PageParams};
use plinth_identity::{impersonation, members};
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::{Db, Tenant, TenantId, TenantStatus, UserId, registry};

use crate::operator_log;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

requirements! {
    /// Every platform admin route.
    pub ManageTenants = "tenants", Manage, feature: none;
}

/// Mounted under one `/v1/admin` scope: other requests skip these routes
/// with one prefix comparison instead of trying each pattern.
pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(
        utoipa_actix_web::scope("/v1/admin")
            .service(list)
            .service(show)
            .service(delete)
            .service(suspend)
            .service(reactivate)
            .service(set_plan)
            .service(impersonate),
    );
}

/// A platform admin acting, through the console or these routes: who, from
/// where, in which request. Each action is recorded in the operator log
/// (and, on a tenant, in the tenant's audit log).
#[derive(Debug, Clone)]
pub struct Operator {
    pub user: UserId,
    pub ip: Option<String>,
    pub request_id: Option<String>,
    /// `console` or `api`: how the action was taken.
    pub via: &'static str,
}

impl Operator {
    /// The platform admin `user` making `req`.
    pub fn of(user: UserId, req: &HttpRequest, via: &'static str) -> Self {
        let header = req.app_data::<web::Data<plinth_http::request::ClientIpHeader>>().and_then(|h| h.0.clone());
        let ip = plinth_http::request::client_ip(req, header.as_deref());
        let request_id = req.extensions().get::<plinth_http::request::RequestId>().map(|r| r.0.clone());
        Self { user, ip: Some(ip), request_id, via }
    }

    /// An operator-log entry for `action` by this operator.
    pub fn log(&self, action: &'static str) -> operator_log::Action {
        let mut entry = operator_log::Action::new(self.user, action);
        entry.ip = self.ip.clone();
        entry.request_id = self.request_id.clone();
        entry.details(json!({ "via": self.via }))
    }

    fn actor(&self) -> Actor {
        Actor::User(self.user.0)
    }
}

/// Suspends or reactivates a tenant as `operator`: recorded in the tenant's
/// audit log and the operator log.
pub async fn set_tenant_status(
    db: &Db,
    operator: &Operator,
    id: TenantId,
    status: TenantStatus,
) -> Result<Tenant, ApiError> {
    let tenant = db
        .platform(async |c| {
            let Some(tenant) = set_status(c, id, status, operator.actor(), "platform admin").await? else {
                return Ok(None);
            };
            let action = if status == TenantStatus::Suspended { "tenant.suspended" } else { "tenant.reactivated" };
            operator_log::record(c, operator.log(action).tenant(id).target(&tenant.slug)).await?;
            Ok::<_, ApiError>(Some(tenant))
        })
        .await?
        .ok_or(ApiError::NotFound("tenant"))?;
    tracing::info!(tenant.id = %tenant.id, status = tenant.status.as_str(), "tenant status changed by a platform admin");
    Ok(tenant)
}

/// Moves a tenant to `plan` by hand as `operator` (billing moves plans by
/// itself when Stripe says so): recorded in both logs.
pub async fn set_tenant_plan(
    db: &Db,
    access: &Access,
    operator: &Operator,
    id: TenantId,
    plan: &str,
) -> Result<Tenant, ApiError> {
    let tenant = db
        .platform(async |c| {
            let Some((tenant, _)) = plinth_access::change_plan(
                c,
                access.catalog(),
                id,
                plan,
                registry::PlanSource::Operator,
                operator.actor(),
                json!({ "by": "platform admin" }),
            )
            .await?
            else {
                return Ok(None);
            };
            let entry = operator.log("tenant.plan_changed").tenant(id).target(&tenant.slug);
            let details = json!({ "via": operator.via, "plan": plan });
            operator_log::record(c, entry.details(details)).await?;
            Ok::<_, ApiError>(Some(tenant))
        })
        .await?
        .ok_or(ApiError::NotFound("tenant"))?;
    tracing::info!(tenant.id = %tenant.id, plan = tenant.plan, "tenant plan changed by a platform admin");
    Ok(tenant)
}

/// Deletes a tenant as `operator`: what is outside Plinth first (billing
/// cancels its subscriptions; if that fails nothing is deleted), then it
/// stops being served, then its schema is dropped. The operator log keeps
/// the record; the tenant's own log goes with it.
pub async fn delete_tenant(
    db: &Db,
    offboard: &dyn Offboard,
    operator: &Operator,
    id: TenantId,
) -> Result<(), ApiError> {
    let Some(tenant) = db.platform(async |c| Ok::<_, ApiError>(registry::find_by_id(c, id).await?)).await? else {
        return Err(ApiError::NotFound("tenant"));
    };
    offboard.offboard(db, id).await?;
    let deleted = registry::delete(db, id).await.map_err(|e| match e {
        registry::CreateError::Moving => ApiError::Conflict(e.to_string()),
        other => ApiError::Internal(anyhow::Error::new(other)),
    })?;
    if !deleted {
        return Err(ApiError::NotFound("tenant"));
    }
    let entry = operator.log("tenant.deleted").tenant(id).target(&tenant.slug);
    db.platform(async |c| Ok::<_, ApiError>(operator_log::record(c, entry).await?)).await?;
    tracing::info!(tenant.id = %id, "tenant deleted by a platform admin");
    Ok(())
}

/// Starts impersonating the member `user` of tenant `id` as `operator`
/// (see `plinth_identity::impersonation`): recorded in both logs.
pub async fn impersonate_member(
    db: &Db,
    operator: &Operator,
    id: TenantId,
    user: UserId,
    reason: &str,
) -> Result<impersonation::Started, ApiError> {
    db.platform(async |c| {
        let tenant = registry::find_by_id(c, id).await?.ok_or(ApiError::NotFound("tenant"))?;
        let started = impersonation::start(c, operator.user, &tenant, user, reason).await?;
        let details = json!({ "via": operator.via, "reason": reason.trim(), "expires_at": started.expires_at });
        let entry = operator.log("impersonation.started").tenant(id).target(user).details(details);
        operator_log::record(c, entry).await?;
        Ok::<_, ApiError>(started)
    })
    .await
}

/// Suspends or reactivates a tenant and records it in the tenant's audit log.
pub async fn set_status(
    conn: &mut AsyncPgConnection,
    id: TenantId,
    status: TenantStatus,
    actor: Actor,
    by: &str,
) -> Result<Option<Tenant>, ApiError> {
    let updated = registry::set_status(conn, id, status).await?;
    if let Some(t) = &updated {
        let action = if status == TenantStatus::Suspended { "tenant.suspended" } else { "tenant.reactivated" };
        audit::record_as_system(conn, t.scope(), system_entry(actor, action, t.id, json!({ "by": by }))).await?;
    }
    Ok(updated)
}

fn system_entry(actor: Actor, action: &'static str, tenant: TenantId, details: serde_json::Value) -> Entry {
    Entry {
        actor,
        action,
        target_type: Some("tenant"),
        target_id: Some(tenant.to_string()),
        ip: None,
        request_id: None,
        details,
    }
}

/// A tenant as platform admins see it.
#[derive(Serialize, ToSchema)]
#[schema(as = PlatformTenant)]
struct TenantRow {
    id: uuid::Uuid,
    slug: String,
    name: String,
    #[schema(value_type = TenantStatus)]
    status: &'static str,
    plan: String,
    created_at: DateTime<Utc>,
    members: i64,
}

/// `tenants` with their member counts (identity counts them).
async fn with_members(conn: &mut AsyncPgConnection, tenants: Vec<Tenant>) -> diesel::QueryResult<Vec<TenantRow>> {
    let ids: Vec<TenantId> = tenants.iter().map(|t| t.id).collect();
    let counts = members::counts(conn, &ids).await?;
    Ok(tenants
        .into_iter()
        .map(|t| TenantRow {
            members: counts.get(&t.id).copied().unwrap_or(0),
            id: t.id.0,
            slug: t.slug,
            name: t.name,
            status: t.status.as_str(),
            plan: t.plan,
            created_at: t.created_at,
        })
        .collect())
}

#[derive(Serialize, ToSchema)]
struct OneTenant<T: ToSchema> {
    tenant: T,
}

/// `GET /v1/admin/tenants`: every tenant, oldest first, paginated.
#[utoipa::path(
    operation_id = "admin_list_tenants",
    tag = "platform",
    summary = "Every tenant, oldest first (platform admins)",
    params(PageQuery),
    security(("session" = [])),
    responses((status = 200, body = Page<TenantRow>), Forbidden),
)]
#[get("/tenants")]
async fn list(
    _: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    query: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let page = query.validate()?;
    let rows = db
        .platform(async |c| {
            let tenants = registry::page(c, page.after, page.limit + 1).await?;
            Ok::<_, ApiError>(with_members(c, tenants).await?)
        })
        .await?;
    Ok(HttpResponse::Ok().json(Page::from_rows(rows, page, |t| t.id)))
}

/// A tenant id from a path: anything but an id is no tenant (404).
pub(crate) fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    uuid::Uuid::parse_str(raw).map(TenantId).map_err(|_| ApiError::NotFound("tenant"))
}

/// `GET /v1/admin/tenants/{id}`.
#[utoipa::path(
    operation_id = "admin_show_tenant",
    tag = "platform",
    summary = "One tenant (platform admins)",
    params(("id" = uuid::Uuid, Path, description = "The tenant.")),
    security(("session" = [])),
    responses((status = 200, body = OneTenant<TenantRow>), Forbidden, NotFound),
)]
#[get("/tenants/{id}")]
async fn show(
    _: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let rows = db
        .platform(async |c| {
            let tenants: Vec<Tenant> = registry::find_by_id(c, id).await?.into_iter().collect();
            Ok::<_, ApiError>(with_members(c, tenants).await?)
        })
        .await?;
    let tenant = rows.into_iter().next().ok_or(ApiError::NotFound("tenant"))?;
    Ok(HttpResponse::Ok().json(OneTenant { tenant }))
}

#[utoipa::path(
    operation_id = "admin_suspend_tenant",
    tag = "platform",
    summary = "Suspends a tenant: its requests answer 403 `tenant_suspended`, its data is kept (platform admins)",
    params(("id" = uuid::Uuid, Path, description = "The tenant.")),
    security(("session" = [])),
    responses((status = 200, body = OneTenant<Tenant>), Forbidden, NotFound),
)]
#[post("/tenants/{id}/suspend")]
async fn suspend(
    req: HttpRequest,
    admin: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    status_route(req, admin, db, path, TenantStatus::Suspended).await
}

#[utoipa::path(
    operation_id = "admin_reactivate_tenant",
    tag = "platform",
    summary = "Serves a suspended tenant again (platform admins)",
    params(("id" = uuid::Uuid, Path, description = "The tenant.")),
    security(("session" = [])),
    responses((status = 200, body = OneTenant<Tenant>), Forbidden, NotFound),
)]
#[post("/tenants/{id}/reactivate")]
async fn reactivate(
    req: HttpRequest,
    admin: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    status_route(req, admin, db, path, TenantStatus::Active).await
}

/// `POST /v1/admin/tenants/{id}/suspend|reactivate`.
async fn status_route(
    req: HttpRequest,
    admin: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    path: web::Path<String>,
    status: TenantStatus,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let tenant = set_tenant_status(&db, &Operator::of(admin.user_id, &req, "api"), id, status).await?;
    Ok(HttpResponse::Ok().json(OneTenant { tenant }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    /// A plan of the catalog (`config/plans.toml`).
    plan: String,
}

/// `PUT /v1/admin/tenants/{id}/plan` {plan}: a manual override (billing
/// moves plans by itself when Stripe says so).
#[utoipa::path(
    operation_id = "admin_set_plan",
    tag = "platform",
    summary = "Sets a tenant's plan by hand (platform admins; billing moves plans by itself)",
    params(("id" = uuid::Uuid, Path, description = "The tenant.")),
    security(("session" = [])),
    request_body = PlanBody,
    responses(
        (status = 200, body = OneTenant<Tenant>),
        (status = 400, description = "Error: invalid_request (no such plan).", body = ErrorEnvelope),
        Forbidden,
        NotFound,
    ),
)]
#[put("/tenants/{id}/plan")]
async fn set_plan(
    req: HttpRequest,
    admin: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    path: web::Path<String>,
    body: Json<PlanBody>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let operator = Operator::of(admin.user_id, &req, "api");
    let tenant = set_tenant_plan(&db, &access, &operator, id, &body.0.plan).await?;
    Ok(HttpResponse::Ok().json(OneTenant { tenant }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ImpersonateBody {
    /// The member to act as.
    user_id: uuid::Uuid,
    /// Why (3 to 500 characters): shown to the member's organization in
    /// its audit log and to the web app in `GET /v1/me`.
    reason: String,
}

/// `POST /v1/admin/tenants/{id}/impersonate` {user_id, reason}.
#[utoipa::path(
    operation_id = "admin_impersonate",
    tag = "platform",
    summary = "Acts as a member of the tenant for 15 minutes, in that tenant only (platform admins)",
    description = "Answers a session token that acts as the member in this one tenant for 15 minutes and is never \
                   renewed. Every answer made with it carries `plinth-impersonation: true`, and `GET /v1/me` \
                   shows `impersonation`. It cannot touch billing, API keys, settings, members' roles or the \
                   second factor (403). The start, every write and the end are in the tenant's audit log.",
    params(("id" = uuid::Uuid, Path, description = "The tenant.")),
    security(("session" = [])),
    request_body = ImpersonateBody,
    responses(
        (status = 200, body = impersonation::Started),
        (status = 400, description = "Error: invalid_request (no reason, or yourself).", body = ErrorEnvelope),
        (status = 403, description = "Error: forbidden (not a platform admin, or the organization's owners do not allow impersonation).", body = ErrorEnvelope),
        NotFound,
    ),
)]
#[post("/tenants/{id}/impersonate")]
async fn impersonate(
    req: HttpRequest,
    admin: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    path: web::Path<String>,
    body: Json<ImpersonateBody>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    let operator = Operator::of(admin.user_id, &req, "api");
    let started = impersonate_member(&db, &operator, id, UserId(body.0.user_id), &body.0.reason).await?;
    Ok(HttpResponse::Ok().json(started))
}

/// What must happen outside Plinth before a tenant's data goes (billing
/// cancels its Stripe subscriptions). The app registers it as
/// `web::Data<dyn Offboard>`.
pub trait Offboard: Send + Sync {
    fn offboard<'a>(
        &'a self,
        db: &'a Db,
        tenant: TenantId,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), ApiError>> + Send + 'a>>;
}

/// `DELETE /v1/admin/tenants/{id}`: the tenant's subscriptions are
/// cancelled in Stripe, then it stops being served at once, then its schema
/// is dropped.
#[utoipa::path(
    operation_id = "admin_delete_tenant",
    tag = "platform",
    summary = "Deletes a tenant: it stops being served at once, then its schema is dropped (platform admins)",
    params(("id" = uuid::Uuid, Path, description = "The tenant.")),
    security(("session" = [])),
    responses(
        (status = 204, description = "Deleted."),
        Forbidden,
        NotFound,
        (status = 503, description = "Error: unavailable (Stripe could not be reached to cancel the tenant's subscriptions; nothing was deleted), billing_not_configured (the tenant has live subscriptions and this server has no Stripe key).", body = plinth_http::openapi::ErrorEnvelope),
    ),
)]
#[delete("/tenants/{id}")]
async fn delete(
    req: HttpRequest,
    admin: PlatformAllowed<ManageTenants>,
    db: web::Data<Db>,
    offboard: web::Data<dyn Offboard>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&path)?;
    delete_tenant(&db, offboard.get_ref(), &Operator::of(admin.user_id, &req, "api"), id).await?;
    Ok(HttpResponse::NoContent().finish())
}

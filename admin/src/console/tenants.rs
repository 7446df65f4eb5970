//! The tenant list (search, filters, pages) and a tenant's page with its
//! actions. Each action is a form with the session's CSRF token
//! ([`Posted`]), asks for confirmation in the page, and goes through the
//! same function as the platform admin route, so the tenant's audit log and
//! the operator log record it.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::{HttpResponse, web};
use plinth_access::Access;
use plinth_access::quota::{self, Counters};
use plinth_http::{ApiError, FieldError};
use plinth_identity::{invitations, members};
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::{Db, Tenant, TenantId, TenantStatus, UserId, migrate, registry};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::{ConsoleUser, Empty, Posted};
use super::{ConsoleBilling, ConsoleError, notice, see_other, show};
use crate::operator_log;
use crate::platform::{self, Offboard};
use crate::tenant::BillingSummary;

const PAGE: i64 = 25;

#[derive(Deserialize)]
pub(super) struct ListQuery {
    q: Option<String>,
    status: Option<String>,
    plan: Option<String>,
    page: Option<i64>,
    notice: Option<String>,
}

#[derive(Serialize)]
struct Row {
    id: uuid::Uuid,
    slug: String,
    name: String,
    plan: String,
    status: &'static str,
    billing: String,
    members: i64,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// `GET /console/`: the tenants, newest first, searched and filtered.
pub(super) async fn list(
    who: ConsoleUser,
    db: web::Data<Db>,
    access: web::Data<Arc<Access>>,
    billing: web::Data<dyn BillingSummary>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let query = query.into_inner();
    let status = match query.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some("active") => Some(TenantStatus::Active),
        Some("suspended") => Some(TenantStatus::Suspended),
        Some("deleting") => Some(TenantStatus::Deleting),
        Some(_) => {
            return Err(ApiError::invalid_fields(vec![FieldError::new("status", "invalid", "no such status")]).into());
        }
    };
    let plan = query.plan.clone().filter(|p| !p.is_empty());
    let page = query.page.unwrap_or(1).clamp(1, 100_000);
    let text = query.q.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(|t| t.chars().take(100).collect());
    let search = registry::Search { text, status, plan: plan.clone(), offset: (page - 1) * PAGE, limit: PAGE };
    let (tenants, total, counts, restricted) = db
        .platform(async |c| {
            let (tenants, total) = registry::search(c, &search).await?;
            let ids: Vec<TenantId> = tenants.iter().map(|t| t.id).collect();
            let counts = members::counts(c, &ids).await?;
            let restricted = registry::restricted_since(c, &ids).await?;
            Ok::<_, ApiError>((tenants, total, counts, restricted))
        })
        .await?;
    let mut rows = Vec::with_capacity(tenants.len());
    for t in tenants {
        let state = billing.summary(&db, t.id, &t.plan, restricted.contains_key(&t.id)).await?;
        rows.push(Row {
            id: t.id.0,
            members: counts.get(&t.id).copied().unwrap_or(0),
            slug: t.slug,
            name: t.name,
            plan: t.plan,
            status: t.status.as_str(),
            billing: state.status,
            created_at: t.created_at,
        });
    }
    let plans: Vec<&str> = access.catalog().plans().iter().map(|p| p.name.as_str()).collect();
    let pages = (total + PAGE - 1) / PAGE;
    show(
        &who,
        "tenants",
        "tenants.html",
        minijinja::context! {
            rows, total, page, pages, plans,
            q => query.q.unwrap_or_default(),
            status => query.status.unwrap_or_default(),
            plan => plan.unwrap_or_default(),
            notice => notice(query.notice.as_deref()),
        },
    )
}

fn tenant_id(raw: &str) -> Result<TenantId, ConsoleError> {
    Ok(platform::tenant_id(raw)?)
}

async fn find(db: &Db, id: TenantId) -> Result<Tenant, ConsoleError> {
    db.platform(async |c| Ok::<_, ApiError>(registry::find_by_id(c, id).await?))
        .await?
        .ok_or_else(|| ApiError::NotFound("tenant").into())
}

#[derive(Deserialize)]
pub(super) struct ShowQuery {
    notice: Option<String>,
}

#[derive(Serialize)]
struct Limit {
    name: &'static str,
    used: i64,
    max: Option<u32>,
}

/// `GET /console/tenants/{id}`: everything about one tenant.
#[allow(clippy::too_many_arguments)] // one extractor per thing the page shows
pub(super) async fn show_page(
    who: ConsoleUser,
    db: web::Data<Db>,
    access: web::Data<Arc<Access>>,
    counters: web::Data<Counters>,
    billing: web::Data<dyn BillingSummary>,
    panel: web::Data<dyn ConsoleBilling>,
    path: web::Path<String>,
    query: web::Query<ShowQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let tenant = find(&db, tenant_id(&path)?).await?;
    let plan = access.catalog().effective(&tenant.plan);
    // Quotas are counted where their rows are: projects in the tenant's
    // schema, members and keys in the platform tables (another server when
    // the tenant is on another shard).
    let count = async |conn: &diesel_async::AsyncPgConnection, in_schema: bool| {
        let mut limits = Vec::new();
        for q in plinth_access::Quota::ALL.into_iter().filter(|q| q.in_tenant_schema() == in_schema) {
            let usage = quota::usage(conn, tenant.id, counters.get(q)?, plan.limit(q)).await?;
            limits.push((q, Limit { name: q.as_str(), used: usage.used, max: usage.max }));
        }
        Ok::<_, ApiError>(limits)
    };
    let (mut limits, entries) = db
        .tenant(tenant.scope(), async |c| {
            let limits = count(c.pg(), true).await?;
            let entries = audit::read(c, audit::Filter { limit: 15, ..Default::default() }).await?;
            Ok::<_, ApiError>((limits, entries))
        })
        .await?;
    let (members, pending) = db
        .tenant_rows(tenant.scope(), async |rows| {
            limits.extend(count(rows.conn(), false).await?);
            let members = members::members_of(rows).await?;
            let pending = invitations::pending(rows).await?;
            Ok::<_, ApiError>((members, pending))
        })
        .await?;
    limits.sort_by_key(|(q, _)| plinth_access::Quota::ALL.iter().position(|a| a == q));
    let limits: Vec<Limit> = limits.into_iter().map(|(_, l)| l).collect();
    let (domains, version, restricted, allowed, operator_entries) = db
        .platform(async |c| {
            let domains = registry::domains(c, tenant.id).await?;
            let version = migrate::applied(c, tenant.id, migrate::TENANT_MIGRATIONS).await?;
            let restricted = registry::restricted_since(c, &[tenant.id]).await?.remove(&tenant.id);
            let allowed = plinth_identity::impersonation::allowed(c, tenant.id).await?;
            let operator_entries = operator_log::recent(c, Some(tenant.id), None, 10).await?;
            Ok::<_, ApiError>((domains, version, restricted, allowed, operator_entries))
        })
        .await?;
    let state = billing.summary(&db, tenant.id, &tenant.plan, restricted.is_some()).await?;
    let money = panel.tenant(&db, tenant.id).await?;
    let plans: Vec<&str> = access.catalog().plans().iter().map(|p| p.name.as_str()).collect();
    let emails: HashMap<String, String> = members.iter().map(|m| (m.user_id.to_string(), m.email.clone())).collect();
    show(
        &who,
        "tenants",
        "tenant.html",
        minijinja::context! {
            tenant => &tenant, limits, members, pending, domains, plans, entries, emails,
            state, money, operator_entries,
            restricted_at => restricted,
            impersonation_allowed => allowed,
            applied => version.0,
            newest => version.1,
            wanted => migrate::TENANT_MIGRATIONS.len(),
            notice => notice(query.notice.as_deref()),
        },
    )
}

fn back(id: TenantId, notice: &str) -> HttpResponse {
    see_other(&format!("/console/tenants/{id}?notice={notice}"))
}

/// `POST /console/tenants/{id}/suspend`.
pub(super) async fn suspend(
    db: web::Data<Db>,
    path: web::Path<String>,
    posted: Posted<Empty>,
) -> Result<HttpResponse, ConsoleError> {
    let id = tenant_id(&path)?;
    platform::set_tenant_status(&db, &posted.who.operator, id, TenantStatus::Suspended).await?;
    Ok(back(id, "suspended"))
}

/// `POST /console/tenants/{id}/reactivate`.
pub(super) async fn reactivate(
    db: web::Data<Db>,
    path: web::Path<String>,
    posted: Posted<Empty>,
) -> Result<HttpResponse, ConsoleError> {
    let id = tenant_id(&path)?;
    platform::set_tenant_status(&db, &posted.who.operator, id, TenantStatus::Active).await?;
    Ok(back(id, "reactivated"))
}

#[derive(Deserialize)]
pub(super) struct PlanForm {
    plan: String,
}

/// `POST /console/tenants/{id}/plan`.
pub(super) async fn change_plan(
    db: web::Data<Db>,
    access: web::Data<Arc<Access>>,
    path: web::Path<String>,
    posted: Posted<PlanForm>,
) -> Result<HttpResponse, ConsoleError> {
    let id = tenant_id(&path)?;
    platform::set_tenant_plan(&db, &access, &posted.who.operator, id, &posted.form.plan).await?;
    Ok(back(id, "plan"))
}

#[derive(Deserialize)]
pub(super) struct DomainForm {
    domain: String,
}

/// `POST /console/tenants/{id}/domains`: the operator vouches that the
/// domain points at Plinth, so it is verified and routes at once.
pub(super) async fn add_domain(
    db: web::Data<Db>,
    path: web::Path<String>,
    posted: Posted<DomainForm>,
) -> Result<HttpResponse, ConsoleError> {
    let id = tenant_id(&path)?;
    let Some(domain) = registry::parse_domain(&posted.form.domain) else {
        return Err(ApiError::invalid_fields(vec![FieldError::new("domain", "invalid", "is not a domain name")]).into());
    };
    let tenant = find(&db, id).await?;
    let operator = &posted.who.operator;
    let mut entry = Entry::new(Actor::User(operator.user.0), "domain.added")
        .target("domain", &domain)
        .details(json!({ "by": "platform admin" }));
    entry.ip.clone_from(&operator.ip);
    entry.request_id.clone_from(&operator.request_id);
    let logged = operator.log("domain.added").tenant(id).target(&domain);
    let added = db
        .tenant_rows(tenant.scope(), async |rows| {
            if let Err(err) = registry::add_domain(rows, &domain, true).await {
                return if registry::domain_taken(&err) { Ok(false) } else { Err(ApiError::from(err)) };
            }
            audit::record(rows, entry).await?;
            operator_log::record(rows.conn(), logged).await?;
            Ok(true)
        })
        .await?;
    if !added {
        return Err(ApiError::Conflict(format!("{domain} is already some tenant's domain")).into());
    }
    tracing::info!(tenant.id = %id, "custom domain added by a platform admin");
    Ok(back(id, "domain"))
}

#[derive(Deserialize)]
pub(super) struct DeleteForm {
    #[serde(default)]
    confirm_slug: String,
}

/// `POST /console/tenants/{id}/delete`: only with the tenant's slug typed.
pub(super) async fn delete(
    db: web::Data<Db>,
    offboard: web::Data<dyn Offboard>,
    path: web::Path<String>,
    posted: Posted<DeleteForm>,
) -> Result<HttpResponse, ConsoleError> {
    let id = tenant_id(&path)?;
    let tenant = find(&db, id).await?;
    if posted.form.confirm_slug.trim() != tenant.slug {
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "confirm_slug",
            "mismatch",
            "type the tenant's slug to confirm; nothing was deleted",
        )])
        .into());
    }
    platform::delete_tenant(&db, offboard.get_ref(), &posted.who.operator, id).await?;
    Ok(see_other("/console/?notice=deleted"))
}

#[derive(Deserialize)]
pub(super) struct ImpersonateForm {
    user_id: String,
    #[serde(default)]
    reason: String,
}

/// `POST /console/tenants/{id}/impersonate`: starts the impersonation and
/// shows its token once, with what the web app's banner would show.
pub(super) async fn impersonate(
    db: web::Data<Db>,
    path: web::Path<String>,
    posted: Posted<ImpersonateForm>,
) -> Result<HttpResponse, ConsoleError> {
    let id = tenant_id(&path)?;
    let tenant = find(&db, id).await?;
    let user = uuid::Uuid::parse_str(&posted.form.user_id).map_err(|_| ApiError::NotFound("member"))?;
    let started =
        platform::impersonate_member(&db, &posted.who.operator, id, UserId(user), &posted.form.reason).await?;
    show(
        &posted.who,
        "tenants",
        "impersonation.html",
        minijinja::context! {
            tenant => &tenant,
            token => started.token,
            expires_at => started.expires_at,
            reason => posted.form.reason.trim(),
        },
    )
}

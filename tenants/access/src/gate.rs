//! The gate: how a route says what it needs, and the extractors that check
//! it before the handler runs.
//!
//! Each routes module declares its requirements in one block:
//!
//! ```ignore
//! plinth_tenants::requirements! {
//!     /// GET /v1/projects, GET /v1/projects/{id}
//!     pub ReadProjects = "projects", Read, feature: none;
//!     /// GET /v1/audit-log
//!     pub ReadAuditLog = "audit_log", Manage, feature: "audit_log";
//! }
//! ```
//!
//! and each handler takes `Allowed<ReadProjects>` (a tenant route) or
//! `PlatformAllowed<ManageTenants>` (a platform admin route). There is no
//! other way to obtain a [`TenantContext`], so a route cannot forget to ask.

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, web};

use plinth_http::error::ApiError;
use plinth_http::request::{ClientIpHeader, RequestId};
use plinth_tenants::db::Db;
use plinth_tenants::ids::UserId;
use plinth_tenants::registry::{self, TenantStatus};
use plinth_tenants::replicas::{Consistency, WAL_POSITION_HEADER};

use crate::authn::{Authenticate, Client, Credential, bearer};
use crate::context::{Principal, TenantContext};
use crate::engine::Access;
use crate::model::{Decision, Need, Subject};
use crate::quota::Counters;
use crate::resolve::TenantResolver;
use crate::roles::Role;

/// What one route needs; implemented by the types [`requirements!`] declares.
pub trait Requirement {
    const NEED: Need;
}

/// Declares route requirements: `Name = "resource", Action, feature: none;`
/// or `feature: "name";`.
#[macro_export]
macro_rules! requirements {
    ($($(#[$meta:meta])* $vis:vis $name:ident = $resource:literal, $action:ident, feature: $feature:tt;)+) => {
        $(
            $(#[$meta])*
            $vis struct $name;
            impl $crate::gate::Requirement for $name {
                const NEED: $crate::Need = $crate::Need {
                    resource: $resource,
                    action: $crate::Action::$action,
                    feature: $crate::requirements!(@feature $feature),
                };
            }
        )+
    };
    (@feature none) => { None };
    (@feature $feature:literal) => { Some($feature) };
}

/// Records a decision in the request's span.
pub(crate) fn record(subject: Subject, tenant: &str, need: &Need, decision: &Decision) {
    let span = tracing::Span::current();
    span.record("access.subject", subject.to_string());
    span.record("access.tenant", tenant);
    span.record("access.resource", need.resource);
    span.record("access.action", need.action.as_str());
    span.record("access.feature", need.feature.unwrap_or("-"));
    span.record("access.result", decision.as_str());
    if let Decision::Allowed { rule } = decision {
        span.record("access.rule", rule.as_str());
    }
    tracing::debug!(result = decision.as_str(), "access decision");
    plinth_tenants::counters::increment("plinth_policy_checks_total", &[("decision", decision.as_str())]);
}

/// The decision as the client sees it.
pub(crate) fn outcome(decision: Decision) -> Result<(), ApiError> {
    match decision {
        Decision::Allowed { .. } => Ok(()),
        Decision::Forbidden => Err(ApiError::Forbidden),
        Decision::PlanRequired { feature, plan } => Err(ApiError::PlanRequired { feature, plan }),
    }
}

/// A restricted tenant (its payment overdue past the grace period) reads
/// (GET and HEAD) but does not write; billing stays open so that an owner
/// can pay, and a route that needs no more than reading (a member leaving)
/// stays open too.
fn payment_gate(policy: &crate::TenantPolicy, need: &Need, reads: bool) -> Result<(), ApiError> {
    let read_only = reads || matches!(need.action, crate::Action::Read);
    if policy.restricted && !read_only && need.resource != "billing" {
        return Err(ApiError::PaymentRequired);
    }
    Ok(())
}

/// What an operator impersonating a member may not touch, whatever the
/// member's role: billing, API keys and the tenant's settings (among them
/// whether impersonation is allowed), not even to read them; and members
/// only to read the list (no roles, invitations, removals, leaving).
/// Identity refuses the member's own second factor the same way.
fn impersonation_gate(principal: &Principal, need: &Need, reads: bool) -> Result<(), ApiError> {
    if principal.impersonator().is_none() {
        return Ok(());
    }
    let closed = match need.resource {
        "billing" | "api_keys" | "settings" => true,
        "members" => !reads,
        _ => false,
    };
    if closed {
        return Err(ApiError::NotWhileImpersonating);
    }
    Ok(())
}

/// A tenant request that passed the gate for `R`.
pub struct Allowed<R> {
    ctx: TenantContext,
    _requirement: PhantomData<R>,
}

impl<R> Deref for Allowed<R> {
    type Target = TenantContext;

    fn deref(&self) -> &TenantContext {
        &self.ctx
    }
}

impl<R: Requirement> FromRequest for Allowed<R> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let ctx = TenantContext::gate(&req, &R::NEED).await?;
            Ok(Self { ctx, _requirement: PhantomData })
        })
    }
}

/// A platform admin request that passed the gate for `R`. Signed-in users
/// without the platform grant get 403 `forbidden`.
pub struct PlatformAllowed<R> {
    pub user_id: UserId,
    pub session_id: uuid::Uuid,
    _requirement: PhantomData<R>,
}

impl<R: Requirement> FromRequest for PlatformAllowed<R> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let token = bearer(&req).ok_or(ApiError::Unauthenticated)?;
            // Only a user's session reaches platform routes; an API key is nobody here.
            let Some(Credential::Session { user_id, session_id, .. }) =
                registered::<dyn Authenticate>(&req)?.authenticate(&token, &Client::of(&req)).await?
            else {
                return Err(ApiError::Unauthenticated);
            };
            tracing::Span::current().record("user.id", user_id.to_string());
            let access = registered::<Arc<Access>>(&req)?;
            let subject = Subject::User(user_id);
            let (admin, asked) = access.platform_user(user_id).await?;
            let decision = if admin { access.decide(&asked, &R::NEED)? } else { Decision::Forbidden };
            drop(asked);
            record(subject, "platform", &R::NEED, &decision);
            outcome(decision)?;
            Ok(Self { user_id, session_id, _requirement: PhantomData })
        })
    }
}

/// Records a write made while impersonating in the tenant's audit log
/// (`impersonation.write`: the member as actor, the operator, the method
/// and path) before the handler runs, so no write made that way goes
/// unrecorded: if the entry cannot be written, neither is anything else.
async fn record_impersonated_write(
    db: &Db,
    tenant: &plinth_tenants::registry::Tenant,
    principal: &Principal,
    operator: UserId,
    req: &HttpRequest,
    request_id: &RequestId,
    ip: &str,
) -> Result<(), ApiError> {
    use plinth_tenants::audit::{self, Actor, Entry};
    let Some(user) = principal.user_id() else { return Ok(()) };
    let mut entry = request_id.stamp(Entry::new(Actor::User(user.0), "impersonation.write")).details(
        serde_json::json!({ "impersonated_by": operator.0, "method": req.method().as_str(), "path": req.path() }),
    );
    entry.ip = Some(ip.to_owned());
    db.tenant_rows(tenant.scope(), async |rows| Ok::<_, ApiError>(audit::record(rows, entry).await?)).await
}

pub(crate) fn registered<T: ?Sized + 'static>(req: &HttpRequest) -> Result<web::Data<T>, ApiError> {
    req.app_data::<web::Data<T>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("{} is not registered", std::any::type_name::<T>())))
}

impl TenantContext {
    /// A second requirement, for a route whose need depends on its target
    /// (removing someone else takes more than leaving). Declared with
    /// [`crate::requirements!`] like the route's own.
    pub async fn require<R: Requirement>(&self) -> Result<(), ApiError> {
        let decision = self.access.check(self.subject, Some(self.tenant.id), &R::NEED).await?;
        record(self.subject, &self.tenant.id.to_string(), &R::NEED, &decision);
        outcome(decision)?;
        impersonation_gate(&self.principal, &R::NEED, self.reads)?;
        payment_gate(&self.policy, &R::NEED, self.reads)
    }

    /// Authenticates, resolves the tenant and asks the policy about `need`.
    pub(crate) async fn gate(req: &HttpRequest, need: &Need) -> Result<Self, ApiError> {
        let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
        let resolver = registered::<Arc<TenantResolver>>(req)?;
        let access = registered::<Arc<Access>>(req)?.get_ref().clone();
        let db = registered::<Db>(req)?;
        let credential = registered::<dyn Authenticate>(req)?
            .authenticate(&token, &Client::of(req))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        let (principal, tenant, subject) = match credential {
            Credential::ApiKey { key_id, tenant_id } => {
                tracing::Span::current().record("user.id", format!("key:{key_id}"));
                let tenant = resolver.resolve(req).await?;
                // A key acts in its one tenant; anywhere else it is nobody.
                if tenant_id != tenant.id {
                    return Err(ApiError::NotFound("tenant"));
                }
                (Principal::ApiKey { key_id }, tenant, Subject::Key(tenant_id, key_id))
            }
            Credential::Session { user_id, session_id, ended_in } => {
                tracing::Span::current().record("user.id", user_id.to_string());
                let tenant = resolver.resolve(req).await?;
                if ended_in.contains(&tenant.id) {
                    tracing::info!(tenant.slug = %tenant.slug, "session ended in this tenant by its admins");
                    return Err(ApiError::Unauthenticated);
                }
                let subject = Subject::Member(tenant.id, user_id);
                (Principal::User { user_id, session_id, impersonator: None }, tenant, subject)
            }
            Credential::Impersonation { user_id, session_id, operator, tenant_id } => {
                tracing::Span::current().record("user.id", user_id.to_string());
                req.extensions_mut().insert(plinth_http::request::Impersonating);
                let tenant = resolver.resolve(req).await?;
                // Bound to its one tenant, like an API key.
                if tenant_id != tenant.id {
                    return Err(ApiError::NotFound("tenant"));
                }
                let subject = Subject::Member(tenant.id, user_id);
                (Principal::User { user_id, session_id, impersonator: Some(operator) }, tenant, subject)
            }
            // A SCIM token opens its tenant's `/scim/v2/` routes only.
            Credential::Scim { .. } => return Err(ApiError::Unauthenticated),
        };
        let asked = access.tenant_subject_on(&db, subject, tenant.id).await?;
        let (Some(role), Some(policy)) = (asked.role, asked.policy.clone()) else {
            return Err(ApiError::NotFound("tenant"));
        };
        if tenant.status == TenantStatus::Suspended || !policy.active {
            return Err(ApiError::TenantSuspended);
        }
        tracing::Span::current().record("tenant.slug", tenant.slug.as_str());
        // For traces; logs have the id as access.tenant already.
        if plinth_tenants::trace::exporting() {
            tracing::Span::current().record("tenant.id", tracing::field::display(tenant.id));
        }
        let decision = access.decide(&asked, need)?;
        drop(asked);
        record(subject, &tenant.id.to_string(), need, &decision);
        outcome(decision)?;
        let reads = matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD);
        impersonation_gate(&principal, need, reads)?;
        payment_gate(&policy, need, reads)?;
        let request_id = req.extensions().get::<RequestId>().cloned().unwrap_or_default();
        let ip = request_ip(req);
        if let (Some(operator), false) = (principal.impersonator(), reads) {
            record_impersonated_write(&db, &tenant, &principal, operator, req, &request_id, &ip).await?;
        }
        Self::build(req, Passed { tenant, principal, role, policy, subject, request_id, ip, db, access, reads })
    }

    /// The context of a request that passed a gate.
    fn build(req: &HttpRequest, passed: Passed) -> Result<Self, ApiError> {
        let Passed { tenant, principal, role, policy, subject, request_id, ip, db, access, reads } = passed;
        let after = req.headers().get(WAL_POSITION_HEADER).map(|v| v.to_str().unwrap_or("(not text)"));
        let consistency = Arc::new(Consistency::new(reads, after));
        req.extensions_mut().insert(Arc::clone(&consistency));
        Ok(Self {
            tenant,
            principal,
            role,
            policy,
            request_id,
            ip,
            subject,
            db: db.get_ref().clone(),
            access,
            counters: registered::<Counters>(req)?,
            reads,
            consistency,
        })
    }

    /// Authenticates a SCIM token and asks the policy about `need` in the
    /// token's tenant, as an admin of it (the directory adds, changes and
    /// removes members, never owners). The token names the tenant: a host
    /// or `X-Tenant` naming another one is 404, like an API key's. A
    /// restricted tenant (payment overdue) keeps its directory open, so
    /// that someone who left can always be removed.
    pub(crate) async fn gate_scim(req: &HttpRequest, need: &Need) -> Result<Self, ApiError> {
        let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
        let access = registered::<Arc<Access>>(req)?.get_ref().clone();
        let db = registered::<Db>(req)?;
        let credential = registered::<dyn Authenticate>(req)?.authenticate(&token, &Client::of(req)).await?;
        let Some(Credential::Scim { token_id, tenant_id }) = credential else {
            return Err(ApiError::Unauthenticated);
        };
        tracing::Span::current().record("user.id", format!("scim:{token_id}"));
        let found = db.platform(async |c| Ok::<_, ApiError>(registry::find_by_id(c, tenant_id).await?)).await?;
        let tenant = found.filter(|t| t.status != TenantStatus::Deleting).ok_or(ApiError::NotFound("tenant"))?;
        let named = req.headers().get(crate::resolve::TENANT_HEADER).map(|h| h.to_str().unwrap_or("\u{fffd}"));
        if named.is_some_and(|slug| slug != tenant.slug.as_str()) {
            return Err(ApiError::NotFound("tenant"));
        }
        let asked = access.tenant_role_on(&db, Role::Admin, tenant.id).await?;
        let Some(policy) = asked.policy.clone() else { return Err(ApiError::NotFound("tenant")) };
        if tenant.status == TenantStatus::Suspended || !policy.active {
            return Err(ApiError::TenantSuspended);
        }
        tracing::Span::current().record("tenant.slug", tenant.slug.as_str());
        // Never a member's or key's: `require` on this context finds no role.
        let subject = Subject::Key(tenant.id, token_id);
        let decision = access.decide(&asked, need)?;
        drop(asked);
        record(subject, &tenant.id.to_string(), need, &decision);
        outcome(decision)?;
        let reads = matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD);
        let request_id = req.extensions().get::<RequestId>().cloned().unwrap_or_default();
        let (principal, role, ip) = (Principal::Scim { token_id }, Role::Admin, request_ip(req));
        Self::build(
            req,
            Passed { tenant: Arc::new(tenant), principal, role, policy, subject, request_id, ip, db, access, reads },
        )
    }
}

/// What a gate found out about a request, to build its context from.
struct Passed {
    tenant: Arc<plinth_tenants::registry::Tenant>,
    principal: Principal,
    role: Role,
    policy: crate::TenantPolicy,
    subject: Subject,
    request_id: RequestId,
    ip: String,
    db: web::Data<Db>,
    access: Arc<Access>,
    reads: bool,
}

/// The client's address (see `plinth_http::request::client_ip`).
fn request_ip(req: &HttpRequest) -> String {
    let header = req.app_data::<web::Data<ClientIpHeader>>().and_then(|h| h.0.clone());
    plinth_http::request::client_ip(req, header.as_deref())
}

/// A SCIM request (`/scim/v2/`) from the directory of the tenant its token
/// names, that passed the gate for `R`.
pub struct ScimAllowed<R> {
    ctx: TenantContext,
    _requirement: PhantomData<R>,
}

impl<R> Deref for ScimAllowed<R> {
    type Target = TenantContext;

    fn deref(&self) -> &TenantContext {
        &self.ctx
    }
}

impl<R: Requirement> FromRequest for ScimAllowed<R> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let ctx = TenantContext::gate_scim(&req, &R::NEED).await?;
            Ok(Self { ctx, _requirement: PhantomData })
        })
    }
}

//! The request context every tenant route works with: the resolved tenant,
//! who is calling with which role, and the tenant's plan. Routes obtain it
//! only through the access gate ([`crate::access::gate::Allowed`]).

use std::sync::Arc;

use actix_web::{HttpMessage, HttpRequest, web};

use crate::access::gate::Requirement;
use crate::access::{Access, Need, Plan, Quota, Subject, TenantPolicy, gate, quota};
use crate::auth::{API_KEY_PREFIX, ApiKeys, Role, Sessions, bearer};
use crate::db::{Db, PoolError, TenantConn, TxFn};
use crate::error::ApiError;
use crate::http::{ClientIpHeader, RequestId};
use crate::ids::UserId;
use crate::registry::{Tenant, TenantStatus};
use crate::resolve::TenantResolver;

pub use crate::access::Action;

/// Who is making the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user signed in with a session.
    User { user_id: UserId, session_id: uuid::Uuid },
    /// A tenant API key.
    ApiKey { key_id: uuid::Uuid },
}

impl Principal {
    /// The user, when a user (not a key) is calling.
    pub fn user_id(&self) -> Option<UserId> {
        match self {
            Self::User { user_id, .. } => Some(*user_id),
            Self::ApiKey { .. } => None,
        }
    }
}

/// An authenticated member of a resolved tenant, allowed by the gate.
///
/// The gate answers, in this order: 401 `unauthenticated` without a valid
/// bearer token; 404 `not_found` for an unknown tenant and for a tenant the
/// caller is not a member of (indistinguishable, so nothing confirms the
/// tenant exists); 403 `tenant_suspended` to members of a suspended tenant;
/// 403 `forbidden` when the role does not allow the route; 402
/// `plan_required` when the plan lacks the route's feature.
pub struct TenantContext {
    pub tenant: Arc<Tenant>,
    pub principal: Principal,
    pub role: Role,
    /// The tenant's plan as the access policy sees it.
    pub policy: TenantPolicy,
    pub request_id: RequestId,
    /// The client's address (see `http::client_ip`).
    pub ip: String,
    subject: Subject,
    db: Db,
    access: Arc<Access>,
}

pub(crate) fn registered<T: 'static>(req: &HttpRequest) -> Result<web::Data<T>, ApiError> {
    req.app_data::<web::Data<T>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("{} is not registered", std::any::type_name::<T>())))
}

impl TenantContext {
    /// Runs `f` in a transaction scoped to this request's tenant.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: TxFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.db.tenant(self.tenant.scope(), f).await
    }

    /// A second requirement, for a route whose need depends on its target
    /// (removing someone else takes more than leaving). Declared with
    /// [`crate::requirements!`] like the route's own.
    pub async fn require<R: Requirement>(&self) -> Result<(), ApiError> {
        let decision = self.access.check(self.subject, Some(self.tenant.id), &R::NEED).await?;
        gate::record(self.subject, &self.tenant.id.to_string(), &R::NEED, &decision);
        gate::outcome(decision)
    }

    /// The tenant's plan in the catalog.
    pub fn plan(&self) -> &Plan {
        self.access.catalog().effective(&self.policy.plan)
    }

    /// 402 `quota_exceeded` unless the tenant may have one more of `quota`.
    /// Counted in `conn`'s transaction, under a per-tenant lock held until
    /// it ends, so concurrent creates cannot overshoot the limit.
    pub async fn reserve<C>(&self, conn: &mut C, quota: Quota) -> Result<(), ApiError>
    where
        C: quota::Conn,
    {
        quota::reserve(conn, self.tenant.id, quota, self.plan().limit(quota), quota.count_sql()).await
    }

    /// Like [`TenantContext::reserve`], counting with `sql` instead (it takes
    /// the tenant id as `$1` and returns `used`).
    pub async fn reserve_counting<C>(&self, conn: &mut C, quota: Quota, sql: &str) -> Result<(), ApiError>
    where
        C: quota::Conn,
    {
        quota::reserve(conn, self.tenant.id, quota, self.plan().limit(quota), sql).await
    }

    /// An audit entry for `action` by this request's caller, with its
    /// address and request id.
    pub fn audit_entry(&self, action: &'static str) -> crate::audit::Entry {
        use crate::audit::{Actor, Entry};
        let actor = match &self.principal {
            Principal::User { user_id, .. } => Actor::User(user_id.0),
            Principal::ApiKey { key_id } => Actor::ApiKey(*key_id),
        };
        let mut entry = Entry::new(actor, action).request(Some(&self.request_id));
        entry.ip = Some(self.ip.clone());
        entry
    }

    /// Authenticates, resolves the tenant and asks the policy about `need`.
    pub(crate) async fn gate(req: &HttpRequest, need: &Need) -> Result<Self, ApiError> {
        let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
        let resolver = registered::<Arc<TenantResolver>>(req)?;
        let access = registered::<Arc<Access>>(req)?.get_ref().clone();
        let db = registered::<Db>(req)?;
        let (principal, tenant, subject) = if token.starts_with(API_KEY_PREFIX) {
            let key = registered::<Arc<ApiKeys>>(req)?.verify(&token).await?.ok_or(ApiError::Unauthenticated)?;
            tracing::Span::current().record("user.id", format!("key:{}", key.key_id));
            let tenant = resolver.resolve(req).await?;
            // A key acts in its one tenant; anywhere else it is nobody.
            if key.tenant_id != tenant.id {
                return Err(ApiError::NotFound("tenant"));
            }
            (Principal::ApiKey { key_id: key.key_id }, tenant, Subject::Key(key.tenant_id, key.key_id))
        } else {
            let session = registered::<Arc<Sessions>>(req)?.verify(&token).await?.ok_or(ApiError::Unauthenticated)?;
            tracing::Span::current().record("user.id", session.user_id.to_string());
            let tenant = resolver.resolve(req).await?;
            let subject = Subject::Member(tenant.id, session.user_id);
            (Principal::User { user_id: session.user_id, session_id: session.session_id }, tenant, subject)
        };
        let asked = access.tenant_subject_on(&db, subject, tenant.id).await?;
        let (Some(role), Some(policy)) = (asked.role, asked.policy.clone()) else {
            return Err(ApiError::NotFound("tenant"));
        };
        if tenant.status == TenantStatus::Suspended || !policy.active {
            return Err(ApiError::TenantSuspended);
        }
        tracing::Span::current().record("tenant.slug", tenant.slug.as_str());
        let decision = access.decide(&asked, need)?;
        drop(asked);
        gate::record(subject, &tenant.id.to_string(), need, &decision);
        gate::outcome(decision)?;
        let request_id = req.extensions().get::<RequestId>().cloned().unwrap_or_default();
        let header = req.app_data::<web::Data<ClientIpHeader>>().and_then(|h| h.0.clone());
        let ip = crate::http::client_ip(req, header.as_deref());
        Ok(Self { tenant, principal, role, policy, request_id, ip, subject, db: db.get_ref().clone(), access })
    }
}

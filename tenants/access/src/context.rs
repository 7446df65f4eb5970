//! The request context every tenant route works with: the resolved tenant,
//! who is calling with which role, and the tenant's plan. Routes obtain it
//! only through the access gate (`access::gate::Allowed`), which builds it
//! and adds `require`; this module knows nothing of the gate.

use std::sync::Arc;

use crate::catalog::{Plan, Quota};
use crate::engine::Access;
use crate::error::AccessError;
use crate::model::Subject;
use crate::quota::{self, Counters};
use crate::roles::Role;
use crate::snapshot::TenantPolicy;
use diesel::QueryableByName;
use diesel::pg::Pg;
use diesel::query_builder::{Query, QueryFragment, SqlQuery};
use diesel::sql_types::Untyped;
use diesel_async::AsyncPgConnection;
use plinth_http::request::RequestId;
use plinth_tenants::db::{Db, PoolError, TenantConn, TenantRows, TenantScope, TenantSql, TxFn, ViewFn};
use plinth_tenants::ids::UserId;
use plinth_tenants::registry::Tenant;
use plinth_tenants::replicas::Consistency;

pub use crate::Action;

/// Who is making the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user signed in with a session; `impersonator` is the platform
    /// admin acting as them (an impersonation session), if any.
    User { user_id: UserId, session_id: uuid::Uuid, impersonator: Option<UserId> },
    /// A tenant API key.
    ApiKey { key_id: uuid::Uuid },
    /// The tenant's directory, through a SCIM token (SCIM routes only).
    Scim { token_id: uuid::Uuid },
}

impl Principal {
    /// The user, when a user (not a key) is calling.
    pub fn user_id(&self) -> Option<UserId> {
        match self {
            Self::User { user_id, .. } => Some(*user_id),
            Self::ApiKey { .. } | Self::Scim { .. } => None,
        }
    }

    /// The platform admin acting as the member, when this is an
    /// impersonation session.
    pub fn impersonator(&self) -> Option<UserId> {
        match self {
            Self::User { impersonator, .. } => *impersonator,
            Self::ApiKey { .. } | Self::Scim { .. } => None,
        }
    }

    /// Whose `Idempotency-Key`s a request uses: the user's, or the key's.
    pub fn idempotency_caller(&self) -> String {
        match self {
            Self::User { user_id, .. } => format!("user:{user_id}"),
            Self::ApiKey { key_id } => format!("api_key:{key_id}"),
            Self::Scim { token_id } => format!("scim:{token_id}"),
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
/// `plan_required` when the plan lacks the route's feature; 402
/// `payment_required` to a write while billing restricts the tenant.
pub struct TenantContext {
    pub tenant: Arc<Tenant>,
    pub principal: Principal,
    pub role: Role,
    /// The tenant's plan as the access policy sees it.
    pub policy: TenantPolicy,
    pub request_id: RequestId,
    /// The client's address (see `http::client_ip`).
    pub ip: String,
    pub(crate) subject: Subject,
    pub(crate) db: Db,
    pub(crate) access: Arc<Access>,
    pub(crate) counters: actix_web::web::Data<Counters>,
    /// A GET or HEAD: allowed while billing restricts the tenant.
    pub(crate) reads: bool,
    /// Whether this request's reads may come from a replica, and the
    /// position of its commits (the `plinth-wal-position` header both
    /// ways; `plinth_tenants::replicas`). Shared with the request's
    /// extensions, where the answer's header is read from.
    pub(crate) consistency: Arc<Consistency>,
}

impl TenantContext {
    /// Runs `f` in a transaction scoped to this request's tenant.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: TxFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.db.tenant(self.scope(), f).await
    }

    /// Runs `f`, which only reads, in a transaction scoped to this
    /// request's tenant: in a GET, on a replica caught up with the caller's
    /// writes when there is one (see
    /// [`Db::tenant_view`](plinth_tenants::db::Db::tenant_view); `f` may
    /// run twice).
    pub async fn view<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: ViewFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send + Sync,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.db.tenant_view(self.scope(), f).await
    }

    /// Runs one read statement of this request's tenant's tables in one
    /// round trip (see
    /// [`Db::tenant_read`](plinth_tenants::db::Db::tenant_read)); in a GET,
    /// on a replica as [`Self::view`] does.
    pub async fn read<Q, U, E>(&self, sql: TenantSql, bind: impl Fn(SqlQuery) -> Q) -> Result<Vec<U>, E>
    where
        Q: QueryFragment<Pg> + Query<SqlType = Untyped> + Send + 'static,
        U: QueryableByName<Pg> + Send + 'static,
        E: From<diesel::result::Error> + From<PoolError> + Send,
    {
        self.db.tenant_read(self.scope(), sql, bind).await
    }

    /// The tenant's scope for this request.
    fn scope(&self) -> TenantScope<'_> {
        TenantScope { consistency: Some(&self.consistency), ..self.tenant.scope() }
    }

    /// Runs `f` in a platform transaction bound to this request's tenant:
    /// the way to the tenant's platform rows (memberships, API keys,
    /// invitations) and its audit log.
    pub async fn rows<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: TxFn<&'r mut TenantRows<'c>, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.db.tenant_rows(self.scope(), f).await
    }

    /// The tenant's plan in the catalog.
    pub fn plan(&self) -> &Plan {
        self.access.catalog().effective(&self.policy.plan)
    }

    /// [`AccessError::QuotaExceeded`] (402 `quota_exceeded` at the edge)
    /// unless the tenant may have one more of `quota`.
    /// Counted in `conn`'s transaction by the quota's registered counter,
    /// under a per-tenant lock held until it ends, so concurrent creates
    /// cannot overshoot the limit.
    pub async fn reserve(&self, conn: &AsyncPgConnection, quota: Quota) -> Result<(), AccessError> {
        let counter = self.counters.get(quota)?;
        quota::reserve(conn, self.tenant.id, quota, self.plan().limit(quota), counter).await
    }

    /// What the tenant uses of each quota its plan names, and the limit:
    /// what its schema holds counted in a tenant transaction, what the
    /// platform tables hold in a platform one (they may be on different
    /// servers).
    pub async fn usage(&self) -> Result<Vec<(Quota, quota::Usage)>, AccessError> {
        let count = async |conn: &AsyncPgConnection, in_schema: bool| {
            let mut usage = Vec::with_capacity(Quota::ALL.len());
            for q in Quota::ALL.into_iter().filter(|q| q.in_tenant_schema() == in_schema) {
                usage.push((q, quota::usage(conn, self.tenant.id, self.counters.get(q)?, self.plan().limit(q)).await?));
            }
            Ok::<_, AccessError>(usage)
        };
        let mut usage = self.tx(async |c| count(c.pg(), true).await).await?;
        usage.extend(self.rows(async |r| count(r.conn(), false).await).await?);
        usage.sort_by_key(|(q, _)| Quota::ALL.iter().position(|a| a == q));
        Ok(usage)
    }

    /// An audit entry for `action` by this request's caller, with its
    /// address and request id; made while impersonating, it names the
    /// platform admin too (`details.impersonated_by`). The directory acts
    /// as the system, naming its token (`details.scim_token`).
    pub fn audit_entry(&self, action: &'static str) -> plinth_tenants::audit::Entry {
        use plinth_tenants::audit::{Actor, Entry};
        let actor = match &self.principal {
            Principal::User { user_id, .. } => Actor::User(user_id.0),
            Principal::ApiKey { key_id } => Actor::ApiKey(*key_id),
            Principal::Scim { .. } => Actor::System,
        };
        let mut entry = self.request_id.stamp(Entry::new(actor, action));
        if let Principal::Scim { token_id } = &self.principal {
            entry = entry.details(serde_json::json!({ "scim_token": token_id }));
        }
        entry.ip = Some(self.ip.clone());
        if let Some(operator) = self.principal.impersonator() {
            entry = entry.details(serde_json::json!({ "impersonated_by": operator.0 }));
        }
        entry
    }
}

//! The request context every tenant route extracts: the resolved tenant, who
//! is calling with which role, and the gate that decides what they may do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, web};

use crate::auth::{API_KEY_PREFIX, ApiKeys, Memberships, Role, Sessions, bearer};
use crate::db::{Db, PoolError, TenantConn, TxFn};
use crate::error::ApiError;
use crate::http::{ClientIpHeader, RequestId};
use crate::ids::UserId;
use crate::registry::{Tenant, TenantStatus};
use crate::resolve::TenantResolver;

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

/// What a route is about to do, as the access gate sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
    Delete,
    /// Managing members and invitations.
    Manage,
}

/// An authenticated member of a resolved tenant.
///
/// Extracting it answers, in this order: 401 `unauthenticated` without a
/// valid bearer token; 404 `not_found` for an unknown tenant and for a tenant
/// the caller is not a member of (indistinguishable, so nothing confirms the
/// tenant exists); 403 `tenant_suspended` to members of a suspended tenant.
pub struct TenantContext {
    pub tenant: Arc<Tenant>,
    pub principal: Principal,
    pub role: Role,
    pub request_id: RequestId,
    /// The client's address (see `http::client_ip`).
    pub ip: String,
    db: Db,
}

impl TenantContext {
    /// The access gate: every tenant route calls it with what it is about to
    /// do. The one place where roles meet actions (viewer reads, member
    /// creates and edits, admin also deletes) until the policy engine takes
    /// it over (admin also manages members). A role that falls short is 403
    /// `forbidden`.
    pub fn authorize(&self, resource: &'static str, action: Action) -> Result<(), ApiError> {
        let needed = match action {
            Action::Read => Role::Viewer,
            Action::Write => Role::Member,
            Action::Delete | Action::Manage => Role::Admin,
        };
        let allowed = self.role >= needed;
        tracing::debug!(resource, ?action, role = self.role.as_str(), allowed, "access decision");
        if allowed { Ok(()) } else { Err(ApiError::Forbidden) }
    }

    /// Runs `f` in a transaction scoped to this request's tenant.
    pub async fn tx<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: TxFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.db.tenant(self.tenant.scope(), f).await
    }
}

fn registered<T: 'static>(req: &HttpRequest) -> Result<web::Data<T>, ApiError> {
    req.app_data::<web::Data<T>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("{} is not registered", std::any::type_name::<T>())))
}

impl FromRequest for TenantContext {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let token = bearer(&req).ok_or(ApiError::Unauthenticated)?;
            let resolver = registered::<Arc<TenantResolver>>(&req)?;
            let db = registered::<Db>(&req)?;
            let (principal, tenant, role) = if token.starts_with(API_KEY_PREFIX) {
                let key = registered::<Arc<ApiKeys>>(&req)?.verify(&token).await?.ok_or(ApiError::Unauthenticated)?;
                tracing::Span::current().record("user.id", format!("key:{}", key.key_id));
                let tenant = resolver.resolve(&req).await?;
                // A key acts in its one tenant; anywhere else it is nobody.
                if key.tenant_id != tenant.id {
                    return Err(ApiError::NotFound("tenant"));
                }
                (Principal::ApiKey { key_id: key.key_id }, tenant, key.role)
            } else {
                let session =
                    registered::<Arc<Sessions>>(&req)?.verify(&token).await?.ok_or(ApiError::Unauthenticated)?;
                tracing::Span::current().record("user.id", session.user_id.to_string());
                let tenant = resolver.resolve(&req).await?;
                let memberships = registered::<Arc<Memberships>>(&req)?;
                let role = memberships.role(tenant.id, session.user_id).await?.ok_or(ApiError::NotFound("tenant"))?;
                (Principal::User { user_id: session.user_id, session_id: session.session_id }, tenant, role)
            };
            if tenant.status == TenantStatus::Suspended {
                return Err(ApiError::TenantSuspended);
            }
            tracing::Span::current().record("tenant.slug", tenant.slug.as_str());
            let request_id = req.extensions().get::<RequestId>().cloned().unwrap_or_default();
            let header = req.app_data::<web::Data<ClientIpHeader>>().and_then(|h| h.0.clone());
            let ip = crate::http::client_ip(&req, header.as_deref());
            Ok(Self { tenant, principal, role, request_id, ip, db: db.get_ref().clone() })
        })
    }
}

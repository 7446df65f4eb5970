//! The request context every tenant route extracts: the resolved tenant, who
//! is calling, and the gate that decides what they may do.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, web};

use crate::db::{Db, PoolError, TenantConn, TxFn};
use crate::error::ApiError;
use crate::http::RequestId;
use crate::registry::Tenant;
use crate::resolve::TenantResolver;

/// Who is making the request. Sessions and API keys plug in here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials were presented.
    Anonymous,
}

/// What a route is about to do, as the access gate sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
    Delete,
}

/// A resolved, servable tenant plus the caller. Extracting it answers 404 for
/// an unknown tenant and 403 `tenant_suspended` for a suspended one.
pub struct TenantContext {
    pub tenant: Arc<Tenant>,
    pub principal: Principal,
    pub request_id: RequestId,
    db: Db,
}

impl TenantContext {
    /// The access gate. Every tenant route calls it with what it is about to
    /// do. Until identity and the policy engine exist it only requires a
    /// resolved, active tenant (already guaranteed by extraction).
    pub fn authorize(&self, resource: &'static str, action: Action) -> Result<(), ApiError> {
        tracing::debug!(resource, ?action, principal = ?self.principal, "access granted: tenant resolved");
        Ok(())
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

impl FromRequest for TenantContext {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let resolver = req
                .app_data::<web::Data<Arc<TenantResolver>>>()
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("TenantResolver is not registered")))?;
            let db = req
                .app_data::<web::Data<Db>>()
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("Db is not registered")))?;
            let tenant = resolver.resolve(&req).await?;
            tracing::Span::current().record("tenant.slug", tenant.slug.as_str());
            let request_id = req.extensions().get::<RequestId>().cloned().unwrap_or_default();
            Ok(Self { tenant, principal: Principal::Anonymous, request_id, db: db.get_ref().clone() })
        })
    }
}

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

use actix_web::{FromRequest, HttpRequest, dev::Payload};

use super::{Access, Decision, Need, Subject};
use crate::auth::{Sessions, bearer};
use crate::context::{TenantContext, registered};
use crate::error::ApiError;
use crate::ids::UserId;

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
            impl $crate::access::gate::Requirement for $name {
                const NEED: $crate::access::Need = $crate::access::Need {
                    resource: $resource,
                    action: $crate::access::Action::$action,
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
}

/// The decision as the client sees it.
pub(crate) fn outcome(decision: Decision) -> Result<(), ApiError> {
    match decision {
        Decision::Allowed { .. } => Ok(()),
        Decision::Forbidden => Err(ApiError::Forbidden),
        Decision::PlanRequired { feature, plan } => Err(ApiError::PlanRequired { feature, plan }),
    }
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
            let sessions = registered::<Arc<Sessions>>(&req)?;
            let session = sessions.verify(&token).await?.ok_or(ApiError::Unauthenticated)?;
            tracing::Span::current().record("user.id", session.user_id.to_string());
            let access = registered::<Arc<Access>>(&req)?;
            let subject = Subject::User(session.user_id);
            let (admin, asked) = access.platform_user(session.user_id).await?;
            let decision = if admin { access.decide(&asked, &R::NEED)? } else { Decision::Forbidden };
            drop(asked);
            record(subject, "platform", &R::NEED, &decision);
            outcome(decision)?;
            Ok(Self { user_id: session.user_id, session_id: session.session_id, _requirement: PhantomData })
        })
    }
}

//! Billing's own error: what went wrong below the HTTP edge, with its
//! cause. Routes turn it into [`ApiError`] with `?`; jobs and the CLI keep
//! its whole chain (`{:#}`).

use crate::client::StripeError;
use plinth_access::plans::PlanError;
use plinth_http::ApiError;
use plinth_tenants::db::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("billing is not configured on this server")]
    NotConfigured,
    #[error("no stored event {0:?}")]
    NoSuchEvent(String),
    /// The circuit breaker is open after repeated failures.
    #[error("Stripe is failing; not calling it for a while")]
    StripePaused,
    /// Stripe answered and refused (400, 401, 403, 404): the request or the
    /// key is wrong; retrying cannot help. Stripe's own message.
    #[error("Stripe refused {what} ({status}{}): {message}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    StripeRefused { what: &'static str, status: u16, code: Option<String>, message: String },
    /// Stripe asked for a later retry (409 or 429) and still did after the
    /// retries.
    #[error("Stripe asked to retry {what} later ({status}): {message}")]
    StripeBusy { what: &'static str, status: u16, message: String },
    #[error("{what} failed")]
    StripeFailed {
        what: &'static str,
        #[source]
        source: StripeError,
    },
    /// Stripe refused a request's idempotency key: used before with other
    /// parameters (400 `idempotency_error`). A 409 (the key in use by a
    /// concurrent request) is retried, then `StripeBusy`.
    #[error("Stripe refused the idempotency key: it was used with other parameters")]
    StripeKeyReused,
    /// A checkout for a tenant with a subscription that has not ended.
    #[error("the tenant already has a live subscription")]
    AlreadySubscribed,
    /// What Stripe has cannot be applied (an unknown price or customer).
    #[error("cannot apply: {0}")]
    Unappliable(String),
    #[error("database")]
    Db(#[from] diesel::result::Error),
    #[error("database pool")]
    Pool(#[from] PoolError),
    #[error("changing the plan")]
    Plan(#[from] PlanError),
    #[error("{0}")]
    Internal(String),
}

impl BillingError {
    /// Whether retrying later may succeed: Stripe unreachable, busy or
    /// paused, or the database failing. Refusals and unreadable answers
    /// are not.
    pub fn transient(&self) -> bool {
        match self {
            Self::StripePaused | Self::StripeBusy { .. } | Self::Db(_) | Self::Pool(_) => true,
            Self::StripeFailed { source, .. } => source.class() != crate::client::Class::Permanent,
            _ => false,
        }
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::NotConfigured => ApiError::BillingNotConfigured,
            BillingError::NoSuchEvent(_) => ApiError::NotFound("event"),
            BillingError::AlreadySubscribed => ApiError::AlreadySubscribed,
            BillingError::StripePaused | BillingError::StripeFailed { .. } | BillingError::StripeBusy { .. } => {
                ApiError::Unavailable(e.into())
            }
            BillingError::Db(e) => e.into(),
            BillingError::Pool(e) => e.into(),
            BillingError::Plan(e) => e.into(),
            BillingError::StripeKeyReused => ApiError::IdempotencyKeyReused,
            BillingError::StripeRefused { .. } | BillingError::Unappliable(_) | BillingError::Internal(_) => {
                ApiError::Internal(e.into())
            }
        }
    }
}

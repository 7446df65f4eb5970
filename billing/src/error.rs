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
    /// Stripe answered and refused (4xx): our request, not an outage.
    #[error("Stripe refused {what} ({status}): {message}")]
    StripeRefused { what: &'static str, status: u16, message: String },
    #[error("{what} failed")]
    StripeFailed {
        what: &'static str,
        #[source]
        source: StripeError,
    },
    /// Stripe refused a request's idempotency key: used before with other
    /// parameters (400 `idempotency_error`), or in use by a concurrent
    /// request (409).
    #[error("Stripe refused the idempotency key ({status})")]
    StripeIdempotency { status: u16 },
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

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::NotConfigured => ApiError::BillingNotConfigured,
            BillingError::NoSuchEvent(_) => ApiError::NotFound("event"),
            BillingError::StripePaused | BillingError::StripeFailed { .. } => ApiError::Unavailable(e.into()),
            BillingError::Db(e) => e.into(),
            BillingError::Pool(e) => e.into(),
            BillingError::Plan(e) => e.into(),
            BillingError::StripeIdempotency { status: 409 } => ApiError::IdempotencyKeyInUse,
            BillingError::StripeIdempotency { .. } => ApiError::IdempotencyKeyReused,
            BillingError::StripeRefused { .. } | BillingError::Unappliable(_) | BillingError::Internal(_) => {
                ApiError::Internal(e.into())
            }
        }
    }
}

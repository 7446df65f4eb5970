//! The access policy's errors, with their cause kept. Routes meet them
//! through `?`, which turns them into [`ApiError`] (the `From` below); the
//! gate, an extractor, does the same. Tools and benchmarks print them with
//! their cause chain.

use plinth_http::error::ApiError;
use plinth_tenants::db::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The tenant does not exist (or is being deleted).
    #[error("tenant not found")]
    TenantNotFound,
    /// The plan's limit for a quota is reached.
    #[error("the plan allows {limit} {quota}; {used} are in use")]
    QuotaExceeded { quota: &'static str, limit: u32, used: i64 },
    /// The application registered no counter for a quota it limits.
    #[error("no counter is registered for {0}")]
    NoCounter(&'static str),
    #[error("the policy check failed")]
    Policy(#[source] casbin::Error),
    /// The engine's writer task is gone (a bug, or the process is ending).
    #[error("the policy writer has stopped")]
    WriterStopped,
    /// The writer could not read what a check needed (it logged why).
    #[error("reading the access policy's rows failed")]
    NotRead,
    /// Checking a bearer token failed (identity's error, kept as the source).
    #[error("checking the credential failed")]
    Authentication(#[source] anyhow::Error),
    /// The client presented too many unknown tokens; retry after this long.
    #[error("too many unknown tokens")]
    RateLimited(std::time::Duration),
    #[error("database query failed")]
    Database(#[from] diesel::result::Error),
    #[error("no database connection available")]
    Pool(#[from] PoolError),
}

impl From<AccessError> for ApiError {
    fn from(err: AccessError) -> Self {
        match err {
            AccessError::TenantNotFound => Self::NotFound("tenant"),
            AccessError::QuotaExceeded { quota, limit, used } => Self::QuotaExceeded { quota, limit, used },
            AccessError::Database(db) => db.into(),
            AccessError::Pool(pool) => pool.into(),
            AccessError::RateLimited(wait) => plinth_http::ratelimit::limited(wait),
            AccessError::NotRead => Self::Unavailable(err.into()),
            AccessError::NoCounter(_)
            | AccessError::Policy(_)
            | AccessError::WriterStopped
            | AccessError::Authentication(_) => Self::Internal(err.into()),
        }
    }
}

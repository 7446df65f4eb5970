//! Plan limits, counted inside the transaction that would exceed them, by
//! the crate that owns what is counted ([`Counter`]).
//!
//! [`reserve`] takes a transaction-scoped advisory lock for the tenant and
//! the quota, then counts. Two requests creating at once queue on the lock,
//! so the second counts the first's row: a limit cannot be overshot, and
//! nothing is locked once the transaction ends. Unlimited quotas take no
//! lock and count nothing.

use std::collections::HashMap;
use std::sync::Arc;

use diesel::sql_types::{Integer, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::BoxFuture;

use crate::catalog::Quota;
use crate::error::AccessError;
use plinth_tenants::ids::TenantId;

/// Counts what one quota limits for one tenant. The crate that owns the
/// counted rows implements it (projects: the product; members and API keys:
/// identity), and the application registers one per quota in [`Counters`].
/// `conn` is the caller's, in its transaction: a platform connection or a
/// tenant-scoped one.
pub trait Counter: Send + Sync + 'static {
    fn count<'a>(&'a self, conn: &'a AsyncPgConnection, tenant: TenantId) -> BoxFuture<'a, diesel::QueryResult<i64>>;
}

/// One [`Counter`] per quota, registered at start-up as app data.
#[derive(Clone, Default)]
pub struct Counters(HashMap<Quota, Arc<dyn Counter>>);

impl Counters {
    pub fn with(mut self, quota: Quota, counter: impl Counter) -> Self {
        self.0.insert(quota, Arc::new(counter));
        self
    }

    pub fn get(&self, quota: Quota) -> Result<&dyn Counter, AccessError> {
        self.0.get(&quota).map(|c| &**c).ok_or(AccessError::NoCounter(quota.as_str()))
    }
}

impl Quota {
    /// The advisory lock class of this quota (first key of the two-key lock).
    fn lock_class(self) -> i32 {
        0x504c_0000
            + match self {
                Self::Projects => 1,
                Self::Members => 2,
                Self::ApiKeys => 3,
            }
    }
}

/// How much of a quota a tenant uses; `max: None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Usage {
    pub used: i64,
    pub max: Option<u32>,
}

/// Counts `quota` for `tenant` with `counter`, without a lock (for display).
pub async fn usage(
    conn: &AsyncPgConnection,
    tenant: TenantId,
    counter: &dyn Counter,
    limit: Option<u32>,
) -> Result<Usage, AccessError> {
    Ok(Usage { used: counter.count(conn, tenant).await?, max: limit })
}

/// [`AccessError::QuotaExceeded`] (402 `quota_exceeded` at the edge) unless
/// `tenant` may have one more of `quota`.
/// Holds the tenant's lock for `quota` until the transaction ends.
/// Counted by `counter` (the owner of the rows), in `conn`'s transaction.
pub async fn reserve(
    conn: &AsyncPgConnection,
    tenant: TenantId,
    quota: Quota,
    limit: Option<u32>,
    counter: &dyn Counter,
) -> Result<(), AccessError> {
    let Some(limit) = limit else { return Ok(()) };
    // Raw SQL: a function call diesel's DSL has no declaration for.
    let mut locking = conn;
    diesel::sql_query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind::<Integer, _>(quota.lock_class())
        .bind::<Text, _>(tenant.0.to_string())
        .execute(&mut locking)
        .await?;
    let used = counter.count(conn, tenant).await?;
    if used >= i64::from(limit) {
        return Err(AccessError::QuotaExceeded { quota: quota.as_str(), limit, used });
    }
    Ok(())
}

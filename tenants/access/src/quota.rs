//! Plan limits, counted in SQL inside the transaction that would exceed
//! them.
//!
//! [`reserve`] takes a transaction-scoped advisory lock for the tenant and
//! the quota, then counts. Two requests creating at once queue on the lock,
//! so the second counts the first's row: a limit cannot be overshot, and
//! nothing is locked once the transaction ends. Unlimited quotas take no
//! lock and count nothing.

use diesel::QueryableByName;
use diesel::pg::Pg;
use diesel::sql_types::{BigInt, Integer, Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnectionCore, RunQueryDsl};

use super::Quota;
use plinth_http::error::ApiError;
use plinth_tenants::ids::TenantId;

/// A connection `reserve` can run on: a platform connection, or a
/// tenant-scoped one (`TenantConn::pg`).
pub trait Conn: AsyncConnectionCore<Backend = Pg> + Send {}
impl<C: AsyncConnectionCore<Backend = Pg> + Send> Conn for C {}

/// Members who joined, without pending invitations: what accepting an
/// invitation is checked against (the invitation already holds a seat).
pub const JOINED_MEMBERS_SQL: &str = "SELECT count(*) AS used FROM public.memberships WHERE tenant_id = $1";

impl Quota {
    /// Counts what the quota limits; takes the tenant id as `$1`. Projects
    /// live in the tenant's schema, found through its `search_path`.
    pub fn count_sql(self) -> &'static str {
        match self {
            Self::Projects => "SELECT count(*) AS used FROM projects",
            Self::Members => {
                "SELECT (SELECT count(*) FROM public.memberships WHERE tenant_id = $1) \
                 + (SELECT count(*) FROM public.invitations WHERE tenant_id = $1 \
                    AND accepted_at IS NULL AND expires_at > now()) AS used"
            }
            Self::ApiKeys => "SELECT count(*) AS used FROM public.api_keys WHERE tenant_id = $1 AND revoked_at IS NULL",
        }
    }

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

#[derive(QueryableByName)]
struct Used {
    #[diesel(sql_type = BigInt)]
    used: i64,
}

/// How much of a quota a tenant uses; `max: None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub used: i64,
    pub max: Option<u32>,
}

/// Counts `quota` for `tenant`, without a lock (for display).
pub async fn usage<C: Conn>(
    conn: &mut C,
    tenant: TenantId,
    quota: Quota,
    limit: Option<u32>,
) -> Result<Usage, ApiError> {
    let row: Used = diesel::sql_query(quota.count_sql()).bind::<SqlUuid, _>(tenant.0).get_result(conn).await?;
    Ok(Usage { used: row.used, max: limit })
}

/// 402 `quota_exceeded` unless `tenant` may have one more of `quota`.
/// Holds the tenant's lock for `quota` until the transaction ends.
pub async fn reserve<C: Conn>(
    conn: &mut C,
    tenant: TenantId,
    quota: Quota,
    limit: Option<u32>,
    sql: &str,
) -> Result<(), ApiError> {
    let Some(limit) = limit else { return Ok(()) };
    diesel::sql_query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind::<Integer, _>(quota.lock_class())
        .bind::<Text, _>(tenant.0.to_string())
        .execute(conn)
        .await?;
    let row: Used = diesel::sql_query(sql).bind::<SqlUuid, _>(tenant.0).get_result(conn).await?;
    if row.used >= i64::from(limit) {
        return Err(ApiError::QuotaExceeded { quota: quota.as_str(), limit, used: row.used });
    }
    Ok(())
}

//! Rate limits of the identity and membership routes: their settings
//! (`PLINTH_LIMIT_*`, see `docs/identity.md`) and the limiters, one set per
//! instance, shared by its workers, counting in the shared `rate_limits`
//! table so that every instance counts against the same limits.

use std::time::Duration;

use plinth_http::ApiError;
use plinth_http::ratelimit::{Limit, RateLimiter, Refused};
use plinth_tenants::Db;

/// How often the sensitive routes may be used. Each is `burst` per `period`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitConfig {
    /// Login attempts from one address.
    pub login_per_ip: Limit,
    /// Failed logins for one account from one address: the attacker's
    /// address is slowed down, not the account's owner elsewhere.
    pub login_failures_per_account_ip: Limit,
    /// Failed logins for one account from anywhere (a distributed guess).
    pub login_failures_per_account: Limit,
    pub signup_per_ip: Limit,
    pub password_reset_per_ip: Limit,
    pub password_reset_per_account: Limit,
    /// Email verification and password-reset confirmations from one address.
    pub verify_per_ip: Limit,
    /// Invitation mails to one address, from every tenant.
    pub invitations_per_address: Limit,
    /// Invitation mails from one tenant.
    pub invitations_per_tenant: Limit,
    /// Organizations one user creates.
    pub organizations_per_user: Limit,
    /// Bearer tokens no session or key has, from one address, on one
    /// instance (see `sessions::UnknownTokens`).
    pub unknown_tokens_per_ip: Limit,
}

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            login_per_ip: Limit::new(30, MINUTE),
            login_failures_per_account_ip: Limit::new(5, 15 * MINUTE),
            login_failures_per_account: Limit::new(50, HOUR),
            signup_per_ip: Limit::new(10, HOUR),
            password_reset_per_ip: Limit::new(10, HOUR),
            password_reset_per_account: Limit::new(3, HOUR),
            verify_per_ip: Limit::new(30, HOUR),
            invitations_per_address: Limit::new(5, HOUR),
            invitations_per_tenant: Limit::new(30, HOUR),
            organizations_per_user: Limit::new(5, HOUR),
            unknown_tokens_per_ip: Limit::new(60, MINUTE),
        }
    }
}

/// The limiters, shared by all workers of an instance.
pub struct RateLimits {
    pub(crate) login_per_ip: RateLimiter,
    pub(crate) login_failures_per_account_ip: RateLimiter,
    pub(crate) login_failures_per_account: RateLimiter,
    pub(crate) signup_per_ip: RateLimiter,
    pub(crate) password_reset_per_ip: RateLimiter,
    pub(crate) password_reset_per_account: RateLimiter,
    pub(crate) verify_per_ip: RateLimiter,
    pub(crate) invitations_per_address: RateLimiter,
    pub(crate) invitations_per_tenant: RateLimiter,
    pub(crate) organizations_per_user: RateLimiter,
}

impl RateLimits {
    /// Limiters counted in the shared `rate_limits` table through `db`, so
    /// that every instance counts against the same limit.
    pub fn new(config: &RateLimitConfig, db: &Db) -> Self {
        let shared = |name, limit| RateLimiter::shared(name, limit, db.clone());
        Self {
            login_per_ip: shared("login_per_ip", config.login_per_ip),
            login_failures_per_account_ip: shared(
                "login_failures_per_account_ip",
                config.login_failures_per_account_ip,
            ),
            login_failures_per_account: shared("login_failures_per_account", config.login_failures_per_account),
            signup_per_ip: shared("signup_per_ip", config.signup_per_ip),
            password_reset_per_ip: shared("password_reset_per_ip", config.password_reset_per_ip),
            password_reset_per_account: shared("password_reset_per_account", config.password_reset_per_account),
            verify_per_ip: shared("verify_per_ip", config.verify_per_ip),
            invitations_per_address: shared("invitations_per_address", config.invitations_per_address),
            invitations_per_tenant: shared("invitations_per_tenant", config.invitations_per_tenant),
            organizations_per_user: shared("organizations_per_user", config.organizations_per_user),
        }
    }
}

pub(crate) async fn count(limiter: &RateLimiter, key: &str) -> Result<(), ApiError> {
    limiter.check(key).await.map_err(|refused| {
        if let Refused::Limited(wait) = &refused {
            tracing::info!(retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "rate limited");
        }
        refused.into()
    })
}

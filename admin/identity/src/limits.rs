//! Rate limits of the identity and membership routes: their settings
//! (`PLINTH_LIMIT_*`, see `docs/identity.md`) and the limiters, one set per
//! instance, shared by its workers.

use std::time::Duration;

use plinth_http::ApiError;
use plinth_http::ratelimit::{self, Limit, RateLimiter};

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
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            login_per_ip: RateLimiter::new(config.login_per_ip),
            login_failures_per_account_ip: RateLimiter::new(config.login_failures_per_account_ip),
            login_failures_per_account: RateLimiter::new(config.login_failures_per_account),
            signup_per_ip: RateLimiter::new(config.signup_per_ip),
            password_reset_per_ip: RateLimiter::new(config.password_reset_per_ip),
            password_reset_per_account: RateLimiter::new(config.password_reset_per_account),
            verify_per_ip: RateLimiter::new(config.verify_per_ip),
            invitations_per_address: RateLimiter::new(config.invitations_per_address),
            invitations_per_tenant: RateLimiter::new(config.invitations_per_tenant),
            organizations_per_user: RateLimiter::new(config.organizations_per_user),
        }
    }
}

pub(crate) fn count(limiter: &RateLimiter, key: &str) -> Result<(), ApiError> {
    limiter.check(key).map_err(|wait| {
        tracing::info!(retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "rate limited");
        ratelimit::limited(wait)
    })
}

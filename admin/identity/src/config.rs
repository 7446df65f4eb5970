//! The identity routes' settings.

use std::time::Duration;

use actix_web::web;

use crate::limits::RateLimitConfig;

/// Settings of the identity routes.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub session_ttl: Duration,
    pub verify_email_ttl: Duration,
    pub password_reset_ttl: Duration,
    /// A header set by a proxy you control naming the client's address
    /// (its last entry is used); unset: the peer address.
    pub client_ip_header: Option<String>,
    pub limits: RateLimitConfig,
    /// Organizations one user may own (`PLINTH_MAX_ORGANIZATIONS_PER_USER`).
    pub max_organizations_per_user: u32,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(14 * 24 * 3600),
            verify_email_ttl: Duration::from_secs(48 * 3600),
            password_reset_ttl: Duration::from_secs(3600),
            client_ip_header: None,
            limits: RateLimitConfig::default(),
            max_organizations_per_user: 20,
        }
    }
}

/// The registered settings, or the defaults.
pub(crate) fn config(data: Option<web::Data<IdentityConfig>>) -> IdentityConfig {
    data.map(|d| d.get_ref().clone()).unwrap_or_default()
}

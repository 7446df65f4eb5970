//! The identity routes' settings.

use std::time::Duration;

use actix_web::{HttpRequest, web};

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
    /// The DNS server domain proofs are looked up at
    /// (`PLINTH_DNS_RESOLVER`); unset: the system's (`/etc/resolv.conf`).
    pub dns_resolver: Option<std::net::SocketAddr>,
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
            dns_resolver: None,
        }
    }
}

impl IdentityConfig {
    /// The client's address (see `client_ip_header`).
    pub fn client_ip(&self, req: &HttpRequest) -> String {
        plinth_http::request::client_ip(req, self.client_ip_header.as_deref())
    }

    /// The client, as the rate limits count it (an IPv6 address per /64).
    pub fn client_key(&self, req: &HttpRequest) -> String {
        plinth_http::ratelimit::client_key(&self.client_ip(req))
    }
}

/// The registered settings, or the defaults.
pub(crate) fn config(data: Option<web::Data<IdentityConfig>>) -> IdentityConfig {
    data.map(|d| d.get_ref().clone()).unwrap_or_default()
}

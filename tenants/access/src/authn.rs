//! The authentication the gate asks: whose is a bearer token. The access
//! crate defines the question; identity answers it (sessions and API keys
//! are its tables) and the application registers the answer as
//! `web::Data<dyn Authenticate>`.

use crate::error::AccessError;
use actix_web::HttpRequest;
use actix_web::http::header::AUTHORIZATION;
use futures_util::future::BoxFuture;
use plinth_tenants::ids::{TenantId, UserId};

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A signed-in user's session. `ended_in`: tenants whose admins ended
    /// it there; the gate refuses it in those (401), and only in those.
    Session { user_id: UserId, session_id: uuid::Uuid, ended_in: Vec<TenantId> },
    /// An API key, which acts only in its one tenant.
    ApiKey { key_id: uuid::Uuid, tenant_id: TenantId },
    /// A platform admin (`operator`) acting as the member `user_id`, only
    /// in `tenant_id`, for a short while. Anywhere else it is nobody.
    Impersonation { user_id: UserId, session_id: uuid::Uuid, operator: UserId, tenant_id: TenantId },
    /// A tenant's SCIM token: it opens that tenant's `/scim/v2/` routes
    /// ([`crate::gate::ScimAllowed`]) and nothing else.
    Scim { token_id: uuid::Uuid, tenant_id: TenantId },
}

/// Answers whose a bearer token is: `Ok(None)` for a token that is unknown,
/// expired or revoked; an error only when the answer could not be found
/// (the database's error as [`AccessError::Database`] or
/// [`AccessError::Pool`], so a lost connection stays a 503), or when
/// `client` has presented too many unknown tokens
/// ([`AccessError::RateLimited`]).
pub trait Authenticate: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
        client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Credential>, AccessError>>;
}

/// The caller, as the limit on unknown tokens counts it: taken from the
/// request (its peer address and the trusted proxy header's value, a cheap
/// copy) and worked out into a rate-limit key only when a token has to be
/// looked up. Most requests' tokens are cached and never need it.
#[derive(Debug, Clone, Default)]
pub struct Client {
    forwarded: Option<actix_web::http::header::HeaderValue>,
    peer: Option<std::net::IpAddr>,
}

impl Client {
    pub fn of(req: &HttpRequest) -> Self {
        let header = req.app_data::<actix_web::web::Data<plinth_http::request::ClientIpHeader>>();
        let forwarded = header.and_then(|h| h.0.as_deref()).and_then(|name| req.headers().get(name)).cloned();
        Self { forwarded, peer: req.peer_addr().map(|a| a.ip()) }
    }

    /// The rate-limit key: the client address, an IPv6 address as its /64.
    pub fn key(&self) -> String {
        plinth_http::ratelimit::client_key(&plinth_http::request::client_ip_of(self.forwarded.as_ref(), self.peer))
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A signed-in user's session.
    Session { user_id: UserId, session_id: uuid::Uuid },
    /// An API key, which acts only in its one tenant.
    ApiKey { key_id: uuid::Uuid, tenant_id: TenantId },
}

/// Answers whose a bearer token is: `Ok(None)` for a token that is unknown,
/// expired or revoked; an error only when the answer could not be found
/// (the database's error as [`AccessError::Database`] or
/// [`AccessError::Pool`], so a lost connection stays a 503), or when
/// `client` (the rate-limit key of the caller's address) has presented too
/// many unknown tokens ([`AccessError::RateLimited`]).
pub trait Authenticate: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<Option<Credential>, AccessError>>;
}

/// The caller's address as the rate limits count it (an IPv6 address per
/// /64), through the trusted proxy header when one is set.
pub fn client_key(req: &HttpRequest) -> String {
    let header = req.app_data::<actix_web::web::Data<plinth_http::request::ClientIpHeader>>().and_then(|h| h.0.clone());
    plinth_http::ratelimit::client_key(&plinth_http::request::client_ip(req, header.as_deref()))
}

/// The bearer token of a request, if it has one.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

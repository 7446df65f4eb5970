//! Authentication: opaque bearer tokens.
//!
//! A token is `pls_` + 32 random bytes in URL-safe base64. Only its SHA-256
//! hash is stored, so a database leak yields no usable token. Checking a token
//! costs no database round trip while cached: answers (including "no such
//! session") are kept in a [`NotifiedCache`] for at most a minute, and a
//! trigger NOTIFYs every instance when a session is revoked or deleted, so a
//! logout or a password change takes effect everywhere within a second.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{FromRequest, HttpMessage as _, HttpRequest, dev::Payload, web};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::BoxFuture;
use sha2::Digest as _;

use plinth_access::AccessError;
use plinth_access::Role;
use plinth_access::authn::{Authenticate, Client, Credential, bearer};
use plinth_http::ApiError;
use plinth_http::ratelimit::{Limit, RateLimiter, Refused};
use plinth_tenants::cache::NotifiedCache;
use plinth_tenants::db::Db;
use plinth_tenants::ids::{TenantId, UserId};
use plinth_tenants::notify::{Handler, ListenEvent};

use crate::error::IdentityError;
use crate::schema::{api_keys, scim_tokens, session_tenant_ends, sessions};

/// The NOTIFY channel on which revoked session ids arrive.
pub const CHANNEL: &str = "plinth_sessions";
const TOKEN_PREFIX: &str = "pls_";

/// A valid session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: uuid::Uuid,
    pub user_id: UserId,
    pub expires_at: DateTime<Utc>,
    /// Set for an impersonation session (`crate::impersonation`).
    pub impersonation: Option<Impersonation>,
    /// Tenants whose admins ended this session there: it is refused in
    /// them, and only in them.
    pub ended_in: Vec<TenantId>,
}

/// What opened a session: the client's `User-Agent` (at most 256
/// characters) and address, as `GET /v1/me/sessions` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    pub user_agent: Option<String>,
    pub ip: Option<String>,
}

impl Device {
    pub fn of(req: &HttpRequest, cfg: &crate::config::IdentityConfig) -> Self {
        let user_agent = req
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(256).collect());
        Self { user_agent, ip: Some(cfg.client_ip(req)) }
    }
}

/// A platform admin acting as the session's user, only in one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Impersonation {
    pub operator: UserId,
    pub tenant: TenantId,
}

/// `N` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], getrandom::Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)?;
    Ok(bytes)
}

/// A new random token and the hash to store.
pub fn new_token() -> Result<(String, [u8; 32]), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let token = format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_token(&token);
    Ok((token, hash))
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = sessions)]
struct SessionRow {
    id: uuid::Uuid,
    user_id: uuid::Uuid,
    expires_at: DateTime<Utc>,
    impersonator_id: Option<uuid::Uuid>,
    tenant_id: Option<uuid::Uuid>,
}

impl SessionRow {
    fn info(self) -> SessionInfo {
        let impersonation = match (self.impersonator_id, self.tenant_id) {
            (Some(operator), Some(tenant)) => {
                Some(Impersonation { operator: UserId(operator), tenant: TenantId(tenant) })
            }
            _ => None,
        };
        SessionInfo {
            session_id: self.id,
            user_id: UserId(self.user_id),
            expires_at: self.expires_at,
            impersonation,
            ended_in: Vec::new(),
        }
    }
}

/// Starts a session for `user` in the caller's transaction; returns the token
/// (shown to the client once) and the session.
pub async fn create_session(
    conn: &AsyncPgConnection,
    user: UserId,
    ttl: Duration,
    device: &Device,
) -> Result<(String, SessionInfo), IdentityError> {
    let ttl = chrono::Duration::from_std(ttl)
        .map_err(|e| IdentityError::Internal(anyhow::Error::new(e).context("the session lifetime is out of range")))?;
    insert_session(conn, user, Utc::now() + ttl, None, device).await
}

/// Starts an impersonation session: `operator` acting as `user` in
/// `tenant` only, until `expires_at` (never renewed), for `reason`.
pub(crate) async fn create_impersonation_session(
    conn: &AsyncPgConnection,
    user: UserId,
    operator: UserId,
    tenant: TenantId,
    reason: &str,
    expires_at: DateTime<Utc>,
) -> Result<(String, SessionInfo), IdentityError> {
    let device = Device::default();
    insert_session(conn, user, expires_at, Some((Impersonation { operator, tenant }, reason)), &device).await
}

async fn insert_session(
    conn: &AsyncPgConnection,
    user: UserId,
    expires_at: DateTime<Utc>,
    impersonation: Option<(Impersonation, &str)>,
    device: &Device,
) -> Result<(String, SessionInfo), IdentityError> {
    let (token, hash) = new_token()?;
    let mut conn = conn;
    let row: SessionRow = diesel::insert_into(sessions::table)
        .values((
            sessions::id.eq(uuid::Uuid::now_v7()),
            sessions::user_id.eq(user.0),
            sessions::token_hash.eq(&hash[..]),
            sessions::expires_at.eq(expires_at),
            sessions::impersonator_id.eq(impersonation.map(|(i, _)| i.operator.0)),
            sessions::tenant_id.eq(impersonation.map(|(i, _)| i.tenant.0)),
            sessions::reason.eq(impersonation.map(|(_, reason)| reason)),
            sessions::user_agent.eq(device.user_agent.as_deref()),
            sessions::ip.eq(device.ip.as_deref()),
            sessions::last_used_at.eq(diesel::dsl::now),
        ))
        .returning(SessionRow::as_returning())
        .get_result(&mut conn)
        .await?;
    Ok((token, row.info()))
}

/// Revokes one session (logout).
pub async fn revoke_session(conn: &AsyncPgConnection, session: uuid::Uuid) -> diesel::QueryResult<()> {
    let mut conn = conn;
    diesel::update(sessions::table.filter(sessions::id.eq(session)).filter(sessions::revoked_at.is_null()))
        .set(sessions::revoked_at.eq(diesel::dsl::now))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Revokes every session of `user` (password changed or reset).
pub async fn revoke_all_sessions(conn: &AsyncPgConnection, user: UserId) -> diesel::QueryResult<usize> {
    let mut conn = conn;
    diesel::update(sessions::table.filter(sessions::user_id.eq(user.0)).filter(sessions::revoked_at.is_null()))
        .set(sessions::revoked_at.eq(diesel::dsl::now))
        .execute(&mut conn)
        .await
}

/// Revokes every session of `user` but `keep` (a second factor turned on).
pub async fn revoke_other_sessions(
    conn: &AsyncPgConnection,
    user: UserId,
    keep: uuid::Uuid,
) -> diesel::QueryResult<usize> {
    let mut conn = conn;
    diesel::update(
        sessions::table
            .filter(sessions::user_id.eq(user.0))
            .filter(sessions::id.ne(keep))
            .filter(sessions::revoked_at.is_null()),
    )
    .set(sessions::revoked_at.eq(diesel::dsl::now))
    .execute(&mut conn)
    .await
}

/// Bearer tokens are `pls_`, `plk_` or `plp_` and 32 random bytes in unpadded
/// base64: anything of another length is unknown without a query.
const TOKEN_LEN: usize = 4 + 43;

/// Unknown bearer tokens from one client address, counted on this instance.
/// Each unknown token costs a query on the small lookup pool; a client over
/// the limit is refused (429) before the query, and tokens the caches know
/// are never counted or refused. Local by design: it protects this
/// instance's pool, and a shared count would cost the query it saves.
pub struct UnknownTokens(RateLimiter);

impl UnknownTokens {
    pub fn new(limit: Limit) -> Arc<Self> {
        Arc::new(Self(RateLimiter::local("unknown_tokens_per_ip", limit)))
    }

    /// Runs a lookup the caches could not answer, counted against `client`
    /// before it is made (so that concurrent lookups cannot all pass one
    /// check) and given back unless it found no token (a live token, or a
    /// lookup that failed, is not a guess). Over the limit, refused (429)
    /// without the lookup.
    async fn lookup<T>(
        &self,
        client: &Client,
        query: impl Future<Output = Result<Option<T>, IdentityError>>,
    ) -> Result<Option<T>, IdentityError> {
        let client = client.key();
        match self.0.reserve(&client).await {
            Ok(_) => {}
            Err(Refused::Limited(wait)) => {
                let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                tracing::info!(retry_after_ms, "too many unknown tokens");
                return Err(IdentityError::RateLimited(wait));
            }
            Err(Refused::Unavailable(err)) => return Err(IdentityError::Limits(err)),
        }
        let found = query.await;
        if !matches!(found, Ok(None)) {
            // A local limiter: nothing to fail.
            let _ = self.0.refund(&client).await;
        }
        found
    }
}

/// When each session or key was last marked used, so that a use is
/// written at most once a minute per id (a token checked from the cache
/// costs no query; marking every use would cost one a request).
struct UseMarks(std::sync::Mutex<std::collections::HashMap<uuid::Uuid, std::time::Instant>>);

impl UseMarks {
    fn new() -> Self {
        Self(std::sync::Mutex::new(std::collections::HashMap::new()))
    }

    /// Whether a use of `id` should be written now (and notes that it is).
    fn due(&self, id: uuid::Uuid) -> bool {
        let mut marked = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if marked.get(&id).is_some_and(|at| now.duration_since(*at) < Duration::from_secs(60)) {
            return false;
        }
        if marked.len() >= 100_000 {
            marked.clear();
        }
        marked.insert(id, now);
        true
    }

    /// Writes a use of the session or key `id` in the background, if one
    /// is due.
    fn mark(&self, db: &Db, id: uuid::Uuid, what: Used) {
        if !self.due(id) {
            return;
        }
        let db = db.clone();
        tokio::spawn(async move {
            let result = db
                .platform(async |c| {
                    let now = diesel::dsl::now;
                    match what {
                        Used::Session => {
                            diesel::update(sessions::table.find(id))
                                .set(sessions::last_used_at.eq(now))
                                .execute(c)
                                .await
                        }
                        Used::ApiKey => {
                            diesel::update(api_keys::table.find(id))
                                .set(api_keys::last_used_at.eq(now))
                                .execute(c)
                                .await
                        }
                    }
                    .map_err(IdentityError::from)
                })
                .await;
            if let Err(err) = result {
                tracing::warn!(error = format!("{:#}", anyhow::Error::new(err)), ?what, "recording a last use failed");
            }
        });
    }
}

/// What [`UseMarks::mark`] records the use of.
#[derive(Debug, Clone, Copy)]
enum Used {
    Session,
    ApiKey,
}

/// Checks bearer tokens, with a cache kept current across instances;
/// records when each session was last used, at most once a minute.
pub struct Sessions {
    db: Db,
    cache: NotifiedCache<[u8; 32], Option<SessionInfo>>,
    unknown: Arc<UnknownTokens>,
    used: UseMarks,
}

impl Sessions {
    pub fn new(db: Db, unknown: Arc<UnknownTokens>) -> Arc<Self> {
        Arc::new(Self {
            db,
            cache: NotifiedCache::new("sessions", Some(Duration::from_secs(60)), 100_000),
            unknown,
            used: UseMarks::new(),
        })
    }

    /// The listener handler that evicts revoked sessions.
    pub fn listen_handler(self: &Arc<Self>) -> Handler {
        let this = Arc::clone(self);
        Arc::new(move |event| match event {
            ListenEvent::Notified(session_id) => this
                .cache
                .remove_where(|_, cached| cached.as_ref().is_some_and(|s| s.session_id.to_string() == session_id)),
            ListenEvent::Connected => this.cache.set_trusted(true),
            ListenEvent::Disconnected => this.cache.set_trusted(false),
        })
    }

    /// The live session a token belongs to, if any. `client` is the
    /// caller's rate-limit key (see [`UnknownTokens`]).
    pub async fn verify(&self, token: &str, client: &Client) -> Result<Option<SessionInfo>, IdentityError> {
        if !token.starts_with(TOKEN_PREFIX) || token.len() != TOKEN_LEN {
            return Ok(None);
        }
        let hash = hash_token(token);
        let found = match self.cache.get(&hash) {
            Ok(hit) => hit,
            Err(ticket) => {
                let query = self.db.platform(async |c| {
                    let row: Option<SessionRow> = sessions::table
                        .filter(sessions::token_hash.eq(&hash[..]))
                        .filter(sessions::revoked_at.is_null())
                        .select(SessionRow::as_select())
                        .first(c)
                        .await
                        .optional()?;
                    let Some(row) = row else { return Ok::<_, IdentityError>(None) };
                    let ended_in: Vec<uuid::Uuid> = session_tenant_ends::table
                        .filter(session_tenant_ends::session_id.eq(row.id))
                        .select(session_tenant_ends::tenant_id)
                        .load(c)
                        .await?;
                    Ok(Some(SessionInfo { ended_in: ended_in.into_iter().map(TenantId).collect(), ..row.info() }))
                });
                let found = self.unknown.lookup(client, query).await?;
                self.cache.insert(ticket, hash, found.clone());
                found
            }
        };
        let found = found.filter(|s| s.expires_at > Utc::now());
        if let Some(session) = &found {
            self.used.mark(&self.db, session.session_id, Used::Session);
        }
        Ok(found)
    }
}

pub use plinth_access::{API_KEYS_CHANNEL, MEMBERSHIPS_CHANNEL};

/// API keys start with this; sessions with `pls_`.
pub const API_KEY_PREFIX: &str = "plk_";

/// A live API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub key_id: uuid::Uuid,
    pub tenant_id: TenantId,
    pub role: Role,
}

/// A new API key secret and its hash.
pub fn new_api_key() -> Result<(String, [u8; 32]), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let key = format!("{API_KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_token(&key);
    Ok((key, hash))
}

/// Checks API keys, cached like sessions; records when each key was last
/// used, at most once a minute per key.
pub struct ApiKeys {
    db: Db,
    cache: NotifiedCache<[u8; 32], Option<ApiKeyInfo>>,
    unknown: Arc<UnknownTokens>,
    used: UseMarks,
}

impl ApiKeys {
    pub fn new(db: Db, unknown: Arc<UnknownTokens>) -> Arc<Self> {
        Arc::new(Self {
            db,
            cache: NotifiedCache::new("api_keys", Some(Duration::from_secs(60)), 100_000),
            unknown,
            used: UseMarks::new(),
        })
    }

    pub fn listen_handler(self: &Arc<Self>) -> Handler {
        let this = Arc::clone(self);
        Arc::new(move |event| match event {
            // A key revoked, deleted, or added: an added one (created, or
            // restored with its tenant) may have been cached as "no such
            // key", under a hash this instance cannot tell from the id, so
            // every such answer goes.
            ListenEvent::Notified(key_id) => {
                this.cache.remove_where(|_, cached| cached.as_ref().is_none_or(|k| k.key_id.to_string() == key_id))
            }
            ListenEvent::Connected => this.cache.set_trusted(true),
            ListenEvent::Disconnected => this.cache.set_trusted(false),
        })
    }

    /// The live key a secret belongs to, if any.
    pub async fn verify(&self, key: &str, client: &Client) -> Result<Option<ApiKeyInfo>, IdentityError> {
        if !key.starts_with(API_KEY_PREFIX) || key.len() != TOKEN_LEN {
            return Ok(None);
        }
        let hash = hash_token(key);
        let found = match self.cache.get(&hash) {
            Ok(hit) => hit,
            Err(ticket) => {
                let query = self.db.platform(async |c| {
                    Ok::<_, IdentityError>(
                        api_keys::table
                            .filter(api_keys::token_hash.eq(&hash[..]))
                            .filter(api_keys::revoked_at.is_null())
                            .select((api_keys::id, api_keys::tenant_id, api_keys::role))
                            .first(c)
                            .await
                            .optional()?,
                    )
                });
                let row: Option<(uuid::Uuid, uuid::Uuid, String)> = self.unknown.lookup(client, query).await?;
                let found = row.and_then(|(key_id, tenant, role)| {
                    Some(ApiKeyInfo { key_id, tenant_id: TenantId(tenant), role: Role::parse(&role)? })
                });
                self.cache.insert(ticket, hash, found.clone());
                found
            }
        };
        if let Some(key) = &found {
            self.used.mark(&self.db, key.key_id, Used::ApiKey);
        }
        Ok(found)
    }
}

/// SCIM tokens start with this (`p` for provisioning).
pub const SCIM_TOKEN_PREFIX: &str = "plp_";

/// A new SCIM token secret and its hash.
pub fn new_scim_token() -> Result<(String, [u8; 32]), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let token = format!("{SCIM_TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_token(&token);
    Ok((token, hash))
}

/// Checks SCIM tokens. Not cached: a directory sends few requests, and an
/// uncached check makes a revoked token fail on its very next request on
/// every instance.
pub struct ScimTokens {
    db: Db,
    unknown: Arc<UnknownTokens>,
}

impl ScimTokens {
    pub fn new(db: Db, unknown: Arc<UnknownTokens>) -> Arc<Self> {
        Arc::new(Self { db, unknown })
    }

    /// The live token a secret belongs to, and its tenant, if any.
    pub async fn verify(&self, token: &str, client: &Client) -> Result<Option<(uuid::Uuid, TenantId)>, IdentityError> {
        if !token.starts_with(SCIM_TOKEN_PREFIX) || token.len() != TOKEN_LEN {
            return Ok(None);
        }
        let hash = hash_token(token);
        let query = self.db.platform(async |c| {
            Ok::<_, IdentityError>(
                scim_tokens::table
                    .filter(scim_tokens::token_hash.eq(&hash[..]))
                    .filter(scim_tokens::revoked_at.is_null())
                    .select((scim_tokens::id, scim_tokens::tenant_id))
                    .first::<(uuid::Uuid, uuid::Uuid)>(c)
                    .await
                    .optional()?,
            )
        });
        let found = self.unknown.lookup(client, query).await?;
        Ok(found.map(|(id, tenant)| (id, TenantId(tenant))))
    }
}

/// The caller's own session, from `Authorization: Bearer <token>`.
/// Extracting it answers 401 `unauthenticated` when the token is missing,
/// unknown, expired or revoked, and 403 `forbidden` to an impersonation
/// session: what takes this (the second factor, new organizations) is the
/// user's own. Routes an impersonation session may use take [`AnySession`].
#[derive(Debug, Clone)]
pub struct Authenticated(pub SessionInfo);

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let any = AnySession::from_request(req, payload);
        Box::pin(async move {
            let AnySession(session) = any.await?;
            if session.impersonation.is_some() {
                return Err(ApiError::NotWhileImpersonating);
            }
            Ok(Self(session))
        })
    }
}

/// The caller's session, an impersonation session included (whose answers
/// then carry `plinth-impersonation: true`): for `GET /v1/me` and signing
/// out.
#[derive(Debug, Clone)]
pub struct AnySession(pub SessionInfo);

impl FromRequest for AnySession {
    type Error = ApiError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let token = bearer(req);
        let client = Client::of(req);
        let sessions = req.app_data::<web::Data<Arc<Sessions>>>().cloned();
        let req = req.clone();
        Box::pin(async move {
            let sessions = sessions.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("Sessions is not registered")))?;
            let token = token.ok_or(ApiError::Unauthenticated)?;
            let session = sessions.verify(&token, &client).await?.ok_or(ApiError::Unauthenticated)?;
            tracing::Span::current().record("user.id", session.user_id.to_string());
            if session.impersonation.is_some() {
                req.extensions_mut().insert(plinth_http::request::Impersonating);
            }
            Ok(Self(session))
        })
    }
}

/// The answer to the gate's question ([`Authenticate`]): sessions for `pls_`
/// tokens, API keys for `plk_` ones, SCIM tokens for `plp_` ones.
pub struct Authenticator {
    pub sessions: Arc<Sessions>,
    pub api_keys: Arc<ApiKeys>,
    pub scim_tokens: Arc<ScimTokens>,
}

impl Authenticate for Authenticator {
    fn authenticate<'a>(
        &'a self,
        token: &'a str,
        client: &'a Client,
    ) -> BoxFuture<'a, Result<Option<Credential>, AccessError>> {
        Box::pin(async move {
            if token.starts_with(API_KEY_PREFIX) {
                let key = self.api_keys.verify(token, client).await?;
                Ok(key.map(|k| Credential::ApiKey { key_id: k.key_id, tenant_id: k.tenant_id }))
            } else if token.starts_with(SCIM_TOKEN_PREFIX) {
                let found = self.scim_tokens.verify(token, client).await?;
                Ok(found.map(|(token_id, tenant_id)| Credential::Scim { token_id, tenant_id }))
            } else {
                let session = self.sessions.verify(token, client).await?;
                Ok(session.map(|s| match s.impersonation {
                    None => Credential::Session { user_id: s.user_id, session_id: s.session_id, ended_in: s.ended_in },
                    Some(i) => Credential::Impersonation {
                        user_id: s.user_id,
                        session_id: s.session_id,
                        operator: i.operator,
                        tenant_id: i.tenant,
                    },
                }))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() -> Result<(), getrandom::Error> {
        let (a, ha) = new_token()?;
        let (b, hb) = new_token()?;
        assert!(a.starts_with("pls_") && a.len() == 4 + 43);
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(hash_token(&a), ha);
        Ok(())
    }
}

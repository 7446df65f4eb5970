//! `Idempotency-Key` on the routes that create something: the same key with
//! the same request within 24 hours replays the first answer (status and
//! body, with `Idempotent-Replayed: true`) without doing the work again; the
//! same key with another request is 422 `idempotency_key_reused`. Keys are
//! the caller's own: another user's or API key's never collide.
//!
//! A route takes [`IdempotencyKey`] and its [`crate::Json`] body (which
//! keeps the body's digest) and runs its work through [`once`], claiming
//! the key with [`plinth_tenants::idempotency::claim`] and recording its
//! answer with [`plinth_tenants::idempotency::record`] in the transaction
//! that does the work.

use std::future::{Future, Ready, ready};

use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HOST, HeaderName};
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};
use plinth_tenants::crypto::Keyring;
use plinth_tenants::idempotency::{self, Earlier};
use plinth_tenants::{Db, ShardName};
use sha2::{Digest as _, Sha256};

use crate::ApiError;

pub const HEADER: &str = "idempotency-key";
/// Set on a replayed answer.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The longest key taken.
pub const MAX_KEY: usize = 255;

/// The request's `Idempotency-Key`, and the hash of what names the request
/// apart from its body: method, path, tenant (the `X-Tenant` header and the
/// host); with the keyring that seals stored answers.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    sent: Option<(String, [u8; 32])>,
    ring: Option<web::Data<Keyring>>,
}

/// A request made with a key, by a caller: what [`once`], [`claim`] and
/// [`record`] take.
#[derive(Debug, Clone)]
pub struct Keyed {
    inner: idempotency::Keyed,
    ring: web::Data<Keyring>,
}

impl Keyed {
    /// `user:<id>`, `api_key:<id>`, or what else named the caller.
    pub fn caller(&self) -> &str {
        &self.inner.caller
    }

    /// The key as the caller sent it.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// What a stored answer is bound to: its caller and key.
    fn context(&self) -> Vec<u8> {
        idempotency::seal_context(&self.inner.caller, &self.inner.key)
    }
}

impl IdempotencyKey {
    /// The key for `caller` (`user:<id>` or `api_key:<id>`) and a request
    /// with a body of `digest` ([`crate::Json::digest`]), if a key was sent.
    pub fn keyed(&self, caller: String, digest: [u8; 32]) -> Result<Option<Keyed>, ApiError> {
        let Some((key, head)) = &self.sent else { return Ok(None) };
        let ring = self
            .ring
            .clone()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no keyring registered for stored answers")))?;
        let request = Sha256::new().chain_update(head).chain_update(digest).finalize().into();
        Ok(Some(Keyed { inner: idempotency::Keyed { caller, key: key.clone(), request }, ring }))
    }
}

impl FromRequest for IdempotencyKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ring = req.app_data::<web::Data<Keyring>>().cloned();
        let Some(value) = req.headers().get(HEADER) else { return ready(Ok(Self { sent: None, ring })) };
        let key = match value.to_str() {
            Ok(key) if (1..=MAX_KEY).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => key,
            _ => {
                return ready(Err(ApiError::invalid(format!(
                    "Idempotency-Key must be 1 to {MAX_KEY} visible ASCII characters"
                ))));
            }
        };
        let header = |name: &str| req.headers().get(name).map(|v| v.as_bytes()).unwrap_or_default();
        let mut hash = Sha256::new();
        for part in [req.method().as_str().as_bytes(), req.path().as_bytes(), header("x-tenant"), header(HOST.as_str())]
        {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        ready(Ok(Self { sent: Some((key.to_owned(), hash.finalize().into())), ring }))
    }
}

/// The answer an earlier request with this key left, replayed; 422 when the
/// key was used for another request.
async fn replay(db: &Db, on: &ShardName, keyed: &Keyed) -> Result<Option<HttpResponse>, ApiError> {
    let earlier = db.on_shard(on, async |c| Ok::<_, ApiError>(idempotency::earlier(c, &keyed.inner).await?)).await?;
    match earlier {
        None => Ok(None),
        Some(Earlier::OtherRequest) => Err(ApiError::IdempotencyKeyReused),
        Some(Earlier::Answered { status, body }) => {
            let status = StatusCode::from_u16(status).map_err(|e| ApiError::Internal(e.into()))?;
            // Answers stored before they were sealed are plain JSON.
            let body = if Keyring::is_sealed(&body) {
                keyed.ring.open(&body, &keyed.context()).map_err(|e| ApiError::Internal(e.into()))?
            } else {
                body
            };
            Ok(Some(
                HttpResponse::build(status)
                    .insert_header((CONTENT_TYPE, "application/json"))
                    .insert_header((REPLAYED, "true"))
                    .body(body),
            ))
        }
    }
}

/// Runs `work` once per key: an earlier answer is replayed; otherwise
/// `work` runs, and must claim the key in its transaction (answering
/// [`ApiError::IdempotencyKeyInUse`] when the claim fails) and record its
/// answer there. A request that lost the claim to a concurrent one replays
/// that one's answer. Without a key, `work` just runs.
pub async fn once<F, Fut>(db: &Db, keyed: Option<&Keyed>, work: F) -> Result<HttpResponse, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<HttpResponse, ApiError>>,
{
    once_on(db, &ShardName::primary(), keyed, work).await
}

/// [`once`] for work in a tenant's own tables, which claims and records
/// the key in its tenant transaction: the answer is kept on the tenant's
/// shard, so it is replayed from there.
pub async fn once_on<F, Fut>(
    db: &Db,
    shard: &ShardName,
    keyed: Option<&Keyed>,
    work: F,
) -> Result<HttpResponse, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<HttpResponse, ApiError>>,
{
    let Some(keyed) = keyed else { return work().await };
    if let Some(answer) = replay(db, shard, keyed).await? {
        return Ok(answer);
    }
    match work().await {
        Err(ApiError::IdempotencyKeyInUse) => replay(db, shard, keyed).await?.ok_or(ApiError::IdempotencyKeyInUse),
        other => other,
    }
}

/// Claims the key in the work's transaction ([`once`]).
pub async fn claim<C>(conn: &mut C, keyed: Option<&Keyed>) -> Result<(), ApiError>
where
    C: diesel_async::AsyncConnectionCore<Backend = diesel::pg::Pg>,
{
    match keyed {
        Some(keyed) if !idempotency::claim(conn, &keyed.inner).await? => Err(ApiError::IdempotencyKeyInUse),
        _ => Ok(()),
    }
}

/// Records the answer in the work's transaction; returns its JSON, for
/// [`answer`] once the transaction has committed.
pub async fn record<C, T>(
    conn: &mut C,
    keyed: Option<&Keyed>,
    status: StatusCode,
    body: &T,
) -> Result<Vec<u8>, ApiError>
where
    C: diesel_async::AsyncConnectionCore<Backend = diesel::pg::Pg>,
    T: serde::Serialize,
{
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.into()))?;
    if let Some(keyed) = keyed {
        // Answers hold personal data, some a credential: sealed at rest.
        let sealed = keyed.ring.seal(&bytes, &keyed.context()).map_err(|e| ApiError::Internal(e.into()))?;
        idempotency::record(conn, &keyed.inner, status.as_u16(), &sealed).await?;
    }
    Ok(bytes)
}

/// The answer [`record`] stored.
pub fn answer(status: StatusCode, json: Vec<u8>) -> HttpResponse {
    HttpResponse::build(status).insert_header((CONTENT_TYPE, "application/json")).body(json)
}

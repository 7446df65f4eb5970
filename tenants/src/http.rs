//! HTTP plumbing shared by every crate that serves routes: request ids and the
//! request span, the JSON body extractor with size limits and per-field
//! errors, and cursor pagination.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use crate::error::{ApiError, FieldError};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The id of one request: taken from `x-request-id` when the client sent a
/// well-formed one (1–64 of `A-Za-z0-9-_.:`), generated otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl Default for RequestId {
    /// A random (v4) UUID from a per-thread generator seeded once from the
    /// OS, so generating an id costs no system call. Request ids need to be
    /// unique, not unpredictable.
    fn default() -> Self {
        use std::cell::Cell;
        thread_local! {
            static STATE: Cell<u64> = Cell::new(uuid::Uuid::new_v4().as_u64_pair().0 | 1);
        }
        // SplitMix64.
        let next = || {
            STATE.with(|state| {
                let s = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
                state.set(s);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            })
        };
        let bits = (u128::from(next()) << 64) | u128::from(next());
        Self(uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid().to_string())
    }
}

impl RequestId {
    fn from_client(value: &HeaderValue) -> Option<Self> {
        let s = value.to_str().ok()?;
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        ok.then(|| Self(s.to_owned()))
    }
}

/// Middleware: gives every request an id and one tracing span carrying the
/// id, method, path, tenant slug (filled in when resolved), the access
/// decision (filled in by the gate, see `access`) and status, and
/// echoes the id in the `x-request-id` response header.
pub async fn request_span(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req.headers().get(REQUEST_ID_HEADER).and_then(RequestId::from_client).unwrap_or_default();
    req.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(
        "request",
        request.id = %id.0,
        http.method = %req.method(),
        http.path = %req.path(),
        tenant.slug = tracing::field::Empty,
        user.id = tracing::field::Empty,
        access.subject = tracing::field::Empty,
        access.tenant = tracing::field::Empty,
        access.resource = tracing::field::Empty,
        access.action = tracing::field::Empty,
        access.feature = tracing::field::Empty,
        access.result = tracing::field::Empty,
        access.rule = tracing::field::Empty,
        http.status = tracing::field::Empty,
    );
    let started = Instant::now();
    // Handler and extractor errors arrive here already turned into responses.
    let mut res = next.call(req).instrument(span.clone()).await?;
    let status = res.status().as_u16();
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        res.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    span.record("http.status", status);
    span.in_scope(|| {
        tracing::info!(http.latency_ms = started.elapsed().as_secs_f64() * 1000.0, "request finished");
    });
    Ok(res)
}

/// The largest JSON body accepted, registered as app data (default 64 KiB).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl Default for BodyLimit {
    fn default() -> Self {
        Self(64 * 1024)
    }
}

/// A JSON request body. Refuses a wrong content type (415), a body over the
/// [`BodyLimit`] (413, checked before and while reading), malformed JSON (400)
/// and values of the wrong type (400 naming the field).
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req.app_data::<BodyLimit>().copied().unwrap_or_default().0;
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        let declared =
            req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            if !is_json {
                return Err(ApiError::UnsupportedMediaType);
            }
            if declared.is_some_and(|n| n > limit) {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| ApiError::invalid(format!("could not read the body: {e}")))?;
                if body.len() + chunk.len() > limit {
                    return Err(ApiError::PayloadTooLarge { limit });
                }
                body.extend_from_slice(&chunk);
            }
            parse_json(&body).map(Json)
        })
    }
}

/// Parses JSON, reporting type errors against the field they occurred in.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("malformed JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid(format!("invalid body: {inner}"))
        } else {
            ApiError::invalid_fields(vec![FieldError::new(path, "invalid", strip_position(&inner.to_string()))])
        }
    })
}

fn strip_position(message: &str) -> String {
    message.split(" at line ").next().unwrap_or(message).to_owned()
}

/// Collects per-field problems and turns them into one 400.
#[derive(Debug, Default)]
pub struct Validator(Vec<FieldError>);

impl Validator {
    pub fn check(&mut self, ok: bool, field: &str, code: &'static str, message: &str) -> &mut Self {
        if !ok {
            self.0.push(FieldError::new(field, code, message));
        }
        self
    }

    /// A text field: trimmed length within `min..=max` characters, no control
    /// characters other than newlines and tabs when `multiline`.
    pub fn text(&mut self, field: &str, value: &str, min: usize, max: usize, multiline: bool) -> &mut Self {
        let len = value.trim().chars().count();
        if len < min {
            let message =
                if min == 1 { "must not be empty".to_owned() } else { format!("must be at least {min} characters") };
            self.0.push(FieldError::new(field, "too_short", message));
        } else if len > max {
            self.0.push(FieldError::new(field, "too_long", format!("must be at most {max} characters")));
        }
        let bad = value.chars().any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\t' | '\r')));
        self.check(!bad, field, "control_characters", "must not contain control characters")
    }

    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.0.is_empty() { Ok(()) } else { Err(ApiError::invalid_fields(std::mem::take(&mut self.0))) }
    }
}

/// Query parameters of a cursor-paginated list.
#[derive(Debug, Deserialize)]
pub struct PageParams {
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// A validated page request: `limit` in 1..=100 (default 20) and an opaque
/// cursor (the id of the last item of the previous page).
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub limit: i64,
    pub after: Option<uuid::Uuid>,
}

impl PageParams {
    pub fn validate(&self) -> Result<PageRequest, ApiError> {
        let mut v = Validator::default();
        let limit = match self.limit.as_deref() {
            None => 20,
            Some(s) => match s.parse::<i64>() {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => {
                    v.check(false, "limit", "out_of_range", "must be a whole number from 1 to 100");
                    20
                }
            },
        };
        let after = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(c) => {
                let parsed = uuid::Uuid::parse_str(c).ok();
                v.check(parsed.is_some(), "cursor", "invalid", "is not a cursor returned by this list");
                parsed
            }
        };
        v.finish()?;
        Ok(PageRequest { limit, after })
    }
}

/// One page of a list: the items, and the cursor of the next page if any.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows fetched in id order.
    pub fn from_rows(mut rows: Vec<T>, request: PageRequest, id: impl Fn(&T) -> uuid::Uuid) -> Self {
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|r| id(r).to_string())
        } else {
            None
        };
        Self { data: rows, next_cursor }
    }
}

/// App data: the header a trusted proxy sets to the client's address
/// (`PLINTH_CLIENT_IP_HEADER`), if any.
#[derive(Debug, Clone, Default)]
pub struct ClientIpHeader(pub Option<String>);

/// The client's address: the last entry of `header` when Plinth runs behind
/// a proxy that sets it (`PLINTH_CLIENT_IP_HEADER`), else the peer address.
pub fn client_ip(req: &HttpRequest, header: Option<&str>) -> String {
    let from_header = header
        .and_then(|name| req.headers().get(name))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 64);
    from_header.or_else(|| req.peer_addr().map(|a| a.ip().to_string())).unwrap_or_else(|| "unknown".into())
}

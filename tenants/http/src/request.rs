//! HTTP plumbing shared by every crate that serves routes: request ids and the
//! request span, the JSON body extractor with size limits and per-field
//! errors, and cursor pagination.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use actix_web::ResponseError as _;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue,
    REFERRER_POLICY, STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;

use plinth_tenants::replicas::{Consistency, WAL_POSITION_HEADER};
use plinth_tenants::text::is_invisible;

use crate::error::{ApiError, FieldError};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The id of one request: always Plinth's own (a random UUID), answered in
/// `x-request-id` and recorded in logs and the audit log. A well-formed id
/// the client sent (1–64 of `A-Za-z0-9-_.:`) is kept beside it (`.1`), never
/// in its place, so nobody can choose what the audit log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String, pub Option<String>);

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
        Self(uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid().to_string(), None)
    }
}

impl RequestId {
    /// `entry` stamped with this request: Plinth's own id, and the client's
    /// (if it sent one) in the details, never in its place.
    pub fn stamp(&self, entry: plinth_tenants::audit::Entry) -> plinth_tenants::audit::Entry {
        entry.request(&self.0, self.1.as_deref())
    }

    fn client_id(value: &HeaderValue) -> Option<String> {
        let s = value.to_str().ok()?;
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        ok.then(|| s.to_owned())
    }
}

/// Whether answers carry `Strict-Transport-Security` (app data: on when
/// the public URL is https). Without it registered, they don't.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hsts(pub bool);

/// The headers every answer carries unless its route set its own: the API
/// answers JSON that no browser should sniff, frame, cache or send a
/// referrer from, and most of it is personal (tokens, members, addresses).
fn secure(headers: &mut HeaderMap, hsts: bool) {
    let defaults = [
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (REFERRER_POLICY, "no-referrer"),
        (X_FRAME_OPTIONS, "DENY"),
        (CONTENT_SECURITY_POLICY, "default-src 'none'; frame-ancestors 'none'"),
        (CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in defaults {
        if !headers.contains_key(&name) {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    if hsts && !headers.contains_key(STRICT_TRANSPORT_SECURITY) {
        headers.insert(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000; includeSubDomains"));
    }
}

/// The header every answer made with an impersonation session carries
/// (`true`), so that the web app can show a banner.
pub const IMPERSONATION_HEADER: actix_web::http::header::HeaderName =
    actix_web::http::header::HeaderName::from_static("plinth-impersonation");

/// A request extension: this request was made with an impersonation
/// session (set by whoever authenticated it), so its answer carries
/// [`IMPERSONATION_HEADER`].
#[derive(Debug, Clone, Copy)]
pub struct Impersonating;

/// Middleware: gives every request an id and one tracing span carrying the
/// id, method, path, tenant slug (filled in when resolved), the access
/// decision (filled in by the gate, see `access`) and status, and answers
/// the id in the `x-request-id` header of every response, errors included,
/// with the security headers of [`secure`] (and [`Hsts`]).
///
/// It is also where the edge refuses what no route should see: a URI that
/// decodes to a NUL byte (400). Errors raised below it by actix itself (a
/// wrong method, an extractor's complaint) are answered in the JSON envelope
/// like Plinth's own; client mistakes log at INFO at most, never ERROR.
pub async fn request_span(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let client = req.headers().get(REQUEST_ID_HEADER).and_then(RequestId::client_id);
    let id = RequestId(RequestId::default().0, client);
    req.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(
        "request",
        otel.name = method_label(req.method()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request.id = %id.0,
        request.client_id = id.1.as_deref(),
        http.method = %req.method(),
        http.path = %req.path(),
        http.route = tracing::field::Empty,
        tenant.slug = tracing::field::Empty,
        tenant.id = tracing::field::Empty,
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
    // A caller's W3C trace context makes this request part of its trace.
    plinth_tenants::trace::continue_from(&span, |name| req.headers().get(name).and_then(|v| v.to_str().ok()));
    let started = Instant::now();
    let limit = req.app_data::<BodyLimit>().copied().unwrap_or_default().0;
    let hsts = req.app_data::<Hsts>().copied().unwrap_or_default().0;
    let method = method_label(req.method());
    let stamp = |res: &mut HttpResponse, route: Option<&str>| {
        observe(method, route, res.status().as_u16(), started.elapsed());
        if let Ok(value) = HeaderValue::from_str(&id.0) {
            res.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        secure(res.headers_mut(), hsts);
        span.record("http.status", res.status().as_u16());
        if res.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        if let Some(route) = route {
            span.record("http.route", route);
            if plinth_tenants::trace::exporting() {
                plinth_tenants::trace::rename(&span, format!("{method} {route}"));
            }
        }
        span.in_scope(|| {
            tracing::info!(http.latency_ms = started.elapsed().as_secs_f64() * 1000.0, "request finished");
        });
    };
    if has_nul(req.uri()) {
        let mut res = ApiError::invalid("the URL holds a NUL byte").error_response();
        stamp(&mut res, None);
        return Ok(req.into_response(res));
    }
    match next.call(req).instrument(span.clone()).await {
        Ok(res) => {
            let (req, res) = res.into_parts();
            let mut res = enveloped(res.map_into_boxed_body(), limit);
            stamp(&mut res, req.match_pattern().as_deref());
            if req.extensions().get::<Impersonating>().is_some() {
                res.headers_mut().insert(IMPERSONATION_HEADER, HeaderValue::from_static("true"));
            }
            // Where the request's last commit ended in its shard's log, for
            // the client to send back with its reads (`plinth_tenants::replicas`).
            let written = req.extensions().get::<std::sync::Arc<Consistency>>().and_then(|c| c.written());
            if let Some(value) = written.and_then(|w| HeaderValue::from_str(&w.to_string()).ok()) {
                res.headers_mut().insert(HeaderName::from_static(WAL_POSITION_HEADER), value);
            }
            Ok(ServiceResponse::new(req, res))
        }
        // An error that escaped the handlers (a middleware's): answered as
        // the response it carries, enveloped and stamped.
        Err(err) => {
            let mut res = enveloped(err.error_response(), limit);
            stamp(&mut res, None);
            Err(actix_web::error::InternalError::from_response(err, res).into())
        }
    }
}

/// A request method as a metric label: the standard ones by name, anything
/// else as `other`, so clients cannot grow the label set.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    const KNOWN: [(Method, &str); 7] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
    ];
    KNOWN.iter().find(|(m, _)| m == method).map_or("other", |(_, name)| name)
}

/// Counts one answered request and its latency, by the route's pattern
/// (`/v1/projects/{id}`, never the path itself: ids stay out of labels);
/// `unmatched` when no route took it.
///
/// Each thread keeps the handles of the series it has seen: looking a series
/// up by its labels costs label strings, a hash and a map lookup per request.
/// Routes, methods and statuses are few, so the map stays small.
fn observe(method: &'static str, route: Option<&str>, status: u16, took: Duration) {
    let route = route.unwrap_or("unmatched");
    SERIES.with_borrow_mut(|series| {
        if !series.contains_key(route) {
            series.insert(route.into(), Vec::new());
        }
        let Some(seen) = series.get_mut(route) else { return };
        let index = match seen.iter().position(|s| s.method == method && s.status == status) {
            Some(index) => index,
            None => {
                let (route, code) = (route.to_owned(), status.to_string());
                let count = metrics::counter!(
                    "plinth_http_requests_total", "method" => method, "route" => route.clone(), "status" => code
                );
                let latency =
                    metrics::histogram!("plinth_http_request_duration_seconds", "method" => method, "route" => route);
                seen.push(RequestSeries { method, status, count, latency });
                seen.len() - 1
            }
        };
        seen[index].count.increment(1);
        seen[index].latency.record(took.as_secs_f64());
    });
}

/// The request series of one method and status (see [`observe`]).
struct RequestSeries {
    method: &'static str,
    status: u16,
    count: metrics::Counter,
    latency: metrics::Histogram,
}

thread_local! {
    /// Per route pattern.
    /// Hashed with foldhash (hashbrown's default): the route is hashed on
    /// every request, and SipHash's resistance to chosen keys buys nothing
    /// for route patterns, which come from the code.
    static SERIES: std::cell::RefCell<hashbrown::HashMap<Box<str>, Vec<RequestSeries>>> =
        std::cell::RefCell::new(hashbrown::HashMap::new());
}

/// Whether the path or query decodes to a NUL byte (`%00`).
fn has_nul(uri: &actix_web::http::Uri) -> bool {
    let raw = uri.path_and_query().map_or("", |pq| pq.as_str());
    raw.as_bytes().windows(3).any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

/// An error answer made outside Plinth's handlers (plain text or empty, by
/// actix itself), rewritten as the JSON envelope with the code its status
/// stands for; any other answer (JSON, or a page of the operator console)
/// as it is.
fn enveloped(res: HttpResponse, body_limit: usize) -> HttpResponse {
    let status = res.status();
    let kind = res.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ours = kind.contains("json") || kind.starts_with("text/html");
    if ours || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let err = match status.as_u16() {
        400 => ApiError::invalid("the request is malformed"),
        404 => ApiError::NotFound("route"),
        405 => ApiError::MethodNotAllowed,
        408 => ApiError::RequestTimeout,
        413 => ApiError::PayloadTooLarge { limit: body_limit },
        415 => ApiError::UnsupportedMediaType,
        _ if status.is_client_error() => ApiError::invalid(status.canonical_reason().unwrap_or("bad request")),
        _ => ApiError::Internal(anyhow::anyhow!("an answer of {status} with no body came from below the handlers")),
    };
    let mut answer = err.error_response();
    if let Some(allow) = res.headers().get(actix_web::http::header::ALLOW) {
        answer.headers_mut().insert(actix_web::http::header::ALLOW, allow.clone());
    }
    answer
}

/// The largest JSON body accepted, registered as app data (default 64 KiB).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl Default for BodyLimit {
    fn default() -> Self {
        Self(64 * 1024)
    }
}

/// How long a client may take to send a request body once its head has
/// arrived, registered as app data (default 10 s; `PLINTH_BODY_TIMEOUT_SECS`).
/// A body still incomplete then is answered 408 and the connection closed,
/// so a client that declares a length and stalls holds nothing for long.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

impl Default for BodyTimeout {
    fn default() -> Self {
        Self(Duration::from_secs(10))
    }
}

/// Reads a whole request body: at most `limit` bytes (413 beyond, checked
/// against `Content-Length` before reading and while reading) within the
/// request's [`BodyTimeout`] (408 after it).
pub async fn read_body<S>(req: &HttpRequest, payload: &mut S, limit: usize) -> Result<Vec<u8>, ApiError>
where
    S: futures_util::Stream<Item = Result<actix_web::web::Bytes, actix_web::error::PayloadError>> + Unpin,
{
    let timeout = req.app_data::<BodyTimeout>().copied().unwrap_or_default().0;
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let read = async {
        let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(body) => body,
        Err(_) => {
            tracing::info!(timeout_ms = timeout.as_millis() as u64, "request body timed out");
            Err(ApiError::RequestTimeout)
        }
    }
}

/// A JSON request body. Refuses a wrong content type (415), a body over the
/// [`BodyLimit`] (413, checked before and while reading), one that does not
/// arrive within the [`BodyTimeout`] (408), malformed JSON (400), a NUL
/// character in any string (400) and values of the wrong type (400 naming
/// the field).
pub struct Json<T>(pub T, [u8; 32]);

impl<T> Json<T> {
    /// The SHA-256 of the body as sent, for `Idempotency-Key` (computed only
    /// when the request has one; zero otherwise).
    pub fn digest(&self) -> [u8; 32] {
        self.1
    }
}

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
        let (req, mut payload) = (req.clone(), payload.take());
        Box::pin(async move {
            if !is_json {
                return Err(ApiError::UnsupportedMediaType);
            }
            let body = read_body(&req, &mut payload, limit).await?;
            let digest = if req.headers().contains_key(crate::idempotency::HEADER) {
                <sha2::Sha256 as sha2::Digest>::digest(&body).into()
            } else {
                [0; 32]
            };
            refuse_nul(&body)?;
            parse_json(&body).map(|value| Json(value, digest))
        })
    }
}

/// Refuses a JSON body with a NUL character in a string (`\u0000`): no
/// text Plinth stores may hold one (PostgreSQL's `text` cannot). A raw NUL
/// byte is already malformed JSON. The full parse runs only when the escape
/// appears at all.
pub fn refuse_nul(body: &[u8]) -> Result<(), ApiError> {
    fn has_nul(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    let escaped = body.windows(6).any(|w| w[0] == b'\\' && w[1] == b'u' && &w[2..] == b"0000");
    if escaped && serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| has_nul(&v)) {
        return Err(ApiError::invalid("text must not contain NUL characters"));
    }
    Ok(())
}

/// For an optional field that may be absent but not `null` (documented
/// `nullable: false`): `#[serde(default, deserialize_with = "not_null")]`.
/// serde alone reads a `null` as absent.
pub fn not_null<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Parses a JSON object, reporting type errors against the field they
/// occurred in. Every request body Plinth takes is an object; serde would
/// also fill a struct from an array of its fields in order (`[null, null]`),
/// which no client means.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
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

    /// A text field: at most `max` characters as sent, at least `min` once
    /// trimmed (so not blank), no control characters other than newlines and
    /// tabs when `multiline`.
    pub fn text(&mut self, field: &str, value: &str, min: usize, max: usize, multiline: bool) -> &mut Self {
        if value.trim().chars().count() < min {
            let message =
                if min == 1 { "must not be empty".to_owned() } else { format!("must be at least {min} characters") };
            self.0.push(FieldError::new(field, "too_short", message));
        } else if value.chars().count() > max {
            self.0.push(FieldError::new(field, "too_long", format!("must be at most {max} characters")));
        }
        let bad = value.chars().any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\t' | '\r')));
        self.check(!bad, field, "control_characters", "must not contain control characters");
        let hidden = value.chars().any(is_invisible);
        self.check(
            !hidden,
            field,
            "invisible_characters",
            "must not contain invisible or direction-changing characters",
        )
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// The `cursor` of the next page; null on the last page.
    #[schema(format = Uuid)]
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
/// Only a well-formed IP address is taken from the header; anything else
/// falls back to the peer address.
pub fn client_ip(req: &HttpRequest, header: Option<&str>) -> String {
    client_ip_of(header.and_then(|name| req.headers().get(name)), req.peer_addr().map(|a| a.ip()))
}

/// [`client_ip`] from the proxy header's value and the peer address.
pub fn client_ip_of(header: Option<&actix_web::http::header::HeaderValue>, peer: Option<std::net::IpAddr>) -> String {
    let from_header = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse::<std::net::IpAddr>().ok());
    from_header.or(peer).map_or_else(|| "unknown".into(), |ip| ip.to_string())
}

//! Plinth's HTTP client for Stripe's API.
//!
//! The request types, request strategies and idempotency keys are
//! async-stripe's; only the sending is Plinth's. async-stripe's own client
//! has no way to add a header to a request, and every call to Stripe must
//! carry the W3C trace context (`traceparent`) of the span that makes it, so
//! that a trace shows the call and a tracing proxy can follow it. This sends
//! the same request async-stripe would (headers, form body, the retry
//! decisions of [`RequestStrategy::test`] with Stripe's `Stripe-Should-Retry`,
//! a timeout per attempt) over the same hyper stack, plus that header.

use std::fmt::Write as _;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, USER_AGENT};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stripe_client_core::{
    CustomizedStripeRequest, Outcome, RequestBuilder, RequestStrategy, StripeClient, StripeClientErr, StripeMethod,
};
use tracing::Instrument as _;

/// A failed call to Stripe.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with its error object.
    #[error("Stripe answered {status}: {}", error.message.as_deref().unwrap_or("(no message)"))]
    Api { status: u16, error: Box<stripe_shared::ApiErrors> },
    #[error("Stripe did not answer within {0:?}")]
    Timeout(Duration),
    #[error("sending the request to Stripe")]
    Transport(#[source] hyper_util::client::legacy::Error),
    #[error("reading Stripe's answer")]
    Body(#[source] hyper::Error),
    /// The request could not be built, or the answer could not be read.
    #[error("{0}")]
    Invalid(String),
}

/// How Plinth treats a failed call (docs/billing.md, "Stripe's errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 400, 401, 403, 404 and other 4xx: retrying cannot help; Stripe's
    /// message says what to fix.
    Permanent,
    /// 409 (a concurrent request with the same idempotency key) or 429
    /// (rate limited): Stripe is up and asks for a later retry.
    Later,
    /// 5xx, timeouts, connection errors: Stripe is failing (the breaker
    /// counts these).
    Outage,
}

impl StripeError {
    pub fn class(&self) -> Class {
        match self {
            Self::Api { status: 409 | 429, .. } => Class::Later,
            Self::Api { status, .. } if *status < 500 => Class::Permanent,
            Self::Invalid(_) => Class::Permanent,
            _ => Class::Outage,
        }
    }

    /// Stripe's own status, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl StripeClientErr for StripeError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        Self::Invalid(format!("Stripe's answer could not be read: {msg}"))
    }
}

/// Calls Stripe's API at a base URL (`https://api.stripe.com/` or a
/// stand-in) with a secret key.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Ends with `/`; `v1/...` is appended.
    base: String,
    /// `Bearer <key>`, marked sensitive.
    secret: HeaderValue,
    user_agent: HeaderValue,
    version: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Client {
    /// A client with a per-attempt `timeout`.
    pub fn new(secret_key: &str, base: &str, timeout: Duration) -> Result<Self, StripeError> {
        let mut secret = HeaderValue::try_from(format!("Bearer {secret_key}"))
            .map_err(|_| StripeError::Invalid("the Stripe secret key is not a valid header value".into()))?;
        secret.set_sensitive(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(Self {
            // As async-stripe does: no idle connections kept, so a stand-in
            // or proxy that closes them never fails a call.
            http: HyperClient::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector),
            base: format!("{}/", base.trim_end_matches('/')),
            secret,
            user_agent: HeaderValue::from_static(concat!("plinth/", env!("CARGO_PKG_VERSION"))),
            version: HeaderValue::from_static(stripe_shared::version::VERSION.as_str()),
            timeout,
        })
    }

    fn request(&self, req: RequestBuilder, key: Option<&str>) -> Result<Request<Full<Bytes>>, StripeError> {
        let mut uri = format!("{}v1{}", self.base, req.path);
        if let Some(query) = req.query {
            let _ = write!(uri, "?{query}");
        }
        let method = match req.method {
            StripeMethod::Get => Method::GET,
            StripeMethod::Post => Method::POST,
            StripeMethod::Delete => Method::DELETE,
        };
        let body = req.body;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.secret.clone())
            .header(USER_AGENT, self.user_agent.clone())
            .header(HeaderName::from_static("stripe-version"), self.version.clone());
        if let Some(key) = key {
            builder = builder.header(HeaderName::from_static("idempotency-key"), key);
        }
        // The span of this call is current: the trace goes on from it.
        for (name, value) in plinth_tenants::trace::outgoing() {
            builder = builder.header(name, value);
        }
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        }
        builder
            .body(Full::new(body.map(Bytes::from).unwrap_or_default()))
            .map_err(|e| StripeError::Invalid(format!("building the request to Stripe: {e}")))
    }

    /// One attempt: the status, Stripe's `Stripe-Should-Retry`, the body.
    async fn attempt(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(u16, Option<bool>, Bytes), StripeError> {
        let sent = async {
            let response = self.http.request(req).await.map_err(StripeError::Transport)?;
            let status = response.status().as_u16();
            let retry = response
                .headers()
                .get("stripe-should-retry")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = response.into_body().collect().await.map_err(StripeError::Body)?.to_bytes();
            Ok((status, retry, body))
        };
        tokio::time::timeout(timeout, sent).await.unwrap_or(Err(StripeError::Timeout(timeout)))
    }

    async fn send(
        &self,
        req: RequestBuilder,
        strategy: RequestStrategy,
        timeout: Option<Duration>,
    ) -> Result<Bytes, StripeError> {
        let timeout = timeout.unwrap_or(self.timeout);
        let key = strategy.get_key();
        // A request with an idempotency key may be sent again safely: Stripe
        // answers a repeat with the first answer, and a 409 while the first
        // is still in flight. async-stripe's `Idempotent` strategy makes one
        // attempt; Plinth's keyed requests are retried as reads are.
        let strategy = match strategy {
            RequestStrategy::Idempotent(_) => RequestStrategy::ExponentialBackoff(3),
            other => other,
        };
        let request = self.request(req, key.as_ref().map(|k| k.as_str()))?;
        let (mut tries, mut last_status, mut last_retry) = (0, None, None);
        let mut last_error = StripeError::Invalid("the request strategy allows no attempt".into());
        loop {
            match strategy.test(last_status, last_retry, tries) {
                Outcome::Stop => return Err(last_error),
                Outcome::Continue(backoff) => {
                    if let Some(backoff) = backoff {
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
            tries += 1;
            match self.attempt(request.clone(), timeout).await {
                Ok((status, _, body)) if (200..300).contains(&status) => return Ok(body),
                Ok((status, retry, body)) => {
                    last_error =
                        match miniserde::json::from_str::<stripe_shared::Error>(&String::from_utf8_lossy(&body)) {
                            Ok(e) => StripeError::Api { status, error: e.error },
                            Err(_) => {
                                StripeError::Invalid(format!("Stripe answered {status} without its error object"))
                            }
                        };
                    (last_status, last_retry) = (Some(status), retry);
                }
                Err(err) => last_error = err,
            }
        }
    }
}

impl Client {
    /// Sends `req` and returns Stripe's answer as JSON, read by field
    /// ([`crate::object`]) rather than by async-stripe's typed parse.
    pub async fn json(&self, req: RequestBuilder, strategy: RequestStrategy) -> Result<serde_json::Value, StripeError> {
        let span = span(&req);
        let body = self.send(req, strategy, None).instrument(span).await?;
        serde_json::from_slice(&body).map_err(|e| StripeError::Invalid(format!("Stripe's answer is not JSON: {e}")))
    }
}

impl StripeClient for Client {
    type Err = StripeError;

    fn execute(&self, req: CustomizedStripeRequest) -> impl Future<Output = Result<Bytes, StripeError>> + Send {
        let (req, config) = req.into_pieces();
        let span = span(&req);
        // Plinth makes no Connect calls: `config.account_id` stays unused.
        let strategy = config.request_strategy.unwrap_or(RequestStrategy::Once);
        self.send(req, strategy, config.timeout).instrument(span)
    }
}

/// The span of one call to Stripe.
fn span(req: &RequestBuilder) -> tracing::Span {
    let method = match req.method {
        StripeMethod::Get => "GET",
        StripeMethod::Post => "POST",
        StripeMethod::Delete => "DELETE",
    };
    tracing::info_span!(
        "stripe",
        otel.name = format!("Stripe {method} /v1{}", req.path),
        otel.kind = "client",
        http.request.method = method,
        url.path = format!("/v1{}", req.path),
    )
}

//! The one error type of Plinth's HTTP surface.
//!
//! Which error belongs where:
//! - Handlers and extractors return [`ApiError`]; it owns the status code and the
//!   JSON envelope `{"error": {"code", "message", "details"?}}`.
//! - Persistence functions return `diesel::result::Error` (or a domain error of
//!   their module) and never know about HTTP; `?` converts them here.
//! - Anything unexpected becomes [`ApiError::Internal`] carrying an
//!   `anyhow::Error` with context. It is logged with its whole chain and answered
//!   as a bare 500 that carries no detail to the client.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// One invalid input field, reported in `error.details`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// The field, as the request named it.
    pub field: String,
    /// What is wrong with it (`required`, `too_long`, `invalid`, ...).
    pub code: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self { field: field.into(), code, message: message.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest { message: String, details: Vec<FieldError> },
    #[error("authentication required")]
    Unauthenticated,
    #[error("the email address or password is wrong")]
    InvalidCredentials,
    /// The password was right; now the second factor. `passkey`: when the
    /// account has passkeys, the options of a ceremony one of them can
    /// answer instead of the code (`PublicKeyCredentialRequestOptionsJSON`).
    #[error("a one-time code from the authenticator app is required (totp_code)")]
    TotpRequired { passkey: Option<Box<serde_json::Value>> },
    #[error("you are not allowed to do this")]
    Forbidden,
    #[error("this needs the {feature} feature, which the organization's plan does not include")]
    PlanRequired { feature: &'static str, plan: Option<String> },
    #[error("the plan allows {limit} {quota}; {used} are in use")]
    QuotaExceeded { quota: &'static str, limit: u32, used: i64 },
    /// The organization's payment failed and its grace period ended: it
    /// reads but does not write until an owner pays.
    #[error("the organization's payment is overdue; an owner can pay in the billing portal (POST /v1/billing/portal)")]
    PaymentRequired,
    #[error("this organization is suspended")]
    TenantSuspended,
    /// The address is at a domain whose organization requires single
    /// sign-on: password sign-in is refused; `tenant` is where to start.
    #[error("this address signs in through its organization's identity provider (single sign-on)")]
    SsoRequired { tenant: String },
    /// A platform admin impersonating a member asked for what
    /// impersonation never reaches.
    #[error(
        "not while impersonating: billing, API keys, settings, managing members and the second factor stay with the member"
    )]
    NotWhileImpersonating,
    /// The organization's owners do not allow impersonation.
    #[error("the organization's owners do not allow impersonation")]
    ImpersonationRefused,
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A link that worked once (a download) and has expired.
    #[error("this link has expired")]
    LinkExpired,
    #[error("{0}")]
    Conflict(String),
    /// A request with an `Idempotency-Key` that another request with the
    /// same key is still doing.
    #[error("another request with this Idempotency-Key is in progress; retry shortly")]
    IdempotencyKeyInUse,
    /// The same `Idempotency-Key` with another request.
    #[error("this Idempotency-Key was used with another request")]
    IdempotencyKeyReused,
    #[error("this method is not allowed on this resource")]
    MethodNotAllowed,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("too many requests; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("service temporarily unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// Not ready to serve, for a reason an operator may read (readiness).
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("billing is not configured on this server")]
    BillingNotConfigured,
    /// A downgrade to a plan whose limits the organization is over: each
    /// (quota, the plan's limit, what is used).
    #[error("the organization uses more than the plan allows: {}", over.iter().map(|(q, l, u)| format!("{u} {q} of {l}")).collect::<Vec<_>>().join(", "))]
    OverPlanLimits { over: Vec<(&'static str, u32, i64)> },
    /// A checkout for an organization that has a live subscription.
    #[error("the organization already has a live subscription; change plans in the billing portal")]
    AlreadySubscribed,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), details: Vec::new() }
    }

    pub fn invalid_fields(details: Vec<FieldError>) -> Self {
        Self::InvalidRequest { message: "the request has invalid fields".into(), details }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::Unauthenticated => "unauthenticated",
            Self::InvalidCredentials => "invalid_credentials",
            Self::TotpRequired { .. } => "totp_required",
            Self::Forbidden | Self::NotWhileImpersonating | Self::ImpersonationRefused => "forbidden",
            Self::PlanRequired { .. } => "plan_required",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::PaymentRequired => "payment_required",
            Self::TenantSuspended => "tenant_suspended",
            Self::SsoRequired { .. } => "sso_required",
            Self::NotFound(_) => "not_found",
            Self::LinkExpired => "link_expired",
            Self::Conflict(_) => "conflict",
            Self::IdempotencyKeyInUse => "idempotency_key_in_use",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::RequestTimeout => "request_timeout",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) | Self::NotReady(_) => "unavailable",
            Self::BillingNotConfigured => "billing_not_configured",
            Self::AlreadySubscribed => "already_subscribed",
            Self::OverPlanLimits { .. } => "over_plan_limits",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<diesel::result::Error> for ApiError {
    fn from(err: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        match err {
            Error::NotFound => Self::NotFound("resource"),
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                Self::Conflict("a resource with these values already exists".into())
            }
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand, _) => {
                Self::Unavailable(anyhow::Error::new(err).context("database connection lost"))
            }
            Error::DatabaseError(_, ref info) if connection_lost(info.message()) => {
                Self::Unavailable(anyhow::Error::new(err).context("database connection lost"))
            }
            other => Self::Internal(anyhow::Error::new(other).context("database query failed")),
        }
    }
}

/// Whether a server error means the connection (or the server) went away:
/// SQLSTATE 57P01–57P03 (administrator shutdown, crash shutdown, cannot
/// connect now) and class 08 (connection exceptions). diesel-async keeps
/// the message but not the SQLSTATE, so these are PostgreSQL's own
/// (untranslated) messages for those codes.
pub fn connection_lost(message: &str) -> bool {
    const LOST: [&str; 7] = [
        "terminating connection",
        "the database system is",
        "connection closed",
        "server closed the connection",
        "connection to server",
        "could not receive data",
        "could not send data",
    ];
    let message = message.to_ascii_lowercase();
    LOST.iter().any(|l| message.contains(l))
}

impl From<plinth_tenants::db::PoolError> for ApiError {
    fn from(err: plinth_tenants::db::PoolError) -> Self {
        Self::Unavailable(anyhow::Error::new(err).context("no database connection available"))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        Self::Internal(err)
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "<[FieldError]>::is_empty")]
    details: &'a [FieldError],
    /// Code-specific fields (402s say which plan or limit).
    #[serde(flatten)]
    extra: serde_json::Map<String, serde_json::Value>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated | Self::InvalidCredentials | Self::TotpRequired { .. } => StatusCode::UNAUTHORIZED,
            Self::PlanRequired { .. } | Self::QuotaExceeded { .. } | Self::PaymentRequired => {
                StatusCode::PAYMENT_REQUIRED
            }
            Self::Forbidden
            | Self::TenantSuspended
            | Self::NotWhileImpersonating
            | Self::ImpersonationRefused
            | Self::SsoRequired { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::LinkExpired => StatusCode::GONE,
            Self::Conflict(_) | Self::IdempotencyKeyInUse | Self::AlreadySubscribed | Self::OverPlanLimits { .. } => {
                StatusCode::CONFLICT
            }
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::NotReady(_) | Self::BillingNotConfigured => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            Self::Internal(err) => tracing::error!(error = format!("{err:#}"), "request failed"),
            Self::Unavailable(err) => {
                tracing::warn!(error = format!("{err:#}"), "request refused: dependency unavailable")
            }
            _ => {}
        }
        let details: &[FieldError] = match self {
            Self::InvalidRequest { details, .. } => details,
            _ => &[],
        };
        let extra = match self {
            Self::PlanRequired { feature, plan } => serde_json::json!({ "feature": feature, "plan": plan }),
            Self::QuotaExceeded { quota, limit, used } => {
                serde_json::json!({ "quota": quota, "limit": limit, "used": used })
            }
            // Where an owner goes to pay (a POST answering the portal's URL).
            Self::PaymentRequired => serde_json::json!({ "portal": "/v1/billing/portal" }),
            Self::TotpRequired { passkey: Some(options) } => serde_json::json!({ "passkey": options }),
            // Where the sign-in starts instead.
            Self::SsoRequired { tenant } => {
                serde_json::json!({ "tenant": tenant, "sso_start": format!("/v1/auth/sso/start?tenant={tenant}") })
            }
            Self::OverPlanLimits { over } => {
                let limits: Vec<_> = over
                    .iter()
                    .map(|(quota, limit, used)| serde_json::json!({ "quota": quota, "limit": limit, "used": used }))
                    .collect();
                serde_json::json!({ "limits": limits })
            }
            _ => serde_json::json!({}),
        };
        let extra = match extra {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        let body = Envelope { error: Body { code: self.code(), message: self.to_string(), details, extra } };
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            Self::Unavailable(_) | Self::NotReady(_) => {
                resp.insert_header(("retry-after", "1"));
            }
            Self::RateLimited { retry_after_secs } => {
                resp.insert_header(("retry-after", retry_after_secs.to_string()));
            }
            _ => {}
        }
        resp.json(body)
    }
}

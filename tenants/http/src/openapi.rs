//! What every operation of the OpenAPI document shares, so that each
//! handler's `#[utoipa::path]` says only what is its own: the error
//! envelope and the error answers by status, the two bearer schemes, the
//! tenant header and pagination.
//!
//! [`finish`] adds to each operation the errors that follow from what it
//! declares (a body can be malformed or too large, a bearer token missing,
//! a tenant unknown or suspended; anything can fail for want of a database)
//! unless the handler described that status itself.

use std::collections::BTreeMap;

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, SchemaType, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{OpenApi, Ref, RefOr, Required, Response};
use utoipa::{IntoParams, IntoResponses, PartialSchema, ToSchema};

use crate::error::FieldError;

/// Security scheme of a signed-in user's session token.
pub const SESSION: &str = "session";
/// Security scheme of an API key, which acts only in its own tenant.
pub const API_KEY: &str = "api_key";

/// Every error code, as the envelope's `code` says it.
pub const ERROR_CODES: &[&str] = &[
    "invalid_request",
    "unauthenticated",
    "invalid_credentials",
    "totp_required",
    "forbidden",
    "plan_required",
    "quota_exceeded",
    "payment_required",
    "tenant_suspended",
    "sso_required",
    "not_found",
    "conflict",
    "idempotency_key_in_use",
    "idempotency_key_reused",
    "method_not_allowed",
    "payload_too_large",
    "unsupported_media_type",
    "request_timeout",
    "rate_limited",
    "unavailable",
    "billing_not_configured",
    "already_subscribed",
    "link_expired",
    "over_plan_limits",
    "internal",
];

/// The body of every error answer.
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)] // A schema only: the envelope is written by `ApiError`.
pub struct ErrorEnvelope {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// What went wrong, for code to act on; one of the codes below.
    #[schema(schema_with = error_code)]
    code: String,
    /// What went wrong, for people.
    message: String,
    /// With `invalid_request`: each invalid field.
    #[schema(nullable = false)]
    details: Option<Vec<FieldError>>,
    /// With `plan_required`: the feature the plan lacks.
    #[schema(nullable = false)]
    feature: Option<String>,
    /// With `plan_required`: the organization's plan.
    plan: Option<String>,
    /// With `quota_exceeded`: the limit reached (`projects`, `members`, ...).
    #[schema(nullable = false)]
    quota: Option<String>,
    /// With `quota_exceeded`: what the plan allows.
    #[schema(nullable = false, minimum = 0)]
    limit: Option<u32>,
    /// With `quota_exceeded`: how many are in use.
    #[schema(nullable = false, minimum = 0)]
    used: Option<i64>,
    /// With `over_plan_limits`: each limit of the plan asked for that the
    /// organization is over ({quota, limit, used}).
    #[schema(nullable = false)]
    limits: Option<Vec<serde_json::Value>>,
    /// With `payment_required`: the route that opens the billing portal,
    /// where an owner pays.
    #[schema(nullable = false)]
    portal: Option<String>,
    /// With `sso_required`: the organization whose identity provider the
    /// address signs in through.
    #[schema(nullable = false)]
    tenant: Option<String>,
    /// With `sso_required`: where that sign-in starts.
    #[schema(nullable = false)]
    sso_start: Option<String>,
    /// With `totp_required`, when the account has passkeys: the options of
    /// a ceremony one of them answers instead of the code
    /// (`PublicKeyCredentialRequestOptionsJSON`; send the answer as the
    /// login's `passkey`).
    #[schema(value_type = Object, nullable = false, required = false)]
    passkey: Option<serde_json::Value>,
}

fn error_code() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(ERROR_CODES.iter().copied()))
}

/// An error answer with `status`, naming the codes it may carry.
fn error_response(status: u16, codes: &str) -> Response {
    let mut response = ResponseBuilder::new()
        .description(format!("Error: {codes}."))
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build());
    if matches!(status, 429 | 503) {
        let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0));
        let header =
            HeaderBuilder::new().schema(Some(seconds)).description(Some("Seconds to wait before trying again."));
        response = response.header("Retry-After", header.build());
    }
    response.build()
}

/// The codes an error status carries in general; a handler that answers
/// with a status for a reason of its own describes it itself.
fn codes_of(status: u16) -> &'static str {
    match status {
        400 => "invalid_request",
        401 => "unauthenticated",
        402 => "plan_required, quota_exceeded, payment_required",
        403 => "forbidden, tenant_suspended",
        404 => "not_found",
        408 => "request_timeout",
        409 => "conflict",
        422 => "idempotency_key_reused",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        429 => "rate_limited",
        503 => "unavailable",
        _ => "internal",
    }
}

macro_rules! error_responses {
    ($($(#[$meta:meta])* $name:ident: [$($status:literal),*];)*) => {$(
        $(#[$meta])*
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                [$($status),*]
                    .into_iter()
                    .map(|status: u16| (status.to_string(), RefOr::T(error_response(status, codes_of(status)))))
                    .collect()
            }
        }
    )*};
}

error_responses! {
    /// 404 `not_found`: the resource the path names does not exist (or is
    /// another tenant's).
    NotFound: [404];
    /// 409 `conflict`.
    Conflict: [409];
    /// 429 `rate_limited`, with `Retry-After`.
    RateLimited: [429];
    /// 402 `plan_required`, `quota_exceeded` or `payment_required`.
    PlanLimits: [402];
    /// 403 `forbidden`: the caller's role does not allow this.
    Forbidden: [403];
}

/// With an `Idempotency-Key`: 409 `idempotency_key_in_use` (a request
/// with the key is still running) and 422 `idempotency_key_reused`.
pub struct KeyReuse;

impl IntoResponses for KeyReuse {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (409, "Error: conflict, idempotency_key_in_use (a request with this Idempotency-Key is still running)."),
            (422, "Error: idempotency_key_reused (this Idempotency-Key was used with another request)."),
        ]
        .into_iter()
        .map(|(status, description)| {
            let mut response = error_response(status, "");
            response.description = description.to_owned();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
    }
}

/// `Idempotency-Key`, on the routes that create something.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by `crate::idempotency::IdempotencyKey`.
pub struct IdempotencyKeyHeader {
    /// Makes a retry safe: the same key with the same request within 24 hours
    /// answers the first answer again (with `Idempotent-Replayed: true`)
    /// without doing the work twice. Keys are the caller's own.
    #[param(rename = "Idempotency-Key", min_length = 1, max_length = 255, pattern = "^[!-~]+$")]
    idempotency_key: Option<String>,
}

/// A text field as [`crate::request::Validator::text`] checks it: `min` to
/// `max` characters, no control characters (but line breaks and tabs when
/// `multiline`), no invisible ones, not blank when `min` is above 0.
pub fn text(min: usize, max: usize, multiline: bool) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
        .pattern(Some(plinth_tenants::text::text_pattern(multiline, min > 0)))
}

/// A text field to change, as [`text`]; null (or left out) keeps the value.
pub fn optional_text(min: usize, max: usize, multiline: bool) -> ObjectBuilder {
    text(min, max, multiline).schema_type(SchemaType::from_iter([Type::String, Type::Null]))
}

/// An id given as text in a query, where empty means none (a cursor, a
/// filter): a UUID, or the empty string.
pub fn uuid_or_empty() -> AnyOfBuilder {
    AnyOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))))
        .item(ObjectBuilder::new().schema_type(Type::String).max_length(Some(0)))
}

/// The tenant a request acts in, when the host does not name it.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by the tenant resolver, not by handlers.
pub struct TenantHeader {
    /// The tenant's slug. Needed unless the request's host is the tenant's
    /// subdomain (`<slug>.<base domain>`) or one of its custom domains; when
    /// both are given they must name the same tenant.
    #[param(rename = "X-Tenant", pattern = "^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", max_length = 63)]
    x_tenant: Option<String>,
}

/// Whether `operation` names the tenant header.
fn in_tenant(operation: &Operation) -> bool {
    operation.parameters.iter().flatten().any(|p| matches!(p, RefOr::T(p) if p.name == "X-Tenant"))
}

/// The parameters of a cursor-paginated list.
pub fn page_params() -> Vec<utoipa::openapi::path::Parameter> {
    let limit =
        ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)).maximum(Some(100)).default(Some(20.into()));
    let cursor = uuid_or_empty();
    vec![
        ParameterBuilder::new()
            .name("limit")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some("How many items, 1 to 100 (default 20)."))
            .schema(Some(limit))
            .build(),
        ParameterBuilder::new()
            .name("cursor")
            .parameter_in(ParameterIn::Query)
            .required(Required::False)
            .description(Some("`next_cursor` of the previous page; absent or empty for the first."))
            .schema(Some(cursor))
            .build(),
    ]
}

/// Query parameters of a paginated list, for `params(PageQuery)`.
pub struct PageQuery;

impl IntoParams for PageQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<utoipa::openapi::path::Parameter> {
        page_params()
    }
}

/// Adds what every operation shares: the security schemes, the error
/// schema, and the error answers that follow from what each operation
/// declares, where it did not describe them itself:
/// - every operation: 500 `internal` and 503 `unavailable`;
/// - a request body: 400, 408, 413 and 415;
/// - query parameters: 400;
/// - a bearer token: 401;
/// - the tenant header: 400 (no tenant named), 403 (suspended, or a role
///   that may not), 404 (no such tenant).
pub fn finish(doc: &mut OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    let bearer = |description: &str, format: &str| {
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some(format.to_owned());
        http.description = Some(description.to_owned());
        SecurityScheme::Http(http)
    };
    components.add_security_scheme(
        SESSION,
        bearer(
            "A session token from `POST /v1/auth/login` or `POST /v1/signup`: `Authorization: Bearer <token>`.",
            "session token",
        ),
    );
    components.add_security_scheme(
        API_KEY,
        bearer(
            "An API key from `POST /v1/api-keys`, which acts only in its own tenant: `Authorization: Bearer <key>`.",
            "API key",
        ),
    );
    components.schemas.insert("Error".into(), ErrorEnvelope::schema());
    let mut nested = Vec::new();
    <ErrorEnvelope as ToSchema>::schemas(&mut nested);
    components.schemas.extend(nested);

    for item in doc.paths.paths.values_mut() {
        let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for operation in operations.into_iter().flatten() {
            let mut statuses = vec![500, 503];
            if operation.request_body.is_some() {
                statuses.extend([400, 408, 413, 415]);
            }
            let query = operation
                .parameters
                .iter()
                .flatten()
                .any(|p| matches!(p, RefOr::T(p) if p.parameter_in == ParameterIn::Query));
            if query {
                statuses.push(400);
            }
            if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                statuses.push(401);
            }
            if in_tenant(operation) {
                statuses.extend([400, 403, 404]);
            }
            for status in statuses {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| RefOr::T(error_response(status, codes_of(status))));
            }
            // OpenAPI requires a description of every response.
            for (status, response) in operation.responses.responses.iter_mut() {
                if let RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    let reason = status.parse().ok().and_then(|s| actix_web::http::StatusCode::from_u16(s).ok());
                    response.description = reason.and_then(|s| s.canonical_reason()).unwrap_or("Answer").to_owned();
                }
            }
        }
    }
}

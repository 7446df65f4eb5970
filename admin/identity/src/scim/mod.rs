//! SCIM 2.0 provisioning (RFC 7643, RFC 7644): an organization's directory
//! (Okta, Entra ID, ...) creates, deactivates, groups and removes its
//! members through `/scim/v2/`, with a bearer token a tenant admin made
//! (`POST /v1/scim/tokens`). The token names its tenant, so no host or
//! `X-Tenant` is needed; it opens nothing but these routes. On plans with
//! `sso`.
//!
//! - [`admin`]: the tenant admin's side: tokens, and the role each
//!   directory group gives.
//! - `users`: `/scim/v2/Users`. A directory user is an account whose
//!   address (the SCIM `userName`) is at one of the organization's
//!   verified domains. Active, they are a member; deactivated, their
//!   membership ends (every instance refuses them within a second) and so
//!   do their sessions in the organization.
//! - `groups`: `/scim/v2/Groups`, mapped to roles.
//! - `discovery`: `ServiceProviderConfig`, `ResourceTypes`, `Schemas`.
//! - `filter`: the filters the directory sends (`attribute eq "value"`).
//! - `members`: what the directory's changes do to memberships.
//! - `user_patch`: what is kept of a user, and how a PATCH changes it.

pub mod admin;
mod discovery;
mod filter;
mod groups;
mod members;
mod user_patch;
mod users;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, RETRY_AFTER};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use plinth_access::{ScimAllowed, requirements};
use plinth_http::ApiError;
use serde::Serialize;
use serde::de::DeserializeOwned;

requirements! {
    /// The directory's routes (`/scim/v2/`): a SCIM token, which acts as an
    /// admin of its tenant's members, on plans with `sso`.
    pub Provision = "scim", Manage, feature: "sso";
}

/// A request from a tenant's directory that passed the gate.
type Scim = ScimAllowed<Provision>;

/// SCIM's media type; requests may also send `application/json`.
pub const SCIM_JSON: &str = "application/scim+json";
pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// The longest text attribute kept (names, external ids).
const TEXT_MAX: usize = 256;
/// The most resources one page holds (`count` above it gets this many).
const PAGE_MAX: i64 = 100;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    discovery::configure(cfg);
    users::configure(cfg);
    groups::configure(cfg);
    admin::configure(cfg);
}

/// An error as SCIM answers it: `{"schemas": [Error], "status", "scimType"?,
/// "detail"}` in `application/scim+json`. Errors of the gate and the
/// database keep their status and (for 429 and 503) `Retry-After`; a 500
/// carries no cause.
#[derive(Debug)]
pub enum ScimError {
    Api(ApiError),
    Scim { status: StatusCode, scim_type: Option<&'static str>, detail: String },
}

impl ScimError {
    /// 400 with a SCIM error type (`invalidValue`, `invalidFilter`,
    /// `invalidPath`, `invalidSyntax`, `mutability`, ...).
    fn bad(scim_type: &'static str, detail: impl Into<String>) -> Self {
        Self::Scim { status: StatusCode::BAD_REQUEST, scim_type: Some(scim_type), detail: detail.into() }
    }

    fn not_found(what: &str) -> Self {
        Self::Scim { status: StatusCode::NOT_FOUND, scim_type: None, detail: format!("{what} not found") }
    }

    /// 409: another resource has this unique value.
    fn taken(detail: impl Into<String>) -> Self {
        Self::Scim { status: StatusCode::CONFLICT, scim_type: Some("uniqueness"), detail: detail.into() }
    }

    /// 409: the organization's rules refuse the change (the last owner).
    fn conflict(detail: impl Into<String>) -> Self {
        Self::Scim { status: StatusCode::CONFLICT, scim_type: None, detail: detail.into() }
    }
}

impl std::fmt::Display for ScimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api(err) => err.fmt(f),
            Self::Scim { detail, .. } => f.write_str(detail),
        }
    }
}

impl From<ApiError> for ScimError {
    fn from(err: ApiError) -> Self {
        Self::Api(err)
    }
}

impl From<diesel::result::Error> for ScimError {
    fn from(err: diesel::result::Error) -> Self {
        Self::Api(err.into())
    }
}

impl From<plinth_tenants::db::PoolError> for ScimError {
    fn from(err: plinth_tenants::db::PoolError) -> Self {
        Self::Api(err.into())
    }
}

impl From<crate::error::IdentityError> for ScimError {
    fn from(err: crate::error::IdentityError) -> Self {
        Self::Api(err.into())
    }
}

impl From<plinth_access::AccessError> for ScimError {
    fn from(err: plinth_access::AccessError) -> Self {
        Self::Api(err.into())
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    schemas: [&'static str; 1],
    status: String,
    #[serde(rename = "scimType", skip_serializing_if = "Option::is_none")]
    scim_type: Option<&'static str>,
    detail: &'a str,
}

impl ResponseError for ScimError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Api(err) => err.status_code(),
            Self::Scim { status, .. } => *status,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let (detail, scim_type, retry_after) = match self {
            Self::Api(err) => {
                // Logs a 500's cause and sets `Retry-After` as every other
                // route does; the answer's body is SCIM's.
                let plain = err.error_response();
                let mut detail = err.to_string();
                if let ApiError::InvalidRequest { details, .. } = err {
                    for field in details {
                        detail.push_str(&format!("; {}: {}", field.field, field.message));
                    }
                }
                let scim_type = matches!(err, ApiError::InvalidRequest { .. }).then_some("invalidValue");
                (detail, scim_type, plain.headers().get(RETRY_AFTER).cloned())
            }
            Self::Scim { scim_type, detail, .. } => (detail.clone(), *scim_type, None),
        };
        let status = self.status_code();
        let mut resp = HttpResponse::build(status);
        resp.insert_header((CONTENT_TYPE, SCIM_JSON));
        if let Some(wait) = retry_after {
            resp.insert_header((RETRY_AFTER, wait));
        }
        let body =
            ErrorBody { schemas: [ERROR_SCHEMA], status: status.as_u16().to_string(), scim_type, detail: &detail };
        resp.body(serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// A SCIM answer: `value` in `application/scim+json`.
fn answer(status: StatusCode, value: &impl Serialize) -> Result<HttpResponse, ScimError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::Internal(anyhow::Error::new(e)))?;
    Ok(HttpResponse::build(status).insert_header((CONTENT_TYPE, SCIM_JSON)).body(body))
}

/// A created resource: 201, with its URL in `Location`.
fn created(resource: &impl Serialize, meta: &Meta) -> Result<HttpResponse, ScimError> {
    let mut resp = answer(StatusCode::CREATED, resource)?;
    if let Ok(location) = actix_web::http::header::HeaderValue::from_str(&meta.location) {
        resp.headers_mut().insert(actix_web::http::header::LOCATION, location);
    }
    Ok(resp)
}

/// A request body in `application/scim+json` (or `application/json`).
fn body<T: DeserializeOwned>(req: &HttpRequest, bytes: &web::Bytes) -> Result<T, ScimError> {
    let kind = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or(SCIM_JSON);
    let kind = kind.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    if kind != SCIM_JSON && kind != "application/json" {
        return Err(ScimError::Scim {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            scim_type: None,
            detail: "content type must be application/scim+json or application/json".into(),
        });
    }
    plinth_http::request::refuse_nul(bytes)?;
    plinth_http::request::parse_json(bytes).map_err(|e| match e {
        ApiError::InvalidRequest { .. } => ScimError::Api(e),
        other => other.into(),
    })
}

/// SCIM's complex attributes are JSON objects; serde's derive would also
/// fill a struct from an array of its fields in order (`[null, null]`).
/// For `#[serde(default, deserialize_with = ...)]` on such fields.
mod objects {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::{Deserialize, Deserializer};

    fn object<E: serde::de::Error, T: DeserializeOwned>(value: serde_json::Value) -> Result<T, E> {
        if !value.is_object() {
            return Err(E::custom("expected an object"));
        }
        T::deserialize(value).map_err(E::custom)
    }

    /// An optional object.
    pub fn optional<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(None),
            value => object(value).map(Some),
        }
    }

    /// A list of objects.
    pub fn list<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Array(items) => items.into_iter().map(object).collect(),
            _ => Err(D::Error::custom("expected a list")),
        }
    }

    /// An optional list of objects.
    pub fn optional_list<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<Vec<T>>, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Array(items) => items.into_iter().map(object).collect::<Result<_, _>>().map(Some),
            _ => Err(D::Error::custom("expected a list")),
        }
    }
}

/// Where this server's SCIM resources are: `<scheme>://<host>/scim/v2`.
fn base_url(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}/scim/v2", info.scheme(), info.host())
}

/// A text attribute as stored: trimmed, empty as none, at most
/// [`TEXT_MAX`] characters.
fn text(name: &str, value: Option<&str>) -> Result<Option<String>, ScimError> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else { return Ok(None) };
    if value.chars().count() > TEXT_MAX || value.chars().any(char::is_control) {
        return Err(ScimError::bad(
            "invalidValue",
            format!("{name} must be at most {TEXT_MAX} characters, on one line"),
        ));
    }
    Ok(Some(value.to_owned()))
}

/// The page a list asks for: `startIndex` (from 1) and `count` (at most
/// [`PAGE_MAX`]), as SCIM spells them; anything else is ignored here.
#[derive(Debug, Clone, Copy)]
struct Page {
    offset: i64,
    limit: i64,
}

/// A list's query: `filter`, `startIndex`, `count`, and
/// `excludedAttributes` (only `members` of groups is honoured).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    filter: Option<String>,
    start_index: Option<String>,
    count: Option<String>,
    excluded_attributes: Option<String>,
}

impl ListQuery {
    fn page(&self) -> Result<Page, ScimError> {
        let number = |name: &str, value: &Option<String>, default: i64| match value {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map_err(|_| ScimError::bad("invalidValue", format!("{name} must be an integer"))),
        };
        // RFC 7644 3.4.2.4: below 1 counts as 1, a negative count as 0.
        let start = number("startIndex", &self.start_index, 1)?.max(1);
        let count = number("count", &self.count, PAGE_MAX)?.clamp(0, PAGE_MAX);
        Ok(Page { offset: start - 1, limit: count })
    }

    fn excludes(&self, attribute: &str) -> bool {
        self.excluded_attributes
            .as_deref()
            .is_some_and(|list| list.split(',').any(|a| a.trim().eq_ignore_ascii_case(attribute)))
    }
}

/// A resource's `meta`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ScimMeta)]
struct Meta {
    /// `User` or `Group`.
    resource_type: &'static str,
    created: chrono::DateTime<chrono::Utc>,
    last_modified: chrono::DateTime<chrono::Utc>,
    /// The resource's URL.
    location: String,
}

/// A resource id from a path: not a UUID is not found.
fn resource_id(path: &str, what: &str) -> Result<uuid::Uuid, ScimError> {
    uuid::Uuid::parse_str(path).map_err(|_| ScimError::not_found(what))
}

/// A PATCH request (`PatchOp`): its operations, each `op` (`add`,
/// `replace` or `remove`, in any case: Entra ID capitalises them), `path`
/// and `value`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = ScimPatchOp)]
struct PatchOp {
    #[serde(default)]
    schemas: Vec<String>,
    #[serde(rename = "Operations", deserialize_with = "objects::list")]
    operations: Vec<Operation>,
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = ScimPatchOperation)]
struct Operation {
    /// `add`, `replace` or `remove`, in any case.
    op: String,
    /// The attribute; without one, `value` is an object of attributes.
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    #[schema(schema_with = any_value)]
    value: Option<serde_json::Value>,
}

/// Any JSON value.
fn any_value() -> utoipa::openapi::schema::ObjectBuilder {
    utoipa::openapi::schema::ObjectBuilder::new().description(Some("Any JSON value: what the attribute holds."))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Replace,
    Remove,
}

impl PatchOp {
    fn read(req: &HttpRequest, bytes: &web::Bytes) -> Result<Self, ScimError> {
        let patch: Self = body(req, bytes)?;
        if !patch.schemas.is_empty() && !patch.schemas.iter().any(|s| s == PATCH_SCHEMA) {
            return Err(ScimError::bad("invalidSyntax", format!("schemas must hold {PATCH_SCHEMA}")));
        }
        Ok(patch)
    }
}

impl Operation {
    fn op(&self) -> Result<Op, ScimError> {
        match self.op.to_ascii_lowercase().as_str() {
            "add" => Ok(Op::Add),
            "replace" => Ok(Op::Replace),
            "remove" => Ok(Op::Remove),
            _ => Err(ScimError::bad("invalidSyntax", "op must be add, replace or remove")),
        }
    }
}

/// The error answers of a SCIM route, in SCIM's shape; the ones made before
/// the handler runs (a body too large or too slow, a malformed query
/// string, the rate limits) come in Plinth's `application/json` errors, so
/// both are described.
pub struct ScimErrors;

impl utoipa::IntoResponses for ScimErrors {
    fn responses() -> std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::Response>> {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::response::ResponseBuilder;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{Ref, RefOr};
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let scim = ObjectBuilder::new()
            .property("schemas", utoipa::openapi::schema::ArrayBuilder::new().items(string()))
            .property("status", string().description(Some("The HTTP status, as text.")))
            .property(
                "scimType",
                string().description(Some(
                    "`invalidValue`, `invalidFilter`, `invalidSyntax`, `invalidPath`, `mutability`, `uniqueness`.",
                )),
            )
            .property("detail", string())
            .required("schemas")
            .required("status")
            .required("detail")
            .build();
        [
            (400, "Bad request: a SCIM error type says which."),
            (401, "No SCIM token, or an unknown or revoked one."),
            (402, "The organization's plan lacks `sso`, or has no free seat."),
            (403, "The organization is suspended."),
            (404, "No such resource in this organization's directory."),
            (408, "The request body did not arrive in time."),
            (409, "The value is taken (`uniqueness`), or the change would leave the organization without an owner."),
            (413, "The request body is too large."),
            (415, "The body is neither `application/scim+json` nor `application/json`."),
            (429, "Too many unknown tokens from this address."),
            (500, "Internal error."),
            (503, "A dependency is unavailable; retry."),
        ]
        .into_iter()
        .map(|(status, description)| {
            let mut response = ResponseBuilder::new()
                .description(description)
                .content(SCIM_JSON, ContentBuilder::new().schema(Some(scim.clone())).build())
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build(),
                );
            if matches!(status, 429 | 503) {
                let seconds = ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0));
                let header = HeaderBuilder::new()
                    .schema(Some(seconds))
                    .description(Some("Seconds to wait before trying again."));
                response = response.header("Retry-After", header.build());
            }
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
    }
}

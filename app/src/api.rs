//! Every route Plinth serves, and the OpenAPI document that describes them.
//!
//! Routes are registered through utoipa-actix-web: each handler carries its
//! own `#[utoipa::path]`, and registering it adds it to the document, so a
//! route cannot be served without being described. The document is built
//! once at startup ([`document`]) and serves `GET /openapi.json`, the
//! reference page `GET /docs` (Redoc, vendored under `app/assets/redoc/`
//! with its licence: no CDN), and the `Allow` header of a 405
//! ([`crate::routes`]).

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use actix_web::{App, HttpResponse, get, web};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{InfoBuilder, OpenApi};
use utoipa_actix_web::AppExt as _;
use utoipa_actix_web::service_config::ServiceConfig;

/// Registers every route (the handlers' crates each add their own).
///
/// actix tries the routes in this order, and a pattern with a `{param}` is a
/// regular expression run against the path, so the routes a tenant's app
/// calls all day (its data: projects, tasks, exports) come before sign-in,
/// administration and billing. Found first, the project read skips some
/// thirty patterns (`docs/benchmarks.md`). No two modules' patterns match
/// the same path and method (`/v1/me` is read in `accounts` and erased in
/// `personal_data`), so the order decides nothing else.
pub fn routes(cfg: &mut ServiceConfig) {
    cfg.configure(crate::health::configure)
        .configure(crate::metrics::configure)
        .configure(crate::projects::configure)
        .configure(crate::exports::configure)
        .configure(configure)
        .configure(plinth_identity::accounts::configure)
        .configure(plinth_identity::login::configure)
        .configure(plinth_identity::me::configure)
        .configure(plinth_identity::personal_data::configure)
        .configure(plinth_admin::tenant::configure)
        .configure(plinth_identity::impersonation::configure)
        .configure(plinth_admin::platform::configure)
        .configure(plinth_identity::members::configure)
        .configure(plinth_identity::domains::configure)
        .configure(plinth_identity::invitations::configure)
        .configure(plinth_identity::api_keys::configure)
        .configure(plinth_identity::scim::configure)
        .configure(plinth_identity::sso::configure)
        .configure(plinth_admin::audit_log::configure)
        .configure(plinth_identity::totp::configure)
        .configure(plinth_identity::passkeys::configure)
        .configure(plinth_billing::webhook::configure)
        .configure(plinth_billing::api::configure);
}

/// Security scheme of the SCIM routes (`/scim/v2/`).
pub const SCIM_TOKEN: &str = "scim_token";

/// Security scheme of `GET /metrics` when `PLINTH_METRICS_TOKEN` is set.
pub const METRICS_TOKEN: &str = "metrics_token";

const DESCRIPTION: &str = "\
Plinth's HTTP API: accounts and sessions, organizations (tenants) and their members, API keys, the audit log, \
billing through Stripe, platform administration, and the example product domain (projects and tasks).

**Naming the tenant.** Routes that act in an organization take it from the request's host (`<slug>.<base domain>` \
or one of its verified custom domains) or from the `X-Tenant` header; when both are given they must agree.

**Authentication.** `Authorization: Bearer <token>` with a session token (from sign-up or sign-in) or an API key \
(which acts only in its own organization, with its own role).

**Errors.** Every error answers `{\"error\": {\"code\", \"message\", \"details\"?}}`; `code` is stable, `message` is \
for people. 429 and 503 carry `Retry-After` (seconds).

**Reading your writes.** Where the operator runs read replicas, a write to an organization's data answers with \
`plinth-wal-position`; sent back in the same header with later GETs, it keeps them from being served older than \
that write.

**Lists** are paginated by cursor: `limit` (1 to 100) and `cursor`, the `next_cursor` of the previous page.

**Versioning.** Everything is under `/v1`; what may change inside it is in `docs/api.md`.";

/// The OpenAPI 3.1 document of every route, as registered by [`routes`].
pub fn document() -> OpenApi {
    let (_, mut doc) = App::new().into_utoipa_app().configure(routes).split_for_parts();
    doc.info = InfoBuilder::new()
        .title("Plinth")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(DESCRIPTION))
        .license(Some(utoipa::openapi::LicenseBuilder::new().name("MIT OR Apache-2.0").build()))
        .build();
    doc.tags = Some(
        [
            (
                "accounts",
                "Sign-up, sign-in, sessions a user sees and ends, password and address changes, email verification, \
                 password reset, two-factor sign-in, a user's own export and erasure.",
            ),
            ("tenant", "The caller's organization: plan, limits, usage and audit log."),
            ("members", "Members, roles and invitations."),
            ("domains", "Email domains an organization proves it owns, and joining by domain."),
            ("sso", "An organization's OpenID Connect single sign-on connection."),
            ("api keys", "Keys that act in one organization without a user's session."),
            (
                "scim",
                "SCIM 2.0 provisioning (RFC 7643, RFC 7644): the organization's directory creates, deactivates and \
                 groups its members under `/scim/v2/` with a SCIM token; tenant admins make the tokens and map \
                 directory groups to roles under `/v1/scim/`.",
            ),
            ("projects", "The example product domain, in each organization's own schema."),
            ("billing", "Subscriptions through Stripe."),
            ("platform", "Platform administration, for platform admins only."),
            ("operations", "Health, metrics and this document."),
        ]
        .into_iter()
        .map(|(name, description)| TagBuilder::new().name(name).description(Some(description)).build())
        .collect(),
    );
    plinth_http::openapi::finish(&mut doc);
    let mut scim = Http::new(HttpAuthScheme::Bearer);
    scim.bearer_format = Some("SCIM token".into());
    scim.description = Some(
        "A SCIM token from `POST /v1/scim/tokens`, which names its organization (no `X-Tenant` needed) and opens \
         only `/scim/v2/`: `Authorization: Bearer <token>`."
            .into(),
    );
    doc.components.get_or_insert_with(Default::default).add_security_scheme(SCIM_TOKEN, SecurityScheme::Http(scim));
    let mut metrics = Http::new(HttpAuthScheme::Bearer);
    metrics.description = Some("`PLINTH_METRICS_TOKEN`, when the server sets it.".into());
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(METRICS_TOKEN, SecurityScheme::Http(metrics));
    doc
}

/// The document as served, rendered once.
pub struct Document(pub web::Bytes);

fn configure(cfg: &mut ServiceConfig) {
    cfg.service(openapi_json).service(docs).service(redoc_js);
}

/// The OpenAPI document (JSON).
#[utoipa::path(
    operation_id = "openapi",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document.", content_type = "application/json", body = Object)),
)]
#[get("/openapi.json")]
async fn openapi_json(document: web::Data<Document>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CACHE_CONTROL, "no-cache"))
        .content_type("application/json")
        .body(document.0.clone())
}

const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Plinth API reference</title>
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="/docs/redoc.standalone.js"></script>
</body>
</html>
"#;

/// Redoc draws the page with styles it injects and searches in a worker it
/// makes from a blob; nothing else is allowed, no inline script.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                        img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; \
                        frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The API reference page (HTML).
#[utoipa::path(
    operation_id = "docs",
    tag = "operations",
    responses((status = 200, description = "The API reference, drawn from `/openapi.json`.", content_type = "text/html")),
)]
#[get("/docs")]
async fn docs() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_SECURITY_POLICY, DOCS_CSP))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .content_type("text/html; charset=utf-8")
        .body(DOCS_PAGE)
}

/// Redoc 2.5.4 (MIT), from the npm package `redoc`, `bundles/`.
const REDOC_JS: &[u8] = include_bytes!("../assets/redoc/redoc.standalone.js");

/// The script of the reference page.
#[utoipa::path(
    operation_id = "docs_script",
    tag = "operations",
    responses((status = 200, description = "Redoc's script.", content_type = "text/javascript")),
)]
#[get("/docs/redoc.standalone.js")]
async fn redoc_js() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/javascript; charset=utf-8"))
        .insert_header((CACHE_CONTROL, "public, max-age=86400"))
        .body(REDOC_JS)
}

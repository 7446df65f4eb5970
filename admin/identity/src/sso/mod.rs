//! OpenID Connect single sign-on, one connection per organization (plan
//! feature `sso`).
//!
//! - `PUT /v1/sso/connection` (admins): the identity provider's issuer, the
//!   client id and secret Plinth was registered with there (the secret is
//!   sealed with `PLINTH_ENCRYPTION_KEY`), the organization's verified
//!   domains whose addresses sign in through it, the role people join
//!   with, and whether password sign-in is refused for those addresses.
//!   `GET` shows it (never the secret), `DELETE` removes it.
//! - `GET /v1/auth/sso/start?tenant=<slug>` sends the browser to the
//!   provider with a state, a nonce and a PKCE challenge (stored, hashed or
//!   sealed, for ten minutes).
//! - `GET /v1/auth/sso/callback` takes the provider's code once: it is
//!   exchanged with the PKCE verifier and the client secret, and the ID
//!   token is verified (signature against the provider's published keys,
//!   issuer, audience, expiry, nonce) by the `openidconnect` crate. The
//!   address must be at one of the connection's domains; the account is
//!   found or made, joins the organization with the connection's role if
//!   it is not a member, and a session is opened.
//!
//! - `provider`: the issuers a connection may name, and Plinth's HTTP
//!   client for them. An issuer must be `https`, except on a loopback
//!   address (local development and tests).
//! - `accounts`: the account and membership of who signs in, and the rule
//!   that refuses password sign-in where single sign-on is required.
//!
//! Plinth fetches the issuer's discovery document and keys from its own
//! servers: see the threat model in `docs/identity.md`.

use actix_web::http::header::{CACHE_CONTROL, LOCATION};
use actix_web::{HttpRequest, HttpResponse, delete, get, put, web};
use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use openidconnect::core::CoreAuthenticationFlow;
use openidconnect::{
    AuthorizationCode, CsrfToken, Nonce, PkceCodeChallenge, PkceCodeVerifier, Scope, TokenResponse as _,
};
use plinth_access::{Access, Allowed, Role, requirements};
use plinth_http::openapi::{NotFound, PlanLimits, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_mail::EmailAddress;
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::crypto::Keyring;
use plinth_tenants::registry;
use plinth_tenants::{Db, TenantId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::config::{IdentityConfig, config};
use crate::members::MembersChanged;
use crate::password::Hashing;
use crate::schema::{sso_connections, sso_logins, tenant_email_domains};
use crate::sessions::{self, Device, hash_token};

mod accounts;
mod provider;

pub use accounts::required_for;
use accounts::{Joining, account, join};
use provider::{issuer_url, provider, send};

requirements! {
    /// The organization's single sign-on connection: admins, on plans with `sso`.
    pub ManageSso = "sso", Manage, feature: "sso";
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(put_connection).service(get_connection).service(delete_connection).service(start).service(callback);
}

/// How long a started sign-in may take to come back.
const LOGIN_TTL: chrono::Duration = chrono::Duration::minutes(10);

/// The connection as an admin sets it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = SsoConnectionInput)]
struct ConnectionIn {
    /// The provider's issuer (`https://…`; its discovery document is at
    /// `<issuer>/.well-known/openid-configuration`).
    #[schema(max_length = 2048, example = "https://idp.example.com")]
    issuer: String,
    #[schema(min_length = 1, max_length = 256)]
    client_id: String,
    #[schema(min_length = 1, max_length = 1024)]
    client_secret: String,
    /// Verified domains of the organization whose addresses sign in here.
    #[schema(min_items = 1)]
    domains: Vec<String>,
    /// The role people join with: `admin`, `member` (default) or `viewer`.
    #[serde(default, deserialize_with = "plinth_http::request::not_null")]
    #[schema(nullable = false)]
    default_role: Option<String>,
    /// Refuse password sign-in for addresses at these domains.
    #[serde(default)]
    required: bool,
}

/// The connection as shown (never the secret).
#[derive(Serialize, ToSchema)]
#[schema(as = SsoConnection)]
struct ConnectionView {
    issuer: String,
    client_id: String,
    domains: Vec<String>,
    default_role: String,
    required: bool,
    /// Where the provider sends people back: register this redirect URI
    /// with it.
    redirect_uri: String,
    updated_at: DateTime<Utc>,
}

/// The stored connection.
struct Connection {
    issuer: String,
    client_id: String,
    client_secret: Vec<u8>,
    domains: Vec<String>,
    default_role: String,
    required: bool,
    updated_at: DateTime<Utc>,
}

type ConnectionRow = (String, String, Vec<u8>, Vec<String>, String, bool, DateTime<Utc>);

async fn connection_of(conn: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<Option<Connection>> {
    let row: Option<ConnectionRow> = sso_connections::table
        .find(tenant.0)
        .select((
            sso_connections::issuer,
            sso_connections::client_id,
            sso_connections::client_secret,
            sso_connections::domains,
            sso_connections::default_role,
            sso_connections::required,
            sso_connections::updated_at,
        ))
        .first(conn)
        .await
        .optional()?;
    Ok(row.map(|(issuer, client_id, client_secret, domains, default_role, required, updated_at)| Connection {
        issuer,
        client_id,
        client_secret,
        domains,
        default_role,
        required,
        updated_at,
    }))
}

/// What the client secret of `tenant`'s connection is sealed to.
fn secret_context(tenant: TenantId) -> Vec<u8> {
    format!("sso_client_secret\0{}", tenant.0).into_bytes()
}

/// The callback this server answers on, as the provider must know it.
fn redirect_uri(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}/v1/auth/sso/callback", info.scheme(), info.host())
}

/// `domains`, normalized, each verified by `tenant`; 400 otherwise.
async fn verified_domains(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    domains: &[String],
) -> Result<Vec<String>, ApiError> {
    let mut wanted: Vec<String> = domains.iter().map(|d| d.trim().trim_end_matches('.').to_ascii_lowercase()).collect();
    wanted.sort();
    wanted.dedup();
    let verified: Vec<String> = tenant_email_domains::table
        .filter(tenant_email_domains::tenant_id.eq(tenant.0))
        .filter(tenant_email_domains::domain.eq_any(&wanted))
        .filter(tenant_email_domains::verified_at.is_not_null())
        .select(tenant_email_domains::domain)
        .load(conn)
        .await?;
    if wanted.is_empty() || verified.len() != wanted.len() {
        let why = "must be one or more of the organization's verified domains (POST /v1/domains)";
        return Err(ApiError::invalid_fields(vec![FieldError::new("domains", "invalid", why)]));
    }
    Ok(wanted)
}

fn view(connection: Connection, req: &HttpRequest) -> ConnectionView {
    ConnectionView {
        issuer: connection.issuer,
        client_id: connection.client_id,
        domains: connection.domains,
        default_role: connection.default_role,
        required: connection.required,
        redirect_uri: redirect_uri(req),
        updated_at: connection.updated_at,
    }
}

#[utoipa::path(
    operation_id = "put_sso_connection",
    tag = "sso",
    summary = "Sets the organization's OpenID Connect connection (admins, on plans with `sso`)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = ConnectionIn,
    responses((status = 200, body = ConnectionView), PlanLimits),
)]
#[put("/v1/sso/connection")]
async fn put_connection(
    req: HttpRequest,
    ctx: Allowed<ManageSso>,
    ring: web::Data<Keyring>,
    body: Json<ConnectionIn>,
) -> Result<HttpResponse, ApiError> {
    let input = body.0;
    let issuer = issuer_url(&input.issuer)?.as_str().to_owned();
    plinth_http::request::Validator::default()
        .text("client_id", &input.client_id, 1, 256, false)
        .text("client_secret", &input.client_secret, 1, 1024, false)
        .finish()?;
    let role = match input.default_role.as_deref().map(Role::parse) {
        None => Role::Member,
        Some(Some(role)) if role != Role::Owner => role,
        Some(_) => {
            let why = "must be admin, member or viewer";
            return Err(ApiError::invalid_fields(vec![FieldError::new("default_role", "invalid", why)]));
        }
    };
    if role > ctx.role {
        return Err(ApiError::Forbidden);
    }
    let tenant = ctx.tenant.id;
    let sealed = ring
        .seal(input.client_secret.as_bytes(), &secret_context(tenant))
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("sealing a client secret")))?;
    let entry = ctx.audit_entry("sso.connection_set");
    let connection = ctx
        .rows(async |rows| {
            let domains = verified_domains(rows.conn(), tenant, &input.domains).await?;
            diesel::insert_into(sso_connections::table)
                .values((
                    sso_connections::tenant_id.eq(tenant.0),
                    sso_connections::issuer.eq(&issuer),
                    sso_connections::client_id.eq(input.client_id.trim()),
                    sso_connections::client_secret.eq(&sealed),
                    sso_connections::domains.eq(&domains),
                    sso_connections::default_role.eq(role.as_str()),
                    sso_connections::required.eq(input.required),
                ))
                .on_conflict(sso_connections::tenant_id)
                .do_update()
                .set((
                    sso_connections::issuer.eq(&issuer),
                    sso_connections::client_id.eq(input.client_id.trim()),
                    sso_connections::client_secret.eq(&sealed),
                    sso_connections::domains.eq(&domains),
                    sso_connections::default_role.eq(role.as_str()),
                    sso_connections::required.eq(input.required),
                    sso_connections::updated_at.eq(diesel::dsl::now),
                ))
                .execute(rows.conn())
                .await?;
            let details = json!({ "issuer": issuer, "domains": domains, "required": input.required });
            audit::record(rows, entry.details(details)).await?;
            connection_of(rows.conn(), tenant).await?.ok_or(ApiError::NotFound("SSO connection"))
        })
        .await?;
    tracing::info!(tenant.slug = %ctx.tenant.slug, "SSO connection set");
    Ok(HttpResponse::Ok().json(view(connection, &req)))
}

#[utoipa::path(
    operation_id = "get_sso_connection",
    tag = "sso",
    summary = "The organization's OpenID Connect connection, without its secret",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = ConnectionView), NotFound, PlanLimits),
)]
#[get("/v1/sso/connection")]
async fn get_connection(req: HttpRequest, ctx: Allowed<ManageSso>) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id;
    let found = ctx.rows(async |rows| Ok::<_, ApiError>(connection_of(rows.conn(), tenant).await?)).await?;
    let connection = found.ok_or(ApiError::NotFound("SSO connection"))?;
    Ok(HttpResponse::Ok().json(view(connection, &req)))
}

#[utoipa::path(
    operation_id = "delete_sso_connection",
    tag = "sso",
    summary = "Removes the organization's OpenID Connect connection; password sign-in is no longer refused",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 204, description = "Removed."), NotFound, PlanLimits),
)]
#[delete("/v1/sso/connection")]
async fn delete_connection(ctx: Allowed<ManageSso>) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id;
    let entry = ctx.audit_entry("sso.connection_removed");
    ctx.rows(async |rows| {
        let removed = diesel::delete(sso_connections::table.find(tenant.0)).execute(rows.conn()).await?;
        if removed == 0 {
            return Err(ApiError::NotFound("SSO connection"));
        }
        audit::record(rows, entry).await?;
        Ok(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StartQuery {
    /// The organization's slug.
    #[param(max_length = 63)]
    tenant: String,
}

/// The organization `slug` with a connection, while its plan has `sso`.
async fn tenant_with_connection(
    db: &Db,
    access: &Access,
    slug: &str,
) -> Result<(registry::Tenant, Connection), ApiError> {
    let found = db
        .platform(async |c| {
            let Some(tenant) = registry::find_by_slug(c, slug).await? else { return Ok::<_, ApiError>(None) };
            let connection = connection_of(c, tenant.id).await?;
            Ok(connection.map(|connection| (tenant, connection)))
        })
        .await?;
    let (tenant, connection) = found.ok_or(ApiError::NotFound("SSO connection"))?;
    let plan = access.catalog().effective(&tenant.plan);
    if tenant.status != registry::TenantStatus::Active || !plan.features.iter().any(|f| f == "sso") {
        return Err(ApiError::NotFound("SSO connection"));
    }
    Ok((tenant, connection))
}

#[utoipa::path(
    operation_id = "start_sso",
    tag = "accounts",
    summary = "Starts single sign-on through the organization's identity provider: a redirect to it",
    params(StartQuery),
    responses(
        (status = 302, description = "To the identity provider, with a state, a nonce and a PKCE challenge.", headers(("Location" = String, description = "The provider's authorization URL."))),
        NotFound,
    ),
)]
#[get("/v1/auth/sso/start")]
async fn start(
    req: HttpRequest,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    ring: web::Data<Keyring>,
    query: web::Query<StartQuery>,
) -> Result<HttpResponse, ApiError> {
    let (tenant, connection) = tenant_with_connection(&db, &access, &query.tenant).await?;
    let secret = open_secret(&ring, tenant.id, &connection)?;
    let redirect = redirect_uri(&req);
    let client = provider(&connection, secret, &redirect).await?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state, nonce) = client
        .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
        .add_scope(Scope::new("email".into()))
        .set_pkce_challenge(challenge)
        .url();
    let sealed = ring
        .seal(verifier.secret().as_bytes(), &hash_token(state.secret()))
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("sealing a PKCE verifier")))?;
    db.platform(async |c| {
        diesel::insert_into(sso_logins::table)
            .values((
                sso_logins::state_hash.eq(&hash_token(state.secret())[..]),
                sso_logins::tenant_id.eq(tenant.id.0),
                sso_logins::nonce.eq(nonce.secret()),
                sso_logins::pkce_verifier.eq(&sealed),
                sso_logins::redirect_uri.eq(&redirect),
                sso_logins::expires_at.eq(Utc::now() + LOGIN_TTL),
            ))
            .execute(c)
            .await?;
        // Sign-ins that never came back.
        diesel::delete(sso_logins::table.filter(sso_logins::expires_at.lt(Utc::now() - LOGIN_TTL))).execute(c).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(HttpResponse::Found()
        .insert_header((LOCATION, url.as_str()))
        .insert_header((CACHE_CONTROL, "no-store"))
        .finish())
}

fn open_secret(ring: &Keyring, tenant: TenantId, connection: &Connection) -> Result<String, ApiError> {
    let plain = ring
        .open(&connection.client_secret, &secret_context(tenant))
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("opening a client secret")))?;
    String::from_utf8(plain).map_err(|e| ApiError::Internal(e.into()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CallbackQuery {
    /// The provider's authorization code.
    code: Option<String>,
    /// The state `start` sent.
    state: Option<String>,
    /// The provider's error code, when it refused.
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = SsoSignedIn)]
struct SignedIn {
    /// The session token: `Authorization: Bearer <token>`.
    token: String,
    expires_at: DateTime<Utc>,
    user: crate::users::User,
    /// The organization signed in through.
    tenant: String,
}

/// A sign-in `start` began, taken once: (tenant, nonce, PKCE verifier,
/// redirect URI). None when unknown, used or expired.
async fn take_login(
    db: &Db,
    ring: &Keyring,
    state: &str,
) -> Result<Option<(TenantId, String, String, String)>, ApiError> {
    let hash = hash_token(state);
    let taken: Option<(uuid::Uuid, String, Vec<u8>, String)> = db
        .platform(async |c| {
            diesel::update(
                sso_logins::table
                    .filter(sso_logins::state_hash.eq(&hash[..]))
                    .filter(sso_logins::used_at.is_null())
                    .filter(sso_logins::expires_at.gt(Utc::now())),
            )
            .set(sso_logins::used_at.eq(diesel::dsl::now))
            .returning((sso_logins::tenant_id, sso_logins::nonce, sso_logins::pkce_verifier, sso_logins::redirect_uri))
            .get_result(c)
            .await
            .optional()
            .map_err(ApiError::from)
        })
        .await?;
    let Some((tenant, nonce, sealed, redirect)) = taken else { return Ok(None) };
    let verifier = ring
        .open(&sealed, &hash)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("opening a PKCE verifier")))?;
    let verifier = String::from_utf8(verifier).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Some((TenantId(tenant), nonce, verifier, redirect)))
}

/// Refused by what the provider sent: 401, the reason logged.
fn refused(reason: impl std::fmt::Display) -> ApiError {
    tracing::info!(reason = %reason, "single sign-on refused");
    ApiError::Unauthenticated
}

#[utoipa::path(
    operation_id = "sso_callback",
    tag = "accounts",
    summary = "Where the identity provider sends people back: verifies its ID token and opens a session",
    params(CallbackQuery),
    responses(
        (status = 200, body = SignedIn),
        (status = 401, description = "Error: unauthenticated (the provider's code or ID token was refused: signature, issuer, audience, expiry or nonce).", body = plinth_http::openapi::ErrorEnvelope),
        (status = 403, description = "Error: forbidden (the address is not at one of the connection's domains, or the provider says it is not verified).", body = plinth_http::openapi::ErrorEnvelope),
        PlanLimits,
    ),
)]
#[get("/v1/auth/sso/callback")]
#[allow(clippy::too_many_arguments)]
async fn callback(
    req: HttpRequest,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<Access>>,
    ring: web::Data<Keyring>,
    hashing: web::Data<Hashing>,
    changed: web::Data<dyn MembersChanged>,
    cfg: Option<web::Data<IdentityConfig>>,
    query: web::Query<CallbackQuery>,
) -> Result<HttpResponse, ApiError> {
    if let Some(error) = &query.error {
        let code: String = error.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
        return Err(ApiError::invalid(format!("the identity provider did not sign you in ({code})")));
    }
    let (Some(code), Some(state)) = (&query.code, &query.state) else {
        return Err(ApiError::invalid("code and state are required"));
    };
    let (tenant_id, nonce, verifier, redirect) = take_login(&db, &ring, state)
        .await?
        .ok_or_else(|| ApiError::invalid("this sign-in is unknown, was used already or took too long: start again"))?;
    let slug = db
        .platform(async |c| Ok::<_, ApiError>(registry::find_by_id(c, tenant_id).await?))
        .await?
        .ok_or(ApiError::NotFound("SSO connection"))?
        .slug;
    let (tenant, connection) = tenant_with_connection(&db, &access, slug.as_str()).await?;
    let client = provider(&connection, open_secret(&ring, tenant.id, &connection)?, &redirect).await?;
    let exchange = client
        .exchange_code(AuthorizationCode::new(code.clone()))
        .map_err(|e| ApiError::Unavailable(anyhow::anyhow!("{e}").context("the provider has no token endpoint")))?;
    let answer = exchange.set_pkce_verifier(PkceCodeVerifier::new(verifier)).request_async(&send).await.map_err(
        |e| match e {
            openidconnect::RequestTokenError::Request(e) => {
                ApiError::Unavailable(anyhow::anyhow!("{e}").context("asking the provider's token endpoint"))
            }
            other => refused(format!("the code was refused: {other}")),
        },
    )?;
    let id_token = answer.id_token().ok_or_else(|| refused("no ID token"))?;
    let claims = id_token.claims(&client.id_token_verifier(), &Nonce::new(nonce)).map_err(refused)?;
    if claims.email_verified() == Some(false) {
        tracing::info!("single sign-on refused: the provider says the address is not verified");
        return Err(ApiError::Forbidden);
    }
    let email = claims
        .email()
        .and_then(|e| EmailAddress::parse(e.as_str()).ok())
        .ok_or_else(|| refused("no usable email claim"))?;
    let domain = email.as_str().rsplit_once('@').map(|(_, d)| d.to_owned()).unwrap_or_default();
    if !connection.domains.contains(&domain) {
        tracing::info!("single sign-on refused: the address is not at one of the connection's domains");
        return Err(ApiError::Forbidden);
    }
    let known = db.platform(async |c| Ok::<_, ApiError>(crate::users::find_id_by_email(c, &email).await?)).await?;
    let hash = match known {
        Some(_) => None,
        None => Some(hashing.hash(crate::password::unknown()?).await?),
    };
    let cfg = config(cfg);
    let device = Device::of(&req, &cfg);
    let joined = Joining { tenant: &tenant, connection: &connection, domain: &domain, changed: changed.get_ref() };
    let (token, session, user) = db
        .platform(async |c| {
            // The domain must still be verified; a database error stays one.
            verified_domains(c, tenant.id, std::slice::from_ref(&domain)).await.map_err(|e| match e {
                ApiError::InvalidRequest { .. } => ApiError::Forbidden,
                other => other,
            })?;
            let user = account(c, &email, hash.as_deref()).await?;
            join(c, &access, &joined, user.id).await?;
            let mut entry = Entry::new(Actor::User(user.id), "auth.sso_login").target("user", user.id);
            entry.ip = device.ip.clone();
            audit::record_as_system(c, tenant.scope(), entry.details(json!({ "issuer": connection.issuer }))).await?;
            let (token, session) = sessions::create_session(c, UserId(user.id), cfg.session_ttl, &device).await?;
            Ok::<_, ApiError>((token, session, user))
        })
        .await?;
    tracing::info!(user.id = %user.id, tenant.slug = %tenant.slug, "signed in through single sign-on");
    let body = SignedIn { token, expires_at: session.expires_at, user, tenant: tenant.slug.as_str().to_owned() };
    Ok(HttpResponse::Ok().insert_header((CACHE_CONTROL, "no-store")).json(body))
}

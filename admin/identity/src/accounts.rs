//! Accounts and sessions: signup, login, logout, `GET /v1/me`, email
//! verification, password reset, and creating further organizations.
//!
//! Users are global (platform schema); what they may do in a tenant comes
//! from a membership with a role.

use crate::sessions::{self, AnySession, Authenticated};
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use diesel::sql_types::Uuid as SqlUuid;
use diesel::{ExpressionMethods as _, NullableExpressionMethods as _, QueryDsl as _, SelectableHelper as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::idempotency::{self, IdempotencyKey};
use plinth_http::openapi::{IdempotencyKeyHeader, KeyReuse, RateLimited};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_mail::{self as mail, EmailAddress};
use plinth_tenants::registry;
use plinth_tenants::registry::TenantStatus;
use plinth_tenants::{Db, Slug, Tenant, TenantId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use utoipa::ToSchema;

use crate::config::{IdentityConfig, config};
use crate::error::IdentityError;
use crate::limits::{RateLimits, count};
use crate::password::{self, Hashing};
use crate::schema::{memberships, users};
use crate::tokens::{self, issue_token, redeem_token};
use crate::users::{User, insert_user};

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(signup)
        .service(create_tenant)
        .service(logout)
        .service(verify_email)
        .service(request_password_reset)
        .service(confirm_password_reset)
        .service(me);
}

async fn add_member(
    conn: &AsyncPgConnection,
    tenant: &Tenant,
    user: uuid::Uuid,
    role: &str,
) -> diesel::QueryResult<()> {
    let mut conn = conn;
    diesel::insert_into(memberships::table)
        .values((memberships::tenant_id.eq(tenant.id.0), memberships::user_id.eq(user), memberships::role.eq(role)))
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// A new organization (its schema provisioned) in the caller's transaction.
async fn provision(
    conn: &mut AsyncPgConnection,
    db: &Db,
    slug: &Slug,
    organization: &str,
) -> Result<Tenant, IdentityError> {
    Ok(registry::provision(conn, db, slug, organization).await?)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SignupBody {
    #[schema(schema_with = crate::openapi::email)]
    email: String,
    #[schema(schema_with = crate::openapi::new_password)]
    password: String,
    /// The organization's display name.
    #[schema(schema_with = crate::openapi::organization)]
    organization: String,
    /// The organization's URL name, unique on the platform.
    #[schema(schema_with = crate::openapi::slug)]
    slug: String,
}

/// A new account signed in, with its organization.
#[derive(Serialize, ToSchema)]
struct SignedUp {
    tenant: Tenant,
    user: User,
    /// A session token: `Authorization: Bearer <token>`.
    token: String,
    expires_at: DateTime<Utc>,
}

/// Checks every field at once, so the client hears about all problems.
fn check_signup(body: &SignupBody) -> Result<(EmailAddress, Slug), ApiError> {
    let mut errors = Vec::new();
    let email = EmailAddress::parse(&body.email)
        .map_err(|e| errors.push(FieldError::new("email", "invalid", e.to_string())))
        .ok();
    if let Err(e) = password::check("password", &body.password) {
        errors.push(e);
    }
    if let Err(why) = registry::validate_name(&body.organization) {
        errors.push(FieldError::new("organization", "invalid", why));
    }
    let slug = Slug::parse(&body.slug).map_err(|e| errors.push(FieldError::new("slug", e.code(), e.to_string()))).ok();
    match (email, slug) {
        (Some(email), Some(slug)) if errors.is_empty() => Ok((email, slug)),
        _ => Err(ApiError::invalid_fields(errors)),
    }
}

/// `POST /v1/signup`: the user, the tenant (schema provisioned), the owner
/// membership, a session and the verification mail, in one transaction.
#[utoipa::path(
    tag = "accounts",
    summary = "Signs up: an account, its organization, and a session",
    description = "Creates the account, the organization (its schema provisioned) with the account as its owner, \
                   a session, and mails a verification link, all or nothing. 409 when the address has an account \
                   or the slug is taken.",
    params(IdempotencyKeyHeader),
    request_body = SignupBody,
    responses((status = 201, body = SignedUp), (status = 409, description = "Error: conflict (the address has an account, or the slug is taken), idempotency_key_in_use.", body = plinth_http::openapi::ErrorEnvelope), KeyReuse, RateLimited),
)]
#[post("/v1/signup")]
async fn signup(
    req: HttpRequest,
    db: web::Data<Db>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    hashing: web::Data<Hashing>,
    body: Json<SignupBody>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let digest = body.digest();
    let cfg = config(cfg);
    count(&limits.signup_per_ip, &cfg.client_key(&req)).await?;
    let (email, slug) = check_signup(&body.0)?;
    let device = sessions::Device::of(&req, &cfg);
    // Nobody is signed in yet: the key belongs to the address signing up
    // (hashed, so the key table holds no address). Replaying needs the same
    // body, password included.
    let caller = format!("signup:{}", hex(&Sha256::digest(email.as_str().as_bytes())));
    let keyed = key.keyed(caller, digest)?;
    let keyed = keyed.as_ref();
    let SignupBody { password, organization, .. } = body.0;
    idempotency::once(&db, keyed, async || {
        let hash = hashing.hash(password).await?;
        let (json, tenant, user) = db
            .provisioning(async |c| {
                idempotency::claim(c, keyed).await?;
                let user = insert_user(c, &email, &hash).await?;
                let tenant = provision(c, &db, &slug, &organization).await?;
                add_member(c, &tenant, user.id, "owner").await?;
                let (token, session) = sessions::create_session(c, UserId(user.id), cfg.session_ttl, &device).await?;
                let (token_id, verify) = issue_token(c, user.id, "verify_email", cfg.verify_email_ttl).await?;
                let message = crate::mail::verify_email(
                    email.clone(),
                    Some(tenant.id),
                    &tenant.name,
                    &verify,
                    format!("verify_email:{token_id}"),
                );
                mail::queue(c, message).await?;
                let (slug, user_id) = (tenant.slug.clone(), user.id);
                let answer = SignedUp { tenant, user, token, expires_at: session.expires_at };
                let json = idempotency::record(c, keyed, StatusCode::CREATED, &answer).await?;
                Ok::<_, ApiError>((json, slug, user_id))
            })
            .await?;
        tracing::info!(tenant.slug = %tenant, user.id = %user, "signed up");
        Ok(idempotency::answer(StatusCode::CREATED, json))
    })
    .await
}

/// Lower-case hexadecimal.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewTenantBody {
    #[schema(schema_with = crate::openapi::organization)]
    organization: String,
    #[schema(schema_with = crate::openapi::slug)]
    slug: String,
}

/// The new organization and the caller's role in it.
#[derive(Serialize, ToSchema)]
struct CreatedTenant {
    tenant: Tenant,
    /// Always `owner`.
    #[schema(value_type = String, example = "owner")]
    role: &'static str,
}

/// `POST /v1/tenants`: a signed-in user creates another organization and
/// becomes its owner: at most `organizations_per_user` an hour, and at most
/// `max_organizations_per_user` owned at once (403 past it).
#[utoipa::path(
    tag = "accounts",
    summary = "Creates another organization, owned by the caller",
    params(IdempotencyKeyHeader),
    security(("session" = [])),
    request_body = NewTenantBody,
    responses(
        (status = 201, body = CreatedTenant),
        KeyReuse,
        (status = 403, description = "Error: forbidden (the caller owns as many organizations as allowed).", body = plinth_http::openapi::ErrorEnvelope),
        (status = 409, description = "Error: conflict (the slug is taken), idempotency_key_in_use.", body = plinth_http::openapi::ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/tenants")]
async fn create_tenant(
    db: web::Data<Db>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    who: Authenticated,
    body: Json<NewTenantBody>,
    key: IdempotencyKey,
) -> Result<HttpResponse, ApiError> {
    let digest = body.digest();
    let cfg = config(cfg);
    let mut errors = Vec::new();
    if let Err(why) = registry::validate_name(&body.0.organization) {
        errors.push(FieldError::new("organization", "invalid", why));
    }
    let slug =
        Slug::parse(&body.0.slug).map_err(|e| errors.push(FieldError::new("slug", e.code(), e.to_string()))).ok();
    let Some(slug) = slug.filter(|_| errors.is_empty()) else { return Err(ApiError::invalid_fields(errors)) };
    let user = who.0.user_id.0;
    let keyed = key.keyed(format!("user:{user}"), digest)?;
    let keyed = keyed.as_ref();
    idempotency::once(&db, keyed, async || {
        count(&limits.organizations_per_user, &user.to_string()).await?;
        let json = db
            .provisioning(async |c| {
                idempotency::claim(c, keyed).await?;
                // Serializes this user's creations, so the cap holds under
                // concurrency. Raw SQL: a function diesel has no declaration for.
                diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended('plinth.orgs:' || $1::text, 0))")
                    .bind::<SqlUuid, _>(user)
                    .execute(c)
                    .await?;
                let owned: i64 = memberships::table
                    .filter(memberships::user_id.eq(user))
                    .filter(memberships::role.eq("owner"))
                    .count()
                    .get_result(c)
                    .await?;
                if owned >= i64::from(cfg.max_organizations_per_user) {
                    tracing::info!(user.id = %user, owned, "organization cap reached");
                    return Err(ApiError::Forbidden);
                }
                let tenant = provision(c, &db, &slug, &body.0.organization).await?;
                add_member(c, &tenant, user, "owner").await?;
                idempotency::record(c, keyed, StatusCode::CREATED, &CreatedTenant { tenant, role: "owner" }).await
            })
            .await?;
        Ok(idempotency::answer(StatusCode::CREATED, json))
    })
    .await
}

/// `POST /v1/auth/logout`: revokes the caller's session everywhere (an
/// impersonation session's end is recorded in its tenant's audit log).
#[utoipa::path(
    tag = "accounts",
    summary = "Signs out: the session ends on every instance",
    security(("session" = [])),
    responses((status = 204, description = "Signed out.")),
)]
#[post("/v1/auth/logout")]
async fn logout(db: web::Data<Db>, who: AnySession) -> Result<HttpResponse, ApiError> {
    let session = who.0;
    db.platform(async |c| {
        if session.impersonation.is_some() {
            crate::impersonation::end(c, session.session_id, "signed_out").await?;
        } else {
            sessions::revoke_session(c, session.session_id).await?;
        }
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A tenant the caller belongs to, as `GET /v1/me` lists it.
#[derive(Serialize, ToSchema)]
struct MemberOf {
    id: TenantId,
    #[schema(schema_with = crate::openapi::slug)]
    slug: String,
    name: String,
    status: TenantStatus,
}

#[derive(Serialize, ToSchema)]
struct Membership {
    tenant: MemberOf,
    #[schema(value_type = plinth_access::Role)]
    role: String,
}

#[derive(Serialize, ToSchema)]
struct Me {
    user: User,
    /// Whether sign-in asks for a one-time code.
    totp_enabled: bool,
    /// The organizations the caller belongs to (not those being deleted);
    /// while impersonating, only the one the session acts in.
    memberships: Vec<Membership>,
    /// Present when a platform admin is impersonating the user with this
    /// session (its answers carry `plinth-impersonation: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    impersonation: Option<crate::impersonation::ImpersonationView>,
}

/// `GET /v1/me`: the caller and their memberships.
#[utoipa::path(
    tag = "accounts",
    summary = "The signed-in user and their organizations",
    security(("session" = [])),
    responses((status = 200, body = Me)),
)]
#[get("/v1/me")]
async fn me(db: web::Data<Db>, who: AnySession) -> Result<HttpResponse, ApiError> {
    let user_id = who.0.user_id.0;
    let acting_in = who.0.impersonation.map(|i| i.tenant);
    let session_id = who.0.session_id;
    let (user, memberships, impersonation) = db
        .platform(async |c| {
            let user: User = users::table.find(user_id).select(User::as_select()).first(c).await?;
            let mut roles: std::collections::HashMap<TenantId, String> =
                crate::members::of_user(c, UserId(user_id)).await?.into_iter().collect();
            let impersonation = match acting_in {
                Some(tenant) => {
                    roles.retain(|t, _| *t == tenant);
                    crate::impersonation::describe(c, session_id).await?
                }
                None => None,
            };
            let ids: Vec<TenantId> = roles.keys().copied().collect();
            let tenants = registry::find_live_by_ids(c, &ids).await?;
            let memberships: Vec<_> = tenants
                .into_iter()
                .map(|t| {
                    let role = roles.get(&t.id).cloned().unwrap_or_default();
                    Membership { tenant: MemberOf { id: t.id, slug: t.slug, name: t.name, status: t.status }, role }
                })
                .collect();
            Ok::<_, ApiError>((user, memberships, impersonation))
        })
        .await?;
    let totp_enabled = db
        .platform(async |c| Ok::<_, ApiError>(crate::totp::state(c, user_id, false).await?.totp_secret.is_some()))
        .await?;
    Ok(HttpResponse::Ok().json(Me { user, totp_enabled, memberships, impersonation }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// The token from the verification mail.
    #[schema(schema_with = crate::openapi::mail_token)]
    token: String,
}

#[derive(Serialize, ToSchema)]
struct EmailVerified {
    /// Always true.
    email_verified: bool,
}

/// `POST /v1/auth/verify-email`: redeems the token from the verification mail.
#[utoipa::path(
    tag = "accounts",
    summary = "Proves an email address with the token from the verification mail",
    request_body = TokenBody,
    responses(
        (status = 200, body = EmailVerified),
        (status = 400, description = "Error: invalid_request (the token is unknown, used or expired).", body = plinth_http::openapi::ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/auth/verify-email")]
async fn verify_email(
    req: HttpRequest,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<plinth_access::Access>>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    changed: web::Data<dyn crate::members::MembersChanged>,
    body: Json<TokenBody>,
) -> Result<HttpResponse, ApiError> {
    count(&limits.verify_per_ip, &config(cfg).client_key(&req)).await?;
    let token = body.0.token;
    db.platform(async |c| {
        let user = redeem_token(c, &token, "verify_email").await?.ok_or(IdentityError::InvalidToken)?;
        let email: String = diesel::update(users::table.find(user))
            .set((
                users::email_verified_at.eq(coalesce(users::email_verified_at, diesel::dsl::now).nullable()),
                users::updated_at.eq(diesel::dsl::now),
            ))
            .returning(users::email)
            .get_result(c)
            .await?;
        crate::domains::auto_join(c, &access, changed.get_ref(), user, &email).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(HttpResponse::Ok().json(EmailVerified { email_verified: true }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    /// Any text: an address without an account gets the same answer.
    email: String,
}

/// Nothing: the same answer whether or not the address has an account.
#[derive(Serialize, ToSchema)]
struct ResetRequested {}

/// `POST /v1/auth/password-reset`: always 202, whether or not the address
/// has an account; if it has, a single-use link goes out by mail.
#[utoipa::path(
    tag = "accounts",
    summary = "Mails a password-reset link, if the address has an account",
    request_body = ResetBody,
    responses((status = 202, body = ResetRequested), RateLimited),
)]
#[post("/v1/auth/password-reset")]
async fn request_password_reset(
    req: HttpRequest,
    db: web::Data<Db>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    body: Json<ResetBody>,
) -> Result<HttpResponse, ApiError> {
    let cfg = config(cfg);
    count(&limits.password_reset_per_ip, &cfg.client_key(&req)).await?;
    if let Ok(email) = EmailAddress::parse(&body.0.email) {
        // Counted per address whether or not it has an account: the limit
        // tells nothing about which addresses exist.
        count(&limits.password_reset_per_account, email.as_str()).await?;
        // Off the response path, so an address with an account and one
        // without answer in the same time (no enumeration by timing).
        let db = db.get_ref().clone();
        tokio::spawn(async move {
            if let Err(err) = send_password_reset(&db, &cfg, email).await {
                tracing::error!(error = format!("{:#}", anyhow::Error::new(err)), "queueing a password reset failed");
            }
        });
    }
    Ok(HttpResponse::Accepted().json(ResetRequested {}))
}

/// Queues a reset link if `email` has an account.
async fn send_password_reset(db: &Db, cfg: &IdentityConfig, email: EmailAddress) -> Result<(), IdentityError> {
    db.platform(async |c| {
        if let Some(user) = crate::users::find_id_by_email(c, &email).await? {
            let ttl = cfg.password_reset_ttl;
            let (token_id, token) = issue_token(c, user.0, "password_reset", ttl).await?;
            let minutes = u32::try_from(ttl.as_secs() / 60).unwrap_or(u32::MAX);
            let message =
                crate::mail::password_reset(email.clone(), &token, minutes, format!("password_reset:{token_id}"));
            mail::queue(c, message).await?;
        }
        Ok::<_, IdentityError>(())
    })
    .await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewPasswordBody {
    /// The token from the reset mail.
    #[schema(schema_with = crate::openapi::mail_token)]
    token: String,
    #[schema(schema_with = crate::openapi::new_password)]
    password: String,
}

#[derive(Serialize, ToSchema)]
struct PasswordChanged {
    /// Always true.
    password_changed: bool,
}

/// `POST /v1/auth/password-reset/confirm`: sets the new password, uses up
/// the token and revokes every session of the account.
#[utoipa::path(
    tag = "accounts",
    summary = "Sets a new password with the token from the reset mail; every session of the account ends",
    request_body = NewPasswordBody,
    responses(
        (status = 200, body = PasswordChanged),
        (status = 400, description = "Error: invalid_request (the token is unknown, used or expired, or the password is not allowed).", body = plinth_http::openapi::ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/auth/password-reset/confirm")]
async fn confirm_password_reset(
    req: HttpRequest,
    db: web::Data<Db>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    hashing: web::Data<Hashing>,
    body: Json<NewPasswordBody>,
) -> Result<HttpResponse, ApiError> {
    count(&limits.verify_per_ip, &config(cfg).client_key(&req)).await?;
    let NewPasswordBody { token, password } = body.0;
    password::check("password", &password).map_err(|e| ApiError::invalid_fields(vec![e]))?;
    // The token is checked before the new password is hashed, so random
    // tokens cost a lookup, not an argon2id run.
    let known = db.platform(async |c| Ok::<_, ApiError>(tokens::is_live(c, &token, "password_reset").await?)).await?;
    if !known {
        return Err(IdentityError::InvalidToken.into());
    }
    let hash = hashing.hash(password).await?;
    let revoked = db
        .platform(async |c| {
            // Redeemed here, once: a concurrent confirmation finds it used.
            let user = redeem_token(c, &token, "password_reset").await?.ok_or(IdentityError::InvalidToken)?;
            // Following the link proves the address too.
            diesel::update(users::table.find(user))
                .set((
                    users::password_hash.eq(&hash),
                    users::email_verified_at.eq(coalesce(users::email_verified_at, diesel::dsl::now).nullable()),
                    users::updated_at.eq(diesel::dsl::now),
                ))
                .execute(c)
                .await?;
            Ok::<_, ApiError>(sessions::revoke_all_sessions(c, UserId(user)).await?)
        })
        .await?;
    tracing::info!(sessions.revoked = revoked, "password reset");
    Ok(HttpResponse::Ok().json(PasswordChanged { password_changed: true }))
}

diesel::define_sql_function! {
    /// SQL's `coalesce` for a nullable timestamp and a fallback.
    fn coalesce(
        x: diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
        y: diesel::sql_types::Timestamptz,
    ) -> diesel::sql_types::Timestamptz;
}

//! What a signed-in user controls about their own account: their sessions
//! (listed, ended one by one or all but the current one), their password
//! and their address. Changing the password or the address asks for the
//! current password again (and the one-time code when two-factor sign-in
//! is on): a session alone is not enough. None of these is open to an
//! impersonation session (403).

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::openapi::{ErrorEnvelope, NotFound, RateLimited};
use plinth_http::ratelimit::Refused;
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_mail::{self as mail, EmailAddress};
use plinth_tenants::crypto::Keyring;
use plinth_tenants::{Db, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{IdentityConfig, config};
use crate::error::IdentityError;
use crate::limits::{RateLimits, count};
use crate::login::registered;
use crate::password::{self, Hashing};
use crate::schema::{sessions, users};
use crate::sessions::{Authenticated, SessionInfo};
use crate::tokens;

/// How long the link confirming a new address works.
const CHANGE_EMAIL_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The most sessions `GET /v1/me/sessions` lists (the newest).
const MAX_LISTED: i64 = 500;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(list_sessions)
        .service(end_other_sessions)
        .service(end_session)
        .service(change_password)
        .service(change_email)
        .service(confirm_email_change);
}

/// One of the caller's live sessions.
#[derive(Serialize, ToSchema, Queryable)]
struct SessionView {
    id: uuid::Uuid,
    /// The `User-Agent` of the client that signed in (at most 256 characters).
    user_agent: Option<String>,
    /// The client's address when it signed in.
    ip: Option<String>,
    created_at: DateTime<Utc>,
    /// When a request last used it (recorded at most once a minute).
    last_used_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    /// Whether this is the session of the request.
    current: bool,
}

#[derive(Serialize, ToSchema)]
struct SessionList {
    /// Newest first, at most 500.
    data: Vec<SessionView>,
}

/// `GET /v1/me/sessions`: the caller's live sessions (impersonation
/// sessions, which are an operator's, are not listed).
#[utoipa::path(
    tag = "accounts",
    summary = "The caller's live sessions: device, address, created, last used, the current one marked",
    security(("session" = [])),
    responses((status = 200, body = SessionList)),
)]
#[get("/v1/me/sessions")]
async fn list_sessions(db: web::Data<Db>, who: Authenticated) -> Result<HttpResponse, ApiError> {
    let SessionInfo { user_id, session_id, .. } = who.0;
    let data: Vec<SessionView> = db
        .platform(async |c| {
            let rows = sessions::table
                .filter(sessions::user_id.eq(user_id.0))
                .filter(sessions::revoked_at.is_null())
                .filter(sessions::expires_at.gt(diesel::dsl::now))
                .filter(sessions::impersonator_id.is_null())
                .order(sessions::id.desc())
                .limit(MAX_LISTED)
                .select((
                    sessions::id,
                    sessions::user_agent,
                    sessions::ip,
                    sessions::created_at,
                    sessions::last_used_at,
                    sessions::expires_at,
                    sessions::id.eq(session_id),
                ))
                .load(c)
                .await?;
            Ok::<_, ApiError>(rows)
        })
        .await?;
    Ok(HttpResponse::Ok().json(SessionList { data }))
}

/// `DELETE /v1/me/sessions/{id}`: ends one of the caller's sessions (the
/// current one too: that is signing out) on every instance within a second.
#[utoipa::path(
    tag = "accounts",
    summary = "Ends one of the caller's sessions, on every instance",
    params(("id" = uuid::Uuid, Path, description = "The session.")),
    security(("session" = [])),
    responses((status = 204, description = "Ended."), NotFound),
)]
#[delete("/v1/me/sessions/{id}")]
async fn end_session(db: web::Data<Db>, who: Authenticated, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::parse_str(&path).map_err(|_| ApiError::NotFound("session"))?;
    let user = who.0.user_id;
    let ended = db
        .platform(async |c| {
            Ok::<_, ApiError>(
                diesel::update(
                    sessions::table
                        .filter(sessions::id.eq(id))
                        .filter(sessions::user_id.eq(user.0))
                        .filter(sessions::impersonator_id.is_null())
                        .filter(sessions::revoked_at.is_null()),
                )
                .set(sessions::revoked_at.eq(diesel::dsl::now))
                .execute(c)
                .await?,
            )
        })
        .await?;
    if ended == 0 {
        return Err(ApiError::NotFound("session"));
    }
    tracing::info!(session.id = %id, "session ended by its user");
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Serialize, ToSchema)]
struct SessionsEnded {
    /// How many sessions ended.
    ended: usize,
}

/// `DELETE /v1/me/sessions`: signs out everywhere else (the current
/// session stays).
#[utoipa::path(
    tag = "accounts",
    summary = "Ends every session of the caller but the current one (sign out everywhere else)",
    security(("session" = [])),
    responses((status = 200, body = SessionsEnded)),
)]
#[delete("/v1/me/sessions")]
async fn end_other_sessions(db: web::Data<Db>, who: Authenticated) -> Result<HttpResponse, ApiError> {
    let SessionInfo { user_id, session_id, .. } = who.0;
    let ended = db
        .platform(async |c| Ok::<_, ApiError>(crate::sessions::revoke_other_sessions(c, user_id, session_id).await?))
        .await?;
    tracing::info!(sessions.ended = ended, "other sessions ended by their user");
    Ok(HttpResponse::Ok().json(SessionsEnded { ended }))
}

/// Proof, again, that the caller is the account's owner: the password and,
/// when two-factor sign-in is on, a current or recovery code. Failures
/// count against the account's failed-login limit (a stolen session cannot
/// guess the password here any faster than at the login), and a success
/// gives its reservation back.
pub(crate) async fn reauthenticate(
    req: &HttpRequest,
    user: UserId,
    password: &str,
    totp_code: Option<&str>,
) -> Result<(), ApiError> {
    let db = registered::<Db>(req)?;
    let limits = registered::<RateLimits>(req)?;
    let hashing = registered::<Hashing>(req)?;
    let ring = registered::<Keyring>(req)?;
    let key = format!("reauth:{}", user.0);
    match limits.login_failures_per_account.reserve(&key).await {
        Ok(_) => {}
        Err(Refused::Limited(wait)) => return Err(plinth_http::ratelimit::limited(wait)),
        Err(refused) => return Err(refused.into()),
    }
    let stored: String = db
        .platform(async |c| Ok::<_, ApiError>(users::table.find(user.0).select(users::password_hash).first(c).await?))
        .await?;
    let mut right = hashing.verify(password, Some(stored)).await?;
    if right {
        right = db
            .platform(async |c| {
                let state = crate::totp::state(c, user.0, true).await?;
                if state.totp_secret.is_none() {
                    return Ok(true);
                }
                let Some(code) = totp_code else { return Err(ApiError::TotpRequired { passkey: None }) };
                Ok::<_, ApiError>(crate::totp::accept_second_factor(c, &ring, user.0, &state, code).await?)
            })
            .await?;
    }
    if !right {
        tracing::info!("re-authentication failed");
        return Err(ApiError::InvalidCredentials);
    }
    // A local or shared count that cannot be given back leaves one failure
    // counted too many; the answer stays a success.
    let _ = limits.login_failures_per_account.refund(&key).await;
    Ok(())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordChangeBody {
    #[schema(schema_with = crate::openapi::password)]
    current_password: String,
    #[schema(schema_with = crate::openapi::new_password)]
    new_password: String,
    /// With two-factor sign-in on: a current code or a recovery code.
    #[schema(nullable = false)]
    totp_code: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct OwnPasswordChanged {
    /// Always true.
    password_changed: bool,
    /// How many other sessions ended.
    sessions_ended: usize,
}

/// `POST /v1/me/password`: a new password; every other session ends.
#[utoipa::path(
    tag = "accounts",
    summary = "Changes the caller's password (the current one asked again); every other session ends",
    security(("session" = [])),
    request_body = PasswordChangeBody,
    responses(
        (status = 200, body = OwnPasswordChanged),
        (status = 401, description = "Error: invalid_credentials (the current password or code is wrong), \
                                     totp_required.", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/me/password")]
async fn change_password(
    req: HttpRequest,
    db: web::Data<Db>,
    hashing: web::Data<Hashing>,
    who: Authenticated,
    body: Json<PasswordChangeBody>,
) -> Result<HttpResponse, ApiError> {
    let PasswordChangeBody { current_password, new_password, totp_code } = body.0;
    password::check("new_password", &new_password).map_err(|e| ApiError::invalid_fields(vec![e]))?;
    let SessionInfo { user_id, session_id, .. } = who.0;
    reauthenticate(&req, user_id, &current_password, totp_code.as_deref()).await?;
    let hash = hashing.hash(new_password).await?;
    let ended = db
        .platform(async |c| {
            diesel::update(users::table.find(user_id.0))
                .set((users::password_hash.eq(&hash), users::updated_at.eq(diesel::dsl::now)))
                .execute(c)
                .await?;
            Ok::<_, ApiError>(crate::sessions::revoke_other_sessions(c, user_id, session_id).await?)
        })
        .await?;
    tracing::info!(sessions.ended = ended, "password changed");
    Ok(HttpResponse::Ok().json(OwnPasswordChanged { password_changed: true, sessions_ended: ended }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EmailChangeBody {
    /// The new address; a link to confirm it goes there.
    #[schema(schema_with = crate::openapi::email)]
    email: String,
    #[schema(schema_with = crate::openapi::password)]
    password: String,
    #[schema(nullable = false)]
    totp_code: Option<String>,
}

/// Nothing yet: the address changes when the link is followed.
#[derive(Serialize, ToSchema)]
struct EmailChangeRequested {}

/// `POST /v1/me/email`: mails a confirmation link to the new address. The
/// address changes only when the link is followed; until then sign-in
/// stays with the old one.
#[utoipa::path(
    tag = "accounts",
    summary = "Asks to change the caller's address: a confirmation link goes to the new one",
    security(("session" = [])),
    request_body = EmailChangeBody,
    responses(
        (status = 202, body = EmailChangeRequested),
        (status = 401, description = "Error: invalid_credentials, totp_required.", body = ErrorEnvelope),
        (status = 409, description = "Error: conflict (the address has an account).", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/me/email")]
async fn change_email(
    req: HttpRequest,
    db: web::Data<Db>,
    limits: web::Data<RateLimits>,
    who: Authenticated,
    body: Json<EmailChangeBody>,
) -> Result<HttpResponse, ApiError> {
    let EmailChangeBody { email, password, totp_code } = body.0;
    let email = EmailAddress::parse(&email)
        .map_err(|e| ApiError::invalid_fields(vec![FieldError::new("email", "invalid", e.to_string())]))?;
    let user = who.0.user_id;
    reauthenticate(&req, user, &password, totp_code.as_deref()).await?;
    // The same limit as reset links: at most a few mails to one address.
    count(&limits.password_reset_per_account, email.as_str()).await?;
    db.platform(async |c| {
        if crate::users::find_id_by_email(c, &email).await?.is_some() {
            return Err(ApiError::Conflict("the address has an account".into()));
        }
        let (token_id, token) =
            tokens::issue_token_for(c, user.0, "change_email", CHANGE_EMAIL_TTL, Some(email.as_str())).await?;
        let message = crate::mail::change_email(email.clone(), &token, format!("change_email:{token_id}"));
        mail::queue(c, message).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(user.id = %user, "address change asked");
    Ok(HttpResponse::Accepted().json(EmailChangeRequested {}))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ConfirmEmailBody {
    /// The token from the confirmation mail.
    #[schema(schema_with = crate::openapi::mail_token)]
    token: String,
}

#[derive(Serialize, ToSchema)]
struct EmailChanged {
    /// The account's address now (verified).
    #[schema(schema_with = crate::openapi::email)]
    email: String,
}

/// `POST /v1/auth/change-email/confirm`: the new address takes effect
/// (verified, since the link reached it), and a notice goes to the old one.
#[utoipa::path(
    tag = "accounts",
    summary = "Confirms a change of address with the token mailed to the new one; the old one is told",
    request_body = ConfirmEmailBody,
    responses(
        (status = 200, body = EmailChanged),
        (status = 400, description = "Error: invalid_request (the token is unknown, used or expired).", body = ErrorEnvelope),
        (status = 409, description = "Error: conflict (the address has an account meanwhile).", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/auth/change-email/confirm")]
async fn confirm_email_change(
    req: HttpRequest,
    db: web::Data<Db>,
    access: web::Data<std::sync::Arc<plinth_access::Access>>,
    cfg: Option<web::Data<IdentityConfig>>,
    limits: web::Data<RateLimits>,
    changed: web::Data<dyn crate::members::MembersChanged>,
    body: Json<ConfirmEmailBody>,
) -> Result<HttpResponse, ApiError> {
    count(&limits.verify_per_ip, &config(cfg).client_key(&req)).await?;
    let token = body.0.token;
    let email = db
        .platform(async |c| {
            let (user, new) =
                tokens::redeem_token_for(c, &token, "change_email").await?.ok_or(IdentityError::InvalidToken)?;
            let new = new.ok_or(IdentityError::InvalidToken)?;
            let old: String = users::table.find(user).select(users::email).for_update().first(c).await?;
            set_email(c, user, &new).await?;
            crate::domains::auto_join(c, &access, changed.get_ref(), user, &new).await?;
            if let Ok(old) = EmailAddress::parse(&old) {
                let key = format!("email_changed:{user}:{}", uuid::Uuid::now_v7());
                mail::queue(c, crate::mail::email_changed(old, &new, key)).await?;
            }
            Ok::<_, ApiError>(new)
        })
        .await?;
    tracing::info!("address changed");
    Ok(HttpResponse::Ok().json(EmailChanged { email }))
}

/// Sets a verified address; 409 when another account has it.
async fn set_email(conn: &mut AsyncPgConnection, user: uuid::Uuid, email: &str) -> Result<(), ApiError> {
    let taken: Option<uuid::Uuid> = users::table
        .filter(users::email.eq(email))
        .filter(users::id.ne(user))
        .select(users::id)
        .first(conn)
        .await
        .optional()?;
    if taken.is_some() {
        return Err(ApiError::Conflict("the address has an account".into()));
    }
    diesel::update(users::table.find(user))
        .set((
            users::email.eq(email),
            users::email_verified_at.eq(diesel::dsl::now),
            users::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

//! Two-factor login with time-based one-time codes (TOTP, RFC 6238: SHA-1,
//! 6 digits, 30 s steps, one step of clock skew either way).
//!
//! `POST /v1/auth/totp/enroll` {password} returns a new secret (and an
//! `otpauth://` URL for authenticator apps); `.../confirm` {code, password}
//! turns it on, ends every other session of the account, and returns ten
//! single-use recovery codes, shown once and stored as hashes;
//! `.../disable` {code} turns it off. Both steps that turn it on need the
//! password, so a stolen session cannot lock the owner out with a second
//! factor of the thief's; a wrong password counts toward the account's
//! failed-login limit. An operator can turn it off for an owner who lost
//! both the app and the recovery codes: `plinth admin reset-second-factor`. Once on, login answers 401
//! `totp_required` until `totp_code` (a current code or a recovery code) is
//! sent with the password. A time step accepted once is never accepted
//! again, so an observed code cannot be replayed.

use crate::sessions::{self, Authenticated};
use actix_web::{HttpResponse, post, web};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::openapi::{Conflict, ErrorEnvelope, RateLimited};
use plinth_http::ratelimit::Refused;
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_tenants::UserId;
use plinth_tenants::crypto::Keyring;

use crate::error::IdentityError;
use crate::limits::RateLimits;
use crate::password::Hashing;
use crate::schema::{totp_recovery_codes, users};
use serde::{Deserialize, Serialize};
use totp_rs::{Builder, Totp};
use utoipa::ToSchema;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(enroll).service(confirm).service(disable);
}

/// A new second factor, not yet on.
#[derive(Serialize, ToSchema)]
struct Enrolled {
    /// The shared secret, base32.
    #[schema(pattern = "^[a-z2-7]+$")]
    secret: String,
    /// The same as an `otpauth://totp/...` URL, for a QR code.
    otpauth_url: String,
}

#[derive(Serialize, ToSchema)]
struct TwoFactor {
    totp_enabled: bool,
    /// When turned on: ten single-use codes that stand in for the app, shown
    /// this once.
    #[schema(nullable = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_codes: Option<Vec<String>>,
}

const RECOVERY_CODES: usize = 10;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

fn totp(secret: &[u8], email: &str) -> Result<Totp, IdentityError> {
    Builder::new()
        .with_secret(secret.to_vec())
        .with_account_name(email)
        .with_issuer(Some("Plinth"))
        .build()
        .map_err(|e| IdentityError::Internal(anyhow::anyhow!("{e}").context("building a TOTP")))
}

/// `xxxxx-xxxxx` from 50 random bits.
fn recovery_code() -> Result<String, getrandom::Error> {
    let bytes = sessions::random_bytes::<10>()?;
    let chars: String = bytes.iter().map(|b| BASE32[usize::from(*b) % 32] as char).collect();
    Ok(format!("{}-{}", &chars[..5], &chars[5..]))
}

fn normalize_recovery(code: &str) -> String {
    code.trim().to_ascii_lowercase()
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = users)]
pub(crate) struct TotpState {
    pub email: String,
    pub totp_secret: Option<Vec<u8>>,
    pub totp_pending: Option<Vec<u8>>,
    pub totp_last_step: Option<i64>,
}

/// The account's second-factor state; `lock` holds the row for the rest of
/// the transaction (so a code is used up exactly once).
pub(crate) async fn state(
    conn: &mut AsyncPgConnection,
    user: uuid::Uuid,
    lock: bool,
) -> diesel::QueryResult<TotpState> {
    let query = users::table.find(user).select(TotpState::as_select());
    if lock { query.for_update().first(conn).await } else { query.first(conn).await }
}

/// The length of a TOTP secret; a stored value of this length is one
/// written before secrets were sealed (sealed ones are longer).
const SECRET_LEN: usize = 20;

/// What a TOTP secret is sealed to: its account.
fn context(user: uuid::Uuid) -> Vec<u8> {
    format!("totp\0{user}").into_bytes()
}

/// A stored secret, opened (or as it is, if it predates sealing).
fn reveal(ring: &Keyring, user: uuid::Uuid, stored: &[u8]) -> Result<Vec<u8>, IdentityError> {
    if stored.len() == SECRET_LEN {
        return Ok(stored.to_vec());
    }
    ring.open(stored, &context(user))
        .map_err(|e| IdentityError::Internal(anyhow::Error::new(e).context("opening a TOTP secret")))
}

#[derive(diesel::QueryableByName)]
struct StoredSecrets {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bytea>)]
    totp_secret: Option<Vec<u8>>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bytea>)]
    totp_pending: Option<Vec<u8>>,
}

/// Seals the TOTP secrets under the keyring's first key: with `every`, all
/// of them (after a new key was put first: `plinth admin rotate-keys`);
/// otherwise only those stored before sealing began (at every start).
/// Returns how many accounts were rewritten.
pub async fn reseal(conn: &mut AsyncPgConnection, ring: &Keyring, every: bool) -> Result<usize, IdentityError> {
    // Raw SQL: octet_length, which diesel does not declare.
    let which = if every {
        "totp_secret IS NOT NULL OR totp_pending IS NOT NULL"
    } else {
        "octet_length(totp_secret) = 20 OR octet_length(totp_pending) = 20"
    };
    let rows: Vec<StoredSecrets> = diesel::sql_query(format!(
        "SELECT id, totp_secret, totp_pending FROM public.users WHERE {which} ORDER BY id FOR UPDATE"
    ))
    .load(conn)
    .await?;
    for row in &rows {
        let seal = |stored: &Option<Vec<u8>>| -> Result<Option<Vec<u8>>, IdentityError> {
            let Some(stored) = stored else { return Ok(None) };
            let plain = reveal(ring, row.id, stored)?;
            Ok(Some(ring.seal(&plain, &context(row.id)).map_err(|e| IdentityError::Internal(e.into()))?))
        };
        diesel::update(users::table.find(row.id))
            .set((users::totp_secret.eq(seal(&row.totp_secret)?), users::totp_pending.eq(seal(&row.totp_pending)?)))
            .execute(conn)
            .await?;
    }
    Ok(rows.len())
}

/// Turns two-factor login off for `user` and deletes its recovery codes.
async fn clear_second_factor(conn: &mut AsyncPgConnection, user: uuid::Uuid) -> diesel::QueryResult<()> {
    diesel::update(users::table.find(user))
        .set((
            users::totp_secret.eq(None::<Vec<u8>>),
            users::totp_pending.eq(None::<Vec<u8>>),
            users::totp_last_step.eq(None::<i64>),
            users::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    diesel::delete(totp_recovery_codes::table.filter(totp_recovery_codes::user_id.eq(user))).execute(conn).await?;
    Ok(())
}

/// Turns two-factor login off for the account with `email`, deletes its
/// recovery codes and ends its sessions: the recovery path for an owner who
/// lost both the authenticator and the recovery codes, run by an operator
/// after verifying who is asking (`plinth admin reset-second-factor`).
/// Returns whether the account exists.
pub async fn reset_second_factor(conn: &mut AsyncPgConnection, email: &str) -> Result<bool, diesel::result::Error> {
    let found: Option<uuid::Uuid> =
        users::table.filter(users::email.eq(email)).select(users::id).for_update().first(conn).await.optional()?;
    let Some(user) = found else { return Ok(false) };
    clear_second_factor(conn, user).await?;
    sessions::revoke_all_sessions(conn, UserId(user)).await?;
    tracing::info!(user.id = %user, "two-factor login reset by an operator");
    Ok(true)
}

/// Checks a second factor for `user` (whose row the caller has locked) and
/// uses it up: a TOTP code newer than the last accepted step, or an unused
/// recovery code. Returns whether it was accepted.
pub(crate) async fn accept_second_factor(
    conn: &mut AsyncPgConnection,
    ring: &Keyring,
    user: uuid::Uuid,
    state: &TotpState,
    code: &str,
) -> Result<bool, IdentityError> {
    let Some(secret) = &state.totp_secret else { return Ok(false) };
    if code.contains('-') {
        let hash = sessions::hash_token(&normalize_recovery(code));
        let used = diesel::update(
            totp_recovery_codes::table
                .filter(totp_recovery_codes::user_id.eq(user))
                .filter(totp_recovery_codes::code_hash.eq(&hash[..]))
                .filter(totp_recovery_codes::used_at.is_null()),
        )
        .set(totp_recovery_codes::used_at.eq(diesel::dsl::now))
        .execute(conn)
        .await?;
        return Ok(used == 1);
    }
    let Some(step) = totp(&reveal(ring, user, secret)?, &state.email)?.check_current(code.trim()) else {
        return Ok(false);
    };
    let step = i64::try_from(step).unwrap_or(i64::MAX);
    if state.totp_last_step.is_some_and(|last| step <= last) {
        return Ok(false); // replayed
    }
    diesel::update(users::table.find(user)).set(users::totp_last_step.eq(step)).execute(conn).await?;
    Ok(true)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    /// The account's password, asked again.
    #[schema(schema_with = crate::openapi::password)]
    password: String,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = users)]
struct StoredPassword {
    email: String,
    password_hash: String,
}

/// Checks the signed-in user's password again (401 `invalid_credentials`
/// when wrong, counted toward the account's failed-login limit; 429 once
/// over it).
async fn recheck_password(
    db: &plinth_tenants::Db,
    hashing: &Hashing,
    limits: &RateLimits,
    user: uuid::Uuid,
    password: &str,
) -> Result<(), IdentityError> {
    let stored: StoredPassword = db
        .platform(async |c| {
            Ok::<_, IdentityError>(users::table.find(user).select(StoredPassword::as_select()).first(c).await?)
        })
        .await?;
    let limited = limits.login_failures_per_account.is_limited(&stored.email).await.map_err(IdentityError::Limits)?;
    if let Some(wait) = limited {
        return Err(IdentityError::RateLimited(wait));
    }
    if hashing.verify(password, Some(stored.password_hash)).await? {
        return Ok(());
    }
    // Counted; already over the limit or not, the answer is the same.
    match limits.login_failures_per_account.check(&stored.email).await {
        Ok(()) | Err(Refused::Limited(_)) => {}
        Err(Refused::Unavailable(err)) => return Err(IdentityError::Limits(err)),
    }
    tracing::info!(user.id = %user, "second-factor change refused: wrong password");
    Err(IdentityError::InvalidCredentials)
}

#[utoipa::path(
    operation_id = "enroll_totp",
    tag = "accounts",
    summary = "Starts turning on two-factor sign-in: a new secret for the authenticator app",
    security(("session" = [])),
    request_body = PasswordBody,
    responses(
        (status = 200, body = Enrolled),
        (status = 401, description = "Error: unauthenticated, invalid_credentials (the password is wrong).", body = ErrorEnvelope),
        Conflict,
        RateLimited,
    ),
)]
#[post("/v1/auth/totp/enroll")]
async fn enroll(
    db: web::Data<plinth_tenants::Db>,
    ring: web::Data<Keyring>,
    hashing: web::Data<Hashing>,
    limits: web::Data<RateLimits>,
    who: Authenticated,
    body: Json<PasswordBody>,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id.0;
    recheck_password(&db, &hashing, &limits, user, &body.0.password).await?;
    let secret = sessions::random_bytes::<SECRET_LEN>().map_err(IdentityError::from)?;
    let sealed = ring.seal(&secret, &context(user)).map_err(|e| ApiError::Internal(e.into()))?;
    let email = db
        .platform(async |c| {
            let current = state(c, user, true).await?;
            if current.totp_secret.is_some() {
                return Err(ApiError::Conflict("two-factor login is already on; disable it first".into()));
            }
            diesel::update(users::table.find(user))
                .set((users::totp_pending.eq(&sealed), users::updated_at.eq(diesel::dsl::now)))
                .execute(c)
                .await?;
            Ok::<_, ApiError>(current.email)
        })
        .await?;
    let totp = totp(&secret, &email)?;
    let url = totp.to_url().map_err(|e| ApiError::Internal(anyhow::anyhow!("otpauth URL: {e}")))?;
    Ok(HttpResponse::Ok().json(Enrolled { secret: totp.secret().to_base32(), otpauth_url: url }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    /// A current code from the app, or a recovery code.
    code: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TotpConfirmBody {
    /// A current code from the app.
    code: String,
    #[schema(schema_with = crate::openapi::password)]
    password: String,
}

fn wrong_code() -> ApiError {
    ApiError::invalid_fields(vec![FieldError::new("code", "invalid", "is not a valid code")])
}

#[utoipa::path(
    operation_id = "confirm_totp",
    tag = "accounts",
    summary = "Turns two-factor sign-in on with a code from the app; other sessions end",
    security(("session" = [])),
    request_body = TotpConfirmBody,
    responses(
        (status = 200, body = TwoFactor),
        (status = 400, description = "Error: invalid_request (the code is wrong).", body = ErrorEnvelope),
        (status = 401, description = "Error: unauthenticated, invalid_credentials (the password is wrong).", body = ErrorEnvelope),
        Conflict,
        RateLimited,
    ),
)]
#[post("/v1/auth/totp/confirm")]
async fn confirm(
    db: web::Data<plinth_tenants::Db>,
    ring: web::Data<Keyring>,
    hashing: web::Data<Hashing>,
    limits: web::Data<RateLimits>,
    who: Authenticated,
    body: Json<TotpConfirmBody>,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id.0;
    let session = who.0.session_id;
    recheck_password(&db, &hashing, &limits, user, &body.0.password).await?;
    let codes: Vec<String> =
        (0..RECOVERY_CODES).map(|_| recovery_code()).collect::<Result<_, _>>().map_err(IdentityError::from)?;
    db.platform(async |c| {
        let current = state(c, user, true).await?;
        let pending = current.totp_pending.clone().ok_or_else(|| ApiError::Conflict("enroll first".into()))?;
        let pending = reveal(&ring, user, &pending)?;
        let step = totp(&pending, &current.email)?.check_current(body.0.code.trim()).ok_or_else(wrong_code)?;
        diesel::update(users::table.find(user))
            .set((
                users::totp_secret.eq(users::totp_pending),
                users::totp_pending.eq(None::<Vec<u8>>),
                users::totp_last_step.eq(i64::try_from(step).unwrap_or(i64::MAX)),
                users::updated_at.eq(diesel::dsl::now),
            ))
            .execute(c)
            .await?;
        diesel::delete(totp_recovery_codes::table.filter(totp_recovery_codes::user_id.eq(user))).execute(c).await?;
        let hashes: Vec<[u8; 32]> = codes.iter().map(|code| sessions::hash_token(code)).collect();
        let rows: Vec<_> = hashes
            .iter()
            .map(|h| (totp_recovery_codes::user_id.eq(user), totp_recovery_codes::code_hash.eq(&h[..])))
            .collect();
        diesel::insert_into(totp_recovery_codes::table).values(rows).execute(c).await?;
        // Whoever else holds a session of this account is signed out.
        sessions::revoke_other_sessions(c, UserId(user), session).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(user.id = %user, "two-factor login turned on");
    Ok(HttpResponse::Ok().json(TwoFactor { totp_enabled: true, recovery_codes: Some(codes) }))
}

#[utoipa::path(
    operation_id = "disable_totp",
    tag = "accounts",
    summary = "Turns two-factor sign-in off with a current or recovery code",
    security(("session" = [])),
    request_body = CodeBody,
    responses(
        (status = 200, body = TwoFactor),
        (status = 400, description = "Error: invalid_request (the code is wrong).", body = ErrorEnvelope),
        Conflict,
    ),
)]
#[post("/v1/auth/totp/disable")]
async fn disable(
    db: web::Data<plinth_tenants::Db>,
    ring: web::Data<Keyring>,
    who: Authenticated,
    body: Json<CodeBody>,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id.0;
    db.platform(async |c| {
        let current = state(c, user, true).await?;
        if current.totp_secret.is_none() {
            return Err(ApiError::Conflict("two-factor login is not on".into()));
        }
        if !accept_second_factor(c, &ring, user, &current, &body.0.code).await? {
            return Err(wrong_code());
        }
        clear_second_factor(c, user).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(user.id = %user, "two-factor login turned off");
    Ok(HttpResponse::Ok().json(TwoFactor { totp_enabled: false, recovery_codes: None }))
}

//! Passkeys (WebAuthn): credentials a user registers on their devices, to
//! sign in without a password or as the second factor beside TOTP.
//!
//! - `POST /v1/me/passkey-options` {password, totp_code?}: the options for
//!   `navigator.credentials.create`; the password is asked again, as for
//!   turning on TOTP, so a stolen session cannot add a way in of its own.
//! - `POST /v1/me/passkeys` {name, credential}: the browser's answer,
//!   verified; the passkey is stored under its name.
//! - `GET /v1/me/passkeys`, `PATCH`/`DELETE /v1/me/passkeys/{id}`: list,
//!   rename, remove.
//! - `POST /v1/auth/passkey/options`, then `POST /v1/auth/passkey`
//!   {credential}: signing in with a passkey alone. The passkey is asked
//!   for user verification (PIN or biometric), so it is two factors by
//!   itself and TOTP is not asked.
//! - As the second factor: `POST /v1/auth/login` with the right password
//!   answers 401 `totp_required` with `passkey`, a ceremony's options; the
//!   same request again with `passkey` (the browser's answer) instead of
//!   `totp_code` signs in.
//!
//! A ceremony's server half waits in `passkey_ceremonies` (any instance
//! may finish it), found by the challenge the browser signed, taken once,
//! within five minutes.

pub mod ceremony;

use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Bytea, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, PgExpressionMethods as _, QueryDsl as _, Queryable, Selectable,
    SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::openapi::{Conflict, ErrorEnvelope, NotFound, RateLimited};
use plinth_http::request::{Json, RequestId, Validator};
use plinth_http::{ApiError, ratelimit};
use plinth_mail::EmailAddress;
use plinth_tenants::audit::{Actor, Entry};
use plinth_tenants::{Db, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{IdentityConfig, config};
use crate::error::IdentityError;
use crate::limits::{RateLimits, count};
use crate::login::{LoggedIn, registered};
use crate::schema::{passkey_ceremonies, passkeys, users};
use crate::sessions::{self, Authenticated};
use crate::users::User;
use ceremony::{NewCredential, Refused, SecondFactor, SignIn, Site, Started, Stored};

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(registration_options)
        .service(register)
        .service(list)
        .service(rename)
        .service(remove)
        .service(sign_in_options)
        .service(sign_in);
}

/// How many passkeys one account may hold.
const MAX_PASSKEYS: i64 = 20;

/// An audit entry of `user` about their own sign-in methods, stamped with
/// the request's id.
fn entry(user: uuid::Uuid, action: &'static str, request_id: Option<&RequestId>) -> Entry {
    let entry = Entry::new(Actor::User(user), action).target("user", user);
    match request_id {
        Some(id) => id.stamp(entry),
        None => entry,
    }
}

fn too_many() -> ApiError {
    ApiError::Conflict(format!("an account holds at most {MAX_PASSKEYS} passkeys; remove one first"))
}

/// The site passkeys belong to (`PLINTH_BASE_DOMAIN`), made once at start.
pub(crate) fn site(req: &HttpRequest) -> Result<web::Data<Site>, ApiError> {
    registered::<Site>(req)
}

impl From<Refused> for ApiError {
    fn from(err: Refused) -> Self {
        match err {
            Refused::Malformed(why) => ApiError::invalid(format!("credential: {why}")),
            Refused::Failed(_) => ApiError::InvalidCredentials,
            Refused::Internal(_) => ApiError::Internal(anyhow::Error::new(err)),
        }
    }
}

/// A registered passkey.
#[derive(Serialize, ToSchema, Queryable, Selectable)]
#[diesel(table_name = passkeys)]
pub(crate) struct Passkey {
    id: uuid::Uuid,
    /// What the user called it ("laptop", "phone").
    name: String,
    created_at: DateTime<Utc>,
    /// When it last signed in (or stood as the second factor).
    last_used_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
struct PasskeyList {
    /// Oldest first.
    data: Vec<Passkey>,
}

/// What `navigator.credentials` takes.
#[derive(Serialize, ToSchema)]
struct CeremonyOptions {
    /// `PublicKeyCredentialCreationOptionsJSON` (registering) or
    /// `PublicKeyCredentialRequestOptionsJSON` (signing in): pass it to
    /// `PublicKeyCredential.parseCreationOptionsFromJSON` (or
    /// `parseRequestOptionsFromJSON`). Valid for five minutes, once.
    #[schema(value_type = Object)]
    options: serde_json::Value,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegistrationOptionsBody {
    /// The account's password, asked again.
    #[schema(schema_with = crate::openapi::password)]
    password: String,
    /// With two-factor sign-in on: a current code or a recovery code.
    #[schema(nullable = false)]
    totp_code: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    /// 1 to 100 characters.
    name: String,
    /// The browser's answer: `PublicKeyCredential.toJSON()` after
    /// `navigator.credentials.create` (`RegistrationResponseJSON`).
    #[schema(value_type = Object)]
    credential: serde_json::Value,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RenameBody {
    /// 1 to 100 characters.
    name: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SignInBody {
    /// The browser's answer: `PublicKeyCredential.toJSON()` after
    /// `navigator.credentials.get` (`AuthenticationResponseJSON`).
    #[schema(value_type = Object)]
    credential: serde_json::Value,
}

fn check_name(name: &str) -> Result<String, ApiError> {
    Validator::default().text("name", name, 1, 100, false).finish()?;
    Ok(name.trim().to_owned())
}

fn passkey_id(path: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(path).map_err(|_| ApiError::NotFound("passkey"))
}

fn json_bytes(value: &serde_json::Value) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("re-encoding a credential")))
}

/// Stores a ceremony's server half; each insert also removes up to ten
/// expired ones, so the table stays small without a sweeper.
async fn store(db: &Db, kind: &str, user: Option<uuid::Uuid>, started: &Started) -> Result<(), ApiError> {
    let expires_at = DateTime::<Utc>::from(started.expires_at);
    db.statement(async |c| {
        // Raw SQL: a writable CTE, as for failed logins.
        diesel::sql_query(
            "WITH pruned AS (DELETE FROM public.passkey_ceremonies WHERE challenge IN \
               (SELECT challenge FROM public.passkey_ceremonies WHERE expires_at < now() ORDER BY expires_at LIMIT 10)) \
             INSERT INTO public.passkey_ceremonies (challenge, kind, user_id, state, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind::<Bytea, _>(&started.challenge[..])
        .bind::<Text, _>(kind)
        .bind::<Nullable<SqlUuid>, _>(user)
        .bind::<Bytea, _>(&started.state)
        .bind::<Timestamptz, _>(expires_at)
        .execute(c)
        .await?;
        Ok::<_, ApiError>(())
    })
    .await
}

/// Takes (once) the unexpired ceremony of `kind` for `user` with
/// `challenge`: its server half.
async fn take(
    conn: &mut AsyncPgConnection,
    kind: &str,
    user: Option<uuid::Uuid>,
    challenge: &[u8; 16],
) -> diesel::QueryResult<Option<Vec<u8>>> {
    diesel::delete(
        passkey_ceremonies::table
            .filter(passkey_ceremonies::challenge.eq(&challenge[..]))
            .filter(passkey_ceremonies::kind.eq(kind))
            .filter(passkey_ceremonies::user_id.is_not_distinct_from(user))
            .filter(passkey_ceremonies::expires_at.gt(diesel::dsl::now)),
    )
    .returning(passkey_ceremonies::state)
    .get_result(conn)
    .await
    .optional()
}

/// `user`'s passkeys as a ceremony lists them: credential ids and transports.
async fn descriptors(conn: &mut AsyncPgConnection, user: uuid::Uuid) -> diesel::QueryResult<Vec<(Vec<u8>, i32)>> {
    passkeys::table
        .filter(passkeys::user_id.eq(user))
        .order(passkeys::id.asc())
        .select((passkeys::credential_id, passkeys::transports))
        .load(conn)
        .await
}

/// A passkey as the ceremony checks it, with its row id, its user and the
/// user's handle.
struct Found {
    id: uuid::Uuid,
    user: uuid::Uuid,
    handle: Vec<u8>,
    stored: Stored,
}

/// A passkey's row as [`find`] reads it: id, user, the user's handle, the
/// static and dynamic states, the transports.
type Row = (uuid::Uuid, uuid::Uuid, Option<Vec<u8>>, Vec<u8>, Vec<u8>, i32);

/// The passkey with `credential_id` (of `user`, when given), its rows
/// locked so two uses of one passkey are checked one after the other.
async fn find(
    conn: &mut AsyncPgConnection,
    credential_id: &[u8],
    user: Option<uuid::Uuid>,
) -> diesel::QueryResult<Option<Found>> {
    let row: Option<Row> = passkeys::table
        .inner_join(users::table)
        .filter(passkeys::credential_id.eq(credential_id))
        .select((
            passkeys::id,
            passkeys::user_id,
            users::passkey_handle,
            passkeys::static_state,
            passkeys::dynamic_state,
            passkeys::transports,
        ))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    Ok(row.and_then(|(id, owner, handle, static_state, dynamic_state, transports)| {
        if user.is_some_and(|user| user != owner) {
            return None;
        }
        Some(Found {
            id,
            user: owner,
            handle: handle?,
            stored: Stored { credential_id: credential_id.to_vec(), static_state, dynamic_state, transports },
        })
    }))
}

/// Records a passkey's use: its new counters, and when.
async fn used(conn: &mut AsyncPgConnection, id: uuid::Uuid, dynamic_state: [u8; 7]) -> diesel::QueryResult<()> {
    diesel::update(passkeys::table.find(id))
        .set((passkeys::dynamic_state.eq(&dynamic_state[..]), passkeys::last_used_at.eq(diesel::dsl::now)))
        .execute(conn)
        .await
        .map(drop)
}

#[utoipa::path(
    operation_id = "passkey_registration_options",
    tag = "accounts",
    summary = "Starts registering a passkey: the options for navigator.credentials.create (the password asked again)",
    security(("session" = [])),
    request_body = RegistrationOptionsBody,
    responses(
        (status = 200, body = CeremonyOptions),
        (status = 401, description = "Error: unauthenticated, invalid_credentials (the password or code is wrong), \
                                     totp_required.", body = ErrorEnvelope),
        Conflict,
        RateLimited,
    ),
)]
#[post("/v1/me/passkey-options")]
async fn registration_options(
    req: HttpRequest,
    db: web::Data<Db>,
    who: Authenticated,
    body: Json<RegistrationOptionsBody>,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id.0;
    let RegistrationOptionsBody { password, totp_code } = body.0;
    crate::me::reauthenticate(&req, UserId(user), &password, totp_code.as_deref()).await?;
    let site = site(&req)?;
    let fresh = ceremony::new_user_handle();
    let (email, handle, existing) = db
        .platform(async |c| {
            // The handle is made once, at the first registration.
            let (email, handle): (String, Option<Vec<u8>>) = diesel::update(users::table.find(user))
                .set(
                    users::passkey_handle.eq(diesel::dsl::sql::<Nullable<Bytea>>("coalesce(passkey_handle, ")
                        .bind::<Bytea, _>(&fresh[..])
                        .sql(")")),
                )
                .returning((users::email, users::passkey_handle))
                .get_result(c)
                .await?;
            let existing = descriptors(c, user).await?;
            Ok::<_, ApiError>((email, handle, existing))
        })
        .await?;
    if i64::try_from(existing.len()).unwrap_or(i64::MAX) >= MAX_PASSKEYS {
        return Err(too_many());
    }
    let handle = handle.ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no passkey handle after setting one")))?;
    let started = ceremony::start_registration(&site, &handle, &email, &existing)?;
    store(&db, "register", Some(user), &started).await?;
    Ok(HttpResponse::Ok().json(CeremonyOptions { options: started.options }))
}

#[utoipa::path(
    operation_id = "register_passkey",
    tag = "accounts",
    summary = "Finishes registering a passkey: the browser's answer, verified, stored under its name",
    security(("session" = [])),
    request_body = RegisterBody,
    responses(
        (status = 201, body = Passkey),
        (status = 400, description = "Error: invalid_request (the name, or not a registration response).", body = ErrorEnvelope),
        (status = 401, description = "Error: unauthenticated, invalid_credentials (the answer does not verify: \
                                     another site, an expired or used ceremony, another account's).", body = ErrorEnvelope),
        Conflict,
    ),
)]
#[post("/v1/me/passkeys")]
async fn register(
    req: HttpRequest,
    db: web::Data<Db>,
    who: Authenticated,
    body: Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id.0;
    let RegisterBody { name, credential } = body.0;
    let name = check_name(&name)?;
    let credential = NewCredential::parse(&json_bytes(&credential)?)?;
    let challenge = credential.challenge()?;
    let site = site(&req)?;
    let request_id = req.extensions().get::<RequestId>().cloned();
    let passkey = db
        .platform(async |c| {
            let Some(state) = take(c, "register", Some(user), &challenge).await? else {
                tracing::info!(user.id = %user, "passkey registration refused: no such ceremony");
                return Err(ApiError::InvalidCredentials);
            };
            // The account's row is held, so two registrations finishing at
            // once count each other.
            users::table.find(user).select(users::id).for_update().first::<uuid::Uuid>(c).await?;
            let held: i64 = passkeys::table.filter(passkeys::user_id.eq(user)).count().get_result(c).await?;
            if held >= MAX_PASSKEYS {
                return Ok(Err(too_many()));
            }
            let new = match credential.verify(&site, &state) {
                Ok(new) => new,
                Err(Refused::Failed(why)) => {
                    tracing::info!(user.id = %user, reason = why, "passkey registration refused");
                    return Ok(Err(ApiError::InvalidCredentials));
                }
                Err(err) => return Err(err.into()),
            };
            let inserted = diesel::insert_into(passkeys::table)
                .values((
                    passkeys::id.eq(uuid::Uuid::now_v7()),
                    passkeys::user_id.eq(user),
                    passkeys::credential_id.eq(&new.credential_id),
                    passkeys::name.eq(&name),
                    passkeys::static_state.eq(&new.static_state),
                    passkeys::dynamic_state.eq(&new.dynamic_state[..]),
                    passkeys::transports.eq(new.transports),
                ))
                .on_conflict(passkeys::credential_id)
                .do_nothing()
                .returning(Passkey::as_returning())
                .get_result(c)
                .await
                .optional()?;
            let Some(passkey) = inserted else {
                return Ok(Err(ApiError::Conflict("this passkey is already registered".into())));
            };
            let entry = entry(user, "auth.passkey_added", request_id.as_ref());
            crate::login::record_in_every_tenant_of(c, user, entry).await?;
            Ok::<_, ApiError>(Ok(passkey))
        })
        .await??;
    tracing::info!(user.id = %user, passkey.id = %passkey.id, "passkey registered");
    Ok(HttpResponse::Created().json(passkey))
}

/// `user`'s passkeys as listed (names and dates; never a key), for the
/// personal export.
pub(crate) async fn records_of(conn: &mut AsyncPgConnection, user: UserId) -> diesel::QueryResult<Vec<Passkey>> {
    passkeys::table
        .filter(passkeys::user_id.eq(user.0))
        .order(passkeys::id.asc())
        .select(Passkey::as_select())
        .load(conn)
        .await
}

#[utoipa::path(
    operation_id = "list_passkeys",
    tag = "accounts",
    summary = "The caller's passkeys",
    security(("session" = [])),
    responses((status = 200, body = PasskeyList)),
)]
#[get("/v1/me/passkeys")]
async fn list(db: web::Data<Db>, who: Authenticated) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id.0;
    let data = db.platform(async |c| Ok::<_, ApiError>(records_of(c, UserId(user)).await?)).await?;
    Ok(HttpResponse::Ok().json(PasskeyList { data }))
}

#[utoipa::path(
    operation_id = "rename_passkey",
    tag = "accounts",
    summary = "Renames one of the caller's passkeys",
    params(("id" = uuid::Uuid, Path, description = "The passkey.")),
    security(("session" = [])),
    request_body = RenameBody,
    responses((status = 200, body = Passkey), NotFound),
)]
#[patch("/v1/me/passkeys/{id}")]
async fn rename(
    db: web::Data<Db>,
    who: Authenticated,
    path: web::Path<String>,
    body: Json<RenameBody>,
) -> Result<HttpResponse, ApiError> {
    let id = passkey_id(&path)?;
    let name = check_name(&body.0.name)?;
    let user = who.0.user_id.0;
    let passkey = db
        .platform(async |c| {
            Ok::<_, ApiError>(
                diesel::update(passkeys::table.filter(passkeys::id.eq(id)).filter(passkeys::user_id.eq(user)))
                    .set(passkeys::name.eq(&name))
                    .returning(Passkey::as_returning())
                    .get_result(c)
                    .await
                    .optional()?,
            )
        })
        .await?
        .ok_or(ApiError::NotFound("passkey"))?;
    Ok(HttpResponse::Ok().json(passkey))
}

#[utoipa::path(
    operation_id = "remove_passkey",
    tag = "accounts",
    summary = "Removes one of the caller's passkeys: it no longer signs in",
    params(("id" = uuid::Uuid, Path, description = "The passkey.")),
    security(("session" = [])),
    responses((status = 204, description = "Removed."), NotFound),
)]
#[delete("/v1/me/passkeys/{id}")]
async fn remove(
    req: HttpRequest,
    db: web::Data<Db>,
    who: Authenticated,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = passkey_id(&path)?;
    let user = who.0.user_id.0;
    let request_id = req.extensions().get::<RequestId>().cloned();
    db.platform(async |c| {
        let removed = diesel::delete(passkeys::table.filter(passkeys::id.eq(id)).filter(passkeys::user_id.eq(user)))
            .execute(c)
            .await?;
        if removed == 0 {
            return Err(ApiError::NotFound("passkey"));
        }
        let entry = entry(user, "auth.passkey_removed", request_id.as_ref());
        crate::login::record_in_every_tenant_of(c, user, entry).await?;
        Ok(())
    })
    .await?;
    tracing::info!(user.id = %user, passkey.id = %id, "passkey removed");
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    operation_id = "passkey_sign_in_options",
    tag = "accounts",
    summary = "Starts signing in with a passkey: the options for navigator.credentials.get",
    responses((status = 200, body = CeremonyOptions), RateLimited),
)]
#[post("/v1/auth/passkey/options")]
async fn sign_in_options(req: HttpRequest, db: web::Data<Db>) -> Result<HttpResponse, ApiError> {
    let limits = registered::<RateLimits>(&req)?;
    let cfg = config(req.app_data::<web::Data<IdentityConfig>>().cloned());
    count(&limits.login_per_ip, &cfg.client_key(&req)).await?;
    let started = ceremony::start_sign_in(&*site(&req)?)?;
    store(&db, "sign_in", None, &started).await?;
    Ok(HttpResponse::Ok().json(CeremonyOptions { options: started.options }))
}

#[utoipa::path(
    operation_id = "passkey_sign_in",
    tag = "accounts",
    summary = "Signs in with a passkey alone: the browser's answer to the options",
    request_body = SignInBody,
    responses(
        (status = 200, body = LoggedIn),
        (status = 400, description = "Error: invalid_request (not an authentication response).", body = ErrorEnvelope),
        (status = 401, description = "Error: invalid_credentials (an unknown or removed passkey, a used or expired \
                                     ceremony, a signature that does not verify, all alike).", body = ErrorEnvelope),
        (status = 403, description = "Error: sso_required (the address's organization requires single sign-on).", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/auth/passkey")]
async fn sign_in(req: HttpRequest, db: web::Data<Db>, body: Json<SignInBody>) -> Result<HttpResponse, ApiError> {
    let limits = registered::<RateLimits>(&req)?;
    let cfg = config(req.app_data::<web::Data<IdentityConfig>>().cloned());
    let address = cfg.client_ip(&req);
    count(&limits.login_per_ip, &ratelimit::client_key(&address)).await?;
    let answer = SignIn::parse(&json_bytes(&body.0.credential)?)?;
    let challenge = answer.challenge()?;
    let site = site(&req)?;
    let access = registered::<std::sync::Arc<plinth_access::Access>>(&req)?;
    let device = sessions::Device::of(&req, &cfg);
    let request_id = req.extensions().get::<RequestId>().cloned();
    // The passkey is checked and its counters kept in one transaction,
    // which stays open only for that; the session opens after the
    // single sign-on rule is asked.
    let checked = db
        .platform(async |c| {
            let Some(state) = take(c, "sign_in", None, &challenge).await? else {
                return Ok(Err("no such ceremony"));
            };
            let Some(found) = find(c, &answer.credential_id(), None).await? else {
                return Ok(Err("unknown passkey"));
            };
            match answer.verify(&site, &state, &found.stored, &found.handle) {
                Ok(dynamic_state) => used(c, found.id, dynamic_state).await?,
                Err(Refused::Failed(_)) => return Ok(Err("does not verify")),
                Err(err) => return Err(ApiError::from(err)),
            }
            let user: (uuid::Uuid, String, Option<DateTime<Utc>>) = users::table
                .find(found.user)
                .select((users::id, users::email, users::email_verified_at))
                .first(c)
                .await?;
            Ok::<_, ApiError>(Ok(user))
        })
        .await?;
    let (user, email, email_verified_at) = match checked {
        Ok(user) => user,
        Err(reason) => {
            tracing::info!(reason, "passkey sign-in failed");
            return Err(ApiError::InvalidCredentials);
        }
    };
    // An address whose organization requires single sign-on signs in
    // there: a passkey does not go around it any more than a password.
    if let Ok(parsed) = EmailAddress::parse(&email)
        && let Some(tenant) = crate::sso::required_for(&db, &access, &parsed).await?
    {
        tracing::info!(tenant.slug = %tenant, user.id = %user, "passkey sign-in refused: single sign-on required");
        return Err(ApiError::SsoRequired { tenant });
    }
    let mut entry = entry(user, "auth.passkey_login", request_id.as_ref());
    entry.ip = Some(address);
    let (token, session) = db
        .platform(async |c| {
            let created = sessions::create_session(c, UserId(user), cfg.session_ttl, &device).await?;
            crate::login::record_in_every_tenant_of(c, user, entry).await?;
            Ok::<_, IdentityError>(created)
        })
        .await?;
    tracing::info!(user.id = %user, "signed in with a passkey");
    Ok(HttpResponse::Ok().json(LoggedIn {
        token,
        expires_at: session.expires_at,
        user: User { id: user, email, email_verified_at },
    }))
}

/// After the right password, for an account with two-factor sign-in on:
/// the options of a ceremony one of its passkeys can answer, or `None`
/// when it has none.
pub(crate) async fn second_factor_options(
    db: &Db,
    req: &HttpRequest,
    user: uuid::Uuid,
) -> Result<Option<serde_json::Value>, ApiError> {
    let existing = db.platform(async |c| Ok::<_, ApiError>(descriptors(c, user).await?)).await?;
    if existing.is_empty() {
        return Ok(None);
    }
    let started = ceremony::start_second_factor(&*site(req)?, &existing)?;
    store(db, "second_factor", Some(user), &started).await?;
    Ok(Some(started.options))
}

/// A passkey's answer as the second factor of `user` (whose row the caller
/// has locked): whether it verifies. The ceremony is used up either way.
pub(crate) async fn accept_second_factor(
    conn: &mut AsyncPgConnection,
    site: &Site,
    user: uuid::Uuid,
    credential: &serde_json::Value,
) -> Result<bool, IdentityError> {
    let bytes = serde_json::to_vec(credential).map_err(|e| IdentityError::Internal(e.into()))?;
    let Ok(answer) = SecondFactor::parse(&bytes) else { return Ok(false) };
    let Ok(challenge) = answer.challenge() else { return Ok(false) };
    let Some(state) = take(conn, "second_factor", Some(user), &challenge).await? else { return Ok(false) };
    let Some(found) = find(conn, &answer.credential_id(), Some(user)).await? else { return Ok(false) };
    match answer.verify(site, &state, &found.stored, &found.handle) {
        Ok(dynamic_state) => {
            used(conn, found.id, dynamic_state).await?;
            Ok(true)
        }
        Err(Refused::Failed(why)) => {
            tracing::info!(user.id = %user, reason = why, "passkey as second factor refused");
            Ok(false)
        }
        Err(err) => Err(IdentityError::Internal(err.into())),
    }
}

//! `POST /v1/auth/login`: a session for the right email and password; the
//! same 401 `invalid_credentials`, in the same time, for a wrong password, an
//! unknown address, a malformed address and an over-long password: each
//! runs one argon2id verification and records one failure.
//!
//! Failed-login limits are reserved before the password is checked and
//! given back on success ([`FailureBudget`]), so concurrent guesses cannot
//! all pass the check. An account over its limit from everywhere refuses
//! addresses that have failed on it, but still checks a guess from an
//! address with no failures: the owner, from their own address, gets in
//! with the right password (and second factor); a wrong guess from there
//! answers 429 as well.

use actix_web::{HttpMessage, HttpRequest, HttpResponse, post, web};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Nullable, Text, Uuid as SqlUuid};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::grants;
use plinth_http::ApiError;
use plinth_http::openapi::{ErrorEnvelope, RateLimited};
use plinth_http::ratelimit::{self, Refused};
use plinth_http::request::{Json, RequestId};
use plinth_mail::EmailAddress;
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::crypto::Keyring;
use plinth_tenants::{Db, TenantId, UserId, registry};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{IdentityConfig, config};
use crate::error::IdentityError;
use crate::limits::{RateLimits, count};
use crate::password::Hashing;
use crate::schema::users;
use crate::sessions::{self, SessionInfo};
use crate::users::User;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    /// Any text: a malformed address is refused like a wrong password.
    email: String,
    #[schema(schema_with = crate::openapi::password)]
    password: String,
    /// With two-factor sign-in on: a current code or a recovery code.
    #[schema(nullable = false)]
    totp_code: Option<String>,
    /// With two-factor sign-in on, instead of `totp_code`: a passkey's
    /// answer (`PublicKeyCredential.toJSON()` after
    /// `navigator.credentials.get`) to the `passkey` options of the
    /// `totp_required` error.
    #[schema(value_type = Object, nullable = false, required = false)]
    #[serde(default, deserialize_with = "plinth_http::request::not_null")]
    passkey: Option<serde_json::Value>,
}

/// A session.
#[derive(Serialize, ToSchema)]
pub(crate) struct LoggedIn {
    /// The session token: `Authorization: Bearer <token>`.
    pub(crate) token: String,
    pub(crate) expires_at: DateTime<Utc>,
    pub(crate) user: User,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = users)]
struct Credentials {
    id: uuid::Uuid,
    email: String,
    password_hash: String,
    email_verified_at: Option<DateTime<Utc>>,
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(login);
}

#[utoipa::path(
    tag = "accounts",
    summary = "Signs in with email and password (and a one-time code when two-factor sign-in is on)",
    request_body = LoginBody,
    responses(
        (status = 200, body = LoggedIn),
        (status = 401, description = "Error: invalid_credentials (a wrong address, password, code or passkey, all alike), \
                                     totp_required (the right password; now the one-time code, or a passkey's answer \
                                     to the error's `passkey` options when the account has passkeys).", body = ErrorEnvelope),
        (status = 403, description = "Error: sso_required (the address's organization requires single sign-on: `sso_start` is where it begins).", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[post("/v1/auth/login")]
async fn login(req: HttpRequest, body: Json<LoginBody>) -> Result<HttpResponse, ApiError> {
    let LoginBody { email, password, totp_code, passkey } = body.0;
    let factor = match (&totp_code, &passkey) {
        (_, Some(passkey)) => SecondFactor::Passkey(passkey),
        (Some(code), None) => SecondFactor::Code(code),
        (None, None) => SecondFactor::None,
    };
    let (token, session, user) = sign_in(&req, &email, &password, factor, Audience::Everyone).await?;
    Ok(HttpResponse::Ok().json(LoggedIn { token, expires_at: session.expires_at, user }))
}

/// What a sign-in brings besides the password.
#[derive(Debug, Clone, Copy)]
pub enum SecondFactor<'a> {
    None,
    /// A TOTP code or a recovery code.
    Code(&'a str),
    /// A passkey's answer to the options `totp_required` carried.
    Passkey(&'a serde_json::Value),
}

impl<'a> SecondFactor<'a> {
    /// A code, or nothing.
    pub fn code(code: Option<&'a str>) -> Self {
        code.map_or(Self::None, Self::Code)
    }
}

/// Who may sign in through a door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Any account (`POST /v1/auth/login`).
    Everyone,
    /// Platform admins only (the operator console): anyone else is refused
    /// exactly like a wrong password, and counted as a failure. The session
    /// lasts at most [`CONSOLE_SESSION_TTL`].
    PlatformAdmins,
}

/// How long a console session lasts at most: a working day, not the API's
/// two weeks.
pub const CONSOLE_SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Signs in with an address, a password and (when the account has one) a
/// second factor, under the failed-login limits: the session's token, the
/// session and the user. What the request needs (the pool, the keyring,
/// the limits, the hashing slots) is the app's registered data.
pub async fn sign_in(
    req: &HttpRequest,
    email: &str,
    password: &str,
    factor: SecondFactor<'_>,
    audience: Audience,
) -> Result<(String, SessionInfo, User), ApiError> {
    let db = registered::<Db>(req)?;
    let ring = registered::<Keyring>(req)?;
    let limits = registered::<RateLimits>(req)?;
    let hashing = registered::<Hashing>(req)?;
    let cfg = config(req.app_data::<web::Data<IdentityConfig>>().cloned());
    let address = cfg.client_ip(req);
    let request_id = req.extensions().get::<RequestId>().cloned();
    let site = crate::passkeys::site(req)?;
    let email = EmailAddress::parse(email).ok();
    // An address whose organization requires single sign-on signs in
    // there, never with a password. Decided by the domain alone, before
    // any account is looked up: it tells nothing about the account.
    if let (Audience::Everyone, Some(address)) = (audience, &email) {
        let access = registered::<std::sync::Arc<plinth_access::Access>>(req)?;
        if let Some(tenant) = crate::sso::required_for(&db, &access, address).await? {
            tracing::info!(tenant.slug = %tenant, "password sign-in refused: single sign-on required");
            return Err(ApiError::SsoRequired { tenant });
        }
    }
    let budget = FailureBudget::reserve(&limits, email.as_ref(), &address).await?;
    let found = budget.keep(credentials(&db, email.as_ref()).await).await?;
    let stored = found.as_ref().map(|f| f.password_hash.clone());
    let failure = Failure { db: &db, ip: &address, request_id: request_id.as_ref() };
    let mut right = budget.keep(hashing.verify(password, stored).await).await?;
    if let (true, Audience::PlatformAdmins, Some(user)) = (right, audience, &found) {
        let id = UserId(user.id);
        right =
            budget.keep(db.platform(async |c| Ok::<_, IdentityError>(grants::is_admin(c, id).await?)).await).await?;
    }
    if !right {
        tracing::info!("login failed");
        return Err(budget.spent(failure, found.map(|f| f.id)).await);
    }
    let user = found.ok_or(ApiError::InvalidCredentials)?;
    let action = if audience == Audience::PlatformAdmins { "auth.console_login" } else { "auth.login" };
    let entry = Entry::new(Actor::User(user.id), action).target("user", user.id);
    let mut entry = match &request_id {
        Some(id) => id.stamp(entry),
        None => entry,
    };
    entry.ip = Some(address.clone());
    let ttl = match audience {
        Audience::Everyone => cfg.session_ttl,
        Audience::PlatformAdmins => cfg.session_ttl.min(CONSOLE_SESSION_TTL),
    };
    let device = sessions::Device::of(req, &cfg);
    let session = match open_session(&db, (&ring, &site), user.id, factor, (ttl, &device), entry).await {
        // The password was right: not a failure, but no session yet. When
        // the account has passkeys, one of them may answer instead.
        Err(IdentityError::TotpRequired) => {
            let passkey = match audience {
                Audience::Everyone => crate::passkeys::second_factor_options(&db, req, user.id).await,
                Audience::PlatformAdmins => Ok(None),
            };
            return Err(budget
                .give_back(match passkey {
                    Ok(passkey) => ApiError::TotpRequired { passkey: passkey.map(Box::new) },
                    Err(err) => err,
                })
                .await);
        }
        other => budget.keep(other).await?,
    };
    let Some((token, session)) = session else {
        tracing::info!("login failed: wrong second factor");
        return Err(budget.spent(failure, Some(user.id)).await);
    };
    budget.give_back(()).await;
    tracing::info!(user.id = %user.id, "logged in");
    Ok((token, session, User { id: user.id, email: user.email, email_verified_at: user.email_verified_at }))
}

pub(crate) fn registered<T: 'static>(req: &HttpRequest) -> Result<web::Data<T>, ApiError> {
    req.app_data::<web::Data<T>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("{} is not registered", std::any::type_name::<T>())))
}

/// The failed-login limits one attempt has reserved: per client address,
/// per account and address, and per account.
struct FailureBudget<'a> {
    limits: &'a RateLimits,
    account: String,
    account_ip: String,
    /// `Some(wait)`: the account is over its limit and this fresh address was
    /// let through to be checked; a failure answers 429 with `wait`.
    account_full: Option<std::time::Duration>,
}

impl<'a> FailureBudget<'a> {
    async fn reserve(limits: &'a RateLimits, email: Option<&EmailAddress>, address: &str) -> Result<Self, ApiError> {
        let client = ratelimit::client_key(address);
        count(&limits.login_per_ip, &client).await?;
        // A malformed address has no account; its attempts share one key.
        let account = email.map_or("(malformed)", EmailAddress::as_str).to_owned();
        let account_ip = format!("{account} {client}");
        let fresh_address = limits.login_failures_per_account_ip.reserve(&account_ip).await?;
        let account_full = match limits.login_failures_per_account.reserve(&account).await {
            Ok(_) => None,
            Err(Refused::Limited(wait)) if fresh_address => Some(wait),
            Err(refused) => {
                // Refused unchecked: this address has failed on a locked
                // account (or the count could not be made).
                let _ = limits.login_failures_per_account_ip.refund(&account_ip).await;
                return Err(refused.into());
            }
        };
        Ok(Self { limits, account, account_ip, account_full })
    }

    /// Not a failed guess (success, or something broke): the reservations
    /// go back. A refund that cannot be written leaves one failure counted
    /// too many; the answer stays what it was.
    async fn give_back<T>(&self, value: T) -> T {
        if let Err(err) = self.limits.login_failures_per_account_ip.refund(&self.account_ip).await {
            tracing::warn!(error = format!("{:#}", anyhow::Error::new(err)), "giving back a login reservation failed");
        }
        if self.account_full.is_none()
            && let Err(err) = self.limits.login_failures_per_account.refund(&self.account).await
        {
            tracing::warn!(error = format!("{:#}", anyhow::Error::new(err)), "giving back a login reservation failed");
        }
        value
    }

    /// `result`, giving the reservations back if it is an error.
    async fn keep<T>(&self, result: Result<T, IdentityError>) -> Result<T, ApiError> {
        match result {
            Ok(value) => Ok(value),
            Err(err) => Err(self.give_back(err.into()).await),
        }
    }

    /// A failed guess: the reservations stay spent, the failure is recorded,
    /// and the answer is 401 (or 429 when the account is over its limit).
    async fn spent(self, failure: Failure<'_>, user: Option<uuid::Uuid>) -> ApiError {
        if let Err(err) = failure.record(user).await {
            return err.into();
        }
        match self.account_full {
            Some(wait) => ratelimit::limited(wait),
            None => ApiError::InvalidCredentials,
        }
    }
}

/// The account's credentials, if `email` is well formed and has one.
async fn credentials(db: &Db, email: Option<&EmailAddress>) -> Result<Option<Credentials>, IdentityError> {
    let Some(email) = email else { return Ok(None) };
    db.platform(async |c| {
        let found = users::table
            .filter(users::email.eq(email.as_str()))
            .select(Credentials::as_select())
            .first(c)
            .await
            .optional()?;
        Ok::<_, IdentityError>(found)
    })
    .await
}

/// After the password: checks the second factor if the account has one
/// (`Ok(None)`: a wrong code or passkey), then creates the session and
/// records `entry` in every tenant of the user, in one transaction.
async fn open_session(
    db: &Db,
    (ring, site): (&Keyring, &crate::passkeys::ceremony::Site),
    user: uuid::Uuid,
    factor: SecondFactor<'_>,
    (ttl, device): (std::time::Duration, &sessions::Device),
    entry: Entry,
) -> Result<Option<(String, SessionInfo)>, IdentityError> {
    db.platform(async |c| {
        // The row is locked so a second factor is used up exactly once.
        let state = crate::totp::state(c, user, true).await?;
        if state.totp_secret.is_some() {
            let accepted = match factor {
                SecondFactor::None => return Err(IdentityError::TotpRequired),
                SecondFactor::Code(code) => crate::totp::accept_second_factor(c, ring, user, &state, code).await?,
                SecondFactor::Passkey(answer) => crate::passkeys::accept_second_factor(c, site, user, answer).await?,
            };
            if !accepted {
                return Ok(None);
            }
        }
        let created = sessions::create_session(c, UserId(user), ttl, device).await?;
        record_in_every_tenant_of(c, user, entry).await?;
        Ok(Some(created))
    })
    .await
}

/// Where a failed login is recorded.
struct Failure<'a> {
    db: &'a Db,
    ip: &'a str,
    request_id: Option<&'a RequestId>,
}

impl Failure<'_> {
    /// Records one failed login, once (not in each organization's audit
    /// log), for 90 days. One insert on every path, with or without an
    /// account, so recording it takes the same time either way.
    async fn record(&self, user: Option<uuid::Uuid>) -> Result<(), IdentityError> {
        self.db
            .statement(async |c| {
                diesel::sql_query(
                    // Raw SQL: a writable CTE. Records kept 90 days; each insert
                    // removes up to ten older ones, so the table stays bounded.
                    "WITH pruned AS (DELETE FROM public.login_failures WHERE id IN \
                       (SELECT id FROM public.login_failures WHERE at < now() - interval '90 days' ORDER BY at LIMIT 10)) \
                     INSERT INTO public.login_failures (id, user_id, ip, request_id) VALUES ($1, $2, $3, $4)",
                )
                .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
                .bind::<Nullable<SqlUuid>, _>(user)
                .bind::<Text, _>(self.ip)
                .bind::<Nullable<Text>, _>(self.request_id.map(|r| r.0.as_str()))
                .execute(c)
                .await?;
                Ok::<_, IdentityError>(())
            })
            .await
    }
}

/// Records `entry` in the audit log of every tenant `user` belongs to.
pub(crate) async fn record_in_every_tenant_of(
    conn: &mut AsyncPgConnection,
    user: uuid::Uuid,
    entry: Entry,
) -> diesel::QueryResult<()> {
    let tenants: Vec<TenantId> = crate::members::of_user(conn, UserId(user)).await?.into_iter().map(|m| m.0).collect();
    for tenant in registry::find_live_by_ids(conn, &tenants).await? {
        audit::record_as_system(conn, tenant.scope(), entry.clone()).await?;
    }
    Ok(())
}

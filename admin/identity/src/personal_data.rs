//! A user's own data: a copy of everything Plinth holds about them
//! (`POST /v1/me/export`, a mailed link to a JSON archive) and erasing the
//! account (`DELETE /v1/me`).
//!
//! Erasing deletes the account row and what hangs on it (sessions,
//! memberships, tokens, second factor, exports, failed logins), pending
//! invitations and mail to the address. Audit logs are append-only and are
//! not rewritten: their entries name people by user id, and the row that
//! tied that id to a person is what goes. `public.erased_users` records the
//! erasure (the old id, a random pseudonym, the SHA-256 of the old address);
//! [`pseudonymise`] applies it to entries as they are read: the id becomes
//! the pseudonym, the entry's address and the old email address in its
//! details are left out. `docs/identity.md` explains what this does and
//! does not remove.

use actix_web::http::header;
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, delete, get, post, web};
use chrono::{DateTime, Utc};
use diesel::{BoolExpressionMethods as _, ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_http::ApiError;
use plinth_http::openapi::{ErrorEnvelope, NotFound, RateLimited};
use plinth_http::request::{Json, RequestId};
use plinth_jobs::{ClaimedJob, JobError, NewJob};
use plinth_mail::{self as mail, EmailAddress};
use plinth_tenants::audit::{self, Actor, Entry, Stored};
use plinth_tenants::{Db, TenantId, UserId, registry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use utoipa::{IntoParams, ToSchema};

use crate::error::IdentityError;
use crate::limits::{RateLimits, count};
use crate::members::MembersChanged;
use crate::schema::{erased_users, memberships, personal_exports, sessions, users};
use crate::sessions::Authenticated;

/// The job that empties an export's archive when its link expires.
pub const EXPIRE_JOB: &str = "identity.personal_export_expired";
/// How long the mailed link works.
pub const LINK_HOURS: i64 = 24;
/// The most audit entries one organization contributes to an export.
const MAX_ENTRIES_PER_TENANT: i64 = 10_000;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(request_export).service(download).service(erase);
}

/// The export written; its link goes out by mail.
#[derive(Serialize, ToSchema)]
struct ExportRequested {
    /// The export, as the mailed link names it.
    id: uuid::Uuid,
}

/// `POST /v1/me/export`: writes the caller's archive and mails them a link
/// that works for [`LINK_HOURS`] hours.
#[utoipa::path(
    tag = "accounts",
    summary = "Mails the caller a link to a JSON archive of everything Plinth holds about them",
    security(("session" = [])),
    responses((status = 202, body = ExportRequested), RateLimited),
)]
#[post("/v1/me/export")]
async fn request_export(
    db: web::Data<Db>,
    limits: web::Data<RateLimits>,
    who: Authenticated,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id;
    // The same limit as new organizations: a few an hour.
    count(&limits.organizations_per_user, &format!("export:{}", user.0)).await?;
    let archive = archive(&db, user).await?;
    let (token, hash) = crate::sessions::new_token().map_err(IdentityError::from)?;
    let id = uuid::Uuid::now_v7();
    let expires_at = Utc::now() + chrono::Duration::hours(LINK_HOURS);
    db.platform(async |c| {
        let email: String = users::table.find(user.0).select(users::email).first(c).await?;
        diesel::insert_into(personal_exports::table)
            .values((
                personal_exports::id.eq(id),
                personal_exports::user_id.eq(user.0),
                personal_exports::token_hash.eq(&hash[..]),
                personal_exports::archive.eq(&archive),
                personal_exports::expires_at.eq(expires_at),
            ))
            .execute(c)
            .await?;
        let mut expire = NewJob::new(EXPIRE_JOB, json!({ "export_id": id }));
        expire.run_at = Some(expires_at);
        plinth_jobs::enqueue(c, expire).await?;
        let to = EmailAddress::parse(&email).map_err(|e| ApiError::Internal(anyhow::anyhow!("stored address: {e}")))?;
        mail::queue(c, crate::mail::personal_export(to, id, &token, LINK_HOURS)).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    tracing::info!(export.id = %id, "personal export written");
    Ok(HttpResponse::Accepted().json(ExportRequested { id }))
}

/// The account as the archive shows it.
#[derive(Serialize, diesel::Queryable)]
struct AccountRecord {
    id: uuid::Uuid,
    email: String,
    email_verified_at: Option<DateTime<Utc>>,
    totp_enabled: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// An API key the user made, as the archive shows it (never its secret).
#[derive(Serialize, diesel::Queryable)]
struct KeyRecord {
    id: uuid::Uuid,
    tenant_id: uuid::Uuid,
    name: String,
    prefix: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

/// A session as the archive shows it.
#[derive(Serialize, diesel::Queryable)]
struct SessionRecord {
    id: uuid::Uuid,
    user_agent: Option<String>,
    ip: Option<String>,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

/// Everything Plinth holds about `user`, as JSON: the account, its
/// memberships, its sessions, its failed sign-ins, the API keys it made,
/// what organizations' directories (SCIM) hold about it, and the audit
/// entries about it in each organization it belongs to.
async fn archive(db: &Db, user: UserId) -> Result<serde_json::Value, ApiError> {
    let (account, member_of, sessions, failures, keys, directories, passkeys) = db
        .platform(async |c| {
            let account: AccountRecord = users::table
                .find(user.0)
                .select((
                    users::id,
                    users::email,
                    users::email_verified_at,
                    users::totp_secret.is_not_null(),
                    users::created_at,
                    users::updated_at,
                ))
                .first(c)
                .await?;
            let roles: Vec<(uuid::Uuid, String, DateTime<Utc>)> = memberships::table
                .filter(memberships::user_id.eq(user.0))
                .select((memberships::tenant_id, memberships::role, memberships::created_at))
                .load(c)
                .await?;
            let ids: Vec<TenantId> = roles.iter().map(|r| TenantId(r.0)).collect();
            let tenants = registry::find_live_by_ids(c, &ids).await?;
            let sessions: Vec<SessionRecord> = sessions::table
                .filter(sessions::user_id.eq(user.0))
                .filter(sessions::impersonator_id.is_null())
                .order(sessions::id.asc())
                .select((
                    sessions::id,
                    sessions::user_agent,
                    sessions::ip,
                    sessions::created_at,
                    sessions::last_used_at,
                    sessions::expires_at,
                    sessions::revoked_at,
                ))
                .load(c)
                .await?;
            let failures: Vec<(String, DateTime<Utc>)> = crate::schema::login_failures::table
                .filter(crate::schema::login_failures::user_id.eq(user.0))
                .order(crate::schema::login_failures::at.asc())
                .select((crate::schema::login_failures::ip, crate::schema::login_failures::at))
                .load(c)
                .await?;
            let keys: Vec<KeyRecord> = crate::schema::api_keys::table
                .filter(crate::schema::api_keys::created_by.eq(user.0))
                .select((
                    crate::schema::api_keys::id,
                    crate::schema::api_keys::tenant_id,
                    crate::schema::api_keys::name,
                    crate::schema::api_keys::prefix,
                    crate::schema::api_keys::created_at,
                    crate::schema::api_keys::revoked_at,
                ))
                .load(c)
                .await?;
            let member_of: Vec<_> = tenants
                .into_iter()
                .filter_map(|t| roles.iter().find(|r| r.0 == t.id.0).map(|r| (t, r.1.clone(), r.2)))
                .collect();
            let directories = crate::scim::admin::records_of(c, user).await?;
            let passkeys = crate::passkeys::records_of(c, user).await?;
            Ok::<_, ApiError>((account, member_of, sessions, failures, keys, directories, passkeys))
        })
        .await?;
    let mut memberships = Vec::new();
    for (tenant, role, joined_at) in member_of {
        let mut entries = db
            .tenant(tenant.scope(), async |c| Ok::<_, ApiError>(audit::about(c, user.0, MAX_ENTRIES_PER_TENANT).await?))
            .await?;
        pseudonymise(db, &mut entries).await?;
        memberships.push(json!({
            "tenant": { "id": tenant.id, "slug": tenant.slug, "name": tenant.name },
            "role": role,
            "joined_at": joined_at,
            "audit_entries": entries,
        }));
    }
    Ok(json!({
        "format": "plinth.personal_export.v1",
        "exported_at": Utc::now(),
        "account": account,
        "memberships": memberships,
        "sessions": sessions,
        "failed_sign_ins": failures.into_iter().map(|(ip, at)| json!({ "ip": ip, "at": at })).collect::<Vec<_>>(),
        "api_keys_created": keys,
        "directory_records": directories,
        "passkeys": passkeys,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DownloadQuery {
    /// The token from the mailed link.
    token: String,
}

/// `GET /v1/me/exports/{id}/archive?token=…`: the mailed link.
#[utoipa::path(
    tag = "accounts",
    summary = "Downloads the caller's own export (the mailed link)",
    params(("id" = uuid::Uuid, Path, description = "The export."), DownloadQuery),
    responses(
        (status = 200, description = "The archive (JSON).", content_type = "application/json"),
        (status = 410, description = "Error: link_expired.", body = ErrorEnvelope),
        NotFound,
    ),
)]
#[get("/v1/me/exports/{id}/archive")]
async fn download(
    db: web::Data<Db>,
    path: web::Path<String>,
    query: web::Query<DownloadQuery>,
) -> Result<HttpResponse, ApiError> {
    let id: uuid::Uuid = path.parse().map_err(|_| ApiError::NotFound("export"))?;
    let given = crate::sessions::hash_token(&query.token);
    type Row = (Vec<u8>, Option<serde_json::Value>, DateTime<Utc>);
    let row: Option<Row> = db
        .statement(async |c| {
            Ok::<_, ApiError>(
                personal_exports::table
                    .find(id)
                    .select((personal_exports::token_hash, personal_exports::archive, personal_exports::expires_at))
                    .first(c)
                    .await
                    .optional()?,
            )
        })
        .await?;
    let Some((hash, archive, expires_at)) = row else { return Err(ApiError::NotFound("export")) };
    if !bool::from(hash.as_slice().ct_eq(&given[..])) {
        return Err(ApiError::NotFound("export"));
    }
    let Some(archive) = archive.filter(|_| expires_at > Utc::now()) else { return Err(ApiError::LinkExpired) };
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((header::CONTENT_DISPOSITION, format!("attachment; filename=\"plinth-{}.json\"", id.simple())))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(archive))
}

/// Empties an export's archive when its link expires.
pub fn expire_handler(db: Db) -> plinth_jobs::Handler {
    std::sync::Arc::new(move |job: ClaimedJob| {
        let db = db.clone();
        Box::pin(async move {
            let id = job
                .payload
                .get("export_id")
                .and_then(|v| v.as_str())
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(|| JobError::Fatal(anyhow::anyhow!("the job has no export_id")))?;
            db.platform(async |c| {
                diesel::update(personal_exports::table.find(id))
                    .set(personal_exports::archive.eq(None::<serde_json::Value>))
                    .execute(c)
                    .await?;
                Ok::<_, JobError>(())
            })
            .await
        })
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EraseBody {
    /// The account's password, asked again.
    #[schema(schema_with = crate::openapi::password)]
    password: String,
    /// With two-factor sign-in on: a current code or a recovery code.
    #[schema(nullable = false)]
    totp_code: Option<String>,
}

/// `DELETE /v1/me`: erases the caller's account, after asking for the
/// password (and code) again. An owner hands their organizations over first:
/// the last owner of an organization is refused (409), and nothing changes.
#[utoipa::path(
    tag = "accounts",
    summary = "Erases the caller's account: memberships end, personal data goes, audit entries keep a pseudonym",
    security(("session" = [])),
    request_body = EraseBody,
    responses(
        (status = 204, description = "Erased: every session has ended."),
        (status = 401, description = "Error: invalid_credentials, totp_required.", body = ErrorEnvelope),
        (status = 409, description = "Error: conflict (the caller is the last owner of an organization).", body = ErrorEnvelope),
        RateLimited,
    ),
)]
#[delete("/v1/me")]
async fn erase(
    req: HttpRequest,
    db: web::Data<Db>,
    changed: web::Data<dyn MembersChanged>,
    who: Authenticated,
    body: Json<EraseBody>,
) -> Result<HttpResponse, ApiError> {
    let user = who.0.user_id;
    let EraseBody { password, totp_code } = body.0;
    crate::me::reauthenticate(&req, user, &password, totp_code.as_deref()).await?;
    let request_id = req.extensions().get::<RequestId>().cloned();
    let left = db
        .platform(async |c| {
            let email: String = users::table.find(user.0).select(users::email).for_update().first(c).await?;
            let tenants = last_owner_check(c, user).await?;
            let entry = Entry::new(Actor::System, "user.erased").target("user", user.0);
            let entry = match &request_id {
                Some(id) => id.stamp(entry),
                None => entry,
            };
            for tenant in &tenants {
                audit::record_as_system(c, tenant.scope(), entry.clone()).await?;
            }
            diesel::insert_into(erased_users::table)
                .values((
                    erased_users::user_id.eq(user.0),
                    erased_users::pseudonym.eq(uuid::Uuid::new_v4()),
                    erased_users::email_sha256.eq(&email_digest(&email)[..]),
                ))
                .execute(c)
                .await?;
            // Raw SQL: tables other crates declare (mail's outbox) and one
            // statement for pending invitations to the address.
            diesel::sql_query("DELETE FROM public.invitations WHERE email = $1 AND accepted_at IS NULL")
                .bind::<diesel::sql_types::Text, _>(&email)
                .execute(c)
                .await?;
            diesel::sql_query("DELETE FROM public.mail_outbox WHERE recipient = $1")
                .bind::<diesel::sql_types::Text, _>(&email)
                .execute(c)
                .await?;
            // Sessions, memberships, tokens, the second factor, exports and
            // failed sign-ins go with the row (ON DELETE CASCADE); the
            // triggers tell every instance.
            diesel::delete(users::table.find(user.0)).execute(c).await?;
            for tenant in &tenants {
                changed.changed(c, tenant.id).await?;
            }
            Ok::<_, ApiError>(tenants.len())
        })
        .await?;
    tracing::info!(user.id = %user, organizations.left = left, "account erased");
    Ok(HttpResponse::NoContent().finish())
}

/// The organizations `user` belongs to, refusing (409) when they are the
/// last owner of one. Takes the owners' rows of those organizations, so a
/// concurrent change of owners waits.
async fn last_owner_check(conn: &mut AsyncPgConnection, user: UserId) -> Result<Vec<plinth_tenants::Tenant>, ApiError> {
    let mine: Vec<(uuid::Uuid, String)> = memberships::table
        .filter(memberships::user_id.eq(user.0))
        .select((memberships::tenant_id, memberships::role))
        .load(conn)
        .await?;
    let owned: Vec<uuid::Uuid> = mine.iter().filter(|(_, r)| r == "owner").map(|(t, _)| *t).collect();
    let owners: Vec<(uuid::Uuid, uuid::Uuid)> = memberships::table
        .filter(memberships::tenant_id.eq_any(&owned).and(memberships::role.eq("owner")))
        .order((memberships::tenant_id.asc(), memberships::user_id.asc()))
        .select((memberships::tenant_id, memberships::user_id))
        .for_update()
        .load(conn)
        .await?;
    let ids: Vec<TenantId> = mine.iter().map(|(t, _)| TenantId(*t)).collect();
    let tenants = registry::find_live_by_ids(conn, &ids).await?;
    for tenant in &owned {
        if owners.iter().filter(|(t, _)| t == tenant).count() <= 1 {
            let slug = tenants.iter().find(|t| t.id.0 == *tenant).map_or("an organization", |t| t.slug.as_str());
            return Err(ApiError::Conflict(format!(
                "you are the last owner of {slug}: make another member an owner first"
            )));
        }
    }
    Ok(tenants)
}

/// The SHA-256 of a stored (lower-case) address.
fn email_digest(email: &str) -> [u8; 32] {
    Sha256::digest(email.trim().to_lowercase().as_bytes()).into()
}

/// The id audit entries store for `id`: the erased user's old id when `id`
/// is a pseudonym, else `id` itself (so filtering the log by what it shows
/// finds the entries).
pub async fn stored_id(db: &Db, id: uuid::Uuid) -> Result<uuid::Uuid, IdentityError> {
    let old: Option<uuid::Uuid> = db
        .statement(async |c| {
            Ok::<_, IdentityError>(
                erased_users::table
                    .filter(erased_users::pseudonym.eq(id))
                    .select(erased_users::user_id)
                    .first(c)
                    .await
                    .optional()?,
            )
        })
        .await?;
    Ok(old.unwrap_or(id))
}

/// Applies erasures to audit entries as they are read: an erased user's id
/// (as actor or target) becomes their pseudonym, the entry's address is
/// left out when its actor is erased, and an erased address in the details
/// (`email`, as invitations record it) is left out. One platform query,
/// none when no entry names a user or an address.
pub async fn pseudonymise(db: &Db, entries: &mut [Stored]) -> Result<(), IdentityError> {
    let mut ids: Vec<uuid::Uuid> = Vec::new();
    let mut digests: Vec<Vec<u8>> = Vec::new();
    for entry in entries.iter() {
        ids.extend(entry.actor_id);
        if entry.target_type.as_deref() == Some("user")
            && let Some(id) = entry.target_id.as_deref().and_then(|t| uuid::Uuid::parse_str(t).ok())
        {
            ids.push(id);
        }
        if let Some(email) = entry.details.get("email").and_then(|e| e.as_str()) {
            digests.push(email_digest(email).to_vec());
        }
    }
    if ids.is_empty() && digests.is_empty() {
        return Ok(());
    }
    let erased: Vec<(uuid::Uuid, uuid::Uuid, Vec<u8>)> = db
        .statement(async |c| {
            Ok::<_, IdentityError>(
                erased_users::table
                    .filter(erased_users::user_id.eq_any(&ids).or(erased_users::email_sha256.eq_any(&digests)))
                    .select((erased_users::user_id, erased_users::pseudonym, erased_users::email_sha256))
                    .load(c)
                    .await?,
            )
        })
        .await?;
    if erased.is_empty() {
        return Ok(());
    }
    let pseudonym = |id: uuid::Uuid| erased.iter().find(|e| e.0 == id).map(|e| e.1);
    for entry in entries.iter_mut() {
        if let Some(p) = entry.actor_id.and_then(pseudonym) {
            entry.actor_id = Some(p);
            entry.ip = None;
        }
        if entry.target_type.as_deref() == Some("user")
            && let Some(p) = entry.target_id.as_deref().and_then(|t| uuid::Uuid::parse_str(t).ok()).and_then(pseudonym)
        {
            entry.target_id = Some(p.to_string());
        }
        let erased_email = entry
            .details
            .get("email")
            .and_then(|e| e.as_str())
            .map(email_digest)
            .is_some_and(|digest| erased.iter().any(|x| x.2 == digest));
        if erased_email && let Some(details) = entry.details.as_object_mut() {
            details.remove("email");
        }
    }
    Ok(())
}

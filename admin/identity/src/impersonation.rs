//! Impersonation: a platform admin acting as one member, in that member's
//! one tenant, to see what they see.
//!
//! - [`start`] (called by the platform admin route and the console) checks
//!   the member, the reason and the tenant's setting, and opens a session
//!   that lasts [`TTL`] and is never renewed. The session is bound to the
//!   tenant: anywhere else (another tenant, platform routes) it is nobody.
//! - What it may not touch is refused by the access gate (billing, API
//!   keys, settings, managing members) and by [`crate::sessions::Authenticated`]
//!   (the member's second factor, new organizations).
//! - The tenant's audit log has `impersonation.started`, an
//!   `impersonation.write` for every write (written by the gate before the
//!   handler runs), every entry of such a request names the operator
//!   (`details.impersonated_by`), and `impersonation.ended` when it is
//!   signed out, expires (a job queued for the moment it expires) or the
//!   owners forbid impersonation.
//! - `GET|PATCH /v1/tenant/settings`: owners allow or forbid it
//!   (`impersonation_allowed`, allowed by default).

use actix_web::{HttpResponse, get, patch};
use chrono::{DateTime, SubsecRound as _, Utc};
use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_access::{Allowed, requirements};
use plinth_http::openapi::{NotFound, TenantHeader};
use plinth_http::request::Json;
use plinth_http::{ApiError, FieldError};
use plinth_jobs::{ClaimedJob, JobError, NewJob};
use plinth_tenants::audit::{self, Actor, Entry};
use plinth_tenants::{Db, Tenant, TenantId, UserId, registry};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::schema::{memberships, sessions, tenant_identity_settings as settings, users};

/// How long an impersonation session lasts; it is never renewed.
pub const TTL: chrono::Duration = chrono::Duration::minutes(15);

/// The job that records the end of an impersonation session when it
/// expires.
pub const EXPIRED_JOB: &str = "identity.impersonation_expired";

const REASON_MIN: usize = 3;
const REASON_MAX: usize = 500;

requirements! {
    /// GET /v1/tenant/settings: any member reads them.
    ReadSettings = "tenant", Read, feature: none;
    /// PATCH /v1/tenant/settings: owners only.
    ManageSettings = "settings", Manage, feature: none;
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(show_settings).service(change_settings);
}

/// A started impersonation: the session's token (shown once) and when it
/// ends.
#[derive(Debug, Serialize, ToSchema)]
pub struct Started {
    /// `Authorization: Bearer <token>`, valid in the member's one tenant.
    pub token: String,
    pub expires_at: DateTime<Utc>,
    #[serde(skip)]
    pub session_id: uuid::Uuid,
}

/// Starts an impersonation of `user` in `tenant` by `operator`, for
/// `reason`, in the caller's transaction, and records it in the tenant's
/// audit log. 404 when `user` is not a member of the tenant, 403 when its
/// owners forbid impersonation, 400 without a reason.
pub async fn start(
    conn: &mut AsyncPgConnection,
    operator: UserId,
    tenant: &Tenant,
    user: UserId,
    reason: &str,
) -> Result<Started, ApiError> {
    let reason = reason.trim();
    let length = reason.chars().count();
    if !(REASON_MIN..=REASON_MAX).contains(&length) {
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "reason",
            "invalid",
            format!("say why, in {REASON_MIN} to {REASON_MAX} characters"),
        )]));
    }
    if user == operator {
        return Err(ApiError::invalid_fields(vec![FieldError::new(
            "user_id",
            "invalid",
            "an operator cannot impersonate themselves",
        )]));
    }
    let member: Option<String> = memberships::table
        .filter(memberships::tenant_id.eq(tenant.id.0))
        .filter(memberships::user_id.eq(user.0))
        .select(memberships::role)
        .first(conn)
        .await
        .optional()?;
    let Some(role) = member else { return Err(ApiError::NotFound("member")) };
    if !allowed(conn, tenant.id).await? {
        return Err(ApiError::ImpersonationRefused);
    }
    let operator_email: String = users::table.find(operator.0).select(users::email).first(conn).await?;
    // PostgreSQL keeps microseconds: the answer shows what is stored.
    let expires_at = (Utc::now() + TTL).trunc_subsecs(6);
    let (token, session) =
        crate::sessions::create_impersonation_session(conn, user, operator, tenant.id, reason, expires_at).await?;
    let entry = Entry::new(Actor::User(user.0), "impersonation.started").target("user", user).details(json!({
        "impersonated_by": operator.0,
        "operator_email": operator_email,
        "reason": reason,
        "role": role,
        "session_id": session.session_id,
        "expires_at": expires_at,
    }));
    audit::record_as_system(conn, tenant.scope(), entry).await?;
    let job = NewJob {
        tenant: Some(tenant.id),
        dedup_key: Some(session.session_id.to_string()),
        run_at: Some(expires_at),
        ..NewJob::new(EXPIRED_JOB, json!({ "session_id": session.session_id }))
    };
    plinth_jobs::enqueue(conn, job).await?;
    tracing::info!(tenant.id = %tenant.id, user.id = %user, operator.id = %operator, "impersonation started");
    Ok(Started { token, expires_at, session_id: session.session_id })
}

/// Ends the impersonation session `session` (if it is one and has not
/// ended) and records `impersonation.ended` with `why` in its tenant's
/// audit log. False if there was nothing to end.
pub async fn end(conn: &mut AsyncPgConnection, session: uuid::Uuid, why: &str) -> diesel::QueryResult<bool> {
    let ended: Option<(uuid::Uuid, Option<uuid::Uuid>, Option<uuid::Uuid>)> = diesel::update(
        sessions::table
            .filter(sessions::id.eq(session))
            .filter(sessions::revoked_at.is_null())
            .filter(sessions::tenant_id.is_not_null()),
    )
    .set(sessions::revoked_at.eq(diesel::dsl::now))
    .returning((sessions::user_id, sessions::impersonator_id, sessions::tenant_id))
    .get_result(conn)
    .await
    .optional()?;
    let Some((user, operator, Some(tenant))) = ended else { return Ok(false) };
    if let Some(tenant) = registry::find_by_id(conn, TenantId(tenant)).await? {
        let entry = Entry::new(Actor::User(user), "impersonation.ended")
            .target("user", user)
            .details(json!({ "impersonated_by": operator, "session_id": session, "why": why }));
        audit::record_as_system(conn, tenant.scope(), entry).await?;
    }
    Ok(true)
}

/// Ends every live impersonation session in `tenant` (its owners just
/// forbade impersonation).
async fn end_all(conn: &mut AsyncPgConnection, tenant: TenantId, why: &str) -> diesel::QueryResult<usize> {
    let live: Vec<uuid::Uuid> = sessions::table
        .filter(sessions::tenant_id.eq(tenant.0))
        .filter(sessions::revoked_at.is_null())
        .filter(sessions::expires_at.gt(diesel::dsl::now))
        .select(sessions::id)
        .load(conn)
        .await?;
    let mut ended = 0;
    for session in live {
        if end(conn, session, why).await? {
            ended += 1;
        }
    }
    Ok(ended)
}

/// The job queued by [`start`] for the moment the session expires.
pub fn expired_handler(db: Db) -> plinth_jobs::Handler {
    std::sync::Arc::new(move |job: ClaimedJob| {
        let db = db.clone();
        Box::pin(async move {
            let session = job
                .payload
                .get("session_id")
                .and_then(|v| v.as_str())
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(|| JobError::Fatal(anyhow::anyhow!("the job has no session_id")))?;
            db.platform(async |c| Ok::<_, JobError>(end(c, session, "expired").await?)).await?;
            Ok(())
        })
    })
}

/// What `GET /v1/me` shows of an impersonation session.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImpersonationView {
    /// The platform admin acting as the user.
    pub operator_email: String,
    pub reason: String,
    pub expires_at: DateTime<Utc>,
}

/// The impersonation `session` is, if it is one.
pub async fn describe(
    conn: &mut AsyncPgConnection,
    session: uuid::Uuid,
) -> diesel::QueryResult<Option<ImpersonationView>> {
    let row: Option<(Option<uuid::Uuid>, Option<String>, DateTime<Utc>)> = sessions::table
        .find(session)
        .select((sessions::impersonator_id, sessions::reason, sessions::expires_at))
        .first(conn)
        .await
        .optional()?;
    let Some((Some(operator), Some(reason), expires_at)) = row else { return Ok(None) };
    let operator_email: String = users::table.find(operator).select(users::email).first(conn).await?;
    Ok(Some(ImpersonationView { operator_email, reason, expires_at }))
}

/// Whether `tenant`'s owners allow impersonation (the default).
pub async fn allowed(conn: &mut AsyncPgConnection, tenant: TenantId) -> diesel::QueryResult<bool> {
    let set: Option<bool> =
        settings::table.find(tenant.0).select(settings::impersonation_allowed).first(conn).await.optional()?;
    Ok(set.unwrap_or(true))
}

/// A tenant's identity settings.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = TenantSettings)]
pub struct Settings {
    /// Whether platform admins may impersonate members (for support).
    pub impersonation_allowed: bool,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SettingsChange {
    /// Whether platform admins may impersonate members; false ends any
    /// impersonation under way.
    impersonation_allowed: bool,
}

/// `GET /v1/tenant/settings`.
#[utoipa::path(
    operation_id = "show_tenant_settings",
    tag = "tenant",
    summary = "The organization's identity settings",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = Settings), NotFound),
)]
#[get("/v1/tenant/settings")]
async fn show_settings(ctx: Allowed<ReadSettings>) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id;
    let impersonation_allowed = ctx.rows(async |rows| Ok::<_, ApiError>(allowed(rows.conn(), tenant).await?)).await?;
    Ok(HttpResponse::Ok().json(Settings { impersonation_allowed }))
}

/// `PATCH /v1/tenant/settings`: owners only. Forbidding impersonation ends
/// any impersonation under way in the organization at once.
#[utoipa::path(
    operation_id = "change_tenant_settings",
    tag = "tenant",
    summary = "Changes the organization's identity settings (owners)",
    params(TenantHeader),
    security(("session" = []), ("api_key" = [])),
    request_body = SettingsChange,
    responses(
        (status = 200, body = Settings),
        (status = 403, description = "Error: forbidden (not an owner, or impersonating).", body = plinth_http::openapi::ErrorEnvelope),
        NotFound,
    ),
)]
#[patch("/v1/tenant/settings")]
async fn change_settings(ctx: Allowed<ManageSettings>, body: Json<SettingsChange>) -> Result<HttpResponse, ApiError> {
    let tenant = ctx.tenant.id;
    let by = ctx.principal.user_id().map(|u| u.0);
    let value = body.0.impersonation_allowed;
    let entry = ctx.audit_entry("settings.changed").details(json!({ "impersonation_allowed": value }));
    ctx.rows(async |rows| {
        let c = rows.conn();
        diesel::insert_into(settings::table)
            .values((
                settings::tenant_id.eq(tenant.0),
                settings::impersonation_allowed.eq(value),
                settings::updated_by.eq(by),
            ))
            .on_conflict(settings::tenant_id)
            .do_update()
            .set((
                settings::impersonation_allowed.eq(value),
                settings::updated_by.eq(by),
                settings::updated_at.eq(diesel::dsl::now),
            ))
            .execute(c)
            .await?;
        if !value {
            end_all(c, tenant, "forbidden_by_owners").await?;
        }
        audit::record(rows, entry).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(HttpResponse::Ok().json(Settings { impersonation_allowed: value }))
}

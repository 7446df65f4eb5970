//! An organization's own export: an admin on a plan with `data_export` asks
//! (`POST /v1/tenant/exports`); a job writes the organization's archive
//! (the same as `plinth tenants backup`, [`crate::backup`]), keeps it in
//! `public.tenant_exports` (so that any instance serves the download) and
//! mails the admin a link that works for [`LINK_HOURS`] hours:
//! `GET /v1/exports/{id}/archive?token=…`. At the end of that time a second
//! job drops the archive, and the link answers 410 `link_expired`.
//!
//! The archive is held in the database, whole: an organization whose
//! archive is over [`MAX_ARCHIVE_BYTES`] gets a failed export, and the
//! operator's `plinth tenants backup` instead.

use actix_web::http::header;
use actix_web::{HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use plinth_access::{Allowed, requirements};
use plinth_http::ApiError;
use plinth_http::openapi::{NotFound, PlanLimits, TenantHeader};
use plinth_jobs::{ClaimedJob, JobError, NewJob};
use plinth_mail::{EmailAddress, Mail};
use plinth_tenants::audit;
use plinth_tenants::{Db, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq as _;
use utoipa::ToSchema;

/// The job that writes an export.
pub const EXPORT_JOB: &str = "tenants.export";
/// The job that drops an export's archive when its link expires.
pub const EXPIRE_JOB: &str = "tenants.export_expired";
/// How long the mailed link works.
pub const LINK_HOURS: i64 = 24;
/// The largest archive kept for a download.
pub const MAX_ARCHIVE_BYTES: usize = 512 * 1024 * 1024;

/// The mail this module sends.
pub const TEMPLATES: &[plinth_mail::Template] = &[plinth_mail::mail_template!("tenant_export")];

diesel::table! {
    public.tenant_exports (id) {
        id -> Uuid,
        tenant_id -> Uuid,
        requested_by -> Nullable<Uuid>,
        status -> Text,
        token_hash -> Nullable<Bytea>,
        archive -> Nullable<Bytea>,
        bytes -> Nullable<BigInt>,
        sha256 -> Nullable<Text>,
        error -> Nullable<Text>,
        created_at -> Timestamptz,
        ready_at -> Nullable<Timestamptz>,
        expires_at -> Nullable<Timestamptz>,
    }
}

requirements! {
    /// `POST|GET /v1/tenant/exports`: admins, on plans with `data_export`.
    ExportArchive = "export", Manage, feature: "data_export";
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(request_export).service(show_export).service(download);
}

/// An export and where it stands.
#[derive(Debug, Serialize, ToSchema, Queryable, Selectable)]
#[diesel(table_name = tenant_exports)]
pub struct ExportStatus {
    pub id: uuid::Uuid,
    /// `queued` (being written), `ready` (mailed), `failed`, or `expired`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    /// When the mailed link stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// The archive's size.
    pub bytes: Option<i64>,
    /// The archive's SHA-256 (hex).
    pub sha256: Option<String>,
}

/// `POST /v1/tenant/exports`: the archive is written in the background and
/// a link to it mailed to the admin who asked.
#[utoipa::path(
    operation_id = "request_tenant_export",
    tag = "tenant",
    summary = "Asks for the organization's archive, mailed as a link (admins; data_export)",
    params(TenantHeader),
    security(("session" = [])),
    responses(
        (status = 202, body = ExportStatus),
        (status = 403, description = "Error: forbidden (not an admin, or an API key: the link goes to a person).", body = plinth_http::openapi::ErrorEnvelope),
        (status = 409, description = "Error: conflict (an export is already being written).", body = plinth_http::openapi::ErrorEnvelope),
        PlanLimits,
    ),
)]
#[post("/v1/tenant/exports")]
async fn request_export(ctx: Allowed<ExportArchive>) -> Result<HttpResponse, ApiError> {
    let user = ctx.principal.user_id().ok_or(ApiError::Forbidden)?;
    let tenant = ctx.tenant.id;
    let id = uuid::Uuid::now_v7();
    let entry = ctx.audit_entry("tenant.export_requested").target("export", id.to_string());
    let status = ctx
        .rows(async |rows| {
            let c = rows.conn();
            let busy: i64 = tenant_exports::table
                .filter(tenant_exports::tenant_id.eq(tenant.0))
                .filter(tenant_exports::status.eq("queued"))
                .count()
                .get_result(c)
                .await?;
            if busy > 0 {
                return Err(ApiError::Conflict("an export of this organization is already being written".into()));
            }
            let status: ExportStatus = diesel::insert_into(tenant_exports::table)
                .values((
                    tenant_exports::id.eq(id),
                    tenant_exports::tenant_id.eq(tenant.0),
                    tenant_exports::requested_by.eq(user.0),
                    tenant_exports::status.eq("queued"),
                ))
                .returning(ExportStatus::as_returning())
                .get_result(c)
                .await?;
            let mut job = NewJob::new(EXPORT_JOB, json!({ "export_id": id }));
            job.tenant = Some(tenant);
            job.max_attempts = 3;
            plinth_jobs::enqueue(c, job).await?;
            audit::record(rows, entry).await?;
            Ok(status)
        })
        .await?;
    Ok(HttpResponse::Accepted().json(status))
}

/// `GET /v1/tenant/exports/{id}`: where an export of this organization stands.
#[utoipa::path(
    operation_id = "get_tenant_export",
    tag = "tenant",
    summary = "Shows an export of the organization (admins; data_export)",
    params(TenantHeader, ("id" = uuid::Uuid, Path, description = "The export.")),
    security(("session" = []), ("api_key" = [])),
    responses((status = 200, body = ExportStatus), NotFound, PlanLimits),
)]
#[get("/v1/tenant/exports/{id}")]
async fn show_export(ctx: Allowed<ExportArchive>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id: uuid::Uuid = path.parse().map_err(|_| ApiError::NotFound("export"))?;
    let tenant = ctx.tenant.id;
    let status = ctx
        .rows(async |rows| {
            Ok::<_, ApiError>(
                tenant_exports::table
                    .filter(tenant_exports::id.eq(id))
                    .filter(tenant_exports::tenant_id.eq(tenant.0))
                    .select(ExportStatus::as_select())
                    .first(rows.conn())
                    .await
                    .optional()?,
            )
        })
        .await?;
    Ok(HttpResponse::Ok().json(status.ok_or(ApiError::NotFound("export"))?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct DownloadQuery {
    /// The token of the mailed link.
    token: String,
}

/// `GET /v1/exports/{id}/archive?token=…`: the mailed link. The token is
/// the whole credential; a wrong one is 404 like an unknown export.
#[utoipa::path(
    operation_id = "download_tenant_export",
    tag = "tenant",
    summary = "Downloads an organization's export (the mailed link)",
    params(("id" = uuid::Uuid, Path, description = "The export."), DownloadQuery),
    responses(
        (status = 200, description = "The archive (a tar file).", content_type = "application/x-tar"),
        (status = 410, description = "Error: link_expired.", body = plinth_http::openapi::ErrorEnvelope),
        NotFound,
    ),
)]
#[get("/v1/exports/{id}/archive")]
async fn download(
    db: web::Data<Db>,
    path: web::Path<String>,
    query: web::Query<DownloadQuery>,
) -> Result<HttpResponse, ApiError> {
    let id: uuid::Uuid = path.parse().map_err(|_| ApiError::NotFound("export"))?;
    let given = plinth_identity::sessions::hash_token(&query.token);
    type Row = (uuid::Uuid, String, Option<Vec<u8>>, Option<Vec<u8>>, Option<DateTime<Utc>>);
    let row: Option<Row> = db
        .statement(async |c| {
            Ok::<_, ApiError>(
                tenant_exports::table
                    .find(id)
                    .select((
                        tenant_exports::tenant_id,
                        tenant_exports::status,
                        tenant_exports::token_hash,
                        tenant_exports::archive,
                        tenant_exports::expires_at,
                    ))
                    .first(c)
                    .await
                    .optional()?,
            )
        })
        .await?;
    let Some((tenant, status, Some(hash), archive, expires_at)) = row else {
        return Err(ApiError::NotFound("export"));
    };
    if !bool::from(hash.as_slice().ct_eq(&given[..])) {
        return Err(ApiError::NotFound("export"));
    }
    let live = status == "ready" && expires_at.is_some_and(|at| at > Utc::now());
    let Some(archive) = archive.filter(|_| live) else {
        return Err(ApiError::LinkExpired);
    };
    let slug = db
        .statement(async |c| Ok::<_, ApiError>(plinth_tenants::registry::find_by_id(c, TenantId(tenant)).await?))
        .await?
        .map_or_else(|| "organization".to_owned(), |t| t.slug);
    let name = format!("{slug}-{}.tar", id.simple());
    Ok(HttpResponse::Ok()
        .content_type("application/x-tar")
        .insert_header((header::CONTENT_DISPOSITION, format!("attachment; filename=\"{name}\"")))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(archive))
}

fn export_id(job: &ClaimedJob) -> Result<uuid::Uuid, JobError> {
    job.payload
        .get("export_id")
        .and_then(|v| v.as_str())
        .and_then(|s| uuid::Uuid::parse_str(s).ok())
        .ok_or_else(|| JobError::Fatal(anyhow::anyhow!("the job has no export_id")))
}

/// Writes a queued export's archive, keeps it, and mails the link, in one
/// transaction with marking it ready. Run twice, the second run finds it
/// ready and does nothing. `url` reaches the database for `pg_dump`.
pub fn export_handler(db: Db, url: String) -> plinth_jobs::Handler {
    std::sync::Arc::new(move |job: ClaimedJob| {
        let (db, url) = (db.clone(), url.clone());
        Box::pin(async move {
            let id = export_id(&job)?;
            let row: Option<(uuid::Uuid, Option<uuid::Uuid>, String)> = db
                .platform(async |c| {
                    Ok::<_, JobError>(
                        tenant_exports::table
                            .find(id)
                            .select((tenant_exports::tenant_id, tenant_exports::requested_by, tenant_exports::status))
                            .first(c)
                            .await
                            .optional()?,
                    )
                })
                .await?;
            let Some((tenant, requested_by, status)) = row else { return Ok(()) };
            if status != "queued" {
                return Ok(());
            }
            let tenant = TenantId(tenant);
            let written = async {
                let mut archive = crate::backup::backup(&db, &url, tenant).await?;
                let mut bytes = Vec::new();
                archive.write(&mut bytes)?;
                anyhow::ensure!(
                    bytes.len() <= MAX_ARCHIVE_BYTES,
                    "the archive is {} bytes, over the {MAX_ARCHIVE_BYTES} a download may hold; the operator's \
                     `plinth tenants backup` writes it to a file",
                    bytes.len()
                );
                Ok((archive.manifest.tenant.name.clone(), bytes))
            }
            .await;
            let (organization, bytes) = match written {
                Ok(done) => done,
                Err(err) if job.attempts < job.max_attempts => return Err(JobError::Retry(err)),
                Err(err) => {
                    let why = format!("{err:#}");
                    db.platform(async |c| {
                        diesel::update(tenant_exports::table.find(id))
                            .set((tenant_exports::status.eq("failed"), tenant_exports::error.eq(&why)))
                            .execute(c)
                            .await?;
                        Ok::<_, JobError>(())
                    })
                    .await?;
                    return Err(JobError::Fatal(err));
                }
            };
            let (token, hash) = plinth_identity::sessions::new_token().map_err(|e| JobError::Retry(e.into()))?;
            let digest = {
                use sha2::Digest as _;
                plinth_tenants::backup::hex(&sha2::Sha256::digest(&bytes))
            };
            let now = Utc::now();
            let expires_at = now + chrono::Duration::hours(LINK_HOURS);
            let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
            db.platform(async |c| {
                let updated =
                    diesel::update(tenant_exports::table.find(id).filter(tenant_exports::status.eq("queued")))
                        .set((
                            tenant_exports::status.eq("ready"),
                            tenant_exports::archive.eq(&bytes),
                            tenant_exports::token_hash.eq(&hash[..]),
                            tenant_exports::bytes.eq(size),
                            tenant_exports::sha256.eq(&digest),
                            tenant_exports::ready_at.eq(now),
                            tenant_exports::expires_at.eq(expires_at),
                        ))
                        .execute(c)
                        .await?;
                if updated == 0 {
                    return Ok(());
                }
                let mut expire = NewJob::new(EXPIRE_JOB, json!({ "export_id": id }));
                expire.tenant = Some(tenant);
                expire.run_at = Some(expires_at);
                plinth_jobs::enqueue(c, expire).await?;
                let email = match requested_by {
                    Some(user) => plinth_identity::users::emails(c, &[user]).await?.remove(&user),
                    None => None,
                };
                // The admin's account is gone: the archive waits, unmailed,
                // until it expires.
                if let Some(to) = email.as_deref().and_then(|e| EmailAddress::parse(e).ok()) {
                    let mail = Mail {
                        to,
                        template: "tenant_export",
                        data: json!({
                            "organization": organization,
                            "export_id": id,
                            "token": token,
                            "valid_hours": LINK_HOURS,
                            "size": human_size(size),
                        }),
                        idempotency_key: format!("tenant_export:{id}"),
                        tenant: Some(tenant),
                    };
                    plinth_mail::queue(c, mail).await?;
                }
                Ok::<_, JobError>(())
            })
            .await?;
            Ok(())
        })
    })
}

/// Drops an export's archive when its link expires.
pub fn expire_handler(db: Db) -> plinth_jobs::Handler {
    std::sync::Arc::new(move |job: ClaimedJob| {
        let db = db.clone();
        Box::pin(async move {
            let id = export_id(&job)?;
            db.platform(async |c| {
                diesel::update(tenant_exports::table.find(id).filter(tenant_exports::status.eq("ready")))
                    .set((tenant_exports::status.eq("expired"), tenant_exports::archive.eq(None::<Vec<u8>>)))
                    .execute(c)
                    .await?;
                Ok::<_, JobError>(())
            })
            .await
        })
    })
}

fn human_size(bytes: i64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / f64::from(1 << 20)),
        b if b >= 1 << 10 => format!("{:.1} kB", b as f64 / f64::from(1 << 10)),
        b => format!("{b} bytes"),
    }
}

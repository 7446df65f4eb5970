//! The operations pages: the Stripe inbox (replay), the job queue (retry),
//! mail deliveries, and tenant migrations (migrate-all as a job, with its
//! progress read from the database, so any instance shows it live).

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use plinth_http::ApiError;
use plinth_jobs::{ClaimedJob, JobError, NewJob};
use plinth_tenants::{Db, migrate};
use serde::Deserialize;

use super::auth::{ConsoleUser, Empty, Posted};
use super::{ConsoleBilling, ConsoleError, notice, page, render, see_other, show};
use crate::operator_log;

/// The job kind of a migrate-all run started from the console.
pub const MIGRATE_ALL_JOB: &str = "console.migrate_all";

fn jobs_error(err: plinth_jobs::ClaimError) -> ConsoleError {
    match err {
        plinth_jobs::ClaimError::Db(e) => e.into(),
        plinth_jobs::ClaimError::Pool(e) => e.into(),
    }
}

#[derive(Deserialize)]
pub(super) struct StateQuery {
    status: Option<String>,
    notice: Option<String>,
}

impl StateQuery {
    /// The state asked for, if it is one of `known`.
    fn status<'a>(&self, known: &[&'a str]) -> Option<&'a str> {
        let asked = self.status.as_deref()?;
        known.iter().copied().find(|k| *k == asked)
    }
}

/// `GET /console/stripe`: stored events by state; the parked ones with
/// their reason.
pub(super) async fn stripe(
    who: ConsoleUser,
    db: web::Data<Db>,
    billing: web::Data<dyn ConsoleBilling>,
    query: web::Query<StateQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let status = query.status(&["received", "processed", "parked"]);
    let inbox = billing.inbox(&db, status, 100).await?;
    show(
        &who,
        "stripe",
        "stripe.html",
        minijinja::context! { inbox, status, notice => notice(query.notice.as_deref()) },
    )
}

/// `POST /console/stripe/{event}/replay`: processes the stored event again.
pub(super) async fn replay(
    db: web::Data<Db>,
    billing: web::Data<dyn ConsoleBilling>,
    path: web::Path<String>,
    posted: Posted<Empty>,
) -> Result<HttpResponse, ConsoleError> {
    let event = path.into_inner();
    let outcome = billing.replay(&event).await?;
    let entry = posted.who.operator.log("stripe.event_replayed").target(&event);
    let details = serde_json::json!({ "via": "console", "outcome": outcome });
    db.platform(async |c| Ok::<_, ApiError>(operator_log::record(c, entry.details(details)).await?)).await?;
    Ok(see_other("/console/stripe?notice=replayed"))
}

/// `GET /console/jobs`: counts by kind and state, and the jobs of one state
/// (the dead ones, unless asked otherwise) with their last error.
pub(super) async fn jobs(
    who: ConsoleUser,
    db: web::Data<Db>,
    query: web::Query<StateQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let status = query.status(&["queued", "running", "done", "dead"]).unwrap_or("dead");
    let counts = plinth_jobs::counts(&db).await.map_err(jobs_error)?;
    let by_kind = plinth_jobs::queue_stats(&db).await.map_err(jobs_error)?.by_kind;
    let list = plinth_jobs::list(&db, Some(status), 100).await.map_err(jobs_error)?;
    show(
        &who,
        "jobs",
        "jobs.html",
        minijinja::context! { counts, by_kind, list, status, notice => notice(query.notice.as_deref()) },
    )
}

/// `POST /console/jobs/{id}/retry`: a dead job runs again with fresh attempts.
pub(super) async fn retry(
    db: web::Data<Db>,
    path: web::Path<String>,
    posted: Posted<Empty>,
) -> Result<HttpResponse, ConsoleError> {
    let id: plinth_jobs::JobId = path.parse().map_err(|_| ApiError::NotFound("job"))?;
    if !plinth_jobs::retry(&db, id).await.map_err(jobs_error)? {
        return Err(ApiError::NotFound("dead or queued job").into());
    }
    let entry = posted.who.operator.log("job.retried").target(id);
    db.platform(async |c| Ok::<_, ApiError>(operator_log::record(c, entry).await?)).await?;
    plinth_jobs::wake_soon(&db);
    Ok(see_other("/console/jobs?notice=retried"))
}

/// `GET /console/mail`: the newest deliveries, and counts by state.
pub(super) async fn mail(
    who: ConsoleUser,
    db: web::Data<Db>,
    query: web::Query<StateQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let status = query.status(&["queued", "sent", "failed"]);
    let (list, counts) = db.platform(async |c| Ok::<_, ApiError>(plinth_mail::recent(c, status, 100).await?)).await?;
    show(&who, "mail", "mail.html", minijinja::context! { list, counts, status })
}

/// What the migrations page and its live fragment show.
async fn migration_state(db: &Db) -> Result<minijinja::Value, ConsoleError> {
    let (versions, total, behind, run) = db
        .platform(async |c| {
            let (versions, total, behind) = migrate::versions(c, migrate::TENANT_MIGRATIONS, 200).await?;
            let run = plinth_jobs::latest_of_kind(c, MIGRATE_ALL_JOB).await?;
            Ok::<_, ApiError>((versions, total, behind, run))
        })
        .await?;
    let running = run.as_ref().is_some_and(|r| r.status == "queued" || r.status == "running");
    Ok(minijinja::context! {
        versions, total, behind, run, running,
        wanted => migrate::TENANT_MIGRATIONS.len(),
        latest => migrate::TENANT_MIGRATIONS.last().map(|m| m.version),
    })
}

/// `GET /console/migrations`: each tenant's version (those behind first),
/// and the migrate-all run.
pub(super) async fn migrations(
    who: ConsoleUser,
    db: web::Data<Db>,
    query: web::Query<StateQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let state = migration_state(&db).await?;
    show(
        &who,
        "migrations",
        "migrations.html",
        minijinja::context! { ..state, ..minijinja::context! { notice => notice(query.notice.as_deref()) } },
    )
}

/// `GET /console/migrations/progress`: the run's state alone, which the
/// page's script fetches every second while a run is under way.
pub(super) async fn progress(_: ConsoleUser, db: web::Data<Db>) -> Result<HttpResponse, ConsoleError> {
    let state = migration_state(&db).await?;
    Ok(page(actix_web::http::StatusCode::OK, render("progress.html", state)?))
}

/// `POST /console/migrations/run`: queues a migrate-all run, unless one is
/// queued or running.
pub(super) async fn run_migrations(db: web::Data<Db>, posted: Posted<Empty>) -> Result<HttpResponse, ConsoleError> {
    let entry = posted.who.operator.log("migrations.started");
    let operator = posted.who.user.0;
    db.platform(async |c| {
        // One run at a time: queueing takes a lock the next asker waits for.
        diesel_async::RunQueryDsl::execute(
            diesel::sql_query("SELECT pg_advisory_xact_lock(hashtextextended('plinth.console.migrate_all', 0))"),
            c,
        )
        .await?;
        let live = plinth_jobs::latest_of_kind(c, MIGRATE_ALL_JOB)
            .await?
            .is_some_and(|r| r.status == "queued" || r.status == "running");
        if !live {
            let job = NewJob { max_attempts: 1, ..NewJob::new(MIGRATE_ALL_JOB, serde_json::json!({ "by": operator })) };
            plinth_jobs::enqueue(c, job).await?;
            operator_log::record(c, entry).await?;
        }
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(see_other("/console/migrations?notice=migrating"))
}

/// The run's progress is read from the database by the page; nothing to
/// report as it goes.
fn quietly(_: migrate::MigrateEvent<'_>) {}

/// The worker's handler of [`MIGRATE_ALL_JOB`]: migrates every tenant that
/// is behind; tenants that fail are named in the job's error (the run is
/// then dead, and the page shows why).
pub fn migrate_all_handler(db: Db) -> plinth_jobs::Handler {
    Arc::new(move |_job: ClaimedJob| {
        let db = db.clone();
        Box::pin(async move {
            // The run's future borrows across its pool's async closures in a
            // way rustc cannot yet prove Send (a higher-ranked lifetime), so
            // it is driven on a blocking thread of the same runtime instead
            // of on the worker's task.
            let handle = tokio::runtime::Handle::current();
            let report = tokio::task::spawn_blocking(move || {
                let options = migrate::MigrateOptions::default();
                handle.block_on(migrate::migrate_tenants(&db, migrate::TENANT_MIGRATIONS, &options, &quietly))
            })
            .await
            .map_err(|e| JobError::Retry(anyhow::Error::new(e).context("the migrate-all run stopped")))?
            .map_err(JobError::Retry)?;
            tracing::info!(
                migrated = report.migrated.len(),
                failed = report.failed.len(),
                "console migrate-all finished"
            );
            if report.failed.is_empty() {
                return Ok(());
            }
            let failed: Vec<String> = report.failed.iter().map(|(slug, error)| format!("{slug}: {error}")).collect();
            Err(JobError::Fatal(anyhow::anyhow!("{} tenant(s) failed: {}", failed.len(), failed.join("; "))))
        })
    })
}

//! What the queue holds: counts by state, by kind for metrics, and the
//! recent jobs, for `plinth jobs list` and `/metrics`.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use diesel::{ExpressionMethods as _, QueryDsl as _, Queryable, QueryableByName, Selectable, SelectableHelper as _};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use plinth_tenants::db::Db;

use crate::ClaimError;
use crate::jobs;

/// Jobs by state, for `plinth jobs list` and metrics.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct JobCounts {
    /// Waiting to run for the first time.
    pub queued: i64,
    /// Held by a worker now.
    pub running: i64,
    /// Failed at least once, waiting for a retry.
    pub retrying: i64,
    /// Out of attempts.
    pub dead: i64,
    pub done: i64,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub async fn counts(db: &Db) -> Result<JobCounts, ClaimError> {
    let rows: Vec<CountRow> = db
        .platform(async |conn| {
            // Raw SQL: grouped by a computed state (`CASE`).
            diesel::sql_query(
                "SELECT CASE WHEN status = 'queued' AND attempts > 0 THEN 'retrying' ELSE status END AS state, \
                 count(*) AS n FROM public.jobs GROUP BY 1",
            )
            .load(conn)
            .await
            .map_err(ClaimError::from)
        })
        .await?;
    let mut counts = JobCounts::default();
    for row in rows {
        match row.state.as_str() {
            "queued" => counts.queued = row.n,
            "running" => counts.running = row.n,
            "retrying" => counts.retrying = row.n,
            "dead" => counts.dead = row.n,
            "done" => counts.done = row.n,
            _ => {}
        }
    }
    Ok(counts)
}

/// Jobs not done, by kind and state (as [`counts`] names states), and how
/// long the longest-waiting job that is due has waited, for the metrics.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub by_kind: Vec<(String, String, i64)>,
    pub oldest_due_secs: f64,
}

#[derive(QueryableByName)]
struct KindRow {
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = Nullable<Double>)]
    waited: Option<f64>,
}

/// [`QueueStats`], in one query over the rows not done (done rows are
/// many and counted by the runs counter instead).
pub async fn queue_stats(db: &Db) -> Result<QueueStats, ClaimError> {
    let rows: Vec<KindRow> = db
        .platform(async |conn| {
            // Raw SQL: grouped by a computed state, with an aggregate FILTER.
            diesel::sql_query(
                "SELECT kind, CASE WHEN status = 'queued' AND attempts > 0 THEN 'retrying' ELSE status END AS state, \
                 count(*) AS n, \
                 extract(epoch FROM now() - min(run_at) FILTER (WHERE status = 'queued' AND run_at <= now()))::float8 \
                   AS waited \
                 FROM public.jobs WHERE status <> 'done' GROUP BY 1, 2",
            )
            .load(conn)
            .await
            .map_err(ClaimError::from)
        })
        .await?;
    let oldest_due_secs = rows.iter().filter_map(|r| r.waited).fold(0.0, f64::max);
    Ok(QueueStats { by_kind: rows.into_iter().map(|r| (r.kind, r.state, r.n)).collect(), oldest_due_secs })
}

/// One job, as `plinth jobs list` shows it.
#[derive(Debug, Clone, Queryable, Selectable, Serialize)]
#[diesel(table_name = jobs)]
pub struct JobSummary {
    pub id: uuid::Uuid,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// The most recent jobs, optionally only those in `status`.
pub async fn list(db: &Db, status: Option<&str>, limit: i64) -> Result<Vec<JobSummary>, ClaimError> {
    db.platform(async |conn| {
        let query =
            jobs::table.order(jobs::created_at.desc()).limit(limit).select(JobSummary::as_select()).into_boxed();
        let query = match status {
            Some(status) => query.filter(jobs::status.eq(status)),
            None => query,
        };
        query.load(conn).await.map_err(ClaimError::from)
    })
    .await
}

/// The newest job of `kind`, if any (the console's migrate-all run).
pub async fn latest_of_kind(
    conn: &mut diesel_async::AsyncPgConnection,
    kind: &str,
) -> diesel::QueryResult<Option<JobSummary>> {
    use diesel::OptionalExtension as _;
    jobs::table
        .filter(jobs::kind.eq(kind))
        .order(jobs::created_at.desc())
        .select(JobSummary::as_select())
        .first(conn)
        .await
        .optional()
}

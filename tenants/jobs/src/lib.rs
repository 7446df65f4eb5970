//! Background jobs on PostgreSQL (`public.jobs`).
//!
//! - [`enqueue`] inserts a job with the caller's connection, so it commits or
//!   rolls back with the change that caused it. A `dedup_key` makes the same
//!   logical job be queued once.
//! - [`Worker`] claims ready jobs with `FOR UPDATE SKIP LOCKED` (several
//!   workers on several instances never take the same job), holds a lease
//!   that a heartbeat extends while the job runs, and retries failures with
//!   exponential backoff and jitter until `max_attempts`, after which the job
//!   is `dead`: kept, visible, and retryable with [`retry`].
//! - A job whose worker died is claimed again once its lease expires.
//! - [`counts`], [`queue_stats`] and [`list`] report on the queue (`stats`).
//!
//! Handlers must be idempotent: a job can run again after a crash between
//! its work and the commit of its completion.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Double, Integer, Jsonb, Nullable, Text, Uuid as SqlUuid};
use diesel::upsert::DecoratableTarget as _;
use diesel::{
    BoolExpressionMethods as _, ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, QueryableByName,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::FutureExt as _;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use plinth_tenants::db::{Db, PoolError};
use plinth_tenants::ids::TenantId;
use plinth_tenants::text::redact_addresses;
use plinth_tenants::trace;

mod stats;
pub use stats::{JobCounts, JobSummary, QueueStats, counts, latest_of_kind, list, queue_stats};

plinth_tenants::uuid_id!(
    /// Identifies a background job.
    JobId
);

/// The NOTIFY channel a trigger uses when jobs become ready.
pub const CHANNEL: &str = "plinth_jobs";

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: &'static str,
    pub payload: serde_json::Value,
    pub tenant: Option<TenantId>,
    /// Queue this logical job once: a second job of the same kind and key is
    /// not inserted.
    pub dedup_key: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: i32,
    /// Wake the workers when the job is queued (a NOTIFY from the jobs
    /// trigger, sent at commit). An enqueuer that queues bursts turns it off
    /// and calls [`wake_soon`] instead: PostgreSQL serialises committing
    /// transactions that NOTIFY.
    pub wake: bool,
}

impl NewJob {
    pub fn new(kind: &'static str, payload: serde_json::Value) -> Self {
        Self { kind, payload, tenant: None, dedup_key: None, run_at: None, max_attempts: 10, wake: true }
    }
}

diesel::table! {
    public.jobs (id) {
        id -> Uuid,
        kind -> Text,
        payload -> Jsonb,
        tenant_id -> Nullable<Uuid>,
        dedup_key -> Nullable<Text>,
        status -> Text,
        attempts -> Integer,
        max_attempts -> Integer,
        run_at -> Timestamptz,
        locked_by -> Nullable<Text>,
        locked_until -> Nullable<Timestamptz>,
        last_error -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        finished_at -> Nullable<Timestamptz>,
        wake -> Bool,
    }
}

diesel::table! {
    /// The columns a job is queued with. `jobs` itself is declared without
    /// `traceparent`: diesel takes 16 columns unless built with its
    /// 32-column feature, which makes it much slower to build; the claim
    /// reads it in raw SQL.
    #[sql_name = "jobs"]
    public.queued_jobs (id) {
        id -> Uuid,
        kind -> Text,
        payload -> Jsonb,
        tenant_id -> Nullable<Uuid>,
        dedup_key -> Nullable<Text>,
        max_attempts -> Integer,
        wake -> Bool,
        run_at -> Timestamptz,
        traceparent -> Nullable<Text>,
    }
}

/// Queues a job on `conn`, inside whatever transaction `conn` is in. Returns
/// `None` when a job with the same kind and dedup key already exists.
pub async fn enqueue(conn: &AsyncPgConnection, job: NewJob) -> diesel::QueryResult<Option<JobId>> {
    let mut conn = conn;
    let values = (
        queued_jobs::id.eq(JobId::new().0),
        queued_jobs::kind.eq(job.kind),
        queued_jobs::payload.eq(&job.payload),
        queued_jobs::tenant_id.eq(job.tenant.map(|t| t.0)),
        queued_jobs::dedup_key.eq(job.dedup_key.as_deref()),
        queued_jobs::max_attempts.eq(job.max_attempts.max(1)),
        queued_jobs::wake.eq(job.wake),
        // The job's span continues the trace that queued it.
        queued_jobs::traceparent.eq(trace::current_traceparent()),
        // `None` inserts DEFAULT: the database's now.
        job.run_at.map(|at| queued_jobs::run_at.eq(at)),
    );
    let id: Option<uuid::Uuid> = diesel::insert_into(queued_jobs::table)
        .values(values)
        .on_conflict((queued_jobs::kind, queued_jobs::dedup_key))
        .filter_target(queued_jobs::dedup_key.is_not_null())
        .do_nothing()
        .returning(queued_jobs::id)
        .get_result(&mut conn)
        .await
        .optional()?;
    Ok(id.map(JobId))
}

/// Whether a later job of `job`'s kind for the same tenant waits in the
/// queue or runs: a trailing debounce, where each change queues a job for
/// some time later and only the last one does the work (it sees every
/// change: each was committed with its own, earlier, job).
pub async fn superseded(conn: &mut AsyncPgConnection, job: &ClaimedJob) -> diesel::QueryResult<bool> {
    let mine: Option<DateTime<Utc>> = jobs::table.find(job.id).select(jobs::run_at).first(conn).await.optional()?;
    let Some(mine) = mine else { return Ok(false) };
    let later = jobs::table
        .filter(jobs::kind.eq(&job.kind))
        .filter(jobs::tenant_id.eq(job.tenant_id))
        .filter(jobs::status.eq_any(["queued", "running"]))
        // Later, or as late and after it in id order: of two queued for
        // the same moment, exactly one does the work.
        .filter(jobs::run_at.gt(mine).or(jobs::run_at.eq(mine).and(jobs::id.gt(job.id))));
    diesel::select(diesel::dsl::exists(later)).get_result(conn).await
}

/// When an enqueuer last woke the job workers (ms since the epoch), and
/// whether a trailing wake is pending.
static LAST_WAKE: AtomicI64 = AtomicI64::new(0);
static WAKE_PENDING: AtomicBool = AtomicBool::new(false);
const WAKE_EVERY_MS: i64 = 20;

/// Wakes the job workers (NOTIFY [`CHANNEL`]) for jobs queued with
/// `wake: false`: at once if the last wake is 20 ms old, otherwise once 20 ms
/// after it, so a burst costs one NOTIFY per 20 ms and its last job is never
/// left to the workers' poll. Call it after the commit.
pub fn wake_soon(db: &Db) {
    let now = Utc::now().timestamp_millis();
    let last = AtomicI64::load(&LAST_WAKE, Ordering::SeqCst);
    let delay = if now - last >= WAKE_EVERY_MS
        && LAST_WAKE.compare_exchange(last, now, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    {
        None
    } else if WAKE_PENDING.swap(true, Ordering::SeqCst) {
        return;
    } else {
        Some(std::time::Duration::from_millis(WAKE_EVERY_MS as u64))
    };
    let db = db.clone();
    tokio::spawn(async move {
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
            WAKE_PENDING.store(false, Ordering::SeqCst);
            LAST_WAKE.store(Utc::now().timestamp_millis(), Ordering::SeqCst);
        }
        let woke = db
            .statement(async |c| {
                // Raw SQL: a function diesel has no declaration for.
                diesel::sql_query("SELECT pg_notify($1, '')").bind::<Text, _>(CHANNEL).execute(c).await?;
                Ok::<_, ClaimError>(())
            })
            .await;
        if let Err(err) = woke {
            tracing::warn!(error = %err, "waking the job workers failed; they poll within a second");
        }
    });
}

/// A claimed job, as its handler sees it.
#[derive(Debug, Clone, QueryableByName)]
pub struct ClaimedJob {
    #[diesel(sql_type = SqlUuid)]
    pub id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Jsonb)]
    pub payload: serde_json::Value,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub tenant_id: Option<uuid::Uuid>,
    /// 1 on the first run.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Integer)]
    pub max_attempts: i32,
    /// The trace of the span that queued the job (`trace`).
    #[diesel(sql_type = Nullable<Text>)]
    pub traceparent: Option<String>,
}

/// Claims up to `limit` ready jobs (queued and due, or running with an
/// expired lease) for `worker`, holding them for `lease`.
///
/// A worker never takes over a job it holds itself: it is alive (it is
/// claiming) and still running it, only its heartbeat was late (a loaded
/// machine). Taking it over would run the job twice at once.
pub async fn claim(db: &Db, worker: &str, limit: i64, lease: Duration) -> Result<Vec<ClaimedJob>, ClaimError> {
    db.platform(async |conn| {
        // A job whose lease expired on its last attempt (its worker died, maybe
        // because of the job) is given up instead of being taken over forever.
        diesel::update(
            jobs::table
                .filter(jobs::status.eq("running"))
                .filter(jobs::locked_until.lt(diesel::dsl::now))
                .filter(jobs::locked_by.ne(worker))
                .filter(jobs::attempts.ge(jobs::max_attempts)),
        )
        .set((
            jobs::status.eq("dead"),
            jobs::finished_at.eq(diesel::dsl::now),
            jobs::updated_at.eq(diesel::dsl::now),
            jobs::locked_by.eq(None::<String>),
            jobs::locked_until.eq(None::<DateTime<Utc>>),
            jobs::last_error.eq("the worker running the last attempt stopped responding"),
        ))
        .execute(conn)
        .await?;
        // Raw SQL: FOR UPDATE SKIP LOCKED in a subquery joined to the update,
        // and a lease computed on the database's clock.
        Ok(diesel::sql_query(
            "UPDATE public.jobs j SET status = 'running', attempts = j.attempts + 1, locked_by = $1, \
               locked_until = now() + make_interval(secs => $2), updated_at = now() \
             FROM (SELECT id FROM public.jobs \
                   WHERE (status = 'queued' AND run_at <= now()) \
                      OR (status = 'running' AND locked_until < now() AND locked_by <> $1) \
                   ORDER BY run_at LIMIT $3 FOR UPDATE SKIP LOCKED) picked \
             WHERE j.id = picked.id \
             RETURNING j.id, j.kind, j.payload, j.tenant_id, j.attempts, j.max_attempts, j.traceparent",
        )
        .bind::<Text, _>(worker)
        .bind::<Double, _>(lease.as_secs_f64())
        .bind::<BigInt, _>(limit)
        .load(conn)
        .await?)
    })
    .await
}

/// Why claiming failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

type BoxedQuery<'a> = diesel::query_builder::BoxedSqlQuery<'a, diesel::pg::Pg, diesel::query_builder::SqlQuery>;

/// Runs an update on one job; true if it matched (the worker still held it).
async fn update_one(db: &Db, query: BoxedQuery<'_>) -> bool {
    matched(execute(db, query).await)
}

async fn execute(db: &Db, query: BoxedQuery<'_>) -> Result<usize, ClaimError> {
    db.platform(async |conn| query.execute(conn).await.map_err(ClaimError::from)).await
}

/// Writes a job's outcome, retrying for up to 30 seconds while the database
/// cannot be reached (a restart, a failover): a job that finished is not
/// left running until its lease runs out and then run again.
async fn settle<F, Fut>(mut write: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize, ClaimError>>,
{
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match write().await {
            Err(ClaimError::Pool(_)) if started.elapsed() < Duration::from_secs(30) => {}
            Err(ClaimError::Db(diesel::result::Error::DatabaseError(kind, _)))
                if matches!(
                    kind,
                    diesel::result::DatabaseErrorKind::ClosedConnection
                        | diesel::result::DatabaseErrorKind::UnableToSendCommand
                ) && started.elapsed() < Duration::from_secs(30) => {}
            other => return matched(other),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Whether an update on one job matched; a failure is logged.
fn matched(updated: Result<usize, ClaimError>) -> bool {
    match updated {
        Ok(n) => n == 1,
        Err(err) => {
            tracing::error!(error = %err, "updating a job failed");
            false
        }
    }
}

fn held<'a>(sql: &'static str, id: uuid::Uuid, worker: &'a str) -> BoxedQuery<'a> {
    diesel::sql_query(sql).into_boxed().bind::<SqlUuid, _>(id).bind::<Text, _>(worker)
}

async fn complete(db: &Db, id: uuid::Uuid, worker: &str) -> bool {
    settle(|| complete_once(db, id, worker)).await
}

async fn complete_once(db: &Db, id: uuid::Uuid, worker: &str) -> Result<usize, ClaimError> {
    db.platform(async |conn| {
        diesel::update(jobs::table.find(id).filter(jobs::locked_by.eq(worker)).filter(jobs::status.eq("running")))
            .set((
                jobs::status.eq("done"),
                jobs::finished_at.eq(diesel::dsl::now),
                jobs::updated_at.eq(diesel::dsl::now),
                jobs::last_error.eq(None::<String>),
                jobs::locked_by.eq(None::<String>),
                jobs::locked_until.eq(None::<DateTime<Utc>>),
            ))
            .execute(conn)
            .await
            .map_err(ClaimError::from)
    })
    .await
}

/// Records a failure: queued again after `retry_in`, or dead if attempts are
/// used up or `retry_in` is `None`. Raw SQL here and in `release` and
/// `heartbeat`: the outcome depends on the row (`CASE`, `greatest`), and
/// times are computed on the database's clock, as leases are compared.
async fn fail(db: &Db, id: uuid::Uuid, worker: &str, error: &str, retry_in: Option<Duration>) -> bool {
    let sql = "UPDATE public.jobs SET last_error = $3, updated_at = now(), locked_by = NULL, locked_until = NULL, \
               status = CASE WHEN attempts >= max_attempts OR $4::float8 IS NULL THEN 'dead' ELSE 'queued' END, \
               finished_at = CASE WHEN attempts >= max_attempts OR $4::float8 IS NULL THEN now() END, \
               run_at = now() + make_interval(secs => coalesce($4::float8, 0)) \
               WHERE id = $1 AND locked_by = $2 AND status = 'running'";
    let retry_in = retry_in.map(|d| d.as_secs_f64());
    settle(|| execute(db, held(sql, id, worker).bind::<Text, _>(error).bind::<Nullable<Double>, _>(retry_in))).await
}

/// Gives a job back unfinished (shutdown): it runs again at once and the
/// interrupted run does not count as an attempt.
async fn release(db: &Db, id: uuid::Uuid, worker: &str) -> bool {
    let sql = "UPDATE public.jobs SET status = 'queued', attempts = greatest(attempts - 1, 0), run_at = now(), \
               locked_by = NULL, locked_until = NULL, updated_at = now() \
               WHERE id = $1 AND locked_by = $2 AND status = 'running'";
    update_one(db, held(sql, id, worker)).await
}

async fn heartbeat(db: &Db, id: uuid::Uuid, worker: &str, lease: Duration) -> bool {
    let sql = "UPDATE public.jobs SET locked_until = now() + make_interval(secs => $3), updated_at = now() \
               WHERE id = $1 AND locked_by = $2 AND status = 'running'";
    update_one(db, held(sql, id, worker).bind::<Double, _>(lease.as_secs_f64())).await
}

/// Puts a dead (or delayed) job back in the queue to run now, with fresh
/// attempts. Returns false if there is no such job in that state.
pub async fn retry(db: &Db, id: JobId) -> Result<bool, ClaimError> {
    db.platform(async |conn| {
        let n = diesel::update(jobs::table.find(id.0).filter(jobs::status.eq_any(["dead", "queued"])))
            .set((
                jobs::status.eq("queued"),
                jobs::run_at.eq(diesel::dsl::now),
                jobs::attempts.eq(0),
                jobs::last_error.eq(None::<String>),
                jobs::finished_at.eq(None::<DateTime<Utc>>),
                jobs::updated_at.eq(diesel::dsl::now),
            ))
            .execute(conn)
            .await?;
        Ok(n == 1)
    })
    .await
}

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Try again later (with backoff), until attempts run out.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// Retrying cannot help: the job is dead at once.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

impl From<diesel::result::Error> for JobError {
    fn from(err: diesel::result::Error) -> Self {
        JobError::Retry(anyhow::Error::new(err).context("database"))
    }
}

impl From<PoolError> for JobError {
    fn from(err: PoolError) -> Self {
        JobError::Retry(anyhow::Error::new(err).context("no database connection"))
    }
}

pub type JobFuture = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;
pub type Handler = Arc<dyn Fn(ClaimedJob) -> JobFuture + Send + Sync>;

/// Job kinds and their handlers.
#[derive(Clone, Default)]
pub struct Handlers(HashMap<&'static str, Handler>);

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn on(&mut self, kind: &'static str, handler: Handler) -> &mut Self {
        self.0.insert(kind, handler);
        self
    }
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at the same time by this worker.
    pub concurrency: usize,
    /// How long a claimed job is held without a heartbeat.
    pub lease: Duration,
    /// How often to look for due jobs when nothing wakes the worker.
    pub poll_interval: Duration,
    /// First retry delay; doubles per attempt, with ±25 % jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long running jobs may take to finish before they are
    /// released back to the queue.
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// The delay before retry number `attempt` (1-based): base × 2^(attempt-1),
/// capped, times a jitter factor in [0.75, 1.25).
pub fn backoff(config: &WorkerConfig, attempt: i32, jitter: f64) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(30);
    let raw = config.backoff_base.saturating_mul(2u32.saturating_pow(exp)).min(config.backoff_max);
    raw.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Claims and runs jobs until told to stop.
pub struct Worker {
    db: Db,
    handlers: Arc<Handlers>,
    config: WorkerConfig,
    id: String,
    wake: Arc<Notify>,
}

impl Worker {
    pub fn new(db: Db, handlers: Handlers, config: WorkerConfig) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        let id = format!("{host}:{}:{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Self { db, handlers: Arc::new(handlers), config, id, wake: Arc::new(Notify::new()) }
    }

    /// This worker's name in `locked_by`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A listener handler that wakes this worker when jobs are queued.
    pub fn listen_handler(&self) -> plinth_tenants::notify::Handler {
        let wake = Arc::clone(&self.wake);
        Arc::new(move |_| wake.notify_one())
    }

    /// Runs until `stop` turns true (or its sender is dropped); then lets
    /// running jobs finish for the shutdown grace and releases the rest back
    /// to the queue.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut running: JoinSet<()> = JoinSet::new();
        let mut held: HashMap<tokio::task::Id, uuid::Uuid> = HashMap::new();
        tracing::info!(worker.id = %this.id, "job worker started");
        loop {
            // A dropped sender means nobody can tell us to stop any more: stop.
            if *stop.borrow() || stop.has_changed().is_err() {
                break;
            }
            let free = this.config.concurrency.saturating_sub(running.len());
            let mut claimed_any = false;
            if free > 0 {
                match claim(&this.db, &this.id, i64::try_from(free).unwrap_or(1), this.config.lease).await {
                    Ok(jobs) => {
                        claimed_any = !jobs.is_empty();
                        for job in jobs {
                            let id = job.id;
                            let handle = running.spawn(Arc::clone(&this).run_one(job));
                            held.insert(handle.id(), id);
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "claiming jobs failed"),
                }
            }
            if claimed_any && running.len() < this.config.concurrency {
                continue; // there may be more
            }
            tokio::select! {
                _ = this.wake.notified() => {}
                _ = tokio::time::sleep(this.config.poll_interval) => {}
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    if let Ok((task, ())) = done { held.remove(&task); }
                }
                _ = stop.changed() => {}
            }
            while let Some(Ok((task, ()))) = running.try_join_next_with_id() {
                held.remove(&task);
            }
        }
        tracing::info!(worker.id = %this.id, running = running.len(), "job worker stopping");
        let deadline = tokio::time::sleep(this.config.shutdown_grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = running.join_next_with_id() => match next {
                    Some(Ok((task, ()))) => { held.remove(&task); }
                    Some(Err(err)) => { held.remove(&err.id()); }
                    None => break,
                },
                _ = &mut deadline => {
                    running.abort_all();
                    while running.join_next().await.is_some() {}
                    for id in held.values() {
                        release(&this.db, *id, &this.id).await;
                    }
                    tracing::info!(released = held.len(), "unfinished jobs released to the queue");
                    break;
                }
            }
        }
        tracing::info!(worker.id = %this.id, "job worker stopped");
    }

    async fn run_one(self: Arc<Self>, job: ClaimedJob) {
        let span = tracing::info_span!(
            "job",
            otel.name = format!("job {}", job.kind),
            otel.kind = "consumer",
            job.kind = %job.kind,
            job.id = %job.id,
            job.attempt = job.attempts,
            tenant.id = job.tenant_id.map(tracing::field::display),
        );
        let traceparent = job.traceparent.as_deref();
        trace::continue_from(&span, |name| traceparent.filter(|_| name == trace::TRACEPARENT));
        async move {
            let started = std::time::Instant::now();
            let (id, attempts, max_attempts) = (job.id, job.attempts, job.max_attempts);
            // A kind with no handler here is not a label: rows are not code.
            let kind =
                if self.handlers.0.contains_key(job.kind.as_str()) { job.kind.clone() } else { "unknown".into() };
            let outcome = match self.handlers.0.get(job.kind.as_str()) {
                None => Err(JobError::Fatal(anyhow::anyhow!("no handler for job kind {:?}", job.kind))),
                Some(handler) => {
                    let work = std::panic::AssertUnwindSafe(handler(job)).catch_unwind();
                    tokio::pin!(work);
                    let mut beat = tokio::time::interval(self.config.lease / 3);
                    beat.tick().await;
                    loop {
                        tokio::select! {
                            result = &mut work => break result.unwrap_or_else(|_| {
                                Err(JobError::Retry(anyhow::anyhow!("the job handler panicked")))
                            }),
                            _ = beat.tick() => {
                                if !heartbeat(&self.db, id, &self.id, self.config.lease).await {
                                    tracing::warn!("lost the lease on a running job");
                                }
                            }
                        }
                    }
                }
            };
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            let counted = match &outcome {
                Ok(()) => "done",
                Err(JobError::Retry(_)) if attempts < max_attempts => "retry",
                Err(_) => "dead",
            };
            metrics::counter!("plinth_job_runs_total", "kind" => kind, "outcome" => counted).increment(1);
            match outcome {
                Ok(()) => {
                    if complete(&self.db, id, &self.id).await {
                        tracing::info!(elapsed_ms, "job done");
                    } else {
                        tracing::warn!(elapsed_ms, "job finished after its lease was lost; another worker may run it");
                    }
                }
                Err(JobError::Fatal(err)) => {
                    let error = format!("{err:#}");
                    fail(&self.db, id, &self.id, &error, None).await;
                    tracing::error!(error = redact_addresses(&error), "job failed for good");
                }
                Err(JobError::Retry(err)) => {
                    let error = format!("{err:#}");
                    let delay = backoff(&self.config, attempts, jitter());
                    fail(&self.db, id, &self.id, &error, Some(delay)).await;
                    let error = redact_addresses(&error);
                    if attempts >= max_attempts {
                        tracing::error!(error, "job failed; out of attempts, now dead");
                    } else {
                        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                        tracing::warn!(error, retry_in_ms, "job failed; will retry");
                    }
                }
            }
        }
        .instrument(span)
        .await;
    }
}

/// A number in [0, 1) for backoff jitter (not security-relevant).
fn jitter() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u64_pair().0 >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_a_cap() {
        let config = WorkerConfig { backoff_base: Duration::from_secs(2), ..Default::default() };
        assert_eq!(backoff(&config, 1, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(&config, 3, 0.5), Duration::from_secs(8));
        assert_eq!(backoff(&config, 1, 0.0), Duration::from_millis(1500));
        assert_eq!(backoff(&config, 1, 1.0), Duration::from_millis(2500));
        assert_eq!(backoff(&config, 40, 0.5), Duration::from_secs(3600));
    }
}

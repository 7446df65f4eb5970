//! Billing's jobs: their kinds, how each is queued, and the handlers the
//! worker runs them with.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use plinth_jobs::{self as jobs, ClaimedJob, JobError, NewJob};
use plinth_tenants::TenantId;
use serde_json::{Value, json};

use super::{Outcome, Processor, SEATS};
use crate::error::BillingError;

/// Job kind: process one stored event (payload `{"id": "evt_..."}`).
pub const PROCESS: &str = "billing.event";
/// Job kind: end a past-due subscription's grace (payload `{"subscription", "since"}`).
pub const GRACE: &str = "billing.grace";
/// Job kind: send metered usage to Stripe (payload `{"every_secs"}`),
/// queued again by each run.
pub const METERS: &str = "billing.meters";
/// Units gathered into batches per run of the sender, at most.
const METER_BATCH: i64 = 10_000;
/// Job kind: remind the owners of a payment still overdue before the
/// grace ends (payload `{"subscription", "since"}`).
pub const REMINDER: &str = "billing.reminder";
/// Job kind: the periodic `sync` (payload `{"every_secs"}`), queued again
/// by each run; its dedup key is the period, so instances share one.
pub const SYNC: &str = "billing.sync";

/// The next periodic sync, `every` after the current period began.
pub fn sync_job(every: Duration) -> NewJob {
    periodic(SYNC, every.max(Duration::from_secs(60)))
}

/// The next run of the metered-usage sender.
pub fn meters_job(every: Duration) -> NewJob {
    periodic(METERS, every)
}

/// The next run of a periodic job of `kind`: at the end of the current
/// period of `every`; its dedup key is that time, so instances queue one.
fn periodic(kind: &'static str, every: Duration) -> NewJob {
    let secs = every.as_secs().max(1);
    let now = Utc::now().timestamp();
    let next = (now / secs as i64 + 1) * secs as i64;
    NewJob {
        dedup_key: Some(format!("{kind}:{next}")),
        run_at: DateTime::from_timestamp(next, 0),
        max_attempts: 3,
        ..NewJob::new(kind, json!({ "every_secs": secs }))
    }
}

/// The job that processes a stored event, queued in the inbox's transaction.
pub fn job(event_id: &str) -> NewJob {
    NewJob { dedup_key: Some(event_id.to_owned()), max_attempts: 20, ..NewJob::new(PROCESS, json!({ "id": event_id })) }
}

impl Processor {
    /// The job handlers of billing.
    pub fn handlers(self: &Arc<Self>) -> Vec<(&'static str, jobs::Handler)> {
        let process = Arc::clone(self);
        let grace = Arc::clone(self);
        let sync = Arc::clone(self);
        let seats = Arc::clone(self);
        let reminder = Arc::clone(self);
        let meters = Arc::clone(self);
        vec![
            (
                PROCESS,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&process);
                    Box::pin(async move {
                        let id = text_field(&job.payload, "id")?;
                        match this.process(id).await {
                            Ok(Outcome::Parked(reason)) => Err(JobError::Retry(anyhow::anyhow!("parked: {reason}"))),
                            Ok(Outcome::Refused(reason)) => {
                                Err(JobError::Fatal(anyhow::anyhow!("parked for good: {reason}")))
                            }
                            Ok(_) => Ok(()),
                            Err(err) => Err(JobError::Retry(anyhow::Error::new(err).context("processing the event"))),
                        }
                    })
                }),
            ),
            (
                GRACE,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&grace);
                    Box::pin(async move {
                        let (id, since) = episode(&job.payload)?;
                        this.end_grace(id, since)
                            .await
                            .map_err(|e| JobError::Retry(anyhow::Error::new(e).context("ending a grace period")))
                    })
                }),
            ),
            (
                REMINDER,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&reminder);
                    Box::pin(async move {
                        let (id, since) = episode(&job.payload)?;
                        this.remind(id, since)
                            .await
                            .map_err(|e| JobError::Retry(anyhow::Error::new(e).context("reminding of a payment")))
                    })
                }),
            ),
            (
                METERS,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&meters);
                    Box::pin(async move {
                        let every = job.payload["every_secs"]
                            .as_u64()
                            .map(Duration::from_secs)
                            .ok_or_else(|| malformed(&job.payload, "every_secs"))?;
                        let result = match &this.api {
                            Some(api) => crate::usage::send(&this.db, api, &this.catalog, METER_BATCH).await,
                            None => Ok(crate::usage::Sent::default()),
                        };
                        // The next run is queued whatever this one did.
                        this.queue_next(meters_job(every)).await?;
                        match result {
                            Ok(sent) => {
                                if sent.batches > 0 || sent.left > 0 {
                                    tracing::info!(
                                        batches = sent.batches,
                                        units = sent.units,
                                        left = sent.left,
                                        "metered usage sent"
                                    );
                                }
                                Ok(())
                            }
                            Err(e) => Err(JobError::Fatal(anyhow::Error::new(e).context("sending metered usage"))),
                        }
                    })
                }),
            ),
            (
                SEATS,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&seats);
                    Box::pin(async move {
                        let tenant = job.payload["tenant"]
                            .as_str()
                            .and_then(|t| uuid::Uuid::parse_str(t).ok())
                            .map(TenantId)
                            .ok_or_else(|| malformed(&job.payload, "tenant"))?;
                        match this.update_seats(&job, tenant).await {
                            Ok(_) => Ok(()),
                            Err(e) if e.transient() => {
                                Err(JobError::Retry(anyhow::Error::new(e).context("updating seat quantities")))
                            }
                            Err(e) => Err(JobError::Fatal(anyhow::Error::new(e).context("updating seat quantities"))),
                        }
                    })
                }),
            ),
            (
                SYNC,
                Arc::new(move |job: ClaimedJob| {
                    let this = Arc::clone(&sync);
                    Box::pin(async move {
                        let every = job.payload["every_secs"]
                            .as_u64()
                            .map(Duration::from_secs)
                            .ok_or_else(|| malformed(&job.payload, "every_secs"))?;
                        let result = this.sync().await;
                        // The next run is queued whatever this one did.
                        this.queue_next(sync_job(every)).await?;
                        match result {
                            Ok(s) => {
                                tracing::info!(
                                    customers = s.customers,
                                    changed = s.changed.len(),
                                    failed = s.failed.len(),
                                    "billing sync done"
                                );
                                Ok(())
                            }
                            Err(e) => Err(JobError::Fatal(anyhow::Error::new(e).context("syncing with Stripe"))),
                        }
                    })
                }),
            ),
        ]
    }

    /// Queues the next run of a periodic job.
    async fn queue_next(&self, job: NewJob) -> Result<(), JobError> {
        let kind = job.kind;
        self.db
            .platform(async |c| {
                jobs::enqueue(c, job).await?;
                Ok::<_, BillingError>(())
            })
            .await
            .map_err(|e| JobError::Retry(anyhow::Error::new(e).context(format!("queueing the next {kind}"))))
    }
}

/// A job whose payload lacks `field` can never succeed: it dies at once,
/// with the payload in its error (`plinth jobs list --status dead`).
fn malformed(payload: &Value, field: &str) -> JobError {
    JobError::Fatal(anyhow::anyhow!("malformed payload: no {field} in {payload}"))
}

/// A past-due episode's job payload: `{"subscription", "since"}`.
fn episode(payload: &Value) -> Result<(&str, DateTime<Utc>), JobError> {
    let id = text_field(payload, "subscription")?;
    let since = payload["since"]
        .as_i64()
        .and_then(|t| DateTime::from_timestamp(t, 0))
        .ok_or_else(|| malformed(payload, "since"))?;
    Ok((id, since))
}

fn text_field<'a>(payload: &'a Value, field: &str) -> Result<&'a str, JobError> {
    payload[field].as_str().filter(|s| !s.is_empty()).ok_or_else(|| malformed(payload, field))
}

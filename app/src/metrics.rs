//! `GET /metrics`: what the instance is doing, in Prometheus' text format,
//! on the main address; with `PLINTH_METRICS_TOKEN` set it needs that
//! bearer token.
//!
//! Counters and histograms are recorded where things happen, through the
//! `metrics` facade (HTTP requests in the request middleware, policy
//! decisions in the gate, rate-limit refusals, job runs, Stripe webhooks);
//! gauges that describe a state (pools, the job queue, the notification
//! listener) are read when Prometheus scrapes. No label value is ever a
//! tenant, a user, an address or a token: routes are patterns, job kinds
//! and outcomes come from code.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use actix_web::{HttpRequest, HttpResponse, get, web};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use plinth_access::authn::bearer;
use plinth_billing::error::BillingError;
use plinth_http::ApiError;
use plinth_identity::sessions::hash_token;
use plinth_tenants::Db;
use plinth_tenants::notify::ListenerHealth;

/// Latency buckets (seconds) of every `*_seconds` histogram.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The process's recorder: installed once (the `metrics` facade has one
/// global recorder), shared by every application built in the process.
///
/// The exporter keeps histogram samples until its upkeep folds them into
/// buckets; a thread of its own runs that every 5 s, so memory stays bounded
/// when nobody scrapes.
/// Installs the process's recorder (once; later calls do nothing).
pub fn install() -> anyhow::Result<()> {
    recorder().map(drop)
}

fn recorder() -> anyhow::Result<PrometheusHandle> {
    static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|e| e.to_string())?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("plinth-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| format!("starting the metrics upkeep thread: {e}"))?;
            Ok(handle)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("installing the metrics recorder: {e}"))
}

/// What `/metrics` reads (app data).
pub struct Metrics {
    handle: PrometheusHandle,
    /// SHA-256 of `PLINTH_METRICS_TOKEN`, compared hash to hash.
    token: Option<[u8; 32]>,
    /// Every pool of the instance (one per worker, and the small one of the
    /// caches and the policy engine).
    pools: Vec<Db>,
    listener: ListenerHealth,
    /// The job (kind, state) pairs reported last time, set to 0 when they
    /// have no jobs any more.
    reported: Mutex<HashSet<(String, String)>>,
    /// The (shard, replica) pairs reported last time, likewise: a removed
    /// replica reads out of rotation.
    replicas: Mutex<HashSet<(String, String)>>,
}

impl Metrics {
    pub fn new(token: Option<&str>, pools: Vec<Db>, listener: ListenerHealth) -> anyhow::Result<Arc<Self>> {
        let handle = recorder()?;
        metrics::gauge!("plinth_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        // Series without labels are reported from the start, at zero, so
        // that `rate()` over them has a beginning and the alerts' queries
        // find them before the first event.
        metrics::counter!("plinth_rate_limited_total").increment(0);
        let _ = metrics::histogram!("plinth_stripe_event_delay_seconds");
        Ok(Arc::new(Self {
            handle,
            token: token.map(hash_token),
            pools,
            listener,
            reported: Mutex::new(HashSet::new()),
            replicas: Mutex::new(HashSet::new()),
        }))
    }

    /// Each replica's gauges; a replica removed since the last scrape reads
    /// out of rotation.
    fn report_replicas(&self, db: &Db) {
        let replicas = db.replicas().status();
        let now: HashSet<(String, String)> = replicas.iter().map(|r| (r.shard.to_string(), r.id.to_string())).collect();
        let mut reported = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        for (shard, id) in reported.difference(&now) {
            metrics::gauge!("plinth_replica_in_rotation", "shard" => shard.clone(), "replica" => id.clone()).set(0.0);
        }
        for replica in replicas {
            let (shard, id) = (replica.shard.to_string(), replica.id.to_string());
            metrics::gauge!("plinth_replica_in_rotation", "shard" => shard.clone(), "replica" => id.clone())
                .set(if replica.in_rotation { 1.0 } else { 0.0 });
            metrics::gauge!("plinth_replica_lag_bytes", "shard" => shard, "replica" => id)
                .set(replica.behind_bytes as f64);
        }
        *reported = now;
    }

    /// The scrape-time gauges: readiness, pools, the listener, replicas,
    /// the job queue, parked Stripe events.
    async fn refresh(&self, db: &Db) {
        let ready = crate::health::readiness(db, &self.listener).await.is_ok();
        metrics::gauge!("plinth_ready").set(if ready { 1.0 } else { 0.0 });
        let (mut max, mut open, mut idle, mut waiting) = (0, 0, 0, 0);
        for pool in &self.pools {
            let status = pool.status();
            (max, open, idle, waiting) =
                (max + status.max_size, open + status.size, idle + status.available, waiting + status.waiting);
        }
        metrics::gauge!("plinth_db_pool_max_connections").set(max as f64);
        metrics::gauge!("plinth_db_pool_connections", "state" => "in_use").set(open.saturating_sub(idle) as f64);
        metrics::gauge!("plinth_db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("plinth_db_pool_waiting").set(waiting as f64);
        if let Some(budget) = db.budget() {
            metrics::gauge!("plinth_db_connections_open").set(budget.open() as f64);
            metrics::gauge!("plinth_db_connections_max").set(budget.total() as f64);
        }
        let down = self.listener.down_for();
        metrics::gauge!("plinth_notify_listener_up").set(if down.is_none() { 1.0 } else { 0.0 });
        metrics::gauge!("plinth_notify_listener_down_seconds").set(down.map_or(0.0, |d| d.as_secs_f64()));
        self.report_replicas(db);
        match plinth_jobs::queue_stats(db).await {
            Ok(stats) => {
                let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
                let now: HashSet<(String, String)> =
                    stats.by_kind.iter().map(|(kind, state, _)| (kind.clone(), state.clone())).collect();
                for (kind, state) in reported.difference(&now) {
                    metrics::gauge!("plinth_jobs", "kind" => kind.clone(), "state" => state.clone()).set(0.0);
                }
                for (kind, state, n) in stats.by_kind {
                    metrics::gauge!("plinth_jobs", "kind" => kind, "state" => state).set(n as f64);
                }
                *reported = now;
                metrics::gauge!("plinth_jobs_oldest_due_seconds").set(stats.oldest_due_secs);
                metrics::gauge!("plinth_jobs_stats_up").set(1.0);
            }
            Err(err) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::new(err)),
                    "reading the job queue for metrics failed"
                );
                metrics::gauge!("plinth_jobs_stats_up").set(0.0);
            }
        }
        match db.platform(async |c| Ok::<_, BillingError>(plinth_billing::webhook::parked_count(c).await?)).await {
            Ok(n) => metrics::gauge!("plinth_stripe_events_parked").set(n as f64),
            Err(err) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::new(err)),
                "counting parked Stripe events for metrics failed"
            ),
        }
    }
}

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(scrape);
}

/// `GET /metrics`.
#[utoipa::path(
    operation_id = "metrics",
    tag = "operations",
    summary = "Metrics in Prometheus' text format (docs/operations.md lists them)",
    security((), ("metrics_token" = [])),
    responses((status = 200, description = "Prometheus' text exposition format.", content_type = "text/plain")),
)]
#[get("/metrics")]
async fn scrape(
    req: HttpRequest,
    metrics: web::Data<Arc<Metrics>>,
    db: web::Data<Db>,
) -> Result<HttpResponse, ApiError> {
    if let Some(expected) = &metrics.token {
        let given = bearer(&req).map(|t| hash_token(&t));
        if given.as_ref() != Some(expected) {
            return Err(ApiError::Unauthenticated);
        }
    }
    metrics.refresh(&db).await;
    metrics.handle.run_upkeep();
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(metrics.handle.render()))
}

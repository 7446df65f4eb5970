//! `GET /health/live` and `GET /health/ready`, and the readiness check that
//! `/metrics` reports as `plinth_ready`.

use std::time::Duration;

use actix_web::{HttpResponse, get, web};
use plinth_http::ApiError;
use plinth_tenants::notify::ListenerHealth;
use plinth_tenants::{Db, migrate};
use serde::Serialize;
use utoipa::ToSchema;

pub fn configure(cfg: &mut utoipa_actix_web::service_config::ServiceConfig) {
    cfg.service(live).service(ready);
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok` (live) or `ready`.
    #[schema(example = "ready")]
    status: &'static str,
}

/// The process answers: cheap, for restarts.
#[utoipa::path(
    operation_id = "health_live",
    tag = "operations",
    responses((status = 200, body = Health)),
)]
#[get("/health/live")]
async fn live() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// How long the notification listener may be down before the instance
/// says it is not ready: its reconnect backoff tops out at 1 s, so a
/// database restart that the listener rides out stays ready.
const LISTENER_DOWN_LIMIT: Duration = Duration::from_secs(8);

/// Ready when the notification listener is connected (or has been down for
/// less than [`LISTENER_DOWN_LIMIT`]: without it the instance still answers
/// correctly, but its caches and the access engine stop trusting themselves
/// and read the database for every request), the database answers within a
/// second, and no platform migration of this binary is pending (a newer one,
/// applied for a newer binary during a rolling deploy, is fine: migrations
/// only add). The error says which.
pub async fn readiness(db: &Db, listener: &ListenerHealth) -> Result<(), ApiError> {
    if let Some(down) = listener.down_for().filter(|d| *d > LISTENER_DOWN_LIMIT) {
        return Err(ApiError::NotReady(format!(
            "the notification listener has been disconnected for {} s",
            down.as_secs()
        )));
    }
    let check = db.platform(async |conn| Ok::<_, ApiError>(migrate::platform_schema_state(conn).await?));
    match tokio::time::timeout(Duration::from_secs(1), check).await {
        Ok(Ok(migrate::SchemaState::Current)) => Ok(()),
        // A newer binary migrated during a rolling deploy: migrations only
        // add, so this one keeps serving until it is replaced.
        Ok(Ok(migrate::SchemaState::Ahead(_))) => Ok(()),
        Ok(Ok(state)) => Err(ApiError::NotReady(state.to_string())),
        Ok(Err(err)) => Err(ApiError::Unavailable(anyhow::anyhow!("database check failed: {err}"))),
        Err(_) => Err(ApiError::Unavailable(anyhow::anyhow!("database check timed out"))),
    }
}

/// Ready to serve: for taking an instance in and out of a load balancer.
#[utoipa::path(
    operation_id = "health_ready",
    tag = "operations",
    responses(
        (status = 200, body = Health),
        (status = 503, description = "Error: unavailable, with the reason: the database does not answer, a \
                                     migration is pending, the notification listener is down, or the instance is \
                                     shutting down.",
         body = plinth_http::openapi::ErrorEnvelope),
    ),
)]
#[get("/health/ready")]
async fn ready(
    db: web::Data<Db>,
    listener: web::Data<ListenerHealth>,
    draining: Option<web::Data<Draining>>,
) -> Result<HttpResponse, ApiError> {
    if draining.is_some_and(|d| d.is_set()) {
        return Err(ApiError::NotReady("shutting down".to_owned()));
    }
    readiness(&db, &listener).await?;
    Ok(HttpResponse::Ok().json(Health { status: "ready" }))
}

/// Set once the instance has been asked to stop: it answers not ready while
/// it still serves for `PLINTH_SHUTDOWN_DRAIN_MS`, so that a load balancer
/// takes it out before it stops accepting connections.
#[derive(Debug, Clone, Default)]
pub struct Draining(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Draining {
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

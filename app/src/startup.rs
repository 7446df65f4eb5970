//! Building and running the HTTP server.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix_web::dev::Server;
use actix_web::middleware::{Condition, from_fn};
use actix_web::{App, HttpServer, web};
use anyhow::Context as _;
use plinth_access::authn::Authenticate;
use plinth_access::quota::Counters;
use plinth_access::resolve::{self, TenantResolver};
use plinth_access::{Access, Quota};
use plinth_admin::platform::Offboard;
use plinth_http::ApiError;
use plinth_http::request::{BodyLimit, BodyTimeout, ClientIpHeader, Hsts, request_span};
use plinth_identity::config::IdentityConfig;
use plinth_identity::limits::RateLimits;
use plinth_identity::links::MembershipRoles;
use plinth_identity::password::Hashing;
use plinth_identity::sessions::{self, ApiKeys, Authenticator, ScimTokens, Sessions, UnknownTokens};
use plinth_tenants::notify::Listener;
use plinth_tenants::{Db, DbConfig};
use utoipa_actix_web::AppExt as _;

use crate::config::Settings;

/// A bound, not yet running server.
pub struct Application {
    port: u16,
    server: Server,
    listener_task: tokio::task::JoinHandle<()>,
    sweeper: tokio::task::JoinHandle<()>,
    replica_watch: tokio::task::JoinHandle<()>,
    draining: crate::health::Draining,
    drain: std::time::Duration,
}

impl Application {
    /// Binds `settings.listen` (port 0 picks a free port) and wires every
    /// crate's routes. `listen_url` is the direct database URL for LISTEN.
    ///
    /// Each worker thread gets its own pool (`pool_size` is split between
    /// them), so a connection's driver task always runs on the thread that
    /// uses it: no cross-thread wake-up per database round trip.
    /// `listener` may already carry handlers of its own (the job worker's);
    /// the tenant resolver's is added here.
    pub async fn build(
        settings: &Settings,
        db_config: &DbConfig,
        listen_url: String,
        mut listener: Listener,
    ) -> anyhow::Result<Self> {
        // Before anything counts (plinth_tenants::counters).
        crate::metrics::install()?;
        let workers = settings.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let per_worker = DbConfig { pool_size: db_config.pool_size.div_ceil(workers).max(1), ..db_config.clone() };
        // One view of the replicas, kept by one watcher, for every pool.
        let replicas = Arc::new(plinth_tenants::replicas::Replicas::default());
        let pools: Arc<Vec<Db>> = (0..workers)
            .map(|_| Ok(Db::connect(&per_worker)?.with_replicas(replicas.clone())))
            .collect::<anyhow::Result<Vec<_>>>()?
            .into();
        // Tenant, session and key lookups miss their caches rarely, and the
        // rate limits of the sensitive routes count in a shared table: a
        // small pool of their own.
        let resolver_db = Db::connect(&DbConfig { pool_size: 4, ..db_config.clone() })?.with_replicas(replicas);
        let every_pool = pools.iter().cloned().chain([resolver_db.clone()]).collect();
        let resolver = TenantResolver::new(resolver_db.clone(), &settings.base_domain);
        listener.on(resolve::CHANNEL, resolver.listen_handler());
        let unknown_tokens = UnknownTokens::new(settings.limits.unknown_tokens_per_ip);
        let sessions = Sessions::new(resolver_db.clone(), unknown_tokens.clone());
        listener.on(sessions::CHANNEL, sessions.listen_handler());
        let keyring = web::Data::new(plinth_tenants::crypto::Keyring::load(
            settings.encryption_key.as_ref().map(plinth_tenants::crypto::Secret::expose),
            &settings.data_dir,
        )?);
        // Two-factor secrets stored in the clear before sealing began.
        let sealed = resolver_db
            .platform(async |c| plinth_identity::totp::reseal(c, &keyring, false).await)
            .await
            .context("sealing stored two-factor secrets")?;
        if sealed > 0 {
            tracing::info!(accounts = sealed, "sealed two-factor secrets stored in the clear");
        }
        let catalog = settings.catalog()?;
        let access = Access::start(resolver_db.clone(), catalog, Arc::new(MembershipRoles)).await?;
        for (channel, handler) in access.listen_handlers() {
            listener.on(channel, handler);
        }
        let api_keys = ApiKeys::new(resolver_db.clone(), Arc::clone(&unknown_tokens));
        let scim_tokens = ScimTokens::new(resolver_db.clone(), unknown_tokens);
        listener.on(sessions::API_KEYS_CHANNEL, api_keys.listen_handler());
        let metrics = web::Data::new(crate::metrics::Metrics::new(
            settings.metrics_token.as_ref().map(plinth_tenants::crypto::Secret::expose),
            every_pool,
            listener.health(),
        )?);
        let listener_health = web::Data::new(listener.health());
        let draining = crate::health::Draining::default();
        let draining_data = web::Data::new(draining.clone());
        let listener_task = listener.spawn(listen_url);

        let tcp = TcpListener::bind(&settings.listen).with_context(|| format!("binding {}", settings.listen))?;
        let port = tcp.local_addr()?.port();
        let body_limit = BodyLimit(settings.max_body_bytes);
        let resolver_data = web::Data::new(resolver);
        let sessions_data = web::Data::new(sessions.clone());
        let access_data = web::Data::new(access);
        let authenticator: web::Data<dyn Authenticate> =
            web::Data::from(
                Arc::new(Authenticator { sessions: sessions.clone(), api_keys, scim_tokens }) as Arc<dyn Authenticate>
            );
        let identity = IdentityConfig {
            client_ip_header: settings.client_ip_header.clone(),
            limits: settings.limits,
            max_organizations_per_user: settings.max_organizations_per_user,
            dns_resolver: settings.dns_resolver,
            ..IdentityConfig::default()
        };
        // Passkeys belong to the base domain (their relying party id):
        // refused at start, not at the first sign-in, when it cannot be one.
        let passkey_site = web::Data::new(
            plinth_identity::passkeys::ceremony::Site::new(&settings.base_domain)
                .context("PLINTH_BASE_DOMAIN cannot be the passkeys' relying party id")?,
        );
        let hashing_data = web::Data::new(Hashing::new(settings.hash_concurrency, settings.hash_wait));
        let body_timeout = BodyTimeout(settings.body_timeout);
        let limits_data = web::Data::new(RateLimits::new(&identity.limits, &resolver_db));
        let sweeper = tokio::spawn(sweep_rate_limits(resolver_db.clone()));
        let replica_watch = tokio::spawn(plinth_tenants::replicas::watch(
            resolver_db.clone(),
            plinth_tenants::replicas::Watch { every: settings.replica_check, max_lag: settings.replica_max_lag },
        ));
        let stripe_data = web::Data::new(settings.stripe.clone());
        let stripe_api = plinth_billing::api::Stripe::new(&settings.stripe, &settings.public_url)?.map(web::Data::new);
        let offboard = web::Data::from(Arc::new(CancelSubscriptions(stripe_api.clone())) as Arc<dyn Offboard>);
        let members_changed =
            web::Data::from(Arc::new(plinth_billing::process::QueueSeats { debounce: settings.stripe.seats_debounce })
                as Arc<dyn plinth_identity::members::MembersChanged>);
        let billing_summary =
            web::Data::from(Arc::new(plinth_billing::summary::Summary { grace: settings.stripe.grace })
                as Arc<dyn plinth_admin::tenant::BillingSummary>);
        let console_billing = {
            let api = stripe_api.as_ref().map(|d| d.clone().into_inner()).filter(|_| !settings.stripe.offline);
            let catalog = Arc::new(settings.catalog()?);
            let processor =
                plinth_billing::process::Processor::new(resolver_db.clone(), catalog, &settings.stripe, api);
            web::Data::from(Arc::new(plinth_billing::console::Console { processor })
                as Arc<dyn plinth_admin::console::ConsoleBilling>)
        };
        let client_ip_data = web::Data::new(ClientIpHeader(identity.client_ip_header.clone()));
        let identity_data = web::Data::new(identity);
        // Each quota is counted by the crate that owns what it counts.
        let counters = web::Data::new(
            Counters::default()
                .with(Quota::Projects, crate::projects::ProjectCount)
                .with(Quota::Members, plinth_identity::members::MemberSeats)
                .with(Quota::ApiKeys, plinth_identity::api_keys::LiveKeys),
        );
        let hsts = Hsts(settings.public_url.starts_with("https://"));
        let cors_origins = settings.cors_origins.clone();
        let document = crate::api::document();
        let route_table = web::Data::new(crate::routes::RouteTable::new(&document));
        let document = web::Data::new(crate::api::Document(
            serde_json::to_vec(&document).context("rendering the OpenAPI document")?.into(),
        ));
        let next_pool = Arc::new(AtomicUsize::new(0));
        let server = HttpServer::new(move || {
            let db = pools[next_pool.fetch_add(1, Ordering::Relaxed) % pools.len()].clone();
            let stripe_api = stripe_api.clone();
            App::new()
                // Registered only when Stripe is configured; billing routes
                // answer 503 billing_not_configured without it.
                .configure(|cfg| {
                    if let Some(api) = stripe_api {
                        cfg.app_data(api);
                    }
                })
                // Inside the request middleware, so its refusals are
                // enveloped and stamped like every other answer.
                .wrap(Condition::new(!cors_origins.is_empty(), plinth_http::cors::cors(&cors_origins)))
                .wrap(from_fn(request_span))
                .app_data(hsts)
                .app_data(keyring.clone())
                .app_data(web::Data::new(db))
                .app_data(resolver_data.clone())
                .app_data(sessions_data.clone())
                .app_data(access_data.clone())
                .app_data(authenticator.clone())
                .app_data(identity_data.clone())
                .app_data(passkey_site.clone())
                .app_data(counters.clone())
                .app_data(client_ip_data.clone())
                .app_data(limits_data.clone())
                .app_data(stripe_data.clone())
                .app_data(offboard.clone())
                .app_data(members_changed.clone())
                .app_data(billing_summary.clone())
                .app_data(console_billing.clone())
                .app_data(body_limit)
                .app_data(body_timeout)
                .app_data(hashing_data.clone())
                .app_data(listener_health.clone())
                .app_data(draining_data.clone())
                .app_data(metrics.clone())
                .app_data(web::QueryConfig::default().error_handler(|err, _| ApiError::invalid(err.to_string()).into()))
                .app_data(route_table.clone())
                .app_data(document.clone())
                .into_utoipa_app()
                .configure(crate::api::routes)
                .into_app()
                .configure(plinth_admin::console::configure)
                .default_service(web::to(crate::routes::not_found))
        })
        .workers(workers)
        // Per worker; beyond it connections wait in the listen backlog
        // instead of running the process out of file descriptors.
        .max_connections(settings.max_connections.div_ceil(workers).max(1))
        .shutdown_timeout(settings.shutdown_timeout.as_secs())
        // SIGTERM and SIGINT are handled in run_until_stopped (the drain).
        .disable_signals()
        .listen(tcp)?;
        tracing::info!(port, workers, "listening");
        let drain = settings.shutdown_drain;
        Ok(Self { port, server: server.run(), listener_task, sweeper, replica_watch, draining, drain })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT/SIGTERM, then stops accepting and lets in-flight
    /// requests finish (up to the shutdown timeout).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let (draining, drain) = (self.draining.clone(), self.drain);
        let signals = tokio::spawn(async move {
            crate::cli::shutdown_signal().await;
            // Not ready, still serving: the load balancer's health checks
            // take the instance out before it stops accepting.
            draining.set();
            if !drain.is_zero() {
                let drain_ms = u64::try_from(drain.as_millis()).unwrap_or(u64::MAX);
                tracing::info!(drain_ms, "draining: answering not ready before closing the listener");
                tokio::time::sleep(drain).await;
            }
            handle.stop(true).await;
        });
        let result = self.server.await;
        signals.abort();
        self.listener_task.abort();
        self.sweeper.abort();
        self.replica_watch.abort();
        result
    }

    /// A handle to stop the server from elsewhere (tests, signals).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }
}

/// Deletes drained rows of the shared rate-limit table once a minute (every
/// instance does; the deletes are small and cannot conflict in meaning).
async fn sweep_rate_limits(db: Db) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match plinth_http::ratelimit::sweep(&db).await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "drained rate-limit rows deleted"),
            Err(err) => {
                tracing::warn!(error = format!("{:#}", anyhow::Error::new(err)), "sweeping the rate-limit table failed")
            }
        }
    }
}

/// Before a platform admin's deletion: the tenant's Stripe subscriptions are
/// cancelled (see `plinth_billing::stripe::close_tenant`).
struct CancelSubscriptions(Option<web::Data<plinth_billing::stripe::Stripe>>);

impl Offboard for CancelSubscriptions {
    fn offboard<'a>(
        &'a self,
        db: &'a Db,
        tenant: plinth_tenants::TenantId,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), ApiError>> + Send + 'a>> {
        Box::pin(async move {
            let cancelled =
                plinth_billing::stripe::close_tenant(db, self.0.as_ref().map(|api| api.get_ref()), tenant).await?;
            if !cancelled.is_empty() {
                tracing::info!(tenant.id = %tenant, subscriptions = cancelled.len(), "subscriptions cancelled before deletion");
            }
            Ok(())
        })
    }
}

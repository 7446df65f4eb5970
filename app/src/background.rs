//! Composition of background work: the job worker with every crate's job
//! handlers, and the mailer with every crate's mail templates.

use anyhow::Context as _;
use std::sync::Arc;

use plinth_jobs::{Handlers, Worker, WorkerConfig};
use plinth_mail::{self as mail, Mailer, Templates, Transport};
use plinth_tenants::{Db, DbConfig};

use crate::config::Settings;

/// Every mail template Plinth knows, rendered with links on `public_url`.
pub fn templates(public_url: &str) -> anyhow::Result<Templates> {
    Templates::new(
        public_url,
        &[plinth_identity::mail::TEMPLATES, plinth_billing::mail::TEMPLATES, crate::exports::TEMPLATES],
    )
}

/// A worker with every job kind registered, on a pool of its own.
pub fn worker(settings: &Settings, db_config: &DbConfig, config: WorkerConfig) -> anyhow::Result<Worker> {
    let db = Db::connect(&DbConfig { pool_size: config.concurrency + 2, ..db_config.clone() })?;
    let transport = Transport::from_settings(
        settings.smtp_url.as_ref().map(plinth_tenants::crypto::Secret::expose),
        settings.data_dir.join("mail"),
    )?;
    let mailer = Arc::new(Mailer::new(db.clone(), transport, &settings.mail_from, templates(&settings.public_url)?)?);
    let mut handlers = Handlers::new();
    handlers.on(mail::DELIVER, mailer.handler());
    handlers
        .on(plinth_identity::impersonation::EXPIRED_JOB, plinth_identity::impersonation::expired_handler(db.clone()));
    // pg_dump reaches the server directly, not through a pooler.
    let direct = settings
        .listen_database_url
        .as_ref()
        .map_or_else(|| db_config.url.clone(), |u| plinth_tenants::crypto::Secret::expose(u).to_owned());
    handlers.on(crate::exports::EXPORT_JOB, crate::exports::export_handler(db.clone(), direct));
    handlers.on(crate::exports::EXPIRE_JOB, crate::exports::expire_handler(db.clone()));
    handlers.on(plinth_identity::personal_data::EXPIRE_JOB, plinth_identity::personal_data::expire_handler(db.clone()));
    handlers.on(
        plinth_admin::console::operations::MIGRATE_ALL_JOB,
        plinth_admin::console::operations::migrate_all_handler(db.clone()),
    );
    // Subscriptions are re-read from Stripe when it is configured.
    let api = plinth_billing::api::Stripe::new(&settings.stripe, &settings.public_url)?
        .map(Arc::new)
        .filter(|_| !settings.stripe.offline);
    let catalog = Arc::new(settings.catalog()?);
    let billing = plinth_billing::process::Processor::new(db.clone(), catalog, &settings.stripe, api);
    for (kind, handler) in billing.handlers() {
        handlers.on(kind, handler);
    }
    Ok(Worker::new(db, handlers, config))
}

/// Queues billing's periodic jobs (once across instances) when Stripe is
/// configured (and not offline): the sync, unless
/// `PLINTH_BILLING_SYNC_MINUTES` is 0, and the metered-usage sender. With
/// features from the catalog, clears any taken from Stripe's entitlements.
pub async fn schedule_billing(settings: &Settings, db_config: &DbConfig) -> anyhow::Result<()> {
    let db = Db::connect(&DbConfig { pool_size: 1, ..db_config.clone() })?;
    // Features come from the catalog: entitlements recorded while they came
    // from Stripe no longer count.
    if !settings.stripe.features_from_stripe {
        let cleared = db
            .platform(async |c| Ok::<_, anyhow::Error>(plinth_tenants::registry::clear_features(c).await?))
            .await
            .context("giving tenants their plans' features")?;
        if cleared > 0 {
            tracing::info!(tenants = cleared, "features come from the catalog again");
        }
    }
    if settings.stripe.secret_key.is_none() || settings.stripe.offline {
        return Ok(());
    }
    let sync =
        (!settings.stripe.sync_every.is_zero()).then(|| plinth_billing::process::sync_job(settings.stripe.sync_every));
    let meters = plinth_billing::process::meters_job(settings.stripe.meter_every);
    db.platform(async |c| {
        if let Some(sync) = sync {
            plinth_jobs::enqueue(c, sync).await?;
        }
        plinth_jobs::enqueue(c, meters).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("queueing billing's periodic jobs")?;
    Ok(())
}

/// Keeps the warm pool at `PLINTH_SPARE_SCHEMAS` spare tenant schemas
/// (`plinth_tenants::spares`), looking every second, until `stopped`; `None`
/// when the pool is off (0).
pub fn spare_filler(
    settings: &Settings,
    db_config: &DbConfig,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let size = settings.spare_schemas;
    if size == 0 {
        return Ok(None);
    }
    let db = Db::connect(&DbConfig { pool_size: 1, ..db_config.clone() })?;
    Ok(Some(every_second(stopped, move || {
        let db = db.clone();
        async move {
            match plinth_tenants::spares::fill(&db, size, plinth_tenants::migrate::TENANT_MIGRATIONS).await {
                Ok(0) => {}
                Ok(made) => tracing::debug!(made, "spare tenant schemas made"),
                Err(err) => tracing::warn!(error = %format!("{err:#}"), "filling the warm pool failed; trying again"),
            }
        }
    })))
}

/// Moves the audit entries of tenants on other shards from the outbox to
/// their logs (`plinth_tenants::audit::deliver`), every second, until
/// `stopped`. Every instance that runs the worker runs one; they take
/// different entries.
pub fn audit_deliverer(
    db_config: &DbConfig,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let db = Db::connect(&DbConfig { pool_size: 1, ..db_config.clone() })?;
    Ok(every_second(stopped, move || {
        let db = db.clone();
        // Until the outbox is empty, without waiting between batches.
        async move {
            loop {
                match plinth_tenants::audit::deliver(&db).await {
                    Ok(0) => return,
                    Ok(moved) => tracing::debug!(moved, "audit entries delivered to their shards"),
                    Err(err) => {
                        tracing::warn!(error = %format!("{err:#}"), "delivering audit entries failed; trying again");
                        return;
                    }
                }
            }
        }
    }))
}

/// Runs `tick` now and then a second after each run ends, until `stopped`.
fn every_second<F, Fut>(mut stopped: tokio::sync::watch::Receiver<bool>, mut tick: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            tick().await;
            tokio::select! {
                _ = stopped.changed() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    })
}

/// The worker settings from the configuration.
pub fn worker_config(settings: &Settings) -> WorkerConfig {
    WorkerConfig {
        concurrency: settings.worker_concurrency,
        shutdown_grace: settings.shutdown_timeout,
        ..WorkerConfig::default()
    }
}

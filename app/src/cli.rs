//! The `plinth` command line: one binary with subcommands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use plinth_tenants::migrate;
use plinth_tenants::{Db, DbConfig};

use plinth_identity::users::find_id_by_email;
use plinth_jobs as jobs;
use plinth_mail::EmailAddress;
use plinth_tenants::notify::Listener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::startup::Application;
use crate::{background, pg, telemetry};
use plinth_tenants::crypto::{Keyring, Secret};

mod shards;
mod tenants;

pub use tenants::{MigrateArgs, TenantsCommand, migrate_tenants};

#[derive(Debug, Parser)]
#[command(name = "plinth", version, about = "Plinth: a multi-tenant SaaS platform backend.")]
#[command(long_about = "Plinth: a multi-tenant SaaS platform backend.\n\n\
    Configuration comes from environment variables (DATABASE_URL, PLINTH_*), optionally preceded by a \
    file of NAME=value lines. With DATABASE_URL unset, Plinth uses PostgreSQL on 127.0.0.1:5432 or \
    starts a private cluster under PLINTH_DATA_DIR.")]
pub struct Cli {
    /// A file of NAME=value settings (default: $PLINTH_CONFIG, else ./plinth.env if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (after migrating, unless PLINTH_MIGRATE_ON_START=false).
    Serve,
    /// Apply platform migrations, then tenant migrations to every tenant schema that is behind.
    Migrate(MigrateArgs),
    /// Create, list, migrate, suspend and delete tenants.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Declare, list and drain the PostgreSQL servers that hold tenant schemas.
    #[command(subcommand)]
    Shards(shards::ShardsCommand),
    /// Run only the background job worker (mail delivery and other jobs).
    Worker,
    /// Inspect the job queue and retry dead jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Platform administrators (super-admins).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Stripe events: list what is waiting, process one again.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Print the OpenAPI document (as `GET /openapi.json` serves it), for client generators.
    Openapi,
    /// Ask the server on PLINTH_LISTEN whether it is ready (`GET /health/ready`);
    /// exits 0 when it is. For container health checks, where no curl is installed.
    Health,
}

#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Stored Stripe events, newest first.
    Events {
        /// Only events waiting with a reason.
        #[arg(long)]
        parked: bool,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Process one stored event again, now, and print the outcome.
    Replay { event_id: String },
    /// Re-read every tenant's subscriptions from Stripe and fix any drift.
    Sync,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Grant the platform admin role to an account. Without an account for
    /// the address, creates one with the password read from standard input.
    CreateSuperuser {
        #[arg(long)]
        email: String,
        /// Read the new account's password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Take the platform admin role away from an account.
    RevokeSuperuser {
        #[arg(long)]
        email: String,
    },
    /// Turn two-factor login off for an account whose owner lost both the
    /// authenticator and the recovery codes (after verifying who is asking):
    /// deletes the recovery codes and ends every session.
    ResetSecondFactor {
        #[arg(long)]
        email: String,
    },
    /// Seal every stored secret (two-factor secrets, answers kept for
    /// Idempotency-Key) under the first key of PLINTH_ENCRYPTION_KEY, after
    /// a new key was put first; the old keys can go once this has run.
    RotateKeys,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Counts by state, then the most recent jobs.
    List {
        /// Only jobs in this state: queued, running, done or dead.
        #[arg(long, value_parser = ["queued", "running", "done", "dead"])]
        status: Option<String>,
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Queue a dead job again, with fresh attempts.
    Retry { id: String },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Openapi = cli.command {
        // Needs no settings and no database.
        return print_openapi();
    }
    let settings = Settings::load(cli.config.as_deref())?;
    if let Command::Health = cli.command {
        // Needs no database: it asks the running server.
        return health(&settings.listen).await;
    }
    let telemetry = telemetry::init(settings.log_json, settings.otlp_endpoint.as_deref())?;
    raise_file_limit();
    let database =
        pg::prepare(settings.database_url.as_ref().map(Secret::expose), &settings.data_dir, "plinth").await?;
    let result = dispatch(cli.command, &settings, &database.url).await;
    database.shutdown();
    // Flushing blocks on the exporter's thread.
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    result
}

/// `plinth health`: `GET /health/ready` on the listen address (an
/// unspecified address such as 0.0.0.0 is asked on loopback).
async fn health(listen: &str) -> anyhow::Result<ExitCode> {
    let mut addr: std::net::SocketAddr = listen.parse().with_context(|| format!("PLINTH_LISTEN {listen:?}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    // reqwest's rustls takes the process's crypto provider (plain HTTP here,
    // but the client is built with TLS); already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build()?;
    match client.get(format!("http://{addr}/health/ready")).send().await {
        Ok(res) if res.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(res) => {
            eprintln!("not ready: {} {}", res.status(), res.text().await.unwrap_or_default());
            Ok(ExitCode::FAILURE)
        }
        Err(err) => {
            eprintln!("no answer from {addr}: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Raises the soft limit on open files to the hard limit: each client
/// connection is a descriptor, and the usual soft limit of 1,024 is reached
/// by a few hundred slow clients, after which nobody can connect. The
/// server's own cap (`PLINTH_MAX_CONNECTIONS`) stays below it.
fn raise_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the open file limit"),
    }
}

/// The pool settings for `url`.
pub fn db_config(settings: &Settings, url: &str) -> DbConfig {
    DbConfig {
        url: url.to_owned(),
        pool_size: settings.db_pool_size,
        wait_timeout: settings.db_wait_timeout,
        connect_timeout: settings.db_connect_timeout,
        statement_cache: settings.db_statement_cache,
        max_tenants_per_connection: settings.db_max_tenants_per_connection,
        max_connection_age: settings.db_max_connection_age,
        spill_after: settings.db_spill_after,
        // One per process: every pool made from this configuration (and
        // its clones) shares it.
        budget: Some(plinth_tenants::pool::Budget::new(
            settings.db_max_connections.unwrap_or(4 * settings.db_pool_size),
        )),
    }
}

async fn dispatch(command: Command, settings: &Settings, url: &str) -> anyhow::Result<ExitCode> {
    let listen_url = settings.listen_database_url.as_ref().map_or_else(|| url.to_owned(), |u| u.expose().to_owned());
    let timeouts =
        migrate::MigrationTimeouts { connect: settings.db_connect_timeout, lock: settings.migration_lock_timeout };
    match command {
        Command::Serve => {
            // Before anything counts: a counter handle taken earlier would
            // count nothing (plinth_tenants::counters).
            crate::metrics::install()?;
            let config = db_config(settings, url);
            if settings.migrate_on_start {
                // Platform migrations go straight to the server, never through a pooler.
                migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
                let db = Db::connect(&DbConfig { pool_size: 4, ..config.clone() })?;
                let code = migrate_tenants(&db, &MigrateArgs { concurrency: 4, lock_timeout_ms: 5000 }).await?;
                if code != ExitCode::SUCCESS {
                    tracing::warn!("some tenants failed to migrate; serving anyway (see above)");
                }
            } else {
                require_current_schema(&listen_url, timeouts).await?;
            }
            let mut listener = Listener::new();
            let (stop, stopped) = watch::channel(false);
            let (worker, filler, deliverer) = if settings.run_worker {
                let worker = background::worker(settings, &config, background::worker_config(settings))?;
                background::schedule_billing(settings, &config).await?;
                listener.on(jobs::CHANNEL, worker.listen_handler());
                let filler = background::spare_filler(settings, &config, stopped.clone())?;
                let deliverer = background::audit_deliverer(&config, stopped.clone())?;
                (Some(tokio::spawn(worker.run(stopped))), filler, Some(deliverer))
            } else {
                (None, None, None)
            };
            let app = Application::build(settings, &config, listen_url, listener).await?;
            let served = app.run_until_stopped().await.context("running the server");
            // The HTTP server has drained; now let running jobs finish.
            let _ = stop.send(true);
            if let Some(worker) = worker {
                worker.await.context("the job worker")?;
            }
            if let Some(filler) = filler {
                filler.await.context("the warm pool's filler")?;
            }
            if let Some(deliverer) = deliverer {
                deliverer.await.context("the audit deliverer")?;
            }
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            // One configuration, so every pool of the process shares one
            // bound on connections (PLINTH_DB_MAX_CONNECTIONS).
            let config = db_config(settings, url);
            let worker = background::worker(settings, &config, background::worker_config(settings))?;
            background::schedule_billing(settings, &config).await?;
            let mut listener = Listener::new();
            listener.on(jobs::CHANNEL, worker.listen_handler());
            let listening = listener.spawn(listen_url);
            let (stop, stopped) = watch::channel(false);
            let filler = background::spare_filler(settings, &config, stopped.clone())?;
            let deliverer = background::audit_deliverer(&config, stopped.clone())?;
            let running = tokio::spawn(worker.run(stopped));
            shutdown_signal().await;
            let _ = stop.send(true);
            running.await.context("the job worker")?;
            if let Some(filler) = filler {
                filler.await.context("the warm pool's filler")?;
            }
            deliverer.await.context("the audit deliverer")?;
            listening.abort();
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs(command) => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            let db = Db::connect(&DbConfig { pool_size: 2, ..db_config(settings, url) })?;
            jobs_command(command, &db).await
        }
        Command::Migrate(args) => {
            let applied = migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            eprintln!("platform: {} migration(s) applied", applied.len());
            let db = Db::connect(&db_config(settings, url))?;
            migrate_tenants(&db, &args).await
        }
        Command::Tenants(command) => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            let db = Db::connect(&db_config(settings, url))?;
            tenants::run(command, &db, settings, url).await
        }
        Command::Shards(command) => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            let db = Db::connect(&DbConfig { pool_size: 2, ..db_config(settings, url) })?;
            shards::run(command, &db).await
        }
        Command::Billing(command) => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            let db = Db::connect(&DbConfig { pool_size: 2, ..db_config(settings, url) })?;
            billing_command(command, &db, settings).await
        }
        Command::Admin(command) => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            let db = Db::connect(&DbConfig { pool_size: 2, ..db_config(settings, url) })?;
            admin_command(command, &db, settings).await
        }
        Command::Openapi => print_openapi(),
        Command::Health => health(&settings.listen).await,
    }
}

fn print_openapi() -> anyhow::Result<ExitCode> {
    println!("{}", crate::api::document().to_pretty_json()?);
    Ok(ExitCode::SUCCESS)
}

/// With `PLINTH_MIGRATE_ON_START=false`, `serve` migrates nothing: it only
/// checks that someone ran `plinth migrate` for this binary, and stops with
/// what to do if not.
async fn require_current_schema(url: &str, timeouts: migrate::MigrationTimeouts) -> anyhow::Result<()> {
    let target = plinth_tenants::postgres::Target::parse(url)?;
    let mut conn = tokio::time::timeout(timeouts.connect, target.connect_diesel())
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the database timed out after {} ms", timeouts.connect.as_millis()))?
        .context("connecting to check the platform schema")?;
    match migrate::platform_schema_state(&mut conn).await.context("reading the platform schema version")? {
        migrate::SchemaState::Current => Ok(()),
        // A newer binary migrated (a rolling deploy): migrations only add.
        migrate::SchemaState::Ahead(version) => {
            tracing::warn!(version, "the database has a platform migration newer than this binary; serving anyway");
            Ok(())
        }
        state => {
            anyhow::bail!("{state}; PLINTH_MIGRATE_ON_START is false, so run `plinth migrate` with this binary first")
        }
    }
}

/// Waits for SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}

async fn jobs_command(command: JobsCommand, db: &Db) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::List { status, limit } => {
            let c = jobs::counts(db).await?;
            println!(
                "queued {}  running {}  retrying {}  dead {}  done {}",
                c.queued, c.running, c.retrying, c.dead, c.done
            );
            let recent = jobs::list(db, status.as_deref(), limit).await?;
            if !recent.is_empty() {
                println!("{:<36} {:<20} {:<8} {:>8} {:<20} last error", "id", "kind", "status", "attempts", "run at");
            }
            for j in recent {
                let error: String = j.last_error.unwrap_or_default().chars().take(80).collect();
                println!(
                    "{:<36} {:<20} {:<8} {:>8} {:<20} {error}",
                    j.id,
                    j.kind,
                    j.status,
                    format!("{}/{}", j.attempts, j.max_attempts),
                    j.run_at.format("%Y-%m-%d %H:%M:%S")
                );
            }
        }
        JobsCommand::Retry { id } => {
            let id: jobs::JobId = id.parse().map_err(|_| anyhow::anyhow!("{id:?} is not a job id"))?;
            if !jobs::retry(db, id).await? {
                bail!("no dead or queued job {id}");
            }
            println!("job {id} queued again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn billing_command(command: BillingCommand, db: &Db, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        BillingCommand::Events { parked, limit } => {
            let client = db
                .platform(async |c| {
                    Ok::<_, anyhow::Error>(plinth_billing::webhook::list_events(c, parked, limit).await?)
                })
                .await?;
            println!("{:<32} {:<40} {:<9} {:<20} reason", "id", "type", "status", "received");
            for e in client {
                println!(
                    "{:<32} {:<40} {:<9} {:<20} {}",
                    e.id,
                    e.kind.unwrap_or_default(),
                    e.status,
                    e.received_at.format("%Y-%m-%d %H:%M:%S"),
                    e.parked_reason.unwrap_or_default()
                );
            }
        }
        BillingCommand::Sync => {
            let api = plinth_billing::api::Stripe::new(&settings.stripe, &settings.public_url)?
                .map(std::sync::Arc::new)
                .ok_or_else(|| anyhow::anyhow!("PLINTH_STRIPE_SECRET_KEY is not set"))?;
            let processor = plinth_billing::process::Processor::new(
                db.clone(),
                std::sync::Arc::new(settings.catalog()?),
                &settings.stripe,
                Some(api),
            );
            let synced = processor.sync().await.context("syncing with Stripe")?;
            println!("{} customer(s) read, {} plan(s) changed", synced.customers, synced.changed.len());
            for (tenant, plan) in &synced.changed {
                println!("  {tenant}: now {plan}");
            }
            for (tenant, err) in &synced.failed {
                println!("  {tenant}: failed: {err}");
            }
            if !synced.failed.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        BillingCommand::Replay { event_id } => {
            let api = plinth_billing::api::Stripe::new(&settings.stripe, &settings.public_url)?
                .map(std::sync::Arc::new)
                .filter(|_| !settings.stripe.offline);
            let processor = plinth_billing::process::Processor::new(
                db.clone(),
                std::sync::Arc::new(settings.catalog()?),
                &settings.stripe,
                api,
            );
            let outcome = processor.replay(&event_id).await.context("replaying the event")?;
            println!("{event_id}: {outcome:?}");
            if matches!(
                outcome,
                plinth_billing::process::Outcome::Parked(_) | plinth_billing::process::Outcome::Refused(_)
            ) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn admin_command(command: AdminCommand, db: &Db, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::CreateSuperuser { email, password_stdin } => {
            let email = EmailAddress::parse(&email).map_err(|e| anyhow::anyhow!("--email: {e}"))?;
            let hash = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).context("reading the password from standard input")?;
                let password = line.trim_end_matches(['\r', '\n']).to_owned();
                plinth_identity::password::check("password", &password)
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                Some(
                    plinth_identity::password::Hashing::default()
                        .hash(password)
                        .await
                        .context("hashing the password")?,
                )
            } else {
                None
            };
            let created = db
                .platform(async |c| {
                    let (user, created) = match (find_id_by_email(c, &email).await?.map(|u| u.0), &hash) {
                        (Some(id), _) => (id, false),
                        (None, Some(hash)) => {
                            let user = plinth_identity::users::insert_user(c, &email, hash)
                                .await
                                .context("creating the account")?;
                            (user.id, true)
                        }
                        (None, None) => bail!("no account has this address; pass --password-stdin to create one"),
                    };
                    plinth_access::grants::grant(c, user).await?;
                    Ok::<_, anyhow::Error>(created)
                })
                .await?;
            let what = if created { "created the account and granted it" } else { "granted" };
            println!("{what} the platform admin role");
        }
        AdminCommand::RevokeSuperuser { email } => {
            let email = EmailAddress::parse(&email).map_err(|e| anyhow::anyhow!("--email: {e}"))?;
            let revoked = db
                .platform(async |c| match find_id_by_email(c, &email).await?.map(|u| u.0) {
                    Some(id) => Ok::<_, anyhow::Error>(plinth_access::grants::revoke(c, id).await?),
                    None => Ok(false),
                })
                .await?;
            if !revoked {
                bail!("this address holds no platform admin role");
            }
            println!("revoked the platform admin role");
        }
        AdminCommand::ResetSecondFactor { email } => {
            let email = EmailAddress::parse(&email).map_err(|e| anyhow::anyhow!("--email: {e}"))?;
            let found = db
                .platform(async |c| {
                    Ok::<_, anyhow::Error>(plinth_identity::totp::reset_second_factor(c, email.as_str()).await?)
                })
                .await?;
            if !found {
                bail!("no account has this address");
            }
            println!("two-factor login is off for this account; its sessions have ended");
        }
        AdminCommand::RotateKeys => {
            let ring = Keyring::load(settings.encryption_key.as_ref().map(Secret::expose), &settings.data_dir)?;
            let (accounts, answers) = db
                .platform(async |c| {
                    let accounts = plinth_identity::totp::reseal(c, &ring, true).await?;
                    let answers = plinth_tenants::idempotency::reseal(c, &ring).await?;
                    Ok::<_, anyhow::Error>((accounts, answers))
                })
                .await?;
            // Answers to writes of tenants on other shards are kept there.
            let mut answers = answers;
            let all = db.platform(async |c| Ok::<_, anyhow::Error>(plinth_tenants::shards::list(c).await?)).await?;
            for shard in all.iter().filter(|s| !s.name.is_primary()) {
                answers += db
                    .on_shard(&shard.name, async |c| plinth_tenants::idempotency::reseal(c, &ring).await)
                    .await
                    .with_context(|| format!("on shard {}", shard.name))?;
            }
            println!(
                "sealed under the first key: the two-factor secrets of {accounts} accounts, {answers} stored answers"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! The `plinth` command line: one binary with subcommands.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use plinth_tenants::migrate::{self, MigrateEvent, MigrateOptions, TENANT_MIGRATIONS, TenantOutcome};
use plinth_tenants::{Db, DbConfig, Slug, Tenant, TenantStatus, registry};

use plinth_identity::users::find_id_by_email;
use plinth_jobs as jobs;
use plinth_mail::EmailAddress;
use plinth_tenants::audit::Actor;
use plinth_tenants::notify::Listener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::startup::Application;
use crate::{background, pg, telemetry};
use plinth_tenants::crypto::{Keyring, Secret};

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

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant: registry row, schema and every tenant migration, in one transaction.
    Create {
        /// Lowercase, 3-40 characters of a-z, 0-9 and '-', starting with a letter.
        slug: String,
        /// The organization's display name.
        #[arg(long)]
        name: String,
    },
    /// List tenants with their status and plan.
    List,
    /// Apply tenant migrations to every tenant schema that is behind.
    Migrate(MigrateArgs),
    /// Move a tenant to another plan of the catalog (a manual override of billing).
    SetPlan { slug: String, plan: String },
    /// Stop serving a tenant (403 tenant_suspended); its data is kept.
    Suspend { slug: String },
    /// Serve a suspended tenant again.
    Reactivate { slug: String },
    /// Delete a tenant: cancel its Stripe subscriptions (nothing is deleted if Stripe cannot be
    /// reached), stop serving it at once, then drop its schema and all its data.
    Delete {
        slug: String,
        /// Confirm that the tenant's data is to be destroyed.
        #[arg(long)]
        yes: bool,
    },
    /// Route a custom domain to a tenant. You vouch that its DNS points at Plinth.
    AddDomain { slug: String, domain: String },
    /// Show the template tenant, or make <SLUG> the template: every new tenant starts with a
    /// copy of its rows (not its audit log). --clear: new tenants start empty.
    Template {
        slug: Option<String>,
        #[arg(long, conflicts_with = "slug")]
        clear: bool,
    },
    /// Write one tenant's archive: its schema (pg_dump), its platform rows (registry, memberships,
    /// domains, subscription links) and a manifest with versions and checksums, in one snapshot.
    Backup {
        slug: String,
        /// Where to write it (default: <slug>-<UTC time>.tar in the current directory).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
    /// Bring a tenant back from its archive: as itself (after it was deleted), or with --as as a
    /// copy beside the original (new id and schema, same members; no domains, no subscriptions).
    /// An archive from a newer Plinth is refused; one from an older Plinth is migrated.
    Restore {
        file: std::path::PathBuf,
        /// Restore a copy under this new slug.
        #[arg(long = "as", value_name = "SLUG")]
        copy_as: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Tenants migrated at the same time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// How long one tenant may wait for a lock before it fails and the run moves on.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub lock_timeout_ms: u64,
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
            let (worker, filler) = if settings.run_worker {
                let worker = background::worker(settings, &config, background::worker_config(settings))?;
                background::schedule_billing(settings, &config).await?;
                listener.on(jobs::CHANNEL, worker.listen_handler());
                let filler = background::spare_filler(settings, &config, stopped.clone())?;
                (Some(tokio::spawn(worker.run(stopped))), filler)
            } else {
                (None, None)
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
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker => {
            migrate::run_platform_migrations_with(&listen_url, timeouts).await?;
            let worker = background::worker(settings, &db_config(settings, url), background::worker_config(settings))?;
            background::schedule_billing(settings, &db_config(settings, url)).await?;
            let mut listener = Listener::new();
            listener.on(jobs::CHANNEL, worker.listen_handler());
            let listening = listener.spawn(listen_url);
            let (stop, stopped) = watch::channel(false);
            let filler = background::spare_filler(settings, &db_config(settings, url), stopped.clone())?;
            let running = tokio::spawn(worker.run(stopped));
            shutdown_signal().await;
            let _ = stop.send(true);
            running.await.context("the job worker")?;
            if let Some(filler) = filler {
                filler.await.context("the warm pool's filler")?;
            }
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
            tenants(command, &db, settings, url).await
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
            println!(
                "sealed under the first key: the two-factor secrets of {accounts} accounts, {answers} stored answers"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn tenants(command: TenantsCommand, db: &Db, settings: &Settings, url: &str) -> anyhow::Result<ExitCode> {
    match command {
        TenantsCommand::Create { slug, name } => {
            let slug = Slug::parse(&slug).map_err(|e| anyhow::anyhow!("slug {e}"))?;
            let tenant = registry::create(db, &slug, &name).await?;
            println!("created tenant {} ({}) in schema {}", tenant.slug, tenant.id, tenant.schema);
        }
        TenantsCommand::List => {
            let tenants = db.platform(async |c| Ok::<_, anyhow::Error>(registry::list(c).await?)).await?;
            println!("{:<40} {:<36} {:<10} {:<10} created", "slug", "id", "status", "plan");
            for t in tenants {
                println!(
                    "{:<40} {:<36} {:<10} {:<10} {}",
                    t.slug,
                    t.id,
                    t.status.as_str(),
                    t.plan,
                    t.created_at.format("%Y-%m-%d %H:%M")
                );
            }
        }
        TenantsCommand::Migrate(args) => return migrate_tenants(db, &args).await,
        TenantsCommand::SetPlan { slug, plan } => {
            let tenant = find(db, &slug).await?;
            let catalog = settings.catalog()?;
            if catalog.get(&plan).is_none() {
                let known: Vec<_> = catalog.plans().iter().map(|p| p.name.as_str()).collect();
                bail!("no plan {plan:?} in the catalog (plans: {})", known.join(", "));
            }
            let changed = db
                .platform(async |c| {
                    let by = serde_json::json!({ "by": "plinth tenants" });
                    Ok::<_, anyhow::Error>(
                        plinth_access::change_plan(
                            c,
                            &catalog,
                            tenant.id,
                            &plan,
                            registry::PlanSource::Operator,
                            Actor::System,
                            by,
                        )
                        .await?,
                    )
                })
                .await
                .context("changing the plan")?;
            if changed.is_none() {
                bail!("tenant {slug:?} is being deleted");
            }
            println!("tenant {slug} is now on {plan}");
        }
        TenantsCommand::Suspend { slug } => set_status(db, &slug, TenantStatus::Suspended).await?,
        TenantsCommand::Reactivate { slug } => set_status(db, &slug, TenantStatus::Active).await?,
        TenantsCommand::Delete { slug, yes } => {
            if !yes {
                bail!("deleting destroys all of the tenant's data; pass --yes to confirm");
            }
            let tenant = find(db, &slug).await?;
            // Stripe first: a tenant whose subscriptions could not be
            // cancelled is not deleted.
            let api = plinth_billing::api::Stripe::new(&settings.stripe, &settings.public_url)?;
            let cancelled = plinth_billing::stripe::close_tenant(db, api.as_ref(), tenant.id).await.context(
                "cancelling the tenant's Stripe subscriptions (nothing was deleted; set PLINTH_STRIPE_SECRET_KEY \
                 or try again when Stripe answers)",
            )?;
            for sub in &cancelled {
                println!("cancelled Stripe subscription {sub}");
            }
            registry::delete(db, tenant.id).await?;
            println!("deleted tenant {slug}");
        }
        TenantsCommand::AddDomain { slug, domain } => {
            let Some(domain) = registry::parse_domain(&domain) else {
                bail!("{domain:?} is not a domain name");
            };
            let tenant = find(db, &slug).await?;
            db.tenant_rows(tenant.scope(), async |rows| {
                Ok::<_, anyhow::Error>(registry::add_domain(rows, &domain, true).await?)
            })
            .await?;
            println!("tenant {slug} is now served on {domain}");
        }
        TenantsCommand::Template { slug, clear } => {
            use plinth_tenants::template;
            if clear {
                db.platform(async |c| Ok::<_, anyhow::Error>(template::set(c, None).await?)).await?;
                println!("no template: new tenants start empty");
            } else if let Some(slug) = slug {
                let tenant = find(db, &slug).await?;
                db.platform(async |c| Ok::<_, anyhow::Error>(template::set(c, Some(tenant.id)).await?)).await?;
                println!("new tenants start with a copy of {slug}'s rows");
            } else {
                match db.platform(async |c| Ok::<_, anyhow::Error>(template::current(c).await?)).await? {
                    Some(t) => println!("template: {} ({})", t.slug, t.id),
                    None => println!("no template: new tenants start empty"),
                }
            }
        }
        TenantsCommand::Backup { slug, out } => {
            let tenant = find(db, &slug).await?;
            let out =
                out.unwrap_or_else(|| format!("{slug}-{}.tar", chrono::Utc::now().format("%Y%m%dT%H%M%SZ")).into());
            let mut archive = crate::backup::backup(db, url, tenant.id).await?;
            // Written beside its final name, then renamed: a failed backup
            // never leaves a partial archive under the name asked for.
            let partial = out.with_extension("partial");
            let file = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            archive.write(&mut writer).context("writing the archive")?;
            writer.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&partial, &out).with_context(|| format!("renaming to {}", out.display()))?;
            let dump = archive.manifest.files.get("schema.dump").map_or(0, |f| f.bytes);
            println!(
                "wrote {} (tenant {slug}, {} tenant migrations, schema dump {dump} bytes)",
                out.display(),
                archive.manifest.tenant_migrations.len()
            );
        }
        TenantsCommand::Restore { file, copy_as } => {
            let copy_as =
                copy_as.map(|s| Slug::parse(&s).map_err(|e| anyhow::anyhow!("--as {s:?}: {e}"))).transpose()?;
            let input = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let archive = plinth_tenants::backup::Archive::read(std::io::BufReader::new(input))
                .with_context(|| format!("reading {}", file.display()))?;
            let restored = crate::backup::restore(db, url, &archive, copy_as).await?;
            let what = if restored.id.0 == archive.manifest.tenant.id { "restored" } else { "restored a copy as" };
            println!("{what} tenant {} ({})", restored.slug, restored.id);
            println!(
                "  members: {} restored, {} skipped (no account any more)",
                restored.members.restored, restored.members.skipped
            );
            println!(
                "  domains: {} restored, {} skipped (held by another tenant, or the original's)",
                restored.registry.domains, restored.registry.domains_skipped
            );
            if restored.subscriptions > 0 {
                println!(
                    "  subscriptions: {} restored; run `plinth billing sync` to bring them up to date with Stripe",
                    restored.subscriptions
                );
            }
            if !restored.registry.migrated.is_empty() {
                println!("  migrated: {}", restored.registry.migrated.join(", "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn find(db: &Db, slug: &str) -> anyhow::Result<Tenant> {
    db.platform(async |c| Ok::<_, anyhow::Error>(registry::find_by_slug(c, slug).await?))
        .await?
        .with_context(|| format!("no tenant {slug:?}"))
}

async fn set_status(db: &Db, slug: &str, status: TenantStatus) -> anyhow::Result<()> {
    let tenant = find(db, slug).await?;
    let updated = db
        .platform(async |c| {
            plinth_admin::platform::set_status(c, tenant.id, status, Actor::System, "plinth tenants").await
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    match updated {
        Some(t) => println!("tenant {} is {}", t.slug, t.status.as_str()),
        None => bail!("tenant {slug:?} is being deleted"),
    }
    Ok(())
}

/// Migrates every tenant that is behind, with a progress bar on a terminal
/// and log lines otherwise. Non-zero exit if any tenant failed.
pub async fn migrate_tenants(db: &Db, args: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let options = MigrateOptions {
        concurrency: usize::from(args.concurrency),
        lock_timeout: std::time::Duration::from_millis(args.lock_timeout_ms),
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tenants {msg}") {
            bar.set_style(style);
        }
        bar
    });
    let on_event = |event: MigrateEvent<'_>| match event {
        MigrateEvent::Started { behind, total } => {
            if let Some(bar) = &bar {
                bar.set_length(behind as u64);
            }
            tracing::info!(tenants.behind = behind, tenants.total = total, "migrating tenants");
        }
        MigrateEvent::TenantDone { slug, outcome } => {
            if let Some(bar) = &bar {
                bar.inc(1);
                bar.set_message(slug.to_owned());
            } else {
                match outcome {
                    TenantOutcome::Migrated { versions } => {
                        tracing::info!(tenant.slug = slug, migrations = versions.len(), "tenant migrated")
                    }
                    TenantOutcome::Skipped => tracing::info!(tenant.slug = slug, "tenant already current"),
                    TenantOutcome::Failed { error } => {
                        tracing::error!(tenant.slug = slug, error, "tenant migration failed")
                    }
                }
            }
        }
    };
    let report = migrate::migrate_tenants(db, TENANT_MIGRATIONS, &options, &on_event).await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "tenants: {} total, {} already current, {} migrated, {} failed",
        report.total,
        report.up_to_date,
        report.migrated.len(),
        report.failed.len()
    );
    for (slug, error) in &report.failed {
        eprintln!("  FAILED {slug}: {error}");
    }
    Ok(if report.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

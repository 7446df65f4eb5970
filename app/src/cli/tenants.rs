//! `plinth tenants …`: create, list, migrate, suspend, delete, route domains
//! to, template, back up, restore and move tenants.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use plinth_tenants::audit::Actor;
use plinth_tenants::migrate::{self, MigrateEvent, MigrateOptions, TENANT_MIGRATIONS, TenantOutcome};
use plinth_tenants::{Db, Slug, Tenant, TenantStatus, registry};

use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// Create a tenant: registry row, schema and every tenant migration, in one transaction.
    Create {
        /// Lowercase, 3-40 characters of a-z, 0-9 and '-', starting with a letter.
        slug: String,
        /// The organization's display name.
        #[arg(long)]
        name: String,
        /// The shard to place it on (an open one); default: the open shard with the fewest tenants.
        #[arg(long)]
        shard: Option<String>,
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
    /// Move a tenant to another shard while it is served: its rows are copied with logical
    /// replication, its writes held for a moment (at most --max-pause-ms) while the last changes
    /// arrive and the registry flips; then every instance serves it from there. The source's
    /// server needs wal_level = logical.
    Move {
        slug: String,
        /// The shard to move it to (an open one).
        #[arg(long)]
        to: String,
        /// Keep the old copy on the source (renamed, refusing writes) instead of dropping it.
        #[arg(long)]
        keep: bool,
        /// The longest the tenant's writes may be held; past it the move gives up, nothing changed.
        #[arg(long, default_value_t = 2000, value_name = "MS")]
        max_pause_ms: u64,
        /// How long the copy may take to catch up before the move gives up.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        catch_up_secs: u64,
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
        /// The shard to load its schema on (an open one; default: the primary).
        #[arg(long)]
        shard: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Tenants migrated at the same time on each shard.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// How long one tenant may wait for a lock before it fails and the run moves on.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub lock_timeout_ms: u64,
}

pub async fn run(command: TenantsCommand, db: &Db, settings: &Settings, url: &str) -> anyhow::Result<ExitCode> {
    match command {
        TenantsCommand::Create { slug, name, shard } => {
            let slug = Slug::parse(&slug).map_err(|e| anyhow::anyhow!("slug {e}"))?;
            let shard = shard
                .map(|s| plinth_tenants::ShardName::parse(&s).map_err(|e| anyhow::anyhow!("--shard {s:?}: {e}")))
                .transpose()?;
            let tenant = registry::create_on(db, &slug, &name, shard.as_ref()).await?;
            println!(
                "created tenant {} ({}) in schema {} on shard {}",
                tenant.slug, tenant.id, tenant.schema, tenant.shard
            );
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
            anyhow::ensure!(!tenant.moving, "{slug} is being moved to another shard: delete it when the move is done");
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
        TenantsCommand::Move { slug, to, keep, max_pause_ms, catch_up_secs } => {
            let to = plinth_tenants::ShardName::parse(&to).map_err(|e| anyhow::anyhow!("--to {to:?}: {e}"))?;
            let options = plinth_tenants::moves::MoveOptions {
                keep,
                catch_up: std::time::Duration::from_secs(catch_up_secs),
                max_pause: std::time::Duration::from_millis(max_pause_ms),
            };
            let report = plinth_tenants::moves::move_tenant(db, &slug, &to, &options, &|step| eprintln!("{step}"))
                .await
                .with_context(|| format!("moving {slug} to shard {to}"))?;
            println!(
                "moved {slug} from shard {} to {}: {} rows, writes held for {} ms",
                report.from,
                report.to,
                report.rows,
                report.pause.as_millis()
            );
            if let Some(kept) = report.kept {
                println!("the old copy is kept on shard {} as schema {kept}", report.from);
            }
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
                anyhow::ensure!(
                    tenant.shard.is_primary(),
                    "{slug} lives on shard {}: the template must live on the primary",
                    tenant.shard
                );
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
        TenantsCommand::Restore { file, copy_as, shard } => {
            let copy_as =
                copy_as.map(|s| Slug::parse(&s).map_err(|e| anyhow::anyhow!("--as {s:?}: {e}"))).transpose()?;
            let shard = shard
                .map(|s| plinth_tenants::ShardName::parse(&s).map_err(|e| anyhow::anyhow!("--shard {s:?}: {e}")))
                .transpose()?;
            let input = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let archive = plinth_tenants::backup::Archive::read(std::io::BufReader::new(input))
                .with_context(|| format!("reading {}", file.display()))?;
            let restored = crate::backup::restore(db, url, &archive, copy_as, shard).await?;
            let what = if restored.id.0 == archive.manifest.tenant.id { "restored" } else { "restored a copy as" };
            println!("{what} tenant {} ({})", restored.slug, restored.id);
            println!(
                "  members: {} restored, {} skipped (no account any more)",
                restored.members.restored, restored.members.skipped
            );
            println!(
                "  API keys: {}, invitations: {} restored (a copy has none of the original's)",
                restored.members.api_keys, restored.members.invitations
            );
            println!(
                "  email domains, single sign-on and SCIM directory: {} rows restored (a copy has none of the original's)",
                restored.members.domains_and_directory
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

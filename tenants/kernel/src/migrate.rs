//! Migrations. Platform migrations (`migrations/platform/`) run through
//! diesel_migrations' own harness. Tenant migrations (`migrations/tenant/`,
//! the same folder layout) are applied by Plinth to each tenant schema inside
//! one transaction per tenant, and recorded in the central ledger
//! `public.tenant_migrations`, so "which tenants are behind" is one query.
//!
//! Rules for a tenant migration: unqualified names only (the schema comes from
//! `search_path`), no transaction control, no `SET search_path`.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context as _;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Uuid as SqlUuid};
use diesel_async::{AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::StreamExt as _;

use crate::db::{Db, PgConn};
use crate::ids::{SchemaName, ShardName, TenantId};
use crate::schema::{tenant_migrations, tenants};

/// One tenant migration, embedded at build time.
#[derive(Debug, Clone, Copy)]
pub struct TenantMigration {
    /// The folder's leading timestamp, digits only (e.g. `20261123000001`).
    pub version: &'static str,
    /// The folder name.
    pub name: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/tenant_migrations.rs"));

pub const PLATFORM_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/platform");

/// The advisory lock platform migrations run under.
const PLATFORM_LOCK: i64 = 72_170_001;

/// How long platform migrations wait: for a connection, and for another
/// instance that holds the migration lock.
#[derive(Debug, Clone, Copy)]
pub struct MigrationTimeouts {
    pub connect: Duration,
    pub lock: Duration,
}

impl Default for MigrationTimeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), lock: Duration::from_secs(60) }
    }
}

/// Applies pending platform migrations with the default timeouts. See
/// [`run_platform_migrations_with`].
pub async fn run_platform_migrations(url: &str) -> anyhow::Result<Vec<String>> {
    run_platform_migrations_with(url, MigrationTimeouts::default()).await
}

/// Applies pending platform migrations, holding an advisory lock so two
/// instances starting at once do not race. Returns the versions applied.
/// A database that does not answer within `timeouts.connect`, or a lock
/// held by another instance for longer than `timeouts.lock`, is an error
/// that says so; waiting for the lock is logged.
pub async fn run_platform_migrations_with(url: &str, timeouts: MigrationTimeouts) -> anyhow::Result<Vec<String>> {
    let target = crate::postgres::Target::parse(url)?;
    let mut conn = tokio::time::timeout(timeouts.connect, target.connect_diesel())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "connecting to the database timed out after {} ms: is PostgreSQL at DATABASE_URL up and answering?",
                timeouts.connect.as_millis()
            )
        })?
        .context("connecting to run platform migrations")?;
    // Raw SQL: an advisory-lock function diesel has no declaration for.
    let locked: LockTaken = diesel::sql_query(format!("SELECT pg_try_advisory_lock({PLATFORM_LOCK}) AS taken"))
        .get_result(&mut conn)
        .await
        .context("taking the platform migration lock")?;
    if !locked.taken {
        tracing::warn!(
            timeout_ms = timeouts.lock.as_millis() as u64,
            "another instance is running platform migrations; waiting for it"
        );
        let wait = format!(
            "SET lock_timeout = {}; SELECT pg_advisory_lock({PLATFORM_LOCK}); RESET lock_timeout",
            timeouts.lock.as_millis().max(1)
        );
        crate::db::batch(&mut conn, &wait).await.with_context(|| {
            format!(
                "waited {} ms for the platform migration lock, held by another instance (PLINTH_MIGRATION_LOCK_TIMEOUT_MS)",
                timeouts.lock.as_millis()
            )
        })?;
    }
    let mut harness = AsyncMigrationHarness::new(conn);
    let applied = harness
        .run_pending_migrations(PLATFORM_MIGRATIONS)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("running platform migrations")?
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    let mut conn = harness.into_inner();
    crate::db::batch(&mut conn, &format!("SELECT pg_advisory_unlock({PLATFORM_LOCK})")).await?;
    Ok(applied)
}

#[derive(QueryableByName)]
struct LockTaken {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    taken: bool,
}

/// How the database's platform schema compares with this binary's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    Current,
    /// This many of the binary's migrations are not applied.
    Behind(usize),
    /// The database has a migration this binary does not know (a newer binary ran).
    Ahead(String),
}

impl std::fmt::Display for SchemaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Current => f.write_str("platform migrations are current"),
            Self::Behind(n) => {
                write!(f, "platform migrations are behind this binary: {n} pending (run plinth migrate)")
            }
            Self::Ahead(v) => write!(f, "the database has platform migration {v}, newer than this binary"),
        }
    }
}

/// The versions of the platform migrations built into this binary.
pub fn platform_versions() -> Vec<String> {
    diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(&PLATFORM_MIGRATIONS)
        .map(|ms| ms.iter().map(|m| m.name().version().to_string()).collect())
        .unwrap_or_default()
}

#[derive(QueryableByName)]
struct AppliedVersion {
    #[diesel(sql_type = Text)]
    version: String,
}

/// The newest platform migration applied to the database.
pub async fn newest_platform_version(conn: &mut AsyncPgConnection) -> Result<Option<String>, diesel::result::Error> {
    // Raw SQL: the table is diesel's own.
    let newest: Vec<AppliedVersion> =
        diesel::sql_query("SELECT max(version) AS version FROM public.__diesel_schema_migrations HAVING count(*) > 0")
            .load(conn)
            .await?;
    Ok(newest.into_iter().next().map(|v| v.version))
}

/// The tenant migrations recorded for `tenant`, oldest first.
pub async fn applied_versions(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
) -> Result<Vec<String>, diesel::result::Error> {
    tenant_migrations::table
        .filter(tenant_migrations::tenant_id.eq(tenant.0))
        .select(tenant_migrations::version)
        .order(tenant_migrations::version.asc())
        .load(conn)
        .await
}

/// Compares the applied platform migrations with this binary's (two cheap
/// catalog reads; run by readiness checks).
pub async fn platform_schema_state(conn: &mut AsyncPgConnection) -> Result<SchemaState, diesel::result::Error> {
    let known = platform_versions();
    // Raw SQL: the table is diesel's own and may not exist yet.
    let applied: Vec<AppliedVersion> = diesel::sql_query(
        "SELECT version FROM public.__diesel_schema_migrations \
         WHERE to_regclass('public.__diesel_schema_migrations') IS NOT NULL",
    )
    .load(conn)
    .await
    .or_else(|e| match e {
        // No table at all: nothing applied.
        diesel::result::Error::DatabaseError(_, ref info) if info.message().contains("does not exist") => {
            Ok(Vec::new())
        }
        other => Err(other),
    })?;
    let applied: HashSet<String> = applied.into_iter().map(|a| a.version).collect();
    // A pending migration of this binary matters more than one it does not
    // know: its code needs the former.
    let behind = known.iter().filter(|v| !applied.contains(*v)).count();
    if behind > 0 {
        return Ok(SchemaState::Behind(behind));
    }
    Ok(match applied.iter().find(|v| !known.contains(v)) {
        Some(unknown) => SchemaState::Ahead(unknown.clone()),
        None => SchemaState::Current,
    })
}

/// Applies `migrations` (all of them, in order) to a freshly created schema in
/// the caller's transaction and records them in the ledger.
pub(crate) async fn apply_to_schema(
    conn: &mut PgConn,
    tenant: TenantId,
    schema: &SchemaName,
    migrations: &[TenantMigration],
) -> Result<(), diesel::result::Error> {
    let pending: Vec<&TenantMigration> = migrations.iter().collect();
    apply(conn, tenant, schema, &pending).await
}

pub(crate) async fn apply(
    conn: &mut PgConn,
    tenant: TenantId,
    schema: &SchemaName,
    pending: &[&TenantMigration],
) -> Result<(), diesel::result::Error> {
    if pending.is_empty() {
        return Ok(());
    }
    crate::db::batch(conn, &ddl(schema, pending)).await?;
    record(conn, tenant, pending.iter().copied()).await
}

/// The DDL of `pending` for `schema`, to run in a transaction: one round
/// trip that switches to the schema, runs every migration, switches back.
pub(crate) fn ddl(schema: &SchemaName, pending: &[&TenantMigration]) -> String {
    let mut sql = format!("SET LOCAL search_path TO {};\n", schema.quoted());
    for m in pending {
        sql.push_str(m.up);
        sql.push_str(";\n");
    }
    sql.push_str("SET LOCAL search_path TO DEFAULT;");
    sql
}

/// Records `migrations` in `tenant`'s ledger.
pub(crate) async fn record<'m>(
    conn: &mut PgConn,
    tenant: TenantId,
    migrations: impl IntoIterator<Item = &'m TenantMigration>,
) -> Result<(), diesel::result::Error> {
    let rows: Vec<_> = migrations
        .into_iter()
        .map(|m| (tenant_migrations::tenant_id.eq(tenant.0), tenant_migrations::version.eq(m.version)))
        .collect();
    diesel::insert_into(tenant_migrations::table).values(rows).execute(conn).await?;
    Ok(())
}

/// Removes `tenant`'s rows from the ledger of the server `conn` is on (a
/// shard's, when its schema there is dropped).
pub async fn forget(conn: &mut PgConn, tenant: TenantId) -> Result<(), diesel::result::Error> {
    diesel::delete(tenant_migrations::table).filter(tenant_migrations::tenant_id.eq(tenant.0)).execute(conn).await?;
    Ok(())
}

/// Settings of a migrate-all run.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Tenants migrated at the same time on each shard.
    pub concurrency: usize,
    /// How long one tenant's migration may wait for a lock before it fails
    /// (and is reported) instead of blocking traffic.
    pub lock_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self { concurrency: 4, lock_timeout: Duration::from_secs(5) }
    }
}

/// What happened to one tenant during a run.
#[derive(Debug, Clone)]
pub enum TenantOutcome {
    Migrated {
        versions: Vec<&'static str>,
    },
    /// Someone else brought it up to date meanwhile, or it is being deleted.
    Skipped,
    Failed {
        error: String,
    },
}

/// Progress events, for a progress bar or log lines.
pub enum MigrateEvent<'a> {
    Started { behind: usize, total: usize },
    TenantDone { slug: &'a str, outcome: &'a TenantOutcome },
}

/// The summary of a migrate-all run.
#[derive(Debug, Default)]
pub struct MigrateReport {
    pub total: usize,
    pub up_to_date: usize,
    pub migrated: Vec<(String, Vec<&'static str>)>,
    pub failed: Vec<(String, String)>,
}

#[derive(QueryableByName)]
struct Behind {
    #[diesel(sql_type = SqlUuid)]
    id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    slug: String,
    #[diesel(sql_type = Text)]
    schema_name: String,
    #[diesel(sql_type = Text)]
    shard: String,
}

/// Brings every tenant schema up to `migrations`: brings each other
/// shard's own tables level ([`crate::shards::upgrade`]), finds the tenants
/// behind in one query, migrates them `concurrency` at a time on each
/// shard (the shards side by side), each in its own transaction (so an
/// interrupted run loses nothing and the next one resumes), and reports
/// failures at the end without stopping the others. A shard that cannot be
/// reached is reported as `shard <name>`, with its tenants.
pub async fn migrate_tenants(
    db: &Db,
    migrations: &'static [TenantMigration],
    options: &MigrateOptions,
    on_event: &(dyn Fn(MigrateEvent<'_>) + Sync),
) -> anyhow::Result<MigrateReport> {
    let versions: Vec<&str> = migrations.iter().map(|m| m.version).collect();
    let wanted = i64::try_from(versions.len()).context("too many migrations")?;
    let shards = db
        .platform(async |conn| Ok::<_, anyhow::Error>(crate::shards::others(conn).await?))
        .await
        .context("listing the shards")?;
    let upgraded = futures_util::future::join_all(shards.iter().map(|s| async move {
        (s, db.on_shard(s, async |c| Ok::<_, anyhow::Error>(crate::shards::upgrade(c).await?)).await)
    }))
    .await;
    let mut unreachable = Vec::new();
    for (shard, result) in upgraded {
        if let Err(err) = result {
            unreachable.push((format!("shard {shard}"), format!("{err:#}")));
        }
    }
    let (total, behind) = db
        .platform(async |conn| {
            let total: i64 = tenants::table.filter(tenants::status.ne("deleting")).count().get_result(conn).await?;
            // Raw SQL: a correlated count against an array of versions.
            let behind: Vec<Behind> = diesel::sql_query(
                "SELECT t.id, t.slug, t.schema_name, t.shard FROM public.tenants t \
                 WHERE t.status <> 'deleting' AND (SELECT count(*) FROM public.tenant_migrations m \
                   WHERE m.tenant_id = t.id AND m.version = ANY($1)) < $2 \
                 ORDER BY t.created_at",
            )
            .bind::<Array<Text>, _>(&versions)
            .bind::<BigInt, _>(wanted)
            .load(conn)
            .await?;
            Ok::<_, anyhow::Error>((total, behind))
        })
        .await
        .context("finding tenants that are behind")?;
    let total = usize::try_from(total).unwrap_or_default();
    on_event(MigrateEvent::Started { behind: behind.len(), total });

    let mut report = MigrateReport {
        total,
        up_to_date: total.saturating_sub(behind.len()),
        failed: unreachable,
        ..Default::default()
    };
    let mut by_shard: std::collections::BTreeMap<String, Vec<Behind>> = Default::default();
    for t in behind {
        by_shard.entry(t.shard.clone()).or_default().push(t);
    }
    // Each tenant's migration holds a platform connection (its row) for its
    // whole length: never more at once than the pool has, however many
    // shards run side by side, or the rest would time out waiting.
    let platform = tokio::sync::Semaphore::new(db.status().max_size.max(1));
    let platform = &platform;
    let mut results = futures_util::stream::select_all(by_shard.into_values().map(|tenants| {
        Box::pin(
            futures_util::stream::iter(tenants)
                .map(|t| async move {
                    let _held = platform.acquire().await;
                    let outcome = match migrate_one(db, &t, migrations, options.lock_timeout).await {
                        Ok(Some(versions)) => TenantOutcome::Migrated { versions },
                        Ok(None) => TenantOutcome::Skipped,
                        Err(err) => TenantOutcome::Failed { error: format!("{err:#}") },
                    };
                    (t.slug, outcome)
                })
                .buffer_unordered(options.concurrency.max(1)),
        )
    }));
    while let Some((slug, outcome)) = results.next().await {
        on_event(MigrateEvent::TenantDone { slug: &slug, outcome: &outcome });
        match outcome {
            TenantOutcome::Migrated { versions } => report.migrated.push((slug, versions)),
            TenantOutcome::Skipped => report.up_to_date += 1,
            TenantOutcome::Failed { error } => report.failed.push((slug, error)),
        }
    }
    Ok(report)
}

/// Migrates one tenant in one transaction. The tenant row is locked first so
/// two runs (or a run and a delete) never work on the same schema at once.
#[tracing::instrument(skip_all, fields(tenant.slug = %t.slug))]
async fn migrate_one(
    db: &Db,
    t: &Behind,
    migrations: &'static [TenantMigration],
    lock_timeout: Duration,
) -> anyhow::Result<Option<Vec<&'static str>>> {
    let schema =
        SchemaName::from_stored(t.schema_name.clone()).map_err(|s| anyhow::anyhow!("malformed schema name {s:?}"))?;
    let tenant = TenantId(t.id);
    let shard = ShardName::parse(&t.shard).map_err(|e| anyhow::anyhow!("shard {:?}: {e}", t.shard))?;
    db.platform(async |conn| {
        crate::db::batch(conn, &format!("SET LOCAL lock_timeout = '{}ms'", lock_timeout.as_millis())).await?;
        let row: Option<(String, Option<String>)> = crate::schema::tenants::table
            .find(tenant.0)
            .select((crate::schema::tenants::status, crate::schema::tenants::moving_to))
            .for_update()
            .first(conn)
            .await
            .optional()?;
        let Some((_, moving_to)) = row.filter(|(status, _)| status != "deleting") else {
            return Ok(None);
        };
        if let Some(to) = moving_to {
            anyhow::bail!("{} is being moved to shard {to}: run plinth migrate again when the move is done", t.slug);
        }
        let applied: HashSet<String> = tenant_migrations::table
            .filter(tenant_migrations::tenant_id.eq(tenant.0))
            .select(tenant_migrations::version)
            .load::<String>(conn)
            .await?
            .into_iter()
            .collect();
        if !shard.is_primary() {
            return migrate_on_shard(db, conn, tenant, &schema, &shard, &applied, migrations, lock_timeout).await;
        }
        let pending: Vec<&TenantMigration> = migrations.iter().filter(|m| !applied.contains(m.version)).collect();
        if pending.is_empty() {
            return Ok(None);
        }
        apply(conn, tenant, &schema, &pending).await?;
        Ok::<_, anyhow::Error>(Some(pending.iter().map(|m| m.version).collect()))
    })
    .await
}

/// Migrates a tenant whose schema is on another shard, inside the caller's
/// platform transaction (which holds the tenant's row): the DDL and that
/// server's ledger commit together there, then the primary's ledger
/// (`conn`, `applied`) is brought level with the shard's. If the run stops
/// between the two, the next one finds nothing pending on the shard and
/// only records what it has.
#[allow(clippy::too_many_arguments, reason = "the pieces of one tenant's migration, from migrate_one")]
async fn migrate_on_shard(
    db: &Db,
    conn: &mut PgConn,
    tenant: TenantId,
    schema: &SchemaName,
    shard: &ShardName,
    applied: &HashSet<String>,
    migrations: &'static [TenantMigration],
    lock_timeout: Duration,
) -> anyhow::Result<Option<Vec<&'static str>>> {
    let has: HashSet<String> = db
        .on_shard(shard, async |c| {
            crate::db::batch(c, &format!("SET LOCAL lock_timeout = '{}ms'", lock_timeout.as_millis())).await?;
            let mut has: HashSet<String> = tenant_migrations::table
                .filter(tenant_migrations::tenant_id.eq(tenant.0))
                .select(tenant_migrations::version)
                .load::<String>(c)
                .await?
                .into_iter()
                .collect();
            let pending: Vec<&TenantMigration> = migrations.iter().filter(|m| !has.contains(m.version)).collect();
            apply(c, tenant, schema, &pending).await?;
            has.extend(pending.iter().map(|m| m.version.to_owned()));
            Ok::<_, anyhow::Error>(has)
        })
        .await
        .with_context(|| format!("on shard {shard}"))?;
    let missing: Vec<&'static str> =
        migrations.iter().map(|m| m.version).filter(|v| has.contains(*v) && !applied.contains(*v)).collect();
    if missing.is_empty() {
        return Ok(None);
    }
    let rows: Vec<_> = missing
        .iter()
        .map(|v| (tenant_migrations::tenant_id.eq(tenant.0), tenant_migrations::version.eq(*v)))
        .collect();
    diesel::insert_into(tenant_migrations::table).values(rows).on_conflict_do_nothing().execute(conn).await?;
    Ok(Some(missing))
}

/// One tenant's place in the tenant migrations, as the console shows it.
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct TenantVersion {
    #[diesel(sql_type = SqlUuid)]
    pub tenant_id: uuid::Uuid,
    #[diesel(sql_type = Text)]
    pub slug: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    /// How many of the migrations it has.
    #[diesel(sql_type = BigInt)]
    pub applied: i64,
    /// The newest version it has, if any.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    pub newest: Option<String>,
}

#[derive(QueryableByName)]
struct Counts {
    #[diesel(sql_type = BigInt)]
    total: i64,
    #[diesel(sql_type = BigInt)]
    behind: i64,
}

/// Up to `limit` tenants (not being deleted) and how far each is through
/// `migrations`, those furthest behind first, then by slug; and how many
/// tenants there are in all and how many are behind.
pub async fn versions(
    conn: &mut AsyncPgConnection,
    migrations: &[TenantMigration],
    limit: i64,
) -> Result<(Vec<TenantVersion>, i64, i64), diesel::result::Error> {
    let versions: Vec<&str> = migrations.iter().map(|m| m.version).collect();
    let wanted = i64::try_from(versions.len()).unwrap_or(i64::MAX);
    // Raw SQL: a filtered aggregate over a left join.
    let rows: Vec<TenantVersion> = diesel::sql_query(
        "SELECT t.id AS tenant_id, t.slug, t.status, \
                count(m.version) FILTER (WHERE m.version = ANY($1)) AS applied, max(m.version) AS newest \
         FROM public.tenants t LEFT JOIN public.tenant_migrations m ON m.tenant_id = t.id \
         WHERE t.status <> 'deleting' GROUP BY t.id ORDER BY applied ASC, t.slug ASC LIMIT $2",
    )
    .bind::<Array<Text>, _>(&versions)
    .bind::<BigInt, _>(limit)
    .load(conn)
    .await?;
    let counts: Counts = diesel::sql_query(
        "SELECT count(*) AS total, count(*) FILTER (WHERE (SELECT count(*) FROM public.tenant_migrations m \
           WHERE m.tenant_id = t.id AND m.version = ANY($1)) < $2) AS behind \
         FROM public.tenants t WHERE t.status <> 'deleting'",
    )
    .bind::<Array<Text>, _>(&versions)
    .bind::<BigInt, _>(wanted)
    .get_result(conn)
    .await?;
    Ok((rows, counts.total, counts.behind))
}

/// How many of `migrations` `tenant` has, and the newest version it has.
pub async fn applied(
    conn: &mut AsyncPgConnection,
    tenant: TenantId,
    migrations: &[TenantMigration],
) -> Result<(i64, Option<String>), diesel::result::Error> {
    let versions: Vec<&str> = migrations.iter().map(|m| m.version).collect();
    let applied: Vec<String> = tenant_migrations::table
        .filter(tenant_migrations::tenant_id.eq(tenant.0))
        .select(tenant_migrations::version)
        .load(conn)
        .await?;
    let count = applied.iter().filter(|v| versions.contains(&v.as_str())).count();
    Ok((i64::try_from(count).unwrap_or(i64::MAX), applied.into_iter().max()))
}

//! Moving a tenant's schema to another shard while it is served
//! (`plinth tenants move`), with PostgreSQL's logical replication.
//!
//! 1. The registry marks the tenant `moving_to` the target: every instance
//!    learns it through the registry's notification, migrations and
//!    deletion of the tenant wait for the move, and a failed request of
//!    the tenant checks where it lives (see `Db::moved_away`).
//! 2. The target gets the schema, made by the migrations the tenant has; a
//!    publication of the schema's tables on the source and a subscription
//!    on the target copy the rows and then stream every change. Reads and
//!    writes go on meanwhile.
//! 3. The pause: the source's tables are locked `IN EXCLUSIVE MODE` (reads
//!    go on, writes wait). A marker row written after the lock reaches the
//!    target through the same stream, behind every committed write, so
//!    once it is there the target has everything; the row counts of each
//!    table are compared. Then, in this order: the registry row is
//!    updated (not yet committed), the source's tables get a trigger that
//!    refuses writes and the source schema is renamed (committed: a write
//!    that waited fails, and so does any read of the old copy), the
//!    registry commits. The pause is the time from the lock to that commit.
//! 4. Every instance drops its cached tenants on the registry's
//!    notification and opens the tenant's connections on the target. A
//!    request that was on its way to the old copy fails there, finds the
//!    tenant moved and answers 503 `unavailable` with `Retry-After`.
//! 5. The subscription and publication are dropped, and the old copy too
//!    unless it is kept (renamed, its writes refused).
//!
//! A move that fails before the flip undoes itself (and a move started
//! again cleans up what an interrupted one left); nothing of the tenant
//! changes on the source. The source's server needs `wal_level = logical`,
//! and the target's user must be allowed to create subscriptions (a
//! superuser on PostgreSQL 15). The target connects to the source with the
//! URL the registry holds (`DATABASE_URL` for the primary).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_postgres::Client;

use crate::db::Db;
use crate::ids::{SchemaName, ShardName, TenantId};
use crate::migrate::{TENANT_MIGRATIONS, TenantMigration};

/// Settings of one move.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// Keep the old copy (renamed, refusing writes) instead of dropping it.
    pub keep: bool,
    /// How long the copy may take to catch up before the move gives up.
    pub catch_up: Duration,
    /// The longest the tenant's writes may be held: waiting for the lock,
    /// then for the last changes to arrive. Past it the move gives up and
    /// writes go on on the source.
    pub max_pause: Duration,
}

impl Default for MoveOptions {
    fn default() -> Self {
        Self { keep: false, catch_up: Duration::from_secs(600), max_pause: Duration::from_secs(2) }
    }
}

/// What a move did.
#[derive(Debug)]
pub struct MoveReport {
    pub from: ShardName,
    pub to: ShardName,
    /// Rows copied, over all the schema's tables.
    pub rows: i64,
    /// How long the tenant's writes were held.
    pub pause: Duration,
    /// The old copy's schema on the source, when kept.
    pub kept: Option<String>,
}

/// Why a move did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// Refused before anything changed.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<tokio_postgres::Error> for MoveError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Failed(e.into())
    }
}

/// The advisory lock class one tenant's moves run under (on the primary).
const MOVE_LOCK: i32 = 72_170_002;

/// What the steps of one move share.
struct Move<'a> {
    source: &'a Client,
    source_url: &'a str,
    target: &'a Client,
    to: &'a ShardName,
    tenant: &'a Moving,
    /// The name of the move's publication, slot, subscription and marker table.
    tag: &'a str,
    options: &'a MoveOptions,
    progress: &'a (dyn Fn(&str) + Sync),
}

/// The tenant as the move reads it from the registry.
struct Moving {
    id: TenantId,
    schema: SchemaName,
    shard: ShardName,
    moving_to: Option<ShardName>,
}

/// Moves tenant `slug` to shard `to`. `progress` is told each step.
pub async fn move_tenant(
    db: &Db,
    slug: &str,
    to: &ShardName,
    options: &MoveOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<MoveReport, MoveError> {
    let mut primary = open(&db.shard_url(&ShardName::primary()).await.map_err(anyhow::Error::from)?).await?;
    let tenant = find(&primary, slug).await?;
    let taken: bool = primary
        .query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&MOVE_LOCK, &tenant.id.0.to_string()])
        .await?
        .get(0);
    if !taken {
        return Err(MoveError::Refused(format!("another move of {slug} is running")));
    }
    if tenant.shard == *to {
        return Err(MoveError::Refused(format!("{slug} already lives on shard {to}")));
    }
    let state: Option<String> =
        primary.query_opt("SELECT state FROM public.shards WHERE name = $1", &[&to.as_str()]).await?.map(|r| r.get(0));
    match state.as_deref() {
        None => return Err(MoveError::Refused(format!("there is no shard named {to}"))),
        Some("open") => {}
        Some(other) => return Err(MoveError::Refused(format!("shard {to} is {other}: it takes no tenants"))),
    }
    let source_url = shard_url(db, &tenant.shard).await?;
    let source = open(&source_url).await?;
    source.batch_execute(&crate::shards::upgrade_sql()).await?;
    let wal_level: String = source.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(MoveError::Refused(format!(
            "shard {}'s server has wal_level = {wal_level}; moving a tenant off it needs wal_level = logical \
             (ALTER SYSTEM SET wal_level = logical, then restart it)",
            tenant.shard
        )));
    }
    let target = open(&shard_url(db, to).await?).await?;
    target.batch_execute(&crate::shards::upgrade_sql()).await?;
    let tag = format!("plinth_move_{}", tenant.id.0.simple());

    // What an interrupted move left, on its target and this one; first, a
    // source closed by a move that stopped before the registry followed.
    reopen_interrupted(&source, &tenant, progress).await?;
    if let Some(earlier) = tenant.moving_to.as_ref().filter(|earlier| *earlier != to && **earlier != tenant.shard) {
        progress(&format!("cleaning up an interrupted move to shard {earlier}"));
        let earlier_target = open(&shard_url(db, earlier).await?).await?;
        abandon(&source, &earlier_target, earlier, &tenant, &tag).await?;
    }
    abandon(&source, &target, to, &tenant, &tag).await?;
    let marked = primary
        .execute(
            "UPDATE public.tenants SET moving_to = $2, updated_at = now() WHERE id = $1 AND status <> 'deleting'",
            &[&tenant.id.0, &to.as_str()],
        )
        .await?;
    if marked != 1 {
        return Err(MoveError::Refused(format!("{slug} is being deleted")));
    }

    let m = Move {
        source: &source,
        source_url: &source_url,
        target: &target,
        to,
        tenant: &tenant,
        tag: &tag,
        options,
        progress,
    };
    let outcome = match copy(&primary, &m).await {
        Ok(tables) => flip(&mut primary, &m, &tables).await,
        Err(err) => Err(err),
    };
    let (rows, pause, renamed) = match outcome {
        Ok(done) => done,
        Err(err) => {
            // A registry commit whose answer was lost may have moved the
            // tenant all the same: undo only what the registry does not use.
            let placed = db
                .platform(async |c| {
                    use diesel::QueryDsl as _;
                    use diesel_async::RunQueryDsl as _;
                    let tenants = crate::schema::tenants::table;
                    Ok::<_, anyhow::Error>(
                        tenants.find(tenant.id.0).select(crate::schema::tenants::shard).first::<String>(c).await?,
                    )
                })
                .await;
            match placed {
                Ok(now) if now != to.as_str() => {}
                Ok(_) => {
                    return Err(MoveError::Failed(anyhow::anyhow!(
                        "{err}; but the registry places {slug} on shard {to}: the move went through. Drop the \
                         subscription {tag} on shard {to} and the publication {tag} on shard {} by hand",
                        tenant.shard
                    )));
                }
                Err(e) => {
                    return Err(MoveError::Failed(anyhow::anyhow!("{err}; and reading the registry failed: {e:#}")));
                }
            }
            if let Err(cleanup) = abandon(&source, &target, to, &tenant, &tag).await {
                tracing::warn!(error = %format!("{cleanup:#}"), "cleaning up after a failed move");
            }
            primary.execute("UPDATE public.tenants SET moving_to = NULL WHERE id = $1", &[&tenant.id.0]).await?;
            return Err(err);
        }
    };
    progress(&format!("{slug} lives on shard {to} now; writes were held for {} ms", pause.as_millis()));

    // The flip is done; what is left is tidying up, and a failure here is
    // reported without undoing the move.
    let tidy = async {
        // Alone: DROP SUBSCRIPTION cannot run in a transaction, nor in a
        // batch of statements (one implicit transaction).
        target.batch_execute(&format!("DROP SUBSCRIPTION {tag}")).await?;
        target.batch_execute(&format!("DROP TABLE IF EXISTS public.{tag}")).await?;
        source.batch_execute(&format!("DROP PUBLICATION {tag}; DROP TABLE IF EXISTS public.{tag}")).await?;
        if !options.keep {
            source.batch_execute(&format!("SET lock_timeout = '30s'; DROP SCHEMA {} CASCADE", quote(&renamed))).await?;
        }
        if !tenant.shard.is_primary() {
            source.execute("DELETE FROM public.tenant_migrations WHERE tenant_id = $1", &[&tenant.id.0]).await?;
        }
        source
            .execute("DELETE FROM public.idempotency_keys WHERE schema_name = $1", &[&tenant.schema.as_str()])
            .await?;
        Ok::<_, anyhow::Error>(())
    };
    tidy.await.with_context(|| {
        format!(
            "{slug} moved to shard {to}, but tidying up after it failed: what is left of subscription {tag} on \
             shard {to}, and of publication, slot and table {tag}{} on shard {}, can be dropped by hand",
            if options.keep { String::new() } else { format!(" and schema {renamed}") },
            tenant.shard
        )
    })?;
    Ok(MoveReport { from: tenant.shard, to: to.clone(), rows, pause, kept: options.keep.then_some(renamed) })
}

/// Makes the schema on the target and streams the source's rows into it
/// until it has caught up. Returns the schema's tables.
async fn copy(primary: &Client, m: &Move<'_>) -> Result<Vec<String>, MoveError> {
    let Move { source, source_url, target, to, tenant, tag, options, progress } = *m;
    let applied: Vec<String> = primary
        .query("SELECT version FROM public.tenant_migrations WHERE tenant_id = $1 ORDER BY version", &[&tenant.id.0])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let migrations: Vec<&TenantMigration> =
        TENANT_MIGRATIONS.iter().filter(|m| applied.contains(&m.version.to_owned())).collect();
    if migrations.len() != applied.len() {
        return Err(MoveError::Refused(
            "the tenant has migrations this binary does not know: move it with the newer binary".into(),
        ));
    }
    progress(&format!("creating the schema on shard {to}"));
    let mut ddl = format!(
        "BEGIN; CREATE SCHEMA {}; {} CREATE TABLE public.{tag} (mark text PRIMARY KEY);",
        tenant.schema.quoted(),
        crate::migrate::ddl(&tenant.schema, &migrations)
    );
    if !to.is_primary() {
        // The target's own ledger (the primary's already lists them).
        for m in &migrations {
            ddl.push_str(&format!(
                "INSERT INTO public.tenant_migrations (tenant_id, version) VALUES ('{}', '{}');",
                tenant.id.0, m.version
            ));
        }
    }
    ddl.push_str("COMMIT;");
    target.batch_execute(&ddl).await.context("creating the schema on the target")?;

    let tables = tables(source, &tenant.schema).await?;
    source
        .batch_execute(&format!(
            "CREATE TABLE public.{tag} (mark text PRIMARY KEY); \
             CREATE PUBLICATION {tag} FOR TABLE public.{tag}, TABLES IN SCHEMA {}",
            tenant.schema.quoted()
        ))
        .await
        .context("publishing the schema on the source")?;
    progress("copying");
    // The slot is made apart from the subscription: made by it, on the
    // same server (shards that are databases of one cluster), it would
    // wait for the subscribing transaction itself.
    source
        .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&tag])
        .await
        .context("making the replication slot on the source")?;
    target
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {tag} CONNECTION {} PUBLICATION {tag} WITH (create_slot = false, slot_name = '{tag}')",
            literal(source_url)
        ))
        .await
        .context("subscribing the target to the source")?;
    let deadline = Instant::now() + options.catch_up;
    loop {
        let row = target
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE r.srsubstate = 'r') \
                 FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1",
                &[&tag],
            )
            .await?;
        let (all, ready): (i64, i64) = (row.get(0), row.get(1));
        if all == i64::try_from(tables.len() + 1).unwrap_or(i64::MAX) && ready == all {
            break;
        }
        if Instant::now() > deadline {
            return Err(MoveError::Failed(anyhow::anyhow!(
                "the copy did not finish within {} s ({ready} of {} tables ready); the target's server log says why",
                options.catch_up.as_secs(),
                tables.len() + 1
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress("copied; catching up");
    mark(source, target, tag, "caught-up", deadline).await?;
    Ok(tables)
}

/// The pause and the flip. Returns the rows compared, the pause, and the
/// old copy's new name on the source.
async fn flip(primary: &mut Client, m: &Move<'_>, tables: &[String]) -> Result<(i64, Duration, String), MoveError> {
    let Move { source, source_url, target, to, tenant, tag, options, progress } = *m;
    let schema = tenant.schema.quoted();
    let qualified: Vec<String> = tables.iter().map(|t| format!("{schema}.{}", quote(t))).collect();
    // Before the pause, so that the pause holds as little as it can.
    source
        .batch_execute(
            "CREATE OR REPLACE FUNCTION public.plinth_tenant_moved() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'this tenant has moved to another server' USING ERRCODE = 'object_not_in_prerequisite_state'; END $$",
        )
        .await?;
    let renamed = format!("{}_moved_{}", tenant.schema.as_str(), chrono::Utc::now().timestamp());
    let mut writer = open(source_url).await?;
    let held = writer.transaction().await?;
    progress("holding writes");
    let paused = Instant::now();
    held.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {} IN EXCLUSIVE MODE",
        options.max_pause.as_millis().max(1),
        qualified.join(", ")
    ))
    .await
    .context("waiting for the tenant's running writes to finish")?;
    mark(source, target, tag, "final", paused + options.max_pause).await?;
    let mut rows = 0;
    for table in &qualified {
        let count = format!("SELECT count(*) FROM {table}");
        let (here, there) = tokio::try_join!(held.query_one(&count, &[]), target.query_one(&count, &[]))?;
        let (here, there): (i64, i64) = (here.get(0), there.get(0));
        if here != there {
            return Err(MoveError::Failed(anyhow::anyhow!(
                "{table} has {here} rows on the source and {there} on the target"
            )));
        }
        rows += here;
    }
    let sequences = held
        .query(
            "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = $1 AND last_value IS NOT NULL",
            &[&tenant.schema.as_str()],
        )
        .await?;
    for s in sequences {
        let (name, value): (String, i64) = (s.get(0), s.get(1));
        target
            .execute(
                "SELECT setval(format('%I.%I', $1::text, $2::text)::regclass, $3)",
                &[&tenant.schema.as_str(), &name, &value],
            )
            .await?;
    }
    copy_answers(&held, target, &tenant.schema).await?;
    if paused.elapsed() > options.max_pause {
        return Err(MoveError::Failed(anyhow::anyhow!(
            "the last changes and the checks took longer than {} ms; nothing changed",
            options.max_pause.as_millis()
        )));
    }
    let registry = primary.transaction().await?;
    let flipped = registry
        .execute(
            "UPDATE public.tenants SET shard = $2, moving_to = NULL, updated_at = now() \
             WHERE id = $1 AND shard = $3 AND status <> 'deleting'",
            &[&tenant.id.0, &to.as_str(), &tenant.shard.as_str()],
        )
        .await?;
    if flipped != 1 {
        return Err(MoveError::Failed(anyhow::anyhow!("the tenant's registry row changed during the move")));
    }
    let refuse: String = qualified
        .iter()
        .map(|t| {
            format!(
                "CREATE TRIGGER plinth_moved BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION public.plinth_tenant_moved();"
            )
        })
        .collect();
    held.batch_execute(&format!("{refuse} ALTER SCHEMA {schema} RENAME TO {}", quote(&renamed))).await?;
    held.commit().await.context("closing the old copy")?;
    if let Err(err) = registry.commit().await {
        // The old copy refuses everything and the registry still points at
        // it: open it again.
        let reopened = reopen(source, &renamed, &tenant.schema).await;
        return Err(MoveError::Failed(anyhow::Error::new(err).context(match reopened {
            Ok(()) => "recording the move in the registry failed; the tenant stays on its shard".to_owned(),
            Err(e) => format!(
                "recording the move in the registry failed, and so did reopening the old copy ({e}): \
                 rename schema {renamed} to {} on the source and drop its plinth_moved triggers",
                tenant.schema
            ),
        })));
    }
    Ok((rows, paused.elapsed(), renamed))
}

/// Opens the source's copy again if a move stopped between closing it and
/// recording the flip (the registry still names the source, so nothing was
/// written anywhere else since): renames the newest `<schema>_moved_…` back
/// and drops its triggers.
async fn reopen_interrupted(source: &Client, tenant: &Moving, progress: &(dyn Fn(&str) + Sync)) -> anyhow::Result<()> {
    let schema = tenant.schema.as_str();
    let present: i64 =
        source.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&schema]).await?.get(0);
    if present == 1 {
        return Ok(());
    }
    let closed: Option<String> = source
        .query_one(
            "SELECT max(nspname::text) FROM pg_namespace WHERE starts_with(nspname::text, $1)",
            &[&format!("{schema}_moved_")],
        )
        .await?
        .get(0);
    let closed = closed.ok_or_else(|| anyhow::anyhow!("the source has no schema {schema}"))?;
    progress(&format!("reopening {closed}, closed by a move that stopped before its flip was recorded"));
    reopen(source, &closed, &tenant.schema).await
}

/// Renames the closed copy `closed` back to `schema` and drops the
/// triggers that refuse its writes, in one transaction.
async fn reopen(source: &Client, closed: &str, schema: &SchemaName) -> anyhow::Result<()> {
    let triggers: String = source
        .query("SELECT tablename::text FROM pg_tables WHERE schemaname = $1", &[&closed])
        .await?
        .iter()
        .map(|r| format!("DROP TRIGGER IF EXISTS plinth_moved ON {}.{};", quote(closed), quote(&r.get::<_, String>(0))))
        .collect();
    let sql = format!("BEGIN; {triggers} ALTER SCHEMA {} RENAME TO {}; COMMIT", quote(closed), schema.quoted());
    Ok(source.batch_execute(&sql).await?)
}

/// Copies the stored answers of the tenant's keyed writes (made in its
/// schema's transactions, see [`crate::idempotency::claim`]), so that a
/// retry after the move is replayed, not run again.
async fn copy_answers(
    source: &tokio_postgres::Transaction<'_>,
    target: &Client,
    schema: &SchemaName,
) -> Result<(), MoveError> {
    let rows = source
        .query(
            "SELECT caller, key, request_hash, status, body, created_at FROM public.idempotency_keys WHERE schema_name = $1",
            &[&schema.as_str()],
        )
        .await?;
    if rows.is_empty() {
        return Ok(());
    }
    let column = |i: usize| rows.iter().map(move |r| r.get::<_, String>(i)).collect::<Vec<_>>();
    let bytes = |i: usize| rows.iter().map(|r| r.get::<_, Vec<u8>>(i)).collect::<Vec<_>>();
    let status: Vec<i16> = rows.iter().map(|r| r.get(3)).collect();
    let at: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.get(5)).collect();
    target
        .execute(
            "INSERT INTO public.idempotency_keys (caller, key, request_hash, status, body, created_at, schema_name) \
             SELECT c, k, h, s, b, a, $7 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int2[], $5::bytea[], \
             $6::timestamptz[]) AS t (c, k, h, s, b, a) ON CONFLICT DO NOTHING",
            &[&column(0), &column(1), &bytes(2), &status, &bytes(4), &at, &schema.as_str()],
        )
        .await?;
    Ok(())
}

/// Writes marker row `mark` on the source and waits until the target has
/// it: then every change committed on the source before it has arrived.
async fn mark(source: &Client, target: &Client, tag: &str, mark: &str, deadline: Instant) -> Result<(), MoveError> {
    source.execute(&format!("INSERT INTO public.{tag} (mark) VALUES ($1)"), &[&mark]).await?;
    let arrived = format!("SELECT count(*) FROM public.{tag} WHERE mark = $1");
    loop {
        let n: i64 = target.query_one(&arrived, &[&mark]).await?.get(0);
        if n == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(MoveError::Failed(anyhow::anyhow!("the target did not catch up in time ({mark})")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Undoes what a move to `to` made, on the target and the source (nothing
/// there when nothing was made). The registry must not place the tenant on
/// `to`.
async fn abandon(source: &Client, target: &Client, to: &ShardName, tenant: &Moving, tag: &str) -> anyhow::Result<()> {
    let subscribed: i64 =
        target.query_one("SELECT count(*) FROM pg_subscription WHERE subname = $1", &[&tag]).await?.get(0);
    if subscribed > 0 && target.batch_execute(&format!("DROP SUBSCRIPTION {tag}")).await.is_err() {
        // The source could not drop its slot: let go of it here, drop it there.
        for step in [
            format!("ALTER SUBSCRIPTION {tag} DISABLE"),
            format!("ALTER SUBSCRIPTION {tag} SET (slot_name = NONE)"),
            format!("DROP SUBSCRIPTION {tag}"),
        ] {
            target.batch_execute(&step).await?;
        }
    }
    source
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
            &[&tag],
        )
        .await?;
    source.batch_execute(&format!("DROP PUBLICATION IF EXISTS {tag}; DROP TABLE IF EXISTS public.{tag}")).await?;
    target
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS public.{tag}; SET lock_timeout = '30s'; DROP SCHEMA IF EXISTS {} CASCADE",
            tenant.schema.quoted()
        ))
        .await?;
    if !to.is_primary() {
        target.execute("DELETE FROM public.tenant_migrations WHERE tenant_id = $1", &[&tenant.id.0]).await?;
    }
    Ok(())
}

async fn find(primary: &Client, slug: &str) -> Result<Moving, MoveError> {
    let row = primary
        .query_opt("SELECT id, schema_name, shard, moving_to, status FROM public.tenants WHERE slug = $1", &[&slug])
        .await?
        .ok_or_else(|| MoveError::Refused(format!("no tenant {slug}")))?;
    let status: String = row.get(4);
    if status == "deleting" {
        return Err(MoveError::Refused(format!("{slug} is being deleted")));
    }
    let shard = |name: String| ShardName::parse(&name).map_err(|e| anyhow::anyhow!("shard {name:?}: {e}"));
    Ok(Moving {
        id: TenantId(row.get(0)),
        schema: SchemaName::from_stored(row.get(1)).map_err(|s| anyhow::anyhow!("malformed schema name {s:?}"))?,
        shard: shard(row.get(2))?,
        moving_to: row.get::<_, Option<String>>(3).map(shard).transpose()?,
    })
}

/// The tables of `schema`, by name.
async fn tables(conn: &Client, schema: &SchemaName) -> Result<Vec<String>, MoveError> {
    Ok(conn
        .query("SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1", &[&schema.as_str()])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn shard_url(db: &Db, shard: &ShardName) -> anyhow::Result<String> {
    db.shard_url(shard).await.with_context(|| format!("finding shard {shard}'s URL"))
}

/// One connection of the move's own.
async fn open(url: &str) -> anyhow::Result<Client> {
    let target = crate::postgres::Target::parse(url)?;
    let (client, connection) = target.connect().await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a move's connection closed");
        }
    });
    Ok(client)
}

/// `name` as an SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

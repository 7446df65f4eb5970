//! Shards: the PostgreSQL servers that hold tenant schemas
//! (`public.shards`). The platform database is the shard `primary`; an
//! operator declares more with `plinth shards add`. Each tenant's schema
//! lives on exactly one shard (`public.tenants.shard`), and
//! [`crate::db::Db`] opens a tenant's connections on its shard. The
//! platform tables stay on the primary.
//!
//! A shard other than the primary holds tenant schemas and three tables of
//! its own in `public`: `plinth_shard` (its name, so that one server is
//! never declared twice or under another name), `tenant_migrations` (the
//! migrations each of its schemas has, written in the transaction that
//! applies them; the primary's ledger follows it, see
//! [`crate::migrate::migrate_tenants`]) and `idempotency_keys` (the stored
//! answers of keyed writes to its tenants' tables, claimed and recorded in
//! the same transaction as the write, as on the primary; brought level with
//! the platform's by [`upgrade`]).
//!
//! New tenants go to the open shard with the fewest tenants ([`place`]); a
//! draining or closed shard takes none, and keeps serving the ones it has.

use diesel::prelude::*;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection as _};

use crate::db::PgConn;
use crate::ids::ShardName;
use crate::schema::{shards, tenants};

/// Whether a shard takes new tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// Takes new tenants.
    Open,
    /// Takes no new tenants; serves its own (moving them away is
    /// `plinth tenants move`).
    Draining,
    /// Takes no new tenants.
    Closed,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Draining => "draining",
            Self::Closed => "closed",
        }
    }
}

/// A shard as `plinth shards list` shows it.
#[derive(Debug, Clone)]
pub struct Shard {
    pub name: ShardName,
    /// `None` for the primary (`DATABASE_URL`).
    pub url: Option<String>,
    pub state: String,
    /// Tenants whose schema lives there (being deleted included).
    pub tenants: i64,
}

/// Every shard, the primary first, with its number of tenants.
pub async fn list(conn: &mut PgConn) -> Result<Vec<Shard>, diesel::result::Error> {
    let rows: Vec<(String, Option<String>, String)> = shards::table
        .select((shards::name, shards::url, shards::state))
        .order((shards::url.is_not_null(), shards::name))
        .load(conn)
        .await?;
    let counts: Vec<(String, i64)> =
        tenants::table.group_by(tenants::shard).select((tenants::shard, diesel::dsl::count_star())).load(conn).await?;
    rows.into_iter()
        .map(|(name, url, state)| {
            let tenants = counts.iter().find(|(s, _)| *s == name).map_or(0, |(_, n)| *n);
            let name = ShardName::parse(&name)
                .map_err(|e| diesel::result::Error::DeserializationError(format!("shard {name:?}: {e}").into()))?;
            Ok(Shard { name, url, state, tenants })
        })
        .collect()
}

/// The names of every shard but the primary (no counting, unlike [`list`]).
pub async fn others(conn: &mut PgConn) -> Result<Vec<ShardName>, diesel::result::Error> {
    let names: Vec<String> =
        shards::table.filter(shards::url.is_not_null()).select(shards::name).order(shards::name).load(conn).await?;
    names
        .into_iter()
        .map(|name| {
            ShardName::parse(&name)
                .map_err(|e| diesel::result::Error::DeserializationError(format!("shard {name:?}: {e}").into()))
        })
        .collect()
}

/// Where a new tenant goes: the open shard with the fewest tenants, ties
/// by name (the primary when it is the only open one, without counting).
/// `None` when every shard is draining or closed. Tenants created at the
/// same moment may count the same numbers and land together: placement
/// evens shards out over many creations, not exactly.
pub async fn place(conn: &mut PgConn) -> Result<Option<ShardName>, diesel::result::Error> {
    let open: Vec<String> =
        shards::table.filter(shards::state.eq(ShardState::Open.as_str())).select(shards::name).load(conn).await?;
    let chosen = if open.len() <= 1 {
        open.into_iter().next()
    } else {
        let counts: Vec<(String, i64)> = tenants::table
            .filter(tenants::shard.eq_any(&open))
            .group_by(tenants::shard)
            .select((tenants::shard, diesel::dsl::count_star()))
            .load(conn)
            .await?;
        let count = |name: &String| counts.iter().find(|(s, _)| s == name).map_or(0, |(_, n)| *n);
        open.iter().min_by(|a, b| count(a).cmp(&count(b)).then_with(|| a.cmp(b))).cloned()
    };
    chosen
        .map(|name| {
            ShardName::parse(&name)
                .map_err(|e| diesel::result::Error::DeserializationError(format!("shard {name:?}: {e}").into()))
        })
        .transpose()
}

/// `name` if it is an open shard (for a placement an operator names).
pub async fn open(conn: &mut PgConn, name: &ShardName) -> Result<Option<ShardName>, diesel::result::Error> {
    let found: Option<String> = shards::table
        .find(name.as_str())
        .filter(shards::state.eq(ShardState::Open.as_str()))
        .select(shards::name)
        .first(conn)
        .await
        .optional()?;
    Ok(found.map(|_| name.clone()))
}

/// Why a shard could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("a shard named {0} exists")]
    NameTaken(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<diesel::result::Error> for AddError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Other(e.into())
    }
}

impl From<crate::db::PoolError> for AddError {
    fn from(e: crate::db::PoolError) -> Self {
        Self::Other(e.into())
    }
}

/// Declares shard `name` at `url` (open): checks that the server answers,
/// that it is not the platform database (nor any database with Plinth's
/// platform tables) and not a shard under another name, then creates its
/// bookkeeping there and records it on the primary (`primary`, which `db`
/// pools).
pub async fn add(db: &crate::Db, name: &ShardName, url: &str) -> Result<(), AddError> {
    if name.is_primary() {
        return Err(AddError::NameTaken(name.to_string()));
    }
    let exists = db
        .platform(async |c| {
            Ok::<_, anyhow::Error>(
                shards::table.find(name.as_str()).select(shards::name).first::<String>(c).await.optional()?,
            )
        })
        .await?;
    if exists.is_some() {
        return Err(AddError::NameTaken(name.to_string()));
    }
    let target = crate::postgres::Target::parse(url)?;
    let mut conn = target.connect_diesel().await.map_err(|e| AddError::Refused(format!("{e:#}")))?;
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        platform: bool,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        marked: bool,
    }
    #[derive(QueryableByName)]
    struct Marker {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    // Raw SQL: the catalog.
    let found: Found = diesel::sql_query(
        "SELECT to_regclass('public.tenants') IS NOT NULL AS platform, \
                to_regclass('public.plinth_shard') IS NOT NULL AS marked",
    )
    .get_result(&mut conn)
    .await
    .map_err(anyhow::Error::from)?;
    let marker: Option<Marker> = if found.marked {
        // Raw SQL: the shard's own table, which no schema module declares.
        diesel::sql_query("SELECT name FROM public.plinth_shard LIMIT 1")
            .get_result(&mut conn)
            .await
            .optional()
            .map_err(anyhow::Error::from)?
    } else {
        None
    };
    if found.platform {
        return Err(AddError::Refused(
            "that database holds Plinth's platform tables: it is the primary (or another Plinth's); a shard is a database of its own".into(),
        ));
    }
    if let Some(other) = marker.map(|m| m.name).filter(|other| other != name.as_str()) {
        return Err(AddError::Refused(format!("that database is already the shard {other}")));
    }
    // Answers to keyed writes have the platform's table, made by its own
    // migration (once: a shard declared again keeps its answers).
    #[derive(QueryableByName)]
    struct Present {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        present: bool,
    }
    // Raw SQL: the catalog.
    let answers: Present = diesel::sql_query("SELECT to_regclass('public.idempotency_keys') IS NOT NULL AS present")
        .get_result(&mut conn)
        .await
        .map_err(anyhow::Error::from)?;
    let idempotency = if answers.present { "" } else { IDEMPOTENCY_KEYS };
    let upgrades = upgrade_sql();
    // The name is checked ([`ShardName::parse`]: letters, digits, '-', '_'),
    // so it can sit in the statement.
    conn.batch_execute(&format!(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS public.plinth_shard (name text PRIMARY KEY);
         INSERT INTO public.plinth_shard (name) VALUES ('{name}') ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS public.tenant_migrations (
             tenant_id  uuid NOT NULL,
             version    text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (tenant_id, version)
         );
         {idempotency}
         {upgrades}
         COMMIT;"
    ))
    .await
    .map_err(anyhow::Error::from)?;
    db.platform(async |c| {
        diesel::insert_into(shards::table)
            .values((shards::name.eq(name.as_str()), shards::url.eq(url)))
            .execute(c)
            .await
            .map_err(|e| match e {
                diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _) => {
                    AddError::NameTaken(name.to_string())
                }
                other => AddError::Other(other.into()),
            })
    })
    .await?;
    Ok(())
}

/// The platform migration that makes `public.idempotency_keys`, run on a
/// new shard too.
const IDEMPOTENCY_KEYS: &str = include_str!("../../../migrations/platform/2026-12-02-000008_idempotency_keys/up.sql");

/// The platform migrations that change `public.idempotency_keys` after
/// [`IDEMPOTENCY_KEYS`], in order. Each is idempotent, so [`upgrade`]
/// runs them all on every shard.
const IDEMPOTENCY_KEYS_CHANGES: [&str; 1] =
    [include_str!("../../../migrations/platform/2026-12-05-000024_schema_of_idempotency_keys/up.sql")];

/// Brings a shard's own tables level with the platform's (run by
/// `plinth migrate` on every shard; see [`IDEMPOTENCY_KEYS_CHANGES`]).
pub async fn upgrade(conn: &mut PgConn) -> Result<(), diesel::result::Error> {
    conn.batch_execute(&upgrade_sql()).await
}

/// What [`upgrade`] runs.
pub(crate) fn upgrade_sql() -> String {
    IDEMPOTENCY_KEYS_CHANGES.concat()
}

/// Sets a shard's state; `false` if there is no such shard.
pub async fn set_state(conn: &mut PgConn, name: &ShardName, state: ShardState) -> Result<bool, diesel::result::Error> {
    let n =
        diesel::update(shards::table.find(name.as_str())).set(shards::state.eq(state.as_str())).execute(conn).await?;
    Ok(n == 1)
}

/// Where `url` points (`host:port/database`), for display: never the
/// password.
pub fn server(url: &str) -> String {
    crate::postgres::Target::parse(url).map_or_else(|_| "(an unreadable URL)".to_owned(), |t| t.server())
}

#[cfg(test)]
mod tests {
    /// A shard's copies of `idempotency_keys` and `tenant_migrations` are
    /// made by `add`; `idempotency_keys` changes on the shards only through
    /// [`super::IDEMPOTENCY_KEYS_CHANGES`], and `tenant_migrations` not at
    /// all: a platform migration that changes either table must be listed
    /// there (or change this test).
    #[test]
    fn the_shards_tables_change_only_with_their_platform_migrations() -> std::io::Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/platform");
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let up = std::fs::read_to_string(entry.path().join("up.sql"))?;
            if up.contains("idempotency_keys") && up != super::IDEMPOTENCY_KEYS {
                assert!(super::IDEMPOTENCY_KEYS_CHANGES.contains(&up.as_str()), "{name} changes idempotency_keys");
                assert!(up.contains("IF NOT EXISTS"), "{name} must be idempotent: shards run it on every migrate");
            }
            if up.contains("tenant_migrations") {
                assert!(name.ends_with("_tenant_registry"), "{name} changes tenant_migrations");
            }
        }
        Ok(())
    }
}

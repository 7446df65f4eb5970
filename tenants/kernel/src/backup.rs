//! One tenant's archive: its schema as `pg_dump` writes it, the platform
//! rows that belong to it, and a manifest with versions and checksums. The
//! operator's `plinth tenants backup|restore` and a tenant's own export
//! (`POST /v1/tenant/exports`) write the same archive.
//!
//! An archive is a tar file of:
//!
//! - `manifest.json`: [`Manifest`], first;
//! - `schema.dump`: `pg_dump --format=custom --schema=<the tenant's schema>`,
//!   taken in the same snapshot as the platform rows;
//! - `platform/<part>.json`: the platform rows of each owner (the registry's
//!   own, identity's memberships, billing's subscription links).
//!
//! The manifest names every other file with its size and SHA-256; reading
//! an archive checks them all, and refuses any other file.
//!
//! Restoring goes through `pg_restore` and `psql` (one transaction). A copy
//! beside the original gets a new tenant id, hence a new schema name: the
//! SQL script `pg_restore` writes names the schema on every object, and the
//! rename rewrites that name on every line of the script except the rows of
//! its `COPY` blocks (the tenant's data, left byte for byte). A generated
//! schema name (`t_` and 32 hex digits) occurs nowhere else by accident.
//! PostgreSQL has no way to restore a schema under another name; this is the
//! narrowest rewrite that does it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Jsonb, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::db::PgConn;
use crate::ids::{SchemaName, TenantId};
use crate::migrate::TenantMigration;

/// The archive layout this Plinth writes and reads.
pub const FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
const SCHEMA_DUMP: &str = "schema.dump";
/// The largest platform part read into memory.
const MAX_PART_BYTES: u64 = 256 * 1024 * 1024;

/// What an archive holds, written first in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The Plinth version that wrote it.
    pub plinth_version: String,
    pub created_at: DateTime<Utc>,
    pub tenant: ArchivedTenant,
    /// The tenant migrations the schema had.
    pub tenant_migrations: Vec<String>,
    /// The newest platform migration of the database the platform rows came
    /// from (their shape).
    pub platform_migration: Option<String>,
    /// Every other file of the archive.
    pub files: BTreeMap<String, FileDigest>,
}

/// The tenant's registry row, as it was.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedTenant {
    pub id: uuid::Uuid,
    pub slug: String,
    pub name: String,
    pub plan: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub schema: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// A directory of its own under the system's temporary directory, removed
/// when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!("plinth-archive-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(error = %err, path = %self.0.display(), "removing a scratch directory failed");
        }
    }
}

/// An archive being written or just read: the manifest, the schema dump on
/// disk, and the platform parts in memory.
pub struct Archive {
    pub manifest: Manifest,
    pub parts: BTreeMap<String, serde_json::Value>,
    scratch: Scratch,
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("not a Plinth tenant archive: {0}")]
    Malformed(String),
    #[error("the archive is damaged: {0}")]
    Damaged(String),
    #[error(
        "the archive comes from a newer Plinth: its {what} migration {version} is unknown here; upgrade Plinth before restoring it"
    )]
    Newer { what: &'static str, version: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Bytes as lowercase hex (checksums in manifests and export records).
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Copies `input` to `output`, returning its size and SHA-256.
fn copy_digest(mut input: impl Read, mut output: impl Write) -> std::io::Result<FileDigest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n])?;
        bytes += n as u64;
    }
    Ok(FileDigest { bytes, sha256: hex(&hasher.finalize()) })
}

fn part_file(name: &str) -> String {
    format!("platform/{name}.json")
}

impl Archive {
    /// A new archive for `tenant`, to be filled by [`Archive::dump_schema`]
    /// and [`Archive::add_part`].
    pub fn new(
        tenant: ArchivedTenant,
        tenant_migrations: Vec<String>,
        platform_migration: Option<String>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            manifest: Manifest {
                format: FORMAT,
                plinth_version: env!("CARGO_PKG_VERSION").to_owned(),
                created_at: Utc::now(),
                tenant,
                tenant_migrations,
                platform_migration,
                files: BTreeMap::new(),
            },
            parts: BTreeMap::new(),
            scratch: Scratch::new().context("creating a scratch directory")?,
        })
    }

    /// The schema dump on disk.
    pub fn schema_dump(&self) -> PathBuf {
        self.scratch.path().join(SCHEMA_DUMP)
    }

    pub fn add_part(&mut self, name: &str, rows: serde_json::Value) {
        self.parts.insert(name.to_owned(), rows);
    }

    /// Dumps the tenant's schema with `pg_dump` from the server of `url`, in
    /// the exported snapshot `snapshot` when given (see
    /// [`export_snapshot`]).
    pub async fn dump_schema(&mut self, url: &str, snapshot: Option<&str>) -> anyhow::Result<()> {
        let schema = SchemaName::from_stored(self.manifest.tenant.schema.clone())
            .map_err(|s| anyhow::anyhow!("malformed schema name {s:?}"))?;
        let mut command = pg_tool("pg_dump", url)?;
        command
            .arg("--format=custom")
            .arg(format!("--schema={}", schema.as_str()))
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg(format!("--file={}", self.schema_dump().display()));
        if let Some(snapshot) = snapshot {
            command.arg(format!("--snapshot={snapshot}"));
        }
        run(command, "pg_dump").await
    }

    /// Writes the archive to `out`.
    pub fn write(&mut self, out: impl Write) -> anyhow::Result<()> {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, rows) in &self.parts {
            files.push((part_file(name), serde_json::to_vec(rows)?));
        }
        self.manifest.files.clear();
        let dump = std::fs::File::open(self.schema_dump()).context("the schema dump is missing")?;
        let digest = copy_digest(dump, std::io::sink())?;
        self.manifest.files.insert(SCHEMA_DUMP.to_owned(), digest);
        for (name, bytes) in &files {
            let digest = copy_digest(bytes.as_slice(), std::io::sink())?;
            self.manifest.files.insert(name.clone(), digest);
        }
        let mut tar = tar::Builder::new(out);
        let manifest = serde_json::to_vec_pretty(&self.manifest)?;
        append(&mut tar, MANIFEST, manifest.len() as u64, manifest.as_slice())?;
        let dump = std::fs::File::open(self.schema_dump())?;
        let size = dump.metadata()?.len();
        append(&mut tar, SCHEMA_DUMP, size, dump)?;
        for (name, bytes) in &files {
            append(&mut tar, name, bytes.len() as u64, bytes.as_slice())?;
        }
        tar.into_inner()?.flush()?;
        Ok(())
    }

    /// Reads an archive, checking the manifest's format, every file's size
    /// and checksum, and that nothing else is in it.
    pub fn read(input: impl Read) -> Result<Self, ArchiveError> {
        let scratch = Scratch::new()?;
        let mut tar = tar::Archive::new(input);
        let mut entries = tar.entries()?;
        let manifest: Manifest = {
            let first = entries.next().ok_or_else(|| ArchiveError::Malformed("it is empty".into()))??;
            if first.path()?.to_str() != Some(MANIFEST) {
                return Err(ArchiveError::Malformed(format!("{MANIFEST} does not come first")));
            }
            serde_json::from_reader(first.take(MAX_PART_BYTES))
                .map_err(|e| ArchiveError::Malformed(format!("{MANIFEST}: {e}")))?
        };
        if manifest.format != FORMAT {
            return Err(ArchiveError::Malformed(format!(
                "archive format {} (this Plinth reads format {FORMAT})",
                manifest.format
            )));
        }
        SchemaName::from_stored(manifest.tenant.schema.clone())
            .map_err(|s| ArchiveError::Malformed(format!("malformed schema name {s:?}")))?;
        let mut seen = BTreeMap::new();
        let mut parts = BTreeMap::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.path()?.to_str().map(str::to_owned).unwrap_or_default();
            let Some(expected) = manifest.files.get(&name) else {
                return Err(ArchiveError::Malformed(format!("{name:?} is not in the manifest")));
            };
            if seen.contains_key(&name) {
                return Err(ArchiveError::Malformed(format!("{name:?} is in it twice")));
            }
            let digest = if name == SCHEMA_DUMP {
                let file = std::fs::File::create(scratch.path().join(SCHEMA_DUMP))?;
                copy_digest(entry, std::io::BufWriter::new(file))?
            } else if let Some(part) = name.strip_prefix("platform/").and_then(|n| n.strip_suffix(".json")) {
                let mut bytes = Vec::new();
                let digest = copy_digest(entry.take(MAX_PART_BYTES), &mut bytes)?;
                if digest == *expected {
                    let rows =
                        serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Malformed(format!("{name}: {e}")))?;
                    parts.insert(part.to_owned(), rows);
                }
                digest
            } else {
                return Err(ArchiveError::Malformed(format!("{name:?} is not a file of an archive")));
            };
            if digest != *expected {
                return Err(ArchiveError::Damaged(format!(
                    "{name} has {} bytes with SHA-256 {}, the manifest says {} bytes with {}",
                    digest.bytes, digest.sha256, expected.bytes, expected.sha256
                )));
            }
            seen.insert(name, ());
        }
        if let Some(missing) = manifest.files.keys().find(|f| !seen.contains_key(*f)) {
            return Err(ArchiveError::Damaged(format!("{missing} is missing")));
        }
        if !seen.contains_key(SCHEMA_DUMP) {
            return Err(ArchiveError::Malformed(format!("it has no {SCHEMA_DUMP}")));
        }
        Ok(Self { manifest, parts, scratch })
    }

    /// The tenant migrations this binary has that the archive lacks, or
    /// [`ArchiveError::Newer`] if the archive has one this binary does not
    /// know (or a platform migration it does not know).
    pub fn pending<'m>(
        &self,
        migrations: &'m [TenantMigration],
        platform_versions: &[String],
    ) -> Result<Vec<&'m TenantMigration>, ArchiveError> {
        let known: BTreeSet<&str> = migrations.iter().map(|m| m.version).collect();
        if let Some(unknown) = self.manifest.tenant_migrations.iter().find(|v| !known.contains(v.as_str())) {
            return Err(ArchiveError::Newer { what: "tenant", version: unknown.clone() });
        }
        if let Some(platform) = &self.manifest.platform_migration
            && !platform_versions.contains(platform)
        {
            return Err(ArchiveError::Newer { what: "platform", version: platform.clone() });
        }
        let have: BTreeSet<&str> = self.manifest.tenant_migrations.iter().map(String::as_str).collect();
        Ok(migrations.iter().filter(|m| !have.contains(m.version)).collect())
    }

    /// Creates the archived schema on the server of `url` in one
    /// transaction, under `schema` (the archived name, or a copy's).
    pub async fn load_schema(&self, url: &str, schema: &SchemaName) -> anyhow::Result<()> {
        let from = self.manifest.tenant.schema.clone();
        let to = schema.as_str().to_owned();
        let mut restore = pg_tool("pg_restore", url)?;
        restore
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg("--file=-")
            .arg(self.schema_dump())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut psql = pg_tool("psql", url)?;
        psql.args(["--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--file=-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut restore = restore.spawn().context("starting pg_restore (PostgreSQL's client tools)")?;
            let mut psql = psql.spawn().context("starting psql (PostgreSQL's client tools)")?;
            let script = restore.stdout.take().context("pg_restore's output")?;
            let mut sink = std::io::BufWriter::new(psql.stdin.take().context("psql's input")?);
            // The transaction is committed only once pg_restore has written
            // the whole script: if it stops half-way, psql reaches the end of
            // its input inside the transaction, and PostgreSQL rolls it back.
            let copied =
                sink.write_all(b"BEGIN;\n").and_then(|()| rename_schema(BufReader::new(script), &mut sink, &from, &to));
            let restored = restore.wait_with_output()?;
            let committed = match (&copied, restored.status.success()) {
                (Ok(()), true) => sink.write_all(b"COMMIT;\n").and_then(|()| sink.flush()),
                _ => Ok(()),
            };
            drop(sink);
            let loaded = psql.wait_with_output()?;
            if !loaded.status.success() {
                bail!("psql failed: {}", String::from_utf8_lossy(&loaded.stderr).trim());
            }
            if !restored.status.success() {
                bail!("pg_restore failed: {}", String::from_utf8_lossy(&restored.stderr).trim());
            }
            copied.context("passing the script from pg_restore to psql")?;
            committed.context("committing the restored schema")?;
            Ok(())
        })
        .await
        .context("the restore task")?
    }
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, size: u64, data: impl Read) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o600);
    header.set_mtime(u64::try_from(Utc::now().timestamp()).unwrap_or_default());
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, data)
}

/// Copies a SQL script, writing `to` for `from` on every line except the
/// rows of `COPY … FROM stdin;` blocks.
pub fn rename_schema(mut input: impl BufRead, mut output: impl Write, from: &str, to: &str) -> std::io::Result<()> {
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut in_copy = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if in_copy {
            in_copy = !matches!(line.as_slice(), b"\\.\n" | b"\\.\r\n" | b"\\.");
            output.write_all(&line)?;
            continue;
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        in_copy = text.starts_with(b"COPY ") && text.ends_with(b"FROM stdin;");
        let mut rest = line.as_slice();
        while let Some(at) = (!from.is_empty()).then(|| rest.windows(from.len()).position(|w| w == from)).flatten() {
            output.write_all(&rest[..at])?;
            output.write_all(to)?;
            rest = &rest[at + from.len()..];
        }
        output.write_all(rest)?;
    }
    output.flush()
}

/// A PostgreSQL client tool set up to reach the server of `url`.
fn pg_tool(program: &str, url: &str) -> anyhow::Result<std::process::Command> {
    let mut command = std::process::Command::new(program);
    for (key, value) in crate::postgres::libpq_env(url)? {
        command.env(key, value);
    }
    Ok(command)
}

async fn run(command: std::process::Command, what: &str) -> anyhow::Result<()> {
    let mut command = tokio::process::Command::from(command);
    let output = command
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("starting {what} (PostgreSQL's client tools)"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Makes the caller's transaction `REPEATABLE READ, READ ONLY` and exports
/// its snapshot, for `pg_dump --snapshot`: the dump and every row the
/// transaction reads then see the database at the same instant. Must be the
/// transaction's first statement.
pub async fn export_snapshot(conn: &mut PgConn) -> Result<String, diesel::result::Error> {
    #[derive(diesel::QueryableByName)]
    struct Snapshot {
        #[diesel(sql_type = Text)]
        id: String,
    }
    crate::db::batch(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").await?;
    // Raw SQL: a function diesel has no declaration for.
    let snapshot: Snapshot = diesel::sql_query("SELECT pg_export_snapshot() AS id").get_result(conn).await?;
    Ok(snapshot.id)
}

#[derive(diesel::QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = Jsonb)]
    row: serde_json::Value,
}

/// Every row of the platform table `public.<table>` whose `tenant_id` is
/// `tenant`, as JSON objects (column → value). For the table's owner to
/// call: `table` is a name from the owner's code, never from input.
pub async fn rows_of(
    conn: &mut PgConn,
    table: &'static str,
    tenant: TenantId,
) -> Result<Vec<serde_json::Value>, diesel::result::Error> {
    // Raw SQL: a table named by its owner, as JSON.
    let rows: Vec<JsonRow> =
        diesel::sql_query(format!("SELECT to_jsonb(t) AS row FROM public.{table} t WHERE t.tenant_id = $1"))
            .bind::<SqlUuid, _>(tenant.0)
            .load(conn)
            .await?;
    Ok(rows.into_iter().map(|r| r.row).collect())
}

/// Inserts archived rows of the platform table `public.<table>` for
/// `tenant` (each row's `tenant_id` becomes `tenant`). Only columns the
/// table has now are written; `condition` (SQL over the rows, as `r`) keeps
/// only the rows that may be restored. Returns how many were inserted. For
/// the table's owner to call: `table` and `condition` come from its code.
pub async fn restore_rows(
    conn: &mut PgConn,
    table: &'static str,
    rows: &[serde_json::Value],
    tenant: TenantId,
    condition: Option<&'static str>,
) -> Result<usize, diesel::result::Error> {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .cloned()
        .map(|mut row| {
            if let Some(object) = row.as_object_mut() {
                object.insert("tenant_id".to_owned(), serde_json::Value::String(tenant.0.to_string()));
            }
            row
        })
        .collect();
    insert_json(conn, table, rows, condition).await
}

async fn insert_json(
    conn: &mut PgConn,
    table: &'static str,
    rows: Vec<serde_json::Value>,
    condition: Option<&'static str>,
) -> Result<usize, diesel::result::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    #[derive(diesel::QueryableByName)]
    struct Column {
        #[diesel(sql_type = Text)]
        name: String,
    }
    // Raw SQL: the catalog.
    let columns: Vec<Column> = diesel::sql_query(
        "SELECT attname::text AS name FROM pg_attribute \
         WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
    )
    .bind::<Text, _>(format!("public.{table}"))
    .load(conn)
    .await?;
    let present: BTreeSet<&str> =
        rows.iter().filter_map(serde_json::Value::as_object).flat_map(|o| o.keys().map(String::as_str)).collect();
    let list = columns
        .iter()
        .filter(|c| present.contains(c.name.as_str()))
        .map(|c| format!("\"{}\"", c.name.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = condition.map(|c| format!(" WHERE {c}")).unwrap_or_default();
    // Raw SQL: a table named by its owner, filled from JSON.
    diesel::sql_query(format!(
        "INSERT INTO public.{table} ({list}) SELECT {list} FROM jsonb_populate_recordset(NULL::public.{table}, $1) r{filter}"
    ))
    .bind::<Jsonb, _>(serde_json::Value::Array(rows))
    .execute(conn)
    .await
}

/// The registry's part of an archive: the tenant's row and its domains.
pub async fn registry_part(conn: &mut PgConn, tenant: TenantId) -> Result<serde_json::Value, diesel::result::Error> {
    // Raw SQL: the whole row, as JSON.
    let row: JsonRow = diesel::sql_query("SELECT to_jsonb(t) AS row FROM public.tenants t WHERE t.id = $1")
        .bind::<SqlUuid, _>(tenant.0)
        .get_result(conn)
        .await?;
    Ok(serde_json::json!({ "tenant": row.row, "domains": rows_of(conn, "tenant_domains", tenant).await? }))
}

/// Who a restored tenant becomes.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    pub id: TenantId,
    pub slug: crate::ids::Slug,
    pub schema: SchemaName,
    /// Whether it is a copy beside the original rather than the original
    /// itself.
    pub copy: bool,
    /// The shard its schema is loaded on.
    pub shard: crate::ids::ShardName,
}

/// What restoring the registry's part did.
#[derive(Debug, Clone, Default)]
pub struct RestoredRegistry {
    pub domains: usize,
    /// Domains that another tenant holds now, or (for a copy) the
    /// original's.
    pub domains_skipped: usize,
    /// Tenant migrations applied after the restore, the archive being older.
    pub migrated: Vec<&'static str>,
}

/// Why a restore was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the slug {0} is taken")]
    SlugTaken(String),
    #[error("tenant {0} exists; delete it first, or restore a copy with --as <new slug>")]
    Exists(String),
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
}

/// Writes the restored tenant's registry row (the archived one, under the
/// target's id, slug and schema; active), records the archive's tenant
/// migrations in the ledger, applies `pending` ones to the schema (already
/// loaded), and brings back its domains unless restoring a copy (a domain
/// serves one tenant). In the caller's transaction.
pub async fn restore_registry(
    conn: &mut PgConn,
    archive: &Archive,
    target: &RestoreTarget,
    pending: &[&'static TenantMigration],
) -> Result<RestoredRegistry, RestoreError> {
    use diesel::result::{DatabaseErrorKind, Error as DbError};
    let part = archive.parts.get("registry").cloned().unwrap_or_default();
    let mut row = part.get("tenant").cloned().filter(serde_json::Value::is_object).unwrap_or_else(|| {
        let t = &archive.manifest.tenant;
        serde_json::json!({ "name": t.name, "plan": t.plan, "created_at": t.created_at })
    });
    if let Some(object) = row.as_object_mut() {
        object.insert("id".into(), target.id.0.to_string().into());
        object.insert("slug".into(), target.slug.as_str().into());
        object.insert("schema_name".into(), target.schema.as_str().into());
        object.insert("status".into(), "active".into());
        object.insert("updated_at".into(), Utc::now().to_rfc3339().into());
        // Where it is restored, wherever it was taken.
        object.insert("shard".into(), target.shard.as_str().into());
        object.insert("moving_to".into(), serde_json::Value::Null);
        if target.copy {
            // A copy has no subscription: its plan is the operator's doing,
            // and nothing of the original's billing (features taken from
            // Stripe, a restriction for an unpaid invoice) comes with it.
            object.insert("plan_source".into(), "operator".into());
            object.insert("features".into(), serde_json::Value::Null);
            object.insert("restricted_at".into(), serde_json::Value::Null);
        }
    }
    insert_json(conn, "tenants", vec![row], None).await.map_err(|e| match e {
        DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, ref info) => match info.constraint_name() {
            Some("tenants_slug_key") => RestoreError::SlugTaken(target.slug.as_str().to_owned()),
            _ => RestoreError::Exists(target.slug.as_str().to_owned()),
        },
        other => RestoreError::Db(other),
    })?;
    insert_json(conn, "tenant_migrations", archived_ledger(archive, target), None).await?;
    if target.shard.is_primary() {
        crate::migrate::apply(conn, target.id, &target.schema, pending).await?;
    } else {
        // Applied on the shard already ([`restore_on_shard`]).
        crate::migrate::record(conn, target.id, pending.iter().copied()).await?;
    }
    let mut report = RestoredRegistry { migrated: pending.iter().map(|m| m.version).collect(), ..Default::default() };
    let domains = part.get("domains").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    if target.copy {
        report.domains_skipped = domains.len();
    } else {
        report.domains = restore_rows(
            conn,
            "tenant_domains",
            &domains,
            target.id,
            Some("NOT EXISTS (SELECT 1 FROM public.tenant_domains d WHERE d.domain = r.domain)"),
        )
        .await?;
        report.domains_skipped = domains.len() - report.domains;
    }
    Ok(report)
}

/// For a restore onto a shard other than the primary, in a transaction
/// there, before [`restore_registry`]: records the archive's tenant
/// migrations in that server's ledger and applies `pending` ones to the
/// loaded schema.
pub async fn restore_on_shard(
    conn: &mut PgConn,
    archive: &Archive,
    target: &RestoreTarget,
    pending: &[&'static TenantMigration],
) -> Result<(), diesel::result::Error> {
    insert_json(conn, "tenant_migrations", archived_ledger(archive, target), None).await?;
    crate::migrate::apply(conn, target.id, &target.schema, pending).await
}

/// The ledger rows of the archive's tenant migrations, for the target.
fn archived_ledger(archive: &Archive, target: &RestoreTarget) -> Vec<serde_json::Value> {
    let versions = archive.manifest.tenant_migrations.iter();
    versions.map(|v| serde_json::json!({ "tenant_id": target.id.0, "version": v })).collect()
}

/// Drops a schema that a failed restore created (its registry row was never
/// written).
pub async fn drop_schema(conn: &mut PgConn, schema: &SchemaName) -> Result<(), diesel::result::Error> {
    crate::db::batch(conn, &format!("DROP SCHEMA IF EXISTS {} CASCADE", schema.quoted())).await
}

#[cfg(test)]
mod tests {
    use super::rename_schema;

    #[test]
    fn renames_the_schema_everywhere_but_in_copied_rows() {
        let from = "t_0123456789abcdef0123456789abcdef";
        let to = "t_fedcba9876543210fedcba9876543210";
        let script = format!(
            "CREATE SCHEMA {from};\nCREATE TABLE {from}.projects (id uuid);\n\
             COPY {from}.projects (id, name) FROM stdin;\n1\tmentions {from} in its name\n\\.\n\
             ALTER TABLE ONLY {from}.projects ADD CONSTRAINT p PRIMARY KEY (id);\n\
             CREATE TRIGGER x BEFORE UPDATE ON {from}.audit_log FOR EACH ROW EXECUTE FUNCTION {from}.f();\n"
        );
        let mut out = Vec::new();
        rename_schema(script.as_bytes(), &mut out, from, to).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            format!(
                "CREATE SCHEMA {to};\nCREATE TABLE {to}.projects (id uuid);\n\
                 COPY {to}.projects (id, name) FROM stdin;\n1\tmentions {from} in its name\n\\.\n\
                 ALTER TABLE ONLY {to}.projects ADD CONSTRAINT p PRIMARY KEY (id);\n\
                 CREATE TRIGGER x BEFORE UPDATE ON {to}.audit_log FOR EACH ROW EXECUTE FUNCTION {to}.f();\n"
            )
        );
    }
}

//! The template tenant (`public.tenant_template`, at most one): a tenant an
//! operator fills with the rows every new tenant should start with (a sample
//! project, default settings of the product). Provisioning copies its rows
//! into the new tenant's schema in the same transaction, after the schema is
//! made (from a spare of the warm pool, or by the migrations).
//!
//! - The structure is not copied: the template has exactly the tenant
//!   migrations (it is refused otherwise), so its tables are the ones the
//!   new schema already has. What is copied is every row of every table but
//!   the audit log, whose entries are the template's own history.
//! - Rows keep their ids: ids are unique within a tenant's schema, and the
//!   copies live in another schema.
//! - Tables are filled in foreign-key order, so references between the
//!   copied rows hold.
//! - A template that is behind the migrations (a deploy mid-way) is skipped
//!   with a warning, never half-copied: the tenant starts empty instead.

use std::collections::{BTreeMap, BTreeSet};

use diesel::prelude::*;
use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;

use crate::db::PgConn;
use crate::ids::{SchemaName, TenantId};
use crate::migrate::TenantMigration;
use crate::registry::{self, Tenant, TenantStatus};
use crate::schema::tenant_template;

/// Tables whose rows are never copied from the template.
const NOT_COPIED: &[&str] = &["audit_log"];

/// Makes `tenant` the template (or, with `None`, leaves provisioning
/// without one).
pub async fn set(conn: &mut PgConn, tenant: Option<TenantId>) -> Result<(), diesel::result::Error> {
    diesel::delete(tenant_template::table).execute(conn).await?;
    if let Some(tenant) = tenant {
        diesel::insert_into(tenant_template::table)
            .values(tenant_template::tenant_id.eq(tenant.0))
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// The template tenant, if one is set and not being deleted.
pub async fn current(conn: &mut PgConn) -> Result<Option<Tenant>, diesel::result::Error> {
    let id: Option<uuid::Uuid> =
        tenant_template::table.select(tenant_template::tenant_id).first(conn).await.optional()?;
    let Some(id) = id else { return Ok(None) };
    Ok(registry::find_by_id(conn, TenantId(id)).await?.filter(|t| t.status != TenantStatus::Deleting))
}

/// The template's tables in an order that fills referenced tables first.
async fn tables_in_order(conn: &mut PgConn, schema: &SchemaName) -> Result<Vec<String>, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Edge {
        #[diesel(sql_type = Text)]
        table: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        references: Option<String>,
    }
    // Raw SQL: the catalog. Each table, with each table of the same schema
    // it references (NULL for none).
    let edges: Vec<Edge> = diesel::sql_query(
        "SELECT c.relname::text AS table, r.relname::text AS references \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_constraint k ON k.conrelid = c.oid AND k.contype = 'f' \
         LEFT JOIN pg_class r ON r.oid = k.confrelid AND r.relnamespace = c.relnamespace AND r.oid <> c.oid \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
    )
    .bind::<Text, _>(schema.as_str())
    .load(conn)
    .await?;
    let mut needs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for edge in edges {
        let entry = needs.entry(edge.table).or_default();
        if let Some(r) = edge.references {
            entry.insert(r);
        }
    }
    let mut ordered = Vec::with_capacity(needs.len());
    while !needs.is_empty() {
        let ready: Vec<String> = needs
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !needs.contains_key(d)))
            .map(|(t, _)| t.clone())
            .collect();
        if ready.is_empty() {
            // A cycle of references: no order fills them; left to fail on
            // the first violated key, inside the provisioning transaction.
            ordered.extend(needs.keys().cloned());
            break;
        }
        for t in ready {
            needs.remove(&t);
            ordered.push(t);
        }
    }
    Ok(ordered)
}

/// The template's tables (in foreign-key order) and sequences. Reading them
/// scans `pg_class` (it has no index by schema), which grows with every
/// tenant; they are kept per process for the template tenant they were read
/// from. Its structure is its migrations', and it is used only while it has
/// exactly this binary's, so it cannot change under the kept copy.
async fn shape(
    conn: &mut PgConn,
    template: &Tenant,
) -> Result<std::sync::Arc<(Vec<String>, Vec<String>)>, diesel::result::Error> {
    type Kept = Option<(TenantId, std::sync::Arc<(Vec<String>, Vec<String>)>)>;
    static KEPT: std::sync::Mutex<Kept> = std::sync::Mutex::new(None);
    if let Some((id, shape)) = KEPT.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
        && *id == template.id
    {
        return Ok(shape.clone());
    }
    #[derive(QueryableByName)]
    struct Sequence {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let tables = tables_in_order(conn, &template.schema).await?;
    // Raw SQL: the catalog.
    let sequences: Vec<Sequence> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind = 'S'",
    )
    .bind::<Text, _>(template.schema.as_str())
    .load(conn)
    .await?;
    let shape = std::sync::Arc::new((tables, sequences.into_iter().map(|s| s.name).collect()));
    *KEPT.lock().unwrap_or_else(|p| p.into_inner()) = Some((template.id, shape.clone()));
    Ok(shape)
}

/// The template's rows, read to be copied to a tenant on another server
/// ([`insert_rows`]): each table's rows as one JSON array, in foreign-key
/// order, and each sequence's position. `None` when there is no template or
/// it is behind `migrations`, as for [`copy_rows`].
pub async fn rows_to_copy(
    conn: &mut PgConn,
    migrations: &[TenantMigration],
) -> Result<Option<Copied>, diesel::result::Error> {
    let Some(template) = usable(conn, migrations).await? else { return Ok(None) };
    let shape = shape(conn, &template).await?;
    let (tables, sequences) = &*shape;
    #[derive(QueryableByName)]
    struct Rows {
        #[diesel(sql_type = diesel::sql_types::Jsonb)]
        rows: serde_json::Value,
    }
    #[derive(QueryableByName)]
    struct Position {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        last_value: i64,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        is_called: bool,
    }
    let mut copied = Copied::default();
    for table in tables.iter().filter(|t| !NOT_COPIED.contains(&t.as_str())) {
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        // Raw SQL: a table of the schema, named from the catalog and quoted.
        let rows: Rows = diesel::sql_query(format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') AS rows FROM {}.{quoted} t",
            template.schema.quoted()
        ))
        .get_result(conn)
        .await?;
        copied.tables.push((quoted, rows.rows));
    }
    for seq in sequences.iter() {
        let quoted = format!("\"{}\"", seq.replace('"', "\"\""));
        // Raw SQL: a sequence named from the catalog and quoted.
        let at: Position =
            diesel::sql_query(format!("SELECT last_value, is_called FROM {}.{quoted}", template.schema.quoted()))
                .get_result(conn)
                .await?;
        copied.sequences.push((quoted, at.last_value, at.is_called));
    }
    Ok(Some(copied))
}

/// A template's rows on their way to another server.
#[derive(Debug, Default)]
pub struct Copied {
    /// Quoted table names with their rows, in foreign-key order.
    tables: Vec<(String, serde_json::Value)>,
    /// Quoted sequence names with their positions.
    sequences: Vec<(String, i64, bool)>,
}

/// Writes rows read by [`rows_to_copy`] into `to` (a schema just made with
/// the same migrations) in the caller's transaction, on the new tenant's
/// server. Returns how many rows.
pub async fn insert_rows(conn: &mut PgConn, to: &SchemaName, copied: &Copied) -> Result<usize, diesel::result::Error> {
    let mut n = 0;
    for (table, rows) in &copied.tables {
        // Raw SQL: a table named from the catalog and quoted, filled from JSON.
        n += diesel::sql_query(format!(
            "INSERT INTO {to}.{table} SELECT * FROM jsonb_populate_recordset(NULL::{to}.{table}, $1)",
            to = to.quoted()
        ))
        .bind::<diesel::sql_types::Jsonb, _>(rows)
        .execute(conn)
        .await?;
    }
    for (seq, last_value, is_called) in &copied.sequences {
        let target = format!("{}.{seq}", to.quoted()).replace('\'', "''");
        // Raw SQL: setval of a sequence named from the catalog and quoted.
        diesel::sql_query(format!("SELECT setval('{target}', $1, $2)"))
            .bind::<diesel::sql_types::BigInt, _>(last_value)
            .bind::<diesel::sql_types::Bool, _>(is_called)
            .execute(conn)
            .await?;
    }
    Ok(n)
}

/// The template, if there is one and it has every one of `migrations`.
async fn usable(conn: &mut PgConn, migrations: &[TenantMigration]) -> Result<Option<Tenant>, diesel::result::Error> {
    let Some(template) = current(conn).await? else { return Ok(None) };
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let versions: Vec<&str> = migrations.iter().map(|m| m.version).collect();
    // Raw SQL: the ledger compared with an array of versions.
    let has: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM public.tenant_migrations WHERE tenant_id = $1 AND version = ANY($2)",
    )
    .bind::<SqlUuid, _>(template.id.0)
    .bind::<diesel::sql_types::Array<Text>, _>(&versions)
    .get_result(conn)
    .await?;
    if usize::try_from(has.n).unwrap_or_default() != versions.len() {
        tracing::warn!(template = %template.slug, "the template tenant is behind the migrations; new tenants start empty until it is migrated");
        return Ok(None);
    }
    Ok(Some(template))
}

/// Copies the template's rows into `to` (a tenant schema just made with
/// `migrations`), in the caller's transaction. Returns how many rows were
/// copied, or `None` when there is no template or it is behind `migrations`.
pub async fn copy_rows(
    conn: &mut PgConn,
    to: &SchemaName,
    migrations: &[TenantMigration],
) -> Result<Option<usize>, diesel::result::Error> {
    let Some(template) = usable(conn, migrations).await? else { return Ok(None) };
    let shape = shape(conn, &template).await?;
    let (tables, sequences) = &*shape;
    let mut copied = 0;
    for table in tables.iter() {
        if NOT_COPIED.contains(&table.as_str()) {
            continue;
        }
        let table = format!("\"{}\"", table.replace('"', "\"\""));
        // Raw SQL: a table of the schema, named from the catalog and quoted.
        copied += diesel::sql_query(format!(
            "INSERT INTO {to}.{table} SELECT * FROM {from}.{table}",
            to = to.quoted(),
            from = template.schema.quoted()
        ))
        .execute(conn)
        .await?;
    }
    // Sequences (of serial or identity columns) continue where the
    // template's are, so that new rows do not collide with copied ones.
    for seq in sequences.iter() {
        let quoted = format!("\"{}\"", seq.replace('"', "\"\""));
        let target = format!("{}.{quoted}", to.quoted()).replace('\'', "''");
        // Raw SQL: setval of a sequence named from the catalog and quoted.
        diesel::sql_query(format!(
            "SELECT setval('{target}', s.last_value, s.is_called) FROM {}.{quoted} s",
            template.schema.quoted()
        ))
        .execute(conn)
        .await?;
    }
    Ok(Some(copied))
}

//! The warm pool (`public.tenant_spares`): schemas made ahead of time with
//! every tenant migration applied, so that provisioning renames one
//! (`ALTER SCHEMA … RENAME`, a catalog update) instead of running the
//! migrations while a signup waits.
//!
//! - A spare is named `s_` and 32 hex digits and belongs to no tenant;
//!   nothing routes to a schema without a registry row, so no request can
//!   reach one.
//! - It is taken only while its migrations are exactly the running
//!   binary's; [`fill`] drops the others.
//! - Taking one is `FOR UPDATE SKIP LOCKED` inside the provisioning
//!   transaction: two signups never take the same spare, and if the signup
//!   rolls back, the spare is back in the pool with its old name.
//! - [`fill`] makes one spare per transaction under an advisory lock, so
//!   several instances filling at once never overshoot the size.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text};
use diesel_async::RunQueryDsl;

use crate::db::{Db, PgConn};
use crate::ids::{SchemaName, TenantId};
use crate::migrate::{self, TenantMigration};
use crate::schema::tenant_spares;

/// The advisory lock key of the filler (any fixed number: "spares").
const FILL_LOCK: i64 = 0x7370_6172_6573;

fn versions(migrations: &[TenantMigration]) -> Vec<&'static str> {
    migrations.iter().map(|m| m.version).collect()
}

/// Takes a spare for `tenant` in the caller's transaction: renames it to
/// `schema` and records `migrations` in the tenant's ledger. `false` when
/// the pool has none with exactly these migrations.
pub async fn take(
    conn: &mut PgConn,
    tenant: TenantId,
    schema: &SchemaName,
    migrations: &'static [TenantMigration],
) -> Result<bool, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(sql_type = Text)]
        schema_name: String,
    }
    // Raw SQL: DELETE of a row chosen with SKIP LOCKED.
    let taken: Option<Taken> = diesel::sql_query(
        "DELETE FROM public.tenant_spares WHERE schema_name = ( \
             SELECT schema_name FROM public.tenant_spares WHERE versions = $1::text[] \
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING schema_name",
    )
    .bind::<Array<Text>, _>(versions(migrations))
    .get_result(conn)
    .await
    .optional()?;
    let Some(taken) = taken else { return Ok(false) };
    let spare = spare_name(&taken.schema_name)?;
    crate::db::batch(conn, &format!("ALTER SCHEMA {spare} RENAME TO {}", schema.quoted())).await?;
    migrate::record(conn, tenant, migrations).await?;
    crate::counters::increment("plinth_tenant_spares_taken_total", &[]);
    Ok(true)
}

/// A stored spare's name, checked and quoted.
fn spare_name(name: &str) -> Result<String, diesel::result::Error> {
    let valid = name.len() == 34
        && name.starts_with("s_")
        && name[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        Ok(format!("\"{name}\""))
    } else {
        Err(diesel::result::Error::DeserializationError(format!("malformed spare schema name {name:?}").into()))
    }
}

/// How many spares with exactly `migrations` wait in the pool.
pub async fn ready(conn: &mut PgConn, migrations: &[TenantMigration]) -> Result<i64, diesel::result::Error> {
    tenant_spares::table.filter(tenant_spares::versions.eq(versions(migrations))).count().get_result(conn).await
}

/// Brings the pool to `size` spares with exactly `migrations`: drops the
/// others (made by another version of Plinth), then makes the missing ones,
/// one transaction each. Returns how many it made. Another instance filling
/// at the same time makes this one stop early, never overshoot.
pub async fn fill(db: &Db, size: usize, migrations: &'static [TenantMigration]) -> anyhow::Result<usize> {
    let wanted = versions(migrations);
    let stale: Vec<String> = db
        .platform(async |c| {
            Ok::<_, anyhow::Error>(
                tenant_spares::table
                    .filter(tenant_spares::versions.ne(&wanted))
                    .select(tenant_spares::schema_name)
                    .load::<String>(c)
                    .await?,
            )
        })
        .await?;
    for name in stale {
        db.platform(async |c| {
            let deleted = diesel::delete(tenant_spares::table.find(&name)).execute(c).await?;
            if deleted > 0 {
                crate::db::batch(c, &format!("DROP SCHEMA IF EXISTS {} CASCADE", spare_name(&name)?)).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
        .await?;
    }
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let mut made = 0;
    loop {
        // Checked first outside the provisioning transaction, so that a
        // filler with nothing to do counts no schema against its connection.
        if db.platform(async |c| Ok::<_, anyhow::Error>(ready(c, migrations).await? >= size)).await? {
            return Ok(made);
        }
        let added = db
            .provisioning(async |c| {
                #[derive(QueryableByName)]
                struct Locked {
                    #[diesel(sql_type = diesel::sql_types::Bool)]
                    locked: bool,
                }
                // Raw SQL: an advisory lock, held until this transaction ends.
                let lock: Locked = diesel::sql_query("SELECT pg_try_advisory_xact_lock($1) AS locked")
                    .bind::<BigInt, _>(FILL_LOCK)
                    .get_result(c)
                    .await?;
                if !lock.locked || ready(c, migrations).await? >= size {
                    return Ok::<_, anyhow::Error>(false);
                }
                let name = format!("s_{}", uuid::Uuid::new_v4().simple());
                let schema = spare_name(&name)?;
                let mut sql = format!("CREATE SCHEMA {schema};\nSET LOCAL search_path TO {schema};\n");
                for m in migrations {
                    sql.push_str(m.up);
                    sql.push_str(";\n");
                }
                sql.push_str("SET LOCAL search_path TO DEFAULT;");
                crate::db::batch(c, &sql).await?;
                diesel::insert_into(tenant_spares::table)
                    .values((tenant_spares::schema_name.eq(&name), tenant_spares::versions.eq(&wanted)))
                    .execute(c)
                    .await?;
                Ok(true)
            })
            .await?;
        if !added {
            return Ok(made);
        }
        made += 1;
    }
}

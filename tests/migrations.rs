use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection};
use diesel_migrations::MigrationHarness;
use plinth_tenants::migrate::{PLATFORM_MIGRATIONS, TENANT_MIGRATIONS};
use plinth_tenants::{Slug, Tenant, registry};

use crate::harness::{TestDb, TestResult, plinth_cli};

/// Makes a tenant look as if it had never been migrated: ledger emptied, and
/// (unless `keep_tables`) its tables dropped. Keeping the tables makes the
/// next migration fail ("relation already exists").
async fn rewind(client: &tokio_postgres::Client, tenant: &Tenant, keep_tables: bool) -> TestResult {
    client.execute("DELETE FROM public.tenant_migrations WHERE tenant_id = $1", &[&tenant.id.0]).await?;
    if !keep_tables {
        drop_tables(client, tenant).await?;
    }
    Ok(())
}

/// Drops what the tenant migrations created.
async fn drop_tables(client: &tokio_postgres::Client, tenant: &Tenant) -> TestResult {
    let s = tenant.schema.quoted();
    client
        .batch_execute(&format!(
            "DROP TABLE {s}.tasks, {s}.projects, {s}.audit_log; DROP FUNCTION {s}.audit_log_append_only()"
        ))
        .await?;
    Ok(())
}

async fn ledger_count(client: &tokio_postgres::Client, tenant: &Tenant) -> TestResult<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM public.tenant_migrations WHERE tenant_id = $1", &[&tenant.id.0])
        .await?
        .get(0))
}

#[tokio::test]
async fn migrate_all_reports_a_broken_tenant_and_resumes() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let mut tenants = Vec::new();
    for slug in ["alpha", "bravo", "charlie", "delta"] {
        tenants.push(registry::create(&db, &Slug::parse(slug)?, slug).await?);
    }
    let client = testdb.client().await?;
    rewind(&client, &tenants[0], false).await?;
    rewind(&client, &tenants[1], true).await?; // broken
    rewind(&client, &tenants[2], false).await?;

    let (ok, out) = plinth_cli(&testdb, &["migrate", "--concurrency", "2"]).await?;
    assert!(!ok, "a failed tenant makes the run fail:\n{out}");
    assert!(out.contains("4 total, 1 already current, 2 migrated, 1 failed"), "{out}");
    assert!(out.contains("FAILED bravo") && out.contains("already exists"), "{out}");
    let n = TENANT_MIGRATIONS.len() as i64;
    assert_eq!(ledger_count(&client, &tenants[0]).await?, n);
    assert_eq!(ledger_count(&client, &tenants[1]).await?, 0, "the failed tenant rolled back");
    assert_eq!(ledger_count(&client, &tenants[2]).await?, n);

    // Repair the broken tenant; the re-run only touches it.
    drop_tables(&client, &tenants[1]).await?;
    let (ok, out) = plinth_cli(&testdb, &["tenants", "migrate"]).await?;
    assert!(ok, "{out}");
    assert!(out.contains("4 total, 3 already current, 1 migrated, 0 failed"), "{out}");

    // A no-op run changes nothing.
    let (ok, out) = plinth_cli(&testdb, &["migrate"]).await?;
    assert!(ok && out.contains("4 total, 4 already current, 0 migrated, 0 failed"), "{out}");
    Ok(())
}

#[tokio::test]
async fn a_locked_tenant_times_out_without_blocking_the_others() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let a = registry::create(&db, &Slug::parse("locked")?, "Locked").await?;
    let b = registry::create(&db, &Slug::parse("free-one")?, "Free").await?;
    let client = testdb.client().await?;
    rewind(&client, &a, false).await?;
    rewind(&client, &b, false).await?;

    // Another session holds the tenant's row lock (as a long migration would).
    let (mut holder, conn) = tokio_postgres::connect(&testdb.url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let tx = holder.transaction().await?;
    tx.execute("SELECT 1 FROM public.tenants WHERE id = $1 FOR UPDATE", &[&a.id.0]).await?;

    let started = std::time::Instant::now();
    let (ok, out) = plinth_cli(&testdb, &["migrate", "--lock-timeout-ms", "300"]).await?;
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED locked") && out.contains("lock timeout"), "{out}");
    assert!(out.contains("1 migrated, 1 failed"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20));
    tx.rollback().await?;

    let (ok, out) = plinth_cli(&testdb, &["migrate"]).await?;
    assert!(ok && out.contains("1 migrated, 0 failed"), "{out}");
    Ok(())
}

/// The catalog of one schema as text: relations, columns, indexes, functions,
/// triggers. Two equal snapshots mean the same structure.
async fn snapshot(client: &tokio_postgres::Client, schema: &str) -> TestResult<String> {
    let rows = client
        .query(
            "SELECT 'rel ' || c.relname || ' ' || c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1
             UNION ALL SELECT 'col ' || table_name || '.' || column_name || ' ' || data_type FROM information_schema.columns WHERE table_schema = $1
             UNION ALL SELECT 'fn ' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1
             UNION ALL SELECT 'trg ' || t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT t.tgisinternal
             ORDER BY 1",
            &[&schema],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_platform_down_migration_reverses_its_up() -> TestResult {
    let testdb = TestDb::empty().await?;
    let client = testdb.client().await?;
    let conn = AsyncPgConnection::establish(&testdb.url).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let migrations = harness.pending_migrations(PLATFORM_MIGRATIONS)?;
    assert!(!migrations.is_empty());
    for migration in &migrations {
        let before = snapshot(&client, "public").await?;
        harness.run_migration(migration.as_ref())?;
        let after_up = snapshot(&client, "public").await?;
        assert_ne!(before, after_up, "{} changed nothing", migration.name());
        harness.revert_last_migration(PLATFORM_MIGRATIONS)?;
        assert_eq!(before, snapshot(&client, "public").await?, "{} down.sql does not reverse up.sql", migration.name());
        harness.run_migration(migration.as_ref())?;
    }
    Ok(())
}

#[tokio::test]
async fn every_tenant_down_migration_reverses_its_up() -> TestResult {
    let testdb = TestDb::empty().await?;
    let client = testdb.client().await?;
    client.batch_execute("CREATE SCHEMA t_check").await?;
    for migration in TENANT_MIGRATIONS {
        let before = snapshot(&client, "t_check").await?;
        client.batch_execute(&format!("BEGIN; SET LOCAL search_path TO t_check; {}; COMMIT", migration.up)).await?;
        let after_up = snapshot(&client, "t_check").await?;
        assert_ne!(before, after_up, "{} changed nothing", migration.name);
        client.batch_execute(&format!("BEGIN; SET LOCAL search_path TO t_check; {}; COMMIT", migration.down)).await?;
        assert_eq!(before, snapshot(&client, "t_check").await?, "{} down.sql does not reverse up.sql", migration.name);
        client.batch_execute(&format!("BEGIN; SET LOCAL search_path TO t_check; {}; COMMIT", migration.up)).await?;
    }
    Ok(())
}

/// No relation on the default `search_path` (`public`) has the name of a
/// tenant table: a tenant statement that ever ran outside its tenant's
/// transaction, or a one-round-trip read (`Db::tenant_read`) that names a
/// table without its schema, fails instead of reading platform rows.
#[tokio::test]
async fn public_holds_no_relation_named_like_a_tenant_table() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(1)?;
    let tenant = plinth_tenants::registry::create(&db, &plinth_tenants::Slug::parse("alpha")?, "Alpha").await?;
    let client = testdb.client().await?;
    let rows = client
        .query(
            "SELECT t.relname FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = $1 AND t.relname IN (
                 SELECT p.relname FROM pg_class p JOIN pg_namespace pn ON pn.oid = p.relnamespace
                 WHERE pn.nspname = 'public')",
            &[&tenant.schema.as_str()],
        )
        .await?;
    let shared: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(shared.is_empty(), "public has relations named like tenant ones: {shared:?}");
    let tenant_tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = $1",
            &[&tenant.schema.as_str()],
        )
        .await?
        .get(0);
    assert!(tenant_tables >= 3, "the tenant schema has its tables");
    Ok(())
}

/// What lets a tenant's schema live on another server than the platform
/// tables (shards, moves by logical replication) and the whole database
/// move to Citus's schema-based sharding (`docs/scaling.md`): no foreign
/// key, trigger function or column default crosses from one schema to
/// another; every table has a primary key (logical replication of updates
/// and deletes, Citus's reference tables); every sequence is `bigint`
/// (Citus hands each node a range of it).
#[tokio::test]
async fn schemas_stay_portable_to_other_servers_and_citus() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(1)?;
    let tenant = plinth_tenants::registry::create(&db, &plinth_tenants::Slug::parse("alpha")?, "Alpha").await?;
    let client = testdb.client().await?;
    let schemas = ["public", tenant.schema.as_str()];
    let names = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>();

    let crossing = client
        .query(
            "SELECT c.conname::text FROM pg_constraint c
             JOIN pg_class a ON a.oid = c.conrelid JOIN pg_class b ON b.oid = c.confrelid
             WHERE c.contype = 'f' AND a.relnamespace <> b.relnamespace",
            &[],
        )
        .await?;
    assert_eq!(names(crossing), Vec::<String>::new(), "foreign keys from one schema into another");

    let triggers = client
        .query(
            "SELECT t.tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
             JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE NOT t.tgisinternal AND c.relnamespace <> p.pronamespace
               AND p.pronamespace <> 'pg_catalog'::regnamespace",
            &[],
        )
        .await?;
    assert_eq!(names(triggers), Vec::<String>::new(), "triggers calling another schema's function");

    let defaults = client
        .query(
            "SELECT c.relname || '.' || a.attname FROM pg_attrdef d
             JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
             WHERE n.nspname = $1 AND pg_get_expr(d.adbin, d.adrelid) LIKE '%public.%'",
            &[&tenant.schema.as_str()],
        )
        .await?;
    assert_eq!(names(defaults), Vec::<String>::new(), "tenant column defaults naming platform objects");

    let keyless = client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p')",
            &[&&schemas[..]],
        )
        .await?;
    assert_eq!(names(keyless), Vec::<String>::new(), "tables without a primary key");

    let narrow = client
        .query(
            "SELECT n.nspname || '.' || c.relname FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = ANY($1) AND s.seqtypid <> 'int8'::regtype",
            &[&&schemas[..]],
        )
        .await?;
    assert_eq!(names(narrow), Vec::<String>::new(), "sequences narrower than bigint");
    Ok(())
}

use plinth_http::ApiError;
use plinth_tenants::Slug;
use plinth_tenants::migrate::TENANT_MIGRATIONS;
use plinth_tenants::registry::{self, CreateError};

use crate::harness::{TestDb, TestResult};

async fn schema_tables(client: &tokio_postgres::Client, schema: &str) -> TestResult<Vec<String>> {
    let rows = client
        .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", &[&schema])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[tokio::test]
async fn provisioning_creates_schema_tables_and_ledger() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let tenant = registry::create(&db, &Slug::parse("acme")?, "  Acme Inc.  ").await?;
    assert_eq!(tenant.name, "Acme Inc.", "name is trimmed");
    assert!(tenant.schema.as_str().starts_with("t_"));

    let client = testdb.client().await?;
    assert_eq!(schema_tables(&client, tenant.schema.as_str()).await?, ["audit_log", "projects", "tasks"]);
    let versions: Vec<String> = client
        .query("SELECT version FROM public.tenant_migrations WHERE tenant_id = $1 ORDER BY 1", &[&tenant.id.0])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<&str> = TENANT_MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);

    // Nothing tenant-specific leaks into platform transactions afterwards.
    let path = db
        .platform(async |c| {
            use diesel::sql_types::Text;
            use diesel_async::RunQueryDsl;
            #[derive(diesel::QueryableByName)]
            struct P {
                #[diesel(sql_type = Text)]
                p: String,
            }
            let p: P = diesel::sql_query("SELECT current_setting('search_path') AS p").get_result(c).await?;
            Ok::<_, ApiError>(p.p)
        })
        .await?;
    assert!(!path.contains("t_"), "search_path leaked: {path}");
    Ok(())
}

#[tokio::test]
async fn duplicate_slug_and_bad_names_leave_nothing_behind() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    registry::create(&db, &Slug::parse("acme")?, "Acme").await?;
    assert!(matches!(registry::create(&db, &Slug::parse("acme")?, "Other").await, Err(CreateError::SlugTaken)));
    for bad in ["", "   ", "tab\there", &"x".repeat(201)] {
        assert!(matches!(registry::create(&db, &Slug::parse("other")?, bad).await, Err(CreateError::InvalidName(_))));
    }
    let client = testdb.client().await?;
    let schemas: i64 =
        client.query_one("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'", &[]).await?.get(0);
    let tenants: i64 = client.query_one("SELECT count(*) FROM public.tenants", &[]).await?.get(0);
    assert_eq!((schemas, tenants), (1, 1));
    Ok(())
}

#[tokio::test]
async fn a_failure_after_provisioning_rolls_back_the_schema_too() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let slug = Slug::parse("doomed")?;
    let result: Result<(), ApiError> = db
        .platform(async |c| {
            registry::provision(c, &slug, "Doomed").await.map_err(|e| ApiError::Internal(e.into()))?;
            // A later step of the same flow (say, creating the owner) fails.
            Err(ApiError::Conflict("later step failed".into()))
        })
        .await;
    assert!(matches!(result, Err(ApiError::Conflict(_))));
    let client = testdb.client().await?;
    let schemas: i64 =
        client.query_one("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'", &[]).await?.get(0);
    let tenants: i64 = client.query_one("SELECT count(*) FROM public.tenants", &[]).await?.get(0);
    let ledger: i64 = client.query_one("SELECT count(*) FROM public.tenant_migrations", &[]).await?.get(0);
    assert_eq!((schemas, tenants, ledger), (0, 0, 0));
    Ok(())
}

#[tokio::test]
async fn sql_metacharacters_in_names_are_data() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let name = r#"Robert'); DROP SCHEMA public CASCADE; -- "quoted" \ $$"#;
    let tenant = registry::create(&db, &Slug::parse("bobby-tables")?, name).await?;
    assert_eq!(tenant.name, name);
    let client = testdb.client().await?;
    let stored: String =
        client.query_one("SELECT name FROM public.tenants WHERE id = $1", &[&tenant.id.0]).await?.get(0);
    assert_eq!(stored, name);
    Ok(())
}

#[tokio::test]
async fn delete_stops_serving_then_drops_the_schema() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let tenant = registry::create(&db, &Slug::parse("gone")?, "Gone").await?;
    assert!(registry::delete(&db, tenant.id).await?);
    let client = testdb.client().await?;
    let schema: i64 = client
        .query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&tenant.schema.as_str()])
        .await?
        .get(0);
    let rows: i64 = client.query_one("SELECT count(*) FROM public.tenants", &[]).await?.get(0);
    assert_eq!((schema, rows), (0, 0));
    assert!(!registry::delete(&db, tenant.id).await?, "deleting twice finds nothing");
    // The slug is free again.
    registry::create(&db, &Slug::parse("gone")?, "Gone again").await?;
    Ok(())
}

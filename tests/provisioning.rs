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
            registry::provision(c, &db, &slug, "Doomed").await.map_err(|e| ApiError::Internal(e.into()))?;
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

async fn spare_schemas(client: &tokio_postgres::Client) -> TestResult<i64> {
    Ok(client.query_one("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 's\\_%'", &[]).await?.get(0))
}

/// The warm pool: provisioning takes a spare schema (renamed to the
/// tenant's) instead of running the migrations; a spare is never shared, a
/// failed provisioning gives it back, one made by another version of Plinth
/// is never taken, and fillers racing never overshoot. Through the HTTP
/// routes, tenants born from spares stay apart.
#[tokio::test]
async fn provisioning_takes_spares_from_the_warm_pool_and_isolation_holds() -> TestResult {
    use plinth_tenants::spares;
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(4)?;
    let client = testdb.client().await?;

    // A spare left by an older Plinth: not taken, and dropped by the filler.
    client.batch_execute("CREATE SCHEMA s_00000000000000000000000000000000").await?;
    client
        .execute(
            "INSERT INTO public.tenant_spares (schema_name, versions) VALUES ('s_00000000000000000000000000000000', '{old}')",
            &[],
        )
        .await?;
    // Two fillers at once bring the pool to its size, never beyond.
    let (a, b) = tokio::join!(spares::fill(&db, 3, TENANT_MIGRATIONS), spares::fill(&db, 3, TENANT_MIGRATIONS));
    assert_eq!(a? + b?, 3);
    assert_eq!(spare_schemas(&client).await?, 3, "the stale spare is gone, three current ones wait");
    assert_eq!(spares::fill(&db, 3, TENANT_MIGRATIONS).await?, 0, "a full pool is left alone");

    // Two tenants provisioned at once take one spare each.
    let (a, b) = (Slug::parse("alpha")?, Slug::parse("bravo")?);
    let (alpha, bravo) = tokio::join!(registry::create(&db, &a, "Alpha"), registry::create(&db, &b, "Bravo"));
    let (alpha, bravo) = (alpha?, bravo?);
    assert_eq!(spare_schemas(&client).await?, 1);
    for t in [&alpha, &bravo] {
        assert_eq!(schema_tables(&client, t.schema.as_str()).await?, ["audit_log", "projects", "tasks"]);
        let ledger: i64 = client
            .query_one("SELECT count(*) FROM public.tenant_migrations WHERE tenant_id = $1", &[&t.id.0])
            .await?
            .get(0);
        assert_eq!(usize::try_from(ledger)?, TENANT_MIGRATIONS.len());
        let rows: i64 =
            client.query_one(&format!("SELECT count(*) FROM {}.projects", t.schema.quoted()), &[]).await?.get(0);
        assert_eq!(rows, 0, "a spare starts empty");
    }
    let taken: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_user_tables WHERE schemaname IN ($1, $2)",
            &[&alpha.schema.as_str(), &bravo.schema.as_str()],
        )
        .await?
        .get(0);
    assert_eq!(taken, 6, "two distinct schemas of three tables each");

    // A provisioning that fails gives its spare back.
    let err = registry::create(&db, &Slug::parse("alpha")?, "Alpha again").await;
    assert!(matches!(err, Err(CreateError::SlugTaken)));
    assert_eq!(spare_schemas(&client).await?, 1);
    let ready = db.platform(async |c| Ok::<_, ApiError>(spares::ready(c, TENANT_MIGRATIONS).await?)).await?;
    assert_eq!(ready, 1);
    // The last spare, then the migrations when the pool is empty.
    let charlie = registry::create(&db, &Slug::parse("charlie")?, "Charlie").await?;
    let delta = registry::create(&db, &Slug::parse("delta")?, "Delta").await?;
    assert_eq!(spare_schemas(&client).await?, 0);
    assert_eq!(schema_tables(&client, delta.schema.as_str()).await?, ["audit_log", "projects", "tasks"]);

    // Tenants born from spares are as apart as any.
    let app = crate::harness::TestApp::spawn_on(&testdb, crate::harness::AppOptions::default()).await?;
    let mut owners = Vec::new();
    for t in [&alpha, &bravo, &charlie, &delta] {
        owners.push(crate::harness::member(&app.db, t, plinth_access::Role::Owner).await?);
    }
    let res = app
        .http
        .post(app.url("/v1/projects"))
        .bearer_auth(&owners[0])
        .header("x-tenant", "alpha")
        .json(&serde_json::json!({ "name": "Alpha's secret" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let project: serde_json::Value = res.json().await?;
    let id = project["id"].as_str().ok_or("no id")?;
    for (i, slug) in ["bravo", "charlie", "delta"].iter().enumerate() {
        let owner = &owners[i + 1];
        let res = app
            .http
            .get(app.url(&format!("/v1/projects/{id}")))
            .bearer_auth(owner)
            .header("x-tenant", *slug)
            .send()
            .await?;
        assert_eq!(res.status(), 404, "{slug} reached alpha's project");
        let list: serde_json::Value = app
            .http
            .get(app.url("/v1/projects"))
            .bearer_auth(owner)
            .header("x-tenant", *slug)
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(list["data"], serde_json::json!([]), "{slug} sees rows it never wrote");
        // Nor can its owner name alpha through the header.
        let res = app
            .http
            .get(app.url(&format!("/v1/projects/{id}")))
            .bearer_auth(owner)
            .header("x-tenant", "alpha")
            .send()
            .await?;
        assert_eq!(res.status(), 404);
    }
    Ok(())
}

/// A template tenant's rows (not its audit log) are copied into every new
/// tenant, through the migrations and through a spare alike; each copy is
/// the new tenant's own; a template behind the migrations is skipped.
#[tokio::test]
async fn new_tenants_start_with_a_copy_of_the_templates_rows() -> TestResult {
    use crate::harness::plinth_cli;
    use plinth_tenants::spares;
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let client = testdb.client().await?;
    let starter = registry::create(&db, &Slug::parse("starter")?, "Starter").await?;
    let s = starter.schema.quoted();
    client
        .batch_execute(&format!(
            "INSERT INTO {s}.projects (id, name) VALUES ('018f0000-0000-7000-8000-000000000001', 'Welcome'), \
                 ('018f0000-0000-7000-8000-000000000002', 'Examples');
             INSERT INTO {s}.tasks (id, project_id, title) VALUES \
                 ('018f0000-0000-7000-8000-000000000003', '018f0000-0000-7000-8000-000000000001', 'Read the guide');
             INSERT INTO {s}.audit_log (id, actor_type, action) VALUES (gen_random_uuid(), 'system', 'seeded');"
        ))
        .await?;
    let (ok, out) = plinth_cli(&testdb, &["tenants", "template", "starter"]).await?;
    assert!(ok, "{out}");
    let (ok, out) = plinth_cli(&testdb, &["tenants", "template"]).await?;
    assert!(ok && out.contains("template: starter"), "{out}");

    let rows = async |t: &plinth_tenants::Tenant| -> TestResult<(Vec<String>, Vec<String>, i64)> {
        let q = t.schema.quoted();
        let projects = client.query(&format!("SELECT name FROM {q}.projects ORDER BY name"), &[]).await?;
        let tasks = client.query(&format!("SELECT title FROM {q}.tasks"), &[]).await?;
        let audit: i64 = client.query_one(&format!("SELECT count(*) FROM {q}.audit_log"), &[]).await?.get(0);
        Ok((projects.iter().map(|r| r.get(0)).collect(), tasks.iter().map(|r| r.get(0)).collect(), audit))
    };
    let seeded = (vec!["Examples".to_owned(), "Welcome".to_owned()], vec!["Read the guide".to_owned()], 0);
    // Through the migrations…
    let alpha = registry::create(&db, &Slug::parse("alpha")?, "Alpha").await?;
    assert_eq!(rows(&alpha).await?, seeded, "alpha has the template's rows and no audit entry of its");
    // …and through a spare.
    assert_eq!(spares::fill(&db, 1, TENANT_MIGRATIONS).await?, 1);
    let bravo = registry::create(&db, &Slug::parse("bravo")?, "Bravo").await?;
    assert_eq!(spares::fill(&db, 1, TENANT_MIGRATIONS).await?, 1, "bravo took the spare");
    assert_eq!(rows(&bravo).await?, seeded);

    // Each copy is its own: a change in one reaches neither the template
    // nor the other copy.
    client
        .batch_execute(&format!(
            "DELETE FROM {a}.projects WHERE name = 'Welcome'; UPDATE {b}.projects SET name = 'Mine' WHERE name = 'Examples'",
            a = alpha.schema.quoted(),
            b = bravo.schema.quoted()
        ))
        .await?;
    let template_rows = rows(&starter).await?;
    assert_eq!((template_rows.0, template_rows.1), (seeded.0.clone(), seeded.1.clone()));
    assert_eq!(rows(&alpha).await?.0, ["Examples"]);
    assert_eq!(rows(&bravo).await?.0, ["Mine", "Welcome"]);

    // A template behind the migrations is skipped: the tenant starts empty.
    client.execute("DELETE FROM public.tenant_migrations WHERE tenant_id = $1 AND version = (SELECT max(version) FROM public.tenant_migrations WHERE tenant_id = $1)", &[&starter.id.0]).await?;
    let charlie = registry::create(&db, &Slug::parse("charlie")?, "Charlie").await?;
    assert_eq!(rows(&charlie).await?, (vec![], vec![], 0));
    // No template any more: empty too.
    let (ok, out) = plinth_cli(&testdb, &["tenants", "template", "--clear"]).await?;
    assert!(ok, "{out}");
    let delta = registry::create(&db, &Slug::parse("delta")?, "Delta").await?;
    assert_eq!(rows(&delta).await?, (vec![], vec![], 0));
    Ok(())
}

/// A connection that creates schemas counts each toward
/// `max_tenants_per_connection`, as serving a tenant does: creating one
/// fills the backend's caches with its relations, and a connection that
/// provisions thousands of tenants would otherwise only be retired by age.
#[tokio::test]
async fn a_connection_that_provisions_many_tenants_is_retired() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let mut config = plinth_tenants::DbConfig::new(&testdb.url);
    config.pool_size = 1;
    config.max_tenants_per_connection = 2;
    let db = plinth_tenants::Db::connect(&config)?;
    let backend = async || {
        db.statement(async |c| {
            #[derive(diesel::QueryableByName)]
            struct Pid {
                #[diesel(sql_type = diesel::sql_types::Integer)]
                pid: i32,
            }
            let row: Pid =
                diesel_async::RunQueryDsl::get_result(diesel::sql_query("SELECT pg_backend_pid() AS pid"), c).await?;
            Ok::<_, plinth_http::ApiError>(row.pid)
        })
        .await
    };
    let first = backend().await?;
    for (i, slug) in ["alpha", "bravo"].into_iter().enumerate() {
        plinth_tenants::registry::create(&db, &plinth_tenants::Slug::parse(slug)?, "T").await?;
        assert_eq!(backend().await?, first, "retired after {} schemas, below the limit", i + 1);
    }
    plinth_tenants::registry::create(&db, &plinth_tenants::Slug::parse("charlie")?, "T").await?;
    assert_ne!(backend().await?, first, "a connection that created 3 schemas (limit 2) was kept");
    Ok(())
}

//! Tenants on several PostgreSQL servers (`plinth shards`): declared by
//! the real binary, placed on the open shard with the fewest tenants,
//! served, migrated, audited and deleted there, and never reached through
//! another shard's connection.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, plinth_cli};
use crate::processes::Cluster;
use plinth_http::idempotency::REPLAYED;
use plinth_tenants::db::{TenantScope, TenantSql};
use plinth_tenants::{ShardName, Tenant, registry};

/// A plain client on `url`.
async fn client(url: &str) -> TestResult<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Whether the server behind `client` has `schema`.
async fn has_schema(client: &tokio_postgres::Client, schema: &str) -> TestResult<bool> {
    Ok(client.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = $1", &[&schema]).await?.get::<_, i64>(0)
        == 1)
}

async fn ledger(client: &tokio_postgres::Client, tenant: &Tenant) -> TestResult<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM public.tenant_migrations WHERE tenant_id = $1", &[&tenant.id.0])
        .await?
        .get(0))
}

async fn tenant(app: &TestApp, slug: &str) -> TestResult<Tenant> {
    Ok(app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, slug).await?))
        .await?
        .ok_or("no such tenant")?)
}

#[derive(diesel::QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    _name: String,
}

#[tokio::test]
async fn tenants_live_on_shards_and_stay_apart() -> TestResult {
    let app = TestApp::spawn().await?;
    let testdb = app.testdb.as_ref().ok_or("no test database")?;
    let (b, c) = (Cluster::init(&[])?, Cluster::init(&[])?);
    b.start()?;
    c.start()?;
    let (b_url, c_url) = (b.url("127.0.0.1", "postgres"), c.url("127.0.0.1", "postgres"));

    // Declared by the CLI; what cannot be a shard is refused.
    for (name, url) in [("b", &b_url), ("c", &c_url)] {
        let (ok, out) = plinth_cli(testdb, &["shards", "add", name, "--url", url]).await?;
        assert!(ok && out.contains(&format!("shard {name} added")), "{out}");
    }
    let (ok, out) = plinth_cli(testdb, &["shards", "add", "again", "--url", &b_url]).await?;
    assert!(!ok && out.contains("already the shard b"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "add", "self", "--url", &testdb.url]).await?;
    assert!(!ok && out.contains("platform tables"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "add", "c", "--url", &b_url]).await?;
    assert!(!ok && out.contains("a shard named c exists"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "add", "Bad Name", "--url", &b_url]).await?;
    assert!(!ok && out.contains("a shard's name"), "{out}");

    // A template on the primary: tenants placed elsewhere start with its rows too.
    let (ok, out) = plinth_cli(testdb, &["shards", "drain", "b"]).await?;
    assert!(ok, "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "drain", "c"]).await?;
    assert!(ok, "{out}");
    app.create_tenant("seed").await?;
    assert!(tenant(&app, "seed").await?.shard.is_primary());
    app.create_project("seed", "Welcome").await?;
    let (ok, out) = plinth_cli(testdb, &["tenants", "template", "seed"]).await?;
    assert!(ok, "{out}");
    let primary = testdb.client().await?;
    primary.execute("UPDATE public.shards SET state = 'open' WHERE name IN ('b', 'c')", &[]).await?;
    let (ok, out) = plinth_cli(testdb, &["shards", "drain", "primary"]).await?;
    assert!(ok, "{out}");

    // Placed on the open shard with the fewest tenants, by name on a tie.
    for slug in ["alpha", "bravo", "delta"] {
        app.create_tenant(slug).await?;
    }
    let (alpha, bravo, delta) =
        (tenant(&app, "alpha").await?, tenant(&app, "bravo").await?, tenant(&app, "delta").await?);
    assert_eq!((alpha.shard.as_str(), bravo.shard.as_str(), delta.shard.as_str()), ("b", "c", "b"));
    let (ok, out) = plinth_cli(testdb, &["tenants", "create", "echo", "--name", "Echo", "--shard", "primary"]).await?;
    assert!(!ok && out.contains("no open shard named primary"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "list"]).await?;
    assert!(ok, "{out}");
    let line = |name: &str| out.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_owned();
    assert!(line("primary").contains("draining") && line("primary").ends_with("DATABASE_URL"), "{out}");
    assert!(line("b").contains("open") && line("b").contains(" 2  "), "{out}");
    assert!(line("c").contains(" 1  "), "{out}");

    // Each schema is on its own server only, with that server's ledger.
    let (on_b, on_c) = (client(&b_url).await?, client(&c_url).await?);
    assert!(has_schema(&on_b, alpha.schema.as_str()).await?);
    assert!(!has_schema(&on_c, alpha.schema.as_str()).await?);
    assert!(!has_schema(&primary, alpha.schema.as_str()).await?);
    assert!(has_schema(&on_c, bravo.schema.as_str()).await?);
    assert!(ledger(&on_b, &alpha).await? > 0);
    assert_eq!(ledger(&on_b, &alpha).await?, ledger(&primary, &alpha).await?);
    let copied: i64 =
        on_b.query_one(&format!("SELECT count(*) FROM {}.projects", delta.schema.quoted()), &[]).await?.get(0);
    assert_eq!(copied, 1, "the template's project was copied to a tenant on another server");

    // Served on its shard, through the API.
    let project = app.create_project("alpha", "Rocket").await?;
    let id = project["id"].as_str().ok_or("no id")?;
    let res = app.req(Method::GET, "alpha", &format!("/v1/projects/{id}")).send().await?;
    assert_eq!(res.status(), 200);
    let rows: i64 = on_b
        .query_one(&format!("SELECT count(*) FROM {}.projects WHERE name = 'Rocket'", alpha.schema.quoted()), &[])
        .await?
        .get(0);
    assert_eq!(rows, 1, "the project is on shard b");

    // A keyed write is answered once: its answer is kept on the shard,
    // beside the row it made, and replayed from there.
    let keyed = || {
        app.req(Method::POST, "alpha", "/v1/projects").header("idempotency-key", "k-1").json(&json!({ "name": "Once" }))
    };
    let first = keyed().send().await?;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await?;
    let again = keyed().send().await?;
    assert_eq!(again.status(), 201);
    assert!(again.headers().contains_key(REPLAYED.as_str()), "replayed");
    let again: Value = again.json().await?;
    assert_eq!(first["id"], again["id"]);
    let kept: i64 = on_b.query_one("SELECT count(*) FROM public.idempotency_keys", &[]).await?.get(0);
    assert_eq!(kept, 1, "the answer is kept on b");

    // Apart: another tenant's member does not reach it, and a connection of
    // another shard cannot read it even when asked with its schema.
    let intruder = app.token("bravo").ok_or("no token")?;
    let res = app
        .http
        .get(app.url(&format!("/v1/projects/{id}")))
        .bearer_auth(&intruder)
        .header("x-tenant", "alpha")
        .send()
        .await?;
    assert_error(res, 404, "not_found").await?;
    let res = app.req(Method::GET, "bravo", &format!("/v1/projects/{id}")).send().await?;
    assert_error(res, 404, "not_found").await?;
    let elsewhere = ShardName::parse("c")?;
    let forged = TenantScope { id: alpha.id, schema: &alpha.schema, shard: &elsewhere };
    let read: Result<Vec<Name>, plinth_http::ApiError> =
        app.db.tenant_read(forged, TenantSql("SELECT name FROM {schema}.projects"), |q| q).await;
    assert!(read.is_err(), "shard c's connection read alpha's projects: {:?}", read.map(|r| r.len()));
    let forged_primary = ShardName::primary();
    let forged = TenantScope { id: alpha.id, schema: &alpha.schema, shard: &forged_primary };
    let read: Result<Vec<Name>, plinth_http::ApiError> =
        app.db.tenant_read(forged, TenantSql("SELECT name FROM {schema}.projects"), |q| q).await;
    assert!(read.is_err(), "the primary's connection read alpha's projects");

    // Audit entries of an action on the primary's rows reach the tenant's
    // log on its shard, once.
    app.set_plan("alpha", "enterprise").await?;
    let res = app
        .req(Method::POST, "alpha", "/v1/api-keys")
        .json(&json!({ "name": "deploys", "role": "viewer" }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let waiting: i64 = primary
        .query_one("SELECT count(*) FROM public.audit_outbox WHERE tenant_id = $1", &[&alpha.id.0])
        .await?
        .get(0);
    assert!(waiting >= 1, "the entry waits in the outbox");
    let created = format!("SELECT count(*) FROM {}.audit_log WHERE action = 'api_key.created'", alpha.schema.quoted());
    assert_eq!(on_b.query_one(&created, &[]).await?.get::<_, i64>(0), 0);
    let moved = plinth_tenants::audit::deliver(&app.db).await?;
    assert!(moved >= 1);
    assert_eq!(on_b.query_one(&created, &[]).await?.get::<_, i64>(0), 1, "delivered to alpha's log on b");
    let left: i64 = primary.query_one("SELECT count(*) FROM public.audit_outbox", &[]).await?.get(0);
    assert_eq!(left, 0);
    let res = app.req(Method::GET, "alpha", "/v1/audit-log").send().await?;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await?;
    assert!(page.to_string().contains("api_key.created"), "{page}");

    // Migrate-all reaches schemas on every shard. A tenant behind on b is
    // brought up to date there; one whose primary ledger lost rows the
    // shard has (a run stopped between the two) is only recorded again.
    let last = plinth_tenants::migrate::TENANT_MIGRATIONS.last().ok_or("no migrations")?;
    let s = alpha.schema.quoted();
    on_b.batch_execute(&format!(
        "BEGIN; SET LOCAL search_path TO {s}; {}; DELETE FROM public.tenant_migrations WHERE tenant_id = '{}' AND version = '{}'; COMMIT",
        last.down, alpha.id.0, last.version
    ))
    .await?;
    primary
        .execute(
            "DELETE FROM public.tenant_migrations WHERE tenant_id = ANY($1) AND version = $2",
            &[&vec![alpha.id.0, bravo.id.0], &last.version],
        )
        .await?;
    let (ok, out) = plinth_cli(testdb, &["migrate"]).await?;
    assert!(ok, "{out}");
    for (t, server) in [(&alpha, &on_b), (&bravo, &on_c)] {
        assert_eq!(ledger(server, t).await?, ledger(&primary, t).await?, "{}: ledgers level", t.slug);
        assert_eq!(usize::try_from(ledger(&primary, t).await?)?, plinth_tenants::migrate::TENANT_MIGRATIONS.len());
    }
    let res = app.req(Method::GET, "alpha", &format!("/v1/projects/{id}")).send().await?;
    assert_eq!(res.status(), 200, "served after its migration on b");

    // A backup of a tenant on another shard is refused, saying why, and so
    // is its organization's own export.
    let res = app.req(Method::POST, "alpha", "/v1/tenant/exports").send().await?;
    let refused = assert_error(res, 409, "conflict").await?;
    assert!(refused.to_string().contains("not supported yet"), "{refused}");
    let (ok, out) = plinth_cli(testdb, &["tenants", "backup", "alpha", "--out", "/dev/null"]).await?;
    assert!(!ok && out.contains("lives on shard b"), "{out}");

    // Deleted: its schema and ledger go from b, its row from the primary.
    let (ok, out) = plinth_cli(testdb, &["tenants", "delete", "alpha", "--yes"]).await?;
    assert!(ok, "{out}");
    assert!(!has_schema(&on_b, alpha.schema.as_str()).await?);
    assert_eq!(ledger(&on_b, &alpha).await?, 0);
    assert!(has_schema(&on_b, delta.schema.as_str()).await?, "its neighbour stays");
    let gone =
        app.db.platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_id(c, alpha.id).await?)).await?;
    assert!(gone.is_none());
    Ok(())
}

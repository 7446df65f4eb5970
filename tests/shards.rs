//! Tenants on several PostgreSQL servers (`plinth shards`): declared by
//! the real binary, placed on the open shard with the fewest tenants,
//! served, migrated, audited and deleted there, and never reached through
//! another shard's connection.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, eventually, plinth_cli};
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

/// A row of `SELECT name …`.
#[derive(diesel::QueryableByName)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = name)]
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
    let forged =
        TenantScope { id: alpha.id, schema: &alpha.schema, shard: &elsewhere, moving: false, consistency: None };
    let read: Result<Vec<Name>, plinth_http::ApiError> =
        app.db.tenant_read(forged, TenantSql("SELECT name FROM {schema}.projects"), |q| q).await;
    assert!(read.is_err(), "shard c's connection read alpha's projects: {:?}", read.map(|r| r.len()));
    let forged_primary = ShardName::primary();
    let forged =
        TenantScope { id: alpha.id, schema: &alpha.schema, shard: &forged_primary, moving: false, consistency: None };
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
    // shard has (a run stopped between the two) is only recorded again;
    // one whose migration fails on b (its ledgers lost a row its schema
    // has) is reported, without stopping the others, and a run after the
    // fix finishes it.
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
            &[&vec![alpha.id.0, bravo.id.0, delta.id.0], &last.version],
        )
        .await?;
    on_b.execute(
        "DELETE FROM public.tenant_migrations WHERE tenant_id = $1 AND version = $2",
        &[&delta.id.0, &last.version],
    )
    .await?;
    let (ok, out) = plinth_cli(testdb, &["migrate"]).await?;
    assert!(!ok && out.contains("1 failed") && out.contains("FAILED delta"), "{out}");
    assert_eq!(ledger(&on_b, &delta).await?, ledger(&primary, &delta).await?);
    assert!(usize::try_from(ledger(&primary, &delta).await?)? < plinth_tenants::migrate::TENANT_MIGRATIONS.len());
    on_b.batch_execute(&format!("SET search_path TO {}; {}; RESET search_path", delta.schema.quoted(), last.down))
        .await?;
    let (ok, out) = plinth_cli(testdb, &["migrate"]).await?;
    assert!(ok && out.contains("1 migrated"), "{out}");
    for (t, server) in [(&alpha, &on_b), (&bravo, &on_c), (&delta, &on_b)] {
        assert_eq!(ledger(server, t).await?, ledger(&primary, t).await?, "{}: ledgers level", t.slug);
        assert_eq!(usize::try_from(ledger(&primary, t).await?)?, plinth_tenants::migrate::TENANT_MIGRATIONS.len());
    }
    let res = app.req(Method::GET, "alpha", &format!("/v1/projects/{id}")).send().await?;
    assert_eq!(res.status(), 200, "served after its migration on b");

    // A backup taken on b, restored as a copy on c: the copy's schema and
    // ledger are there only, with alpha's rows, and its members reach it.
    // The organization's own export is taken as well.
    let dir = crate::harness::TempDir::new("shard-backup")?;
    let file = dir.path.join("alpha.tar");
    let file = file.to_str().ok_or("path")?;
    let (ok, out) = plinth_cli(testdb, &["tenants", "backup", "alpha", "--out", file]).await?;
    assert!(ok, "{out}");
    let (ok, out) =
        plinth_cli(testdb, &["tenants", "restore", file, "--as", "alpha-copy", "--shard", "nowhere"]).await?;
    assert!(!ok && out.contains("no open shard named nowhere"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["tenants", "restore", file, "--as", "alpha-copy", "--shard", "c"]).await?;
    assert!(ok, "{out}");
    let copy = tenant(&app, "alpha-copy").await?;
    assert_eq!(copy.shard.as_str(), "c");
    assert!(has_schema(&on_c, copy.schema.as_str()).await?);
    assert!(!has_schema(&on_b, copy.schema.as_str()).await? && !has_schema(&primary, copy.schema.as_str()).await?);
    assert_eq!(ledger(&on_c, &copy).await?, ledger(&primary, &alpha).await?);
    assert_eq!(ledger(&primary, &copy).await?, ledger(&primary, &alpha).await?);
    let res = app
        .http
        .get(app.url(&format!("/v1/projects/{id}")))
        .bearer_auth(app.token("alpha").ok_or("no token")?)
        .header("x-tenant", "alpha-copy")
        .send()
        .await?;
    assert_eq!(res.status(), 200, "the copy on c has alpha's project, for alpha's members");
    let res = app.req(Method::POST, "alpha", "/v1/tenant/exports").send().await?;
    assert_eq!(res.status(), 202);

    // An instance whose only platform connection is held by the signup
    // still makes its first pool to the shard the signup lands on.
    let lone = testdb.db(1)?;
    let placed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        registry::create(&lone, &plinth_tenants::Slug::parse("foxtrot")?, "Foxtrot"),
    )
    .await??;
    assert!(!placed.shard.is_primary());

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

/// What the load saw while a tenant moved.
#[derive(Default)]
struct Seen {
    /// Projects whose creation was acknowledged (201), in order.
    acked: Vec<String>,
    /// 503 `unavailable` answers, each with `Retry-After`, then retried.
    unavailable: usize,
    /// Anything else: a failure of the test.
    wrong: Vec<String>,
}

/// Writes through `app` and reads through `other` until `stop`: each
/// read asks for the newest project acknowledged before it was sent, so a
/// read served by a copy that missed a write (the old server after the
/// flip) answers 404 and is caught.
fn load(
    app: &std::sync::Arc<TestApp>,
    other: &std::sync::Arc<TestApp>,
    seen: &std::sync::Arc<std::sync::Mutex<Seen>>,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<TestResult>> {
    use std::sync::atomic::Ordering;
    let mut tasks = Vec::new();
    for writer in 0..2 {
        let (app, seen, stop) = (std::sync::Arc::clone(app), std::sync::Arc::clone(seen), std::sync::Arc::clone(stop));
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let res = app
                    .req(Method::POST, "mover", "/v1/projects")
                    .json(&json!({ "name": format!("w{writer}-{n}") }))
                    .send()
                    .await?;
                let status = res.status().as_u16();
                let retry = res.headers().contains_key("retry-after");
                let body: Value = res.json().await?;
                let mut seen = lock(&seen);
                match (status, body["id"].as_str()) {
                    (201, Some(id)) => seen.acked.push(id.to_owned()),
                    (503, _) if retry && body["error"]["code"] == "unavailable" => seen.unavailable += 1,
                    _ => seen.wrong.push(format!("write: {status} {body}")),
                }
            }
            Ok(())
        }));
    }
    for _ in 0..2 {
        let (other, seen, stop) =
            (std::sync::Arc::clone(other), std::sync::Arc::clone(seen), std::sync::Arc::clone(stop));
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Some(id) = lock(&seen).acked.last().cloned() else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let res = other.req(Method::GET, "mover", &format!("/v1/projects/{id}")).send().await?;
                let status = res.status().as_u16();
                let retry = res.headers().contains_key("retry-after");
                let body: Value = res.json().await?;
                let mut seen = lock(&seen);
                match status {
                    200 if body["id"] == id.as_str() => {}
                    503 if retry && body["error"]["code"] == "unavailable" => seen.unavailable += 1,
                    _ => seen.wrong.push(format!("read of {id}: {status} {body}")),
                }
            }
            Ok(())
        }));
    }
    tasks
}

fn lock(seen: &std::sync::Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every project id in `schema` on the server behind `client`.
async fn project_ids(client: &tokio_postgres::Client, schema: &str) -> TestResult<std::collections::HashSet<String>> {
    let rows = client.query(&format!("SELECT id::text FROM \"{schema}\".projects"), &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

#[tokio::test]
async fn a_tenant_moves_to_another_server_under_load() -> TestResult {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let testdb = &crate::harness::TestDb::migrated().await?;
    let app = TestApp::spawn_on(testdb, crate::harness::AppOptions::default()).await?;
    let other = TestApp::spawn_on(testdb, crate::harness::AppOptions::default()).await?.with_tokens_of(&app);
    let logical = [("wal_level", "logical")];
    let (b, c) = (Cluster::init(&logical)?, Cluster::init(&logical)?);
    b.start()?;
    c.start()?;
    let (b_url, c_url) = (b.url("127.0.0.1", "postgres"), c.url("127.0.0.1", "postgres"));
    let primary = testdb.client().await?;

    // One tenant on the primary, then two on b.
    app.create_tenant("stay").await?;
    for (name, url) in [("b", &b_url), ("c", &c_url)] {
        let (ok, out) = plinth_cli(testdb, &["shards", "add", name, "--url", url]).await?;
        assert!(ok, "{out}");
    }
    for shard in ["primary", "c"] {
        let (ok, out) = plinth_cli(testdb, &["shards", "drain", shard]).await?;
        assert!(ok, "{out}");
    }
    let mover = app.create_tenant("mover").await?;
    app.create_tenant("neighbour").await?;
    assert_eq!(tenant(&app, "mover").await?.shard.as_str(), "b");
    let neighbours = app.create_project("neighbour", "Next door").await?;
    let schema = mover.schema.as_str().to_owned();

    // Refused, saying why, with nothing changed.
    let refusals: [(&[&str], &str); 3] = [
        (&["tenants", "move", "mover", "--to", "b"], "already lives on shard b"),
        (&["tenants", "move", "mover", "--to", "nowhere"], "no shard named nowhere"),
        (&["tenants", "move", "mover", "--to", "c"], "shard c is draining"),
    ];
    for (args, why) in refusals {
        let (ok, out) = plinth_cli(testdb, args).await?;
        assert!(!ok && out.contains(why), "{args:?}: {out}");
    }
    let wal_level: String = primary.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        let (ok, out) = plinth_cli(testdb, &["tenants", "move", "stay", "--to", "b"]).await?;
        assert!(!ok && out.contains("needs wal_level = logical"), "{out}");
    }
    primary.execute("UPDATE public.shards SET state = 'open' WHERE name = 'c'", &[]).await?;

    app.set_plan("mover", "enterprise").await?;
    for n in 0..40 {
        app.create_project("mover", &format!("seed-{n}")).await?;
    }
    let keyed = |instance: &TestApp| {
        instance
            .req(Method::POST, "mover", "/v1/projects")
            .header("idempotency-key", "before-the-move")
            .json(&json!({ "name": "Keyed" }))
    };
    let first = keyed(&app).send().await?;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await?;
    let (on_b, on_c) = (client(&b_url).await?, client(&c_url).await?);
    assert_eq!(project_ids(&on_b, &schema).await?.len(), 41);

    // The move, under writes through one instance and reads through the other.
    let (app, other) = (Arc::new(app), Arc::new(other));
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&app, &other, &seen, &stop);
    let count = || lock(&seen).acked.len();
    crate::harness::eventually(std::time::Duration::from_secs(30), || async { Ok(count() >= 20) }).await?;
    let before = count();
    let (ok, out) = plinth_cli(testdb, &["tenants", "move", "mover", "--to", "c", "--max-pause-ms", "5000"]).await?;
    assert!(ok && out.contains("moved mover from shard b to c"), "{out}");
    let during = count() - before;
    // Served on c by both instances for a while after the flip.
    let after = count();
    crate::harness::eventually(std::time::Duration::from_secs(30), || async { Ok(count() >= after + 20) }).await?;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let seen = std::mem::take(&mut *lock(&seen));
    assert!(seen.wrong.is_empty(), "{} wrong answers: {:?}", seen.wrong.len(), &seen.wrong[..seen.wrong.len().min(5)]);
    assert!(during > 0, "no write was acknowledged while the move ran");
    eprintln!("{during} writes during the move; {} answered 503 once; {out}", seen.unavailable);

    // No acknowledged write lost, none extra: c has exactly the seeds and
    // every acknowledged project; b has nothing of the tenant left.
    let ids = project_ids(&on_c, &schema).await?;
    assert_eq!(ids.len(), 41 + seen.acked.len());
    assert!(seen.acked.iter().all(|id| ids.contains(id)), "an acknowledged project is missing on c");
    assert!(!has_schema(&on_b, &schema).await?);
    assert_eq!(ledger(&on_b, &mover).await?, 0);
    assert_eq!(ledger(&on_c, &mover).await?, ledger(&primary, &mover).await?);
    for (server, what) in [(&on_b, "pg_publication"), (&on_b, "pg_replication_slots"), (&on_c, "pg_subscription")] {
        let left: i64 = server.query_one(&format!("SELECT count(*) FROM {what}"), &[]).await?.get(0);
        assert_eq!(left, 0, "{what} left behind");
    }
    let moved = tenant(&app, "mover").await?;
    assert_eq!((moved.shard.as_str(), moved.moving), ("c", false));

    // A keyed write made before the move is replayed after it, from c.
    let again = keyed(&app).send().await?;
    assert_eq!(again.status(), 201);
    assert!(again.headers().contains_key(REPLAYED.as_str()), "replayed after the move");
    assert_eq!(again.json::<Value>().await?["id"], first["id"]);
    assert_eq!(project_ids(&on_c, &schema).await?.len(), ids.len(), "not made twice");
    let kept: i64 = on_b.query_one("SELECT count(*) FROM public.idempotency_keys", &[]).await?.get(0);
    assert_eq!(kept, 0, "b keeps no answer of the moved tenant");
    let res = app
        .req(Method::GET, "neighbour", &format!("/v1/projects/{}", neighbours["id"].as_str().unwrap_or("")))
        .send()
        .await?;
    assert_eq!(res.status(), 200, "its neighbour on b is served as before");

    // Apart: b's connection no longer reaches the tenant's rows.
    let old = ShardName::parse("b")?;
    let forged = TenantScope { id: moved.id, schema: &moved.schema, shard: &old, moving: false, consistency: None };
    let read: Result<Vec<Name>, plinth_http::ApiError> =
        app.db.tenant_read(forged, TenantSql("SELECT name FROM {schema}.projects"), |q| q).await;
    assert!(read.is_err(), "shard b's connection still reads the moved tenant");

    // Deletion waits for a move; a move started again cleans up what an
    // interrupted one left (here a schema on its target).
    primary.execute("UPDATE public.tenants SET moving_to = 'b' WHERE slug = 'mover'", &[]).await?;
    let (ok, out) = plinth_cli(testdb, &["tenants", "delete", "mover", "--yes"]).await?;
    assert!(!ok && out.contains("being moved"), "{out}");
    on_b.batch_execute(&format!("CREATE SCHEMA \"{schema}\"; CREATE TABLE \"{schema}\".leftover (x int)")).await?;

    // Back to b, keeping the old copy on c: renamed, and refusing writes.
    let (ok, out) = plinth_cli(testdb, &["tenants", "move", "mover", "--to", "b", "--keep"]).await?;
    assert!(ok && out.contains("moved mover from shard c to b"), "{out}");
    let kept = out
        .split("as schema ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .ok_or("no kept schema named")?
        .to_owned();
    assert!(has_schema(&on_c, &kept).await?);
    assert!(!has_schema(&on_c, &schema).await?);
    let refused =
        on_c.execute(&format!("INSERT INTO \"{kept}\".projects (id, name) VALUES (gen_random_uuid(), 'x')"), &[]).await;
    assert!(refused.is_err_and(|e| format!("{e:?}").contains("has moved")), "the kept copy takes writes");
    assert_eq!(project_ids(&on_b, &schema).await?, ids, "b has every row back");
    // An instance that still routes the tenant to c (it has not heard of
    // the flip) neither reads the old copy nor writes to it: it answers
    // 503 `unavailable`; a single read does so even if it had not heard of
    // the move at all.
    let stale = ShardName::parse("c")?;
    let late = TenantScope { id: moved.id, schema: &moved.schema, shard: &stale, moving: true, consistency: None };
    let unaware = TenantScope { moving: false, ..late };
    let read: Result<Vec<Name>, plinth_http::ApiError> =
        app.db.tenant_read(unaware, TenantSql("SELECT name FROM {schema}.projects"), |q| q).await;
    assert!(
        matches!(read, Err(plinth_http::ApiError::Unavailable(_))),
        "read the old copy: {:?}",
        read.map(|r| r.len())
    );
    let write: Result<usize, plinth_http::ApiError> = app
        .db
        .tenant(late, async |c| {
            use diesel_async::RunQueryDsl as _;
            Ok(diesel::sql_query("INSERT INTO projects (id, name) VALUES (gen_random_uuid(), 'late')")
                .execute(c.pg())
                .await?)
        })
        .await;
    assert!(matches!(write, Err(plinth_http::ApiError::Unavailable(_))), "wrote to the old copy: {write:?}");
    let leftover: i64 = on_b
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'leftover'", &[&schema])
        .await?
        .get(0);
    assert_eq!(leftover, 0, "the interrupted move's leftover was dropped");

    // A move that stopped between closing the old copy and recording the
    // flip (the registry still names b): the next move opens b's copy
    // again and goes on from it, losing nothing.
    on_b.batch_execute(&format!("ALTER SCHEMA \"{schema}\" RENAME TO \"{schema}_moved_1\"")).await?;
    primary.execute("UPDATE public.tenants SET moving_to = 'c' WHERE slug = 'mover'", &[]).await?;
    let (ok, out) = plinth_cli(testdb, &["tenants", "move", "mover", "--to", "c"]).await?;
    assert!(ok && out.contains("reopening") && out.contains("moved mover from shard b to c"), "{out}");
    assert_eq!(project_ids(&on_c, &schema).await?, ids, "c has every row");
    assert!(!has_schema(&on_b, &format!("{schema}_moved_1")).await?);
    let last = seen.acked.last().ok_or("no write")?;
    for instance in [&app, &other] {
        crate::harness::eventually(std::time::Duration::from_secs(2), || async {
            let res = instance.req(Method::GET, "mover", &format!("/v1/projects/{last}")).send().await?;
            Ok(res.status() == 200)
        })
        .await?;
    }
    Ok(())
}

/// The replica test's metrics token.
const METRICS_TOKEN: &str = "replica-test-metrics-token";

/// The sum of the samples of `name` with `labels` on `app`'s `/metrics`.
async fn metric(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> TestResult<f64> {
    let res = app.http.get(app.url("/metrics")).bearer_auth(METRICS_TOKEN).send().await?;
    assert_eq!(res.status(), 200);
    Ok(crate::metrics::value(&crate::metrics::parse(&res.text().await?)?, name, labels))
}

/// A write's `plinth-wal-position`, checked to be `<lsn>@<shard>`.
fn position(res: &reqwest::Response, shard: &str) -> TestResult<String> {
    let value = res.headers().get("plinth-wal-position").ok_or("no plinth-wal-position")?.to_str()?.to_owned();
    let (lsn, on) = value.split_once('@').ok_or("no @")?;
    let (high, low) = lsn.split_once('/').ok_or("no /")?;
    assert!(u32::from_str_radix(high, 16).is_ok() && u32::from_str_radix(low, 16).is_ok(), "{value}");
    assert_eq!(on, shard, "{value}");
    Ok(value)
}

/// What the load of the replica test saw: requests made, and every answer
/// that was not the one expected.
#[derive(Default)]
struct Answers {
    requests: std::sync::atomic::AtomicUsize,
    wrong: std::sync::Mutex<Vec<String>>,
}

impl Answers {
    fn check(&self, what: &str, ok: bool) {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !ok {
            self.wrong.lock().unwrap_or_else(|p| p.into_inner()).push(what.to_owned());
        }
    }

    fn count(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One writer's round: a project made, then read back at once through both
/// read paths (the single statement and the view), sending the write's
/// position: the answer must hold the write, wherever it was served.
async fn write_then_read(app: &TestApp, slug: &str, name: &str, seen: &Answers) -> TestResult {
    let res = app.req(Method::POST, slug, "/v1/projects").json(&json!({ "name": name })).send().await?;
    if res.status() != 201 {
        seen.check(&format!("POST {name}: {}", res.status()), false);
        return Ok(());
    }
    let at = position(&res, "b")?;
    let id = res.json::<Value>().await?["id"].as_str().ok_or("no id")?.to_owned();
    let read =
        app.req(Method::GET, slug, &format!("/v1/projects/{id}")).header("plinth-wal-position", &at).send().await?;
    let status = read.status();
    let body: Value = read.json().await?;
    seen.check(&format!("GET {name}: {status} {body}"), status == 200 && body["name"] == name);
    let tasks = app
        .req(Method::GET, slug, &format!("/v1/projects/{id}/tasks"))
        .header("plinth-wal-position", &at)
        .send()
        .await?;
    seen.check(&format!("GET {name}/tasks: {}", tasks.status()), tasks.status() == 200);
    Ok(())
}

/// Reads of GET routes from a streaming replica of shard b, made by
/// `pg_basebackup`: declared by the CLI (what is not a replica of the
/// shard refused), taken into rotation, read-your-writes under a bounded
/// read/write load, the replica stopped mid-run and started again without
/// one failed request, taken out while its replay is paused and put back
/// when it resumes; and another tenant's rows still out of reach.
#[tokio::test]
async fn reads_go_to_a_replica_that_keeps_up() -> TestResult {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let testdb = &crate::harness::TestDb::migrated().await?;
    let settings = vec![
        ("PLINTH_METRICS_TOKEN", METRICS_TOKEN),
        ("PLINTH_REPLICA_CHECK_MS", "100"),
        ("PLINTH_REPLICA_MAX_LAG_MS", "1000"),
    ];
    let app = Arc::new(TestApp::spawn_on(testdb, crate::harness::AppOptions { settings, ..Default::default() }).await?);
    let b = Cluster::init(&[])?;
    b.start()?;
    let b_url = b.url("127.0.0.1", "postgres");
    let (ok, out) = plinth_cli(testdb, &["shards", "add", "b", "--url", &b_url]).await?;
    assert!(ok, "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "drain", "primary"]).await?;
    assert!(ok, "{out}");
    for slug in ["reader", "other"] {
        app.create_tenant(slug).await?;
        app.set_plan(slug, "enterprise").await?;
        assert_eq!(tenant(&app, slug).await?.shard.as_str(), "b");
    }
    let theirs = app.create_project("other", "Not yours").await?;
    let theirs = theirs["id"].as_str().ok_or("no id")?.to_owned();

    // Without replicas, a write answers with no position.
    let res = app.req(Method::POST, "reader", "/v1/projects").json(&json!({ "name": "Early" })).send().await?;
    assert_eq!(res.status(), 201);
    assert!(!res.headers().contains_key("plinth-wal-position"));
    let early: Value = res.json().await?;

    let replica = Arc::new(Cluster::replica_of(&b)?);
    replica.start()?;
    let r_url = replica.url("127.0.0.1", "postgres");

    // What is not a streaming replica of the shard's server is refused.
    let other_database = replica.url("127.0.0.1", "template1");
    let refusals: [(&[&str], &str); 4] = [
        (&["shards", "add-replica", "b", "--url", &b_url], "not in recovery"),
        (&["shards", "add-replica", "primary", "--url", &r_url], "not a replica of shard primary"),
        (&["shards", "add-replica", "nope", "--url", &r_url], "no shard named nope"),
        (&["shards", "add-replica", "b", "--url", &other_database], "names database \"template1\""),
    ];
    for (args, says) in refusals {
        let (ok, out) = plinth_cli(testdb, args).await?;
        assert!(!ok && out.contains(says), "{args:?}: {out}");
    }
    let (ok, out) = plinth_cli(testdb, &["shards", "add-replica", "b", "--url", &r_url]).await?;
    assert!(ok && out.contains("of shard b added"), "{out}");
    let id: String = out.split_whitespace().nth(1).ok_or("no id")?.to_owned();
    let (ok, out) = plinth_cli(testdb, &["shards", "add-replica", "b", "--url", &r_url]).await?;
    assert!(!ok && out.contains("declared already"), "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "list"]).await?;
    assert!(ok && out.contains(&format!("replica {id}")), "{out}");
    let labels = [("shard", "b"), ("replica", id.as_str())];
    let in_rotation = |want: f64| {
        let app = Arc::clone(&app);
        async move { Ok(metric(&app, "plinth_replica_in_rotation", &labels).await? == want) }
    };
    eventually(std::time::Duration::from_secs(60), || in_rotation(1.0)).await?;
    let served = || metric(&app, "plinth_replica_reads_total", &[("outcome", "served")]);

    // Another tenant's project is out of reach through the replica too.
    let res = app.req(Method::GET, "reader", &format!("/v1/projects/{theirs}")).send().await?;
    assert_error(res, 404, "not_found").await?;
    let before = served().await?;
    let list: Value = app.req(Method::GET, "reader", "/v1/projects").send().await?.json().await?;
    assert!(served().await? > before, "the list was read on the replica");
    assert!(list["data"].as_array().is_some_and(|p| p.iter().all(|p| p["name"] != "Not yours")), "{list}");
    // A position that cannot be read is served by the primary.
    let res = app.req(Method::GET, "reader", "/v1/projects").header("plinth-wal-position", "yesterday").send().await?;
    assert_eq!(res.status(), 200);

    let early = early["id"].as_str().ok_or("no id")?.to_owned();
    let fell_back = || metric(&app, "plinth_replica_reads_total", &[("outcome", "primary")]);

    // Load: writers reading their writes back, readers listing without a
    // position. The replica is stopped mid-run and started again.
    let seen = Arc::new(Answers::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..2 {
        let (app, seen, stop) = (Arc::clone(&app), Arc::clone(&seen), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                write_then_read(&app, "reader", &format!("w{w}-{n}"), &seen).await?;
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for _ in 0..2 {
        let (app, seen, stop, early) = (Arc::clone(&app), Arc::clone(&seen), Arc::clone(&stop), early.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // Both read paths: a view and a single statement.
                let res = app.req(Method::GET, "reader", "/v1/projects?limit=5").send().await?;
                seen.check(&format!("GET /v1/projects: {}", res.status()), res.status() == 200);
                let res = app.req(Method::GET, "reader", &format!("/v1/projects/{early}")).send().await?;
                seen.check(&format!("GET /v1/projects/{early}: {}", res.status()), res.status() == 200);
            }
            Ok(())
        }));
    }
    let at_least = served().await? + 20.0;
    eventually(std::time::Duration::from_secs(60), || async { Ok(served().await? >= at_least) }).await?;
    let stopping = Arc::clone(&replica);
    tokio::task::spawn_blocking(move || stopping.stop().map_err(|e| e.to_string())).await??;
    eventually(std::time::Duration::from_secs(60), || in_rotation(0.0)).await?;
    let later = seen.count() + 40;
    eventually(std::time::Duration::from_secs(60), || async { Ok(seen.count() >= later) }).await?;
    let starting = Arc::clone(&replica);
    tokio::task::spawn_blocking(move || starting.start().map_err(|e| e.to_string())).await??;
    eventually(std::time::Duration::from_secs(60), || in_rotation(1.0)).await?;
    let at_least = served().await? + 20.0;
    eventually(std::time::Duration::from_secs(60), || async { Ok(served().await? >= at_least) }).await?;

    // Replay paused: the replica falls behind, writes are still read back
    // (from the primary), and it is taken out; resumed, it comes back.
    // Meanwhile an instance that allows ten minutes of lag keeps it in
    // rotation: a tenant made after the pause has no schema there, and its
    // reads, failing on the replica, are answered by the primary on both
    // read paths (a view of a list, a single statement).
    let settings = vec![
        ("PLINTH_METRICS_TOKEN", METRICS_TOKEN),
        ("PLINTH_REPLICA_CHECK_MS", "100"),
        ("PLINTH_REPLICA_MAX_LAG_MS", "600000"),
    ];
    let patient = TestApp::spawn_on(testdb, crate::harness::AppOptions { settings, ..Default::default() })
        .await?
        .with_tokens_of(&app);
    eventually(std::time::Duration::from_secs(60), || async {
        Ok(metric(&patient, "plinth_replica_in_rotation", &labels).await? == 1.0)
    })
    .await?;
    let on_replica = client(&r_url).await?;
    on_replica.execute("SELECT pg_wal_replay_pause()", &[]).await?;
    app.create_tenant("fresh").await?;
    for (path, status) in [("/v1/projects".to_owned(), 200), (format!("/v1/projects/{early}"), 404)] {
        let before = fell_back().await?;
        let res = patient.req(Method::GET, "fresh", &path).send().await?;
        assert_eq!(res.status(), status, "{path}");
        assert!(fell_back().await? > before, "{path} failed on the replica and the primary answered");
    }
    assert_eq!(metric(&patient, "plinth_replica_in_rotation", &labels).await?, 1.0, "still in rotation there");
    eventually(std::time::Duration::from_secs(60), || in_rotation(0.0)).await?;
    on_replica.execute("SELECT pg_wal_replay_resume()", &[]).await?;
    eventually(std::time::Duration::from_secs(60), || in_rotation(1.0)).await?;
    let later = seen.count() + 20;
    eventually(std::time::Duration::from_secs(60), || async { Ok(seen.count() >= later) }).await?;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await?.map_err(|e| e.to_string())?;
    }
    let wrong = seen.wrong.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(wrong.is_empty(), "{} of {} answers were wrong: {wrong:?}", wrong.len(), seen.count());

    // Removed, it takes no more reads.
    let (ok, out) = plinth_cli(testdb, &["shards", "remove-replica", "b", &id]).await?;
    assert!(ok, "{out}");
    let (ok, out) = plinth_cli(testdb, &["shards", "remove-replica", "b", &id]).await?;
    assert!(!ok && out.contains(&format!("shard b has no replica {id}")), "{out}");
    eventually(std::time::Duration::from_secs(60), || in_rotation(0.0)).await?;
    let before = served().await?;
    for _ in 0..5 {
        assert_eq!(app.req(Method::GET, "reader", "/v1/projects").send().await?.status(), 200);
    }
    assert_eq!(served().await?, before, "no read went to the removed replica");
    Ok(())
}

/// Client connections to the server behind `client`, other than its own
/// (on the primary: to `client`'s database only).
async fn connections(client: &tokio_postgres::Client) -> TestResult<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid() AND datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

/// One bound on the connections a process holds to every server together
/// (`PLINTH_DB_MAX_CONNECTIONS`, `pool::Budget`): with all of them held on
/// the primary, a read on a shard waits; when one comes to rest it is
/// closed for the shard's; under reads on three servers at once every read
/// succeeds, and the servers never see more than the bound.
#[tokio::test]
async fn connections_stay_within_one_bound_across_servers() -> TestResult {
    use std::sync::Arc;
    use tokio::sync::Semaphore;
    let testdb = crate::harness::TestDb::migrated().await?;
    let (b, c) = (Cluster::init(&[])?, Cluster::init(&[])?);
    b.start()?;
    c.start()?;
    let mut tenants = Vec::new();
    {
        let setup = testdb.db(2)?;
        for (name, cluster) in [("b", &b), ("c", &c)] {
            let url = cluster.url("127.0.0.1", "postgres");
            let (ok, out) = plinth_cli(&testdb, &["shards", "add", name, "--url", &url]).await?;
            assert!(ok, "{out}");
        }
        for (slug, shard) in [("one", "primary"), ("two", "b"), ("three", "c")] {
            let shard = ShardName::parse(shard)?;
            let slug = plinth_tenants::Slug::parse(slug)?;
            tenants.push(registry::create_on(&setup, &slug, "Bound", Some(&shard)).await?);
        }
    }
    let servers = [
        testdb.client().await?,
        client(&b.url("127.0.0.1", "postgres")).await?,
        client(&c.url("127.0.0.1", "postgres")).await?,
    ];
    let total = || async {
        let mut sum = 0;
        for server in &servers {
            sum += connections(server).await?;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(sum)
    };
    eventually(std::time::Duration::from_secs(30), || async { Ok(total().await? == 0) }).await?;

    let budget = plinth_tenants::pool::Budget::new(3);
    let config = plinth_tenants::DbConfig {
        pool_size: 3,
        wait_timeout: std::time::Duration::from_secs(20),
        budget: Some(Arc::clone(&budget)),
        ..plinth_tenants::DbConfig::new(testdb.url.clone())
    };
    let db = plinth_tenants::Db::connect(&config)?;
    let read = |db: plinth_tenants::Db, tenant: Tenant| async move {
        db.tenant_read::<_, Name, plinth_http::ApiError>(
            tenant.scope(),
            TenantSql("SELECT name FROM {schema}.projects"),
            |q| q,
        )
        .await
        .map(|rows| rows.len())
    };

    // Three transactions hold every connection there may be, on the primary.
    let gate = Arc::new(Semaphore::new(0));
    let holders: Vec<_> = (0..3)
        .map(|_| {
            let (db, gate) = (db.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                db.platform(async |c| {
                    diesel_async::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), c).await?;
                    let _released = gate.acquire().await.map_err(|e| plinth_http::ApiError::Internal(e.into()))?;
                    Ok::<_, plinth_http::ApiError>(())
                })
                .await
            })
        })
        .collect();
    eventually(std::time::Duration::from_secs(30), || async { Ok(connections(&servers[0]).await? == 3) }).await?;
    assert_eq!(budget.open(), 3);
    // A read on shard b needs a fourth: it waits...
    let waiting = tokio::spawn(read(db.clone(), tenants[1].clone()));
    tokio::task::yield_now().await;
    assert_eq!(connections(&servers[1]).await?, 0, "no fourth connection");
    // ...until one comes to rest on the primary, which is closed for b's.
    gate.add_permits(1);
    assert_eq!(waiting.await??, 0);
    eventually(std::time::Duration::from_secs(30), || async {
        Ok(connections(&servers[0]).await? == 2 && connections(&servers[1]).await? == 1)
    })
    .await?;
    gate.add_permits(2);
    for holder in holders {
        holder.await??;
    }

    // Reads on the three servers at once: every one answered, within the bound.
    let load: Vec<_> = (0..9)
        .map(|i| {
            let (db, tenant) = (db.clone(), tenants[i % 3].clone());
            tokio::spawn(async move {
                for _ in 0..20 {
                    read(db.clone(), tenant.clone()).await?;
                }
                Ok::<_, plinth_http::ApiError>(())
            })
        })
        .collect();
    for task in load {
        task.await??;
    }
    assert!(budget.open() <= 3);
    eventually(std::time::Duration::from_secs(30), || async { Ok(total().await? <= 3) }).await?;
    Ok(())
}

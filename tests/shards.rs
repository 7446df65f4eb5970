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
pub(crate) async fn client(url: &str) -> TestResult<tokio_postgres::Client> {
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

pub(crate) async fn tenant(app: &TestApp, slug: &str) -> TestResult<Tenant> {
    Ok(app
        .db
        .platform(async |c| Ok::<_, plinth_http::ApiError>(registry::find_by_slug(c, slug).await?))
        .await?
        .ok_or("no such tenant")?)
}

/// A row of `SELECT name …`.
#[derive(diesel::QueryableByName)]
pub(crate) struct Name {
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

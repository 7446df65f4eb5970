//! Reads from streaming replicas of a shard (`plinth shards
//! add-replica`), read-your-writes through `plinth-wal-position`, and the
//! one bound on an instance's connections to every server together.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{TestApp, TestResult, assert_error, eventually, plinth_cli};
use crate::processes::Cluster;
use crate::shards::{Name, client, tenant};
use plinth_tenants::db::TenantSql;
use plinth_tenants::{ShardName, Tenant, registry};

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

//! Tenant affinity in the pool (`tenants/kernel/src/lanes.rs`): a tenant's
//! work keeps to one connection while that connection is free, a busy
//! tenant spills over to idle ones, platform work borrows idle lanes, and a
//! pool of N never opens more than N connections.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use diesel::sql_types::Integer;
use diesel_async::RunQueryDsl as _;
use plinth_http::ApiError;
use plinth_tenants::registry::{self, Tenant};
use plinth_tenants::{Db, Slug};

use crate::harness::{TestDb, TestResult};

#[derive(diesel::QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

const PID: &str = "SELECT pg_backend_pid() AS pid";

/// The backend that served one tenant transaction of `tenant`.
async fn tenant_backend(db: &Db, tenant: &Tenant) -> TestResult<i32> {
    let row: Pid = db
        .tenant(tenant.scope(), async |c| Ok::<_, ApiError>(diesel::sql_query(PID).get_result(c.pg()).await?))
        .await?;
    Ok(row.pid)
}

/// The backend of a tenant transaction of `tenant` that, once inside,
/// waits at `all_in` for the others before it ends.
async fn tenant_backend_when_all_in(db: &Db, tenant: &Tenant, all_in: &tokio::sync::Barrier) -> TestResult<i32> {
    let row: Pid = db
        .tenant(tenant.scope(), async |c| {
            let row: Pid = diesel::sql_query(PID).get_result(c.pg()).await?;
            all_in.wait().await;
            Ok::<_, ApiError>(row)
        })
        .await?;
    Ok(row.pid)
}

/// A transaction of `tenant` that has started and holds its connection
/// until the returned `Notify` is notified; the handle ends with it.
async fn hold_a_lane(
    db: &Db,
    tenant: &Tenant,
) -> (tokio::task::JoinHandle<Result<(), String>>, Arc<tokio::sync::Notify>) {
    let (inside, end) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let holder = tokio::spawn({
        let (db, tenant, inside, end) = (db.clone(), tenant.clone(), Arc::clone(&inside), Arc::clone(&end));
        async move {
            db.tenant(tenant.scope(), async |_| {
                inside.notify_one();
                end.notified().await;
                Ok::<_, ApiError>(())
            })
            .await
            .map_err(|e| e.to_string())
        }
    });
    inside.notified().await;
    (holder, end)
}

async fn platform_backend(db: &Db) -> TestResult<i32> {
    let row: Pid = db.platform(async |c| Ok::<_, ApiError>(diesel::sql_query(PID).get_result(c).await?)).await?;
    Ok(row.pid)
}

/// Backends connected to the test's database, other than `client`'s own.
async fn backends(client: &tokio_postgres::Client) -> TestResult<i64> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

async fn tenants(db: &Db, n: usize) -> TestResult<Vec<Tenant>> {
    let mut made = Vec::new();
    for i in 0..n {
        made.push(registry::create(db, &Slug::parse(&format!("lane-{i}"))?, "T").await?);
    }
    Ok(made)
}

/// Taken one at a time, each tenant's transactions always reach the same
/// backend, and the tenants are spread over the pool's connections: a
/// backend meets a share of the tenants, not all of them. Platform work in
/// between borrows a lane's connection and leaves it where it was.
#[tokio::test]
async fn each_tenant_keeps_to_one_connection_and_tenants_are_spread_over_the_pool() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(4)?;
    let tenants = tenants(&db, 16).await?;
    let mut seen: HashMap<usize, HashSet<i32>> = HashMap::new();
    for _ in 0..5 {
        for (i, tenant) in tenants.iter().enumerate() {
            seen.entry(i).or_default().insert(tenant_backend(&db, tenant).await?);
            platform_backend(&db).await?;
        }
    }
    for (i, backends) in &seen {
        assert_eq!(backends.len(), 1, "tenant {i} reached {} backends: {backends:?}", backends.len());
    }
    let used: HashSet<i32> = seen.values().flatten().copied().collect();
    // 16 tenants hashed over 4 lanes all land in one with probability 4⁻¹⁵.
    assert!(used.len() >= 2, "every tenant went to one backend: {used:?}");
    assert!(used.len() <= 4, "a pool of 4 used {} backends", used.len());
    assert!(backends(&testdb.client().await?).await? <= 4, "a pool of 4 opened more connections");
    Ok(())
}

/// Work on one tenant that needs several connections at once (concurrent
/// requests, or work nested in its own transaction) spills over to idle
/// lanes instead of queueing behind itself: three transactions of one
/// tenant that each wait for the other two all get in, on three backends.
#[tokio::test]
async fn a_busy_tenant_spills_over_to_idle_connections() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(3)?;
    let tenant = tenants(&db, 1).await?.remove(0);
    let all_in = tokio::sync::Barrier::new(3);
    let one = || tenant_backend_when_all_in(&db, &tenant, &all_in);
    // Waits for a condition (all three inside); the timeout only turns a
    // hang into a failure.
    let three_at_once = async || {
        tokio::time::timeout(std::time::Duration::from_secs(60), async { tokio::try_join!(one(), one(), one()) })
            .await
            .map_err(|_| "the tenant's transactions queued behind each other")?
    };
    let (a, b, c) = three_at_once().await?;
    assert_eq!(HashSet::from([a, b, c]).len(), 3, "three transactions at once on {a}, {b}, {c}");

    // The lanes it spilled to have now served it, so it takes them at
    // once while its home lane is busy: the same three backends again.
    let (d, e, f) = three_at_once().await?;
    assert_eq!(HashSet::from([d, e, f]), HashSet::from([a, b, c]));
    Ok(())
}

/// Platform work never waits on lanes that sit idle, and waits (rather
/// than fails or opens a connection past the pool's size) while every lane
/// is busy, until one comes free.
#[tokio::test]
async fn platform_work_borrows_idle_lanes_and_waits_for_busy_ones() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let tenant = tenants(&db, 1).await?.remove(0);
    let client = testdb.client().await?;

    // Two transactions of one tenant at once put both connections in lanes.
    let both_in = tokio::sync::Barrier::new(2);
    let (a, b) = tokio::try_join!(
        tenant_backend_when_all_in(&db, &tenant, &both_in),
        tenant_backend_when_all_in(&db, &tenant, &both_in)
    )?;
    assert_ne!(a, b);

    // Both lanes rest with their connections; the pool has none left, and
    // platform work borrows one of them.
    for _ in 0..5 {
        let pid = platform_backend(&db).await?;
        assert!(pid == a || pid == b, "platform work went to backend {pid}, not a lane's ({a}, {b})");
    }
    assert_eq!(backends(&client).await?, 2);

    // Both lanes busy: platform work waits, and gets in once they end.
    let inside = Arc::new(tokio::sync::Barrier::new(3));
    let end = Arc::new(tokio::sync::Barrier::new(3));
    let busy = async || {
        let (inside, end) = (Arc::clone(&inside), Arc::clone(&end));
        db.tenant(tenant.scope(), async |_| {
            inside.wait().await;
            end.wait().await;
            Ok::<_, ApiError>(())
        })
        .await
    };
    let platform = async {
        inside.wait().await; // both lanes are held from here on
        let waiting = tokio::spawn({
            let db = db.clone();
            async move { platform_backend(&db).await.map_err(|e| e.to_string()) }
        });
        // The platform call is waiting for a connection: the pool reports it
        // (deadpool counts it among its waiters) before the lanes end.
        while db.status().waiting == 0 {
            tokio::task::yield_now().await;
        }
        end.wait().await;
        waiting.await
    };
    let (first, second, waited) =
        tokio::time::timeout(std::time::Duration::from_secs(60), async { tokio::join!(busy(), busy(), platform) })
            .await
            .map_err(|_| "platform work never got a connection")?;
    first?;
    second?;
    let pid = waited??;
    assert!(pid == a || pid == b, "platform work went to backend {pid}, not a lane's ({a}, {b})");
    assert_eq!(backends(&client).await?, 2, "a pool of 2 opened more connections");
    Ok(())
}

/// Work that waits for a lane queues; a released lane goes to the first in
/// the queue, and one handed to work that then gives up (its request
/// dropped before it ran again) passes on to the next: it is neither lost
/// nor left taken.
#[tokio::test]
async fn a_lane_handed_to_work_that_gave_up_passes_to_the_next_in_line() -> TestResult {
    use std::future::Future as _;
    use std::task::{Context, Waker};

    let testdb = TestDb::migrated().await?;
    let db = testdb.db(1)?;
    let tenant = tenants(&db, 1).await?.remove(0);
    let first = tenant_backend(&db, &tenant).await?;

    // One transaction holds the only lane.
    let (holder, end) = hold_a_lane(&db, &tenant).await;

    // Two more queue behind it, each polled once (into the queue) and then
    // left alone: neither runs again until the test says so.
    let mut cx = Context::from_waker(Waker::noop());
    let mut gives_up = Box::pin(tenant_backend(&db, &tenant));
    let mut next = Box::pin(tenant_backend(&db, &tenant));
    assert!(gives_up.as_mut().poll(&mut cx).is_pending());
    assert!(next.as_mut().poll(&mut cx).is_pending());
    assert_eq!(db.status().waiting, 2, "both queue for the lane");

    // The lane is released to the first in line, which gives up without
    // running again.
    end.notify_one();
    holder.await??;
    assert_eq!(db.status().waiting, 1, "the lane went to the first in line");
    drop(gives_up);

    // The next in line gets it, on the same connection.
    let pid = tokio::time::timeout(std::time::Duration::from_secs(60), next)
        .await
        .map_err(|_| "the lane was lost with the request that gave up")??;
    assert_eq!(pid, first);
    assert_eq!(db.status().waiting, 0);
    Ok(())
}

/// A busy tenant spreads over the pool at once rather than queue for the
/// one backend that knows it. With the spill time out of reach, one
/// transaction holds the tenant's only warm lane and a second read queues
/// for it; a third, finding the tenant's own work already waiting, takes
/// another lane and finishes while the first still holds its own. (Before,
/// one tenant's reads all queued for one backend while the others stood
/// idle, since a queue of short reads never waits the spill time.)
#[tokio::test]
async fn work_on_a_tenant_whose_work_already_waits_takes_another_lane() -> TestResult {
    use std::future::Future as _;
    use std::task::{Context, Waker};
    use std::time::Duration;

    let testdb = TestDb::migrated().await?;
    let mut config = plinth_tenants::DbConfig::new(&testdb.url);
    config.pool_size = 3;
    config.spill_after = Duration::from_secs(3600);
    config.wait_timeout = Duration::from_secs(3600);
    let db = Db::connect(&config)?;
    let tenant = tenants(&db, 1).await?.remove(0);
    let home = tenant_backend(&db, &tenant).await?;

    let (holder, end) = hold_a_lane(&db, &tenant).await;

    let mut cx = Context::from_waker(Waker::noop());
    let mut queued = Box::pin(tenant_backend(&db, &tenant));
    assert!(queued.as_mut().poll(&mut cx).is_pending());
    assert_eq!(db.status().waiting, 1, "the second read queues for the tenant's lane");

    // Waits for the read itself; the timeout only turns a hang into a failure.
    let spread = tokio::time::timeout(Duration::from_secs(60), tenant_backend(&db, &tenant))
        .await
        .map_err(|_| "the third read queued behind the tenant's own work")??;
    assert_ne!(spread, home, "the third read went to another backend");

    // The lane it spread to now knows the tenant: the queued read takes it
    // as soon as it comes free, with the first transaction still open.
    let second = tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .map_err(|_| "the queued read waited for the busy lane")??;
    assert_eq!(second, spread);
    assert!(!holder.is_finished(), "the first transaction still holds its lane");
    end.notify_one();
    holder.await??;
    Ok(())
}

/// A connection that died while its lane rested (the server ended its
/// backend, or restarted) is not handed out: the next work on the lane
/// gets a new connection and succeeds, rather than failing with a 503.
#[tokio::test]
async fn a_connection_that_died_while_its_lane_rested_is_replaced() -> TestResult {
    let testdb = TestDb::migrated().await?;
    let db = testdb.db(2)?;
    let tenant = tenants(&db, 1).await?.remove(0);
    let before = tenant_backend(&db, &tenant).await?;
    let client = testdb.client().await?;
    client.query_one("SELECT pg_terminate_backend($1)", &[&before]).await?;
    // Waits for the backend to be gone, then for one more round trip, so
    // that the pool's side of the connection has read the server's goodbye.
    let gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1";
    while client.query_one(gone, &[&before]).await?.get::<_, i64>(0) > 0 {
        tokio::task::yield_now().await;
    }
    client.batch_execute("SELECT 1").await?;
    let after = tenant_backend(&db, &tenant).await?;
    assert_ne!(after, before, "a new backend serves the tenant");
    Ok(())
}

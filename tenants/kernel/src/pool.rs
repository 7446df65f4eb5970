//! The connection pool's manager: how a pooled connection is opened, what it
//! remembers, and when it is retired.
//!
//! A [`Pooled`] connection remembers, beside the diesel-async connection,
//! how many distinct tenants it has served. Each PostgreSQL backend caches
//! the catalog entries of every relation it touches and never lets them go,
//! and keeps one prepared read per tenant (see
//! [`crate::db::Db::tenant_read`]); with thousands of tenant schemas a
//! long-lived connection that serves them all would grow without bound. A
//! connection that has served [`DbConfig::max_tenants_per_connection`]
//! tenants, or has lived [`DbConfig::max_connection_age`], is closed when it
//! comes back to the pool, and a fresh backend takes its place.
//!
//! Hand-written rather than diesel-async's own manager, which keeps no state
//! beside the connection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use diesel::connection::CacheSize;
use diesel_async::pooled_connection::{PoolError as ManagerError, PoolableConnection as _};
use diesel_async::{AsyncPgConnection, SimpleAsyncConnection as _};

use crate::db::DbConfig;
use crate::ids::TenantId;
use crate::lanes::Lanes;
use crate::postgres::Target;

/// A pooled connection and what it remembers (see the module docs).
pub struct Pooled {
    conn: AsyncPgConnection,
    /// Tenants this connection has served.
    tenants: HashSet<TenantId>,
    /// Schemas this connection has created (tenants provisioned, spares
    /// filled): each loads a whole schema's relations into the backend's
    /// caches, as serving a tenant does.
    provisioned: usize,
    /// Its place in the [`Budget`], given back when it closes.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Pooled {
    /// Records that the connection is being scoped to `tenant`.
    pub(crate) fn serve(&mut self, tenant: TenantId) {
        self.tenants.insert(tenant);
    }

    /// Records that the connection is creating a schema.
    pub(crate) fn provision(&mut self) {
        self.provisioned += 1;
    }

    /// Whether the connection has served `tenant` (its backend has that
    /// tenant's relations in its caches).
    pub(crate) fn has_served(&self, tenant: TenantId) -> bool {
        self.tenants.contains(&tenant)
    }
}

/// Why a connection is not handed out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retire {
    /// Broken, or left inside a transaction (a future dropped half-way).
    Broken,
    /// Served [`DbConfig::max_tenants_per_connection`] tenants.
    Tenants,
    /// Older than [`DbConfig::max_connection_age`].
    Age,
}

impl std::ops::Deref for Pooled {
    type Target = AsyncPgConnection;

    fn deref(&self) -> &AsyncPgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        &mut self.conn
    }
}

/// Opens and recycles [`Pooled`] connections.
pub struct Manager {
    target: Arc<Target>,
    statement_cache: bool,
    max_tenants: usize,
    max_age: Duration,
    budget: Option<Arc<Budget>>,
    /// How long a new connection waits for a place in the budget.
    wait: Duration,
}

impl Manager {
    pub fn new(config: &DbConfig) -> anyhow::Result<Self> {
        Ok(Self {
            target: Arc::new(Target::parse(&config.url)?),
            statement_cache: config.statement_cache,
            max_tenants: config.max_tenants_per_connection,
            max_age: config.max_connection_age,
            budget: config.budget.clone(),
            wait: config.wait_timeout,
        })
    }
}

/// One bound on the connections a process holds open at once, across
/// every pool that shares it: the platform database's, each shard's and
/// each replica's (`PLINTH_DB_MAX_CONNECTIONS`). Each pool is bounded on
/// its own too (`PLINTH_DB_POOL_SIZE`); this bounds their sum, however many
/// servers there are.
///
/// A connection holds a permit from its opening to its closing. A pool
/// that needs a new connection when none is left closes one resting idle
/// in another pool (or its own) and takes its permit; when every
/// connection is in use, it waits, up to `PLINTH_DB_WAIT_TIMEOUT_MS`, for
/// one to close or to come to rest. A connection comes to rest in its pool
/// without closing, which signals nothing, so the wait looks again every
/// few milliseconds: this happens only at the bound.
pub struct Budget {
    permits: Arc<Semaphore>,
    total: usize,
    pools: Mutex<Vec<Weak<Lanes>>>,
    /// The pool where the next search for an idle connection starts, so
    /// none is always the one to give.
    next: AtomicUsize,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Budget({} of {} open)", self.open(), self.total)
    }
}

impl Budget {
    pub fn new(total: usize) -> Arc<Self> {
        let total = total.max(1);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
            pools: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
        })
    }

    /// Connections open now, and the bound.
    pub fn open(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Adds a pool whose idle connections may be closed to make room.
    pub(crate) fn register(&self, pool: &Arc<Lanes>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// A place for one more connection (see the type's docs).
    async fn admit(&self, wait: Duration) -> Result<OwnedSemaphorePermit, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                return Ok(permit);
            }
            if self.close_idle() {
                continue;
            }
            let look_again = (tokio::time::Instant::now() + Duration::from_millis(5)).min(deadline);
            match tokio::time::timeout_at(look_again, Arc::clone(&self.permits).acquire_owned()).await {
                Ok(Ok(permit)) => return Ok(permit),
                Ok(Err(closed)) => return Err(closed.to_string()),
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!(
                        "all {} connections this process may hold (PLINTH_DB_MAX_CONNECTIONS) are in use",
                        self.total
                    ));
                }
                Err(_) => {}
            }
        }
    }

    /// Closes one idle connection of any pool; `false` if none is idle.
    fn close_idle(&self) -> bool {
        let pools: Vec<Arc<Lanes>> =
            self.pools.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        if pools.is_empty() {
            return false;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..pools.len()).any(|i| pools[(start + i) % pools.len()].close_idle())
    }
}

impl deadpool::managed::Manager for Manager {
    type Type = Pooled;
    type Error = ManagerError;

    async fn create(&self) -> Result<Pooled, ManagerError> {
        // Boxed: connecting (TLS included) is a future of about 16 KiB,
        // which every future that may wait on the pool would otherwise
        // carry inline and copy when moved, on every checkout, though it
        // connects rarely (`docs/benchmarks.md`, instructions per request).
        let permit = match &self.budget {
            Some(budget) => Some(
                Box::pin(budget.admit(self.wait))
                    .await
                    .map_err(|e| ManagerError::ConnectionError(diesel::ConnectionError::BadConnection(e)))?,
            ),
            None => None,
        };
        let conn =
            Box::pin(establish(&self.target, self.statement_cache)).await.map_err(ManagerError::ConnectionError)?;
        Ok(Pooled { conn, tenants: HashSet::new(), provisioned: 0, _permit: permit })
    }

    async fn recycle(
        &self,
        obj: &mut Pooled,
        metrics: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<ManagerError> {
        if std::thread::panicking() {
            return Err(deadpool::managed::RecycleError::message("broken, or left inside a transaction"));
        }
        match self.keeps(obj, metrics.age()) {
            Ok(()) => Ok(()),
            Err(Retire::Broken) => {
                Err(deadpool::managed::RecycleError::message("broken, or left inside a transaction"))
            }
            Err(Retire::Tenants) => {
                crate::counters::increment("plinth_db_connections_retired_total", &[("reason", "tenants")]);
                Err(deadpool::managed::RecycleError::message("served its share of tenants"))
            }
            Err(Retire::Age) => {
                crate::counters::increment("plinth_db_connections_retired_total", &[("reason", "age")]);
                Err(deadpool::managed::RecycleError::message("reached its age"))
            }
        }
    }
}

impl Manager {
    /// Whether `obj` can no longer be used: closed by the server, or left
    /// inside a transaction.
    pub(crate) fn broken(obj: &mut Pooled) -> bool {
        obj.conn.is_broken()
    }

    /// Whether `obj`, `age` old, may be handed out again (see the module
    /// docs). A connection left inside a transaction (a future dropped
    /// half-way) or broken never is.
    pub(crate) fn keeps(&self, obj: &mut Pooled, age: Duration) -> Result<(), Retire> {
        if Self::broken(obj) {
            Err(Retire::Broken)
        } else if obj.tenants.len() + obj.provisioned > self.max_tenants {
            Err(Retire::Tenants)
        } else if age > self.max_age {
            Err(Retire::Age)
        } else {
            Ok(())
        }
    }
}

/// Opens one connection. diesel-async runs two `SET` statements with the
/// extended protocol while setting a connection up; behind PgBouncer in
/// transaction mode their Parse and Bind could reach different server
/// connections. Opening a transaction first pins one server connection for
/// the setup.
async fn establish(target: &Target, statement_cache: bool) -> diesel::ConnectionResult<AsyncPgConnection> {
    use diesel::ConnectionError;
    let (client, connection) = target.connect().await.map_err(|e| ConnectionError::BadConnection(format!("{e:#}")))?;
    let begin = client.batch_execute("BEGIN");
    // The connection must be driven for BEGIN to complete; diesel-async takes
    // it over (and drives it) only afterwards, so poll both here.
    let mut connection = Box::pin(connection);
    let mut begin = Box::pin(begin);
    let outcome = futures_util::future::poll_fn(|cx| {
        use std::task::Poll;
        if let Poll::Ready(done) = begin.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        match connection.as_mut().poll(cx) {
            Poll::Ready(ended) => Poll::Ready(Err(ended)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    drop(begin);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ConnectionError::BadConnection(e.to_string())),
        Err(ended) => {
            let why = ended.err().map_or_else(|| "connection closed".to_owned(), |e| e.to_string());
            return Err(ConnectionError::BadConnection(why));
        }
    }
    let connection = std::pin::Pin::into_inner(connection);
    let mut conn = AsyncPgConnection::try_from_client_and_connection(client, *connection).await?;
    conn.batch_execute("COMMIT").await.map_err(ConnectionError::CouldntSetupConfiguration)?;
    if !statement_cache {
        diesel_async::AsyncConnection::set_prepared_statement_cache_size(&mut conn, CacheSize::Disabled);
    }
    Ok(conn)
}

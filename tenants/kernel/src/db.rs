//! Connection pools and the two ways to run SQL: a platform transaction
//! ([`Db::platform`]) for the public schema, and a tenant-scoped transaction
//! ([`Db::tenant`]) that is the only way to reach a tenant's tables.
//!
//! Every statement runs inside an explicit transaction. That is what keeps
//! Plinth correct behind PgBouncer in transaction pooling mode: the tenant's
//! `search_path` is `SET LOCAL` and dies at `COMMIT`, and (with the statement
//! cache off, see [`DbConfig::statement_cache`]) prepared statements never
//! outlive the transaction that prepared them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use deadpool::managed::Pool;
use diesel::QueryableByName;
use diesel::connection::TransactionDepthChange;
use diesel::pg::Pg;
use diesel::query_builder::{Query, QueryFragment, QueryId};
use diesel::sql_types::Untyped;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, SimpleAsyncConnection, TransactionManager};
use tracing::Instrument as _;

use crate::ids::{SchemaName, ShardName, TenantId};
use crate::lanes::{Checkout, Lanes};
use crate::pool::{Manager, Pooled};
use crate::replicas::{Consistency, Replicas};

mod replica_reads;
mod servers;

pub use replica_reads::ViewFn;

pub type PoolError = diesel_async::pooled_connection::deadpool::PoolError;
pub type PgConn = AsyncPgConnection;

/// An async closure over a borrowed connection whose future can be bounded
/// (`TxFn<.., Fut: Send>`). The same pattern diesel-async uses internally; it is
/// what lets callers write `db.platform(async |conn| { ... })`.
pub trait TxFn<T, R>: AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as TxFn<T, R>>::Fut {
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> TxFn<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: String,
    /// Connections kept by this process.
    pub pool_size: usize,
    /// How long a request waits for a free connection before a 503.
    pub wait_timeout: Duration,
    /// How long opening a new connection may take.
    pub connect_timeout: Duration,
    /// Keep prepared statements across transactions. Turn off behind PgBouncer
    /// in transaction pooling mode (before 1.21, which cannot track them).
    pub statement_cache: bool,
    /// A connection that has been scoped to more tenants than this is
    /// closed when it comes back to the pool (see [`crate::pool`]).
    pub max_tenants_per_connection: usize,
    /// A connection older than this is closed when it comes back to the pool.
    pub max_connection_age: Duration,
    /// How long tenant work waits for its own lane before it takes any free
    /// one (see [`crate::lanes`]). A read holds a lane for well under a
    /// millisecond, and a backend that meets a tenant for the first time
    /// spends several times that: on a busy server, waiting is cheaper. At
    /// 2 ms a fifth to a third of the reads over 10,000 tenants spilled to
    /// cold backends (0.29x of the 20-tenant throughput); at 20 ms, 0.2 %
    /// (`docs/benchmarks.md`).
    pub spill_after: Duration,
    /// One bound on the connections of every pool that shares it (see
    /// [`crate::pool::Budget`]); `None`: each pool's own only.
    pub budget: Option<Arc<crate::pool::Budget>>,
}

impl DbConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 16,
            wait_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            statement_cache: true,
            max_tenants_per_connection: 2000,
            max_connection_age: Duration::from_secs(30 * 60),
            spill_after: Duration::from_millis(20),
            budget: None,
        }
    }
}

/// A handle to the database: a pool of connections, in lanes by tenant
/// (see [`crate::lanes`]), to the platform database, and one more to each
/// other server (shard, [`crate::shards`]) that holds tenant schemas, and
/// to each replica ([`crate::replicas`]), made when first used. Cheap to
/// clone.
#[derive(Clone)]
pub struct Db {
    lanes: Arc<Lanes>,
    /// [`DbConfig::statement_cache`].
    statement_cache: bool,
    shards: Arc<ShardPools>,
    /// The replicas and their state, shared by every pool of the process
    /// ([`Db::with_replicas`]).
    replicas: Arc<Replicas>,
}

/// The pools of the other shards, by name, and of the replicas, by id. A
/// shard's or replica's URL never changes once declared, so a pool made
/// is kept.
struct ShardPools {
    config: DbConfig,
    pools: std::sync::RwLock<std::collections::HashMap<ShardName, Arc<Lanes>>>,
    replicas: std::sync::RwLock<std::collections::HashMap<i64, Arc<Lanes>>>,
}

fn lanes(config: &DbConfig) -> anyhow::Result<Arc<Lanes>> {
    let pool = Pool::builder(Manager::new(config)?)
        .max_size(config.pool_size)
        .wait_timeout(Some(config.wait_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .context("building the database pool")?;
    let lanes = Arc::new(Lanes::new(pool, config.wait_timeout, config.spill_after));
    if let Some(budget) = &config.budget {
        budget.register(&lanes);
    }
    Ok(lanes)
}

impl Db {
    pub fn connect(config: &DbConfig) -> anyhow::Result<Self> {
        Ok(Self {
            lanes: lanes(config)?,
            statement_cache: config.statement_cache,
            shards: Arc::new(ShardPools {
                config: config.clone(),
                pools: Default::default(),
                replicas: Default::default(),
            }),
            replicas: Arc::default(),
        })
    }

    /// This handle, reading from the replicas `replicas` knows (one set
    /// per process, kept by [`crate::replicas::watch`]).
    pub fn with_replicas(self, replicas: Arc<Replicas>) -> Self {
        Self { replicas, ..self }
    }

    /// The replicas this handle reads from.
    pub fn replicas(&self) -> &Arc<Replicas> {
        &self.replicas
    }

    /// The bound on connections this handle shares, if any.
    pub fn budget(&self) -> Option<&Arc<crate::pool::Budget>> {
        self.shards.config.budget.as_ref()
    }

    /// Counts of the pool, for health and metrics.
    pub fn status(&self) -> deadpool::Status {
        self.lanes.status()
    }

    async fn conn(&self) -> Result<Checkout, PoolError> {
        self.lanes.platform().await
    }

    async fn tenant_conn(&self, tenant: TenantScope<'_>) -> Result<Checkout, PoolError> {
        let mut conn = if tenant.shard.is_primary() {
            self.lanes.tenant(tenant.id).await?
        } else {
            self.shard_lanes(tenant.shard).await?.tenant(tenant.id).await?
        };
        conn.serve(tenant.id);
        Ok(conn)
    }

    /// Runs `f` in a transaction on a platform connection. Platform tables are
    /// schema-qualified, so no `search_path` is involved.
    pub async fn platform<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.platform_tx(false, f).await
    }

    /// Runs `f` in a platform transaction that creates a tenant's schema
    /// (provisioning, a spare): as [`Db::platform`], and the connection
    /// counts it toward [`DbConfig::max_tenants_per_connection`], since
    /// creating a schema fills the backend's caches as serving a tenant does.
    pub async fn provisioning<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.platform_tx(true, f).await
    }

    async fn platform_tx<R, E, F>(&self, creates_schema: bool, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        // Boxed, as every transaction below: see [`Db::tenant_read`].
        Box::pin(async {
            let mut conn = self.conn().await?;
            if creates_schema {
                conn.provision();
            }
            AnsiTransactionManager::begin_transaction(&mut **conn).await?;
            let result = f(&mut conn).await;
            finish(&mut conn, result).await
        })
        .await
    }

    /// Runs `f` on a platform connection without opening a transaction:
    /// for one statement, which is atomic on its own, at one round trip
    /// instead of three.
    pub async fn statement<R, E, F>(&self, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        Box::pin(async {
            let mut conn = self.conn().await?;
            f(&mut conn).await
        })
        .await
    }

    /// Runs `f` in a platform transaction bound to one tenant: the platform
    /// rows that belong to it (memberships, API keys, invitations, custom
    /// domains) are reached only through store functions that take the
    /// [`TenantRows`] handle and scope every statement to its tenant, and
    /// the tenant's audit log is written through it.
    pub async fn tenant_rows<R, E, F>(&self, tenant: TenantScope<'_>, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: TxFn<&'r mut TenantRows<'c>, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        Box::pin(
            async {
                // Platform rows live on the primary, wherever the schema is.
                let mut conn = self.lanes.tenant(tenant.id).await?;
                conn.serve(tenant.id);
                AnsiTransactionManager::begin_transaction(&mut **conn).await?;
                let result = {
                    let mut rows = TenantRows { conn: &mut conn, scope: tenant };
                    f(&mut rows).await
                };
                let result = finish(&mut conn, result).await;
                drop(conn);
                counted("rows", self.unless_moved(tenant, result).await)
            }
            .instrument(tx_span("rows", tenant.id)),
        )
        .await
    }

    /// Runs `f` in a transaction scoped to one tenant's schema.
    ///
    /// `BEGIN` and `SET LOCAL search_path` travel in one simple-protocol
    /// message, so the setting exists only inside this transaction and can
    /// never leak into another request on the same pooled connection, or onto
    /// another client behind PgBouncer. That message is pipelined with the
    /// first statement of `f` (sent before it, without waiting for its answer),
    /// which saves a round trip per request.
    pub async fn tenant<R, E, F>(&self, tenant: TenantScope<'_>, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: TxFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        Box::pin(
            async {
                let mut obj = self.tenant_conn(tenant).await?;
                let result = scoped(&mut obj, tenant, f).await;
                let result = finish(&mut obj, result).await;
                if result.is_ok() {
                    self.note_written(&mut obj, tenant).await;
                }
                drop(obj);
                counted("schema", self.unless_moved(tenant, result).await)
            }
            .instrument(tx_span("schema", tenant.id)),
        )
        .await
    }

    /// Runs one read statement of a tenant's tables, in one round trip to
    /// PostgreSQL: the statement names the tenant's schema itself (see
    /// [`TenantSql`]) and runs alone, outside any transaction, as one
    /// Bind/Execute/Sync once the connection has prepared it. No
    /// `search_path` is set, so there is nothing to leak onto the pooled
    /// connection or another client behind PgBouncer, and PostgreSQL plans
    /// it once per connection and tenant. (With the statement cache off,
    /// the read runs inside a transaction of its own instead, see below.)
    ///
    /// `bind` adds the statement's parameters to the query it is given.
    /// Rows are read by column name ([`diesel::QueryableByName`]).
    ///
    /// The prepared statement is cached under its SQL text, which holds the
    /// schema's name: each tenant's read is its own statement (never one
    /// tenant's statement run for another, a test checks). A connection
    /// keeps one per tenant it has read for, which
    /// [`DbConfig::max_tenants_per_connection`] bounds. A table left
    /// unqualified by mistake resolves through the session's `search_path`,
    /// where no tenant table exists (`public` holds none of their names, a
    /// test checks): the read fails, never reads another tenant's rows.
    ///
    /// In a GET request the read goes to a replica as [`Db::tenant_view`]'s
    /// do, and a failure there makes it again on the primary: `bind` may be
    /// called twice.
    pub async fn tenant_read<Q, U, E>(
        &self,
        tenant: TenantScope<'_>,
        sql: TenantSql,
        bind: impl Fn(diesel::query_builder::SqlQuery) -> Q,
    ) -> Result<Vec<U>, E>
    where
        Q: QueryFragment<Pg> + Query<SqlType = Untyped> + Send + 'static,
        U: QueryableByName<Pg> + Send + 'static,
        E: From<diesel::result::Error> + From<PoolError> + Send,
    {
        let sql = sql.in_schema(tenant.schema);
        let read = async {
            if let Some(replica) = self.replica_for(tenant) {
                let query = BySql(bind(diesel::sql_query(sql.clone())));
                let cache = self.statement_cache;
                let served = self.on_replica(&replica, tenant, async |obj| load::<_, U, E>(obj, query, cache).await);
                if let Some(rows) = served.await {
                    return Ok(rows);
                }
            }
            let query = BySql(bind(diesel::sql_query(sql)));
            // A failed checkout is answered as it is: no connection is no
            // sign of a move, and checking would wait for one again.
            let mut obj = self.tenant_conn(tenant).await?;
            let rows = load(&mut obj, query, self.statement_cache).await;
            drop(obj);
            self.read_unless_moved(tenant, rows).await
        };
        // Boxed: the checkout and the query make a future of tens of
        // kilobytes, which every enclosing future (the handler's, actix's
        // boxes, tracing's wrappers) would otherwise hold inline and copy
        // each time it is moved; copying it was over half of the
        // instructions of this read (`docs/benchmarks.md`). One allocation
        // costs less.
        Box::pin(async { counted("schema", read.await) }.instrument(tx_span("schema", tenant.id))).await
    }
}

/// Runs `query` for [`Db::tenant_read`], alone with the statement cache,
/// else in a transaction of its own: without the cache the statement is
/// prepared in an exchange of its own before it runs, and behind PgBouncer
/// in transaction mode (the reason to turn the cache off) the two could
/// reach different server connections unless a transaction holds them on
/// one.
async fn load<Q, U, E>(conn: &mut PgConn, query: BySql<Q>, statement_cache: bool) -> Result<Vec<U>, E>
where
    Q: QueryFragment<Pg> + Query<SqlType = Untyped> + Send + 'static,
    U: QueryableByName<Pg> + Send + 'static,
    E: From<diesel::result::Error> + From<PoolError> + Send,
{
    if statement_cache {
        diesel_async::RunQueryDsl::load::<U>(query, conn).await.map_err(E::from)
    } else {
        AnsiTransactionManager::begin_transaction(conn).await?;
        let rows = diesel_async::RunQueryDsl::load::<U>(query, &mut *conn).await.map_err(E::from);
        finish(conn, rows).await
    }
}

/// Runs `f` in a transaction scoped to `tenant` on `obj`, left for the
/// caller to [`finish`].
///
/// `BEGIN` and `SET LOCAL search_path` travel in one simple-protocol
/// message, pipelined with the first statement of `f` (see
/// [`Db::tenant`]).
async fn scoped<R, E, F>(obj: &mut Pooled, tenant: TenantScope<'_>, f: F) -> Result<R, E>
where
    for<'r, 'c> F: TxFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send,
    E: From<diesel::result::Error> + From<PoolError> + Send,
{
    let begin_sql = open_scoped(obj, tenant)?;
    let shared: &AsyncPgConnection = obj;
    let mut scoped = TenantConn { conn: shared, tenant_id: tenant.id };
    // `join` polls `begin` first, which queues BEGIN on the connection
    // before `f` can queue anything; the connection keeps that order.
    let begin = async {
        let mut conn = shared;
        conn.batch_execute(&begin_sql).await
    };
    let body = async {
        #[cfg(debug_assertions)]
        scoped.assert_schema::<E>(tenant.schema).await?;
        f(&mut scoped).await
    };
    match futures_util::future::join(begin, body).await {
        (Ok(()), result) => result,
        (Err(begin_failed), _) => Err(begin_failed.into()),
    }
}

/// One read statement of a tenant's tables for [`Db::tenant_read`], with
/// `{schema}` where the tenant's schema goes:
/// `SELECT id, name FROM {schema}.projects WHERE id = $1`. The text is
/// `'static`, written in the code, so no request input can become SQL:
/// values travel as bind parameters.
#[derive(Debug, Clone, Copy)]
pub struct TenantSql(pub &'static str);

impl TenantSql {
    /// The statement with every `{schema}` replaced by the quoted schema
    /// name.
    pub fn in_schema(self, schema: &SchemaName) -> String {
        self.0.replace("{schema}", &schema.quoted())
    }
}

/// A statement that diesel-async prepares once per connection and caches
/// under its SQL text: the text names the tenant's schema, so the cache key
/// does too. (`SqlQuery` on its own is never cached; a static query id
/// would cache one statement for every tenant, which is why this has none.)
struct BySql<Q>(Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for BySql<Q> {
    fn walk_ast<'b>(&'b self, pass: diesel::query_builder::AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _: &Pg) -> diesel::QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for BySql<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for BySql<Q> {
    type SqlType = Q::SqlType;
}

/// Starts a tenant-scoped transaction on `obj`: counts it as open before
/// anything is sent, so that if the caller's future is dropped from here on,
/// the pool sees an open transaction and discards the connection instead of
/// handing it (mid-transaction, with this tenant's `search_path`) to another
/// request. Returns the message that opens it on the server, `BEGIN` and
/// `SET LOCAL search_path` in one simple-protocol message.
fn open_scoped(obj: &mut Pooled, tenant: TenantScope<'_>) -> Result<String, diesel::result::Error> {
    let conn: &mut AsyncPgConnection = obj;
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_state()?
        .change_transaction_depth(TransactionDepthChange::IncreaseDepth)?;
    Ok(format!("BEGIN; SET LOCAL search_path TO {}", tenant.schema.quoted()))
}

/// The span of one tenant transaction, for traces. DEBUG, so that logs at
/// the default level never pay for it; the trace exporter takes Plinth's
/// DEBUG spans (app `telemetry`).
fn tx_span(kind: &'static str, tenant: TenantId) -> tracing::Span {
    tracing::debug_span!(
        "tenant transaction",
        otel.kind = "client",
        db.system.name = "postgresql",
        tx.kind = kind,
        tenant.id = %tenant,
        tx.outcome = tracing::field::Empty,
    )
}

/// Counts a finished tenant transaction (`schema`: a [`TenantConn`];
/// `rows`: a [`TenantRows`]) by whether it committed, and records that on
/// its span.
fn counted<R, E>(kind: &'static str, result: Result<R, E>) -> Result<R, E> {
    let outcome = if result.is_ok() { "commit" } else { "rollback" };
    tracing::Span::current().record("tx.outcome", outcome);
    crate::counters::increment("plinth_tenant_transactions_total", &[("kind", kind), ("outcome", outcome)]);
    result
}

/// Commits on success, rolls back on error. A failed rollback leaves the
/// connection marked broken, and the pool discards it.
async fn finish<R, E>(conn: &mut PgConn, result: Result<R, E>) -> Result<R, E>
where
    E: From<diesel::result::Error>,
{
    match result {
        Ok(value) => {
            AnsiTransactionManager::commit_transaction(conn).await?;
            Ok(value)
        }
        Err(err) => {
            if let Err(rollback) = AnsiTransactionManager::rollback_transaction(conn).await {
                tracing::warn!(error = %rollback, "rolling back a transaction failed");
            }
            Err(err)
        }
    }
}

/// What [`Db::tenant`] needs to scope a transaction: the id and the schema of
/// one tenant that was resolved from the registry.
#[derive(Debug, Clone, Copy)]
pub struct TenantScope<'a> {
    pub id: TenantId,
    pub schema: &'a SchemaName,
    /// The server the schema lives on.
    pub shard: &'a ShardName,
    /// Being moved to another shard ([`crate::moves`]).
    pub moving: bool,
    /// What the request asks of replicas and learns of its commits
    /// ([`crate::replicas`]); `None` outside a request: the primary only.
    pub consistency: Option<&'a Consistency>,
}

/// A connection inside a transaction whose `search_path` is one tenant's
/// schema. Functions that touch tenant tables take `&mut TenantConn`, so they
/// cannot be called with a connection that was not scoped to a tenant.
pub struct TenantConn<'c> {
    conn: &'c AsyncPgConnection,
    tenant_id: TenantId,
}

impl<'c> TenantConn<'c> {
    /// The tenant this connection is scoped to.
    pub fn tenant_id(&self) -> TenantId {
        self.tenant_id
    }

    /// The underlying connection, for running diesel queries against the
    /// tenant's (unqualified) tables. Queries issued concurrently on it are
    /// pipelined.
    pub fn pg(&mut self) -> &mut &'c AsyncPgConnection {
        &mut self.conn
    }

    #[cfg(debug_assertions)]
    async fn assert_schema<E: From<diesel::result::Error>>(&mut self, expected: &SchemaName) -> Result<(), E> {
        use diesel::sql_types::{Nullable, Text};
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Current {
            #[diesel(sql_type = Nullable<Text>)]
            schema: Option<String>,
        }
        // Raw SQL: a function call, and this check must not depend on any table.
        let current: Current =
            diesel::sql_query("SELECT current_schema() AS schema").get_result(&mut self.conn).await?;
        if current.schema.as_deref() == Some(expected.as_str()) {
            Ok(())
        } else {
            // The schema is missing (tenant being deleted) or not first on the path.
            Err(diesel::result::Error::NotFound.into())
        }
    }
}

/// A platform connection, in a transaction, bound to one tenant (see
/// [`Db::tenant_rows`]). Store functions for platform rows that belong to a
/// tenant take `&mut TenantRows`, read the tenant from it and put it in
/// every statement, so a caller cannot reach another tenant's row by
/// forgetting a condition.
pub struct TenantRows<'c> {
    conn: &'c mut PgConn,
    scope: TenantScope<'c>,
}

impl<'c> TenantRows<'c> {
    /// The tenant these rows belong to.
    pub fn tenant_id(&self) -> TenantId {
        self.scope.id
    }

    /// The tenant's schema and server (for its audit log).
    pub fn scope(&self) -> TenantScope<'c> {
        self.scope
    }

    /// The platform connection, for the owner's store functions; every
    /// statement they run must be scoped to [`Self::tenant_id`].
    pub fn conn(&mut self) -> &mut PgConn {
        self.conn
    }
}

/// A pool error carrying a failed query's error.
fn failed(e: diesel::result::Error) -> PoolError {
    PoolError::Backend(diesel_async::pooled_connection::PoolError::QueryError(e))
}

/// A pool error carrying a failed query's message.
fn query_failed(message: String) -> PoolError {
    PoolError::Backend(diesel_async::pooled_connection::PoolError::QueryError(
        diesel::result::Error::QueryBuilderError(message.into()),
    ))
}

/// Runs a batch of SQL without parameters on a connection (DDL, migrations).
pub async fn batch(conn: &mut PgConn, sql: &str) -> Result<(), diesel::result::Error> {
    conn.batch_execute(sql).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        _name: String,
    }

    /// The error type the calls are sized with; never built here.
    struct Failed;
    impl From<diesel::result::Error> for Failed {
        fn from(_: diesel::result::Error) -> Self {
            Self
        }
    }
    impl From<PoolError> for Failed {
        fn from(_: PoolError) -> Self {
            Self
        }
    }

    /// Every request's future holds the database call's, and actix, tracing
    /// and the handler move it several times: a checkout that carried the
    /// connect future inline (16 KiB) made copying over half of a read's
    /// instructions. The pool is lazy, so nothing here connects.
    #[test]
    fn database_calls_are_small_futures() -> anyhow::Result<()> {
        let db = Db::connect(&DbConfig::new("postgres://plinth@127.0.0.1:1/none"))?;
        let tenant = TenantId(uuid::Uuid::nil());
        let schema = SchemaName::for_tenant(tenant);
        let shard = ShardName::primary();
        let scope = TenantScope { id: tenant, schema: &schema, shard: &shard, moving: false, consistency: None };
        let checkout = std::mem::size_of_val(&db.tenant_conn(scope));
        assert!(checkout <= 2048, "a tenant checkout's future is {checkout} bytes");
        let platform = std::mem::size_of_val(&db.conn());
        assert!(platform <= 2048, "a platform checkout's future is {platform} bytes");
        let read = std::mem::size_of_val(&db.tenant_read::<_, Name, Failed>(scope, TenantSql("SELECT 1"), |q| q));
        assert!(read <= 256, "a tenant read's future is {read} bytes");
        let tx = std::mem::size_of_val(&db.platform(async |c| {
            diesel_async::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), c).await.map_err(Failed::from)
        }));
        assert!(tx <= 256, "a platform transaction's future is {tx} bytes");
        Ok(())
    }
}

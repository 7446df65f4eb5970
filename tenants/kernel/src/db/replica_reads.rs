//! The replica side of [`Db`]: which replica reads a tenant's data for a
//! request, running a read there with the primary answering its failure,
//! and the WAL positions that read-your-writes and the watcher use (see
//! [`crate::replicas`]).

use std::sync::Arc;

use diesel::QueryableByName;
use tracing::Instrument as _;

use super::{
    Db, DbConfig, PgConn, PoolError, TenantConn, TenantScope, failed, finish, lanes, query_failed, scoped, tx_span,
};
use crate::ids::ShardName;
use crate::lanes::{Checkout, Lanes};
use crate::pool::Manager;
use crate::replicas::{Lsn, Replica, WalPosition};

/// [`TxFn`] for a closure that may be called more than once: a read that
/// a replica failed runs again on the primary ([`Db::tenant_view`]).
pub trait ViewFn<T, R>: AsyncFn(T) -> R + Fn(T) -> <Self as ViewFn<T, R>>::Fut {
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> ViewFn<T, R> for F
where
    F: AsyncFn(T) -> R + Fn(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

impl Db {
    /// The pool of `replica`, made on first use.
    async fn replica_lanes(&self, replica: &Replica) -> Result<Arc<Lanes>, PoolError> {
        if let Some(lanes) = self.shards.replicas.read().unwrap_or_else(|p| p.into_inner()).get(&replica.id) {
            return Ok(Arc::clone(lanes));
        }
        let config = DbConfig { url: replica.url.clone(), ..self.shards.config.clone() };
        let made = lanes(&config).map_err(|e| query_failed(format!("{e:#}")))?;
        let mut pools = self.shards.replicas.write().unwrap_or_else(|p| p.into_inner());
        Ok(Arc::clone(pools.entry(replica.id).or_insert(made)))
    }

    /// Where `shard`'s server has written its log up to.
    pub(crate) async fn wal_position(&self, shard: &ShardName) -> Result<Lsn, PoolError> {
        let mut conn = self.shard_lanes(shard).await?.platform().await?;
        position(&mut conn, "pg_current_wal_lsn()")
            .await
            .map_err(failed)?
            .ok_or_else(|| query_failed("no WAL position".into()))
    }

    /// Where `replica` has replayed its primary's log up to; `None` once
    /// it is no longer in recovery (promoted).
    pub(crate) async fn replay_position(&self, replica: &Replica) -> Result<Option<Lsn>, PoolError> {
        let mut conn = self.replica_lanes(replica).await?.platform().await?;
        position(&mut conn, "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() END").await.map_err(failed)
    }

    /// The replica to read `tenant` from for this request, if any (see
    /// [`crate::replicas`]).
    pub(super) fn replica_for(&self, tenant: TenantScope<'_>) -> Option<Arc<Replica>> {
        let consistency = tenant.consistency.filter(|c| c.reads_from_replicas())?;
        if tenant.moving {
            return None;
        }
        self.replicas.pick(tenant.shard, consistency.after())
    }

    /// Runs `attempt` on a connection of `replica` for `tenant`: its value,
    /// or `None` when it failed there and the primary is to answer. A
    /// replica that cannot be reached, or whose connection the attempt
    /// leaves broken, is taken out of rotation.
    pub(super) async fn on_replica<T, E>(
        &self,
        replica: &Replica,
        tenant: TenantScope<'_>,
        attempt: impl AsyncFnOnce(&mut Checkout) -> Result<T, E>,
    ) -> Option<T> {
        let served = async {
            let lanes = self.replica_lanes(replica).await.map_err(|_| true)?;
            let mut obj = match lanes.tenant(tenant.id).await {
                Ok(obj) => obj,
                // Every lane busy: a well replica, only a busy one.
                Err(PoolError::Timeout(deadpool::managed::TimeoutType::Wait)) => return Err(false),
                Err(_) => return Err(true),
            };
            obj.serve(tenant.id);
            let result = attempt(&mut obj).await;
            result.map_err(|_| Manager::broken(&mut obj))
        };
        match served.await {
            Ok(value) => {
                crate::counters::increment("plinth_replica_reads_total", &[("outcome", "served")]);
                Some(value)
            }
            Err(broken) => {
                if broken {
                    replica.take_out();
                }
                crate::counters::increment("plinth_replica_reads_total", &[("outcome", "primary")]);
                None
            }
        }
    }

    /// After a committed tenant transaction of a request that writes, on a
    /// shard with replicas: records where the commit ended in the log, for
    /// the answer's header ([`crate::replicas`]). Read on the same
    /// connection after the commit, so it is at or past the commit.
    pub(super) async fn note_written(&self, conn: &mut PgConn, tenant: TenantScope<'_>) {
        let Some(consistency) = tenant.consistency.filter(|c| c.records()) else { return };
        if !self.replicas.any(tenant.shard) {
            return;
        }
        match position(conn, "pg_current_wal_insert_lsn()").await {
            Ok(Some(lsn)) => consistency.wrote(WalPosition { lsn, shard: tenant.shard.clone() }),
            Ok(None) => {}
            // The answer goes without the header: the client's next read
            // may come from a replica that has not replayed this write yet.
            Err(err) => tracing::warn!(error = %err, "reading the WAL position of a commit failed"),
        }
    }

    /// [`Db::tenant`] for the reads of a GET route: on a replica of the
    /// tenant's shard when the request allows it and one is caught up
    /// ([`crate::replicas`]), else on the primary. Any failure on the
    /// replica (its connection lost, a row it lacks, anything) is answered
    /// by running `f` again on the primary, so `f` is called by reference,
    /// may run twice, and must only read.
    pub async fn tenant_view<R, E, F>(&self, tenant: TenantScope<'_>, f: F) -> Result<R, E>
    where
        for<'r, 'c> F: ViewFn<&'r mut TenantConn<'c>, Result<R, E>, Fut: Send> + Send + Sync,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        if let Some(replica) = self.replica_for(tenant) {
            let served = self.on_replica(&replica, tenant, async |obj| {
                let result = scoped(obj, tenant, async |c| f(c).await).await;
                finish(obj, result).await
            });
            if let Some(value) = Box::pin(served.instrument(tx_span("replica", tenant.id))).await {
                return Ok(value);
            }
        }
        self.tenant(tenant, async |c| f(c).await).await
    }
}

/// A WAL position the server computes with `expression` (a `pg_lsn`, or
/// NULL).
async fn position(conn: &mut PgConn, expression: &'static str) -> Result<Option<Lsn>, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Position {
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        lsn: Option<String>,
    }
    // Raw SQL: server functions.
    let found: Position =
        diesel_async::RunQueryDsl::get_result(diesel::sql_query(format!("SELECT ({expression})::text AS lsn")), conn)
            .await?;
    found
        .lsn
        .map(|lsn| lsn.parse().map_err(|e: String| diesel::result::Error::DeserializationError(e.into())))
        .transpose()
}

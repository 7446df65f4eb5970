//! The server side of [`Db`]: the pool of each shard's server, made from
//! the registry's URL on first use, transactions there outside any
//! tenant, and the check, after a failed tenant transaction, whether the
//! tenant has moved to another shard meanwhile (see [`crate::shards`],
//! [`crate::moves`]).

use std::sync::Arc;

use diesel_async::{AnsiTransactionManager, TransactionManager};

use super::{Db, DbConfig, PgConn, PoolError, TenantScope, TxFn, failed, finish, lanes, query_failed};
use crate::ids::ShardName;
use crate::lanes::Lanes;

impl Db {
    /// The pool of `shard`'s server; the platform database's for the
    /// primary. Another shard's pool is made on first use, from the URL
    /// the registry holds for it.
    pub(super) async fn shard_lanes(&self, shard: &ShardName) -> Result<Arc<Lanes>, PoolError> {
        if shard.is_primary() {
            return Ok(Arc::clone(&self.lanes));
        }
        if let Some(lanes) = self.shards.pools.read().unwrap_or_else(|p| p.into_inner()).get(shard) {
            return Ok(Arc::clone(lanes));
        }
        // Boxed: made once per shard, and a connect future inline would make
        // every tenant checkout's future several times larger.
        let url = Box::pin(self.shard_url(shard)).await?;
        let config = DbConfig { url, ..self.shards.config.clone() };
        let made = lanes(&config).map_err(|e| query_failed(format!("{e:#}")))?;
        let mut pools = self.shards.pools.write().unwrap_or_else(|p| p.into_inner());
        Ok(Arc::clone(pools.entry(shard.clone()).or_insert(made)))
    }

    /// The URL of `shard`'s server: `DATABASE_URL` for the primary, the
    /// registry's for another.
    /// Read on a connection of its own, not the pool's: a shard's pool is
    /// made while a platform transaction (provisioning) may hold the last
    /// pooled connection.
    pub async fn shard_url(&self, shard: &ShardName) -> Result<String, PoolError> {
        if shard.is_primary() {
            return Ok(self.shards.config.url.clone());
        }
        use diesel::{OptionalExtension as _, QueryDsl as _};
        use diesel_async::RunQueryDsl as _;
        let connect = async {
            let target = crate::postgres::Target::parse(&self.shards.config.url)?;
            tokio::time::timeout(self.shards.config.connect_timeout, target.connect_diesel())
                .await
                .map_err(|_| anyhow::anyhow!("connecting to the primary timed out"))?
        };
        let mut conn = connect.await.map_err(|e| query_failed(format!("reading shard {shard}'s URL: {e:#}")))?;
        let url: Option<Option<String>> = crate::schema::shards::table
            .find(shard.as_str())
            .select(crate::schema::shards::url)
            .first::<Option<String>>(&mut conn)
            .await
            .optional()
            .map_err(failed)?;
        url.flatten().ok_or_else(|| query_failed(format!("there is no shard named {shard} with a URL")))
    }

    /// After a failed transaction of a tenant: the error to answer with if
    /// the tenant now lives on another shard than `tenant.shard` (a move
    /// flipped while this request was on its way, and its old copy is gone;
    /// see [`crate::moves`]). Reading the registry row `FOR SHARE` waits out
    /// a flip in progress.
    async fn moved_away(&self, tenant: TenantScope<'_>) -> Option<PoolError> {
        use diesel::QueryDsl as _;
        use diesel_async::RunQueryDsl as _;
        let now: anyhow::Result<String> = self
            .platform(async |c| {
                Ok(crate::schema::tenants::table
                    .find(tenant.id.0)
                    .select(crate::schema::tenants::shard)
                    .for_share()
                    .first::<String>(c)
                    .await?)
            })
            .await;
        match now {
            Ok(now) if now != tenant.shard.as_str() => {
                Some(query_failed(format!("tenant {} moved from shard {} to {now}", tenant.id, tenant.shard)))
            }
            _ => None,
        }
    }

    /// Runs `f` in a transaction on a connection to `shard`'s server,
    /// outside any tenant's scope: provisioning and migrating schemas
    /// there, its bookkeeping (`crate::shards`).
    pub async fn on_shard<R, E, F>(&self, shard: &ShardName, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.shard_tx(shard, false, f).await
    }

    /// [`Db::on_shard`] for a transaction that creates a tenant's schema
    /// there, counted as [`Db::provisioning`] counts it.
    pub async fn provisioning_on<R, E, F>(&self, shard: &ShardName, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        self.shard_tx(shard, true, f).await
    }

    async fn shard_tx<R, E, F>(&self, shard: &ShardName, creates_schema: bool, f: F) -> Result<R, E>
    where
        for<'r> F: TxFn<&'r mut PgConn, Result<R, E>, Fut: Send> + Send,
        E: From<diesel::result::Error> + From<PoolError> + Send,
        R: Send,
    {
        Box::pin(async {
            let lanes = self.shard_lanes(shard).await?;
            let mut conn = lanes.platform().await?;
            if creates_schema {
                conn.provision();
            }
            AnsiTransactionManager::begin_transaction(&mut **conn).await?;
            let result = f(&mut conn).await;
            finish(&mut conn, result).await
        })
        .await
    }

    /// `result`, or [`Db::moved_away`]'s error in place of a failure of a
    /// tenant being moved (only then: a failed transaction is often the
    /// route's own answer, a 404, which should cost no registry read).
    pub(super) async fn unless_moved<R, E: From<PoolError>>(
        &self,
        tenant: TenantScope<'_>,
        result: Result<R, E>,
    ) -> Result<R, E> {
        match result {
            Err(err) if tenant.moving => Err(self.moved_away(tenant).await.map_or(err, E::from)),
            other => other,
        }
    }

    /// [`Db::unless_moved`] for a single read, whose failures are the
    /// database's only (no rows is not one): checked whether the tenant is
    /// known to be moving or not, so an instance that has not yet heard of
    /// a move still answers 503 rather than 500 at its flip.
    pub(super) async fn read_unless_moved<R, E: From<PoolError>>(
        &self,
        tenant: TenantScope<'_>,
        result: Result<R, E>,
    ) -> Result<R, E> {
        match result {
            Err(err) => Err(self.moved_away(tenant).await.map_or(err, E::from)),
            ok => ok,
        }
    }
}

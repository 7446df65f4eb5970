//! Reads from streaming replicas.
//!
//! A shard (the primary included) may list streaming replicas of its
//! server (`public.shard_replicas`, `plinth shards add-replica`). Each
//! instance runs [`watch`]: every `PLINTH_REPLICA_CHECK_MS` it reads the
//! list, the WAL position of each shard that has replicas, and each
//! replica's replay position. A replica is in rotation while it answers, is
//! still in recovery, and has replayed everything its primary had written
//! `PLINTH_REPLICA_MAX_LAG_MS` ago; one that falls behind or goes away is
//! taken out, and put back at the first check it passes again.
//!
//! The tenant reads of GET routes that ask for it
//! ([`crate::db::Db::tenant_view`], [`crate::db::Db::tenant_read`]) go to a
//! replica in rotation, in turn; everything else goes to the shard's
//! primary. Read-your-writes: a request that commits a tenant transaction
//! on a shard with replicas answers with the position of its commit
//! ([`WalPosition`], the `plinth-wal-position` header); a GET that sends it
//! back is served by a replica only if that replica was seen to have
//! replayed at least that far, by the primary otherwise. Any failure of a
//! read on a replica is answered by running the read again on the primary,
//! so a replica that dies under a request costs that request time, not an
//! error; one that cannot be reached or loses its connection is taken out
//! of rotation at once.
//!
//! A tenant being moved to another shard ([`crate::moves`]) is read from
//! its primary only: a replica of the old shard could still hold the old
//! copy after the flip.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, QueryableByName};

use crate::db::{Db, PgConn};
use crate::ids::ShardName;
use crate::schema::shard_replicas;

/// The header that carries a [`WalPosition`]: answered to writes, sent
/// back with reads.
pub const WAL_POSITION_HEADER: &str = "plinth-wal-position";

/// A position in a server's write-ahead log (PostgreSQL's `pg_lsn`,
/// written `16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a WAL position");
        let (high, low) = s.split_once('/').ok_or_else(bad)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(bad());
            }
            u32::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(Self((u64::from(part(high)?) << 32) | u64::from(part(low)?)))
    }
}

/// Where a commit ended in its shard's log, as the header carries it:
/// `<lsn>@<shard>`. Positions of different servers do not compare; a
/// position of another shard than the tenant's (it has moved since) is
/// served by the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPosition {
    pub lsn: Lsn,
    pub shard: ShardName,
}

impl std::fmt::Display for WalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.lsn, self.shard)
    }
}

impl std::str::FromStr for WalPosition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lsn, shard) = s.split_once('@').ok_or_else(|| format!("{s:?} is not <lsn>@<shard>"))?;
        Ok(Self { lsn: lsn.parse()?, shard: ShardName::parse(shard).map_err(|e| e.to_string())? })
    }
}

/// What one request asks of its reads and learns of its writes.
#[derive(Debug)]
pub struct Consistency {
    /// A GET or HEAD: its reads may go to a replica, its commits (if any)
    /// report no position.
    read: bool,
    /// The client's last write, from the header: a replica must have
    /// replayed it to serve this request. `Err` for a header that cannot
    /// be read: no replica serves then.
    after: Result<Option<WalPosition>, ()>,
    /// The position of this request's last commit on a shard with
    /// replicas, for the header of its answer.
    written: Mutex<Option<WalPosition>>,
}

impl Consistency {
    /// A request's: a GET or HEAD (`read`), with the header's value. A
    /// value that cannot be read counts as a position no replica has
    /// reached: the primary serves, never a stale answer.
    pub fn new(read: bool, header: Option<&str>) -> Self {
        let after = header.map(|h| h.trim().parse::<WalPosition>()).transpose().map_err(drop);
        Self { read, after, written: Mutex::new(None) }
    }

    /// The position to answer with, if this request committed on a shard
    /// with replicas.
    pub fn written(&self) -> Option<WalPosition> {
        self.written.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn reads_from_replicas(&self) -> bool {
        self.read && self.after.is_ok()
    }

    pub(crate) fn after(&self) -> Option<&WalPosition> {
        self.after.as_ref().ok().and_then(Option::as_ref)
    }

    /// Whether this request's commits report their position.
    pub(crate) fn records(&self) -> bool {
        !self.read
    }

    pub(crate) fn wrote(&self, position: WalPosition) {
        *self.written.lock().unwrap_or_else(|p| p.into_inner()) = Some(position);
    }
}

/// One replica as this process sees it.
#[derive(Debug)]
pub struct Replica {
    pub id: i64,
    pub shard: ShardName,
    pub(crate) url: String,
    in_rotation: AtomicBool,
    /// Replayed up to here when last checked.
    replayed: AtomicU64,
    /// Bytes behind its primary when last checked.
    behind: AtomicU64,
}

impl Replica {
    /// Takes the replica out of rotation until a check finds it well.
    pub(crate) fn take_out(&self) {
        if self.in_rotation.swap(false, Ordering::Relaxed) {
            tracing::warn!(shard = %self.shard, replica = self.id, "a read on a replica failed; out of rotation until it answers");
        }
    }

    fn has_replayed(&self, lsn: Lsn) -> bool {
        self.replayed.load(Ordering::Relaxed) >= lsn.0
    }
}

/// A replica's state, for `/metrics` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: i64,
    pub shard: ShardName,
    pub in_rotation: bool,
    pub replayed: Lsn,
    pub behind_bytes: u64,
}

/// The replicas of every shard and whether each is in rotation, shared by
/// every pool of a process and kept by [`watch`].
#[derive(Debug, Default)]
pub struct Replicas {
    by_shard: RwLock<HashMap<ShardName, Arc<[Arc<Replica>]>>>,
    /// Where the next pick starts, so reads go round.
    next: AtomicUsize,
}

impl Replicas {
    /// Whether `shard` has replicas (then its commits answer with their
    /// position).
    pub fn any(&self, shard: &ShardName) -> bool {
        self.by_shard.read().unwrap_or_else(|p| p.into_inner()).contains_key(shard)
    }

    /// A replica of `shard` in rotation that has replayed `after`, if any.
    pub(crate) fn pick(&self, shard: &ShardName, after: Option<&WalPosition>) -> Option<Arc<Replica>> {
        let lsn = match after {
            Some(after) if after.shard != *shard => return None,
            Some(after) => after.lsn,
            None => Lsn(0),
        };
        let replicas = Arc::clone(self.by_shard.read().unwrap_or_else(|p| p.into_inner()).get(shard)?);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..replicas.len())
            .map(|i| &replicas[(start + i) % replicas.len()])
            .find(|r| r.in_rotation.load(Ordering::Relaxed) && r.has_replayed(lsn))
            .cloned()
    }

    /// Every replica's state, by shard and id.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        let mut all: Vec<ReplicaStatus> = self
            .by_shard
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|replicas| replicas.iter())
            .map(|r| ReplicaStatus {
                id: r.id,
                shard: r.shard.clone(),
                in_rotation: r.in_rotation.load(Ordering::Relaxed),
                replayed: Lsn(r.replayed.load(Ordering::Relaxed)),
                behind_bytes: r.behind.load(Ordering::Relaxed),
            })
            .collect();
        all.sort_by(|a, b| (a.shard.as_str(), a.id).cmp(&(b.shard.as_str(), b.id)));
        all
    }

    /// Takes the registry's list: replicas already known keep their state,
    /// new ones start out of rotation (until checked).
    fn sync(&self, rows: Vec<Declared>) -> HashMap<ShardName, Arc<[Arc<Replica>]>> {
        let mut by_shard = self.by_shard.write().unwrap_or_else(|p| p.into_inner());
        let known: HashMap<i64, Arc<Replica>> =
            by_shard.values().flat_map(|rs| rs.iter()).map(|r| (r.id, Arc::clone(r))).collect();
        let mut next: HashMap<ShardName, Vec<Arc<Replica>>> = HashMap::new();
        for row in rows {
            let replica = known.get(&row.id).filter(|r| r.url == row.url).cloned().unwrap_or_else(|| {
                Arc::new(Replica {
                    id: row.id,
                    shard: row.shard.clone(),
                    url: row.url,
                    in_rotation: AtomicBool::new(false),
                    replayed: AtomicU64::new(0),
                    behind: AtomicU64::new(0),
                })
            });
            next.entry(row.shard).or_default().push(replica);
        }
        *by_shard = next.into_iter().map(|(shard, rs)| (shard, rs.into())).collect();
        by_shard.clone()
    }
}

/// A replica as the registry declares it.
#[derive(Debug, Clone)]
pub struct Declared {
    pub id: i64,
    pub shard: ShardName,
    pub url: String,
}

/// Every declared replica, by shard and id.
pub async fn list(conn: &mut PgConn) -> Result<Vec<Declared>, diesel::result::Error> {
    use diesel_async::RunQueryDsl as _;
    let rows: Vec<(i64, String, String)> = shard_replicas::table
        .select((shard_replicas::id, shard_replicas::shard, shard_replicas::url))
        .order((shard_replicas::shard, shard_replicas::id))
        .load(conn)
        .await?;
    rows.into_iter()
        .map(|(id, shard, url)| {
            let shard = ShardName::parse(&shard)
                .map_err(|e| diesel::result::Error::DeserializationError(format!("shard {shard:?}: {e}").into()))?;
            Ok(Declared { id, shard, url })
        })
        .collect()
}

/// Why a replica was not added.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("no shard named {0}")]
    NoShard(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<diesel::result::Error> for AddError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Other(e.into())
    }
}

impl From<crate::db::PoolError> for AddError {
    fn from(e: crate::db::PoolError) -> Self {
        Self::Other(e.into())
    }
}

/// What a server says of itself.
#[derive(QueryableByName)]
struct Identity {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    standby: bool,
    #[diesel(sql_type = diesel::sql_types::Text)]
    system: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    database: String,
}

async fn identity(url: &str) -> anyhow::Result<Identity> {
    use diesel_async::RunQueryDsl as _;
    let mut conn = crate::postgres::Target::parse(url)?.connect_diesel().await?;
    // Raw SQL: server functions.
    Ok(diesel::sql_query(
        "SELECT pg_is_in_recovery() AS standby, \
                (SELECT system_identifier FROM pg_control_system())::text AS system, \
                current_database()::text AS database",
    )
    .get_result(&mut conn)
    .await?)
}

/// Declares `url` a streaming replica of `shard`: checks that it answers,
/// is in recovery, is a copy of that shard's server (same system
/// identifier) and holds the same database, then records it. Returns its id.
pub async fn add(db: &Db, shard: &ShardName, url: &str) -> Result<i64, AddError> {
    use diesel_async::RunQueryDsl as _;
    let known = db
        .platform(async |c| {
            Ok::<_, anyhow::Error>(
                crate::schema::shards::table
                    .find(shard.as_str())
                    .select(crate::schema::shards::name)
                    .first::<String>(c)
                    .await
                    .optional()?,
            )
        })
        .await?;
    if known.is_none() {
        return Err(AddError::NoShard(shard.to_string()));
    }
    let primary_url = db.shard_url(shard).await.map_err(anyhow::Error::from)?;
    let primary = identity(&primary_url).await.map_err(|e| anyhow::anyhow!("reaching shard {shard}: {e:#}"))?;
    let replica = identity(url).await.map_err(|e| AddError::Refused(format!("the replica does not answer: {e:#}")))?;
    if !replica.standby {
        return Err(AddError::Refused("that server is not in recovery: it is not a streaming replica".into()));
    }
    if replica.system != primary.system {
        return Err(AddError::Refused(format!("that server is not a replica of shard {shard}'s server")));
    }
    if replica.database != primary.database {
        return Err(AddError::Refused(format!(
            "the URL names database {:?}; shard {shard} is database {:?}",
            replica.database, primary.database
        )));
    }
    let id = db
        .platform(async |c| {
            diesel::insert_into(shard_replicas::table)
                .values((shard_replicas::shard.eq(shard.as_str()), shard_replicas::url.eq(url)))
                .returning(shard_replicas::id)
                .get_result::<i64>(c)
                .await
                .map_err(|e| match e {
                    diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _) => {
                        AddError::Refused(format!("that replica of shard {shard} is declared already"))
                    }
                    other => AddError::Other(other.into()),
                })
        })
        .await?;
    Ok(id)
}

/// Removes replica `id` of `shard`; `false` if there is none. Instances
/// stop reading from it when they next read the list (see [`watch`]).
pub async fn remove(conn: &mut PgConn, shard: &ShardName, id: i64) -> Result<bool, diesel::result::Error> {
    use diesel_async::RunQueryDsl as _;
    let n = diesel::delete(shard_replicas::table.find(id).filter(shard_replicas::shard.eq(shard.as_str())))
        .execute(conn)
        .await?;
    Ok(n == 1)
}

/// How [`watch`] judges replicas.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    /// `PLINTH_REPLICA_CHECK_MS`: how often.
    pub every: Duration,
    /// `PLINTH_REPLICA_MAX_LAG_MS`: how far behind its primary a replica
    /// may be, in time, and stay in rotation.
    pub max_lag: Duration,
}

/// Keeps `db`'s [`Replicas`] (shared with every pool of the process) up to
/// date, for as long as the process runs. A failed check is logged and the
/// next one tried.
pub async fn watch(db: Db, settings: Watch) {
    let mut history: HashMap<ShardName, VecDeque<(Instant, u64)>> = HashMap::new();
    let mut tick = tokio::time::interval(settings.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checks = 0_u32;
    loop {
        tick.tick().await;
        // The list is read at the first check and every `LIST_EVERY`
        // checks after: a platform transaction each time, which an
        // installation without replicas should not pay twice a second.
        let listing = checks.is_multiple_of(LIST_EVERY);
        checks = checks.wrapping_add(1);
        if let Err(err) = check(&db, &mut history, settings, listing).await {
            tracing::warn!(error = %format!("{err:#}"), "checking the replicas failed");
        }
    }
}

/// How many checks [`watch`] makes per reading of the list of replicas (10
/// s at the default 500 ms).
const LIST_EVERY: u32 = 20;

/// One check of every replica, after reading the list again if `listing`.
async fn check(
    db: &Db,
    history: &mut HashMap<ShardName, VecDeque<(Instant, u64)>>,
    settings: Watch,
    listing: bool,
) -> anyhow::Result<()> {
    let by_shard = if listing {
        let declared = db.platform(async |c| Ok::<_, anyhow::Error>(list(c).await?)).await?;
        db.replicas().sync(declared)
    } else {
        db.replicas().by_shard.read().unwrap_or_else(|p| p.into_inner()).clone()
    };
    history.retain(|shard, _| by_shard.contains_key(shard));
    // Nothing a server says may hold the check up longer than this.
    let limit = settings.every.max(Duration::from_secs(1));
    let shards = by_shard.iter().map(|(shard, replicas)| async move {
        let now = Instant::now();
        let written = tokio::time::timeout(limit, db.wal_position(shard)).await;
        let replayed = futures_util::future::join_all(
            replicas.iter().map(|r| async move { (r, tokio::time::timeout(limit, db.replay_position(r)).await) }),
        )
        .await;
        (shard, now, written, replayed)
    });
    for (shard, now, written, replayed) in futures_util::future::join_all(shards).await {
        let written = match written {
            Ok(Ok(lsn)) => lsn,
            failed => {
                // Without the primary's position nothing can be judged;
                // the replicas keep their state until it answers.
                let why = failed
                    .map_or_else(|_| "timed out".to_owned(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                tracing::warn!(%shard, error = %why, "reading a shard's WAL position failed");
                continue;
            }
        };
        let samples = history.entry(shard.clone()).or_default();
        samples.push_back((now, written.0));
        // Keep one sample at least `max_lag` old (the bar), and the newer ones.
        while samples.len() > 1 && samples.get(1).is_some_and(|(at, _)| now.duration_since(*at) >= settings.max_lag) {
            samples.pop_front();
        }
        let bar = samples.front().map_or(written.0, |(_, lsn)| *lsn);
        for (replica, probed) in replayed {
            let (well, why) = match probed {
                Ok(Ok(Some(lsn))) => {
                    replica.replayed.fetch_max(lsn.0, Ordering::Relaxed);
                    replica.behind.store(written.0.saturating_sub(lsn.0), Ordering::Relaxed);
                    if lsn.0 >= bar { (true, String::new()) } else { (false, "too far behind".to_owned()) }
                }
                Ok(Ok(None)) => (false, "no longer in recovery".to_owned()),
                Ok(Err(err)) => (false, err.to_string()),
                Err(_) => (false, "timed out".to_owned()),
            };
            let was = replica.in_rotation.swap(well, Ordering::Relaxed);
            if well && !was {
                tracing::info!(%shard, replica = replica.id, "replica in rotation");
            } else if was && !well {
                tracing::warn!(%shard, replica = replica.id, reason = %why, "replica out of rotation");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_and_write_as_postgres_and_the_header_do() -> Result<(), String> {
        let lsn: Lsn = "16/B374D848".parse()?;
        assert_eq!(lsn, Lsn((0x16 << 32) | 0xB374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("0/1".parse::<Lsn>()? < "1/0".parse::<Lsn>()?);
        for bad in ["", "16", "/1", "1/", "x/1", "123456789/1", "-1/1"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
        let position: WalPosition = "0/3000148@b-2".parse()?;
        assert_eq!(position.to_string(), "0/3000148@b-2");
        assert!("0/3000148".parse::<WalPosition>().is_err());
        assert!("0/3000148@Bad Name".parse::<WalPosition>().is_err());
        Ok(())
    }

    /// A header that cannot be read sends the request to the primary:
    /// never a stale answer for a client that asked for its writes.
    #[test]
    fn an_unreadable_position_reads_from_the_primary() {
        assert!(!Consistency::new(true, Some("yesterday")).reads_from_replicas());
        assert!(Consistency::new(true, Some("0/1@primary")).reads_from_replicas());
        assert!(Consistency::new(true, None).reads_from_replicas());
        assert!(!Consistency::new(false, None).reads_from_replicas());
    }

    fn replica(id: i64, shard: &ShardName, in_rotation: bool, replayed: u64) -> Arc<Replica> {
        Arc::new(Replica {
            id,
            shard: shard.clone(),
            url: String::new(),
            in_rotation: AtomicBool::new(in_rotation),
            replayed: AtomicU64::new(replayed),
            behind: AtomicU64::new(0),
        })
    }

    #[test]
    fn a_pick_skips_replicas_out_of_rotation_or_behind_the_callers_write() -> Result<(), String> {
        let b = ShardName::parse("b").map_err(|e| e.to_string())?;
        let replicas = Replicas::default();
        replicas.by_shard.write().map_err(|e| e.to_string())?.insert(
            b.clone(),
            vec![replica(1, &b, false, 900), replica(2, &b, true, 100), replica(3, &b, true, 500)].into(),
        );
        let at = |lsn| WalPosition { lsn: Lsn(lsn), shard: b.clone() };
        for _ in 0..4 {
            assert_eq!(replicas.pick(&b, Some(&at(400))).map(|r| r.id), Some(3));
        }
        assert_eq!(replicas.pick(&b, Some(&at(600))).map(|r| r.id), None, "none has replayed it");
        let seen: std::collections::BTreeSet<i64> =
            (0..6).filter_map(|_| replicas.pick(&b, None)).map(|r| r.id).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [2, 3], "in turn, among those in rotation");
        let elsewhere = WalPosition { lsn: Lsn(0), shard: ShardName::primary() };
        assert!(replicas.pick(&b, Some(&elsewhere)).is_none(), "another server's position");
        assert!(replicas.pick(&ShardName::primary(), None).is_none());
        Ok(())
    }
}

//! Rate limits: GCRA (a leaky bucket kept as one timestamp per key).
//!
//! Two stores:
//!
//! - **Shared** ([`RateLimiter::shared`]): the `rate_limits` table in
//!   PostgreSQL, an `UNLOGGED` table, one row per limiter and key, updated
//!   with one statement per check on the database's clock. Every instance
//!   counts into the same rows, so N instances allow a limit once, not N
//!   times. PostgreSQL rather than Redis: it is already there, the checks
//!   guard routes that hash a password or send mail (milliseconds each), and
//!   a check costs one round trip (`docs/benchmarks.md`). The limits of the
//!   sensitive routes use it.
//! - **Local** ([`RateLimiter::local`]): this instance's memory, for load
//!   shedding that protects this instance (unknown bearer tokens, which
//!   cost a query on its pool), where a shared count would itself cost the
//!   query it saves.
//!
//! Keys come from clients (addresses, email addresses), so they are never
//! stored as given: each is hashed to 16 bytes (a 64 KiB "email" costs what
//! a short one does), and a client address counts per /64 for IPv6 (one
//! customer line, one client) — see [`client_key`]. The local store holds at
//! most `max_keys` keys in least-recently-used order: every check drops up to
//! two drained keys from the old end, and a new key past the bound pushes out
//! the least recently seen one, so no check ever scans the whole table. The
//! shared table is swept of drained rows by [`sweep`].

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Bool, Bytea, Text};
use diesel_async::RunQueryDsl as _;
use lru::LruCache;
use plinth_tenants::Db;
use sha2::Digest as _;

use crate::error::ApiError;

/// `burst` events at once, refilling at one per `period / burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub burst: u32,
    pub period: Duration,
}

impl Limit {
    pub const fn new(burst: u32, period: Duration) -> Self {
        Self { burst, period }
    }

    fn interval(&self) -> Duration {
        self.period / self.burst.max(1)
    }

    /// How far ahead of now the next event's time may be and still pass.
    fn horizon(&self) -> Duration {
        self.period.saturating_sub(self.interval())
    }
}

/// The stored form of a key: the first 16 bytes of its SHA-256.
type Key = [u8; 16];

fn key_of(key: &str) -> Key {
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The rate-limit form of a client address: an IPv4 address as it is, an
/// IPv6 address as its /64 (an IPv4-mapped one as the IPv4 address), and
/// anything that is not an address as `unknown`.
pub fn client_key(address: &str) -> String {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.to_string(),
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        Err(_) => "unknown".to_owned(),
    }
}

/// Why an event was not counted.
#[derive(Debug)]
pub enum Refused {
    /// Over the limit; retry after this long.
    Limited(Duration),
    /// The shared store could not be reached (503).
    Unavailable(ApiError),
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Limited(wait) => limited(wait),
            Refused::Unavailable(err) => err,
        }
    }
}

/// One limit over many keys (an IP address, an account, both).
pub struct RateLimiter {
    /// Names the limiter's rows in the shared table.
    name: &'static str,
    limit: Limit,
    store: Store,
}

enum Store {
    /// Per key: the theoretical arrival time of the next event.
    Local(Mutex<LruCache<Key, Instant>>),
    Shared(Db),
}

/// Keys a local limiter holds at most (about 7 MiB).
const MAX_KEYS: usize = 100_000;

#[derive(diesel::QueryableByName)]
struct Checked {
    #[diesel(sql_type = Bool)]
    allowed: bool,
    #[diesel(sql_type = Bool)]
    fresh: bool,
    #[diesel(sql_type = BigInt)]
    wait_us: i64,
}

#[derive(diesel::QueryableByName)]
struct Wait {
    #[diesel(sql_type = BigInt)]
    wait_us: i64,
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn from_micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

// Raw SQL: an upsert whose update is conditional and whose refusal reads the
// row it did not change, on the server's statement clock.
const CHECK: &str = "\
WITH up AS (
    INSERT INTO public.rate_limits AS r (limiter, key, tat)
    VALUES ($1, $2, statement_timestamp() + $3 * interval '1 microsecond')
    ON CONFLICT (limiter, key) DO UPDATE
        SET tat = greatest(r.tat, statement_timestamp()) + $3 * interval '1 microsecond'
        WHERE greatest(r.tat, statement_timestamp()) <= statement_timestamp() + $4 * interval '1 microsecond'
    RETURNING r.tat
)
SELECT true AS allowed, tat <= statement_timestamp() + $3 * interval '1 microsecond' AS fresh, 0::bigint AS wait_us
FROM up
UNION ALL
SELECT false, false,
    ceil(extract(epoch FROM r.tat - statement_timestamp() - $4 * interval '1 microsecond') * 1000000)::bigint
FROM public.rate_limits r
WHERE r.limiter = $1 AND r.key = $2 AND NOT EXISTS (SELECT 1 FROM up)";

const REFUND: &str = "\
UPDATE public.rate_limits SET tat = tat - $3 * interval '1 microsecond'
WHERE limiter = $1 AND key = $2 AND tat > statement_timestamp()";

const PEEK: &str = "\
SELECT ceil(extract(epoch FROM tat - statement_timestamp() - $3 * interval '1 microsecond') * 1000000)::bigint
    AS wait_us
FROM public.rate_limits
WHERE limiter = $1 AND key = $2 AND tat > statement_timestamp() + $3 * interval '1 microsecond'";

impl RateLimiter {
    /// A limiter counted by every instance, in the `rate_limits` table.
    pub fn shared(name: &'static str, limit: Limit, db: Db) -> Self {
        Self { name, limit, store: Store::Shared(db) }
    }

    /// A limiter of this instance only.
    pub fn local(name: &'static str, limit: Limit) -> Self {
        Self::local_with_capacity(name, limit, MAX_KEYS)
    }

    fn local_with_capacity(name: &'static str, limit: Limit, max_keys: usize) -> Self {
        let cap = NonZeroUsize::new(max_keys).unwrap_or(NonZeroUsize::MIN);
        Self { name, limit, store: Store::Local(Mutex::new(LruCache::new(cap))) }
    }

    /// Counts one event for `key`; refused when over the limit (the event
    /// is then not counted).
    pub async fn check(&self, key: &str) -> Result<(), Refused> {
        self.reserve(key).await.map(|_| ())
    }

    /// Counts one event for `key` before the work it guards (give it back
    /// with [`refund`](Self::refund) if it turns out not to count), so
    /// concurrent attempts cannot all pass a check made before any of them
    /// is counted. `Ok(true)` when `key` had no events counted before.
    pub async fn reserve(&self, key: &str) -> Result<bool, Refused> {
        let key = key_of(key);
        match &self.store {
            Store::Local(tat) => check_local(tat, &self.limit, key, Instant::now()),
            Store::Shared(db) => {
                let (name, interval, horizon) =
                    (self.name, micros(self.limit.interval()), micros(self.limit.horizon()));
                let row: Option<Checked> = db
                    .statement(async |c| {
                        diesel::sql_query(CHECK)
                            .bind::<Text, _>(name)
                            .bind::<Bytea, _>(&key[..])
                            .bind::<BigInt, _>(interval)
                            .bind::<BigInt, _>(horizon)
                            .get_result(c)
                            .await
                            .optional_row()
                    })
                    .await
                    .map_err(Refused::Unavailable)?;
                match row {
                    Some(Checked { allowed: true, fresh, .. }) => Ok(fresh),
                    Some(Checked { wait_us, .. }) => Err(Refused::Limited(from_micros(wait_us))),
                    // Refused by a row committed after this statement's
                    // snapshot: over the limit, for one interval.
                    None => Err(Refused::Limited(self.limit.interval())),
                }
            }
        }
    }

    /// Whether `key` is over the limit now, without counting an event.
    pub async fn is_limited(&self, key: &str) -> Result<Option<Duration>, ApiError> {
        let key = key_of(key);
        match &self.store {
            Store::Local(tat) => {
                let now = Instant::now();
                let tat = tat.lock().unwrap_or_else(|p| p.into_inner());
                Ok(tat
                    .peek(&key)
                    .and_then(|t| t.checked_duration_since(now + self.limit.horizon()))
                    .filter(|d| !d.is_zero()))
            }
            Store::Shared(db) => {
                let (name, horizon) = (self.name, micros(self.limit.horizon()));
                let row: Option<Wait> = db
                    .statement(async |c| {
                        diesel::sql_query(PEEK)
                            .bind::<Text, _>(name)
                            .bind::<Bytea, _>(&key[..])
                            .bind::<BigInt, _>(horizon)
                            .get_result(c)
                            .await
                            .optional_row()
                    })
                    .await?;
                Ok(row.map(|w| from_micros(w.wait_us)).filter(|d| !d.is_zero()))
            }
        }
    }

    /// Gives back one event counted by [`check`](Self::check): a reservation
    /// that turned out not to be needed (a login that succeeded).
    pub async fn refund(&self, key: &str) -> Result<(), ApiError> {
        let key = key_of(key);
        match &self.store {
            Store::Local(tat) => {
                let now = Instant::now();
                let mut tat = tat.lock().unwrap_or_else(|p| p.into_inner());
                let Some(current) = tat.peek(&key).copied() else { return Ok(()) };
                match current.checked_sub(self.limit.interval()).filter(|earlier| *earlier > now) {
                    Some(earlier) => {
                        tat.put(key, earlier);
                    }
                    None => {
                        tat.pop(&key);
                    }
                }
                Ok(())
            }
            Store::Shared(db) => {
                let (name, interval) = (self.name, micros(self.limit.interval()));
                db.statement(async |c| {
                    diesel::sql_query(REFUND)
                        .bind::<Text, _>(name)
                        .bind::<Bytea, _>(&key[..])
                        .bind::<BigInt, _>(interval)
                        .execute(c)
                        .await
                        .map_err(ApiError::from)
                })
                .await?;
                Ok(())
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match &self.store {
            Store::Local(tat) => tat.lock().unwrap_or_else(|p| p.into_inner()).len(),
            Store::Shared(_) => 0,
        }
    }
}

/// `Ok(None)` for no row, as `diesel::OptionalExtension` does, with the
/// error as an [`ApiError`].
trait OptionalRow<T> {
    fn optional_row(self) -> Result<Option<T>, ApiError>;
}

impl<T> OptionalRow<T> for diesel::QueryResult<T> {
    fn optional_row(self) -> Result<Option<T>, ApiError> {
        use diesel::OptionalExtension as _;
        self.optional().map_err(ApiError::from)
    }
}

/// Counts one event at `now` in a local store; `Ok(fresh)` says whether the
/// key had no live events before.
fn check_local(tat: &Mutex<LruCache<Key, Instant>>, limit: &Limit, key: Key, now: Instant) -> Result<bool, Refused> {
    let interval = limit.interval();
    let horizon = limit.horizon();
    let mut tat = tat.lock().unwrap_or_else(|p| p.into_inner());
    // Drop up to two drained keys from the old end: bounded work per check.
    for _ in 0..2 {
        match tat.peek_lru() {
            Some((_, t)) if *t <= now => {
                tat.pop_lru();
            }
            _ => break,
        }
    }
    let live = tat.peek(&key).copied().filter(|t| *t > now);
    let current = live.unwrap_or(now);
    if let Some(wait) = current.checked_duration_since(now + horizon).filter(|d| !d.is_zero()) {
        tat.promote(&key);
        return Err(Refused::Limited(wait));
    }
    tat.put(key, current + interval);
    Ok(live.is_none())
}

/// Deletes drained rows of the shared table (at most 10,000 a call); every
/// instance calls it once a minute.
pub async fn sweep(db: &Db) -> Result<usize, ApiError> {
    db.statement(async |c| {
        diesel::sql_query(
            "DELETE FROM public.rate_limits WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM public.rate_limits WHERE tat < statement_timestamp() LIMIT 10000))",
        )
        .execute(c)
        .await
        .map_err(ApiError::from)
    })
    .await
}

/// The error for a refused event: 429 `rate_limited` with `Retry-After`.
pub fn limited(retry_after: Duration) -> ApiError {
    metrics::counter!("plinth_rate_limited_total").increment(1);
    let secs = u64::try_from(retry_after.as_millis().div_ceil(1000)).unwrap_or(u64::MAX);
    ApiError::RateLimited { retry_after_secs: secs.max(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl RateLimiter {
        fn check_at(&self, key: &str, now: Instant) -> Result<bool, Duration> {
            let Store::Local(tat) = &self.store else { unreachable!("local only") };
            check_local(tat, &self.limit, key_of(key), now).map_err(|r| match r {
                Refused::Limited(wait) => wait,
                Refused::Unavailable(_) => Duration::MAX,
            })
        }
    }

    fn local(limit: Limit) -> RateLimiter {
        RateLimiter::local("test", limit)
    }

    #[test]
    fn a_burst_then_a_steady_rate() {
        let limiter = local(Limit::new(3, Duration::from_secs(3)));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("k", t0).is_ok());
        }
        let wait = limiter.check_at("k", t0).err();
        assert!(wait.is_some_and(|w| w <= Duration::from_secs(1) && w > Duration::ZERO));
        assert!(limiter.check_at("other", t0).is_ok(), "keys are independent");
        assert!(limiter.check_at("k", t0 + Duration::from_secs(1)).is_ok(), "one more after one interval");
        assert!(limiter.check_at("k", t0 + Duration::from_secs(1)).is_err());
        assert!(limiter.check_at("k", t0 + Duration::from_secs(10)).is_ok(), "drained");
    }

    #[tokio::test]
    async fn a_refund_gives_one_event_back() {
        let limiter = local(Limit::new(2, Duration::from_secs(3600)));
        assert!(limiter.check("k").await.is_ok() && limiter.check("k").await.is_ok());
        assert!(limiter.check("k").await.is_err());
        assert!(limiter.is_limited("k").await.ok().flatten().is_some());
        assert!(limiter.refund("k").await.is_ok());
        assert!(limiter.check("k").await.is_ok());
        assert!(limiter.refund("k").await.is_ok() && limiter.refund("k").await.is_ok());
        assert_eq!(limiter.len(), 0, "fully refunded");
    }

    #[test]
    fn keys_are_fixed_size_and_bounded_in_number() {
        // A huge key costs what a short one does: only its hash is kept.
        let limiter = RateLimiter::local_with_capacity("test", Limit::new(1, Duration::from_secs(3600)), 1_000);
        let huge = "x".repeat(64 * 1024);
        let now = Instant::now();
        assert!(limiter.check_at(&huge, now).is_ok());
        assert!(limiter.check_at(&huge, now).is_err());
        assert_eq!(std::mem::size_of::<Key>(), 16);
        // A flood of keys never grows the table past its bound, and a key in
        // active use is not the one pushed out.
        for i in 0..5_000 {
            let _ = limiter.check_at(&format!("flood-{i}"), now);
            if i % 100 == 0 {
                assert!(limiter.check_at(&huge, now).is_err(), "still limited after {i} other keys");
            }
        }
        assert!(limiter.len() <= 1_000);
    }

    #[test]
    fn drained_keys_are_dropped_as_checks_go_by() {
        let limiter = local(Limit::new(1, Duration::from_millis(1)));
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(limiter.check_at(&format!("k{i}"), t0).is_ok());
        }
        let later = t0 + Duration::from_secs(1);
        for i in 0..100 {
            assert!(limiter.check_at(&format!("fresh{i}"), later).is_ok());
        }
        // Each check dropped up to two drained keys: the old hundred are gone.
        assert!(limiter.len() <= 101, "{}", limiter.len());
    }

    #[test]
    fn retry_after_rounds_up() {
        let ApiError::RateLimited { retry_after_secs } = limited(Duration::from_millis(1_200)) else {
            unreachable!("limited answers RateLimited")
        };
        assert_eq!(retry_after_secs, 2);
    }

    #[test]
    fn client_keys() {
        assert_eq!(client_key("203.0.113.7"), "203.0.113.7");
        assert_eq!(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"));
        assert_eq!(client_key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(client_key(&"z".repeat(70_000)), "unknown");
    }
}

//! Rate limits: GCRA (a leaky bucket kept as one timestamp per key) in memory.
//!
//! Each instance counts on its own: with N instances behind a balancer an
//! attacker gets up to N times a limit. The limits here bound abuse of the
//! expensive and sensitive routes (password hashing, mail); they are not
//! quotas.
//!
//! Keys come from clients (addresses, email addresses), so they are never
//! stored as given: each is hashed to 16 bytes (a 64 KiB "email" costs what
//! a short one does), and a client address counts per /64 for IPv6 (one
//! customer line, one client) — see [`client_key`]. Each limiter holds at most
//! `max_keys` keys in least-recently-used order: every check drops up to two
//! drained keys from the old end, and a new key past the bound pushes out the
//! least recently seen one, so no check ever scans the whole table.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
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

/// One limit over many keys (an IP address, an account, both).
pub struct RateLimiter {
    limit: Limit,
    /// Per key: the theoretical arrival time of the next event.
    tat: Mutex<LruCache<Key, Instant>>,
}

/// Keys one limiter holds at most (about 7 MiB).
const MAX_KEYS: usize = 100_000;

impl RateLimiter {
    pub fn new(limit: Limit) -> Self {
        Self::with_capacity(limit, MAX_KEYS)
    }

    fn with_capacity(limit: Limit, max_keys: usize) -> Self {
        let cap = NonZeroUsize::new(max_keys).unwrap_or(NonZeroUsize::MIN);
        Self { limit, tat: Mutex::new(LruCache::new(cap)) }
    }

    /// Counts one event for `key`; `Err(retry_after)` when over the limit
    /// (the event is then not counted).
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now()).map(|_| ())
    }

    /// Counts one event for `key` before the work it guards (give it back
    /// with [`refund`](Self::refund) if it turns out not to count), so
    /// concurrent attempts cannot all pass a check made before any of them
    /// is counted. `Ok(true)` when `key` had no events counted before.
    pub fn reserve(&self, key: &str) -> Result<bool, Duration> {
        self.check_at(key, Instant::now())
    }

    /// Whether `key` is over the limit now, without counting an event.
    pub fn is_limited(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let horizon = self.limit.period.saturating_sub(self.limit.interval());
        let tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        tat.peek(&key_of(key)).and_then(|t| t.checked_duration_since(now + horizon)).filter(|d| !d.is_zero())
    }

    /// Whether any event of `key` is still counted (its bucket has not drained).
    pub fn has_events(&self, key: &str) -> bool {
        let now = Instant::now();
        let tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        tat.peek(&key_of(key)).is_some_and(|t| *t > now)
    }

    /// Gives back one event counted by [`check`](Self::check): a reservation
    /// that turned out not to be needed (a login that succeeded).
    pub fn refund(&self, key: &str) {
        let now = Instant::now();
        let key = key_of(key);
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let Some(current) = tat.peek(&key).copied() else { return };
        match current.checked_sub(self.limit.interval()).filter(|earlier| *earlier > now) {
            Some(earlier) => {
                tat.put(key, earlier);
            }
            None => {
                tat.pop(&key);
            }
        }
    }

    /// Counts one event at `now`; `Ok(fresh)` says whether the key had no
    /// live events before.
    fn check_at(&self, key: &str, now: Instant) -> Result<bool, Duration> {
        let interval = self.limit.interval();
        let horizon = self.limit.period.saturating_sub(interval);
        let key = key_of(key);
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
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
            return Err(wait);
        }
        tat.put(key, current + interval);
        Ok(live.is_none())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tat.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The error for a refused event: 429 `rate_limited` with `Retry-After`.
pub fn limited(retry_after: Duration) -> ApiError {
    metrics::counter!("plinth_rate_limited_total").increment(1);
    ApiError::RateLimited { retry_after_secs: retry_after.as_secs().max(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_steady_rate() {
        let limiter = RateLimiter::new(Limit::new(3, Duration::from_secs(3)));
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

    #[test]
    fn a_refund_gives_one_event_back() {
        let limiter = RateLimiter::new(Limit::new(2, Duration::from_secs(3600)));
        assert!(limiter.check("k").is_ok() && limiter.check("k").is_ok());
        assert!(limiter.check("k").is_err());
        limiter.refund("k");
        assert!(limiter.check("k").is_ok());
        limiter.refund("k");
        limiter.refund("k");
        assert!(!limiter.has_events("k"), "fully refunded");
    }

    #[test]
    fn keys_are_fixed_size_and_bounded_in_number() {
        // A huge key costs what a short one does: only its hash is kept.
        let limiter = RateLimiter::with_capacity(Limit::new(1, Duration::from_secs(3600)), 1_000);
        let huge = "x".repeat(64 * 1024);
        assert!(limiter.check(&huge).is_ok());
        assert!(limiter.check(&huge).is_err());
        assert_eq!(std::mem::size_of::<Key>(), 16);
        // A flood of keys never grows the table past its bound, and a key in
        // active use is not the one pushed out.
        for i in 0..5_000 {
            let _ = limiter.check(&format!("flood-{i}"));
            if i % 100 == 0 {
                assert!(limiter.check(&huge).is_err(), "still limited after {i} other keys");
            }
        }
        assert!(limiter.len() <= 1_000);
    }

    #[test]
    fn drained_keys_are_dropped_as_checks_go_by() {
        let limiter = RateLimiter::new(Limit::new(1, Duration::from_millis(1)));
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
    fn client_keys() {
        assert_eq!(client_key("203.0.113.7"), "203.0.113.7");
        assert_eq!(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"));
        assert_eq!(client_key("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(client_key(&"z".repeat(70_000)), "unknown");
    }
}

//! Rate limits: GCRA (a leaky bucket kept as one timestamp per key) in memory.
//!
//! Each instance counts on its own: with N instances behind a balancer an
//! attacker gets up to N times a limit. The limits here bound abuse of the
//! expensive and sensitive routes (password hashing, mail); they are not
//! quotas.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// One limit over many keys (an IP address, an account, both).
pub struct RateLimiter {
    limit: Limit,
    /// Per key: the theoretical arrival time of the next event.
    tat: Mutex<HashMap<String, Instant>>,
    max_keys: usize,
}

impl RateLimiter {
    pub fn new(limit: Limit) -> Self {
        Self { limit, tat: Mutex::new(HashMap::new()), max_keys: 100_000 }
    }

    /// Counts one event for `key`; `Err(retry_after)` when over the limit
    /// (the event is then not counted).
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.check_at(key, Instant::now())
    }

    /// Whether `key` is over the limit now, without counting an event.
    pub fn is_limited(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = self.limit.period.saturating_sub(self.limit.interval());
        tat.get(key).and_then(|t| t.checked_duration_since(now + horizon)).filter(|d| !d.is_zero())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let interval = self.limit.interval();
        let horizon = self.limit.period.saturating_sub(interval);
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        if tat.len() >= self.max_keys {
            // Forget keys whose buckets have drained; they would allow a full burst anyway.
            tat.retain(|_, t| *t > now);
        }
        let current = tat.get(key).copied().filter(|t| *t > now).unwrap_or(now);
        if let Some(wait) = current.checked_duration_since(now + horizon).filter(|d| !d.is_zero()) {
            return Err(wait);
        }
        tat.insert(key.to_owned(), current + interval);
        Ok(())
    }
}

/// The error for a refused event: 429 `rate_limited` with `Retry-After`.
pub fn limited(retry_after: Duration) -> ApiError {
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
}

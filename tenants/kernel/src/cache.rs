//! An in-memory cache kept honest by LISTEN/NOTIFY.
//!
//! - It is trusted only while the notification listener is connected: while
//!   disconnected every lookup misses, so a missed notification can never
//!   serve a stale value, and on (re)connect it starts empty.
//! - A lookup that raced with an invalidation does not re-insert its (maybe
//!   stale) answer: [`NotifiedCache::get`] hands out a ticket carrying the
//!   generation, and [`NotifiedCache::insert`] ignores an outdated ticket.
//! - Entries optionally expire after a TTL, and the cache starts over when it
//!   reaches its size bound, so unbounded key spaces cannot grow it forever.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct State<K, V> {
    generation: u64,
    entries: HashMap<K, (V, Instant)>,
}

pub struct NotifiedCache<K, V> {
    name: &'static str,
    state: RwLock<State<K, V>>,
    trusted: AtomicBool,
    ttl: Option<Duration>,
    max_entries: usize,
}

/// What a miss hands back, to be given to [`NotifiedCache::insert`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket(Option<u64>);

impl<K: Eq + Hash, V: Clone> NotifiedCache<K, V> {
    /// `name` labels its hits and misses in the metrics.
    pub fn new(name: &'static str, ttl: Option<Duration>, max_entries: usize) -> Self {
        Self {
            name,
            state: RwLock::new(State { generation: 0, entries: HashMap::new() }),
            trusted: AtomicBool::new(false),
            ttl,
            max_entries,
        }
    }

    /// The cached value, or a ticket for inserting the one about to be read.
    pub fn get(&self, key: &K) -> Result<V, Ticket> {
        if !self.trusted.load(Ordering::SeqCst) {
            self.count("untrusted");
            return Err(Ticket(None));
        }
        let found = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            match state.entries.get(key) {
                Some((value, at)) if self.ttl.is_none_or(|ttl| at.elapsed() < ttl) => Ok(value.clone()),
                _ => Err(Ticket(Some(state.generation))),
            }
        };
        // Counted once the lock is released.
        self.count(if found.is_ok() { "hit" } else { "miss" });
        found
    }

    fn count(&self, result: &'static str) {
        crate::counters::increment("plinth_cache_requests_total", &[("cache", self.name), ("result", result)]);
    }

    /// Caches `value` unless the cache was invalidated since `ticket` was
    /// issued (or was not trusted then).
    pub fn insert(&self, ticket: Ticket, key: K, value: V) {
        let Ticket(Some(generation)) = ticket else { return };
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.generation != generation || !self.trusted.load(Ordering::SeqCst) {
            return;
        }
        if state.entries.len() >= self.max_entries {
            state.entries.clear();
        }
        state.entries.insert(key, (value, Instant::now()));
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.remove_where(|_, _| true);
    }

    /// Forgets the entries matching `stale`.
    pub fn remove_where(&self, stale: impl Fn(&K, &V) -> bool) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        state.generation += 1;
        state.entries.retain(|k, (v, _)| !stale(k, v));
    }

    /// Called with the listener's state: trusted while connected. Either way
    /// the cache starts over.
    pub fn set_trusted(&self, trusted: bool) {
        self.trusted.store(trusted, Ordering::SeqCst);
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_caches_nothing_and_stale_tickets_are_ignored() {
        let cache: NotifiedCache<&str, u32> = NotifiedCache::new("test", None, 10);
        let ticket = cache.get(&"a").unwrap_err();
        cache.insert(ticket, "a", 1);
        assert!(cache.get(&"a").is_err(), "not trusted: nothing cached");

        cache.set_trusted(true);
        let ticket = cache.get(&"a").unwrap_err();
        cache.clear(); // a notification arrives while the value is being read
        cache.insert(ticket, "a", 1);
        assert!(cache.get(&"a").is_err(), "a stale answer is not cached");

        let ticket = cache.get(&"a").unwrap_err();
        cache.insert(ticket, "a", 1);
        assert_eq!(cache.get(&"a").ok(), Some(1));
        cache.remove_where(|_, v| *v == 1);
        assert!(cache.get(&"a").is_err());
        cache.set_trusted(false);
        assert!(cache.get(&"a").is_err());
    }

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let cache: NotifiedCache<u32, u32> = NotifiedCache::new("test", Some(Duration::ZERO), 2);
        cache.set_trusted(true);
        let t = cache.get(&1).unwrap_err();
        cache.insert(t, 1, 1);
        assert!(cache.get(&1).is_err(), "expired at once");

        let cache: NotifiedCache<u32, u32> = NotifiedCache::new("test", None, 2);
        cache.set_trusted(true);
        for k in 0..3 {
            let t = cache.get(&k).unwrap_err();
            cache.insert(t, k, k);
        }
        assert!(cache.get(&0).is_err() && cache.get(&2).is_ok(), "started over at the bound");
    }
}

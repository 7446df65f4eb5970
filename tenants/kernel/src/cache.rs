//! An in-memory cache kept honest by LISTEN/NOTIFY.
//!
//! - It is trusted only while the notification listener is connected: while
//!   disconnected every lookup misses, so a missed notification can never
//!   serve a stale value, and on (re)connect it starts empty.
//! - A lookup that raced with an invalidation does not re-insert its (maybe
//!   stale) answer: [`NotifiedCache::get`] hands out a ticket carrying the
//!   generation, and [`NotifiedCache::insert`] ignores an outdated ticket.
//! - Entries optionally expire after a TTL, and the cache holds at most its
//!   size bound: a new entry past it pushes out the least recently used one,
//!   so a flood of new keys (random bearer tokens) cannot grow it, and
//!   entries in use (live sessions) stay while the flood's one-off keys go.
//! - Each entry lives from half the TTL to the whole of it, by its key's
//!   hash. Entries cached together (every live session, after a restart or
//!   a reconnect of the listener) would otherwise all expire together,
//!   every TTL, and send their lookups to the database in one burst: at ten
//!   thousand tenants such a burst of 9,661 session lookups fell into one
//!   round of `bench_scale` (`docs/benchmarks.md`).

use std::hash::{DefaultHasher, Hash, Hasher as _};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;

struct State<K, V> {
    generation: u64,
    /// Each value with the moment it expires, if it does.
    entries: LruCache<K, (V, Option<Instant>)>,
}

pub struct NotifiedCache<K, V> {
    name: &'static str,
    state: Mutex<State<K, V>>,
    trusted: AtomicBool,
    ttl: Option<Duration>,
}

/// What a miss hands back, to be given to [`NotifiedCache::insert`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket(Option<u64>);

impl<K: Eq + Hash + Clone, V: Clone> NotifiedCache<K, V> {
    /// `name` labels its hits and misses in the metrics.
    pub fn new(name: &'static str, ttl: Option<Duration>, max_entries: usize) -> Self {
        let cap = NonZeroUsize::new(max_entries).unwrap_or(NonZeroUsize::MIN);
        Self {
            name,
            state: Mutex::new(State { generation: 0, entries: LruCache::new(cap) }),
            trusted: AtomicBool::new(false),
            ttl,
        }
    }

    /// The cached value, or a ticket for inserting the one about to be read.
    pub fn get(&self, key: &K) -> Result<V, Ticket> {
        if !self.trusted.load(Ordering::SeqCst) {
            self.count("untrusted");
            return Err(Ticket(None));
        }
        let found = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let generation = state.generation;
            match state.entries.get(key) {
                Some((value, expires)) if expires.is_none_or(|at| Instant::now() < at) => Ok(value.clone()),
                _ => Err(Ticket(Some(generation))),
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
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.generation != generation || !self.trusted.load(Ordering::SeqCst) {
            return;
        }
        let expires = self.ttl.map(|ttl| Instant::now() + lifetime(ttl, &key));
        // Past the bound, the least recently used entry makes room.
        state.entries.put(key, (value, expires));
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.remove_where(|_, _| true);
    }

    /// Forgets the entries matching `stale`.
    pub fn remove_where(&self, stale: impl Fn(&K, &V) -> bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.generation += 1;
        if state.entries.iter().all(|(k, (v, _))| stale(k, v)) {
            state.entries.clear();
            return;
        }
        let gone: Vec<K> = state.entries.iter().filter(|(k, (v, _))| stale(k, v)).map(|(k, _)| k.clone()).collect();
        for key in gone {
            state.entries.pop(&key);
        }
    }

    /// Called with the listener's state: trusted while connected. Either way
    /// the cache starts over.
    pub fn set_trusted(&self, trusted: bool) {
        self.trusted.store(trusted, Ordering::SeqCst);
        self.clear();
    }
}

/// How long `key`'s entry lives: `ttl` times a factor from 0.5 to 1
/// chosen by the key's hash (SipHash with fixed keys, so the same for the
/// same key), which spreads the expiry of entries cached at one moment
/// over half a TTL and never keeps one longer than the TTL.
fn lifetime<K: Hash>(ttl: Duration, key: &K) -> Duration {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    let spread = (hasher.finish() % 1024) as f64 / 1024.0;
    ttl.mul_f64(1.0 - 0.5 * spread)
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

    /// A thousand entries cached at one moment expire over half a TTL, not
    /// all at once, and none lives longer than the TTL.
    #[test]
    fn entries_cached_together_do_not_expire_together() {
        let ttl = Duration::from_secs(60);
        let cache: NotifiedCache<u32, u32> = NotifiedCache::new("test", Some(ttl), 2_000);
        cache.set_trusted(true);
        let before = Instant::now();
        for k in 0..1_000 {
            let t = cache.get(&k).unwrap_err();
            cache.insert(t, k, k);
        }
        let after = Instant::now();
        let state = cache.state.lock().unwrap();
        let expiries: Vec<Instant> = state.entries.iter().map(|(_, (_, at))| at.unwrap()).collect();
        assert_eq!(expiries.len(), 1_000);
        let (first, last) = (*expiries.iter().min().unwrap(), *expiries.iter().max().unwrap());
        assert!(first >= before + ttl / 2, "none lives under half the TTL");
        assert!(last <= after + ttl, "none lives longer than the TTL");
        assert!(last - first >= ttl.mul_f64(0.45), "expiries spread over {:?} only", last - first);
    }

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let cache: NotifiedCache<u32, u32> = NotifiedCache::new("test", Some(Duration::ZERO), 2);
        cache.set_trusted(true);
        let t = cache.get(&1).unwrap_err();
        cache.insert(t, 1, 1);
        assert!(cache.get(&1).is_err(), "expired at once");

        let cache: NotifiedCache<u32, u32> = NotifiedCache::new("test", None, 3);
        cache.set_trusted(true);
        for k in 0..3 {
            let t = cache.get(&k).unwrap_err();
            cache.insert(t, k, k);
        }
        // 0 is in use; 1 and 2 were seen once.
        assert_eq!(cache.get(&0).ok(), Some(0));
        for k in 100..10_000 {
            let t = cache.get(&k).unwrap_err();
            cache.insert(t, k, k);
            assert_eq!(cache.get(&0).ok(), Some(0), "the entry in use stays through a flood of new keys");
        }
        assert!(cache.get(&1).is_err() && cache.get(&2).is_err(), "the least recently used went first");
        assert_eq!(cache.get(&9_999).ok(), Some(9_999), "the newest is kept");
    }
}

//! Tenant affinity: a tenant's work goes to the same pooled connection
//! whenever it can.
//!
//! The first time a PostgreSQL backend meets a tenant it loads that
//! tenant's relations into its catalog caches and prepares the tenant's read
//! (see [`crate::db::Db::tenant_read`]): several times the cost of the read
//! itself (`docs/benchmarks.md`, ten thousand tenants). Handed out at random,
//! a pool over thousands of tenants almost never gives a request a backend
//! that has met its tenant, and every backend grows toward holding them all.
//!
//! So each of the pool's connections sits in a lane, one per lane, and
//! every tenant has a home lane (its id, hashed). Tenant work takes, in this
//! order:
//!
//! 1. its home lane, when free;
//! 2. a free lane whose connection has already served this tenant;
//! 3. its home lane or any lane that has served the tenant, whichever is
//!    handed to it first, waiting for at most
//!    [`crate::db::DbConfig::spill_after`] (`PLINTH_DB_SPILL_AFTER_MS`);
//! 4. then any lane: a free one at once, else the first to be released to
//!    it. Work spills over rather than queue behind a long transaction (or
//!    its own caller, when work on a tenant nests) while other connections
//!    stand idle.
//!
//! Except that work finding the same tenant's work already queued (step 3)
//! takes any lane at once (step 4, counted as `spread`): the lanes that know
//! the tenant are too few for it. Without this, one busy tenant's reads all
//! queued for the one backend of its home lane, however many stood idle,
//! since a queue of sub-millisecond reads never waits the spill time. A
//! backend that serves it once is warm for it from then on (step 2), so a
//! busy tenant spreads over as many lanes as its load needs; over many
//! quiet tenants a tenant rarely has two reads at once, and reads keep to
//! their home lanes.
//!
//! A backend so meets about (tenants ÷ lanes) tenants and stays warm for
//! them.
//! Platform work (the public schema, the same for every tenant) takes a
//! connection from the pool when one is free, else borrows a free lane's,
//! else waits for either.
//!
//! Waiting work queues, first come first served. A released lane goes
//! straight to the first waiter that takes it (steps 3 and 4; platform work
//! takes a lane with a connection in it), and is free only when none does:
//! one release wakes one waiter, and work that arrives later does not
//! overtake work that waits.
//!
//! A lane keeps its connection between uses. One that comes back broken,
//! inside a transaction, or worn out ([`crate::pool::Manager::keeps`]) goes
//! back to the pool, which retires it; the lane takes another next time.
//!
//! Hand-written: connection pools hand out any idle connection, and none of
//! the Rust ones (deadpool, bb8, mobc) lets the caller ask for a particular
//! one.

use std::collections::VecDeque;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use deadpool::managed::{Object, Pool, TimeoutType};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::db::PoolError;
use crate::ids::TenantId;
use crate::pool::{Manager, Pooled};

/// What a lane holds: its connection, once it has one.
type Slot = Option<Object<Manager>>;

/// A lane and what it held, as taken or handed over.
type Taken = (usize, Slot);

/// Waited the pool's wait timeout in vain.
const WAITED: PoolError = PoolError::Timeout(TimeoutType::Wait);

/// The pool and its lanes, one lane per connection the pool may open.
pub(crate) struct Lanes {
    pool: Pool<Manager>,
    state: Mutex<State>,
    /// How many lanes.
    count: usize,
    wait_timeout: Duration,
    /// [`crate::db::DbConfig::spill_after`].
    spill_after: Duration,
}

/// The lanes and the work waiting for one, behind one lock: a lane is
/// released and a waiter queued under it, so none is missed.
struct State {
    /// Each lane's connection while the lane is free; `None` while taken.
    free: Box<[Option<Slot>]>,
    waiters: VecDeque<Waiter>,
    /// Numbers waiters, and spreads where platform work starts looking.
    counter: u64,
}

struct Waiter {
    id: u64,
    want: Want,
    hand: oneshot::Sender<Taken>,
}

/// Which lanes a caller takes.
#[derive(Clone, Copy)]
enum Want {
    /// Tenant work: its home lane or one that has served it, or, once it
    /// has waited [`Lanes::spill_after`], `any` lane.
    Tenant { tenant: TenantId, home: usize, any: bool },
    /// Platform work: a lane with a connection in it.
    Platform,
}

impl Want {
    fn takes(self, lane: usize, slot: &Slot) -> bool {
        match self {
            Self::Tenant { any: true, .. } => true,
            Self::Tenant { tenant, home, any: false } => {
                lane == home || slot.as_deref().is_some_and(|c| c.has_served(tenant))
            }
            Self::Platform => slot.is_some(),
        }
    }
}

impl State {
    /// Takes `lane` if it is free.
    fn take(&mut self, lane: usize) -> Option<Taken> {
        self.free[lane].take().map(|slot| (lane, slot))
    }

    /// Takes the first free lane from `start` on (wrapping round) that
    /// `want` takes.
    fn take_wanted(&mut self, want: Want, start: usize) -> Option<Taken> {
        let lanes = self.free.len();
        let lane = (start..start + lanes)
            .map(|i| i % lanes)
            .find(|&lane| self.free[lane].as_ref().is_some_and(|slot| want.takes(lane, slot)))?;
        self.take(lane)
    }

    /// Whether work on `tenant` is already waiting.
    fn waiting_for(&self, tenant: TenantId) -> bool {
        self.waiters.iter().any(|w| matches!(w.want, Want::Tenant { tenant: t, .. } if t == tenant))
    }

    fn queue(&mut self, want: Want) -> (u64, oneshot::Receiver<Taken>) {
        let (hand, handed) = oneshot::channel();
        self.counter += 1;
        self.waiters.push_back(Waiter { id: self.counter, want, hand });
        (self.counter, handed)
    }
}

impl Lanes {
    pub(crate) fn new(pool: Pool<Manager>, wait_timeout: Duration, spill_after: Duration) -> Self {
        let lanes = pool.status().max_size.max(1);
        Self {
            pool,
            state: Mutex::new(State {
                free: (0..lanes).map(|_| Some(None)).collect(),
                waiters: VecDeque::new(),
                counter: 0,
            }),
            count: lanes,
            wait_timeout,
            spill_after,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; were it poisoned, the state is
        // still whole (each change under it is one assignment).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pool's counts, with connections resting in a free lane counted
    /// as idle (the pool itself counts them as in use), and tenant work
    /// waiting for a lane counted as waiting (platform work waits on the
    /// pool too, which counts it).
    pub(crate) fn status(&self) -> deadpool::Status {
        let mut status = self.pool.status();
        let state = self.state();
        status.available += state.free.iter().filter(|slot| matches!(slot, Some(Some(_)))).count();
        status.waiting += state.waiters.iter().filter(|w| matches!(w.want, Want::Tenant { .. })).count();
        status
    }

    /// Closes one connection that rests idle here, in the pool or in a
    /// free lane, to make room in the [`crate::pool::Budget`]; `false` if
    /// none does.
    pub(crate) fn close_idle(&self) -> bool {
        let mut first = true;
        if !self.pool.retain(|_, _| !std::mem::take(&mut first)).removed.is_empty() {
            return true;
        }
        let resting = self.state().free.iter_mut().find_map(|slot| match slot {
            Some(held @ Some(_)) => held.take(),
            _ => None,
        });
        resting.map(|object| drop(Object::take(object))).is_some()
    }

    /// A connection for work on `tenant`'s data (see the module docs).
    pub(crate) async fn tenant(self: &Arc<Self>, tenant: TenantId) -> Result<Checkout, PoolError> {
        let deadline = Instant::now() + self.wait_timeout;
        let home = self.home(tenant);
        let want = Want::Tenant { tenant, home, any: false };
        let found = {
            let mut state = self.state();
            if let Some(taken) = state.take(home) {
                Found::Free(taken, "home")
            } else if let Some(taken) = state.take_wanted(want, home) {
                Found::Free(taken, "warm")
            } else if state.waiting_for(tenant) {
                // Its own work already queues: the lanes that know it are
                // too few for it. Any lane, at once if one is free.
                let want = Want::Tenant { tenant, home, any: true };
                match state.take_wanted(want, home) {
                    Some(taken) => Found::Free(taken, "spread"),
                    None => Found::QueuedForAny(state.queue(want)),
                }
            } else {
                Found::QueuedForOwn(state.queue(want))
            }
        };
        let (taken, how) = match found {
            Found::Free(taken, how) => (taken, how),
            // Boxed, both waits: their timers would make most of the
            // checkout's future, which stays small when a lane is free.
            Found::QueuedForAny((id, handed)) => {
                let wait = async move { Waiting { lanes: self, id, handed }.until(deadline).await };
                (Box::pin(wait).await?, "spread")
            }
            Found::QueuedForOwn((id, handed)) => {
                Box::pin(self.queued(Waiting { lanes: self, id, handed }, home, deadline)).await?
            }
        };
        crate::counters::increment("plinth_db_lane_checkouts_total", &[("lane", how)]);
        self.filled(taken).await
    }

    /// Tenant work's wait in the queue: for its own lanes until it has
    /// waited [`Lanes::spill_after`], then for any.
    async fn queued(
        &self,
        mut waiting: Waiting<'_>,
        home: usize,
        deadline: Instant,
    ) -> Result<(Taken, &'static str), PoolError> {
        let spill_at = (Instant::now() + self.spill_after).min(deadline);
        // A lane handed over is taken, even at the moment of spilling.
        Ok(tokio::select! {
            biased;
            taken = &mut waiting.handed => (taken.map_err(|_| WAITED)?, "wait"),
            () = tokio::time::sleep_until(spill_at) => match waiting.spill(home) {
                Some(taken) => (taken, "spill"),
                None => (waiting.until(deadline).await?, "spill"),
            },
        })
    }

    /// A connection for platform work: from the pool, or borrowed from a
    /// free lane, whichever comes first.
    pub(crate) async fn platform(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        let deadline = Instant::now() + self.wait_timeout;
        let mut at_once = self.pool.timeouts();
        at_once.wait = Some(Duration::ZERO);
        match Box::pin(self.pool.timeout_get(&at_once)).await {
            Ok(object) => return Ok(Checkout { held: Held::Pool(object) }),
            Err(PoolError::Timeout(TimeoutType::Wait)) => {}
            Err(err) => return Err(err),
        }
        let queued = {
            let mut state = self.state();
            // Looking from a different lane each time spreads the borrowing.
            let start = (state.counter % state.free.len() as u64) as usize;
            state.counter += 1;
            state.take_wanted(Want::Platform, start).ok_or_else(|| state.queue(Want::Platform))
        };
        let taken = match queued {
            Ok(taken) => taken,
            Err((id, handed)) => {
                let mut waiting = Waiting { lanes: self, id, handed };
                tokio::select! {
                    object = Box::pin(self.pool.get()) => return Ok(Checkout { held: Held::Pool(object?) }),
                    taken = waiting.until(deadline) => taken?,
                }
            }
        };
        self.filled(taken).await
    }

    fn home(&self, tenant: TenantId) -> usize {
        // SipHash with fixed keys: the same lane in every worker and process.
        let mut hasher = DefaultHasher::new();
        tenant.hash(&mut hasher);
        (hasher.finish() % self.count as u64) as usize
    }

    /// Hands out the lane, after taking a connection from the pool for it if
    /// it has none.
    async fn filled(self: &Arc<Self>, (lane, slot): Taken) -> Result<Checkout, PoolError> {
        // The checkout exists before the wait, so that the lane is released
        // however this ends.
        let mut checkout = Checkout { held: Held::Lane { lane, slot, lanes: Arc::clone(self) } };
        if let Held::Lane { slot, .. } = &mut checkout.held {
            if slot.as_deref_mut().is_some_and(Manager::broken) {
                // It died while its lane rested (the server restarted, or
                // ended the backend): back to the pool, which retires it.
                *slot = None;
            }
            if slot.is_none() {
                // Boxed, as is every wait on the pool here: the pool's
                // future is about 2 KiB, and inline it would make every
                // checkout's future that much larger to move, though a lane
                // rarely needs it.
                *slot = Some(Box::pin(self.pool.get()).await?);
            }
        }
        Ok(checkout)
    }

    /// Gives `lane` back: to the first waiter that takes it, else free.
    fn release(&self, lane: usize, mut slot: Slot) {
        if let Some(object) = slot.as_mut() {
            let age = Object::metrics(object).age();
            if std::thread::panicking() || self.pool.manager().keeps(object, age).is_err() {
                // Back to the pool, whose recycling retires it (and counts
                // why); outside the lock.
                slot = None;
            }
        }
        let mut state = self.state();
        let mut taken = (lane, slot);
        while let Some(i) = state.waiters.iter().position(|w| w.want.takes(lane, &taken.1)) {
            let Some(waiter) = state.waiters.remove(i) else { break };
            match waiter.hand.send(taken) {
                Ok(()) => return,
                // It gave up waiting a moment ago.
                Err(back) => taken = back,
            }
        }
        state.free[lane] = Some(taken.1);
    }
}

/// How tenant work found a lane: free at once (and how), or a place in the
/// queue ([`State::queue`]) for its own lanes or for any.
#[allow(
    clippy::large_enum_variant,
    reason = "made and taken apart at once in `Lanes::tenant`; boxing would allocate on every checkout"
)]
enum Found {
    Free(Taken, &'static str),
    QueuedForOwn((u64, oneshot::Receiver<Taken>)),
    QueuedForAny((u64, oneshot::Receiver<Taken>)),
}

/// A place in the queue of [`Lanes`]. Dropped, it leaves the queue, and
/// passes on a lane it was handed but did not take.
struct Waiting<'a> {
    lanes: &'a Lanes,
    id: u64,
    handed: oneshot::Receiver<Taken>,
}

impl Waiting<'_> {
    /// Tenant work that has waited long enough for its own lanes: takes
    /// any free lane now, or from here on waits for any.
    fn spill(&mut self, from: usize) -> Option<Taken> {
        let mut state = self.lanes.state();
        // Out of the queue: it was handed a lane a moment ago, which
        // `until` receives at once.
        let i = state.waiters.iter().position(|w| w.id == self.id)?;
        let want = &mut state.waiters[i].want;
        if let Want::Tenant { any, .. } = want {
            *any = true;
        }
        let want = *want;
        let taken = state.take_wanted(want, from)?;
        state.waiters.remove(i);
        Some(taken)
    }

    /// The lane handed to this waiter, if one is by `deadline`.
    async fn until(&mut self, deadline: Instant) -> Result<Taken, PoolError> {
        // A lane handed over is taken, even at the deadline.
        tokio::select! {
            biased;
            taken = &mut self.handed => taken.map_err(|_| WAITED),
            () = tokio::time::sleep_until(deadline) => Err(WAITED),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.lanes.state();
        if let Some(i) = state.waiters.iter().position(|w| w.id == self.id) {
            state.waiters.remove(i);
            return;
        }
        drop(state);
        if let Ok((lane, slot)) = self.handed.try_recv() {
            self.lanes.release(lane, slot);
        }
    }
}

/// A connection handed out by [`Lanes`]: from the pool, or a lane's.
/// Dereferences to the [`Pooled`] connection.
pub struct Checkout {
    held: Held,
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per checkout, held for a transaction; boxing would allocate on every one"
)]
enum Held {
    Pool(Object<Manager>),
    /// A lane, with its connection in `slot` (an `Option` only so that
    /// dropping can hand it back).
    Lane {
        lane: usize,
        slot: Slot,
        lanes: Arc<Lanes>,
    },
}

impl std::ops::Deref for Checkout {
    type Target = Pooled;

    fn deref(&self) -> &Pooled {
        match &self.held {
            Held::Pool(object) => object,
            Held::Lane { slot: Some(object), .. } => object,
            Held::Lane { slot: None, .. } => unreachable!("a lane is handed out with a connection in it"),
        }
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut Pooled {
        match &mut self.held {
            Held::Pool(object) => object,
            Held::Lane { slot: Some(object), .. } => object,
            Held::Lane { slot: None, .. } => unreachable!("a lane is handed out with a connection in it"),
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Held::Lane { lane, slot, lanes } = &mut self.held {
            lanes.release(*lane, slot.take());
        }
    }
}

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
//! 3. its home lane, waiting for it in turn, or any lane that has served
//!    the tenant, whichever comes free first, for at most
//!    [`crate::db::DbConfig::spill_after`] (`PLINTH_DB_SPILL_AFTER_MS`);
//! 4. then the first lane to come free, whichever it is: work spills over
//!    rather than queue behind a long transaction (or its own caller, when
//!    work on a tenant nests) while other connections stand idle.
//!
//! A backend so meets about (tenants ÷ lanes) tenants and stays warm for
//! them. A busy tenant spills over after a short wait, and then finds the
//! lanes it spilled to warm (step 2).
//! Platform work (the public schema, the same for every tenant) takes a
//! connection from the pool when one is free, else borrows a free lane's,
//! else waits for either.
//!
//! A lane keeps its connection between uses. One that comes back broken,
//! inside a transaction, or worn out ([`crate::pool::Manager::keeps`]) goes
//! back to the pool, which retires it; the lane takes another next time.
//!
//! Hand-written: connection pools hand out any idle connection, and none of
//! the Rust ones (deadpool, bb8, mobc) lets the caller ask for a particular
//! one.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{Object, Pool, TimeoutType};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::db::PoolError;
use crate::ids::TenantId;
use crate::pool::{Manager, Pooled};

type Slot = Option<Object<Manager>>;

/// What [`Lanes::first_free`] found.
#[allow(clippy::large_enum_variant, reason = "short-lived, one per checkout; boxing would allocate on every one")]
enum Free {
    Lane(OwnedMutexGuard<Slot>),
    Pool(Object<Manager>),
}

/// Waited the pool's wait timeout in vain.
const WAITED: PoolError = PoolError::Timeout(TimeoutType::Wait);

/// The pool and its lanes, one lane per connection the pool may open.
pub(crate) struct Lanes {
    pool: Pool<Manager>,
    slots: Box<[Arc<Mutex<Slot>>]>,
    /// Told whenever a lane is released, for work waiting for any lane.
    released: Notify,
    wait_timeout: Duration,
    /// [`crate::db::DbConfig::spill_after`].
    spill_after: Duration,
}

impl Lanes {
    pub(crate) fn new(pool: Pool<Manager>, wait_timeout: Duration, spill_after: Duration) -> Self {
        let lanes = pool.status().max_size.max(1);
        Self {
            pool,
            slots: (0..lanes).map(|_| Arc::new(Mutex::new(None))).collect(),
            released: Notify::new(),
            wait_timeout,
            spill_after,
        }
    }

    /// The pool's counts, with connections resting in a free lane counted
    /// as idle (the pool itself counts them as in use).
    pub(crate) fn status(&self) -> deadpool::Status {
        let mut status = self.pool.status();
        let resting =
            self.slots.iter().filter(|slot| slot.try_lock().is_ok_and(|connection| connection.is_some())).count();
        // Looking held each lane for a moment: whoever found one busy
        // because of it and now waits for a release must look again.
        self.released.notify_waiters();
        status.available += resting;
        status
    }

    /// A connection for work on `tenant`'s data (see the module docs).
    pub(crate) async fn tenant(self: &Arc<Self>, tenant: TenantId) -> Result<Checkout, PoolError> {
        let deadline = Instant::now() + self.wait_timeout;
        let home = self.home(tenant);
        let (guard, how) = if let Some(guard) = self.try_lane(home) {
            (guard, "home")
        } else if let Some(guard) = self.free_lane(|slot| slot.as_deref().is_some_and(|c| c.has_served(tenant))) {
            (guard, "warm")
        } else if let Some(guard) = self.home_or_warm(home, tenant).await {
            (guard, "wait")
        } else {
            match self.first_free(deadline, |_| true, false).await? {
                Free::Lane(guard) => (guard, "spill"),
                Free::Pool(object) => return Ok(Checkout { held: Held::Pool(object) }),
            }
        };
        crate::counters::increment("plinth_db_lane_checkouts_total", &[("lane", how)]);
        self.filled(guard).await
    }

    /// Waits, up to [`crate::db::DbConfig::spill_after`], for `tenant`'s home
    /// lane (in turn) or any lane that has served it, whichever comes free
    /// first.
    async fn home_or_warm(&self, home: usize, tenant: TenantId) -> Option<OwnedMutexGuard<Slot>> {
        let until = Instant::now() + self.spill_after.min(self.wait_timeout);
        let home = Arc::clone(&self.slots[home]).lock_owned();
        let released = self.released.notified();
        tokio::pin!(home, released);
        loop {
            // Registered before looking, so a lane released from here on
            // wakes this caller.
            released.as_mut().enable();
            if let Some(guard) = self.free_lane(|slot| slot.as_deref().is_some_and(|c| c.has_served(tenant))) {
                return Some(guard);
            }
            tokio::select! {
                guard = &mut home => return Some(guard),
                () = released.as_mut() => released.set(self.released.notified()),
                () = tokio::time::sleep_until(until) => return None,
            }
        }
    }

    /// A connection for platform work: from the pool, or borrowed from a
    /// free lane, whichever comes first.
    pub(crate) async fn platform(self: &Arc<Self>) -> Result<Checkout, PoolError> {
        let deadline = Instant::now() + self.wait_timeout;
        match self.first_free(deadline, Option::is_some, true).await? {
            Free::Lane(guard) => self.filled(guard).await,
            Free::Pool(object) => Ok(Checkout { held: Held::Pool(object) }),
        }
    }

    /// Waits until `deadline` for the first free lane whose slot passes
    /// `wanted` or, with `from_pool`, a connection from the pool.
    async fn first_free(
        &self,
        deadline: Instant,
        wanted: fn(&Slot) -> bool,
        from_pool: bool,
    ) -> Result<Free, PoolError> {
        let mut at_once = self.pool.timeouts();
        at_once.wait = Some(Duration::ZERO);
        let released = self.released.notified();
        tokio::pin!(released);
        loop {
            // Registered before looking, so a lane released from here on
            // wakes this caller.
            released.as_mut().enable();
            if from_pool {
                match self.pool.timeout_get(&at_once).await {
                    Ok(object) => return Ok(Free::Pool(object)),
                    Err(PoolError::Timeout(TimeoutType::Wait)) => {}
                    Err(err) => return Err(err),
                }
            }
            if let Some(guard) = self.free_lane(wanted) {
                return Ok(Free::Lane(guard));
            }
            let pooled = async { if from_pool { self.pool.get().await } else { std::future::pending().await } };
            tokio::select! {
                object = pooled => return Ok(Free::Pool(object?)),
                () = released.as_mut() => released.set(self.released.notified()),
                () = tokio::time::sleep_until(deadline) => return Err(WAITED),
            }
        }
    }

    fn home(&self, tenant: TenantId) -> usize {
        // SipHash with fixed keys: the same lane in every worker and process.
        let mut hasher = DefaultHasher::new();
        tenant.hash(&mut hasher);
        (hasher.finish() % self.slots.len() as u64) as usize
    }

    fn try_lane(&self, lane: usize) -> Option<OwnedMutexGuard<Slot>> {
        Arc::clone(&self.slots[lane]).try_lock_owned().ok()
    }

    /// The first free lane whose slot passes `wanted`.
    fn free_lane(&self, wanted: impl Fn(&Slot) -> bool) -> Option<OwnedMutexGuard<Slot>> {
        (0..self.slots.len()).find_map(|lane| self.try_lane(lane).filter(|guard| wanted(guard)))
    }

    /// Hands out the lane, after taking a connection from the pool for it if
    /// it has none.
    async fn filled(self: &Arc<Self>, guard: OwnedMutexGuard<Slot>) -> Result<Checkout, PoolError> {
        // The checkout exists before the wait, so that the lane is released
        // (and platform work told) however this ends.
        let mut checkout = Checkout { held: Held::Lane { slot: Some(guard), lanes: Arc::clone(self) } };
        if let Held::Lane { slot: Some(slot), .. } = &mut checkout.held
            && slot.is_none()
        {
            **slot = Some(self.pool.get().await?);
        }
        Ok(checkout)
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
    /// The lane's lock (an `Option` only so that dropping can release it
    /// before telling waiters), with a connection in it.
    Lane {
        slot: Option<OwnedMutexGuard<Slot>>,
        lanes: Arc<Lanes>,
    },
}

impl std::ops::Deref for Checkout {
    type Target = Pooled;

    fn deref(&self) -> &Pooled {
        match &self.held {
            Held::Pool(object) => object,
            Held::Lane { slot, .. } => match slot.as_deref() {
                Some(Some(object)) => object,
                _ => unreachable!("a lane is handed out with a connection in it"),
            },
        }
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut Pooled {
        match &mut self.held {
            Held::Pool(object) => object,
            Held::Lane { slot, .. } => match slot.as_deref_mut() {
                Some(Some(object)) => object,
                _ => unreachable!("a lane is handed out with a connection in it"),
            },
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Held::Lane { slot, lanes } = &mut self.held else { return };
        let Some(mut guard) = slot.take() else { return };
        let keep = match guard.as_mut() {
            Some(object) => {
                let age = Object::metrics(object).age();
                !std::thread::panicking() && lanes.pool.manager().keeps(object, age).is_ok()
            }
            None => true,
        };
        if !keep {
            // Back to the pool, whose recycling retires it (and counts why).
            guard.take();
        }
        drop(guard);
        lanes.released.notify_waiters();
    }
}

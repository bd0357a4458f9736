//! The forwarder: a background worker that moves committed outbox rows to
//! Redis and owns the task timers (retries, leases, sweep).
//!
//! It sleeps on its latch. Committing transactions that wrote events set that
//! latch (see `events.rs`); the timers set the latch timeout to the next
//! deadline stored in the tables. Idle means no SQL, no Redis traffic.
use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};
use std::time::Duration;

mod floor;
mod notify;
mod redis_sink;
mod transaction;
mod worker;

/// The name the worker has in `pg_stat_activity.backend_type`.
pub const BACKEND_TYPE: &str = "synapse forwarder";

const ERROR_CAPACITY: usize = 512;

/// What the forwarder reports through `synapse.forwarder_status()`.
#[derive(Clone, Copy)]
pub struct ForwarderState {
    /// The last Redis round trip succeeded.
    pub redis_connected: bool,
    /// Events acknowledged by Redis since the server started.
    pub forwarded_total: u64,
    /// `TimestampTz` of the last forwarded batch; 0 when none yet.
    pub last_forward_at: i64,
    last_error: [u8; ERROR_CAPACITY],
    last_error_len: usize,
}

impl ForwarderState {
    const fn new() -> Self {
        Self {
            redis_connected: false,
            forwarded_total: 0,
            last_forward_at: 0,
            last_error: [0; ERROR_CAPACITY],
            last_error_len: 0,
        }
    }

    /// The last error, if the last attempt failed.
    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len]).into_owned())
    }

    fn set_last_error(&mut self, error: Option<&str>) {
        let bytes = error.unwrap_or_default().as_bytes();
        let mut len = bytes.len().min(ERROR_CAPACITY);
        // Never cut a UTF-8 character in half.
        while len > 0 && !error.unwrap_or_default().is_char_boundary(len) {
            len -= 1;
        }
        self.last_error[..len].copy_from_slice(&bytes[..len]);
        self.last_error_len = len;
    }
}

// SAFETY: plain data, no pointers.
unsafe impl PGRXSharedMemory for ForwarderState {}

static STATE: PgLwLock<ForwarderState> = unsafe { PgLwLock::new(c"synapse_forwarder_state") };
/// `pgprocno` of the running forwarder, or -1: whose latch a commit sets.
static LATCH_OWNER: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"synapse_forwarder_procno") };
/// Set by [`wake`] before it sets the latch: Postgres sets the latch of an idle
/// process for its own reasons too (to catch up with cache invalidations, say),
/// and those wake-ups must not cost a turn.
static WAKE_REQUESTED: PgAtomic<AtomicBool> =
    unsafe { PgAtomic::new(c"synapse_forwarder_wake_requested") };
/// Set by [`wake_soon`] (a commit whose events dispatch nothing): the
/// forwarder takes such commits together, [`OBSERVED_WITHIN`] after the first.
static SOON_REQUESTED: PgAtomic<AtomicBool> =
    unsafe { PgAtomic::new(c"synapse_forwarder_soon_requested") };

/// How long events that dispatch no work (those only observers read) may wait
/// for the forwarder, so that the commits of a busy stretch (a chain's steps,
/// a fan-in's parents) share a turn instead of costing one each.
pub const OBSERVED_WITHIN: Duration = Duration::from_millis(5);

/// The earliest deadline (a `TimestampTz`) announced by a writer whose event
/// `synapse.observe` left out, not yet taken by the forwarder; `NO_DEADLINE`
/// when none.
static ANNOUNCED_DEADLINE: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"synapse_forwarder_announced_deadline") };
/// When the forwarder runs its timers next (a `TimestampTz`), or
/// `NO_DEADLINE`: only an earlier deadline needs to wake it.
static TIMERS_NEXT: PgAtomic<AtomicI64> =
    unsafe { PgAtomic::new(c"synapse_forwarder_timers_next") };
const NO_DEADLINE: i64 = i64::MAX;

/// Set in the postmaster by `_PG_init` and inherited by every backend it forks:
/// shared memory exists only when the library was preloaded.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Registers shared memory and the background worker; only while preloading.
pub fn register() {
    pg_shmem_init!(STATE = ForwarderState::new());
    pg_shmem_init!(LATCH_OWNER = AtomicI32::new(-1));
    pg_shmem_init!(WAKE_REQUESTED = AtomicBool::new(false));
    pg_shmem_init!(SOON_REQUESTED = AtomicBool::new(false));
    pg_shmem_init!(ANNOUNCED_DEADLINE = AtomicI64::new(NO_DEADLINE));
    pg_shmem_init!(TIMERS_NEXT = AtomicI64::new(NO_DEADLINE));
    PRELOADED.store(true, Ordering::Relaxed);
    BackgroundWorkerBuilder::new(BACKEND_TYPE)
        .set_type(BACKEND_TYPE)
        .set_library("synapse")
        .set_function("synapse_forwarder_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Whether shared memory and the forwarder exist in this server.
pub fn is_preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Sets the forwarder's latch. Safe to call from a commit callback: no
/// allocation, no lock, no error path.
pub fn wake() {
    if !is_preloaded() {
        return;
    }
    // Before the latch: the forwarder takes the request after its wait ends.
    WAKE_REQUESTED.get().store(true, Ordering::SeqCst);
    set_latch();
}

/// Asks the forwarder for a turn within [`OBSERVED_WITHIN`], for a commit
/// whose events dispatch nothing. Only the first such commit since the
/// forwarder's last turn sets its latch. Safe in a commit callback, as
/// [`wake`].
pub fn wake_soon() {
    if !is_preloaded() {
        return;
    }
    if !SOON_REQUESTED.get().swap(true, Ordering::SeqCst) {
        set_latch();
    }
}

fn set_latch() {
    let procno = LATCH_OWNER.get().load(Ordering::Acquire);
    if procno < 0 {
        return;
    }
    // SAFETY: `procno` was published by the forwarder from its own PGPROC and
    // indexes the fixed-size `allProcs` array; setting a latch of a process
    // that has since exited is harmless (latches live as long as the array).
    unsafe {
        let proc_global = pg_sys::ProcGlobal;
        if proc_global.is_null() {
            return;
        }
        let proc = (*proc_global).allProcs.add(procno as usize);
        pg_sys::SetLatch(&raw mut (*proc).procLatch);
    }
}

/// A timer deadline (`TimestampTz`) the forwarder would otherwise have
/// learnt from an event that was left out, announced by a transaction that
/// committed: the forwarder is woken if it would sleep past it. Safe in a
/// commit callback: atomics and a latch only.
pub fn announce_deadline(at: i64) {
    if !is_preloaded() {
        return;
    }
    // SeqCst here and in the forwarder: either it sees this deadline after
    // publishing when it sleeps until, or this sees what it published.
    ANNOUNCED_DEADLINE.get().fetch_min(at, Ordering::SeqCst);
    if at < TIMERS_NEXT.get().load(Ordering::SeqCst) {
        wake();
    }
}

/// Whether [`wake`] was called since the last call of this.
pub(crate) fn take_wake_request() -> bool {
    WAKE_REQUESTED.get().swap(false, Ordering::SeqCst)
}

/// Whether [`wake_soon`] was called since the last [`take_soon_request`].
pub(crate) fn soon_requested() -> bool {
    SOON_REQUESTED.get().load(Ordering::SeqCst)
}

/// Takes a [`wake_soon`] request: called before a turn reads the outbox, so
/// that a commit after it asks again.
pub(crate) fn take_soon_request() {
    SOON_REQUESTED.get().store(false, Ordering::SeqCst);
}

/// Takes the earliest announced deadline, if any.
pub(crate) fn take_announced_deadline() -> Option<i64> {
    let at = ANNOUNCED_DEADLINE.get().swap(NO_DEADLINE, Ordering::SeqCst);
    (at != NO_DEADLINE).then_some(at)
}

/// Publishes when the timers run next (`None`: no deadline is known).
pub(crate) fn set_timers_next(at: Option<i64>) {
    TIMERS_NEXT
        .get()
        .store(at.unwrap_or(NO_DEADLINE), Ordering::SeqCst);
}

/// A copy of the shared state, when preloaded.
pub fn state() -> Option<ForwarderState> {
    is_preloaded().then(|| *STATE.share())
}

fn update_state(f: impl FnOnce(&mut ForwarderState)) {
    f(&mut STATE.exclusive());
}

//! Waking the forwarder when events commit.
//!
//! A background worker cannot LISTEN, so instead a statement trigger on the
//! outbox arranges, once per transaction, for the forwarder's latch to be set
//! right after commit: at once when an event dispatches work, else for a turn
//! within [`forwarder::OBSERVED_WITHIN`]. A rolled-back transaction wakes nobody.
use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::cell::Cell;

use crate::forwarder;

thread_local! {
    /// Whether this transaction already has its commit wake-up registered.
    static WAKE_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Whether an event this transaction wrote dispatches work (or came from
    /// a writer that does not say): the forwarder is then woken at once.
    static DISPATCHES: Cell<bool> = const { Cell::new(false) };
    /// Set while `emit` writes events that dispatch nothing: the outbox's
    /// trigger then leaves `DISPATCHES` as it is.
    static OBSERVED_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Statement trigger on `synapse.outbox`: wake the forwarder at commit.
#[pg_trigger]
pub fn wake_forwarder_at_commit<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    register_wake(!OBSERVED_ONLY.get());
    Ok(None)
}

/// Runs `write`, which writes outbox rows none of which dispatches work:
/// their commit asks the forwarder for a turn soon rather than at once, so
/// that the commits of a busy stretch share one.
pub fn writing_observed_only<T>(write: impl FnOnce() -> T) -> T {
    /// Clears the flag however `write` ends (an error unwinds through it).
    struct Writing;
    impl Drop for Writing {
        fn drop(&mut self) {
            OBSERVED_ONLY.set(false);
        }
    }
    OBSERVED_ONLY.set(true);
    let _writing = Writing;
    write()
}

/// Whether this transaction has a commit wake-up, and whether it is at once.
#[cfg(any(test, feature = "pg_test"))]
pub fn wake_at_commit_is() -> (bool, bool) {
    (WAKE_REGISTERED.get(), DISPATCHES.get())
}

/// Registers the commit wake-up for the current transaction, at once.
pub fn wake_at_commit() {
    register_wake(true);
}

/// Registers the commit wake-up, once a transaction: at once if `dispatches`
/// or an earlier call of the transaction said so, else within
/// [`forwarder::OBSERVED_WITHIN`].
///
/// Commit and abort callbacks must never panic (that takes the server down):
/// they only touch an atomic and set a latch.
fn register_wake(dispatches: bool) {
    // The forwarder wakes itself this way too: its timers write events it
    // forwards on the next turn of its loop.
    if !forwarder::is_preloaded() {
        return;
    }
    if dispatches {
        DISPATCHES.set(true);
    }
    if WAKE_REGISTERED.with(|registered| registered.replace(true)) {
        return;
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_REGISTERED.with(|registered| registered.set(false));
        if DISPATCHES.replace(false) {
            forwarder::wake();
        } else {
            forwarder::wake_soon();
        }
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_REGISTERED.with(|registered| registered.set(false));
        DISPATCHES.set(false);
    });
}

thread_local! {
    /// The earliest deadline this transaction announces at commit, if any.
    static DEADLINE: Cell<Option<i64>> = const { Cell::new(None) };
}

/// Deadlines of the events `synapse.observe` leaves out (a lease expiry, a
/// retry's `run_at`, the end of a finished goal's retention): the forwarder
/// learns them from here instead of from the outbox, once this transaction
/// has committed (so that the timers it runs then see the rows).
#[pg_extern(name = "_timers_due", volatile, parallel_unsafe)]
pub fn timers_due(due: Option<TimestampWithTimeZone>, goals_finished: bool) {
    if !forwarder::is_preloaded() {
        return;
    }
    let mut earliest = due.map(i64::from);
    let retention = crate::gucs::retention_seconds();
    if goals_finished && retention > 0 {
        // SAFETY: reads the clock; no error path.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let end = now.saturating_add(i64::from(retention) * 1_000_000);
        earliest = Some(earliest.map_or(end, |at| at.min(end)));
    }
    let Some(at) = earliest else {
        return;
    };
    let first = DEADLINE.with(|deadline| {
        let earlier = deadline.get().map_or(at, |known| known.min(at));
        deadline.replace(Some(earlier)).is_none()
    });
    if first {
        register_xact_callback(PgXactCallbackEvent::Commit, || {
            if let Some(at) = DEADLINE.with(|deadline| deadline.take()) {
                forwarder::announce_deadline(at);
            }
        });
        register_xact_callback(PgXactCallbackEvent::Abort, || {
            DEADLINE.with(|deadline| deadline.set(None));
        });
    }
}

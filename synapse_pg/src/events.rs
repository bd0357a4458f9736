//! Waking the forwarder when events commit.
//!
//! The event rows themselves are written by the SQL triggers in `events.sql`.
//! A background worker cannot LISTEN, so instead a statement trigger on the
//! outbox arranges, once per transaction, for the forwarder's latch to be set
//! right after commit. A rolled-back transaction wakes nobody.
use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::cell::Cell;

use crate::forwarder;

thread_local! {
    /// Whether this transaction already has its commit wake-up registered.
    static WAKE_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Statement trigger on `synapse.outbox`: wake the forwarder at commit.
#[pg_trigger]
fn wake_forwarder_at_commit<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    wake_at_commit();
    Ok(None)
}

/// Registers the commit wake-up for the current transaction, once.
///
/// Commit and abort callbacks must never panic (that takes the server down):
/// they only touch an atomic and set a latch.
pub fn wake_at_commit() {
    // The forwarder wakes itself this way too: its timers write events it
    // forwards on the next turn of its loop.
    if !forwarder::is_preloaded() {
        return;
    }
    if WAKE_REGISTERED.with(|registered| registered.replace(true)) {
        return;
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        WAKE_REGISTERED.with(|registered| registered.set(false));
        forwarder::wake();
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        WAKE_REGISTERED.with(|registered| registered.set(false));
    });
}

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

thread_local! {
    /// The earliest deadline this transaction announces at commit, if any.
    static DEADLINE: Cell<Option<i64>> = const { Cell::new(None) };
}

/// Deadlines of the events `synapse.observe` leaves out (a lease expiry, a
/// retry's `run_at`, the end of a finished goal's retention): the forwarder
/// learns them from here instead of from the outbox, once this transaction
/// has committed (so that the timers it runs then see the rows).
#[pg_extern(name = "_timers_due", volatile, parallel_unsafe)]
fn timers_due(due: Option<TimestampWithTimeZone>, goals_finished: bool) {
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

/// Whether the statement running is a `COPY` into a `synapse` table: a
/// restore (see `events.sql`). Only the owner of the tables can COPY into
/// them, so this opens nothing to the users of the API. Looks at the first
/// bytes of the query text in place: the row triggers ask for every row, and
/// a copy of a long statement (a large blueprint) per row would cost more
/// than the row.
#[pg_extern(name = "_restoring", stable, parallel_safe)]
fn restoring() -> bool {
    // SAFETY: debug_query_string is the running statement's text (or NULL),
    // valid while it runs; only read here.
    let query = unsafe { pg_sys::debug_query_string };
    if query.is_null() {
        return false;
    }
    // SAFETY: a NUL-terminated string, per the above.
    let text = unsafe { std::ffi::CStr::from_ptr(query) }.to_bytes();
    is_copy_into_synapse(text)
}

/// `^\s*copy\s+synapse\.`, case-insensitively.
fn is_copy_into_synapse(text: &[u8]) -> bool {
    let text = text.trim_ascii_start();
    let Some(rest) = text
        .get(..4)
        .filter(|word| word.eq_ignore_ascii_case(b"copy"))
        .map(|_| &text[4..])
    else {
        return false;
    };
    let table = rest.trim_ascii_start();
    table.len() < rest.len() && table.len() >= 8 && table[..8].eq_ignore_ascii_case(b"synapse.")
}

#[cfg(test)]
mod tests {
    use super::is_copy_into_synapse;

    #[test]
    fn only_a_copy_into_a_synapse_table_is_a_restore() {
        assert!(is_copy_into_synapse(b"COPY synapse.tasks (id) FROM stdin;"));
        assert!(is_copy_into_synapse(b"  \n copy\tSynapse.goals FROM stdin"));
        assert!(!is_copy_into_synapse(b"COPYsynapse.tasks"));
        assert!(!is_copy_into_synapse(b"COPY public.t FROM stdin"));
        assert!(!is_copy_into_synapse(
            b"SELECT synapse.submit_plan('COPY synapse.x')"
        ));
        assert!(!is_copy_into_synapse(b"copy"));
        assert!(!is_copy_into_synapse(b""));
    }
}

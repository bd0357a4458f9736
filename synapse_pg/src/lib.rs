//! Synapse Postgres extension: schema, SQL API, event triggers and the
//! background worker that forwards committed events to Redis.
// pgrx's ErrorReport is the error type that carries a SQLSTATE across the FFI
// edge; its size does not matter there.
#![allow(clippy::result_large_err)]
use pgrx::prelude::*;

mod api;
mod error;
mod events;
mod forwarder;
mod gucs;
mod installed;
mod prepared;

::pgrx::pg_module_magic!();

extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../../sql/events.sql",
    name = "events",
    requires = [
        "schema",
        events::wake::wake_forwarder_at_commit,
        events::state::_goal_changed,
        events::state::_task_changed,
        events::written::_goals_written,
        events::written::_tasks_written
    ]
);
extension_sql_file!("../../sql/api.sql", name = "api", requires = ["events"]);
extension_sql_file!("../../sql/waits.sql", name = "waits", requires = ["api"]);
extension_sql_file!(
    "../../sql/schedules.sql",
    name = "schedules",
    requires = ["api"]
);
extension_sql_file!("../../sql/retry.sql", name = "retry", requires = ["events"]);
extension_sql_file!(
    "../../sql/timers.sql",
    name = "timers",
    requires = ["events"]
);
// Last: it sets the rights of everything created before it.
extension_sql_file!("../../sql/security.sql", name = "security", finalize);

/// Called when the library is loaded: defines the GUCs and, when preloaded,
/// registers the forwarder background worker and its shared memory.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // pg_upgrade loads libraries in binary-upgrade mode: start nothing then.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    gucs::init(preloading);
    // A cancel or statement_timeout stops a CEL evaluation between iterations.
    synapse_worker::blueprint::cel_budget::set_interrupt_probe(|| {
        // SAFETY: reads a flag the signal handlers set.
        unsafe { std::ptr::read_volatile(&raw const pg_sys::InterruptPending) != 0 }
    });
    if preloading {
        forwarder::register();
        // In the postmaster: every backend forked from it inherits the work.
        let _ = synapse_worker::blueprint::warm_up();
        // The API's plpgsql functions: loaded here once, instead of by each
        // session's first call (~1 ms each).
        // SAFETY: the postmaster loading preload libraries, as Postgres does.
        unsafe { pg_sys::load_file(c"plpgsql".as_ptr(), false) };
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Used by `cargo pgrx test` to configure the test cluster.
#[cfg(test)]
pub mod pg_test {
    /// Runs once before the tests.
    pub fn setup(_options: Vec<&str>) {}

    /// Lines appended to the test cluster's postgresql.conf.
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'synapse'",
            "synapse.database = 'pgrx_tests'",
        ]
    }
}

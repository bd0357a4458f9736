//! The forwarder's transactions: an SQL error is an answer, never an exit.
//!
//! pgrx's `BackgroundWorker::transaction` lets a Postgres ERROR unwind out of
//! the worker's main function, which ends the process (and a restart a second
//! later runs into the same error: a crash loop). Here the error is caught,
//! the transaction rolled back, and the caller decides when to try again.
use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::ffi::CStr;
use std::panic::AssertUnwindSafe;

/// Longest wait for a row or table lock. Timers skip locked rows; this only
/// bounds waits nobody foresaw, turning them into a retried error.
const LOCK_TIMEOUT: &CStr = c"5s";
/// Whatever the database sets: a forwarder statement is never cut short by
/// a limit meant for clients, only by this bound on the unforeseen.
const STATEMENT_TIMEOUT: &CStr = c"5min";
/// Only the system catalogs (every name the forwarder uses is qualified).
const SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// Runs `body` in a transaction of its own, always READ COMMITTED whatever the
/// database's default, and commits if it returns `Ok`. An ERROR raised inside
/// (or at commit) rolls back and comes back as `Err(message)`; so does `Err`
/// from `body` (converted with `From<String>`).
pub fn run<R, E>(body: impl FnOnce() -> Result<R, E>) -> Result<R, E>
where
    E: From<String>,
{
    // SAFETY: called from the worker's main loop, outside any transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        // Statements must each see what committed before them (the timers
        // read rows other transactions just wrote); set before any snapshot.
        pg_sys::XactIsoLevel = pg_sys::XACT_READ_COMMITTED as i32;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
        set_local(c"lock_timeout", LOCK_TIMEOUT);
        set_local(c"statement_timeout", STATEMENT_TIMEOUT);
        // The forwarder runs as a superuser: no schema a database's owner
        // puts on the path may capture a name its statements or timers use.
        set_local(c"search_path", SEARCH_PATH);
        Ok::<_, String>(body())
    }))
    .catch_others(|error| Err(describe(error)))
    .execute();
    match outcome {
        Ok(Ok(value)) => {
            // SAFETY: the snapshot pushed above is still the active one.
            let committed = PgTryBuilder::new(|| unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
                Ok(())
            })
            .catch_others(|error| Err(describe(error)))
            .execute();
            match committed {
                Ok(()) => Ok(value),
                Err(error) => {
                    abort();
                    Err(E::from(format!("commit failed: {error}")))
                }
            }
        }
        Ok(Err(error)) => {
            abort();
            Err(error)
        }
        Err(error) => {
            abort();
            Err(E::from(error))
        }
    }
}

/// `SET LOCAL name = value`, without SPI: an SPI statement that may write
/// gives the transaction its id, and the read floor needs the drain's id to
/// come after its read (see floor.rs).
pub fn set_local(name: &CStr, value: &CStr) {
    // SAFETY: both are NUL-terminated; an invalid value raises an ERROR,
    // which the caller's PgTryBuilder catches.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Rolls back whatever state the transaction is in (snapshots, SPI, locks).
fn abort() {
    // SAFETY: AbortCurrentTransaction copes with any transaction state,
    // including one left half-way by an ERROR.
    unsafe { pg_sys::AbortCurrentTransaction() };
}

/// The message of a caught ERROR (or panic), with its SQLSTATE.
fn describe(error: pgrx::pg_sys::panic::CaughtError) -> String {
    use pgrx::pg_sys::panic::CaughtError;
    match error {
        CaughtError::PostgresError(report)
        | CaughtError::ErrorReport(report)
        | CaughtError::RustPanic {
            ereport: report, ..
        } => {
            let code = report.sql_error_code();
            format!("{} (SQLSTATE {:?})", report.message(), code)
        }
    }
}

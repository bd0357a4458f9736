//! Every SQL statement the worker runs, one file per job. Each state change
//! is conditional on the current state; the extension's triggers turn the
//! changes into events. This file holds what they share: the error, the
//! transaction's start and its retries.
use std::time::Duration;

use deadpool_postgres::Transaction;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::FromSql;
use tokio_postgres::{IsolationLevel, Row};
use tracing::{debug, warn};

mod by_id;
// Its statement fragments serve the modules after it.
#[macro_use]
mod input;
pub mod child;
mod claim;
mod decided;
mod edges;
mod goals;
pub mod map;
pub mod open;
mod planning;
mod ready;
mod record;
pub mod wait;
mod workers;

pub use claim::*;
pub use decided::*;
pub use edges::*;
pub use goals::*;
pub use input::TaskInput;
pub use planning::*;
pub use ready::*;
pub use record::*;
pub use workers::*;

/// A database failure, and whether retrying the transaction may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres said no (or the connection broke).
    #[error("postgres: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("postgres pool: {}", crate::connection_error::describe("", .0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A row did not look as the schema promises.
    #[error("unexpected data: {0}")]
    Data(String),
    /// The worker is shutting down and records nothing more.
    #[error("the worker is stopping")]
    Stopped,
}

/// The server's message and SQLSTATE when there is one ("db error" alone says nothing).
fn describe(error: &tokio_postgres::Error) -> String {
    crate::connection_error::describe("", error)
}

impl StoreError {
    /// Postgres could not be reached at all (as opposed to refusing a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Postgres(error) => error.as_db_error().is_none(),
            StoreError::Pool(_) => true,
            StoreError::Data(_) | StoreError::Stopped => false,
        }
    }

    /// A statement this connection prepared before a column it returns
    /// changed type or collation (an extension update did it): Postgres
    /// refuses to run it again, so it must be prepared anew.
    pub fn is_stale_statement(&self) -> bool {
        let StoreError::Postgres(error) = self else {
            return false;
        };
        error.as_db_error().is_some_and(|db| {
            *db.code() == SqlState::FEATURE_NOT_SUPPORTED
                && db
                    .message()
                    .starts_with("cached plan must not change result type")
        })
    }

    /// Deadlocks and serialization failures: run the transaction again.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Postgres(error) => matches!(
                error.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED) | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            ),
            StoreError::Pool(_) => true,
            StoreError::Data(_) | StoreError::Stopped => false,
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// How often a transaction that deadlocked, failed to serialize or ran a
/// stale statement is tried.
const TRANSACTION_TRIES: u32 = 5;

/// Starts a READ COMMITTED transaction, whatever the database's
/// `default_transaction_isolation` or the session's settings. Every
/// transaction of the worker starts here: the engine's goal locks only work
/// if each statement after the lock sees what the previous holder committed
/// (a fresh snapshot per statement), and claims and heartbeats must not fail
/// to serialize against a concurrent completion or cancel.
pub async fn begin(client: &mut deadpool_postgres::Client) -> Result<Transaction<'_>> {
    Ok(client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await?)
}

/// What [`begin`] sends, for a transaction begun without tokio-postgres's
/// `Transaction` ([`open`]).
const START_READ_COMMITTED: &str = "START TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// Runs a transaction again when it deadlocked or failed to serialize, or
/// ran a statement prepared before the schema changed under it: then every
/// connection of `pool` forgets what it prepared (each would fail the same
/// way), and the statements are prepared again on their next use.
pub async fn with_retries<T, F, Fut>(pool: &deadpool_postgres::Pool, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(error) if error.is_transient() && tries < TRANSACTION_TRIES => {
                debug!(%error, tries, "transaction retried");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
            }
            Err(error) if error.is_stale_statement() && tries < TRANSACTION_TRIES => {
                warn!(%error, "the schema changed under prepared statements: preparing them again");
                pool.manager().statement_caches.clear();
            }
            other => return other,
        }
    }
}

/// Column `index` of `row`, or a [`StoreError::Data`] saying why it cannot be
/// read (`Row::get` would panic, e.g. on JSON nested deeper than serde_json reads).
fn column<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T> {
    row.try_get(index).map_err(|error| {
        // The cause (e.g. "recursion limit exceeded") is not in the Display.
        let cause = std::error::Error::source(&error)
            .map(|cause| format!(": {cause}"))
            .unwrap_or_default();
        StoreError::Data(format!("{error}{cause}"))
    })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The message of a [`StoreError`], without the variant's prefix when it is
/// about the data itself.
fn data_message(error: StoreError) -> String {
    match error {
        StoreError::Data(message) => message,
        other => other.to_string(),
    }
}

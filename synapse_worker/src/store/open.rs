//! The completer's transactions, and the one it keeps open between batches.
//!
//! A batch's transaction ends with `COMMIT AND CHAIN`, which leaves its
//! connection in a new, empty transaction. The next batch that comes soon
//! runs in it instead of starting one: a chain step costs two round trips,
//! not three (a `START TRANSACTION` of its own was 0.14 ms on an idle
//! machine). The kept transaction has done nothing: no snapshot (READ
//! COMMITTED takes one per statement), no transaction id, no lock. It is
//! rolled back once no batch took it for [`KEEP_OPEN`].
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Result, START_READ_COMMITTED};

/// How long a committed batch's connection waits, in its chained
/// transaction, for the next batch: far above the time between a chain's
/// steps, short enough that an idle worker shows no open transaction.
pub const KEEP_OPEN: Duration = Duration::from_millis(10);

/// A READ COMMITTED transaction on a pooled connection. Dropped before it
/// was kept (an error, a panic), it is rolled back before its connection
/// goes back to the pool.
pub struct Open {
    client: Option<deadpool_postgres::Client>,
}

impl Open {
    /// Starts a transaction on a connection from `pool`.
    async fn begin(pool: &deadpool_postgres::Pool) -> Result<Open> {
        // The guard first: a START whose answer never came is rolled back too.
        let open = Open {
            client: Some(pool.get().await?),
        };
        open.client().batch_execute(START_READ_COMMITTED).await?;
        Ok(open)
    }

    /// The connection, inside the transaction.
    pub fn client(&self) -> &deadpool_postgres::Client {
        self.client.as_ref().expect("held until dropped")
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // The connection goes back to the pool only once rolled back; if it
        // broke, the pool finds it closed and replaces it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = client.batch_execute("ROLLBACK").await;
            });
        } else {
            // No runtime to roll back on: the connection is closed instead,
            // which ends the transaction on the server.
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The transaction a committed batch left open, for the next batch.
#[derive(Default)]
pub struct Kept {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    open: Option<Open>,
    /// Counts the transactions kept, so that a late release leaves a newer one alone.
    generation: u64,
}

impl Kept {
    /// The kept transaction if there is one whose connection is still up,
    /// else a new one.
    pub async fn take_or_begin(&self, pool: &deadpool_postgres::Pool) -> Result<Open> {
        let kept = self.slot.lock().expect("never poisoned").open.take();
        match kept {
            Some(open) if !open.client().is_closed() => Ok(open),
            _ => Open::begin(pool).await,
        }
    }

    /// Keeps `open`, whose COMMIT AND CHAIN succeeded, for [`KEEP_OPEN`].
    pub fn keep(self: &Arc<Self>, open: Open) {
        let (generation, replaced) = {
            let mut slot = self.slot.lock().expect("never poisoned");
            slot.generation += 1;
            (slot.generation, slot.open.replace(open))
        };
        // Two batches in flight: only one transaction is kept.
        drop(replaced);
        let kept = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_OPEN).await;
            kept.release(Some(generation));
        });
    }

    /// Rolls back the kept transaction: the one kept as `generation`, or
    /// whichever is kept.
    pub fn release(&self, generation: Option<u64>) {
        let released = {
            let mut slot = self.slot.lock().expect("never poisoned");
            if generation.is_some_and(|generation| generation != slot.generation) {
                return;
            }
            slot.open.take()
        };
        drop(released);
    }
}

//! Records task outcomes in batches: group commit.
//!
//! Executors hand their outcome to the completer, free their concurrency slot
//! (the next task can start while this one is recorded) and wait for the
//! answer. Whatever arrived while earlier batches ran goes into the next:
//! outcomes, fencing checks and the engine for the whole batch, then one
//! commit. One batch is in flight at a time: a second one beside it mostly
//! waited for the CPU (or, before the engine runs of one goal could go side
//! by side, for the first's goal locks), and split the outcomes into smaller
//! batches (pre-queued drain, 2 workers × 64: 8 000–9 000 → 10 100–11 400
//! tasks/s; fan-out 1 → 2 000 → 1: 2 300–3 000 → 3 100–4 000 tasks/s). Only
//! when the batch in flight is stalled (a goal it must lock is held elsewhere: a cancel, an
//! operator's transaction) does a second start beside it, so that one held
//! goal does not hold up the outcomes of every other. A lone outcome is
//! recorded at once, so batching adds no latency; under load the batches grow
//! by themselves and the commits per task fall.
//! The outcomes waiting for an answer are bounded (the backlog): an executor
//! with nowhere to put its outcome keeps its slot, so claims slow down.
//!
//! The successors a batch queues on this worker's queues are claimed in the
//! same transaction for its free slots, with its COMMIT
//! ([`crate::continuation`]). That COMMIT chains a new, empty transaction,
//! which the next batch uses if it comes within a few milliseconds
//! ([`store::open`]).
//!
//! Each transaction locks the goals of its batch (in id order, their gates
//! and then `FOR KEY SHARE`: batches of one goal go side by side) before it
//! writes any task row: goal first, then tasks, the order `cancel_goal`
//! follows too, so a completion and a cancel never deadlock
//! ([`crate::engine`] says where batches of one goal take turns).
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::continuation::Continuation;
use crate::engine::{self, Carried};
use crate::executor::Handled;
use crate::store::open::Kept;
use crate::store::{self, with_retries, AttemptOutcome, ClaimedTask, Recorded, StoreError};

/// Most outcomes in one transaction.
const MAX_BATCH: usize = 256;
/// Transactions in flight at once, the second only beside a stalled one.
const IN_FLIGHT: u32 = 2;
/// How long the batch in flight runs before it counts as stalled. Far above
/// a batch's own time (milliseconds), and short enough that a held goal
/// delays the other goals' outcomes only briefly.
const STALLED_AFTER: Duration = Duration::from_millis(100);

struct Completion {
    task: ClaimedTask,
    outcome: AttemptOutcome,
    reply: oneshot::Sender<Result<Handled, StoreError>>,
}

/// Where executors send their outcomes.
pub struct Completer {
    sender: mpsc::UnboundedSender<Completion>,
    backlog: Arc<Semaphore>,
}

/// The receiving end, consumed by [`run`].
pub struct CompletionQueue(mpsc::UnboundedReceiver<Completion>);

/// A completer with room for `backlog` outcomes waiting for their answer,
/// and the queue its [`run`] loop serves.
pub fn completer(backlog: usize) -> (Completer, CompletionQueue) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let backlog = Arc::new(Semaphore::new(backlog.max(1)));
    (Completer { sender, backlog }, CompletionQueue(receiver))
}

/// The answer to a handed-over outcome, still to come.
pub struct Answer {
    receiver: oneshot::Receiver<Result<Handled, StoreError>>,
    /// Its place in the backlog, given back with the answer.
    _place: OwnedSemaphorePermit,
}

impl Answer {
    /// Waits for the batch that records the outcome to commit (or fail).
    pub async fn wait(self) -> Result<Handled, StoreError> {
        self.receiver.await.map_err(|_| StoreError::Stopped)?
    }
}

impl Completer {
    /// Hands `outcome` of `task` to the next batch, once the backlog has room.
    pub async fn hand_over(
        &self,
        task: ClaimedTask,
        outcome: AttemptOutcome,
    ) -> Result<Answer, StoreError> {
        let place = self
            .backlog
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Stopped)?;
        let (reply, receiver) = oneshot::channel();
        self.sender
            .send(Completion {
                task,
                outcome,
                reply,
            })
            .map_err(|_| StoreError::Stopped)?;
        Ok(Answer {
            receiver,
            _place: place,
        })
    }

    /// Records `outcome` of `task` (and runs the engine) in the next batch.
    pub async fn record(
        &self,
        task: ClaimedTask,
        outcome: AttemptOutcome,
    ) -> Result<Handled, StoreError> {
        self.hand_over(task, outcome).await?.wait().await
    }
}

/// Serves `queue` until `stop`, with up to [`IN_FLIGHT`] batches at once; at
/// `stop`, the batches in flight still finish. With a `continuation`, the
/// successors the batches queue are claimed for this worker.
pub async fn run(
    pool: deadpool_postgres::Pool,
    mut queue: CompletionQueue,
    stop: CancellationToken,
    continuation: Option<Arc<Continuation>>,
) {
    let transactions = Arc::new(Semaphore::new(IN_FLIGHT as usize));
    let kept = Arc::new(Kept::default());
    let in_flight = TaskTracker::new();
    loop {
        let first = tokio::select! {
            completion = queue.0.recv() => match completion {
                Some(completion) => completion,
                None => break,
            },
            () = stop.cancelled() => break,
        };
        // Waiting for a transaction lets the batch grow meanwhile.
        let transaction = next_transaction(&transactions).await;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.0.try_recv() {
                Ok(completion) => batch.push(completion),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        let kept = kept.clone();
        let continuation = continuation.clone();
        in_flight.spawn(async move {
            complete(&pool, &kept, batch, continuation).await;
            drop(transaction);
        });
    }
    in_flight.close();
    in_flight.wait().await;
    kept.release(None);
}

/// A transaction's place: once none is in flight, or beside one that has
/// been stalled for [`STALLED_AFTER`]. This loop is the only one taking
/// places, so none can be taken between having them all and keeping one.
async fn next_transaction(transactions: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    let closed = "the semaphore is never closed";
    match tokio::time::timeout(
        STALLED_AFTER,
        transactions.clone().acquire_many_owned(IN_FLIGHT),
    )
    .await
    {
        Ok(all) => drop(all.expect(closed)),
        Err(_stalled) => {}
    }
    transactions.clone().acquire_owned().await.expect(closed)
}

async fn complete(
    pool: &deadpool_postgres::Pool,
    kept: &Arc<Kept>,
    batch: Vec<Completion>,
    continuation: Option<Arc<Continuation>>,
) {
    let (work, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|completion| ((completion.task, completion.outcome), completion.reply))
        .unzip();
    let work = Arc::new(work);
    match record_isolated(pool, kept, &work, 0..work.len(), &continuation).await {
        Ok(handled) => {
            for (reply, handled) in replies.into_iter().zip(handled) {
                let _ = reply.send(Ok(handled));
            }
        }
        Err(error) if work.len() == 1 => {
            let reply = replies.into_iter().next().expect("one completion");
            let _ = reply.send(Err(error));
        }
        Err(error) => {
            // One task's bad data must not sink the others: each on its own.
            debug!(%error, size = work.len(), "batch failed; recording one by one");
            for (index, reply) in replies.into_iter().enumerate() {
                let handled = record_isolated(pool, kept, &work, index..index + 1, &continuation)
                    .await
                    .map(|mut handled| handled.remove(0));
                if let Err(error) = &handled {
                    warn!(task_id = work[index].0.id, %error, "could not record the outcome");
                }
                let _ = reply.send(handled);
            }
        }
    }
}

/// Records `work[range]` in a task of its own, so that a panic (a bug, or a
/// value the client cannot decode) fails those outcomes, not the completer.
async fn record_isolated(
    pool: &deadpool_postgres::Pool,
    kept: &Arc<Kept>,
    work: &Arc<Vec<(ClaimedTask, AttemptOutcome)>>,
    range: Range<usize>,
    continuation: &Option<Arc<Continuation>>,
) -> Result<Vec<Handled>, StoreError> {
    let pool = pool.clone();
    let kept = kept.clone();
    let work = work.clone();
    let continuation = continuation.clone();
    tokio::spawn(async move {
        let outcomes: Vec<(&ClaimedTask, &AttemptOutcome)> = work[range]
            .iter()
            .map(|(task, outcome)| (task, outcome))
            .collect();
        record_batch(&pool, &kept, &outcomes, continuation.as_deref()).await
    })
    .await
    .unwrap_or_else(|error| Err(StoreError::Data(format!("recording failed: {error}"))))
}

/// In `tx`: the goals' locks, the outcomes (fenced by attempt) and the engine
/// for every step that ended. Returns what became of each outcome, and the
/// tasks the engine queued or, with `caller_queues_last`, left to queue
/// ([`engine::steps_ended_in_locked_goals`]).
pub(crate) async fn record_in(
    tx: &impl deadpool_postgres::GenericClient,
    outcomes: &[(&ClaimedTask, &AttemptOutcome)],
    caller_queues_last: bool,
) -> Result<(Vec<Handled>, Carried), StoreError> {
    let mut goal_ids: Vec<i64> = outcomes.iter().map(|(task, _)| task.goal_id).collect();
    goal_ids.sort_unstable();
    goal_ids.dedup();
    // A goal that is not running (cancelled) is not locked: its tasks are
    // not running either, so their outcomes are fenced.
    let store::Recording {
        running,
        recorded,
        goals_ended,
    } = store::lock_goals_and_record(tx, &goal_ids, outcomes).await?;
    let mut handled = Vec::with_capacity(recorded.len());
    let mut ends = Vec::new();
    for recorded in recorded {
        handled.push(match recorded {
            Recorded::Fenced => Handled::Fenced,
            Recorded::Retrying => Handled::Recorded("retrying"),
            Recorded::Again => Handled::Recorded("looped"),
            Recorded::Ended(end) => {
                let status = end.ended.outcome.status();
                ends.push(end);
                Handled::Recorded(status)
            }
        });
    }
    let carried = if ends.is_empty() {
        Carried::default()
    } else {
        engine::steps_ended_in_locked_goals(tx, ends, running, goals_ended, caller_queues_last)
            .await?
    };
    Ok((handled, carried))
}

/// One transaction: [`record_in`], then, with local continuation, the claims
/// that go out with its COMMIT, whose tasks start once it committed. It runs
/// in the transaction the previous batch left open, if that one is still
/// kept, and leaves its own open for the next ([`store::open`]).
async fn record_batch(
    pool: &deadpool_postgres::Pool,
    kept: &Arc<Kept>,
    outcomes: &[(&ClaimedTask, &AttemptOutcome)],
    continuation: Option<&Continuation>,
) -> Result<Vec<Handled>, StoreError> {
    with_retries(pool, || async {
        let open = kept.take_or_begin(pool).await?;
        let client = open.client();
        let (handled, carried) = record_in(client, outcomes, continuation.is_some()).await?;
        let continued = match continuation {
            Some(continuation) => continuation.queue_claim_and_commit(client, carried).await?,
            None => {
                store::commit_and_chain(client).await?;
                Vec::new()
            }
        };
        kept.keep(open);
        Ok((handled, continued))
    })
    .await
    .map(|(handled, continued)| {
        if let Some(continuation) = continuation {
            for task in continued {
                // Should the worker be gone, the lease lapses and the task runs again.
                let _ = continuation.run.send(task);
            }
        }
        handled
    })
}

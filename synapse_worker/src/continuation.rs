//! Local continuation: the successors a worker's own completions queue, on
//! queues it serves, are claimed in the same transaction for its free slots,
//! and run here without waiting for the forwarder, Redis and a claim of their
//! own. A task queued by one statement and claimed here by the next still
//! has its `task.queued` event: the forwarder drops its message when the
//! event has a row of its own (the task no longer queued when it reads it);
//! one sharing its row with others is sent, and costs the worker that pops
//! it a claim that finds nothing.
//!
//! They are claimed with the transaction's last round trip, beside its
//! COMMIT: what a task sees of its goal is what the transaction leaves, and
//! a step of a chain costs no round trip of its own for its successor's
//! queueing, claim or commit.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::Carried;
use crate::slots::{Slot, Slots};
use crate::store::{self, ClaimedTask, StoreError};

/// A task claimed by local continuation, with the slot it runs in.
pub type Continued = (ClaimedTask, Slot);

/// How a worker takes the successors its completions queue.
pub struct Continuation {
    /// The worker's concurrency slots: free ones, or those its consumer
    /// lent while it waits on Redis.
    pub slots: Arc<Slots>,
    /// The queues the worker serves.
    pub queues: Vec<String>,
    /// The lease of a claim.
    pub lease: Duration,
    /// The worker's identity (`leased_by`).
    pub identity: String,
    /// Where claimed tasks go, once their transaction committed.
    pub run: mpsc::UnboundedSender<Continued>,
    /// Once cancelled (the worker stops), nothing more is claimed.
    pub stop: CancellationToken,
}

/// Free slots taken for tasks about to be claimed.
struct Reservation {
    task_ids: Vec<i64>,
    slots: Vec<Slot>,
}

impl Continuation {
    /// Takes a free slot for each of `tasks` (id, queue) on a queue this
    /// worker serves, as long as there are some; `None` if it takes none.
    fn reserve<'q>(&self, tasks: impl IntoIterator<Item = (i64, &'q str)>) -> Option<Reservation> {
        if self.stop.is_cancelled() {
            return None;
        }
        let mut reservation = Reservation {
            task_ids: Vec::new(),
            slots: Vec::new(),
        };
        for (task_id, queue) in tasks {
            if !self.queues.iter().any(|served| served == queue) {
                continue;
            }
            let Some(slot) = self.slots.try_take() else {
                break;
            };
            reservation.task_ids.push(task_id);
            reservation.slots.push(slot);
        }
        (!reservation.task_ids.is_empty()).then_some(reservation)
    }

    /// What a claim of `reservation`'s tasks asks the store; `pending`:
    /// those of them still to be queued, with their input.
    fn claim_of<'r>(
        &'r self,
        reservation: &'r Reservation,
        pending: &'r [(i64, store::TaskInput)],
        served: &'r [&'r str],
    ) -> store::Claim<'r> {
        store::Claim {
            task_ids: &reservation.task_ids,
            pending,
            queues: served,
            lease: self.lease,
            worker: &self.identity,
        }
    }

    fn served(&self) -> Vec<&str> {
        self.queues.iter().map(String::as_str).collect()
    }

    /// Ends the transaction on `client`: writes the edge resolutions, queues
    /// the tasks and finishes the goals the engine left to write last, claims
    /// for its free slots those of every task the transaction queued that
    /// they can run, and commits (and chains), in one round trip
    /// ([`store::queue_claim_and_commit`]). A task left to write last that
    /// gets a slot is queued and claimed in one write.
    pub async fn queue_claim_and_commit(
        &self,
        client: &deadpool_postgres::Client,
        carried: Carried,
    ) -> Result<Vec<Continued>, StoreError> {
        let queued = carried
            .queued
            .iter()
            .map(|task| (task.id, task.queue.as_str()));
        let to_queue = carried
            .to_queue_on
            .iter()
            .map(|(id, queue)| (*id, queue.as_str()));
        let reservation = self.reserve(queued.chain(to_queue));
        if carried.to_resolve.is_empty()
            && carried.to_queue.is_empty()
            && carried.to_finish.is_empty()
            && reservation.is_none()
        {
            store::commit_and_chain(client).await?;
            return Ok(Vec::new());
        }
        // Only this run decided these tasks, and a cancel waits for its goal
        // locks: they stay pending until the claim writes them, and a task
        // given a slot is never left unqueued.
        let reserved: HashSet<i64> = reservation
            .iter()
            .flat_map(|reservation| reservation.task_ids.iter().copied())
            .collect();
        let (pending, to_queue): (Vec<_>, Vec<_>) = carried
            .to_queue
            .into_iter()
            .partition(|(id, _)| reserved.contains(id));
        let served = self.served();
        let claim = reservation
            .as_ref()
            .map(|reservation| self.claim_of(reservation, &pending, &served));
        let last_writes = store::LastWrites {
            resolutions: &carried.to_resolve,
            tasks: &to_queue,
            finishes: &carried.to_finish,
        };
        let claimed = store::queue_claim_and_commit(client, last_writes, claim.as_ref()).await?;
        Ok(reservation.map_or_else(Vec::new, |reservation| reservation.fill(claimed)))
    }
}

impl Reservation {
    /// The claimed tasks, each with a slot; slots left over (a task that
    /// could not be claimed or read) go back.
    fn fill(self, claimed: Vec<ClaimedTask>) -> Vec<Continued> {
        claimed.into_iter().zip(self.slots).collect()
    }
}

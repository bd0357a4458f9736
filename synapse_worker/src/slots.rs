//! The worker's concurrency slots: one per task (or planning) running.
//!
//! The consumer takes every free slot before it blocks on Redis, so that one
//! pop takes as many messages as the worker can run. While it waits, those
//! slots are lent: local continuation (a completion claiming the successors
//! it queued, [`crate::continuation`]) may take them, and the consumer takes
//! back what is left once its pop returns. Without the loan, a worker whose
//! consumer waited on Redis had no slot for its own successors (with one
//! slot, never), and they went through the forwarder, Redis and a claim of
//! their own.
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A slot held: dropping it frees it.
pub type Slot = OwnedSemaphorePermit;

/// The slots of one worker.
pub struct Slots {
    free: Arc<Semaphore>,
    lent: Mutex<Vec<Slot>>,
}

impl Slots {
    /// `count` free slots.
    pub fn new(count: usize) -> Self {
        Slots {
            free: Arc::new(Semaphore::new(count)),
            lent: Mutex::new(Vec::new()),
        }
    }

    /// Waits for a free slot (a lent one is not free).
    pub async fn acquire(&self) -> Slot {
        self.free
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Every free slot, without waiting.
    pub fn take_free(&self) -> Vec<Slot> {
        std::iter::from_fn(|| self.free.clone().try_acquire_owned().ok()).collect()
    }

    /// A slot for a task claimed now: a free one, else a lent one.
    pub fn try_take(&self) -> Option<Slot> {
        self.free
            .clone()
            .try_acquire_owned()
            .ok()
            .or_else(|| self.lent().pop())
    }

    /// Lends `slots` while their holder waits.
    pub fn lend(&self, slots: Vec<Slot>) {
        self.lent().extend(slots);
    }

    /// The lent slots nobody took.
    pub fn take_back(&self) -> Vec<Slot> {
        std::mem::take(&mut *self.lent())
    }

    fn lent(&self) -> MutexGuard<'_, Vec<Slot>> {
        // A holder that panicked left a plain list behind: still usable.
        self.lent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lent_slot_is_taken_only_when_none_is_free_and_the_rest_comes_back() {
        let slots = Slots::new(3);
        let held = slots.take_free();
        assert_eq!(held.len(), 3);
        assert!(slots.try_take().is_none());
        slots.lend(held);
        let taken = slots.try_take().expect("a lent slot");
        let back = slots.take_back();
        assert_eq!(back.len(), 2);
        assert!(slots.try_take().is_none(), "every slot is held");
        drop(taken);
        assert!(slots.try_take().is_some(), "a dropped slot is free again");
    }
}

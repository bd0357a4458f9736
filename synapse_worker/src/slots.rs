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
//!
//! The consumer does not queue on the slots to wait for one: a slot given to
//! a queued waiter would be held by a task not yet running, out of reach of
//! a completion claiming at that moment (under load, for milliseconds). A
//! slot freed stays free, and wakes the consumer, which takes it if it is
//! still there.
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A slot held: dropping it frees it.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Free first, then wake: the consumer woken finds it.
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// The slots of one worker.
pub struct Slots {
    free: Arc<Semaphore>,
    freed: Arc<Notify>,
    lent: Mutex<Vec<Slot>>,
}

impl Slots {
    /// `count` free slots.
    pub fn new(count: usize) -> Self {
        Slots {
            free: Arc::new(Semaphore::new(count)),
            freed: Arc::new(Notify::new()),
            lent: Mutex::new(Vec::new()),
        }
    }

    /// Waits until a slot is free, and takes every free one (a lent one is
    /// not free).
    pub async fn wait_for_free(&self) -> Vec<Slot> {
        loop {
            // Registered before looking: a slot freed in between still wakes
            // this wait (`notify_one` keeps its wake-up for the next waiter).
            let freed = self.freed.notified();
            let free = self.take_free();
            if !free.is_empty() {
                return free;
            }
            freed.await;
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            freed: self.freed.clone(),
        }
    }

    /// Every free slot, without waiting.
    pub fn take_free(&self) -> Vec<Slot> {
        std::iter::from_fn(|| self.free.clone().try_acquire_owned().ok())
            .map(|permit| self.slot(permit))
            .collect()
    }

    /// A slot for a task claimed now: a free one, else a lent one.
    pub fn try_take(&self) -> Option<Slot> {
        match self.free.clone().try_acquire_owned() {
            Ok(permit) => Some(self.slot(permit)),
            Err(_) => self.lent().pop(),
        }
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

    #[tokio::test(flavor = "current_thread")]
    async fn a_slot_freed_while_the_consumer_waits_stays_free_until_someone_takes_it() {
        let slots = Arc::new(Slots::new(1));
        let running = slots.try_take().expect("the only slot");
        let consumer = tokio::spawn({
            let slots = slots.clone();
            async move { slots.wait_for_free().await.len() }
        });
        // The consumer runs until it waits.
        tokio::task::yield_now().await;
        drop(running);
        // Woken, the consumer has not run yet: a completion claiming its
        // successor now gets the slot (a waiter queued on the semaphore
        // would already hold it).
        let continued = slots.try_take().expect("the freed slot");
        assert!(!consumer.is_finished());
        drop(continued);
        assert_eq!(
            consumer.await.unwrap(),
            1,
            "freed again, it goes to the consumer"
        );
    }
}

//! Where the forwarder's reads of the outbox start.
//!
//! Forwarded rows are deleted, but while any snapshot is held (a long report,
//! `pg_dump`, a standby's feedback) vacuum cannot remove them, and a read from
//! the lowest id would step over every one of them, again and again. So reads
//! start above a floor: the highest id below which every row that will ever
//! commit has already been read.
//!
//! Outbox ids are not drawn in commit order: a transaction can draw a low id
//! and commit after higher ids went out. The rule that makes a floor safe
//! (kept by every writer, see `synapse._emit`): a transaction has its xid
//! before it draws an outbox id. Then, after a read that saw ids up to `max`,
//! a row with a lower id that the read did not see belongs to a transaction
//! that was running during the read, so its xid is below the xid the
//! forwarder's transaction got after the read (after: the read is the first
//! statement of its transaction that could assign an id). Once a later read's snapshot
//! has an xmin above that xid, all those transactions have ended and that
//! later read (which still started at the old floor) saw what they committed:
//! from then on reads may start above `max`.
use std::collections::VecDeque;

/// The read floor and the batches waiting to raise it.
#[derive(Debug, Default)]
pub struct ReadFloor {
    floor: i64,
    /// `(highest id read, xid of the transaction that read it)`, oldest first.
    pending: VecDeque<(i64, u64)>,
    /// The lowest id of an event Redis refused that waits for a retry: the
    /// floor stays below it so that the retry reads it.
    refused: Option<i64>,
}

impl ReadFloor {
    /// Reads start above this id.
    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// A read that saw every visible row above the floor (not cut short by
    /// the batch size), in a snapshot whose xmin was `xmin`, committed.
    pub fn read_everything(&mut self, xmin: u64) {
        while let Some(&(max, xid)) = self.pending.front() {
            if xid >= xmin {
                break;
            }
            self.pending.pop_front();
            let cap = self.refused.map_or(i64::MAX, |refused| refused - 1);
            self.floor = self.floor.max(max.min(cap));
        }
    }

    /// A read saw ids up to `max`, in the transaction with id `xid`, which
    /// committed.
    pub fn forwarded(&mut self, max: i64, xid: u64) {
        self.pending.push_back((max, xid));
    }

    /// An event with this id was refused and waits for a retry.
    pub fn refused(&mut self, id: i64) {
        self.refused = Some(self.refused.map_or(id, |lowest| lowest.min(id)));
    }

    /// The lowest id among the events that wait for a retry, as the outbox
    /// says now (`None`: none waits).
    pub fn refused_now(&mut self, lowest: Option<i64>) {
        self.refused = lowest;
    }

    /// Everything starts again from the lowest id (a new process, or the
    /// outbox was recreated).
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_rises_only_after_every_older_transaction_ended() {
        let mut floor = ReadFloor::default();
        floor.forwarded(100, 50);
        // A read whose snapshot still has xid 50 (or older) running.
        floor.read_everything(50);
        assert_eq!(floor.floor(), 0);
        floor.forwarded(200, 60);
        floor.read_everything(51);
        assert_eq!(floor.floor(), 100);
        floor.read_everything(61);
        assert_eq!(floor.floor(), 200);
    }

    #[test]
    fn a_refused_event_keeps_the_floor_below_it() {
        let mut floor = ReadFloor::default();
        floor.refused(42);
        floor.forwarded(100, 50);
        floor.read_everything(51);
        assert_eq!(floor.floor(), 41);
        floor.refused_now(None);
        floor.forwarded(120, 52);
        floor.read_everything(53);
        assert_eq!(floor.floor(), 120);
    }

    #[test]
    fn the_floor_never_goes_down() {
        let mut floor = ReadFloor::default();
        floor.forwarded(100, 50);
        floor.read_everything(51);
        floor.refused(10);
        floor.forwarded(150, 52);
        floor.read_everything(53);
        assert_eq!(floor.floor(), 100);
    }
}

//! The columns of a `goals` or `tasks` row, as the triggers read and write
//! them: one list per table, found by name once per session and table, then
//! read by position, and only the columns a trigger asks for.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::CStr;
use std::num::NonZeroUsize;
use std::thread::LocalKey;

/// The columns of `goals` the triggers use.
pub mod goal {
    use std::ffi::CStr;

    pub const NAMES: [&CStr; 9] = [
        c"id",
        c"status",
        c"parent_task_id",
        c"dispatched_at",
        c"started_at",
        c"finished_at",
        c"parent_goal_id",
        c"blueprint",
        c"error",
    ];
    pub const ID: usize = 0;
    pub const STATUS: usize = 1;
    pub const PARENT_TASK: usize = 2;
    pub const DISPATCHED_AT: usize = 3;
    pub const STARTED_AT: usize = 4;
    pub const FINISHED_AT: usize = 5;
    pub const PARENT_GOAL: usize = 6;
    pub const BLUEPRINT: usize = 7;
    pub const ERROR: usize = 8;
}

/// The columns of `tasks` the triggers use.
pub mod task {
    use std::ffi::CStr;

    pub const NAMES: [&CStr; 16] = [
        c"id",
        c"goal_id",
        c"step",
        c"queue",
        c"status",
        c"attempts",
        c"map_index",
        c"for_each_expr",
        c"action",
        c"child_goal_id",
        c"queued_at",
        c"run_at",
        c"started_at",
        c"finished_at",
        c"lease_expires_at",
        c"leased_by",
    ];
    pub const ID: usize = 0;
    pub const GOAL: usize = 1;
    pub const STEP: usize = 2;
    pub const QUEUE: usize = 3;
    pub const STATUS: usize = 4;
    pub const ATTEMPTS: usize = 5;
    pub const MAP_INDEX: usize = 6;
    pub const FOR_EACH: usize = 7;
    pub const ACTION: usize = 8;
    pub const CHILD_GOAL: usize = 9;
    pub const QUEUED_AT: usize = 10;
    pub const RUN_AT: usize = 11;
    pub const STARTED_AT: usize = 12;
    pub const FINISHED_AT: usize = 13;
    pub const LEASE_EXPIRES_AT: usize = 14;
    pub const LEASED_BY: usize = 15;
}

/// Where each of `N` named columns is in one table. Looked up again when the
/// table or its number of columns changes: an upgrade that adds a column
/// changes the count (a dropped column keeps its number), and a re-created
/// extension has new tables.
#[derive(Clone, Copy)]
struct Layout<const N: usize> {
    relid: pg_sys::Oid,
    natts: i32,
    at: [usize; N],
}

type KeptLayout<const N: usize> = LocalKey<Cell<Option<Layout<N>>>>;

thread_local! {
    static GOAL_LAYOUT: Cell<Option<Layout<9>>> = const { Cell::new(None) };
    static TASK_LAYOUT: Cell<Option<Layout<16>>> = const { Cell::new(None) };
}

/// The attribute numbers of [`goal::NAMES`] in `relation` (`goals`).
pub fn goal_columns(relation: pg_sys::Relation) -> [usize; 9] {
    positions(&GOAL_LAYOUT, relation, &goal::NAMES)
}

/// The attribute numbers of [`task::NAMES`] in `relation` (`tasks`).
pub fn task_columns(relation: pg_sys::Relation) -> [usize; 16] {
    positions(&TASK_LAYOUT, relation, &task::NAMES)
}

fn positions<const N: usize>(
    kept: &'static KeptLayout<N>,
    relation: pg_sys::Relation,
    names: &[&CStr; N],
) -> [usize; N] {
    // SAFETY: the relation the trigger fired for, open while it runs.
    let (relid, tupdesc) = unsafe { ((*relation).rd_id, (*relation).rd_att) };
    // SAFETY: its descriptor, likewise.
    let natts = unsafe { (*tupdesc).natts };
    if let Some(layout) = kept.get().filter(|l| l.relid == relid && l.natts == natts) {
        return layout.at;
    }
    let mut at = [0; N];
    for (position, name) in at.iter_mut().zip(names) {
        // SAFETY: a valid descriptor and a NUL-terminated name.
        let number = unsafe { pg_sys::SPI_fnumber(tupdesc, name.as_ptr()) };
        if number <= 0 {
            error!("synapse: table {relid:?} has no column {name:?}");
        }
        *position = number as usize;
    }
    kept.set(Some(Layout { relid, natts, at }));
    at
}

/// One row, read column by column as a trigger asks.
pub struct Values<const N: usize> {
    at: [usize; N],
    row: Row,
}

enum Row {
    Tuple(pg_sys::HeapTuple, pg_sys::TupleDesc),
    Slot(*mut pg_sys::TupleTableSlot),
}

impl<const N: usize> Values<N> {
    /// A heap tuple described by `tupdesc`, its columns at `at`.
    ///
    /// # Safety
    /// `tuple` is a valid tuple of `tupdesc`, alive while the values are read.
    pub unsafe fn of_tuple(
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
        at: [usize; N],
    ) -> Self {
        Values {
            at,
            row: Row::Tuple(tuple, tupdesc),
        }
    }

    fn datum(&self, i: usize) -> Option<pg_sys::Datum> {
        let number = self.at[i];
        // SAFETY: the row is alive while the values are read (per the
        // constructors), and `number` is one of its attribute numbers.
        unsafe {
            match self.row {
                Row::Tuple(tuple, tupdesc) => pgrx::heap_getattr_raw(
                    tuple,
                    NonZeroUsize::new(number).expect("attribute numbers start at 1"),
                    tupdesc,
                ),
                Row::Slot(slot) => {
                    if (i32::from((*slot).tts_nvalid) as usize) < number {
                        pg_sys::slot_getsomeattrs_int(slot, number as i32);
                    }
                    let index = number - 1;
                    (!*(*slot).tts_isnull.add(index)).then(|| *(*slot).tts_values.add(index))
                }
            }
        }
    }

    /// Whether column `i` is NULL.
    pub fn is_null(&self, i: usize) -> bool {
        self.datum(i).is_none()
    }

    /// Column `i`, of type text.
    pub fn text(&self, i: usize) -> Option<String> {
        // SAFETY: a text datum of a live row (per the constructors).
        self.datum(i)
            .and_then(|datum| unsafe { String::from_datum(datum, false) })
    }

    /// Column `i`, of type bigint.
    pub fn bigint(&self, i: usize) -> Option<i64> {
        self.datum(i).map(|datum| datum.value() as i64)
    }

    /// Column `i`, of type integer.
    pub fn integer(&self, i: usize) -> Option<i32> {
        self.datum(i).map(|datum| datum.value() as i32)
    }

    /// Column `i`, of type timestamptz, in microseconds since 2000-01-01.
    pub fn timestamp(&self, i: usize) -> Option<i64> {
        self.datum(i).map(|datum| datum.value() as i64)
    }
}

/// Calls `each` with every row of a statement trigger's transition table, in
/// the order the statement wrote them, its columns at `at`.
///
/// # Safety
/// `rows` is a transition table of the firing trigger, whose rows `tupdesc`
/// describes.
pub unsafe fn each_row<const N: usize>(
    rows: *mut pg_sys::Tuplestorestate,
    tupdesc: pg_sys::TupleDesc,
    at: [usize; N],
    mut each: impl FnMut(&Values<N>),
) {
    if rows.is_null() {
        return;
    }
    // SAFETY: per this function's contract. A read pointer of its own, as a
    // query reading the table by name takes: other triggers may read it too.
    unsafe {
        let slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
        let reader = pg_sys::tuplestore_alloc_read_pointer(rows, pg_sys::EXEC_FLAG_REWIND as i32);
        pg_sys::tuplestore_select_read_pointer(rows, reader);
        pg_sys::tuplestore_rescan(rows);
        let values = Values {
            at,
            row: Row::Slot(slot),
        };
        while pg_sys::tuplestore_gettupleslot(rows, true, false, slot) {
            each(&values);
        }
        pg_sys::tuplestore_select_read_pointer(rows, 0);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
    }
}

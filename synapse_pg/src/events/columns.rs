//! The columns of a `goals` or `tasks` row, as the triggers read and write
//! them: found by name once per table, then read by position.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::CStr;
use std::num::NonZeroUsize;
use std::thread::LocalKey;

/// Where each of `N` named columns is in one table. Looked up again when the
/// table or its number of columns changes: an upgrade that adds a column
/// changes the count (a dropped column keeps its number), and a re-created
/// extension has new tables.
#[derive(Clone, Copy)]
pub struct Layout<const N: usize> {
    relid: pg_sys::Oid,
    natts: i32,
    at: [usize; N],
}

/// A layout kept per session.
pub type KeptLayout<const N: usize> = LocalKey<Cell<Option<Layout<N>>>>;

/// The attribute numbers of `names` in `relation`.
pub fn positions<const N: usize>(
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

/// The values of the columns a trigger looks at, in the order it named them.
pub struct Values<const N: usize>([Option<pg_sys::Datum>; N]);

impl<const N: usize> Values<N> {
    /// The columns `at` of a heap tuple described by `tupdesc`.
    ///
    /// # Safety
    /// `tuple` is a valid tuple of `tupdesc`, alive while the values are read.
    pub unsafe fn of_tuple(
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
        at: &[usize; N],
    ) -> Self {
        let mut values = [None; N];
        for (value, &number) in values.iter_mut().zip(at) {
            let number = NonZeroUsize::new(number).expect("attribute numbers start at 1");
            // SAFETY: per this function's contract.
            *value = unsafe { pgrx::heap_getattr_raw(tuple, number, tupdesc) };
        }
        Values(values)
    }

    /// The columns `at` of the tuple in `slot`.
    ///
    /// # Safety
    /// `slot` holds a tuple, alive while the values are read.
    unsafe fn of_slot(slot: *mut pg_sys::TupleTableSlot, at: &[usize; N]) -> Self {
        let last = at.iter().copied().max().unwrap_or(0) as i32;
        // SAFETY: per this function's contract.
        unsafe {
            if i32::from((*slot).tts_nvalid) < last {
                pg_sys::slot_getsomeattrs_int(slot, last);
            }
            let mut values = [None; N];
            for (value, &number) in values.iter_mut().zip(at) {
                let index = number - 1;
                if !*(*slot).tts_isnull.add(index) {
                    *value = Some(*(*slot).tts_values.add(index));
                }
            }
            Values(values)
        }
    }

    /// Whether column `i` is NULL.
    pub fn is_null(&self, i: usize) -> bool {
        self.0[i].is_none()
    }

    /// Column `i`, of type text.
    pub fn text(&self, i: usize) -> Option<String> {
        // SAFETY: a text datum of a live tuple (per the constructors).
        self.0[i].and_then(|datum| unsafe { String::from_datum(datum, false) })
    }

    /// Column `i`, of type bigint.
    pub fn bigint(&self, i: usize) -> Option<i64> {
        self.0[i].map(|datum| datum.value() as i64)
    }

    /// Column `i`, of type integer.
    pub fn integer(&self, i: usize) -> Option<i32> {
        self.0[i].map(|datum| datum.value() as i32)
    }

    /// Column `i`, of type timestamptz, in microseconds since 2000-01-01.
    pub fn timestamp(&self, i: usize) -> Option<i64> {
        self.0[i].map(|datum| datum.value() as i64)
    }
}

/// Calls `each` with the columns `at` of every row of a statement trigger's
/// transition table, in the order the statement wrote them.
///
/// # Safety
/// `rows` is a transition table of the firing trigger, whose rows `tupdesc`
/// describes.
pub unsafe fn each_row<const N: usize>(
    rows: *mut pg_sys::Tuplestorestate,
    tupdesc: pg_sys::TupleDesc,
    at: &[usize; N],
    mut each: impl FnMut(Values<N>),
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
        while pg_sys::tuplestore_gettupleslot(rows, true, false, slot) {
            each(Values::of_slot(slot, at));
        }
        pg_sys::tuplestore_select_read_pointer(rows, 0);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
    }
}

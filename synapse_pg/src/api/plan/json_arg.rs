//! `jsonb` arguments kept as Postgres values until their size and nesting are
//! checked (SPEC §4 rule 5, §7): poison input is refused before anything parses
//! it, and the checks themselves never recurse.
use std::ffi::CStr;

use pgrx::callconv::{Arg, ArgAbi};
use pgrx::nullable::Nullable;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{direct_function_call, pg_sys};
use serde_json::Value;
use synapse_worker::blueprint::limits::{self, MAX_JSON_BYTES, MAX_JSON_DEPTH};

use crate::error::{Error, Result};

/// A jsonb value's binary form takes at most about four times the bytes of its
/// compact text (`[0,0,…]`): a value stored in more than this is over the text
/// limit for sure, and is refused without being read.
const MAX_STORED_BYTES: usize = 8 * MAX_JSON_BYTES;

/// How many tokens the walk reads between two interrupt checks.
const INTERRUPT_EVERY: usize = 1 << 16;

/// A `jsonb` argument, not yet parsed. Stored as given (passed on as the
/// same datum): a large blueprint is not written out and parsed again.
#[derive(Clone, Copy)]
pub(crate) struct JsonbArg {
    datum: pg_sys::Datum,
}

impl FromDatum for JsonbArg {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        (!is_null && !datum.is_null()).then_some(JsonbArg { datum })
    }
}

impl IntoDatum for JsonbArg {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.datum)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

unsafe impl<'fcx> ArgAbi<'fcx> for JsonbArg {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        unsafe {
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }

    unsafe fn unbox_nullable_arg(arg: Arg<'_, 'fcx>) -> Nullable<Self> {
        unsafe { arg.unbox_arg_using_from_datum().into() }
    }
}

// SAFETY: an element of a `jsonb[]` is a jsonb varlena inside the array,
// which outlives the call; it is kept as the datum it is, like an argument.
unsafe impl pgrx::datum::UnboxDatum for JsonbArg {
    type As<'src> = JsonbArg;

    unsafe fn unbox<'src>(datum: pgrx::datum::Datum<'src>) -> JsonbArg
    where
        Self: 'src,
    {
        JsonbArg {
            datum: datum.sans_lifetime(),
        }
    }
}

/// Its SQL type (apart, since the macro spells the std `Result`).
mod sql_type {
    pgrx::impl_sql_translatable!(super::JsonbArg, arg_only = "jsonb");
}

/// What a walk over a jsonb value found.
struct Measure {
    /// Length of the compact JSON text, counted up to just past the limit.
    bytes: usize,
    /// Deepest nesting of arrays and objects.
    depth: usize,
}

impl JsonbArg {
    /// Refuses the value, called `what` in the message, if its JSON text is
    /// over 1 MiB or it nests deeper than 64 levels (SQLSTATE 54000).
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        let over = |message: String| Error::LimitExceeded {
            path: "$".into(),
            message,
        };
        // The size Postgres stores, read from the header: nothing is detoasted yet.
        let stored = unsafe { pg_sys::toast_raw_datum_size(self.datum) };
        if stored > MAX_STORED_BYTES {
            return Err(over(format!(
                "{what} takes {stored} bytes as jsonb, more than 1 MiB of JSON text; the limit is 1 MiB"
            )));
        }
        let measure = self.measure();
        if measure.bytes > MAX_JSON_BYTES {
            return Err(over(format!(
                "{what} is more than 1 MiB of JSON text; the limit is 1 MiB ({MAX_JSON_BYTES} bytes)"
            )));
        }
        if measure.depth > MAX_JSON_DEPTH {
            return Err(over(limits::depth_message(what, measure.depth)));
        }
        Ok(())
    }

    /// The value, once [`JsonbArg::check`] passed.
    pub(crate) fn into_value(self, what: &str) -> Result<Value> {
        self.check(what)?;
        self.parse(what)
    }

    /// The value, its limits already checked ([`JsonbArg::check`]).
    pub(crate) fn parse(self, what: &str) -> Result<Value> {
        let text = unsafe {
            direct_function_call::<&CStr>(pg_sys::jsonb_out, &[Some(self.datum)])
                .ok_or_else(|| Error::InvalidParameter(format!("{what} must not be NULL")))?
        };
        let parsed = text
            .to_str()
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(text).map_err(|e| e.to_string()));
        unsafe { pg_sys::pfree(text.as_ptr() as *mut std::ffi::c_void) };
        // Checked and measured text always parses; kept as a guard, not a panic.
        parsed.map_err(|e| Error::InvalidParameter(format!("{what} cannot be read: {e}")))
    }

    /// `read` of the value's binary form, detoasted if it was stored apart.
    /// Equal `jsonb` values have equal bytes (keys sorted, duplicates dropped).
    pub(crate) fn with_bytes<R>(&self, read: impl FnOnce(&[u8]) -> R) -> R {
        // SAFETY: the datum is a jsonb varlena alive for the call; the
        // detoasted copy, if one was made, is freed after `read`.
        unsafe {
            let original = self.datum.cast_mut_ptr::<pg_sys::varlena>();
            let detoasted = pg_sys::pg_detoast_datum_packed(original);
            let bytes = std::slice::from_raw_parts(
                pgrx::varlena::vardata_any(detoasted).cast::<u8>(),
                pgrx::varlena::varsize_any_exhdr(detoasted),
            );
            let answer = read(bytes);
            if detoasted != original {
                pg_sys::pfree(detoasted.cast());
            }
            answer
        }
    }

    /// Walks the binary value once, without recursion: its compact text length
    /// (the walk stops once that is over the limit) and its nesting depth.
    fn measure(&self) -> Measure {
        use pg_sys::JsonbIteratorToken::*;
        let mut measure = Measure { bytes: 0, depth: 0 };
        unsafe {
            let original = self.datum.cast_mut_ptr::<pg_sys::varlena>();
            let detoasted = pg_sys::pg_detoast_datum(original);
            let jsonb = detoasted.cast::<pg_sys::Jsonb>();
            let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
            let mut value = pg_sys::JsonbValue::default();
            // Elements seen so far in each open container.
            let mut open: Vec<usize> = Vec::new();
            let mut after_key = false;
            let mut raw_scalar = false;
            let mut tokens = 0usize;
            while measure.bytes <= MAX_JSON_BYTES {
                let token = pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false);
                tokens += 1;
                if tokens.is_multiple_of(INTERRUPT_EVERY) {
                    pg_sys::check_for_interrupts!();
                }
                match token {
                    WJB_DONE => break,
                    // A scalar document is stored as a one-element pseudo array.
                    WJB_BEGIN_ARRAY if open.is_empty() && value.val.array.rawScalar => {
                        raw_scalar = true;
                    }
                    WJB_END_ARRAY if open.is_empty() && raw_scalar => {}
                    WJB_BEGIN_ARRAY | WJB_BEGIN_OBJECT => {
                        measure.bytes += separator(&mut open, &mut after_key) + 1;
                        open.push(0);
                        measure.depth = measure.depth.max(open.len());
                    }
                    WJB_END_ARRAY | WJB_END_OBJECT => {
                        measure.bytes += 1;
                        open.pop();
                    }
                    WJB_KEY => {
                        measure.bytes +=
                            separator(&mut open, &mut after_key) + scalar_len(&value) + 1;
                        after_key = true;
                    }
                    _ => {
                        measure.bytes += separator(&mut open, &mut after_key) + scalar_len(&value);
                    }
                }
            }
            if detoasted != original {
                pg_sys::pfree(detoasted.cast());
            }
        }
        measure
    }
}

/// The `,` before an element or a key, if it is not the first of its container.
fn separator(open: &mut [usize], after_key: &mut bool) -> usize {
    if std::mem::take(after_key) {
        return 0;
    }
    match open.last_mut() {
        Some(seen) => {
            *seen += 1;
            usize::from(*seen > 1)
        }
        None => 0,
    }
}

/// Length of a scalar's JSON text, escapes included.
unsafe fn scalar_len(value: &pg_sys::JsonbValue) -> usize {
    use pg_sys::jbvType as jbv;
    unsafe {
        match value.type_ {
            jbv::jbvNull => 4,
            jbv::jbvBool if value.val.boolean => 4,
            jbv::jbvBool => 5,
            jbv::jbvString => {
                let string = value.val.string;
                let bytes = std::slice::from_raw_parts(
                    string.val.cast::<u8>(),
                    usize::try_from(string.len).unwrap_or(0),
                );
                2 + bytes
                    .iter()
                    .map(|&b| match b {
                        b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
                        0..=0x1f => 6,
                        _ => 1,
                    })
                    .sum::<usize>()
            }
            jbv::jbvNumeric => direct_function_call::<&CStr>(
                pg_sys::numeric_out,
                &[Some(pg_sys::Datum::from(value.val.numeric))],
            )
            .map(|text| {
                let len = text.to_bytes().len();
                pg_sys::pfree(text.as_ptr() as *mut std::ffi::c_void);
                len
            })
            .unwrap_or(1),
            _ => 1,
        }
    }
}

/// Refuses `value` (called `what`) if it is over the JSON limits: 1 MiB of
/// text, 64 levels of nesting. SQLSTATE 54000. NULL passes.
#[pg_extern(name = "_check_json", immutable, parallel_safe)]
fn check_json(value: Option<JsonbArg>, what: Option<&str>) -> std::result::Result<(), ErrorReport> {
    if let Some(value) = value {
        value.check(what.unwrap_or("value"))?;
    }
    Ok(())
}

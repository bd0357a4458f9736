//! Telling a restore apart: pg_dump's data section, loaded by psql or
//! pg_restore, copies rows in whatever state they had, with their own
//! timestamps; the triggers must neither refuse them nor record events again
//! (the undelivered events are restored with the outbox).
use pgrx::prelude::*;

/// Whether the statement running is a `COPY` into a `synapse` table: a
/// restore (see `events.sql`). Only the owner of the tables can COPY into
/// them, so this opens nothing to the users of the API. Looks at the first
/// bytes of the query text in place: the row triggers ask for every row, and
/// a copy of a long statement (a large blueprint) per row would cost more
/// than the row.
#[pg_extern(name = "_restoring", stable, parallel_safe)]
pub fn restoring() -> bool {
    // SAFETY: debug_query_string is the running statement's text (or NULL),
    // valid while it runs; only read here.
    let query = unsafe { pg_sys::debug_query_string };
    if query.is_null() {
        return false;
    }
    // SAFETY: a NUL-terminated string, per the above.
    let text = unsafe { std::ffi::CStr::from_ptr(query) }.to_bytes();
    is_copy_into_synapse(text)
}

/// `^\s*copy\s+synapse\.`, case-insensitively.
fn is_copy_into_synapse(text: &[u8]) -> bool {
    let text = text.trim_ascii_start();
    let Some(rest) = text
        .get(..4)
        .filter(|word| word.eq_ignore_ascii_case(b"copy"))
        .map(|_| &text[4..])
    else {
        return false;
    };
    let table = rest.trim_ascii_start();
    table.len() < rest.len() && table.len() >= 8 && table[..8].eq_ignore_ascii_case(b"synapse.")
}

#[cfg(test)]
mod tests {
    use super::is_copy_into_synapse;

    #[test]
    fn only_a_copy_into_a_synapse_table_is_a_restore() {
        assert!(is_copy_into_synapse(b"COPY synapse.tasks (id) FROM stdin;"));
        assert!(is_copy_into_synapse(b"  \n copy\tSynapse.goals FROM stdin"));
        assert!(!is_copy_into_synapse(b"COPYsynapse.tasks"));
        assert!(!is_copy_into_synapse(b"COPY public.t FROM stdin"));
        assert!(!is_copy_into_synapse(
            b"SELECT synapse.submit_plan('COPY synapse.x')"
        ));
        assert!(!is_copy_into_synapse(b"copy"));
        assert!(!is_copy_into_synapse(b""));
    }
}

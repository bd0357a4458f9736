//! Telling a restore apart: pg_dump's data section, loaded by psql or
//! pg_restore, copies rows in whatever state they had, with their own
//! timestamps; the triggers must neither refuse them nor record events again
//! (the undelivered events are restored with the outbox).
use pgrx::prelude::*;

/// Whether the statement running is a `COPY` into a `synapse` table: a
/// restore (see `events.sql`). Only the owner of the tables can COPY into
/// them, so this opens nothing to the users of the API. The row triggers ask
/// for every row, and the statement may be long (a blueprint written out in
/// it): its text is read in place, and no further than the words looked for.
#[pg_extern(name = "_restoring", stable, parallel_safe)]
pub fn restoring() -> bool {
    // SAFETY: debug_query_string is the running statement's text (or NULL),
    // valid while it runs; only read here.
    let query = unsafe { pg_sys::debug_query_string };
    if query.is_null() {
        return false;
    }
    // SAFETY: a NUL-terminated string, read byte by byte up to its NUL at
    // most (the iterator stops there).
    let bytes = (0..)
        .map(|at| unsafe { *query.add(at) } as u8)
        .take_while(|&byte| byte != 0);
    is_copy_into_synapse(bytes)
}

/// `^\s*copy\s+synapse\.`, case-insensitively, reading `text` no further
/// than it must to tell.
fn is_copy_into_synapse(text: impl Iterator<Item = u8>) -> bool {
    let mut text = text.skip_while(u8::is_ascii_whitespace).peekable();
    if !starts_with(&mut text, b"copy") {
        return false;
    }
    let mut spaced = false;
    while text.next_if(u8::is_ascii_whitespace).is_some() {
        spaced = true;
    }
    spaced && starts_with(&mut text, b"synapse.")
}

/// Whether `text` goes on with `word` (any case), read up to the first byte
/// that differs.
fn starts_with(text: &mut impl Iterator<Item = u8>, word: &[u8]) -> bool {
    word.iter().all(|wanted| {
        text.next()
            .is_some_and(|byte| byte.eq_ignore_ascii_case(wanted))
    })
}

#[cfg(test)]
mod tests {
    use super::is_copy_into_synapse;

    fn copy_into_synapse(text: &[u8]) -> bool {
        is_copy_into_synapse(text.iter().copied())
    }

    #[test]
    fn only_a_copy_into_a_synapse_table_is_a_restore() {
        assert!(copy_into_synapse(b"COPY synapse.tasks (id) FROM stdin;"));
        assert!(copy_into_synapse(b"  \n copy\tSynapse.goals FROM stdin"));
        assert!(!copy_into_synapse(b"COPYsynapse.tasks"));
        assert!(!copy_into_synapse(b"COPY public.t FROM stdin"));
        assert!(!copy_into_synapse(b"COPY synapse"));
        assert!(!copy_into_synapse(
            b"SELECT synapse.submit_plan('COPY synapse.x')"
        ));
        assert!(!copy_into_synapse(b"copy"));
        assert!(!copy_into_synapse(b""));
    }

    /// Every row a statement writes asks: a statement carrying a 2 MB
    /// blueprint must not be read through once per row.
    #[test]
    fn reads_a_statement_no_further_than_the_words_it_looks_for() {
        let tail = vec![b'x'; 2 << 20];
        for (statement, at_most) in [
            (&b"SELECT synapse.submit_plan('"[..], 1),
            (&b"  COPY public.t FROM stdin; "[..], 2 + 4 + 1 + 1),
            (&b"COPY synapse.tasks (id) FROM stdin; "[..], 4 + 1 + 8),
        ] {
            let mut read = 0;
            let text = [statement, &tail].concat();
            is_copy_into_synapse(text.iter().copied().inspect(|_| read += 1));
            assert!(
                read <= at_most,
                "{read} bytes read of {:?}…",
                String::from_utf8_lossy(statement)
            );
        }
    }
}

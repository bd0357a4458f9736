//! Every task and edge a plan writes is checked against `synapse.goals` by
//! its foreign key, with a plan Postgres keeps for the session. Made while
//! the table was a page or two (a fresh install), that plan scans the table,
//! and keeps scanning it as one transaction submits thousands of goals:
//! each goal's check reads every goal before it. Each time the table has
//! doubled in this session (from 8 pages on, where a probe beats a scan),
//! the session's cached plans are dropped, and the checks are planned for
//! its size. Only this session's: other sessions (a worker's engine) keep
//! theirs, and re-plan when autovacuum analyses the table.
use std::cell::Cell;

use pgrx::pg_sys;

thread_local! {
    /// The table's size in pages when its plans were last dropped (or first seen).
    static PLANNED_AT: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Below this many pages a scan costs about what a probe by id does.
const SMALL: u32 = 8;

/// Drops the session's cached plans once `synapse.goals` has doubled since
/// they were last dropped.
pub(super) fn replan_goal_checks_as_goals_grow() {
    // SAFETY: catalogue lookups by name inside a transaction; the table is
    // opened with a lock this transaction already holds or may take (it
    // writes goals), and closed keeping it. Resetting the plan cache only
    // marks plans to be made again at their next use.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"synapse".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return;
        }
        let goals = pg_sys::get_relname_relid(c"goals".as_ptr(), schema);
        if goals == pg_sys::InvalidOid {
            return;
        }
        let relation = pg_sys::table_open(goals, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let pages =
            pg_sys::RelationGetNumberOfBlocksInFork(relation, pg_sys::ForkNumber::MAIN_FORKNUM);
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        if doubled(pages) {
            pg_sys::ResetPlanCache();
        }
    }
}

/// Whether `pages` is at least twice the size last planned at (and past
/// [`SMALL`]); remembers it if so, or if it is the first size seen.
fn doubled(pages: u32) -> bool {
    PLANNED_AT.with(|planned_at| match planned_at.get() {
        None => {
            planned_at.set(Some(pages.max(1)));
            false
        }
        Some(planned) if pages >= SMALL && pages >= planned.saturating_mul(2) => {
            planned_at.set(Some(pages));
            true
        }
        Some(_) => false,
    })
}

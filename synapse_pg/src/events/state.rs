//! The goal and task state machines. Before each row is written, its status
//! change is checked and stamped with the time of the statement that made it,
//! not the transaction's: a sql step's outcome is recorded, and its
//! successors started, in the transaction that ran its query, begun before
//! the query ran.
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::convert::Infallible;

use super::columns::{goal, goal_columns, task, task_columns, Values};
use super::restore::restoring;

/// A status change the state machine refuses: nothing is written.
fn refuse(code: PgSqlErrorCode, message: String) -> ! {
    ereport!(PgLogLevel::ERROR, code, message);
    unreachable!("ereport(ERROR) does not return")
}

/// The row a BEFORE trigger is writing, with the columns it set.
struct Writing {
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    columns: Vec<i32>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

impl Writing {
    fn set(&mut self, column: usize, value: Option<pg_sys::Datum>) {
        self.columns.push(column as i32);
        self.values.push(value.unwrap_or(pg_sys::Datum::from(0)));
        self.nulls.push(value.is_none());
    }

    fn stamp(&mut self, column: usize) {
        // SAFETY: reads the statement's start time; no error path.
        let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
        self.set(column, Some(pg_sys::Datum::from(now)));
    }

    /// The row to write, once `holds` (what every row of its table must
    /// hold) accepts it: the trigger's own, or a copy with the columns set.
    fn into_row<'a, const N: usize>(
        mut self,
        at: [usize; N],
        holds: impl FnOnce(&Values<N>),
    ) -> PgHeapTuple<'a, AllocatedByPostgres> {
        let tuple = if self.columns.is_empty() {
            self.tuple
        } else {
            // SAFETY: a live tuple of this descriptor; the columns are its own.
            unsafe {
                pg_sys::heap_modify_tuple_by_cols(
                    self.tuple,
                    self.tupdesc,
                    self.columns.len() as i32,
                    self.columns.as_mut_ptr(),
                    self.values.as_mut_ptr(),
                    self.nulls.as_mut_ptr(),
                )
            }
        };
        // SAFETY: the tuple is the trigger's or a palloc'd copy of it, both
        // described by the relation's descriptor (which outlives the call).
        holds(&unsafe { Values::of_tuple(tuple, self.tupdesc, at) });
        // SAFETY: as above.
        unsafe { PgHeapTuple::from_heap_tuple(PgTupleDesc::from_pg_unchecked(self.tupdesc), tuple) }
    }
}

/// What a goal row must hold, whatever wrote it: the columns its status
/// needs, and both or neither of its parent's ids. `is_set` says whether a
/// column (of [`goal`]) is not NULL. Checked here, not by CHECK constraints:
/// Postgres parses a table's checks again at every statement that writes it,
/// and these tables are written by several statements per task.
fn goal_row_problem(status: &str, is_set: impl Fn(usize) -> bool) -> Option<&'static str> {
    let ended = matches!(status, "succeeded" | "failed" | "cancelled");
    if ended != is_set(goal::FINISHED_AT) {
        return Some(if ended {
            "an ended goal needs finished_at"
        } else {
            "only an ended goal has finished_at"
        });
    }
    if is_set(goal::PARENT_GOAL) != is_set(goal::PARENT_TASK) {
        return Some("parent_goal_id and parent_task_id are set together");
    }
    match status {
        "running" if !is_set(goal::BLUEPRINT) => Some("a running goal needs its blueprint"),
        "failed" if !is_set(goal::ERROR) => Some("a failed goal needs its error"),
        _ => None,
    }
}

/// What a task row must hold, whatever wrote it: the timestamps its status
/// needs (see [`goal_row_problem`]).
fn task_row_problem(status: &str, is_set: impl Fn(usize) -> bool) -> Option<&'static str> {
    let ended = matches!(status, "succeeded" | "failed" | "skipped" | "cancelled");
    if ended != is_set(task::FINISHED_AT) {
        return Some(if ended {
            "an ended task needs finished_at"
        } else {
            "only an ended task has finished_at"
        });
    }
    match status {
        "queued" if !is_set(task::QUEUED_AT) => Some("a queued task needs queued_at"),
        "running" if !is_set(task::LEASE_EXPIRES_AT) => {
            Some("a running task needs lease_expires_at")
        }
        "retrying" if !is_set(task::RUN_AT) => Some("a retrying task needs run_at"),
        _ => None,
    }
}

fn goal_holds(row: &Values<9>) {
    let status = row.text(goal::STATUS).unwrap_or_default();
    if let Some(problem) = goal_row_problem(&status, |column| !row.is_null(column)) {
        refuse(
            PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
            format!(
                "goal {} ({status}): {problem}",
                row.bigint(goal::ID).unwrap_or_default()
            ),
        )
    }
}

fn task_holds(row: &Values<16>) {
    let status = row.text(task::STATUS).unwrap_or_default();
    if let Some(problem) = task_row_problem(&status, |column| !row.is_null(column)) {
        refuse(
            PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
            format!(
                "task {} (step {}, {status}): {problem}",
                row.bigint(task::ID).unwrap_or_default(),
                row.text(task::STEP).unwrap_or_default()
            ),
        )
    }
}

/// The new row of a BEFORE ROW trigger, and the old one of an UPDATE.
///
/// # Safety
/// `trigger` is a firing BEFORE ROW INSERT or UPDATE trigger.
unsafe fn rows<const N: usize>(
    trigger: &pg_sys::TriggerData,
    at: [usize; N],
) -> (Writing, Option<Values<N>>, Values<N>) {
    // SAFETY: per this function's contract.
    unsafe {
        let tupdesc = (*trigger.tg_relation).rd_att;
        let inserting = pgrx::trigger_support::trigger_fired_by_insert(trigger.tg_event);
        let (new, old) = if inserting {
            (trigger.tg_trigtuple, None)
        } else {
            (trigger.tg_newtuple, Some(trigger.tg_trigtuple))
        };
        let writing = Writing {
            tuple: new,
            tupdesc,
            columns: Vec::new(),
            values: Vec::new(),
            nulls: Vec::new(),
        };
        let old = old.map(|old| Values::of_tuple(old, tupdesc, at));
        let new = Values::of_tuple(new, tupdesc, at);
        (writing, old, new)
    }
}

/// Whether a goal may go from `old` to `new`.
fn goal_may_change(old: &str, new: &str) -> bool {
    match old {
        "submitted" => matches!(new, "planning" | "running" | "failed" | "cancelled"),
        "planning" => matches!(new, "submitted" | "running" | "failed" | "cancelled"),
        "running" => matches!(new, "succeeded" | "failed" | "cancelled"),
        // retry_goal runs a finished goal again.
        _ => new == "running",
    }
}

/// BEFORE INSERT, and BEFORE UPDATE of its status or of a column its status
/// needs, of each goal: a status change is checked and stamped, and every
/// row written holds what [`goal_row_problem`] asks.
#[pg_trigger]
fn _goal_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let data = trigger.trigger_data();
    let at = goal_columns(data.tg_relation);
    // SAFETY: this is a BEFORE ROW trigger of goals (events.sql).
    let (mut writing, old, new) = unsafe { rows(data, at) };
    // A NULL status is left for the column's NOT NULL to refuse.
    let Some(status) = new.text(goal::STATUS) else {
        return Ok(Some(writing.into_row(at, |_| {})));
    };
    match old.as_ref().map(|old| old.text(goal::STATUS)) {
        None if restoring() => return Ok(Some(writing.into_row(at, goal_holds))),
        Some(Some(was)) if was == status => return Ok(Some(writing.into_row(at, goal_holds))),
        None if !matches!(status.as_str(), "submitted" | "running" | "failed") => refuse(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("a new goal cannot start as {status}"),
        ),
        Some(Some(was)) if !goal_may_change(&was, &status) => refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "goal {}: status cannot change from {was} to {status}",
                new.bigint(goal::ID).unwrap_or_default()
            ),
        ),
        _ => {}
    }
    match status.as_str() {
        "submitted" => writing.stamp(at[goal::DISPATCHED_AT]),
        "running" => writing.stamp(at[goal::STARTED_AT]),
        "succeeded" | "failed" | "cancelled" => writing.stamp(at[goal::FINISHED_AT]),
        _ => {}
    }
    Ok(Some(writing.into_row(at, goal_holds)))
}

/// What of the new row decides whether a task may take a status.
struct TaskKind {
    is_map: bool,
    is_wait: bool,
    has_child_goal: bool,
    attempts: i32,
}

/// Whether a task may go from `old` to `new`.
fn task_may_change(old: &str, new: &str, kind: &TaskKind) -> bool {
    match old {
        // Only a map step waits for its instances, or succeeds unrun (an
        // empty list); a wait step waits without being queued.
        // A worker claims a step it queues for its own free slot in the
        // same write (local continuation): queued and running at once.
        "pending" => {
            matches!(new, "queued" | "skipped" | "failed" | "cancelled")
                || (new == "running" && !kind.is_map && !kind.is_wait)
                || (matches!(new, "waiting" | "succeeded") && kind.is_map)
                || (new == "waiting" && kind.is_wait)
        }
        "queued" => matches!(new, "running" | "cancelled"),
        // A goal step waits for its child goal, and retries with a new one.
        "running" => {
            matches!(
                new,
                "succeeded" | "failed" | "retrying" | "queued" | "cancelled"
            ) || (new == "waiting" && kind.has_child_goal)
        }
        "retrying" => matches!(new, "queued" | "cancelled"),
        "waiting" => {
            matches!(new, "succeeded" | "failed" | "cancelled")
                || (new == "retrying" && kind.has_child_goal)
        }
        // retry_goal: an ended step starts afresh, its attempts from 1 again.
        _ => new == "pending" && kind.attempts == 0,
    }
}

/// BEFORE INSERT, and BEFORE UPDATE of its status or of a timestamp its
/// status needs, of each task: as [`_goal_changed`] for goals.
#[pg_trigger]
fn _task_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let data = trigger.trigger_data();
    let at = task_columns(data.tg_relation);
    // SAFETY: this is a BEFORE ROW trigger of tasks (events.sql).
    let (mut writing, old, new) = unsafe { rows(data, at) };
    let Some(status) = new.text(task::STATUS) else {
        return Ok(Some(writing.into_row(at, |_| {})));
    };
    let old_status = old.as_ref().map(|old| old.text(task::STATUS));
    match old_status.as_ref().map(Option::as_deref) {
        None if restoring() => return Ok(Some(writing.into_row(at, task_holds))),
        Some(Some(was)) if was == status => return Ok(Some(writing.into_row(at, task_holds))),
        None if !matches!(status.as_str(), "pending" | "queued") => refuse(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("a new task cannot start as {status}"),
        ),
        Some(Some(was)) => {
            let kind = TaskKind {
                is_map: !new.is_null(task::FOR_EACH),
                is_wait: new.text(task::ACTION).as_deref() == Some("wait"),
                has_child_goal: !new.is_null(task::CHILD_GOAL),
                attempts: new.integer(task::ATTEMPTS).unwrap_or(-1),
            };
            if !task_may_change(was, &status, &kind) {
                refuse(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "task {} (step {}): status cannot change from {was} to {status}",
                        new.bigint(task::ID).unwrap_or_default(),
                        new.text(task::STEP).unwrap_or_default()
                    ),
                )
            }
        }
        _ => {}
    }
    // Queued, or queued and claimed at once (pending → running).
    let was_pending = old_status.flatten().as_deref() == Some("pending");
    if status == "queued" || (status == "running" && was_pending) {
        writing.stamp(at[task::QUEUED_AT]);
        writing.set(at[task::RUN_AT], None);
    }
    match status.as_str() {
        "running" | "waiting" => writing.stamp(at[task::STARTED_AT]),
        "succeeded" | "failed" | "skipped" | "cancelled" => writing.stamp(at[task::FINISHED_AT]),
        _ => {}
    }
    if status != "running" {
        if !new.is_null(task::LEASE_EXPIRES_AT) {
            writing.set(at[task::LEASE_EXPIRES_AT], None);
        }
        if !new.is_null(task::LEASED_BY) {
            writing.set(at[task::LEASED_BY], None);
        }
    }
    Ok(Some(writing.into_row(at, task_holds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_holds_the_columns_its_status_needs() {
        let set = |columns: &'static [usize]| move |column: usize| columns.contains(&column);
        assert_eq!(task_row_problem("pending", set(&[])), None);
        assert_eq!(
            task_row_problem("running", set(&[])),
            Some("a running task needs lease_expires_at")
        );
        assert_eq!(
            task_row_problem("running", set(&[task::LEASE_EXPIRES_AT])),
            None
        );
        assert_eq!(
            task_row_problem("queued", set(&[])),
            Some("a queued task needs queued_at")
        );
        assert_eq!(
            task_row_problem("retrying", set(&[])),
            Some("a retrying task needs run_at")
        );
        assert_eq!(
            task_row_problem("skipped", set(&[])),
            Some("an ended task needs finished_at")
        );
        assert_eq!(
            task_row_problem("pending", set(&[task::FINISHED_AT])),
            Some("only an ended task has finished_at")
        );
        assert_eq!(goal_row_problem("submitted", set(&[])), None);
        assert_eq!(
            goal_row_problem("running", set(&[])),
            Some("a running goal needs its blueprint")
        );
        assert_eq!(
            goal_row_problem("failed", set(&[goal::FINISHED_AT])),
            Some("a failed goal needs its error")
        );
        assert_eq!(
            goal_row_problem("succeeded", set(&[])),
            Some("an ended goal needs finished_at")
        );
        assert_eq!(
            goal_row_problem("submitted", set(&[goal::PARENT_GOAL])),
            Some("parent_goal_id and parent_task_id are set together")
        );
        assert_eq!(
            goal_row_problem("submitted", set(&[goal::PARENT_GOAL, goal::PARENT_TASK])),
            None
        );
    }

    #[test]
    fn a_goal_runs_again_only_once_it_ended() {
        assert!(goal_may_change("submitted", "planning"));
        assert!(goal_may_change("planning", "submitted"));
        assert!(!goal_may_change("running", "submitted"));
        assert!(goal_may_change("failed", "running"));
        assert!(!goal_may_change("succeeded", "failed"));
    }

    #[test]
    fn only_a_map_a_wait_or_a_goal_step_waits() {
        let plain = TaskKind {
            is_map: false,
            is_wait: false,
            has_child_goal: false,
            attempts: 1,
        };
        assert!(!task_may_change("pending", "waiting", &plain));
        assert!(!task_may_change("running", "waiting", &plain));
        assert!(task_may_change(
            "pending",
            "waiting",
            &TaskKind {
                is_map: true,
                ..plain
            }
        ));
        assert!(task_may_change(
            "pending",
            "waiting",
            &TaskKind {
                is_wait: true,
                ..plain
            }
        ));
        assert!(task_may_change(
            "running",
            "waiting",
            &TaskKind {
                has_child_goal: true,
                ..plain
            }
        ));
        assert!(!task_may_change("succeeded", "pending", &plain));
        assert!(task_may_change(
            "succeeded",
            "pending",
            &TaskKind {
                attempts: 0,
                ..plain
            }
        ));
        assert!(!task_may_change("queued", "succeeded", &plain));
    }

    #[test]
    fn only_a_step_that_runs_on_a_worker_is_claimed_as_it_is_queued() {
        let plain = TaskKind {
            is_map: false,
            is_wait: false,
            has_child_goal: false,
            attempts: 0,
        };
        assert!(task_may_change("pending", "running", &plain));
        for kind in [
            TaskKind {
                is_map: true,
                ..plain
            },
            TaskKind {
                is_wait: true,
                ..plain
            },
        ] {
            assert!(!task_may_change("pending", "running", &kind));
        }
        assert!(!task_may_change("retrying", "running", &plain));
    }
}

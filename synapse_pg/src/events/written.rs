//! The events of a statement: after each INSERT or UPDATE of goals or tasks,
//! one event per row whose status it set (rows an `ON CONFLICT DO NOTHING`
//! skipped are not in its transition tables), recorded with one INSERT.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::convert::Infallible;

use super::columns::{each_row, goal, goal_columns, task, task_columns, Values};
use super::outbox::{as_role, emit, Event};
use super::payload::{goal_event, TaskEvent};
use super::restore::restoring;
use crate::prepared::{oid, prepared};

/// What a statement trigger needs of the firing trigger.
struct Statement<'a> {
    data: &'a pg_sys::TriggerData,
    inserting: bool,
    /// The tables' owner: the events are written with its rights, as the
    /// roles using the API may not write the outbox.
    owner: pg_sys::Oid,
}

impl<'a> Statement<'a> {
    /// The firing statement, or None for a restore's INSERT: the restored
    /// outbox already holds the events still owed.
    fn of(trigger: &'a pgrx::PgTrigger<'a>) -> Option<Self> {
        let data = trigger.trigger_data();
        let inserting = pgrx::trigger_support::trigger_fired_by_insert(data.tg_event);
        (!(inserting && restoring())).then(|| Statement {
            data,
            inserting,
            // SAFETY: the relation the trigger fired for, open while it runs.
            owner: unsafe { (*(*data.tg_relation).rd_rel).relowner },
        })
    }

    /// The rows of one of the statement's transition tables (`new` or old),
    /// each read by `read`, its columns at `at`.
    fn rows<const N: usize, T>(
        &self,
        at: [usize; N],
        new: bool,
        mut read: impl FnMut(&Values<N>) -> T,
    ) -> Vec<T> {
        let table = if new {
            self.data.tg_newtable
        } else {
            self.data.tg_oldtable
        };
        let mut rows = Vec::new();
        // SAFETY: a transition table of the firing trigger, whose rows are
        // the relation's.
        unsafe {
            each_row(table, (*self.data.tg_relation).rd_att, at, |row| {
                rows.push(read(row))
            })
        };
        rows
    }
}

struct GoalRow {
    id: i64,
    status: String,
    parent_task_id: Option<i64>,
}

/// `goal.<status>` for each inserted goal, or each goal whose status an
/// UPDATE changed (`planning` is internal to the planner: no event).
#[pg_trigger]
fn _goals_written<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let Some(statement) = Statement::of(trigger) else {
        return Ok(None);
    };
    let mut new = statement.rows(goal_columns(statement.data.tg_relation), true, |row| {
        GoalRow {
            id: row.bigint(goal::ID).unwrap_or_default(),
            status: row.text(goal::STATUS).unwrap_or_default(),
            parent_task_id: row.bigint(goal::PARENT_TASK),
        }
    });
    new.sort_unstable_by_key(|goal| goal.id);
    let events: Vec<Event> = if statement.inserting {
        new.iter()
            .map(|goal| goal_event(&format!("goal.{}", goal.status), goal.id, None, None))
            .collect()
    } else {
        let old: HashMap<i64, String> = statement
            .rows(goal_columns(statement.data.tg_relation), false, |row| {
                (
                    row.bigint(goal::ID).unwrap_or_default(),
                    row.text(goal::STATUS).unwrap_or_default(),
                )
            })
            .into_iter()
            .collect();
        as_role(statement.owner, || {
            new.iter()
                .filter(|goal| goal.status != "planning")
                .filter_map(|goal| {
                    let was = old.get(&goal.id)?;
                    (*was != goal.status).then(|| {
                        let to_queue = queue_acting_on(goal, was);
                        goal_event(
                            &format!("goal.{}", goal.status),
                            goal.id,
                            goal.parent_task_id,
                            to_queue.as_deref(),
                        )
                    })
                })
                .collect()
        })
    };
    emit(events, Some(statement.owner));
    Ok(None)
}

fn ended(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// The queue of a worker that must act on a goal's change, if one must: a
/// child goal's end goes to its parent step's queue; a goal run again, to the
/// queue of a step that can start (a wait step needs no particular worker:
/// the others' queues first). Statements with every name qualified: they run
/// with the owner's rights.
fn queue_acting_on(goal: &GoalRow, was: &str) -> Option<String> {
    let looked_up: Result<Option<String>, pgrx::spi::Error> = if let Some(parent) =
        goal.parent_task_id.filter(|_| ended(&goal.status))
    {
        Spi::connect(|client| {
            let statement = prepared(
                client,
                "SELECT queue FROM synapse.tasks WHERE id OPERATOR(pg_catalog.=) $1",
                &[oid(PgBuiltInOids::INT8OID)],
            )?;
            let queue = client
                .select(&*statement, Some(1), &[parent.into()])?
                .next()
                .map(|row| row.get::<String>(1))
                .transpose()?;
            Ok(queue.flatten())
        })
    } else if goal.status == "running" && ended(was) {
        Spi::connect(|client| {
            let statement = prepared(
                client,
                "SELECT queue, pending_inbound OPERATOR(pg_catalog.>) 0, action OPERATOR(pg_catalog.=) 'wait', id
                   FROM synapse.tasks
                  WHERE goal_id OPERATOR(pg_catalog.=) $1 AND status OPERATOR(pg_catalog.=) 'pending'
                    AND map_index IS NULL",
                &[oid(PgBuiltInOids::INT8OID)],
            )?;
            let mut steps = Vec::new();
            for row in client.select(&*statement, None, &[goal.id.into()])? {
                steps.push((
                    row.get::<bool>(2)?.unwrap_or(true),
                    row.get::<bool>(3)?.unwrap_or(true),
                    row.get::<i64>(4)?.unwrap_or_default(),
                    row.get::<String>(1)?,
                ));
            }
            steps.sort_unstable_by_key(|(waits, is_wait, id, _)| (*waits, *is_wait, *id));
            Ok(steps.into_iter().next().and_then(|(.., queue)| queue))
        })
    } else {
        return None;
    };
    match looked_up {
        Ok(queue) => queue,
        Err(error) => error!(
            "synapse: could not find the queue of goal {}: {error}",
            goal.id
        ),
    }
}

struct TaskRow {
    id: i64,
    goal_id: i64,
    step: String,
    queue: String,
    status: String,
    attempts: i32,
    map_index: Option<i32>,
    lease_expires_at: Option<i64>,
    run_at: Option<i64>,
    is_map: bool,
    is_wait: bool,
}

impl TaskRow {
    fn event(&self, event: &str, attempt: i32, due_at: Option<i64>, to_worker: bool) -> Event {
        TaskEvent {
            event,
            goal_id: self.goal_id,
            task_id: self.id,
            step: &self.step,
            queue: &self.queue,
            attempt,
            due_at,
            to_worker,
            map_index: self.map_index,
        }
        .event()
    }
}

/// `task.<status>` for each task whose status an UPDATE changed, and
/// `task.queued` for each task inserted queued (pending ones wait silently).
#[pg_trigger]
fn _tasks_written<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, Infallible> {
    let Some(statement) = Statement::of(trigger) else {
        return Ok(None);
    };
    let mut new = statement.rows(task_columns(statement.data.tg_relation), true, |row| {
        TaskRow {
            id: row.bigint(task::ID).unwrap_or_default(),
            goal_id: row.bigint(task::GOAL).unwrap_or_default(),
            step: row.text(task::STEP).unwrap_or_default(),
            queue: row.text(task::QUEUE).unwrap_or_default(),
            status: row.text(task::STATUS).unwrap_or_default(),
            attempts: row.integer(task::ATTEMPTS).unwrap_or_default(),
            map_index: row.integer(task::MAP_INDEX),
            lease_expires_at: row.timestamp(task::LEASE_EXPIRES_AT),
            run_at: row.timestamp(task::RUN_AT),
            is_map: !row.is_null(task::FOR_EACH),
            is_wait: row.text(task::ACTION).as_deref() == Some("wait"),
        }
    });
    new.sort_unstable_by_key(|task| task.id);
    let events: Vec<Event> = if statement.inserting {
        new.iter()
            .filter(|task| task.status == "queued")
            .map(|task| task.event("task.queued", task.attempts + 1, None, false))
            .collect()
    } else {
        let old: HashMap<i64, (String, Option<i64>)> = statement
            .rows(task_columns(statement.data.tg_relation), false, |row| {
                (
                    row.bigint(task::ID).unwrap_or_default(),
                    (
                        row.text(task::STATUS).unwrap_or_default(),
                        row.timestamp(task::LEASE_EXPIRES_AT),
                    ),
                )
            })
            .into_iter()
            .collect();
        // SAFETY: reads the transaction's start time; no error path.
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        new.iter()
            .filter(|task| task.status != "pending")
            .filter_map(|task| {
                let (was, lease) = old.get(&task.id)?;
                (*was != task.status).then(|| task_changed(task, was, *lease, now))
            })
            .flatten()
            .collect()
    };
    emit(events, Some(statement.owner));
    Ok(None)
}

/// The events of a task whose status changed from `was`: one, or two for a
/// step queued and claimed in one write (local continuation), whose
/// `task.queued` dispatches nothing: it runs already.
fn task_changed(task: &TaskRow, was: &str, old_lease: Option<i64>, now: i64) -> Vec<Event> {
    let changed = task_status_event(task, was, old_lease, now);
    if was == "pending" && task.status == "running" {
        let queued = Event {
            dispatch: None,
            ..task.event("task.queued", task.attempts, None, false)
        };
        return vec![queued, changed];
    }
    vec![changed]
}

/// The `task.<status>` event of a task whose status changed from `was`.
fn task_status_event(task: &TaskRow, was: &str, old_lease: Option<i64>, now: i64) -> Event {
    let status = task.status.as_str();
    let attempt = if status == "queued" {
        task.attempts + 1
    } else {
        task.attempts
    };
    let due_at = match status {
        "running" => task.lease_expires_at,
        "retrying" | "waiting" => task.run_at,
        _ => None,
    };
    // The last attempt's lease lapsed (the forwarder failed it), a root map
    // step's list was empty when its plan was installed, or a wait ended (its
    // signal came, or its time): no worker is there to resolve its edges, so
    // one is asked to.
    let to_worker =
        (status == "failed" && was == "running" && old_lease.is_some_and(|at| at <= now))
            || (status == "succeeded" && was == "pending" && task.is_map)
            || (matches!(status, "succeeded" | "failed") && was == "waiting" && task.is_wait);
    task.event(&format!("task.{status}"), attempt, due_at, to_worker)
}

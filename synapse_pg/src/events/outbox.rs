//! Recording events: one outbox row per event, in the transaction that made
//! the change, written with one statement for all the events of a statement.
use pgrx::composite_type;
use pgrx::prelude::*;

use super::wake::{timers_due, writing_observed_only};
use crate::gucs::{self, Observe};
use crate::prepared::{oid, prepared};

extension_sql!(
    r#"
-- One event: the outbox row to write. dispatch names the Redis list (without
-- prefix) that also gets the payload: 'planner' or 'queue:<name>'.
CREATE TYPE synapse._event AS (event text, goal_id bigint, task_id bigint, dispatch text, payload text, due_at timestamptz);
"#,
    name = "event_type",
    requires = ["schema"]
);

/// One outbox row.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `task.queued`, `goal.succeeded`, …
    pub name: String,
    pub goal_id: i64,
    pub task_id: Option<i64>,
    /// The Redis list (without prefix) that also gets the payload.
    pub dispatch: Option<String>,
    pub payload: String,
    /// When a timer of the forwarder is due because of it: a retry's
    /// `run_at`, a claim's lease expiry (microseconds since 2000-01-01).
    pub due_at: Option<i64>,
}

impl Event {
    /// As a `synapse._event` value.
    pub fn into_composite(self) -> composite_type!('static, "synapse._event") {
        let mut row = PgHeapTuple::new_composite_type("synapse._event")
            .expect("synapse._event is part of the extension");
        let due_at = self.due_at.and_then(timestamptz);
        let set = (|| {
            row.set_by_name("event", self.name)?;
            row.set_by_name("goal_id", self.goal_id)?;
            row.set_by_name("task_id", self.task_id)?;
            row.set_by_name("dispatch", self.dispatch)?;
            row.set_by_name("payload", self.payload)?;
            row.set_by_name("due_at", due_at)
        })();
        if let Err(error) = set {
            error!("synapse._event does not have the expected columns: {error}");
        }
        row
    }

    fn from_composite(row: &composite_type!('_, "synapse._event")) -> Option<Self> {
        let read = || -> Result<Self, pgrx::datum::TryFromDatumError> {
            Ok(Event {
                name: row.get_by_name("event")?.unwrap_or_default(),
                goal_id: row.get_by_name("goal_id")?.unwrap_or_default(),
                task_id: row.get_by_name("task_id")?,
                dispatch: row.get_by_name("dispatch")?,
                payload: row.get_by_name("payload")?.unwrap_or_default(),
                due_at: row
                    .get_by_name::<TimestampWithTimeZone>("due_at")?
                    .map(i64::from),
            })
        };
        match read() {
            Ok(event) => Some(event),
            Err(error) => error!("synapse._event does not have the expected columns: {error}"),
        }
    }

    fn finishes_a_goal(&self) -> bool {
        matches!(
            self.name.as_str(),
            "goal.succeeded" | "goal.failed" | "goal.cancelled"
        )
    }
}

/// A timestamptz of `at` microseconds since 2000-01-01.
fn timestamptz(at: i64) -> Option<TimestampWithTimeZone> {
    // SAFETY: any microsecond count is a valid timestamptz datum.
    unsafe { TimestampWithTimeZone::from_datum(at.into(), false) }
}

/// Whether `synapse.observe` keeps `event`: the events that dispatch work
/// always; goal events with `goals`; every event with `all`.
fn observed(observe: Observe, event: &Event) -> bool {
    match observe {
        Observe::All => true,
        Observe::Goals => event.dispatch.is_some() || event.task_id.is_none(),
        Observe::Dispatch => event.dispatch.is_some(),
    }
}

const INSERT: &str =
    "INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, due_at, notify)
     SELECT e.event, e.goal_id, e.task_id, e.dispatch, e.payload, e.due_at, $7
       FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),
                       pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6))
            AS e(event, goal_id, task_id, dispatch, payload, due_at)";

/// Records `events` in order; returns how many rows it wrote. Writes nothing
/// at all for no events: even an INSERT of no rows would wake the forwarder.
///
/// The deadlines the events `synapse.observe` leaves out carried (a lease
/// expiry, a retry's `run_at`, a finished goal's end of retention) reach the
/// forwarder directly.
///
/// The transaction has its id before it draws outbox ids (every writer of
/// the outbox keeps this rule): the forwarder relies on it to read only above
/// what it has forwarded once every transaction that could still commit a
/// lower id has ended, instead of wading through rows deleted but not yet
/// vacuumed.
///
/// `owner`: the role the rows are written as (the extension's owner, for a
/// trigger fired by a role that may not write the outbox itself).
pub fn emit(mut events: Vec<Event>, owner: Option<pg_sys::Oid>) -> usize {
    let observe = gucs::observe();
    if observe != Observe::All {
        let (kept, left_out): (Vec<Event>, Vec<Event>) = events
            .into_iter()
            .partition(|event| observed(observe, event));
        if !left_out.is_empty() {
            let due = left_out.iter().filter_map(|event| event.due_at).min();
            let goals_finished = left_out.iter().any(Event::finishes_a_goal);
            let due = due.and_then(timestamptz);
            timers_due(due, goals_finished);
        }
        events = kept;
    }
    if events.is_empty() {
        return 0;
    }
    // SAFETY: assigns this transaction its id if it has none; no error path
    // but the ones Postgres reports itself.
    unsafe { pg_sys::GetTopTransactionId() };
    let count = events.len();
    let dispatches = events.iter().any(|event| event.dispatch.is_some());
    let mut columns = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    for event in events {
        columns.0.push(event.name);
        columns.1.push(event.goal_id);
        columns.2.push(event.task_id);
        columns.3.push(event.dispatch);
        columns.4.push(event.payload);
        columns.5.push(event.due_at.and_then(timestamptz));
    }
    let write = || {
        Spi::connect_mut(|client| {
            let insert = prepared(
                client,
                INSERT,
                &[
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::INT8ARRAYOID),
                    oid(PgBuiltInOids::INT8ARRAYOID),
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::TIMESTAMPTZARRAYOID),
                    oid(PgBuiltInOids::BOOLOID),
                ],
            )?;
            client
                .update(
                    &*insert,
                    None,
                    &[
                        columns.0.into(),
                        columns.1.into(),
                        columns.2.into(),
                        columns.3.into(),
                        columns.4.into(),
                        columns.5.into(),
                        gucs::notify().into(),
                    ],
                )
                .map(drop)
        })
    };
    let write_as_owner = || match owner {
        Some(owner) => as_role(owner, write),
        None => write(),
    };
    let written = if dispatches {
        write_as_owner()
    } else {
        writing_observed_only(write_as_owner)
    };
    if let Err(error) = written {
        error!("synapse: could not record events: {error}");
    }
    count
}

/// Runs `f` as `role`, the way a SECURITY DEFINER function runs as its
/// owner. An error inside ends the (sub)transaction, which restores the
/// caller's role itself; the guard restores it on the way out otherwise.
pub fn as_role<T>(role: pg_sys::Oid, f: impl FnOnce() -> T) -> T {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back what GetUserIdAndSecContext answered.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut saved = Restore(pg_sys::Oid::INVALID, 0);
    // SAFETY: reads and sets the backend's current role, as fmgr does for a
    // SECURITY DEFINER function.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved.0, &mut saved.1);
        pg_sys::SetUserIdAndSecContext(role, saved.1 | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let result = f();
    drop(saved);
    result
}

/// Records events built in SQL (the sweep); returns how many rows it wrote.
#[pg_extern(name = "_emit", volatile, parallel_unsafe, requires = ["event_type"])]
fn emit_sql<'a>(events: Option<pgrx::Array<'a, composite_type!('a, "synapse._event")>>) -> i32 {
    let events = events
        .iter()
        .flat_map(|events| events.iter())
        .flatten()
        .filter_map(|event| Event::from_composite(&event))
        .collect();
    i32::try_from(emit(events, None)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, task_id: Option<i64>, dispatch: Option<&str>) -> Event {
        Event {
            name: name.to_owned(),
            goal_id: 1,
            task_id,
            dispatch: dispatch.map(str::to_owned),
            payload: String::new(),
            due_at: None,
        }
    }

    #[test]
    fn observe_keeps_what_dispatches_work_and_what_it_names() {
        let queued = event("task.queued", Some(2), Some("queue:q"));
        let running = event("task.running", Some(2), None);
        let succeeded = event("goal.succeeded", None, None);
        for observe in [Observe::All, Observe::Goals, Observe::Dispatch] {
            assert!(observed(observe, &queued));
        }
        assert!(observed(Observe::All, &running));
        assert!(!observed(Observe::Goals, &running));
        assert!(observed(Observe::Goals, &succeeded));
        assert!(!observed(Observe::Dispatch, &succeeded));
        assert!(succeeded.finishes_a_goal() && !running.finishes_a_goal());
    }
}

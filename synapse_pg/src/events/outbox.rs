//! Recording events in the outbox, in the transaction that made the change,
//! with one INSERT for all the events of a statement: one row for the events
//! of one name and list they dispatch to (or of one name that only observers
//! read), their payloads one a line.
use pgrx::composite_type;
use pgrx::prelude::*;

use super::wake::{timers_due, writing_observed_only};
use crate::gucs::{self, Observe};
use crate::installed::has_column;
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

/// What separates the payloads of the events an outbox row carries: a
/// payload is compact JSON, on one line.
const PAYLOAD_SEPARATOR: char = '\n';

/// The payloads of the events an outbox row carries, in order.
pub fn payloads_of_row(payload: &str) -> impl Iterator<Item = &str> {
    payload.split(PAYLOAD_SEPARATOR)
}

/// One outbox row: one event, or several of one name that only observers
/// read.
#[derive(Debug, PartialEq)]
struct Row {
    event: String,
    /// None when the events concern several goals.
    goal_id: Option<i64>,
    /// None unless the row is one task event.
    task_id: Option<i64>,
    dispatch: Option<String>,
    payload: String,
    due_at: Option<i64>,
    events: i32,
}

impl From<Event> for Row {
    fn from(event: Event) -> Self {
        Row {
            event: event.name,
            goal_id: Some(event.goal_id),
            task_id: event.task_id,
            dispatch: event.dispatch,
            payload: event.payload,
            due_at: event.due_at,
            events: 1,
        }
    }
}

/// The rows for `events`: one row per name and list dispatched to (none for
/// the events only observers read), where the first of them was, their
/// payloads in order. Writing a row (its index entry, its WAL, the
/// forwarder's read and delete) costs more than building an event: the claim
/// of 60 tasks writes one row, not 60, and a fan-out's root queueing 2 000
/// steps one row, which the forwarder pushes to their list in one `LPUSH`.
fn rows(events: Vec<Event>) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::with_capacity(events.len());
    // The row of each name and list: there are a few of them at most.
    let mut shared: Vec<((String, Option<String>), usize)> = Vec::new();
    for event in events {
        let Some(&(_, at)) = shared
            .iter()
            .find(|((name, dispatch), _)| *name == event.name && *dispatch == event.dispatch)
        else {
            shared.push(((event.name.clone(), event.dispatch.clone()), rows.len()));
            rows.push(event.into());
            continue;
        };
        let row = &mut rows[at];
        if row.goal_id != Some(event.goal_id) {
            row.goal_id = None;
        }
        row.task_id = None;
        row.payload.push(PAYLOAD_SEPARATOR);
        row.payload.push_str(&event.payload);
        row.due_at = match (row.due_at, event.due_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        row.events += 1;
    }
    rows
}

const INSERT: &str =
    "INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, due_at, events, notify)
     SELECT e.event, e.goal_id, e.task_id, e.dispatch, e.payload, e.due_at, e.events, $8
       FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),
                       pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6),
                       pg_catalog.unnest($7))
            AS e(event, goal_id, task_id, dispatch, payload, due_at, events)";

/// Until `ALTER EXTENSION synapse UPDATE` to 0.17.0 the outbox has no
/// `events` column: one event a row (`$7` is left unread).
const INSERT_EVENT_A_ROW: &str =
    "INSERT INTO synapse.outbox (event, goal_id, task_id, dispatch, payload, due_at, notify)
     SELECT e.event, e.goal_id, e.task_id, e.dispatch, e.payload, e.due_at, $8
       FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),
                       pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6))
            AS e(event, goal_id, task_id, dispatch, payload, due_at)";

/// Records `events` in order; returns how many it recorded. Writes nothing
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
    let shared_rows = has_column(c"outbox", c"events");
    let rows = if shared_rows {
        rows(events)
    } else {
        events.into_iter().map(Row::from).collect()
    };
    let mut columns = (
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
        Vec::with_capacity(rows.len()),
    );
    for row in rows {
        columns.0.push(row.event);
        columns.1.push(row.goal_id);
        columns.2.push(row.task_id);
        columns.3.push(row.dispatch);
        columns.4.push(row.payload);
        columns.5.push(row.due_at.and_then(timestamptz));
        columns.6.push(row.events);
    }
    let write = || {
        Spi::connect_mut(|client| {
            let insert = prepared(
                client,
                if shared_rows {
                    INSERT
                } else {
                    INSERT_EVENT_A_ROW
                },
                &[
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::INT8ARRAYOID),
                    oid(PgBuiltInOids::INT8ARRAYOID),
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::TIMESTAMPTZARRAYOID),
                    oid(PgBuiltInOids::INT4ARRAYOID),
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
                        columns.6.into(),
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

    fn task_event(name: &str, goal_id: i64, task_id: i64, due_at: Option<i64>) -> Event {
        Event {
            goal_id,
            payload: format!(r#"{{"event":"{name}","task_id":{task_id}}}"#),
            due_at,
            ..event(name, Some(task_id), None)
        }
    }

    #[test]
    fn events_share_a_row_per_name_and_list_where_the_first_was() {
        let queued = |task_id: i64, queue: &str| Event {
            payload: format!("q{task_id}"),
            ..event("task.queued", Some(task_id), Some(queue))
        };
        let rows = rows(vec![
            task_event("task.succeeded", 1, 2, None),
            queued(5, "queue:q"),
            task_event("task.failed", 1, 3, None),
            task_event("task.succeeded", 1, 4, Some(20)),
            queued(8, "queue:other"),
            task_event("task.succeeded", 7, 6, Some(10)),
            queued(9, "queue:q"),
        ]);
        assert_eq!(rows.len(), 4);
        let succeeded = &rows[0];
        assert_eq!(
            (
                succeeded.event.as_str(),
                succeeded.events,
                succeeded.goal_id,
                succeeded.task_id
            ),
            ("task.succeeded", 3, None, None)
        );
        assert_eq!(succeeded.due_at, Some(10));
        let payloads: Vec<&str> = payloads_of_row(&succeeded.payload).collect();
        assert_eq!(
            payloads,
            [
                r#"{"event":"task.succeeded","task_id":2}"#,
                r#"{"event":"task.succeeded","task_id":4}"#,
                r#"{"event":"task.succeeded","task_id":6}"#
            ]
        );
        // What dispatches to one list shares a row too, its payloads in order.
        let to_q = &rows[1];
        assert_eq!(
            (to_q.dispatch.as_deref(), to_q.events, to_q.task_id),
            (Some("queue:q"), 2, None)
        );
        assert_eq!(
            payloads_of_row(&to_q.payload).collect::<Vec<_>>(),
            ["q5", "q9"]
        );
        // One event alone is the row it always was; one goal's events keep it.
        let failed = &rows[2];
        assert_eq!(
            (failed.events, failed.goal_id, failed.task_id),
            (1, Some(1), Some(3))
        );
        assert_eq!(rows[3], Row::from(queued(8, "queue:other")));
        let one_goal = rows_of_one_goal();
        assert_eq!((one_goal.events, one_goal.goal_id), (2, Some(1)));
    }

    fn rows_of_one_goal() -> Row {
        let mut rows = rows(vec![
            task_event("task.cancelled", 1, 2, None),
            task_event("task.cancelled", 1, 3, None),
        ]);
        assert_eq!(rows.len(), 1);
        rows.remove(0)
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

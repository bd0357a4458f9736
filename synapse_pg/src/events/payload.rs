//! The events, exactly as documented (SPEC: payloads carry their schema
//! version first), and the Redis list each one dispatches work to.
use pgrx::prelude::*;
use pgrx::{composite_type, default};

use super::outbox::Event;

/// `task.<status>`:
/// `{"v":1,"event":…,"goal_id":…,"task_id":…,"step":…,"queue":…,"attempt":…}`,
/// with `"index"` for an instance of a map step. `attempt` is the attempt the
/// event is about: the next one for `task.queued`, the current one otherwise.
/// `task.queued` goes to the task's queue, and so does an event a worker must
/// act on although nothing is to run (`to_worker`).
pub struct TaskEvent<'a> {
    pub event: &'a str,
    pub goal_id: i64,
    pub task_id: i64,
    pub step: &'a str,
    pub queue: &'a str,
    pub attempt: i32,
    pub due_at: Option<i64>,
    pub to_worker: bool,
    pub map_index: Option<i32>,
}

impl TaskEvent<'_> {
    /// The outbox row.
    pub fn event(&self) -> Event {
        let mut payload = format!(
            r#"{{"v":1,"event":{},"goal_id":{},"task_id":{},"step":{},"queue":{},"attempt":{}"#,
            json_string(self.event),
            self.goal_id,
            self.task_id,
            json_string(self.step),
            json_string(self.queue),
            self.attempt
        );
        if let Some(index) = self.map_index {
            payload.push_str(&format!(r#","index":{index}"#));
        }
        payload.push('}');
        Event {
            name: self.event.to_owned(),
            goal_id: self.goal_id,
            task_id: Some(self.task_id),
            dispatch: (self.event == "task.queued" || self.to_worker)
                .then(|| format!("queue:{}", self.queue)),
            payload,
            due_at: self.due_at,
        }
    }
}

/// `goal.<status>`: `{"v":1,"event":…,"goal_id":…}`; `goal.submitted` goes to
/// the planner list. An event a worker must act on also goes to `to_queue`:
/// a child goal's end to the queue of the goal step waiting for it, with
/// `"parent_task_id"` (a worker there ends that step); a goal running again
/// (`retry_goal`) to the queue of a step it starts with (a worker there
/// starts its steps).
pub fn goal_event(
    event: &str,
    goal_id: i64,
    parent_task_id: Option<i64>,
    to_queue: Option<&str>,
) -> Event {
    let mut payload = format!(
        r#"{{"v":1,"event":{},"goal_id":{goal_id}"#,
        json_string(event)
    );
    if let Some(parent) = parent_task_id {
        payload.push_str(&format!(r#","parent_task_id":{parent}"#));
    }
    payload.push('}');
    let dispatch = if event == "goal.submitted" {
        Some("planner".to_owned())
    } else {
        to_queue.map(|queue| format!("queue:{queue}"))
    };
    Event {
        name: event.to_owned(),
        goal_id,
        task_id: None,
        dispatch,
        payload,
        due_at: None,
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// A task event for SQL callers (the sweep dispatching again).
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "_task_event", stable, parallel_safe, requires = ["event_type"])]
fn task_event_sql(
    event: &str,
    goal_id: i64,
    task_id: i64,
    step: &str,
    queue: &str,
    attempt: i32,
    due_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    to_worker: default!(bool, false),
    map_index: default!(Option<i32>, "NULL"),
) -> composite_type!('static, "synapse._event") {
    TaskEvent {
        event,
        goal_id,
        task_id,
        step,
        queue,
        attempt,
        due_at: due_at.map(i64::from),
        to_worker,
        map_index,
    }
    .event()
    .into_composite()
}

/// A goal event for SQL callers (the sweep dispatching again).
#[pg_extern(name = "_goal_event", stable, parallel_safe, requires = ["event_type"])]
fn goal_event_sql(
    event: &str,
    goal_id: i64,
    parent_task_id: default!(Option<i64>, "NULL"),
    to_queue: default!(Option<&str>, "NULL"),
) -> composite_type!('static, "synapse._event") {
    goal_event(event, goal_id, parent_task_id, to_queue).into_composite()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_event_is_the_documented_json_and_dispatches_only_what_must_run() {
        let queued = TaskEvent {
            event: "task.queued",
            goal_id: 7,
            task_id: 9,
            step: "fetch \"it\"",
            queue: "io",
            attempt: 2,
            due_at: None,
            to_worker: false,
            map_index: Some(3),
        };
        let event = queued.event();
        assert_eq!(
            event.payload,
            r#"{"v":1,"event":"task.queued","goal_id":7,"task_id":9,"step":"fetch \"it\"","queue":"io","attempt":2,"index":3}"#
        );
        assert_eq!(event.dispatch.as_deref(), Some("queue:io"));
        let running = TaskEvent {
            event: "task.running",
            map_index: None,
            ..queued
        };
        let event = running.event();
        assert!(event.payload.ends_with(r#""attempt":2}"#));
        assert_eq!(event.dispatch, None);
        let told = TaskEvent {
            event: "task.failed",
            to_worker: true,
            ..running
        };
        assert_eq!(told.event().dispatch.as_deref(), Some("queue:io"));
    }

    #[test]
    fn a_goal_event_goes_to_the_planner_or_to_the_queue_that_acts_on_it() {
        let submitted = goal_event("goal.submitted", 1, None, None);
        assert_eq!(
            submitted.payload,
            r#"{"v":1,"event":"goal.submitted","goal_id":1}"#
        );
        assert_eq!(submitted.dispatch.as_deref(), Some("planner"));
        let ended = goal_event("goal.succeeded", 2, Some(5), Some("q"));
        assert_eq!(
            ended.payload,
            r#"{"v":1,"event":"goal.succeeded","goal_id":2,"parent_task_id":5}"#
        );
        assert_eq!(ended.dispatch.as_deref(), Some("queue:q"));
        assert_eq!(goal_event("goal.failed", 3, None, None).dispatch, None);
    }
}

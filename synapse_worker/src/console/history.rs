//! A goal's history, read off what Postgres keeps of it (the goal's times,
//! each task's attempts, start and end, the signals): the console's list of
//! events, which, unlike the Redis stream, is there for as long as the goal is.
use serde::Serialize;
use serde_json::Value;

/// Most map instances listed one by one; beyond, a map is told by its step's own start and end.
const INSTANCES_LISTED: usize = 200;

/// One thing that happened to a goal.
#[derive(Debug, Serialize, PartialEq)]
pub struct Event {
    /// When (RFC 3339, as Postgres wrote it).
    pub at: String,
    /// `goal.submitted`, `task.started`, `task.failed`, `signal.sent`, …
    pub kind: String,
    /// The step, with `[index]` for a map instance.
    pub step: Option<String>,
    /// The attempt it concerns.
    pub attempt: Option<i64>,
    /// An error, a signal's name, a worker.
    pub detail: Option<String>,
}

/// The events of `goal` (the JSON of `synapse.goal_status`), oldest first.
pub fn events(goal: &Value) -> Vec<Event> {
    let mut events = Vec::new();
    let mut push =
        |at: &Value, kind: String, step: Option<String>, attempt, detail: Option<&str>| {
            if let Some(at) = at.as_str() {
                events.push(Event {
                    at: at.to_owned(),
                    kind,
                    step,
                    attempt,
                    detail: detail.map(str::to_owned),
                });
            }
        };
    push(
        &goal["created_at"],
        "goal.submitted".into(),
        None,
        None,
        None,
    );
    push(&goal["started_at"], "goal.running".into(), None, None, None);
    for task in goal["tasks"].as_array().into_iter().flatten() {
        let step = task["step"].as_str().unwrap_or("?");
        let mut rows = vec![(step.to_owned(), task)];
        if let Some(instances) = task["instances"].as_array() {
            if instances.len() <= INSTANCES_LISTED {
                rows.extend(instances.iter().map(|instance| {
                    (
                        format!("{step}[{}]", instance["index"].as_i64().unwrap_or(-1)),
                        instance,
                    )
                }));
            }
        }
        for (name, row) in rows {
            for attempt in row["attempts_history"].as_array().into_iter().flatten() {
                push(
                    &attempt["finished_at"],
                    "task.attempt_failed".into(),
                    Some(name.clone()),
                    attempt["attempt"].as_i64(),
                    attempt["error"].as_str(),
                );
            }
            let attempts = row["attempts"].as_i64().filter(|attempts| *attempts > 0);
            push(
                &row["started_at"],
                "task.started".into(),
                Some(name.clone()),
                attempts,
                None,
            );
            if let Some(status) = row["status"].as_str() {
                push(
                    &row["finished_at"],
                    format!("task.{status}"),
                    Some(name.clone()),
                    attempts,
                    row["error"].as_str(),
                );
            }
        }
    }
    for signal in goal["signals"].as_array().into_iter().flatten() {
        let name = signal["name"].as_str();
        push(&signal["sent_at"], "signal.sent".into(), None, None, name);
        let taker = signal["taken_by"].as_str().map(str::to_owned);
        push(
            &signal["taken_at"],
            "signal.taken".into(),
            taker,
            None,
            name,
        );
    }
    if let Some(status) = goal["status"].as_str() {
        push(
            &goal["finished_at"],
            format!("goal.{status}"),
            None,
            None,
            goal["error"].as_str(),
        );
    }
    // RFC 3339 times of one server and zone sort as text; ties keep their order.
    events.sort_by_key(|event| normalized(&event.at));
    events
}

/// `at` padded to microseconds, so that `…:01.5+00:00` sorts before `…:01.25+00:00` correctly.
fn normalized(at: &str) -> String {
    let Some(dot) = at.find('.') else {
        return at.replacen('+', ".000000+", 1);
    };
    let digits = at[dot + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .count();
    format!(
        "{}{}{}",
        &at[..dot + 1 + digits],
        "0".repeat(6 - digits.min(6)),
        &at[dot + 1 + digits..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_goal_tells_its_steps_attempts_and_signals_in_order() {
        let goal = json!({
            "status": "failed", "error": "step pay failed",
            "created_at": "2026-11-30T10:00:00+00:00", "started_at": "2026-11-30T10:00:00.1+00:00",
            "finished_at": "2026-11-30T10:00:09+00:00",
            "tasks": [
                {"step": "approve", "status": "succeeded", "attempts": 0,
                 "started_at": "2026-11-30T10:00:00.2+00:00", "finished_at": "2026-11-30T10:00:05+00:00",
                 "attempts_history": []},
                {"step": "pay", "status": "failed", "attempts": 2, "error": "declined",
                 "started_at": "2026-11-30T10:00:07+00:00", "finished_at": "2026-11-30T10:00:08.5+00:00",
                 "attempts_history": [{"attempt": 1, "error": "timeout", "finished_at": "2026-11-30T10:00:06.25+00:00"}]}
            ],
            "signals": [{"name": "approval", "sent_at": "2026-11-30T10:00:04.9+00:00",
                         "taken_at": "2026-11-30T10:00:05+00:00", "taken_by": "approve"}]
        });
        let told: Vec<(String, Option<String>)> = events(&goal)
            .into_iter()
            .map(|event| (event.kind, event.step))
            .collect();
        let step = |s: &str| Some(s.to_owned());
        assert_eq!(
            told,
            vec![
                ("goal.submitted".into(), None),
                ("goal.running".into(), None),
                ("task.started".into(), step("approve")),
                ("signal.sent".into(), None),
                ("task.succeeded".into(), step("approve")),
                ("signal.taken".into(), step("approve")),
                ("task.attempt_failed".into(), step("pay")),
                ("task.started".into(), step("pay")),
                ("task.failed".into(), step("pay")),
                ("goal.failed".into(), None),
            ]
        );
    }

    #[test]
    fn instances_are_listed_up_to_a_bound() {
        let map = |n: usize| {
            let instances: Vec<Value> = (0..n)
                .map(|i| json!({"index": i, "status": "succeeded", "started_at": "2026-11-30T10:00:01+00:00"}))
                .collect();
            json!({"tasks": [{"step": "m", "status": "running", "started_at": "2026-11-30T10:00:00+00:00",
                              "instances": instances}]})
        };
        assert_eq!(events(&map(3)).len(), 4);
        assert_eq!(events(&map(INSTANCES_LISTED + 1)).len(), 1);
        assert_eq!(events(&map(3))[1].step.as_deref(), Some("m[0]"));
    }

    #[test]
    fn fractions_of_any_length_sort_by_time() {
        assert!(
            normalized("2026-11-30T10:00:01.5+00:00") > normalized("2026-11-30T10:00:01.25+00:00")
        );
        assert!(
            normalized("2026-11-30T10:00:01+00:00")
                < normalized("2026-11-30T10:00:01.000001+00:00")
        );
    }
}

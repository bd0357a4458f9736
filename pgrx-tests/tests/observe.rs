//! `synapse.observe`: fewer events for observers, the same work done, and no
//! timer missed for want of the events left out.
use std::time::Duration;

use serde_json::json;
use synapse_e2e::{
    redis, stream_events, submit_plan, task, wait_for_goal, wait_for_running_task, wait_until,
    Stack,
};

const WAIT: Duration = Duration::from_secs(60);

fn event_names(redis: &mut redis::Connection) -> Vec<String> {
    stream_events(redis)
        .iter()
        .map(|event| event["event"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn with_dispatch_only_work_still_runs_and_every_timer_still_fires() {
    let stack = Stack::start("observe-dispatch", &["synapse.observe = 'dispatch'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();

    // A chain runs; the stream holds its one dispatch and nothing else: b,
    // queued and claimed in one write by the worker that ran a, dispatches
    // nothing.
    let worker = stack.start_worker("w", &["--lease", "1s"]);
    let chain = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}],
                "edges": [{"from": "a", "to": "b"}]}),
    );
    let status = wait_for_goal(&stack, chain, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(event_names(&mut redis), ["task.queued"]);

    // Retries: task.retrying is left out, yet each retry is queued at its run_at.
    let flaky = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "flaky", "action": "fail", "retries": 2, "backoff": "50ms"}]}),
    );
    let status = wait_for_goal(&stack, flaky, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(task(&status, "flaky")["attempts"], 3);

    // Leases: task.running is left out, yet a killed worker's lease lapses and
    // the task runs again elsewhere.
    let long = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "long", "action": "sleep", "params": {"ms": 1500}, "retries": 1}]}),
    );
    wait_for_running_task(&mut client, long);
    worker.signal("KILL");
    let _rescuer = stack.start_worker("rescuer", &["--lease", "1s"]);
    let status = wait_for_goal(&stack, long, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "long")["attempts"], 2);

    // Retention: goal.succeeded is left out, yet the finished goal is deleted
    // when its retention ends.
    client
        .batch_execute("ALTER SYSTEM SET synapse.retention = '1s'")
        .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the reload", WAIT, || {
        let mut fresh = stack.pg();
        let retention: String = fresh
            .query_one("SHOW synapse.retention", &[])
            .unwrap()
            .get(0);
        (retention == "1s").then_some(())
    });
    let _after_reload = stack.start_worker("after-reload", &[]);
    let short_lived = submit_plan(
        &mut stack.pg(),
        &json!({"steps": [{"id": "once", "action": "noop"}]}),
    );
    // Only finished goals are deleted: gone, it ran and its retention ended.
    wait_until("the goal to run and be deleted", WAIT, || {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.goals WHERE id = $1",
                &[&short_lived],
            )
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    });
    assert!(
        event_names(&mut redis)
            .iter()
            .all(|event| event == "task.queued"),
        "only dispatches were streamed"
    );
}

#[test]
fn with_goals_the_stream_tells_goal_changes_and_dispatches() {
    let stack = Stack::start("observe-goals", &["synapse.observe = 'goals'"]);
    let mut client = stack.pg();
    let _worker = stack.start_worker("w", &[]);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "a", "action": "noop"}]}),
    );
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    // The goal's end is committed; its event reaches the stream a moment later.
    let mut redis = stack.redis();
    let streamed = wait_until("the goal's end in the stream", WAIT, || {
        let names = event_names(&mut redis);
        (names.len() >= 3).then_some(names)
    });
    assert_eq!(streamed, ["goal.running", "task.queued", "goal.succeeded"]);

    // Only the three values exist, and only a superuser sets it.
    let error = client
        .batch_execute("SET synapse.observe = 'everything'")
        .unwrap_err();
    let message = error.as_db_error().map(|e| e.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("invalid value for parameter \"synapse.observe\": \"everything\""),
        "{error:?}"
    );
    client
        .batch_execute("CREATE ROLE observer LOGIN; GRANT CONNECT ON DATABASE synapse TO observer")
        .unwrap();
    let url = stack.database_url().replace("postgres@", "observer@");
    let mut observer = synapse_e2e::postgres::Client::connect(&url, synapse_e2e::postgres::NoTls)
        .expect("connecting as observer");
    let error = observer
        .batch_execute("SET synapse.observe = 'dispatch'")
        .unwrap_err();
    let message = error.as_db_error().map(|e| e.message().to_owned());
    assert_eq!(
        message.as_deref(),
        Some("permission denied to set parameter \"synapse.observe\""),
        "{error:?}"
    );
}

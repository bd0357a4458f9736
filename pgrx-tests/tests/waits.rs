//! Plans that wait (SPEC §4.9) on the real stack: `wait` steps held in
//! `waiting` with no worker, released by durable signals (`synapse.signal`,
//! the CLI) or by the forwarder's timers, across restarts, at scale, and at
//! no cost while idle.
use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{
    assert_quiet, chain_of, edge_state, goal_status, postgres, refused, step_status, stream_events,
    submit_plan, task, task_id, wait_for_goal, wait_for_step, wait_until, worker_binary, Stack,
    ONE_STEP,
};

const WAIT: Duration = Duration::from_secs(60);

/// `synapse.signal(goal, name, payload)`: true if a waiting step took it.
fn signal(client: &mut postgres::Client, goal: i64, name: &str, payload: &Value) -> bool {
    client
        .query_one(
            "SELECT synapse.signal($1, $2, $3::text::jsonb)",
            &[&goal, &name, &payload.to_string()],
        )
        .unwrap_or_else(|error| panic!("signal {name} to goal {goal}: {error}"))
        .get(0)
}

/// The keys of a JSON object.
fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

/// The events of goal `goal` in the `synapse:events` stream, once the one
/// named `last` is there (the forwarder sends them after commit).
fn goal_events(stack: &Stack, goal: i64, last: &str) -> Vec<Value> {
    let mut redis = stack.redis();
    wait_until(
        &format!("{last} of goal {goal} in the stream"),
        WAIT,
        || {
            let events: Vec<Value> = stream_events(&mut redis)
                .into_iter()
                .filter(|event| event["goal_id"] == goal)
                .collect();
            events
                .iter()
                .any(|event| event["event"] == last)
                .then_some(events)
        },
    )
}

/// A step waiting for an approval, then one branch or the other depending on
/// the signal's payload.
fn approval_plan() -> Value {
    json!({
        "steps": [
            {"id": "ask", "action": "wait", "params": {"signal": "approval"}},
            {"id": "ship", "action": "noop"},
            {"id": "shelve", "action": "noop"}
        ],
        "edges": [
            {"from": "ask", "to": "ship", "when": "result.payload.approved"},
            {"from": "ask", "to": "shelve", "when": "!result.payload.approved"}
        ]
    })
}

#[test]
fn a_signal_to_a_waiting_step_ends_its_wait_and_its_payload_picks_the_branch() {
    let stack = Stack::start("wait-signal", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(&mut client, &approval_plan());
    wait_for_step(&mut client, goal, "ask", "waiting");
    // The picture says what the step waits for.
    let graph: String = client
        .query_one("SELECT synapse.goal_graph($1, 'dot')", &[&goal])
        .unwrap()
        .get(0);
    assert!(
        graph.contains("wait · waiting\\nsignal \\\"approval\\\""),
        "{graph}"
    );

    let payload = json!({"approved": true, "by": "ana"});
    assert!(
        signal(&mut client, goal, "approval", &payload),
        "the waiting step takes the signal at once"
    );
    let ask_task = task_id(&mut client, goal, "ask");
    let row = client
        .query_one(
            "SELECT taken_by, taken_at IS NOT NULL FROM synapse.signals WHERE goal_id = $1",
            &[&goal],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(ask_task));
    assert!(row.get::<_, bool>(1));

    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let ask = task(&status, "ask");
    assert_eq!(ask["status"], "succeeded", "{ask}");
    assert_eq!(
        keys(&ask["result"]),
        set(&["payload", "received_at", "signal"]),
        "{ask}"
    );
    assert_eq!(ask["result"]["signal"], "approval");
    assert_eq!(ask["result"]["payload"], payload);
    // received_at is when the signal was sent.
    let received_at = ask["result"]["received_at"]
        .as_str()
        .unwrap_or_else(|| panic!("received_at is a time: {ask}"));
    let gap: f64 = client
        .query_one(
            "SELECT abs(extract(epoch FROM $1::text::timestamptz - sent_at))::float8
               FROM synapse.signals WHERE goal_id = $2",
            &[&received_at, &goal],
        )
        .unwrap()
        .get(0);
    assert!(
        gap < 0.001,
        "received_at {received_at} is {gap} s off sent_at"
    );

    assert_eq!(edge_state(&status, "ask", "ship"), "taken");
    assert_eq!(edge_state(&status, "ask", "shelve"), "not_taken");
    assert_eq!(task(&status, "ship")["status"], "succeeded");
    assert_eq!(task(&status, "shelve")["status"], "skipped");

    // The step went straight from pending to waiting: never queued, never
    // claimed by a worker.
    let events = goal_events(&stack, goal, "goal.succeeded");
    let of_ask: Vec<&str> = events
        .iter()
        .filter(|event| event["step"] == "ask")
        .map(|event| event["event"].as_str().unwrap())
        .collect();
    assert_eq!(of_ask, ["task.waiting", "task.succeeded"], "{events:?}");
}

#[test]
fn a_signal_sent_before_its_step_waits_is_kept_and_taken_when_it_does() {
    let stack = Stack::start("wait-kept", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "first", "action": "noop"},
                {"id": "go", "action": "wait", "params": {"signal": "go"}}
            ],
            "edges": [{"from": "first", "to": "go"}]
        }),
    );
    // No worker yet: `first` cannot run, so `go` is still pending and nothing
    // waits for the signals.
    assert!(!signal(&mut client, goal, "go", &json!({"n": 1})));
    assert!(!signal(&mut client, goal, "go", &json!({"n": 2})));
    assert_eq!(step_status(&mut client, goal, "go"), "pending");
    let kept: Vec<(String, Option<i64>)> = client
        .query(
            "SELECT payload::text, taken_by FROM synapse.signals WHERE goal_id = $1 ORDER BY id",
            &[&goal],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter().all(|(_, taken_by)| taken_by.is_none()),
        "{kept:?}"
    );

    let _worker = stack.start_worker("w", &[]);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let go = task(&status, "go");
    // The oldest kept signal is taken; the other stays kept.
    assert_eq!(go["result"]["signal"], "go", "{go}");
    assert_eq!(go["result"]["payload"], json!({"n": 1}), "{go}");
    let go_task = task_id(&mut client, goal, "go");
    let taken: Vec<Option<i64>> = client
        .query(
            "SELECT taken_by FROM synapse.signals WHERE goal_id = $1 ORDER BY id",
            &[&goal],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(taken, [Some(go_task), None]);
    // received_at is when the signal was sent, before the step began to wait;
    // it was taken once the step waited.
    let row = client
        .query_one(
            "SELECT $1::text::timestamptz < t.started_at, s.taken_at >= t.started_at
               FROM synapse.tasks t JOIN synapse.signals s ON s.taken_by = t.id
              WHERE t.id = $2",
            &[&go["result"]["received_at"].as_str().unwrap(), &go_task],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0), "received_at is the send time: {go}");
    assert!(row.get::<_, bool>(1), "taken when the step waited: {go}");
}

#[test]
fn each_signal_is_taken_by_one_wait_oldest_wait_first_and_a_spare_one_is_kept() {
    let stack = Stack::start("wait-two", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // `early` waits from the start; `late` begins to wait once `gate` ran.
    // `done` keeps the goal running until the test has sent every signal.
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "early", "action": "wait", "params": {"signal": "ticket"}},
                {"id": "gate", "action": "noop"},
                {"id": "late", "action": "wait", "params": {"signal": "ticket"}},
                {"id": "done", "action": "wait", "params": {"signal": "done"}}
            ],
            "edges": [{"from": "gate", "to": "late"}]
        }),
    );
    for step in ["early", "late", "done"] {
        wait_for_step(&mut client, goal, step, "waiting");
    }
    assert!(signal(&mut client, goal, "ticket", &json!({"n": 1})));
    assert!(signal(&mut client, goal, "ticket", &json!({"n": 2})));
    assert!(
        !signal(&mut client, goal, "ticket", &json!({"n": 3})),
        "no step waits for a third ticket: it is kept"
    );
    assert_eq!(
        step_status(&mut client, goal, "done"),
        "waiting",
        "a signal of another name is not taken by `done`"
    );
    assert!(signal(&mut client, goal, "done", &json!({})));

    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "early")["result"]["payload"], json!({"n": 1}));
    assert_eq!(task(&status, "late")["result"]["payload"], json!({"n": 2}));
    let taken: Vec<(String, Option<i64>)> = client
        .query(
            "SELECT payload::text, taken_by FROM synapse.signals
              WHERE goal_id = $1 AND name = 'ticket' ORDER BY id",
            &[&goal],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let early = task_id(&mut client, goal, "early");
    let late = task_id(&mut client, goal, "late");
    assert_eq!(
        taken
            .iter()
            .map(|(_, taken_by)| *taken_by)
            .collect::<Vec<_>>(),
        [Some(early), Some(late), None],
        "{taken:?}"
    );
}

#[test]
fn a_signal_wait_that_times_out_fails_and_its_failure_edge_handles_it() {
    let stack = Stack::start("wait-timeout", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "approve", "action": "wait",
                 "params": {"signal": "approval", "timeout": "1s"}},
                {"id": "ship", "action": "noop"},
                {"id": "escalate", "action": "noop"}
            ],
            "edges": [
                {"from": "approve", "to": "ship"},
                {"from": "approve", "to": "escalate", "on": "failure"}
            ]
        }),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(
        status["status"], "succeeded",
        "handled by the failure edge: {status}"
    );
    let approve = task(&status, "approve");
    assert_eq!(approve["status"], "failed", "{approve}");
    assert_eq!(
        approve["error"],
        "timed out after 1s waiting for signal \"approval\""
    );
    assert_eq!(edge_state(&status, "approve", "escalate"), "taken");
    assert_eq!(edge_state(&status, "approve", "ship"), "not_taken");
    assert_eq!(task(&status, "escalate")["status"], "succeeded");
    assert_eq!(task(&status, "ship")["status"], "skipped");
    // Not before its timeout.
    let approve_task = task_id(&mut client, goal, "approve");
    let waited: bool = client
        .query_one(
            "SELECT finished_at - started_at >= interval '1 s' FROM synapse.tasks WHERE id = $1",
            &[&approve_task],
        )
        .unwrap()
        .get(0);
    assert!(waited, "{approve}");
}

#[test]
fn time_waits_wake_at_their_time_without_holding_a_worker_slot() {
    let stack = Stack::start("wait-time", &[]);
    // One slot: a wait that held it would stall the other goal until it ended.
    let _worker = stack.start_worker("w", &["--concurrency", "1"]);
    let mut client = stack.pg();
    let nap = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "nap", "action": "wait", "params": {"for": "3s"}}]}),
    );
    let alarm: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb,
                    jsonb_build_object('at', clock_timestamp() + interval '4 s'))",
            &[&json!({"steps": [{"id": "alarm", "action": "wait",
                                 "params": {"until": "input.at"}}]})
            .to_string()],
        )
        .unwrap()
        .get(0);
    wait_for_step(&mut client, nap, "nap", "waiting");
    wait_for_step(&mut client, alarm, "alarm", "waiting");

    let steps = (0..20)
        .map(|i| json!({"id": format!("s{i}"), "action": "sleep", "params": {"ms": 50}}))
        .collect();
    let sleeps = submit_plan(&mut client, &chain_of(steps));
    let status = wait_for_goal(&stack, sleeps, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");

    for (goal, step) in [(nap, "nap"), (alarm, "alarm")] {
        let status = wait_for_goal(&stack, goal, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        let waited = task(&status, step);
        assert_eq!(keys(&waited["result"]), set(&["woke_at"]), "{waited}");
    }
    // Each woke at or after its time: `for` counts from when the step began
    // to wait, `until` is the time its expression gave.
    let row = client
        .query_one(
            "SELECT (n.result ->> 'woke_at')::timestamptz >= n.started_at + interval '3 s',
                    n.finished_at >= n.started_at + interval '3 s',
                    (a.result ->> 'woke_at')::timestamptz >= (g.input ->> 'at')::timestamptz,
                    a.finished_at >= (g.input ->> 'at')::timestamptz,
                    c.finished_at < n.finished_at AND c.finished_at < a.finished_at
               FROM synapse.tasks n, synapse.tasks a, synapse.goals g, synapse.goals c
              WHERE n.goal_id = $1 AND a.goal_id = $2 AND g.id = $2 AND c.id = $3",
            &[&nap, &alarm, &sleeps],
        )
        .unwrap();
    let checks: Vec<bool> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(
        checks, [true; 5],
        "[for woke_at, for finished_at, until woke_at, until finished_at, \
         the other goal ended before either wait]"
    );
}

#[test]
fn a_thousand_waits_due_in_the_same_second_all_fire_within_a_second() {
    let stack = Stack::start("wait-thousand", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // One statement: every wait begins in the same transaction, so all are
    // due at the same time.
    let goals: Vec<i64> = client
        .query(
            "SELECT synapse.submit_plan($1::text::jsonb) FROM generate_series(1, 1000)",
            &[
                &json!({"steps": [{"id": "nap", "action": "wait", "params": {"for": "2s"}}]})
                    .to_string(),
            ],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(goals.len(), 1000);
    wait_until("every goal to succeed", Duration::from_secs(120), || {
        let succeeded: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.goals WHERE id = ANY($1) AND status = 'succeeded'",
                &[&goals],
            )
            .unwrap()
            .get(0);
        (succeeded == 1000).then_some(())
    });
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE finished_at - started_at >= interval '2 s'
                                       AND finished_at - started_at < interval '3 s'),
                    count(*) FILTER (WHERE status = 'succeeded'),
                    min(finished_at - started_at)::text, max(finished_at - started_at)::text
               FROM synapse.tasks WHERE goal_id = ANY($1)",
            &[&goals],
        )
        .unwrap();
    let (on_time, succeeded): (i64, i64) = (row.get(0), row.get(1));
    let (shortest, longest): (String, String) = (row.get(2), row.get(3));
    assert_eq!(succeeded, 1000);
    assert_eq!(
        on_time, 1000,
        "waited between {shortest} and {longest}, not all within [2 s, 3 s)"
    );
}

#[test]
fn timers_and_kept_signals_survive_a_postgres_restart() {
    let mut stack = Stack::start("wait-restart", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let waiting = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "hold", "action": "wait", "params": {"signal": "go"}}]}),
    );
    // `later` begins to wait only after `open` took its signal, after the
    // restart; its signal is sent before the restart and kept meanwhile.
    let kept = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "open", "action": "wait", "params": {"signal": "open"}},
                {"id": "later", "action": "wait", "params": {"signal": "later"}}
            ],
            "edges": [{"from": "open", "to": "later"}]
        }),
    );
    wait_for_step(&mut client, waiting, "hold", "waiting");
    wait_for_step(&mut client, kept, "open", "waiting");
    assert!(!signal(
        &mut client,
        kept,
        "later",
        &json!({"sent": "before"})
    ));
    // Last, so that its timer is still ahead when Postgres stops.
    let timer = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "nap", "action": "wait", "params": {"for": "3s"}}]}),
    );
    wait_for_step(&mut client, timer, "nap", "waiting");
    drop(client);

    stack.restart_postgres_with(&[]);

    let mut client = stack.pg();
    assert!(signal(
        &mut client,
        waiting,
        "go",
        &json!({"sent": "after"})
    ));
    assert!(signal(&mut client, kept, "open", &json!({})));
    for goal in [timer, waiting, kept] {
        let status = wait_for_goal(&stack, goal, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
    }
    let status = goal_status(&mut client, kept);
    assert_eq!(
        task(&status, "later")["result"]["payload"],
        json!({"sent": "before"})
    );
    let later = task_id(&mut client, kept, "later");
    let nap = task_id(&mut client, timer, "nap");
    let row = client
        .query_one(
            "SELECT (SELECT started_at < pg_postmaster_start_time()
                            AND finished_at >= pg_postmaster_start_time()
                            AND finished_at >= started_at + interval '3 s'
                       FROM synapse.tasks WHERE id = $1),
                    (SELECT sent_at < pg_postmaster_start_time()
                            AND taken_at >= pg_postmaster_start_time()
                            AND taken_by = $2
                       FROM synapse.signals WHERE goal_id = $3 AND name = 'later')",
            &[&nap, &later, &kept],
        )
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the timer was set before the restart and fired after it"
    );
    assert!(
        row.get::<_, bool>(1),
        "the signal sent before the restart was taken after it"
    );
}

#[test]
fn signals_to_an_unknown_or_finished_goal_or_with_a_bad_name_are_refused() {
    let stack = Stack::start("wait-errors", &[]);
    let mut client = stack.pg();
    let finished = submit_plan(&mut client, ONE_STEP);
    assert!(client
        .query_one("SELECT synapse.cancel_goal($1)", &[&finished])
        .unwrap()
        .get::<_, bool>(0));
    let running = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "hold", "action": "wait", "params": {"signal": "go"}}]}),
    );
    let sql = "SELECT synapse.signal($1, $2)";

    let (code, message) = refused(&mut client, sql, &[&999_999_i64, &"go"]);
    assert_eq!(code, "P0002", "{message}");
    assert!(message.contains("999999"), "{message}");

    let (code, message) = refused(&mut client, sql, &[&finished, &"go"]);
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains(&finished.to_string()), "{message}");

    for bad in ["", "needs approval"] {
        let (code, message) = refused(&mut client, sql, &[&running, &bad]);
        assert_eq!(code, "22023", "{bad:?}: {message}");
    }

    let rows: i64 = client
        .query_one("SELECT count(*) FROM synapse.signals", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a refused signal leaves nothing behind");
    assert_eq!(step_status(&mut client, running, "hold"), "waiting");
}

#[test]
fn thousands_of_pending_waits_cost_nothing_while_idle() {
    let stack = Stack::start("wait-idle", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // Signals that never come, with and without a timeout far away, and
    // timers far away: deadlines armed, none due.
    let plans: [(i32, Value); 3] = [
        (
            2000,
            json!({"steps": [{"id": "hold", "action": "wait", "params": {"signal": "never"}}]}),
        ),
        (
            100,
            json!({"steps": [{"id": "hold", "action": "wait",
                              "params": {"signal": "never", "timeout": "1h"}}]}),
        ),
        (
            100,
            json!({"steps": [{"id": "hold", "action": "wait", "params": {"for": "1h"}}]}),
        ),
    ];
    for (count, plan) in &plans {
        client
            .execute(
                "SELECT synapse.submit_plan($1::text::jsonb) FROM generate_series(1, $2::int)",
                &[&plan.to_string(), count],
            )
            .unwrap();
    }
    wait_until("every wait to be waiting", WAIT, || {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.tasks WHERE step = 'hold' AND status = 'waiting'",
                &[],
            )
            .unwrap()
            .get(0);
        (waiting == 2200).then_some(())
    });
    wait_until("the outbox to drain", WAIT, || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
    let mut redis = stack.redis();
    assert_quiet(&mut client, &mut redis, "%", Duration::from_secs(3));
}

/// Runs the CLI with `--database-url` and no Synapse setting in its environment.
fn cli(stack: &Stack, args: &[&str]) -> Output {
    Command::new(worker_binary())
        .arg("--database-url")
        .arg(stack.database_url())
        .args(args)
        .current_dir(stack.path(""))
        .env_remove("SYNAPSE_DATABASE_URL")
        .env_remove("SYNAPSE_REDIS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running synapse-worker")
}

#[test]
fn the_cli_sends_a_signal_that_is_kept_or_taken() {
    let stack = Stack::start("wait-cli", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "deploy", "action": "wait", "params": {"signal": "deploy"}},
                {"id": "confirm", "action": "wait", "params": {"signal": "confirm"}}
            ],
            "edges": [{"from": "deploy", "to": "confirm"}]
        }),
    );
    wait_for_step(&mut client, goal, "deploy", "waiting");
    let id = goal.to_string();

    // Nothing waits for `confirm` yet: kept.
    let kept = cli(&stack, &["signal", &id, "confirm"]);
    let printed = String::from_utf8_lossy(&kept.stdout).to_lowercase();
    assert_eq!(
        kept.status.code(),
        Some(0),
        "{printed}{}",
        String::from_utf8_lossy(&kept.stderr)
    );
    assert!(printed.contains("kept"), "{printed}");
    assert_eq!(step_status(&mut client, goal, "deploy"), "waiting");

    let taken = cli(
        &stack,
        &[
            "signal",
            &id,
            "deploy",
            "--payload",
            r#"{"version": "1.2.3"}"#,
        ],
    );
    let printed = String::from_utf8_lossy(&taken.stdout).to_lowercase();
    assert_eq!(
        taken.status.code(),
        Some(0),
        "{printed}{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    assert!(printed.contains("taken"), "{printed}");

    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(
        task(&status, "deploy")["result"]["payload"],
        json!({"version": "1.2.3"})
    );
    assert_eq!(
        task(&status, "confirm")["result"]["payload"],
        json!({}),
        "sent without --payload"
    );
}

#[test]
fn wait_steps_are_validated_before_anything_runs() {
    let stack = Stack::start("wait-validate", &[]);
    let mut client = stack.pg();
    let problems = |client: &mut postgres::Client, step: Value| -> Vec<String> {
        let text: String = client
            .query_one(
                "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
                &[&json!({ "steps": [step] }).to_string()],
            )
            .unwrap()
            .get(0);
        serde_json::from_str::<Vec<Value>>(&text)
            .unwrap()
            .iter()
            .map(|problem| problem["path"].as_str().unwrap().to_owned())
            .collect()
    };
    for params in [
        json!({"signal": "go"}),
        json!({"signal": "go", "timeout": "5m"}),
        json!({"for": "250ms"}),
        json!({"until": "goal.input.at"}),
    ] {
        let found = problems(
            &mut client,
            json!({"id": "w", "action": "wait", "params": params.clone()}),
        );
        assert!(found.is_empty(), "{params}: {found:?}");
    }
    let faulty = [
        // A wait does not retry: its timeout is handled by a failure edge.
        (
            json!({"id": "w", "action": "wait", "params": {"signal": "go"}, "retries": 2}),
            "$.steps[0].retries",
        ),
        // Exactly one of signal, for and until.
        (
            json!({"id": "w", "action": "wait", "params": {}}),
            "$.steps[0].params",
        ),
        (
            json!({"id": "w", "action": "wait", "params": {"signal": "go", "for": "1s"}}),
            "$.steps[0].params",
        ),
        // A timeout only with a signal.
        (
            json!({"id": "w", "action": "wait", "params": {"for": "1s", "timeout": "1s"}}),
            "$.steps[0].params",
        ),
        (
            json!({"id": "w", "action": "wait", "params": {"for": "soon"}}),
            "$.steps[0].params",
        ),
        (
            json!({"id": "w", "action": "wait", "params": {"signal": "needs approval"}}),
            "$.steps[0].params",
        ),
    ];
    for (step, path) in faulty {
        let found = problems(&mut client, step.clone());
        assert!(
            found.iter().any(|p| p.starts_with(path)),
            "{step}: {path} not in {found:?}"
        );
    }
    // submit_plan refuses the same, writing nothing.
    let (code, message) = refused_plan(
        &mut client,
        &json!({"steps": [{"id": "w", "action": "wait", "params": {"signal": "go"},
                           "retries": 1}]}),
    );
    assert!(message.contains("$.steps[0].retries"), "{code}: {message}");
    let goals: i64 = client
        .query_one("SELECT count(*) FROM synapse.goals", &[])
        .unwrap()
        .get(0);
    assert_eq!(goals, 0);
}

/// `synapse.submit_plan(blueprint)`, which must fail: its SQLSTATE and message.
fn refused_plan(client: &mut postgres::Client, blueprint: &Value) -> (String, String) {
    refused(
        client,
        "SELECT synapse.submit_plan($1::text::jsonb)",
        &[&blueprint.to_string()],
    )
}

#[test]
fn a_root_wait_takes_a_signal_sent_before_its_goal_was_planned() {
    let stack = Stack::start("wait-root-kept", &[]);
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.add_template('approve', 'approve (?P<id>\\d+)', $1::text::jsonb)",
            &[&json!({"steps": [
                {"id": "approval", "action": "wait", "params": {"signal": "approval"}},
                {"id": "pay", "action": "transform", "params": {"expr": "input.approval.payload.by"}}
            ], "edges": [{"from": "approval", "to": "pay"}]})
            .to_string()],
        )
        .unwrap();
    let goal: i64 = client
        .query_one("SELECT synapse.submit_goal('approve 7')", &[])
        .unwrap()
        .get(0);
    // No worker yet: the goal is not planned, and the signal is kept.
    assert!(!signal(
        &mut client,
        goal,
        "approval",
        &json!({"by": "ana"})
    ));
    // The plan is installed with the wait as a root: it takes the signal in
    // the planner's transaction, and a worker is asked to resolve its edges.
    let _worker = stack.start_worker("w", &[]);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "pay")["result"], json!("ana"));
    assert_eq!(status["signals"][0]["taken_by"], "approval", "{status}");
}

#[test]
fn an_until_that_gives_no_rfc_3339_time_is_a_definition_error() {
    let stack = Stack::start("wait-until-bad", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // Evaluated when the step would run: it fails, only `always` edges are
    // taken (never `failure` ones) and the goal fails, naming the expression.
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [
            {"id": "pick", "action": "transform", "params": {"expr": "'tomorrow'"}},
            {"id": "hold", "action": "wait", "params": {"until": "steps.pick.result"}},
            {"id": "handled", "action": "noop"},
            {"id": "cleanup", "action": "noop"}
        ], "edges": [
            {"from": "pick", "to": "hold"},
            {"from": "hold", "to": "handled", "on": "failure"},
            {"from": "hold", "to": "cleanup", "on": "always"}
        ]})
        .to_string(),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let hold = task(&status, "hold");
    assert_eq!(hold["failure_kind"], "definition", "{hold}");
    let error = hold["error"].as_str().unwrap();
    assert!(
        error.contains("steps.pick.result") && error.contains("not an RFC 3339 time"),
        "{error}"
    );
    assert_eq!(edge_state(&status, "hold", "handled"), "not_taken");
    assert_eq!(edge_state(&status, "hold", "cleanup"), "taken");
    // A root's `until` is evaluated at install: the plan is refused.
    let (code, message) = refused(
        &mut client,
        "SELECT synapse.submit_plan($1::text::jsonb)",
        &[&json!({"steps": [{"id": "hold", "action": "wait", "params": {"until": "'2026-13-45'"}}]})
            .to_string()],
    );
    assert_eq!(code, "22023");
    assert!(
        message.contains("$.steps[0].params.until") && message.contains("RFC 3339"),
        "{message}"
    );
}

#[test]
fn a_cancelled_goal_ends_its_waits_and_refuses_later_signals() {
    let stack = Stack::start("wait-cancel", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [
            {"id": "approval", "action": "wait", "params": {"signal": "approval", "timeout": "2s"}},
            {"id": "nap", "action": "wait", "params": {"for": "2s"}}
        ]})
        .to_string(),
    );
    wait_for_step(&mut client, goal, "approval", "waiting");
    wait_for_step(&mut client, goal, "nap", "waiting");
    let cancelled: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap()
        .get(0);
    assert!(cancelled);
    let (code, _) = refused(
        &mut client,
        "SELECT synapse.signal($1, 'approval')",
        &[&goal],
    );
    assert_eq!(code, "55000");
    // Past both deadlines, no timer touched the cancelled waits.
    wait_until("the deadlines to pass", WAIT, || {
        let past: bool = client
            .query_one(
                "SELECT now() > max(run_at) + interval '1 second' FROM synapse.tasks WHERE goal_id = $1",
                &[&goal],
            )
            .unwrap()
            .get(0);
        past.then_some(())
    });
    let status = goal_status(&mut client, goal);
    assert_eq!(status["status"], "cancelled", "{status}");
    for step in ["approval", "nap"] {
        assert_eq!(task(&status, step)["status"], "cancelled", "{status}");
    }
}

//! `synapse.retry_goal` (SPEC §2) on the real stack: a finished goal runs
//! again from some of its steps (by default its failed and cancelled ones);
//! those and everything downstream start afresh, attempts counted from 1
//! again, while what ran upstream is kept, not recomputed.
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{
    edge_state, goal_status, postgres, refused, step_status, stream_events, submit_plan, task,
    task_id, wait_for_goal, wait_for_step, wait_until, worker_binary, Stack, ONE_STEP,
};

const WAIT: Duration = Duration::from_secs(60);

/// `synapse.retry_goal(goal)`: its failed and cancelled steps.
fn retry(client: &mut postgres::Client, goal: i64) -> bool {
    client
        .query_one("SELECT synapse.retry_goal($1)", &[&goal])
        .unwrap_or_else(|error| panic!("retry_goal({goal}): {error}"))
        .get(0)
}

/// `synapse.retry_goal(goal, steps)`.
fn retry_from(client: &mut postgres::Client, goal: i64, steps: &[&str]) -> bool {
    client
        .query_one("SELECT synapse.retry_goal($1, $2)", &[&goal, &steps])
        .unwrap_or_else(|error| panic!("retry_goal({goal}, {steps:?}): {error}"))
        .get(0)
}

/// The events of goal `goal` in the `synapse:events` stream, once `count`
/// events named `last` are there (the forwarder sends them after commit).
fn goal_events(stack: &Stack, goal: i64, last: &str, count: usize) -> Vec<Value> {
    let mut redis = stack.redis();
    wait_until(
        &format!("{last} of goal {goal} in the stream"),
        WAIT,
        || {
            let events: Vec<Value> = stream_events(&mut redis)
                .into_iter()
                .filter(|event| event["goal_id"] == goal)
                .collect();
            (events.iter().filter(|event| event["event"] == last).count() >= count)
                .then_some(events)
        },
    )
}

/// `up` computes a number; `check` divides by the rows of `retry_fix` (a
/// division by zero until the test adds one); `down` uses both results.
fn fixable_plan() -> Value {
    json!({
        "steps": [
            {"id": "up", "action": "transform", "params": {"expr": "{'n': 21}"}},
            {"id": "check", "action": "sql",
             "params": {"query": "SELECT 1 / count(*) AS v FROM retry_fix"}},
            {"id": "down", "action": "transform",
             "params": {"expr": "steps.up.result.n * 2 + steps.check.result.rows[0].v"}}
        ],
        "edges": [{"from": "up", "to": "check"}, {"from": "check", "to": "down"}]
    })
}

/// A goal of [`fixable_plan`] that failed at `check`.
fn failed_goal(stack: &Stack, client: &mut postgres::Client) -> (i64, Value) {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS retry_fix (id int)")
        .unwrap();
    let goal = submit_plan(client, &fixable_plan());
    let status = wait_for_goal(stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let check = task(&status, "check");
    assert_eq!(check["status"], "failed", "{check}");
    assert!(
        check["error"]
            .as_str()
            .unwrap_or_default()
            .contains("division by zero"),
        "{check}"
    );
    assert_eq!(task(&status, "down")["status"], "skipped");
    (goal, status)
}

#[test]
fn a_failed_goal_runs_again_from_its_failed_step_once_the_cause_is_fixed() {
    let stack = Stack::start("retry-fixed", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let (goal, before) = failed_goal(&stack, &mut client);
    let check_task = task_id(&mut client, goal, "check");

    client
        .batch_execute("INSERT INTO retry_fix VALUES (1)")
        .unwrap();
    assert!(retry(&mut client, goal));
    let after = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(after["status"], "succeeded", "{after}");
    assert!(after["error"].is_null(), "{after}");
    assert_eq!(task(&after, "down")["result"], json!(43));

    // Upstream was kept as it was, not run again.
    let (up_before, up_after) = (task(&before, "up"), task(&after, "up"));
    for field in ["status", "result", "attempts", "started_at", "finished_at"] {
        assert_eq!(up_after[field], up_before[field], "up.{field}");
    }
    // The step ran again from attempt 1; its failed attempt is still on record.
    let check = task(&after, "check");
    assert_eq!(check["status"], "succeeded", "{check}");
    assert_eq!(check["attempts"], 1, "{check}");
    assert_eq!(check["result"], json!({"rows": [{"v": 1}]}));
    let history: Vec<(i32, String)> = client
        .query(
            "SELECT attempt, error FROM synapse.attempts WHERE task_id = $1 ORDER BY finished_at",
            &[&check_task],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].0, 1);
    assert!(history[0].1.contains("division by zero"), "{history:?}");
    assert_eq!(edge_state(&after, "up", "check"), "taken");
    assert_eq!(edge_state(&after, "check", "down"), "taken");

    // The goal went back to running after it failed, then ran to its end.
    let events = goal_events(&stack, goal, "goal.succeeded", 1);
    let of_goal: Vec<&str> = events
        .iter()
        .map(|event| event["event"].as_str().unwrap())
        .filter(|name| name.starts_with("goal."))
        .collect();
    assert!(
        of_goal.ends_with(&["goal.failed", "goal.running", "goal.succeeded"]),
        "{of_goal:?}"
    );
    let count = |event: &str, step: &str| {
        events
            .iter()
            .filter(|e| e["event"] == event && e["step"] == step)
            .count()
    };
    assert_eq!(count("task.succeeded", "up"), 1, "up ran once: {events:?}");
    let check_queued: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "task.queued" && e["step"] == "check")
        .map(|e| &e["attempt"])
        .collect();
    assert_eq!(check_queued, [&json!(1), &json!(1)], "{events:?}");
}

#[test]
fn a_succeeded_goal_runs_again_from_named_steps_and_only_what_is_downstream() {
    let stack = Stack::start("retry-from", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // Each step counts its runs in a sequence of its own.
    client
        .batch_execute(
            "CREATE SEQUENCE runs_a; CREATE SEQUENCE runs_b; CREATE SEQUENCE runs_c;
             CREATE SEQUENCE runs_d;",
        )
        .unwrap();
    let counter = |step: &str| {
        json!({"id": step, "action": "sql",
               "params": {"query": format!("SELECT nextval('runs_{step}') AS n")}})
    };
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [counter("a"), counter("b"), counter("c"), counter("d")],
            "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "a", "to": "d"}]
        }),
    );
    let before = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(before["status"], "succeeded", "{before}");

    assert!(retry_from(&mut client, goal, &["b"]));
    let after = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(after["status"], "succeeded", "{after}");
    let n = |status: &Value, step: &str| task(status, step)["result"]["rows"][0]["n"].clone();
    assert_eq!(
        ["a", "b", "c", "d"].map(|step| n(&after, step)),
        [json!(1), json!(2), json!(2), json!(1)],
        "b and c ran again; a (upstream) and d (beside) did not: {after}"
    );
    let row = client
        .query_one(
            "SELECT (SELECT last_value FROM runs_a), (SELECT last_value FROM runs_b),
                    (SELECT last_value FROM runs_c), (SELECT last_value FROM runs_d)",
            &[],
        )
        .unwrap();
    let runs: Vec<i64> = (0..4).map(|i| row.get(i)).collect();
    assert_eq!(runs, [1, 2, 2, 1]);
    for step in ["a", "d"] {
        assert_eq!(
            task(&after, step)["finished_at"],
            task(&before, step)["finished_at"],
            "{step} kept"
        );
    }
    for step in ["b", "c"] {
        assert_eq!(task(&after, step)["attempts"], 1, "{step} counts from 1");
    }
    assert_eq!(after["result"]["c"]["rows"][0]["n"], 2, "{after}");
    assert_eq!(after["result"]["d"]["rows"][0]["n"], 1, "{after}");
}

#[test]
fn retry_goal_refuses_a_running_goal_an_unknown_step_and_an_unknown_goal() {
    let stack = Stack::start("retry-refused", &[]);
    let mut client = stack.pg();
    // Running (waiting for a signal that does not come) and submitted (no
    // worker plans it): nothing to run again yet.
    let running = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "hold", "action": "wait", "params": {"signal": "go"}}]}),
    );
    wait_for_step(&mut client, running, "hold", "waiting");
    assert!(!retry(&mut client, running));
    assert!(!retry_from(&mut client, running, &["hold"]));
    assert_eq!(goal_status(&mut client, running)["status"], "running");
    assert_eq!(step_status(&mut client, running, "hold"), "waiting");
    let submitted: i64 = client
        .query_one("SELECT synapse.submit_goal('nobody plans this')", &[])
        .unwrap()
        .get(0);
    assert!(!retry(&mut client, submitted));
    assert_eq!(goal_status(&mut client, submitted)["status"], "submitted");

    let finished = submit_plan(&mut client, ONE_STEP);
    assert!(client
        .query_one("SELECT synapse.cancel_goal($1)", &[&finished])
        .unwrap()
        .get::<_, bool>(0));
    let steps: &[&str] = &["only", "nope"];
    let (code, message) = refused(
        &mut client,
        "SELECT synapse.retry_goal($1, $2)",
        &[&finished, &steps],
    );
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("nope"), "{message}");
    assert_eq!(
        goal_status(&mut client, finished)["status"],
        "cancelled",
        "a refused retry changes nothing"
    );
    assert_eq!(step_status(&mut client, finished, "only"), "cancelled");

    let (code, message) = refused(
        &mut client,
        "SELECT synapse.retry_goal($1)",
        &[&999_999_i64],
    );
    assert_eq!(code, "P0002", "{message}");
}

#[test]
fn a_cancelled_goal_runs_its_cancelled_steps_again() {
    let stack = Stack::start("retry-cancelled", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "first", "action": "noop"},
                {"id": "hold", "action": "wait", "params": {"signal": "go"}},
                {"id": "after", "action": "noop"}
            ],
            "edges": [{"from": "first", "to": "hold"}, {"from": "hold", "to": "after"}]
        }),
    );
    wait_for_step(&mut client, goal, "hold", "waiting");
    assert!(client
        .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap()
        .get::<_, bool>(0));
    let before = goal_status(&mut client, goal);
    assert_eq!(before["status"], "cancelled", "{before}");
    assert_eq!(task(&before, "first")["status"], "succeeded");
    assert_eq!(task(&before, "hold")["status"], "cancelled");
    assert_eq!(task(&before, "after")["status"], "cancelled");

    assert!(retry(&mut client, goal));
    // The cancelled wait waits again, and takes a signal this time.
    wait_for_step(&mut client, goal, "hold", "waiting");
    let taken: bool = client
        .query_one(
            "SELECT synapse.signal($1, 'go', '{\"again\": true}')",
            &[&goal],
        )
        .unwrap()
        .get(0);
    assert!(taken);
    let after = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(after["status"], "succeeded", "{after}");
    assert_eq!(
        task(&after, "hold")["result"]["payload"],
        json!({"again": true})
    );
    assert_eq!(task(&after, "after")["status"], "succeeded");
    assert_eq!(
        task(&after, "first")["finished_at"],
        task(&before, "first")["finished_at"],
        "first kept"
    );
    assert_eq!(edge_state(&after, "first", "hold"), "taken");
    assert_eq!(edge_state(&after, "hold", "after"), "taken");
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

fn assert_ok(output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_cli_retries_a_goal_from_its_failed_steps_or_from_a_named_one() {
    let stack = Stack::start("retry-cli", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();

    // Without --from: the failed step.
    let (goal, _) = failed_goal(&stack, &mut client);
    client
        .batch_execute("INSERT INTO retry_fix VALUES (1)")
        .unwrap();
    assert_ok(&cli(&stack, &["retry", &goal.to_string()]));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "down")["result"], json!(43));

    // With --from: that step and what follows it, on a succeeded goal.
    client
        .batch_execute("CREATE SEQUENCE cli_a; CREATE SEQUENCE cli_b")
        .unwrap();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "a", "action": "sql", "params": {"query": "SELECT nextval('cli_a') AS n"}},
                {"id": "b", "action": "sql", "params": {"query": "SELECT nextval('cli_b') AS n"}}
            ],
            "edges": [{"from": "a", "to": "b"}]
        }),
    );
    let before = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(before["status"], "succeeded", "{before}");
    assert_ok(&cli(&stack, &["retry", &goal.to_string(), "--from", "b"]));
    let after = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(after["status"], "succeeded", "{after}");
    assert_eq!(task(&after, "a")["result"]["rows"][0]["n"], 1, "{after}");
    assert_eq!(task(&after, "b")["result"]["rows"][0]["n"], 2, "{after}");
    assert_eq!(
        task(&after, "a")["finished_at"],
        task(&before, "a")["finished_at"]
    );
}

#[test]
fn a_map_and_a_wait_run_again_in_full() {
    let stack = Stack::start("retry-map-wait", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    client
        .batch_execute("CREATE TABLE prices (item int PRIMARY KEY, price int NOT NULL); INSERT INTO prices VALUES (1, 10), (2, 20)")
        .unwrap();
    // Item 3 has no price until it is fixed: its instance fails, and so does the map.
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [
            {"id": "price", "action": "sql", "for_each": "[1, 2, 3]",
             "params": {"query": "select max(price) / (count(*) / count(*)) as price from prices where item = $1",
                        "args": "[input]"}},
            {"id": "total", "action": "transform",
             "params": {"expr": "input.price[0].rows[0].price + input.price[1].rows[0].price + input.price[2].rows[0].price"}},
            {"id": "confirm", "action": "wait", "params": {"signal": "confirm"}}
        ], "edges": [
            {"from": "price", "to": "total"},
            {"from": "total", "to": "confirm"}
        ]})
        .to_string(),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(task(&status, "price")["status"], "failed", "{status}");
    assert_eq!(task(&status, "confirm")["status"], "skipped", "{status}");
    client
        .execute("INSERT INTO prices VALUES (3, 30)", &[])
        .unwrap();
    assert!(retry(&mut client, goal));
    // The map makes its instances again, the wait waits again for a new signal.
    wait_for_step(&mut client, goal, "confirm", "waiting");
    let status = goal_status(&mut client, goal);
    let price = task(&status, "price");
    assert_eq!(price["status"], "succeeded", "{price}");
    assert_eq!(price["instances"].as_array().unwrap().len(), 3, "{price}");
    assert_eq!(task(&status, "total")["result"], json!(60));
    assert!(signal_confirm(&mut client, goal));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
}

fn signal_confirm(client: &mut postgres::Client, goal: i64) -> bool {
    client
        .query_one("SELECT synapse.signal($1, 'confirm')", &[&goal])
        .unwrap()
        .get(0)
}

#[test]
fn a_goal_cancelled_before_a_step_was_carried_on_resumes_from_that_step() {
    let stack = Stack::start("retry-unresolved", &[]);
    let mut client = stack.pg();
    // No worker yet: the wait ends (a signal), but nobody resolves its edges
    // before the goal is cancelled.
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [
            {"id": "approval", "action": "wait", "params": {"signal": "approval"}},
            {"id": "pay", "action": "transform", "params": {"expr": "input.approval.payload.amount"}}
        ], "edges": [{"from": "approval", "to": "pay"}]})
        .to_string(),
    );
    let taken: bool = client
        .query_one(
            "SELECT synapse.signal($1, 'approval', '{\"amount\": 12}')",
            &[&goal],
        )
        .unwrap()
        .get(0);
    assert!(taken);
    let cancelled: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap()
        .get(0);
    assert!(cancelled);
    assert_eq!(step_status(&mut client, goal, "approval"), "succeeded");
    assert_eq!(step_status(&mut client, goal, "pay"), "cancelled");
    // pay runs again; its inbound edge, never resolved, is resolved now.
    assert!(retry(&mut client, goal));
    let _worker = stack.start_worker("w", &[]);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "pay")["result"], json!(12));
    assert_eq!(edge_state(&status, "approval", "pay"), "taken");
}

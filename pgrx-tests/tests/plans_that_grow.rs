//! Plans that grow at run time (SPEC §4.6, §4.8), on the real stack: map
//! steps over lists found while the goal runs, loops, and joins that do not
//! wait for every parent.
use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{
    edge_state, stream_events, submit_plan, task, wait_for_goal, wait_for_step, worker_binary,
    Stack,
};

const WAIT: Duration = Duration::from_secs(60);

/// `synapse-worker watch ID` of an ended goal, into a pipe: the lines it prints.
fn cli_watch(stack: &Stack, goal: i64) -> String {
    let output = std::process::Command::new(worker_binary())
        .args(["watch", &goal.to_string()])
        .env("SYNAPSE_DATABASE_URL", stack.database_url())
        .output()
        .expect("synapse-worker status");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The instances of map step `step`, in index order.
fn instances<'a>(status: &'a Value, step: &str) -> &'a Vec<Value> {
    task(status, step)["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("step {step} has no instances: {status}"))
}

#[test]
fn a_map_runs_once_per_item_of_a_list_found_at_run_time_and_keeps_their_order() {
    let stack = Stack::start("map-order", &[]);
    let _a = stack.start_worker("a", &["--concurrency", "8"]);
    let _b = stack.start_worker("b", &["--concurrency", "8"]);
    let mut client = stack.pg();
    // Later items sleep less, so instances end out of index order, on two workers.
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "find", "action": "transform", "params": {"expr": "[3, 1, 4, 1, 5, 9]"}},
                {"id": "scale", "action": "sql", "for_each": "steps.find.result",
                 "params": {"query": "SELECT pg_sleep($1::float8 / 1000), $2::int * 10 AS scaled",
                            "args": "[(6 - index) * 40, item]"}},
                {"id": "total", "action": "transform",
                 "params": {"expr": "input.scale.map(r, r.rows[0].scaled)"}}
            ],
            "edges": [{"from": "find", "to": "scale"}, {"from": "scale", "to": "total"}]
        }),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(
        task(&status, "total")["result"],
        json!([30, 10, 40, 10, 50, 90])
    );
    let scale = task(&status, "scale");
    assert_eq!(scale["status"], "succeeded");
    assert_eq!(scale["size"], 6);
    let listed = instances(&status, "scale");
    assert_eq!(
        listed
            .iter()
            .map(|i| i["index"].clone())
            .collect::<Vec<_>>(),
        (0..6).map(Value::from).collect::<Vec<_>>()
    );
    assert!(listed.iter().all(|i| i["status"] == "succeeded"), "{scale}");
    // The step is listed once; its instances are not steps of their own.
    let steps: Vec<&str> = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["find", "scale", "total"]);
    // Instances did end out of index order.
    let finished: Vec<String> = listed
        .iter()
        .map(|i| i["finished_at"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted = finished.clone();
    sorted.sort();
    assert_ne!(
        finished, sorted,
        "instances ended in index order: {listed:?}"
    );
    // Events of instances carry their index; the step's own events do not.
    let events = stream_events(&mut stack.redis());
    let mut indexes: Vec<i64> = events
        .iter()
        .filter(|e| e["event"] == "task.succeeded" && e["step"] == "scale")
        .filter_map(|e| e["index"].as_i64())
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2, 3, 4, 5]);
    assert!(events
        .iter()
        .any(|e| e["event"] == "task.waiting" && e["step"] == "scale" && e.get("index").is_none()));
    // Pictures and the CLI draw the map step once, with its counts.
    for format in ["mermaid", "dot"] {
        let graph: String = client
            .query_one("SELECT synapse.goal_graph($1, $2)", &[&goal, &format])
            .unwrap()
            .get(0);
        assert!(graph.contains("×6 · 6 ok · 0 failed"), "{graph}");
        assert_eq!(graph.matches("sql · succeeded").count(), 1, "{graph}");
    }
    let printed = cli_watch(&stack, goal);
    assert!(printed.contains("×6 · 6 ok · 0 failed"), "{printed}");
    assert_eq!(printed.matches("scale: ").count(), 1, "{printed}");
}

#[test]
fn an_empty_list_succeeds_at_once_with_an_empty_result_even_at_the_root() {
    let stack = Stack::start("map-empty", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let blueprint = json!({
        "steps": [
            {"id": "each", "action": "noop", "for_each": "goal.input.items"},
            {"id": "after", "action": "transform", "params": {"expr": "size(input.each)"}}
        ],
        "edges": [{"from": "each", "to": "after"}]
    });
    let goal: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, '{\"items\": []}')",
            &[&blueprint.to_string()],
        )
        .unwrap()
        .get(0);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "each")["result"], json!([]));
    assert_eq!(task(&status, "after")["result"], json!(0));

    // A root map over the goal's input, with an input per instance.
    let goal: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, '{\"items\": [\"a\", \"b\"]}')",
            &[
                &json!({"steps": [{"id": "each", "action": "noop", "for_each": "goal.input.items",
                                "input": "{'at': index, 'name': item}"}]})
                .to_string(),
            ],
        )
        .unwrap()
        .get(0);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(
        status["result"],
        json!({"each": [{"at": 0, "name": "a"}, {"at": 1, "name": "b"}]})
    );
}

#[test]
fn a_for_each_that_is_not_a_list_fails_the_step_as_a_definition_error() {
    let stack = Stack::start("map-broken", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "find", "action": "transform", "params": {"expr": "{'not': 'a list'}"}},
                {"id": "each", "action": "noop", "for_each": "steps.find.result"},
                {"id": "on_failure", "action": "noop"}
            ],
            "edges": [{"from": "find", "to": "each"},
                      {"from": "each", "to": "on_failure", "on": "failure"}]
        }),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let each = task(&status, "each");
    assert_eq!(each["failure_kind"], "definition", "{each}");
    assert!(
        each["error"].as_str().unwrap().contains("not a list"),
        "{each}"
    );
    assert_eq!(edge_state(&status, "each", "on_failure"), "not_taken");

    // At the root, the same mistake is refused at submit.
    let refused = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb)",
            &[
                &json!({"steps": [{"id": "each", "action": "noop", "for_each": "goal.input"}]})
                    .to_string(),
            ],
        )
        .unwrap_err();
    let message = refused.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("$.steps[0].for_each"), "{message}");
}

/// Most instances of `listed` that ran at the same time, from their start and end.
fn most_at_once(listed: &[Value]) -> usize {
    let spans: Vec<(String, String)> = listed
        .iter()
        .map(|i| {
            (
                i["started_at"].as_str().unwrap().to_owned(),
                i["finished_at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    spans
        .iter()
        .map(|(start, _)| {
            spans
                .iter()
                .filter(|(other_start, other_end)| other_start <= start && start < other_end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn max_parallel_is_never_exceeded() {
    let stack = Stack::start("map-parallel", &[]);
    let _a = stack.start_worker("a", &["--concurrency", "16"]);
    let _b = stack.start_worker("b", &["--concurrency", "16"]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "each", "action": "sleep", "params": {"ms": 30},
                          "for_each": "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]", "max_parallel": 3}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let listed = instances(&status, "each");
    assert_eq!(listed.len(), 12);
    let at_once = most_at_once(listed);
    assert!(
        (1..=3).contains(&at_once),
        "{at_once} instances ran at once: {listed:?}"
    );
}

/// A map of `sql` steps dividing 10 by each item: a 0 fails its instance.
fn divisions(tolerate: i64) -> Value {
    json!({
        "steps": [
            {"id": "divide", "action": "sql", "for_each": "[1, 0, 2, 0, 5]", "tolerate": tolerate,
             "params": {"query": "SELECT 10 / $1::int AS q", "args": "[item]"}},
            {"id": "handle", "action": "noop"}
        ],
        "edges": [{"from": "divide", "to": "handle", "on": "failure"}]
    })
}

#[test]
fn failures_within_tolerate_give_nulls_and_one_more_fails_the_step() {
    let stack = Stack::start("map-tolerate", &[]);
    let _worker = stack.start_worker("w", &["--concurrency", "1"]);
    let mut client = stack.pg();

    let goal = submit_plan(&mut client, &divisions(2));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let divide = task(&status, "divide");
    let quotients: Vec<Value> = divide["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.pointer("/rows/0").cloned().unwrap_or(Value::Null))
        .collect();
    assert_eq!(
        quotients,
        [json!(10), Value::Null, json!(5), Value::Null, json!(2)],
        "{divide}"
    );
    assert_eq!(divide["failed"], 2);
    assert_eq!(edge_state(&status, "divide", "handle"), "not_taken");

    // One worker slot, instances in index order: the second 0 fails the step,
    // and the last instance is cancelled.
    let goal = submit_plan(&mut client, &divisions(1));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(
        status["status"], "succeeded",
        "handled by the failure edge: {status}"
    );
    let divide = task(&status, "divide");
    assert_eq!(divide["status"], "failed", "{divide}");
    let error = divide["error"].as_str().unwrap();
    assert!(
        error.contains("2 of 5 instances failed (tolerate 1)") && error.contains("instance 1:"),
        "{error}"
    );
    assert_eq!(edge_state(&status, "divide", "handle"), "taken");
    let states: Vec<&str> = instances(&status, "divide")
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "failed").count(),
        2,
        "{states:?}"
    );
    assert!(
        states
            .iter()
            .all(|s| ["succeeded", "failed", "cancelled"].contains(s)),
        "{states:?}"
    );
}

#[test]
fn a_loop_runs_until_its_condition_holds_or_fails_after_max_iterations() {
    let stack = Stack::start("loop", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "count", "action": "transform",
                          "input": "previous == null ? {'n': 0} : previous",
                          "params": {"expr": "{'n': input.n + 1, 'iteration': iteration}"},
                          "until": "result.n >= 3"}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let count = task(&status, "count");
    assert_eq!(count["result"], json!({"n": 3, "iteration": 3}));
    assert_eq!(count["iteration"], 3);
    let printed = cli_watch(&stack, goal);
    assert!(printed.contains("iteration 3"), "{printed}");

    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "ask", "action": "noop", "until": "false", "max_iterations": 2},
                         {"id": "give_up", "action": "noop"}],
               "edges": [{"from": "ask", "to": "give_up", "on": "failure"}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    let ask = task(&status, "ask");
    assert_eq!(ask["status"], "failed", "{status}");
    assert_eq!(
        ask["error"],
        "until \"false\" was not met after 2 iterations"
    );
    assert_eq!(edge_state(&status, "ask", "give_up"), "taken");
    assert_eq!(status["status"], "succeeded");
}

#[test]
fn join_first_runs_on_the_first_parent_and_cancels_the_others() {
    let stack = Stack::start("join-first", &[]);
    let worker = stack.start_worker("w", &["--lease", "2s"]);
    let mut client = stack.pg();
    // "fast" ends only once "slow" is running, so that the cancel has a running step to stop.
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "start", "action": "noop"},
                {"id": "fast", "action": "wait", "params": {"signal": "go"}},
                {"id": "slow", "action": "sleep", "params": {"ms": 600000}},
                {"id": "winner", "action": "noop", "join": "first", "cancel_others": true}
            ],
            "edges": [{"from": "start", "to": "fast"}, {"from": "start", "to": "slow"},
                      {"from": "fast", "to": "winner"}, {"from": "slow", "to": "winner"}]
        }),
    );
    wait_for_step(&mut client, goal, "slow", "running");
    client
        .execute("SELECT synapse.signal($1, 'go')", &[&goal])
        .expect("signal");
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "winner")["status"], "succeeded");
    let winner_result = &task(&status, "winner")["result"];
    assert_eq!(
        winner_result.as_object().map(|parents| parents.len()),
        Some(1),
        "{winner_result}"
    );
    assert_eq!(winner_result["fast"]["signal"], "go", "{winner_result}");
    let slow = task(&status, "slow");
    assert_eq!(slow["status"], "cancelled", "{slow}");
    assert_eq!(slow["error"], "cancelled: step winner started without it");
    assert_eq!(edge_state(&status, "slow", "winner"), "not_taken");
    // The cancelled sleep stops at its worker's next heartbeat.
    synapse_e2e::wait_until("the cancelled step to stop", WAIT, || {
        worker
            .log_text()
            .contains("task cancelled or lease lost; stopped")
            .then_some(())
    });
}

#[test]
fn join_n_runs_once_n_parents_are_taken_and_is_skipped_once_it_cannot_be_reached() {
    let stack = Stack::start("join-n", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let vote = |yes: [bool; 3]| {
        json!({
            "steps": [
                {"id": "ask", "action": "noop"},
                {"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}, {"id": "c", "action": "noop"},
                {"id": "agreed", "action": "noop", "join": 2}
            ],
            "edges": [
                {"from": "ask", "to": "a"}, {"from": "ask", "to": "b"}, {"from": "ask", "to": "c"},
                {"from": "a", "to": "agreed", "when": yes[0].to_string()},
                {"from": "b", "to": "agreed", "when": yes[1].to_string()},
                {"from": "c", "to": "agreed", "when": yes[2].to_string()}
            ]
        })
    };
    let goal = submit_plan(&mut client, &vote([true, false, true]));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(task(&status, "agreed")["status"], "succeeded", "{status}");

    let goal = submit_plan(&mut client, &vote([false, true, false]));
    let status = wait_for_goal(&stack, goal, WAIT);
    let agreed = task(&status, "agreed");
    assert_eq!(agreed["status"], "skipped", "{status}");
    assert!(
        agreed["error"].as_str().unwrap().starts_with("join 2: "),
        "{agreed}"
    );
}

#[test]
fn a_map_of_ten_thousand_survives_a_killed_worker_and_ends_each_instance_once() {
    let stack = Stack::start("map-kill", &[]);
    let doomed = stack.start_worker("doomed", &["--concurrency", "64", "--lease", "2s"]);
    let _steady = stack.start_worker("steady", &["--concurrency", "64", "--lease", "2s"]);
    let mut client = stack.pg();
    let items: Vec<i64> = (0..10_000).collect();
    let goal: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
            &[
                &json!({"steps": [{"id": "each", "action": "noop", "for_each": "goal.input.items",
                                   "retries": 1}]})
                .to_string(),
                &json!({ "items": items }).to_string(),
            ],
        )
        .unwrap()
        .get(0);
    synapse_e2e::wait_until("a thousand instances to end", WAIT, || {
        let ended: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.tasks WHERE goal_id = $1 AND map_index IS NOT NULL
                    AND finished_at IS NOT NULL",
                &[&goal],
            )
            .unwrap()
            .get(0);
        (ended >= 1_000).then_some(())
    });
    doomed.signal("KILL");
    let status = wait_for_goal(&stack, goal, Duration::from_secs(180));
    assert_eq!(status["status"], "succeeded", "{}", status["error"]);
    let result = status["result"]["each"].as_array().unwrap();
    assert_eq!(result.len(), 10_000);
    assert!(result
        .iter()
        .enumerate()
        .all(|(index, item)| item.as_i64() == Some(index as i64)));
    // Each instance succeeded once: one task.succeeded event per index.
    let events = stream_events(&mut stack.redis());
    let mut ends: HashMap<i64, usize> = HashMap::new();
    for event in &events {
        if event["event"] == "task.succeeded" && event["goal_id"] == goal {
            if let Some(index) = event["index"].as_i64() {
                *ends.entry(index).or_default() += 1;
            }
        }
    }
    assert_eq!(ends.len(), 10_000);
    assert!(ends.values().all(|count| *count == 1));
}

#[test]
fn each_instance_of_a_map_has_its_own_retries() {
    let stack = Stack::start("map-retries", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // Sequences count attempts outside the steps' transactions (a failed
    // `sql` step rolls back its own writes): each instance's first attempt
    // fails with a serialization failure, which is worth retrying.
    client
        .batch_execute(
            "CREATE SEQUENCE tries_0; CREATE SEQUENCE tries_1; CREATE SEQUENCE tries_2;
             CREATE FUNCTION flaky(i int, v int) RETURNS int LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval(format('tries_%s', i)) = 1 THEN
                     RAISE EXCEPTION 'not this time' USING ERRCODE = '40001';
                 END IF;
                 RETURN v;
             END $$;",
        )
        .unwrap();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "flaky", "action": "sql", "for_each": "[10, 20, 30]",
                           "retries": 1, "backoff": "10ms",
                           "params": {"query": "SELECT flaky($1::int, $2::int) AS v",
                                      "args": "[index, item]"}}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let flaky = task(&status, "flaky");
    assert_eq!(
        flaky["result"],
        json!([{"rows": [{"v": 10}]}, {"rows": [{"v": 20}]}, {"rows": [{"v": 30}]}])
    );
    for instance in instances(&status, "flaky") {
        assert_eq!(instance["attempts"], 2, "{instance}");
        assert_eq!(instance["status"], "succeeded", "{instance}");
    }
}

#[test]
fn the_cli_validates_the_new_fields_without_a_database() {
    let dir = std::env::temp_dir().join(format!("synapse-grow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plan.json");
    std::fs::write(
        &file,
        json!({"steps": [
            {"id": "a", "action": "noop"},
            {"id": "b", "action": "noop", "join": 2},
            {"id": "c", "action": "noop", "for_each": "[1]", "until": "true", "max_parallel": 0}
        ], "edges": [{"from": "a", "to": "b"}]})
        .to_string(),
    )
    .unwrap();
    let output = std::process::Command::new(worker_binary())
        .arg("validate")
        .arg(&file)
        .current_dir(&dir)
        .env_remove("SYNAPSE_DATABASE_URL")
        .output()
        .expect("synapse-worker validate");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{printed}");
    for path in [
        "$.steps[1].join",
        "$.steps[2].until",
        "$.steps[2].max_parallel",
    ] {
        assert!(printed.contains(&format!("{path}:")), "{path} in {printed}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

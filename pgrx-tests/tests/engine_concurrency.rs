//! Four workers race on one goal's rows: its leaves ending at once, the
//! parents of a join that cancels the others, a map's instances, a signal
//! and the wait step it is for. Each decision must still be made exactly
//! once, whatever lock orders the engine's runs of one goal.
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{
    stream_events, submit_plan, submit_plan_with_input, task, wait_for_goal, Stack, WorkerProcess,
};

const WAIT: Duration = Duration::from_secs(120);

/// Four workers, two of them on several threads (each run of the engine
/// then also races those of its own process).
fn four_workers(stack: &Stack) -> Vec<WorkerProcess> {
    (0..4)
        .map(|i| {
            let threads = if i % 2 == 0 { "1" } else { "4" };
            stack.start_worker(
                &format!("w{i}"),
                &["--concurrency", "16", "--threads", threads],
            )
        })
        .collect()
}

/// Asserts that each of `goals`, and no other, had one event of kind
/// `event` (of `step`, if given) on the stream.
fn assert_one_event_each(stack: &Stack, event: &str, step: Option<&str>, goals: &[i64]) {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for message in stream_events(&mut stack.redis()) {
        if message["event"] == event && step.is_none_or(|step| message["step"] == step) {
            *counts
                .entry(message["goal_id"].as_i64().unwrap())
                .or_default() += 1;
        }
    }
    let once: BTreeMap<i64, usize> = goals.iter().map(|goal| (*goal, 1)).collect();
    assert_eq!(counts, once, "{event} events by goal");
}

#[test]
fn a_goal_whose_leaves_end_at_once_on_four_workers_ends_once_with_every_result() {
    // No join: each leaf's end may be the goal's last. The runs ending the
    // last leaves at once must not each see the other's leaf still running
    // (the goal would never end), nor both end the goal.
    let stack = Stack::start("leaves", &[]);
    let _workers = four_workers(&stack);
    let width = 200;
    let mut steps = vec![json!({"id": "root", "action": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        steps.push(json!({"id": format!("leaf{i}"), "action": "transform", "params": {"expr": i.to_string()}}));
        edges.push(json!({"from": "root", "to": format!("leaf{i}")}));
    }
    let blueprint = json!({"steps": steps, "edges": edges});
    let mut client = stack.pg();
    let ids: Vec<i64> = (0..20)
        .map(|_| submit_plan(&mut client, &blueprint))
        .collect();
    let expected: serde_json::Map<String, Value> =
        (0..width).map(|i| (format!("leaf{i}"), json!(i))).collect();
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["result"], Value::Object(expected.clone()));
    }
    assert_one_event_each(&stack, "goal.succeeded", None, &ids);
}

#[test]
fn a_join_first_that_cancels_its_parents_runs_once_while_they_end_on_four_workers() {
    // The run that starts the join cancels the parents still running while
    // their own ends are being recorded elsewhere: each parent ends once,
    // succeeded or cancelled, and the join runs once.
    let stack = Stack::start("first", &[]);
    let _workers = four_workers(&stack);
    let parents = 12;
    let mut steps = vec![
        json!({"id": "top", "action": "noop"}),
        json!({"id": "winner", "action": "noop", "join": "first", "cancel_others": true}),
    ];
    let mut edges = Vec::new();
    for i in 0..parents {
        steps.push(json!({"id": format!("p{i}"), "action": "noop"}));
        edges.push(json!({"from": "top", "to": format!("p{i}")}));
        edges.push(json!({"from": format!("p{i}"), "to": "winner"}));
    }
    let blueprint = json!({"steps": steps, "edges": edges});
    let mut client = stack.pg();
    let ids: Vec<i64> = (0..40)
        .map(|_| submit_plan(&mut client, &blueprint))
        .collect();
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(task(&status, "winner")["status"], "succeeded", "{status}");
        assert_eq!(task(&status, "winner")["attempts"], 1, "{status}");
        for i in 0..parents {
            let parent = task(&status, &format!("p{i}"));
            assert!(
                parent["status"] == "succeeded" || parent["status"] == "cancelled",
                "{status}"
            );
        }
    }
    let unfinished: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.tasks WHERE finished_at IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0);
    assert_one_event_each(&stack, "task.queued", Some("winner"), &ids);
}

#[test]
fn map_steps_count_every_instance_once_when_they_end_on_four_workers() {
    // Every instance's end counts on its map step, from batches of four
    // workers at once; one map's instances all fail, within its tolerance.
    let stack = Stack::start("maps", &[]);
    let _workers = four_workers(&stack);
    let blueprint = json!({
        "steps": [
            {"id": "each", "action": "noop", "for_each": "goal.input.items"},
            {"id": "doomed", "action": "fail", "params": {"message": "no"},
             "for_each": "goal.input.items", "tolerate": 400},
            {"id": "sum", "action": "transform",
             "params": {"expr": "size(input.each) + size(input.doomed)"}, "join": "all"}],
        "edges": [{"from": "each", "to": "sum"}, {"from": "doomed", "to": "sum"}]
    });
    let items: Vec<i64> = (0..400).collect();
    let mut client = stack.pg();
    let ids: Vec<i64> = (0..3)
        .map(|_| submit_plan_with_input(&mut client, &blueprint, &json!({"items": items})))
        .collect();
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["result"], json!({"sum": 800}));
        let each = task(&status, "each");
        assert_eq!(each["result"], json!(items));
        let doomed = task(&status, "doomed");
        assert_eq!(doomed["status"], "succeeded");
        assert_eq!(doomed["result"], json!(vec![Value::Null; 400]));
        assert_eq!(task(&status, "sum")["attempts"], 1);
    }
    assert_one_event_each(&stack, "goal.succeeded", None, &ids);
}

#[test]
fn a_signal_sent_while_its_wait_step_starts_is_never_missed() {
    // Each signal goes out a little later than the one before after its
    // goal's submission, so that some arrive as a worker starts the wait
    // (looking for a signal kept for it) while the signal looks for a step
    // waiting for it. One of them must see the other.
    let stack = Stack::start("signal-race", &[]);
    let _workers = four_workers(&stack);
    let blueprint = json!({
        "steps": [{"id": "before", "action": "noop"},
                  {"id": "ask", "action": "wait", "params": {"signal": "go"}},
                  {"id": "after", "action": "noop"}],
        "edges": [{"from": "before", "to": "ask"}, {"from": "ask", "to": "after"}]
    });
    let mut client = stack.pg();
    let ids: Vec<i64> = (0..300)
        .map(|i| {
            let id = submit_plan(&mut client, &blueprint);
            // Staggering, not waiting for anything: the offsets sweep the
            // few milliseconds in which the wait starts.
            std::thread::sleep(Duration::from_micros(250 * (i % 24)));
            client
                .execute("SELECT synapse.signal($1, 'go', '{}')", &[&id])
                .unwrap();
            id
        })
        .collect();
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(task(&status, "ask")["result"]["signal"], "go", "{status}");
    }
}

/// Runs the engine's goal lock, as a worker's batch begins, for `goal` on
/// `client` inside an open transaction; returns the goals it locked.
fn lock_as_an_engine_run(client: &mut postgres::Transaction<'_>, goal: i64) -> Vec<i64> {
    client
        .execute(synapse_worker::store::PASS_GATES, &[&vec![goal]])
        .unwrap();
    client
        .query(
            synapse_worker::store::LOCK_RUNNING_GOALS,
            &[&vec![goal], &vec![goal]],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What session `pid` waits for: its wait event, while it waits for a lock.
fn lock_waited_for(client: &mut postgres::Client, pid: i32) -> Option<String> {
    client
        .query_one(
            "SELECT wait_event FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            &[&pid],
        )
        .ok()
        .map(|row| row.get(0))
}

#[test]
fn a_cancel_waits_for_the_engine_runs_in_flight_and_holds_off_those_after_it() {
    // Engine runs share a goal's row (FOR KEY SHARE), which a cancel's FOR
    // UPDATE waits for. A shared row lock does not queue behind that wait: a
    // run arriving later would be let through at once, and runs arriving one
    // after another would keep the cancel waiting for as long as they came.
    // The goal's gate makes the later run wait behind the cancel; it then
    // finds the goal cancelled.
    let stack = Stack::start("gate", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "long", "action": "sleep", "params": {"ms": 600000}}]}),
    );
    synapse_e2e::wait_for_running_task(&mut client, goal);
    let mut first = stack.pg();
    let mut in_flight = first.transaction().unwrap();
    assert_eq!(lock_as_an_engine_run(&mut in_flight, goal), vec![goal]);

    let mut canceller = stack.pg();
    let canceller_pid: i32 = canceller
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let cancel = std::thread::spawn(move || -> bool {
        canceller
            .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
            .unwrap()
            .get(0)
    });
    synapse_e2e::wait_until("the cancel to wait for the run in flight", WAIT, || {
        lock_waited_for(&mut client, canceller_pid).map(|_| ())
    });

    let mut later = stack.pg();
    let later_pid: i32 = later
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let later_run = std::thread::spawn(move || {
        let mut tx = later.transaction().unwrap();
        let locked = lock_as_an_engine_run(&mut tx, goal);
        tx.commit().unwrap();
        locked
    });
    let waited_for = synapse_e2e::wait_until("the later run to wait", WAIT, || {
        assert!(
            !later_run.is_finished(),
            "the later run went past the waiting cancel"
        );
        lock_waited_for(&mut client, later_pid)
    });
    assert_eq!(waited_for, "object", "it waits at the goal's gate");

    in_flight.commit().unwrap();
    assert!(cancel.join().unwrap(), "the cancel went through");
    assert_eq!(
        later_run.join().unwrap(),
        Vec::<i64>::new(),
        "the later run found the goal cancelled"
    );
}

//! Child goals (SPEC §4.7) on the real stack: a goal step runs a goal of its
//! own, planned from a template or from a blueprint an earlier step made,
//! waits for it without a worker, and ends with it.
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{goal_status, postgres, submit_plan, task, wait_for_goal, wait_until, Stack};

const WAIT: Duration = Duration::from_secs(60);

fn add_template(client: &mut postgres::Client, name: &str, pattern: &str, blueprint: &Value) {
    client
        .execute(
            "SELECT synapse.add_template($1, $2, $3::text::jsonb)",
            &[&name, &pattern, &blueprint.to_string()],
        )
        .unwrap();
}

#[test]
fn a_goal_step_runs_a_child_planned_from_a_template_and_ends_with_it() {
    let stack = Stack::start("child-template", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    add_template(
        &mut client,
        "double",
        "double (?<n>\\d+)",
        &json!({"steps": [{"id": "twice", "action": "transform",
                           "params": {"expr": "int(goal.params.n) * 2 + input.bonus"}}]}),
    );
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "pick", "action": "transform", "params": {"expr": "21"}},
                {"id": "child", "action": "goal", "input": "{'bonus': 0}",
                 "params": {"goal": "'double ' + string(steps.pick.result)"}},
                {"id": "after", "action": "transform", "params": {"expr": "input.child.twice + 1"}}
            ],
            "edges": [{"from": "pick", "to": "child"}, {"from": "child", "to": "after"}]
        }),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let step = task(&status, "child");
    assert_eq!(step["result"], json!({"twice": 42}), "{step}");
    assert_eq!(task(&status, "after")["result"], json!(43));
    let child = step["child_goal_id"].as_i64().expect("child_goal_id");
    let child_status = goal_status(&mut client, child);
    assert_eq!(child_status["goal"], "double 21");
    assert_eq!(child_status["template"], "double");
    assert_eq!(
        child_status["parent"],
        json!({"goal_id": goal, "step": "child", "index": null})
    );
    assert_eq!(child_status["depth"], 1);
    assert_eq!(status["parent"], Value::Null);
    let graph: String = client
        .query_one("SELECT synapse.goal_graph($1)", &[&goal])
        .unwrap()
        .get(0);
    assert!(graph.contains(&format!("child goal {child}")), "{graph}");
}

#[test]
fn a_child_runs_the_blueprint_an_earlier_step_computed_or_fails_listing_its_problems() {
    let stack = Stack::start("child-blueprint", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let plan = |made: &str| {
        json!({
            "steps": [
                {"id": "plan", "action": "transform", "params": {"expr": made}},
                {"id": "run", "action": "goal", "params": {"blueprint": "steps.plan.result"},
                 "input": "{'x': 5}"}
            ],
            "edges": [{"from": "plan", "to": "run"}]
        })
    };
    let goal = submit_plan(
        &mut client,
        &plan(
            "{'steps': [{'id': 'add', 'action': 'transform', 'params': {'expr': 'input.x + 1'}}]}",
        ),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "run")["result"], json!({"add": 6}));

    // A plan made at run time that does not validate: the step fails with
    // every problem, and no child is left behind.
    let goal = submit_plan(
        &mut client,
        &plan("{'steps': [{'id': 'Bad', 'action': 'nope'}]}"),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let error = task(&status, "run")["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("$.steps[0].id") && error.contains("$.steps[0].action"),
        "{error}"
    );
    let children: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.goals WHERE parent_goal_id = $1",
            &[&goal],
        )
        .unwrap()
        .get(0);
    assert_eq!(children, 0);
}

#[test]
fn a_failed_child_is_retried_with_a_new_one_then_fails_the_step() {
    let stack = Stack::start("child-retry", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "run", "action": "goal", "retries": 1, "backoff": "10ms",
                 "params": {"blueprint": {"steps": [{"id": "boom", "action": "fail",
                                                      "params": {"message": "no luck"}}]}}},
                {"id": "cleanup", "action": "noop"}
            ],
            "edges": [{"from": "run", "to": "cleanup", "on": "failure"}]
        }),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(
        status["status"], "succeeded",
        "handled by the failure edge: {status}"
    );
    let run = task(&status, "run");
    assert_eq!(run["status"], "failed");
    assert_eq!(run["attempts"], 2);
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("failed: step boom failed: no luck"),
        "{error}"
    );
    assert_eq!(
        run["attempts_history"].as_array().unwrap().len(),
        2,
        "{run}"
    );
    let children: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.goals WHERE parent_goal_id = $1",
            &[&goal],
        )
        .unwrap()
        .get(0);
    assert_eq!(children, 2, "a retry runs a new child");
}

#[test]
fn a_template_that_calls_itself_is_stopped_by_max_depth() {
    let stack = Stack::start("child-depth", &["synapse.max_depth = 3"]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    add_template(
        &mut client,
        "recurse",
        "recurse",
        &json!({"steps": [{"id": "again", "action": "goal", "params": {"goal": "'recurse'"}}]}),
    );
    let top: i64 = client
        .query_one("SELECT synapse.submit_goal('recurse')", &[])
        .unwrap()
        .get(0);
    let status = wait_for_goal(&stack, top, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let depths: Vec<i32> = client
        .query("SELECT depth FROM synapse.goals ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(depths, [0, 1, 2, 3]);
    let deepest: String = client
        .query_one(
            "SELECT t.error FROM synapse.tasks t JOIN synapse.goals g ON g.id = t.goal_id WHERE g.depth = 3",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        deepest.contains("depth 4, deeper than synapse.max_depth (3)"),
        "{deepest}"
    );
}

#[test]
fn cancelling_a_parent_cancels_its_running_child() {
    let stack = Stack::start("child-cancel", &[]);
    let _worker = stack.start_worker("w", &["--lease", "2s"]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "run", "action": "goal",
                           "params": {"blueprint": {"steps": [{"id": "nap", "action": "sleep",
                                                                "params": {"ms": 600000}}]}}}]}),
    );
    let child: i64 = wait_until("the child to run", WAIT, || {
        client
            .query_opt(
                "SELECT g.id FROM synapse.goals g JOIN synapse.tasks t ON t.goal_id = g.id
                  WHERE g.parent_goal_id = $1 AND t.status = 'running'",
                &[&goal],
            )
            .unwrap()
            .map(|row| row.get(0))
    });
    let cancelled: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap()
        .get(0);
    assert!(cancelled);
    let child_status = wait_for_goal(&stack, child, WAIT);
    assert_eq!(child_status["status"], "cancelled", "{child_status}");
    let parent = goal_status(&mut client, goal);
    assert_eq!(parent["status"], "cancelled");
    assert_eq!(task(&parent, "run")["status"], "cancelled");
}

#[test]
fn a_map_over_a_goal_step_runs_one_child_per_item() {
    let stack = Stack::start("child-map", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "each", "action": "goal", "for_each": "[1, 2, 3]",
                           "input": "{'n': item}",
                           "params": {"blueprint": {"steps": [{"id": "sq", "action": "transform",
                                                                "params": {"expr": "input.n * input.n"}}]}}}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(
        task(&status, "each")["result"],
        json!([{"sq": 1}, {"sq": 4}, {"sq": 9}])
    );
    let instances = task(&status, "each")["instances"]
        .as_array()
        .unwrap()
        .clone();
    for instance in &instances {
        let child = instance["child_goal_id"].as_i64().expect("child_goal_id");
        let child_status = goal_status(&mut client, child);
        assert_eq!(child_status["parent"]["index"], instance["index"]);
    }
}

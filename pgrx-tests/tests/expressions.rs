//! Expressions: what each one sees, checked before anything runs, and an
//! expression that fails at run time told apart from an action failing.
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{edge_state, submit_plan, task, wait_for_goal, Stack};

const WAIT: Duration = Duration::from_secs(60);

fn run_plan(stack: &Stack, blueprint: Value, input: Value) -> Value {
    let mut client = stack.pg();
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
            &[&blueprint.to_string(), &input.to_string()],
        )
        .expect("submit_plan")
        .get(0);
    wait_for_goal(stack, id, WAIT)
}

/// The newcomer's order plan, with `when` on the edge to the fraud check.
fn order_plan(when: &str) -> Value {
    json!({
        "name": "order-fulfilment",
        "steps": [
            {"id": "fetch", "action": "sql",
             "params": {"query": "select id, amount from orders where id = $1", "args": "[input.order_id]"}},
            {"id": "fraud_check", "action": "http", "retries": 2, "backoff": "200ms",
             "params": {"method": "POST", "url": "http://127.0.0.1:9/fraud"}},
            {"id": "manual_review", "action": "transform", "params": {"expr": "{'held': true}"}},
            {"id": "ship", "action": "http", "params": {"method": "POST", "url": "http://127.0.0.1:9/ship"}},
            {"id": "notify", "action": "noop", "join": "any"}
        ],
        "edges": [
            {"from": "fetch", "to": "fraud_check", "when": when},
            {"from": "fetch", "to": "ship", "when": "double(result.rows[0].amount) <= 1000.0"},
            {"from": "fraud_check", "to": "manual_review", "on": "failure"},
            {"from": "manual_review", "to": "notify"},
            {"from": "ship", "to": "notify"}
        ],
        "output": "{'order': steps.fetch.result.rows[0].id, 'shipped': steps.ship.status == 'succeeded'}"
    })
}

#[test]
fn a_misspelt_variable_is_refused_at_submit_with_its_path() {
    let stack = Stack::start("expr_typo", &[]);
    let mut client = stack.pg();
    let refused = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, '{\"order_id\": 1}')",
            &[&order_plan("reslt.rows[0].amount > 1").to_string()],
        )
        .expect_err("a typo in a condition is refused");
    let db = refused.as_db_error().expect("a database error");
    let text = format!(
        "{} {} {}",
        db.message(),
        db.detail().unwrap_or_default(),
        db.hint().unwrap_or_default()
    );
    assert!(
        text.contains(
            "$.edges[0].when: unknown variable \"reslt\" (this expression sees: goal, steps, result, error, status, input)"
        ),
        "{text}"
    );
    let goals: i64 = client
        .query_one("SELECT count(*) FROM synapse.goals", &[])
        .unwrap()
        .get(0);
    assert_eq!(goals, 0, "nothing is left behind");
    // Spelt right, the same plan is accepted.
    let valid: Value = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)",
            &[&order_plan("double(result.rows[0].amount) > 1000.0").to_string()],
        )
        .unwrap()
        .get(0);
    assert_eq!(valid, json!([]));
}

#[test]
fn a_condition_that_fails_at_run_time_fails_the_goal_and_takes_no_failure_edge() {
    let stack = Stack::start("expr_definition", &[]);
    let _worker = stack.start_worker("w", &[]);
    let status = run_plan(
        &stack,
        json!({
            "steps": [
                {"id": "fetch", "action": "transform", "params": {"expr": "{'rows': [{'amount': 1250.0}]}"}},
                {"id": "fraud_check", "action": "noop"},
                {"id": "manual_review", "action": "noop"},
                {"id": "cleanup", "action": "noop"}
            ],
            "edges": [
                // A key that is not there: only the run can tell.
                {"from": "fetch", "to": "fraud_check", "when": "result.rows[0].amout > 1000.0"},
                {"from": "fraud_check", "to": "manual_review", "on": "failure"},
                {"from": "fraud_check", "to": "cleanup", "on": "always"}
            ]
        }),
        json!({}),
    );
    assert_eq!(status["status"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("fraud_check")
            && error.contains("result.rows[0].amout > 1000.0")
            && error.contains("No such key: amout"),
        "{error}"
    );
    let fraud_check = task(&status, "fraud_check");
    assert_eq!(fraud_check["status"], "failed", "{status}");
    assert_eq!(fraud_check["failure_kind"], "definition", "{status}");
    assert_eq!(edge_state(&status, "fetch", "fraud_check"), "error");
    assert_eq!(
        edge_state(&status, "fraud_check", "manual_review"),
        "not_taken",
        "a definition error is not a business failure"
    );
    assert_eq!(task(&status, "manual_review")["status"], "skipped");
    assert_eq!(edge_state(&status, "fraud_check", "cleanup"), "taken");
    assert_eq!(task(&status, "cleanup")["status"], "succeeded");
    assert_eq!(task(&status, "fetch")["failure_kind"], Value::Null);
}

#[test]
fn an_action_failure_still_takes_its_failure_edge() {
    let stack = Stack::start("expr_action_failure", &[]);
    let _worker = stack.start_worker("w", &[]);
    let status = run_plan(
        &stack,
        json!({
            "steps": [{"id": "risky", "action": "fail", "params": {"message": "down"}},
                      {"id": "recover", "action": "noop"}],
            "edges": [{"from": "risky", "to": "recover", "on": "failure"}]
        }),
        json!({}),
    );
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "risky")["failure_kind"], "action");
    assert_eq!(edge_state(&status, "risky", "recover"), "taken");
}

#[test]
fn parameter_expressions_see_goal_steps_and_input() {
    let stack = Stack::start("expr_context", &[]);
    let _worker = stack.start_worker("w", &[]);
    let status = run_plan(
        &stack,
        json!({
            "steps": [
                {"id": "a", "action": "transform", "params": {"expr": "{'n': 2}"}},
                {"id": "b", "action": "transform", "input": "{'from_input': 1}",
                 "params": {"expr": "{'sum': steps.a.result.n + goal.input.k, 'seen': input.from_input}"}},
                {"id": "c", "action": "sql",
                 "params": {"query": "select $1::int8 + 1 as v, $2::text as name",
                            "args": "[steps.b.result.sum, goal.input.name]"}}
            ],
            "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
            "output": "{'b': steps.b.result, 'v': steps.c.result.rows[0].v}"
        }),
        json!({"k": 40, "name": "ada"}),
    );
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "b")["result"], json!({"sum": 42, "seen": 1}));
    assert_eq!(
        task(&status, "c")["result"],
        json!({"rows": [{"v": 43, "name": "ada"}]})
    );
    assert_eq!(
        status["result"],
        json!({"b": {"sum": 42, "seen": 1}, "v": 43})
    );
}

#[test]
fn reading_a_skipped_steps_result_says_which_step_was_skipped() {
    let stack = Stack::start("expr_skipped", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let id = submit_plan(
        &mut client,
        &json!({
            "steps": [
                {"id": "classify", "action": "transform", "params": {"expr": "{'big': false}"}},
                {"id": "page", "action": "noop"},
                {"id": "audit", "action": "transform", "params": {"expr": "steps.page.result.id"}}
            ],
            "edges": [
                {"from": "classify", "to": "page", "when": "result.big"},
                {"from": "classify", "to": "audit"},
                {"from": "page", "to": "audit"}
            ]
        }),
    );
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(task(&status, "page")["status"], "skipped");
    let audit = task(&status, "audit");
    assert_eq!(audit["status"], "failed", "{status}");
    assert_eq!(audit["failure_kind"], "definition");
    let error = audit["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("steps.page was skipped: it has no result"),
        "{error}"
    );
    assert!(
        status["error"]
            .as_str()
            .unwrap_or_default()
            .contains("steps.page was skipped"),
        "{status}"
    );
}

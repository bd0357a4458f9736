//! Numbers stay exact: a `numeric` from a `sql` step keeps its digits and its
//! scale in the step's result and in later steps' input, and binds back to a
//! `numeric` parameter as it is, with no detour through a float or a string.
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{task, wait_for_goal, Stack};

const WAIT: Duration = Duration::from_secs(60);

/// Submits `blueprint` with `input` (both as JSON text, so nothing is parsed on the
/// way in) and waits for the goal to end.
fn run_plan(stack: &Stack, blueprint: &Value, input: &str) -> (i64, Value) {
    let mut client = stack.pg();
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
            &[&blueprint.to_string(), &input],
        )
        .expect("submit_plan")
        .get(0);
    (id, wait_for_goal(stack, id, WAIT))
}

/// The text of one task's result, as `goal_status` gives it.
fn result_text(stack: &Stack, id: i64, step: &str) -> String {
    stack
        .pg()
        .query_one(
            "SELECT t->>'result' FROM jsonb_array_elements(synapse.goal_status($1)->'tasks') t \
             WHERE t->>'step' = $2",
            &[&id, &step],
        )
        .expect("goal_status")
        .get(0)
}

#[test]
fn numerics_keep_their_digits_through_results_inputs_and_parameters() {
    let stack = Stack::start("numbers", &[]);
    let _worker = stack.start_worker("w", &[]);
    let blueprint = json!({
        "name": "exact",
        "steps": [
            {"id": "fetch", "action": "sql", "params": {"query":
                "SELECT 12345678901234567.89::numeric AS big, 1250.00::numeric AS price, \
                 0.1::numeric + 0.2::numeric AS sum"}},
            {"id": "pass", "action": "noop"},
            {"id": "check", "action": "sql", "params": {
                "query": "SELECT $1::numeric = 12345678901234567.89 AS same, $1::numeric AS big, \
                          $2::numeric AS price, $3::numeric = 0.3 AS sum, \
                          $4::numeric = 98765432109876543.21 AS from_input, $4::numeric AS amount",
                "args": "[input.pass.fetch.rows[0].big, input.pass.fetch.rows[0].price, \
                          input.pass.fetch.rows[0].sum, goal.input.amount]"}}
        ],
        "edges": [{"from": "fetch", "to": "pass"}, {"from": "pass", "to": "check"}]
    });
    let (id, status) = run_plan(&stack, &blueprint, r#"{"amount": 98765432109876543.21}"#);
    assert_eq!(status["status"], "succeeded", "{status}");

    // Postgres's own text of the results, and the same through serde_json.
    let fetched = r#"{"rows": [{"big": 12345678901234567.89, "sum": 0.3, "price": 1250.00}]}"#;
    assert_eq!(result_text(&stack, id, "fetch"), fetched);
    assert_eq!(
        task(&status, "fetch")["result"].to_string(),
        r#"{"rows":[{"big":12345678901234567.89,"price":1250.00,"sum":0.3}]}"#
    );
    assert_eq!(
        result_text(&stack, id, "pass"),
        format!(r#"{{"fetch": {fetched}}}"#)
    );
    assert_eq!(
        result_text(&stack, id, "check"),
        r#"{"rows": [{"big": 12345678901234567.89, "sum": true, "same": true, "price": 1250.00, "amount": 98765432109876543.21, "from_input": true}]}"#
    );
}

#[test]
fn odd_numerics_come_back_as_postgres_writes_them() {
    let stack = Stack::start("numbers_odd", &[]);
    let _worker = stack.start_worker("w", &[]);
    let huge = format!("1{}", "0".repeat(400));
    let blueprint = json!({
        "name": "odd",
        "steps": [
            {"id": "fetch", "action": "sql", "params": {"query":
                "SELECT 'NaN'::numeric AS nan, ('1' || repeat('0', 400))::numeric AS huge, \
                 -0.000001::numeric AS tiny, 0::numeric(5,2) AS zero"}},
            {"id": "check", "action": "sql", "params": {
                "query": "SELECT $1::numeric = ('1' || repeat('0', 400))::numeric AS same, \
                          $2::numeric AS nan, $3::numeric AS tiny, $4::numeric AS zero, $5::numeric AS e, \
                          $6::numeric = 1e400 AS beyond_double",
                "args": "[input.fetch.rows[0].huge, input.fetch.rows[0].nan, \
                          input.fetch.rows[0].tiny, input.fetch.rows[0].zero, goal.input.e, goal.input.h]"}}
        ],
        "edges": [{"from": "fetch", "to": "check"}]
    });
    let (id, status) = run_plan(&stack, &blueprint, r#"{"e": 1.5e-3, "h": 1e400}"#);
    assert_eq!(status["status"], "succeeded", "{status}");
    // NaN has no JSON number: to_jsonb writes it as a string, which binds back.
    // 1e400 is beyond a double, and still an exact input.
    assert_eq!(
        result_text(&stack, id, "fetch"),
        format!(
            r#"{{"rows": [{{"nan": "NaN", "huge": {huge}, "tiny": -0.000001, "zero": 0.00}}]}}"#
        )
    );
    assert_eq!(
        result_text(&stack, id, "check"),
        r#"{"rows": [{"e": 0.0015, "nan": "NaN", "same": true, "tiny": -0.000001, "zero": 0.00, "beyond_double": true}]}"#
    );

    // A value no numeric holds (jsonb would refuse it as a number) is refused,
    // naming its parameter.
    let refused = json!({
        "name": "beyond",
        "steps": [{"id": "bind", "action": "sql",
                   "params": {"query": "SELECT $1::numeric AS n", "args": "[input.n]"}}]
    });
    let (id, status) = run_plan(&stack, &refused, r#"{"n": "1e200000"}"#);
    assert_eq!(status["status"], "failed", "{status}");
    let error = task(&status, "bind")["error"].to_string();
    assert!(
        error.contains("parameter $1 has type numeric"),
        "goal {id}: {error}"
    );
}

//! Poison input fails at the door: JSON over 1 MiB or nested deeper than 64
//! levels gets SQLSTATE 54000 naming the field, from every entry point, and
//! leaves no row behind; a planner's output over the limits fails its goal
//! saying why; the largest blueprint allowed validates, and a long validation
//! honours `statement_timeout`.
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use synapse_e2e::{
    error_of, noop_chain, postgres, run_plan, submit_plan_with_input, task, wait_for_goal, Stack,
};

const WAIT: Duration = Duration::from_secs(60);

/// `levels` arrays nested around a number, as JSON text.
fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

/// An object holding a string of `bytes` characters, as JSON text.
fn padded(bytes: usize) -> String {
    json!({ "pad": "x".repeat(bytes) }).to_string()
}

/// A one-step blueprint whose params carry `pad` (JSON text).
fn blueprint_with(pad: &str) -> String {
    format!(r#"{{"steps":[{{"id":"a","action":"noop","params":{{"pad":{pad}}}}}]}}"#)
}

/// Runs `sql` with text parameters (each cast in the statement) and returns
/// the error's SQLSTATE and message; panics if it succeeds.
fn refused(client: &mut postgres::Client, sql: &str, params: &[&str]) -> (String, String) {
    let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
        .collect();
    let error = client
        .query(sql, &params)
        .map(|rows| panic!("{sql} was accepted: {rows:?}"))
        .unwrap_err();
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a database error: {error}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// Asserts `sql` fails with `sqlstate` and a message containing `fragment`.
fn assert_refused(
    client: &mut postgres::Client,
    sql: &str,
    params: &[&str],
    sqlstate: &str,
    fragment: &str,
) {
    let (code, message) = refused(client, sql, params);
    assert_eq!(code, sqlstate, "{sql}: {message}");
    assert!(
        message.contains(fragment),
        "{sql}: message {message:?} lacks {fragment:?}"
    );
}

fn count(client: &mut postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM synapse.{table}"), &[])
        .unwrap_or_else(|e| panic!("counting {table}: {e}"))
        .get(0)
}

/// No goal, task, edge, template or event exists.
fn assert_nothing_left(client: &mut postgres::Client) {
    for table in ["goals", "tasks", "edges", "templates", "outbox"] {
        assert_eq!(count(client, table), 0, "rows left in synapse.{table}");
    }
}

#[test]
fn every_entry_point_refuses_json_over_the_limits() {
    let stack = Stack::start("input-limits-door", &[]);
    let mut client = stack.pg();
    let deep = nested(200);
    let big = padded(1 << 20);
    let huge = padded(9 << 20);
    let one_step = r#"{"steps":[{"id":"a","action":"noop"}]}"#;

    // submit_goal: the review's poison goal, a large input and one too large to read.
    let submit_goal = "SELECT synapse.submit_goal('x', $1::text::jsonb)";
    assert_refused(
        &mut client,
        submit_goal,
        &[&deep],
        "54000",
        "input is nested 200 levels deep; the limit is 64",
    );
    assert_refused(
        &mut client,
        submit_goal,
        &[&big],
        "54000",
        "input is more than 1 MiB of JSON text",
    );
    assert_refused(&mut client, submit_goal, &[&huge], "54000", "input takes");

    // submit_plan: its blueprint and its input.
    let submit_plan = "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)";
    assert_refused(
        &mut client,
        submit_plan,
        &[&deep, "{}"],
        "54000",
        "blueprint is nested 200 levels deep; the limit is 64",
    );
    assert_refused(
        &mut client,
        submit_plan,
        &[&blueprint_with(&nested(100)), "{}"],
        "54000",
        "blueprint is nested 104 levels deep; the limit is 64",
    );
    assert_refused(
        &mut client,
        submit_plan,
        &[&blueprint_with(&big), "{}"],
        "54000",
        "blueprint is more than 1 MiB of JSON text",
    );
    assert_refused(
        &mut client,
        submit_plan,
        &[one_step, &deep],
        "54000",
        "input is nested 200 levels deep; the limit is 64",
    );
    assert_refused(
        &mut client,
        submit_plan,
        &[one_step, &big],
        "54000",
        "input is more than 1 MiB of JSON text",
    );

    // add_template.
    let add_template = "SELECT synapse.add_template('t', '^x$', $1::text::jsonb)";
    assert_refused(
        &mut client,
        add_template,
        &[&blueprint_with(&nested(100))],
        "54000",
        "blueprint is nested 104 levels deep; the limit is 64",
    );
    assert_refused(
        &mut client,
        add_template,
        &[&blueprint_with(&big)],
        "54000",
        "blueprint is more than 1 MiB of JSON text",
    );

    assert_nothing_left(&mut client);

    // validate_blueprint lists the same refusal as a problem.
    let problems: String = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
            &[&deep],
        )
        .expect("validate_blueprint")
        .get(0);
    let problems: Value = serde_json::from_str(&problems).expect("JSON");
    assert_eq!(
        problems,
        json!([{"path": "$", "message": "blueprint is nested 200 levels deep; the limit is 64"}])
    );

    // At the limits, everything is accepted: 64 levels, and scalars.
    for input in [nested(64), "5".into(), r#""text""#.into(), "null".into()] {
        client
            .query_one(
                "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
                &[&one_step, &input],
            )
            .unwrap_or_else(|e| panic!("input {input}: {e}"));
    }
    client
        .query_one(submit_goal, &[&nested(64)])
        .expect("a goal with an input 64 levels deep");
    client
        .query_one(add_template, &[&blueprint_with(&nested(60))])
        .expect("a template 64 levels deep");
}

#[test]
fn a_root_input_evaluated_over_the_limits_is_refused() {
    let stack = Stack::start("input-limits-root", &[]);
    let mut client = stack.pg();
    // goal.input is 60 levels deep, fine; six more lists make 66.
    let blueprint = r#"{"steps":[{"id":"a","action":"noop","input":"[[[[[[goal.input]]]]]]"}]}"#;
    assert_refused(
        &mut client,
        "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
        &[blueprint, &nested(60)],
        "54000",
        "the input of root step \"a\" is nested 66 levels deep; the limit is 64",
    );
    assert_nothing_left(&mut client);
}

#[test]
fn a_planned_blueprint_over_the_limits_fails_its_goal_saying_why() {
    let stack = Stack::start("input-limits-planner", &[]);
    let mut client = stack.pg();
    // add_template refuses these; a template written around the API (as a
    // superuser can) is how a planner comes to hand them over.
    client
        .execute(
            "INSERT INTO synapse.templates (name, pattern, blueprint) VALUES
                 ('deep', '^deep$', $1::text::jsonb), ('big', '^big$', $2::text::jsonb)",
            &[
                &blueprint_with(&nested(100)),
                &blueprint_with(&padded(1 << 20)),
            ],
        )
        .expect("templates");
    let worker = stack.start_worker("planner", &[]);

    for (goal, why) in [
        (
            "deep",
            "blueprint is nested 104 levels deep; the limit is 64",
        ),
        ("big", "blueprint is more than 1 MiB of JSON text"),
    ] {
        let id: i64 = client
            .query_one("SELECT synapse.submit_goal($1)", &[&goal])
            .expect("submit_goal")
            .get(0);
        let status = wait_for_goal(&stack, id, WAIT);
        assert_eq!(status["status"], "failed", "{status}");
        let error = status["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(why),
            "goal {goal}: error {error:?} lacks {why:?}"
        );
        assert_eq!(status["tasks"], json!([]), "{status}");
    }
    assert!(
        !worker.log_text().contains("panicked"),
        "{}",
        worker.log_text()
    );

    // The same through _install_plan directly, with params over the limit:
    // the goal fails saying why and nothing is installed.
    drop(worker);
    let id: i64 = client
        .query_one("SELECT synapse.submit_goal('direct')", &[])
        .expect("submit_goal")
        .get(0);
    let problems: String = client
        .query_one(
            "SELECT synapse._install_plan($1, $2::text::jsonb, NULL, $3::text::jsonb)::text",
            &[
                &id,
                &r#"{"steps":[{"id":"a","action":"noop"}]}"#,
                &nested(80),
            ],
        )
        .expect("_install_plan")
        .get(0);
    let problems: Value = serde_json::from_str(&problems).expect("JSON");
    assert_eq!(
        problems,
        json!([{"path": "$", "message": "params is nested 80 levels deep; the limit is 64"}])
    );
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(status["tasks"], json!([]), "{status}");
}

/// A chain of `n` `noop` steps.
fn chain(n: usize) -> String {
    let steps: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("s{i}"), "action": "noop"}))
        .collect();
    let edges: Vec<Value> = (1..n)
        .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
        .collect();
    json!({ "steps": steps, "edges": edges }).to_string()
}

#[test]
fn a_chain_whose_default_inputs_nest_past_the_limit_fails_at_that_step_saying_so() {
    // Each step's default input holds its parent's result, which for a noop
    // is its own input: one level deeper at every step. Read back by the
    // worker, a value nested past its JSON reader's 128 levels failed the
    // whole outcome batch it was in, until the step's lease lapsed.
    let stack = Stack::start("input-limits-chain", &[]);
    let _worker = stack.start_worker("chain", &["--lease", "2s"]);
    let status = run_plan(&stack, noop_chain(140));
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(task(&status, "s63")["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "s64")["status"], "failed", "{status}");
    assert_eq!(
        error_of(&status, "s64"),
        "the input of step s64 is nested 65 levels deep; the limit is 64"
    );
    assert_eq!(task(&status, "s64")["attempts"], 0, "it never ran");
    assert_eq!(task(&status, "s65")["status"], "skipped", "{status}");
}

/// A goal input holding a string of a million characters.
fn a_mb() -> Value {
    json!({"blob": "x".repeat(1_000_000)})
}

/// A `noop` root (whose result is its input, the goal's) before `width`
/// successors `s0`… like `successor`, each with a default input.
fn fan_out_of_a_mb(width: usize, successor: Value) -> Value {
    let mut steps = vec![json!({"id": "root", "action": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        let mut step = successor.clone();
        step["id"] = json!(format!("s{i}"));
        steps.push(step);
        edges.push(json!({"from": "root", "to": format!("s{i}")}));
    }
    json!({"steps": steps, "edges": edges})
}

#[test]
fn a_large_result_before_a_wide_fan_out_reaches_every_successor() {
    // Each successor's default input holds the root's result: 300 copies of
    // a 1 MB result. Built by the worker and sent in one parameter (but for
    // the few its free slots claim at once), they outgrew what one jsonb
    // value may hold (256 MB): the root's outcome could not be recorded, and
    // the root failed once its lease lapsed.
    const WIDTH: usize = 300;
    let stack = Stack::start("input-limits-wide-fan-out", &[]);
    let _worker = stack.start_worker("fan-out", &["--concurrency", "4"]);
    let blueprint = fan_out_of_a_mb(
        WIDTH,
        json!({"action": "transform", "params": {"expr": "1"}}),
    );
    let mut client = stack.pg();
    let id = submit_plan_with_input(&mut client, &blueprint, &a_mb());
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded", "{}", status["error"]);
    // The root's result is its input, the goal's: each successor holds it.
    let holding: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.tasks t, synapse.goals g
              WHERE t.goal_id = $1 AND g.id = $1 AND t.step LIKE 's%'
                AND t.input = jsonb_build_object('root', g.input)",
            &[&id],
        )
        .expect("the successors' inputs")
        .get(0);
    assert_eq!(holding, WIDTH as i64);
}

/// [`fan_out_of_a_mb`] of 270 `noop` successors (a result of 1 MB each:
/// 270 MB together, over the 256 MB one jsonb value holds), all before
/// `join`.
fn fan_in_of_a_mb(join: Value) -> Value {
    const WIDTH: usize = 270;
    let mut blueprint = fan_out_of_a_mb(WIDTH, json!({"action": "noop"}));
    for i in 0..WIDTH {
        blueprint["edges"]
            .as_array_mut()
            .unwrap()
            .push(json!({"from": format!("s{i}"), "to": join["id"]}));
    }
    blueprint["steps"].as_array_mut().unwrap().push(join);
    blueprint
}

/// What `steps` would hold in [`fan_in_of_a_mb`]: "27… bytes".
fn assert_steps_oversized(error: &str, context: &str) {
    let message = "`steps` would hold 27";
    let limit = "bytes of the goal's step results; one stored JSON value holds at most 268435455";
    assert!(
        error.starts_with(context) && error.contains(message) && error.ends_with(limit),
        "{error}"
    );
}

/// The status, error, failure kind and attempts of step `step` of goal `id`.
fn step_row(client: &mut postgres::Client, id: i64, step: &str) -> (String, String, String, i32) {
    let row = client
        .query_one(
            "SELECT status, coalesce(error, ''), coalesce(failure_kind, ''), attempts
               FROM synapse.tasks WHERE goal_id = $1 AND step = $2 AND map_index IS NULL",
            &[&id, &step],
        )
        .expect("the step");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

#[test]
fn a_condition_reading_steps_too_large_for_one_value_fails_its_successor_saying_so() {
    // Built whole, `steps` failed the statement that decides the join's
    // edges, with every attempt to record the join's outcome: the goal was
    // left running.
    let stack = Stack::start("input-limits-steps-condition", &[]);
    let _worker = stack.start_worker("conditions", &["--concurrency", "16"]);
    let mut blueprint =
        fan_in_of_a_mb(json!({"id": "j", "action": "noop", "join": "all", "input": "{}"}));
    blueprint["steps"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "k", "action": "noop"}));
    blueprint["edges"]
        .as_array_mut()
        .unwrap()
        .push(json!({"from": "j", "to": "k", "when": "size(steps) > 0"}));
    blueprint["output"] = json!("{}");
    let mut client = stack.pg();
    let id = submit_plan_with_input(&mut client, &blueprint, &a_mb());
    let (status, _) = goal_ended(&mut client, id);
    assert_eq!(status, "failed");
    assert_eq!(step_row(&mut client, id, "j").0, "succeeded");
    let (status, error, kind, attempts) = step_row(&mut client, id, "k");
    assert_eq!(
        (status.as_str(), kind.as_str(), attempts),
        ("failed", "definition", 0)
    );
    assert_steps_oversized(
        &error,
        "edge j -> k: condition failed (when \"size(steps) > 0\"): ",
    );
}

#[test]
fn an_expression_reading_steps_too_large_for_one_value_fails_its_step_saying_so() {
    // Built whole, `steps` failed the claim of the step (and of any task
    // claimed with it) at every attempt: the join ended skipped, for its
    // parents' lapsed leases. A step whose expressions only say "steps" in a
    // string runs (it failed too, for the word).
    let stack = Stack::start("input-limits-steps-claim", &[]);
    let _worker = stack.start_worker("expressions", &["--concurrency", "16"]);
    let mut blueprint = fan_in_of_a_mb(json!({"id": "j", "action": "transform",
        "join": "all", "input": "{}", "params": {"expr": "size(steps)"}}));
    blueprint["steps"].as_array_mut().unwrap().push(
        json!({"id": "k", "action": "transform", "input": "{}", "params": {"expr": "'next steps'"}}),
    );
    blueprint["edges"]
        .as_array_mut()
        .unwrap()
        .push(json!({"from": "j", "to": "k", "on": "always"}));
    blueprint["output"] = json!("{}");
    let mut client = stack.pg();
    let id = submit_plan_with_input(&mut client, &blueprint, &a_mb());
    let (status, _) = goal_ended(&mut client, id);
    assert_eq!(status, "failed");
    let (status, error, kind, attempts) = step_row(&mut client, id, "j");
    assert_eq!(
        (status.as_str(), kind.as_str(), attempts),
        ("failed", "definition", 1)
    );
    assert_steps_oversized(&error, "cannot evaluate params.expr \"size(steps)\": ");
    let (status, error, ..) = step_row(&mut client, id, "k");
    assert_eq!(status, "succeeded", "{error}");
    let result: Value = client
        .query_one(
            "SELECT result FROM synapse.tasks WHERE goal_id = $1 AND step = 'k'",
            &[&id],
        )
        .expect("k")
        .get(0);
    assert_eq!(result, json!("next steps"));
    // The worker goes on.
    let next = synapse_e2e::submit_plan(
        &mut client,
        &json!({"steps": [{"id": "a", "action": "noop"}]}),
    );
    assert_eq!(wait_for_goal(&stack, next, WAIT)["status"], "succeeded");
}

#[test]
fn an_output_reading_steps_too_large_for_one_value_fails_the_goal_saying_so() {
    let stack = Stack::start("input-limits-steps-output", &[]);
    let _worker = stack.start_worker("output", &["--concurrency", "16"]);
    let mut blueprint = fan_out_of_a_mb(270, json!({"action": "noop"}));
    blueprint["output"] = json!("size(steps)");
    let mut client = stack.pg();
    let id = submit_plan_with_input(&mut client, &blueprint, &a_mb());
    let (status, error) = goal_ended(&mut client, id);
    assert_eq!(status, "failed");
    assert_steps_oversized(
        &error,
        "cannot evaluate the blueprint output \"size(steps)\": ",
    );
}

#[test]
fn a_map_whose_results_cannot_be_one_value_fails_saying_so() {
    // 270 instances' results of 1 MB. Built whole, the map's result failed
    // the statement that ends it, with every attempt to record the last
    // instance's outcome: the goal ended succeeded, through the map's
    // `always` edge.
    let stack = Stack::start("input-limits-oversized-map", &[]);
    let _worker = stack.start_worker("map", &["--concurrency", "16"]);
    let blueprint = json!({"steps": [
        {"id": "m", "action": "sql", "for_each": range(270),
         "params": {"query": "SELECT repeat('x', 1000000) AS s"}},
        {"id": "after", "action": "noop"}
    ], "edges": [{"from": "m", "to": "after", "on": "always"}], "output": "{}"});
    let mut client = stack.pg();
    let id = synapse_e2e::submit_plan(&mut client, &blueprint);
    let (status, _) = goal_ended(&mut client, id);
    assert_eq!(status, "failed");
    let (status, error, kind, _) = step_row(&mut client, id, "m");
    assert_eq!((status.as_str(), kind.as_str()), ("failed", "definition"));
    assert!(
        error.starts_with("the result of map step m would hold 27")
            && error.ends_with(
                "bytes of its instances' results; one stored JSON value holds at most 268435455"
            ),
        "{error}"
    );
    // A definition error takes only `always` edges.
    assert_eq!(step_row(&mut client, id, "after").0, "succeeded");
}

#[test]
fn a_map_whose_instances_inputs_together_pass_one_value_starts() {
    // 270 instances' inputs of 1 MB, written in one array parameter, failed
    // the statement starting the map: at the submit (a root map) with
    // Postgres's own error; in a worker, the same statement runs in the
    // transaction recording the outcome of the step before it.
    let stack = Stack::start("input-limits-wide-map", &[]);
    let _worker = stack.start_worker("map", &["--concurrency", "16"]);
    let map = json!({"id": "m", "action": "transform", "for_each": range(270),
                     "input": "goal.input", "params": {"expr": "size(input.blob)"}});
    let mut client = stack.pg();
    let root = submit_plan_with_input(
        &mut client,
        &json!({"steps": [map], "output": "size(steps.m.result)"}),
        &a_mb(),
    );
    let mut after_root = map.clone();
    after_root["id"] = json!("m");
    let later = submit_plan_with_input(
        &mut client,
        &json!({"steps": [{"id": "first", "action": "noop", "input": "{}"}, after_root],
                "edges": [{"from": "first", "to": "m"}], "output": "size(steps.m.result)"}),
        &a_mb(),
    );
    for id in [root, later] {
        assert_eq!(goal_ended(&mut client, id).0, "succeeded");
        let result: Value = client
            .query_one("SELECT result FROM synapse.goals WHERE id = $1", &[&id])
            .expect("the goal")
            .get(0);
        assert_eq!(result, json!(270));
        let holding: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.tasks t, synapse.goals g
                  WHERE t.goal_id = $1 AND g.id = $1 AND t.map_index IS NOT NULL AND t.input = g.input
                    AND t.result = '1000000'",
                &[&id],
            )
            .expect("the instances")
            .get(0);
        assert_eq!(holding, 270);
    }
}

#[test]
fn a_map_or_a_wait_reading_steps_too_large_for_one_value_fails_saying_so() {
    // Built whole, `steps` failed the statement that starts the step, with
    // every attempt to record the outcome of the last step before it: the
    // map ended skipped, for its parents' lapsed leases. After each, a step
    // of the same kind whose expressions only say "steps" in a string starts
    // (it failed too, for the word).
    let stack = Stack::start("input-limits-steps-start", &[]);
    let _worker = stack.start_worker("starts", &["--concurrency", "16"]);
    let mut client = stack.pg();
    let steps = [
        (
            json!({"id": "m", "action": "noop", "join": "all", "for_each": "[size(steps)]"}),
            json!({"id": "after", "action": "noop", "for_each": "['next steps']"}),
        ),
        (
            json!({"id": "w", "action": "wait", "join": "all", "input": "{}",
                   "params": {"until": "steps.root.status == 'succeeded' ? '2030-01-01T00:00:00Z' : ''"}}),
            json!({"id": "after", "action": "wait", "input": "{}",
                   "params": {"until": "'steps' == 'steps' ? '2000-01-01T00:00:00Z' : ''"}}),
        ),
    ];
    for (step, after) in steps {
        let id = step["id"].as_str().unwrap().to_owned();
        let mut blueprint = fan_in_of_a_mb(step);
        blueprint["steps"].as_array_mut().unwrap().push(after);
        blueprint["edges"]
            .as_array_mut()
            .unwrap()
            .push(json!({"from": id, "to": "after", "on": "always"}));
        blueprint["output"] = json!("{}");
        let goal = submit_plan_with_input(&mut client, &blueprint, &a_mb());
        assert_eq!(goal_ended(&mut client, goal).0, "failed", "{id}");
        let (status, error, kind, _) = step_row(&mut client, goal, &id);
        assert_eq!(
            (status.as_str(), kind.as_str()),
            ("failed", "definition"),
            "{id}"
        );
        let context = match id.as_str() {
            "m" => "cannot evaluate the expressions of step m: ".to_owned(),
            _ => format!(
                "cannot evaluate the params.until \"{}\" of step w: ",
                blueprint["steps"][271]["params"]["until"].as_str().unwrap()
            ),
        };
        assert_steps_oversized(&error, &context);
        let (status, error, ..) = step_row(&mut client, goal, "after");
        assert_eq!(status, "succeeded", "{id}: {error}");
    }
}

#[test]
fn a_join_whose_parents_results_cannot_be_one_value_fails_saying_so() {
    // 270 parents' results of 1 MB make a default input of 270 MB, over the
    // 256 MB one jsonb value holds. Read whole, they failed the statement
    // that decides the join with every attempt to record the last parent's
    // outcome: the goal was left running, the join pending.
    let stack = Stack::start("input-limits-oversized-join", &[]);
    let _worker = stack.start_worker("join", &["--concurrency", "16"]);
    let mut blueprint = fan_in_of_a_mb(
        json!({"id": "j", "action": "transform", "join": "all", "params": {"expr": "1"}}),
    );
    blueprint["output"] = json!("{}");
    let mut client = stack.pg();
    let id = submit_plan_with_input(&mut client, &blueprint, &a_mb());
    let (status, _) = goal_ended(&mut client, id);
    assert_eq!(status, "failed");
    let join = client
        .query_one(
            "SELECT status, error, attempts FROM synapse.tasks WHERE goal_id = $1 AND step = 'j'",
            &[&id],
        )
        .expect("the join");
    let (status, error, attempts): (String, String, i32) = (join.get(0), join.get(1), join.get(2));
    assert_eq!(status, "failed");
    assert!(
        error.starts_with("the input of step j would hold 27")
            && error.ends_with(
                "bytes of its parents' results; one stored JSON value holds at most \
                 268435455: give the step an input expression"
            ),
        "{error}"
    );
    assert_eq!(attempts, 0, "it never ran");
}

#[test]
fn a_goal_whose_leaf_results_cannot_be_one_value_fails_saying_so() {
    // 270 leaf steps' results of 1 MB: the goal's default result would be
    // 270 MB, over the 256 MB one jsonb value holds. Read whole, they failed
    // the statement that ends the goal with every attempt to record the last
    // leaf's outcome: the goal was left running.
    let stack = Stack::start("input-limits-oversized-result", &[]);
    let _worker = stack.start_worker("leaves", &["--concurrency", "16"]);
    let mut client = stack.pg();
    let id = submit_plan_with_input(
        &mut client,
        &fan_out_of_a_mb(270, json!({"action": "noop"})),
        &a_mb(),
    );
    let (status, error) = goal_ended(&mut client, id);
    assert_eq!(status, "failed");
    assert!(
        error.starts_with("the goal's result would hold 27")
            && error.ends_with(
                "bytes of its leaf steps' results; one stored JSON value holds at most \
                 268435455: give the blueprint an output expression"
            ),
        "{error}"
    );
    let succeeded: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.tasks WHERE goal_id = $1 AND status = 'succeeded'",
            &[&id],
        )
        .expect("the steps")
        .get(0);
    assert_eq!(succeeded, 271, "every step ran");
}

#[test]
fn goal_status_leaves_out_the_largest_results_past_what_one_value_holds() {
    // 271 results of 1 MB: answered whole, the status was one JSON value of
    // 271 MB, over the 256 MB one holds, and goal_status() failed (54000).
    let stack = Stack::start("input-limits-large-status", &[]);
    let _worker = stack.start_worker("status", &["--concurrency", "16"]);
    let mut client = stack.pg();
    let mut blueprint = fan_out_of_a_mb(270, json!({"action": "noop"}));
    blueprint["output"] = json!("{}");
    let id = submit_plan_with_input(&mut client, &blueprint, &a_mb());
    assert_eq!(goal_ended(&mut client, id).0, "succeeded");
    let status: Value = client
        .query_one("SELECT synapse.goal_status($1)", &[&id])
        .expect("goal_status answers")
        .get(0);
    let tasks = status["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 271);
    let (omitted, kept): (Vec<&Value>, Vec<&Value>) = tasks
        .iter()
        .partition(|task| task.get("result_omitted") == Some(&json!(true)));
    // 192 MB hold about 201 results of 1 MB: the rest are left out.
    assert!((60..=80).contains(&omitted.len()), "{}", omitted.len());
    assert!(omitted.iter().all(|task| task["result"].is_null()));
    assert!(kept.iter().all(|task| task["result"].is_object()));
}

/// The status and error of goal `id` once it is no longer running (not
/// from goal_status(): a goal's results together may be too large for it).
fn goal_ended(client: &mut postgres::Client, id: i64) -> (String, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let row = client
            .query_one(
                "SELECT status, coalesce(error, '') FROM synapse.goals WHERE id = $1",
                &[&id],
            )
            .expect("the goal");
        let (status, error): (String, String) = (row.get(0), row.get(1));
        if status != "running" || Instant::now() > deadline {
            return (status, error);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_join_of_results_larger_than_a_mib_together_runs() {
    // The depth of an input the engine makes is bounded, not its size: each
    // parent's result is bounded by --max-result-size.
    let stack = Stack::start("input-limits-wide-join", &[]);
    let _worker = stack.start_worker("join", &[]);
    let mut steps: Vec<Value> = (0..3)
        .map(|i| {
            json!({"id": format!("p{i}"), "action": "sql",
                   "params": {"query": "SELECT repeat('x', 400000) AS s"}})
        })
        .collect();
    steps.push(json!({"id": "j", "action": "transform", "join": "all",
                      "params": {"expr": "size(input)"}}));
    let edges: Vec<Value> = (0..3)
        .map(|i| json!({"from": format!("p{i}"), "to": "j"}))
        .collect();
    let status = run_plan(&stack, json!({"steps": steps, "edges": edges}));
    assert_eq!(task(&status, "j")["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "j")["result"], 3);
}

#[test]
fn the_largest_blueprint_validates_and_installs() {
    let stack = Stack::start("input-limits-steps", &[]);
    let mut client = stack.pg();
    let blueprint = chain(10_000);
    let problems: String = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
            &[&blueprint],
        )
        .expect("validate_blueprint")
        .get(0);
    assert_eq!(problems, "[]");
    let id: i64 = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&blueprint])
        .expect("submit_plan")
        .get(0);
    let counts: (i64, i64, i64) = client
        .query_one(
            "SELECT (SELECT count(*) FROM synapse.tasks WHERE goal_id = $1),
                    (SELECT count(*) FROM synapse.tasks WHERE goal_id = $1 AND status = 'queued'),
                    (SELECT count(*) FROM synapse.edges WHERE goal_id = $1)",
            &[&id],
        )
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .expect("counts");
    assert_eq!(counts, (10_000, 1, 9_999));

    assert_refused(
        &mut client,
        "SELECT synapse.submit_plan($1::text::jsonb)",
        &[&chain(10_001)],
        "22023",
        "10001 steps; the limit is 10000",
    );
}

/// Validating a blueprint near 1 MiB of CEL takes a while (each expression is
/// compiled); `statement_timeout` stops it, leaving nothing behind, and the
/// session goes on. (That it stops *promptly*, between steps, is what the
/// validator's interrupt hook is for; its unit test counts the calls, since a
/// test here cannot tell without measuring time.)
#[test]
fn statement_timeout_cancels_a_long_validation() {
    let stack = Stack::start("input-limits-timeout", &[]);
    let mut client = stack.pg();
    let expr = format!(
        "[{}]",
        (0..40)
            .map(|i| format!("goal.input.k{i} + {i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let steps: Vec<Value> = (0..1_000)
        .map(|i| json!({"id": format!("s{i}"), "action": "noop", "input": expr}))
        .collect();
    let blueprint = json!({ "steps": steps }).to_string();
    client
        .batch_execute("SET statement_timeout = '50ms'")
        .expect("SET");
    assert_refused(
        &mut client,
        "SELECT synapse.submit_plan($1::text::jsonb)",
        &[&blueprint],
        "57014",
        "statement timeout",
    );
    client
        .batch_execute("RESET statement_timeout")
        .expect("RESET");
    assert_nothing_left(&mut client);
    let problems: String = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
            &[&blueprint],
        )
        .expect("validate_blueprint without a timeout")
        .get(0);
    assert_eq!(problems, "[]");
}

/// `[0, 1, …, n-1]` as CEL.
fn range(n: usize) -> String {
    let items: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}

#[test]
fn a_cel_bomb_ends_at_its_budget_with_a_clear_error() {
    let stack = Stack::start("limits-cel", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let hundred = range(100);
    let bomb = format!("{hundred}.map(a, {hundred}.map(b, {hundred}.exists(c, false)))");
    // In the backend, at the door: 54000 naming the expression's place.
    let plan = json!({"steps": [{"id": "a", "action": "noop", "input": bomb}]}).to_string();
    assert_refused(
        &mut client,
        "SELECT synapse.submit_plan($1::text::jsonb)",
        &[&plan],
        "54000",
        "evaluation over its budget",
    );
    assert_nothing_left(&mut client);
    // In a worker: the step fails with a definition error naming it, and the
    // worker goes on.
    let plan = json!({"steps": [
        {"id": "a", "action": "noop"},
        {"id": "b", "action": "transform", "params": {"expr": bomb}}
    ], "edges": [{"from": "a", "to": "b"}]})
    .to_string();
    let goal: i64 = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&plan])
        .unwrap()
        .get(0);
    let status = wait_for_goal(&stack, goal, WAIT);
    let step = synapse_e2e::task(&status, "b");
    assert_eq!(step["failure_kind"], "definition", "{status}");
    let error = step["error"].as_str().unwrap();
    assert!(error.contains("evaluation over its budget"), "{error}");
    let next: i64 = client
        .query_one(
            "SELECT synapse.submit_plan('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wait_for_goal(&stack, next, WAIT)["status"], "succeeded");
}

#[test]
fn statement_timeout_cancels_a_long_evaluation() {
    let stack = Stack::start("limits-cel-cancel", &[]);
    let mut client = stack.pg();
    // Under its budget, but long: a cancel stops it between iterations.
    let long = format!("{}.all(a, {}.all(b, b >= 0))", range(490), range(490));
    let plan = json!({"steps": [{"id": "a", "action": "noop", "input": long}]}).to_string();
    client
        .batch_execute("SET statement_timeout = '20ms'")
        .unwrap();
    assert_refused(
        &mut client,
        "SELECT synapse.submit_plan($1::text::jsonb)",
        &[&plan],
        "57014",
        "statement timeout",
    );
    client.batch_execute("RESET statement_timeout").unwrap();
    assert_nothing_left(&mut client);
}

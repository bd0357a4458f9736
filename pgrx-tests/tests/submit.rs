//! Submitting at scale: goals submitted by the thousand in one statement,
//! into a fresh database, cost the same each, however many came before; and
//! many goals of one blueprint in one `submit_plans` call run as if each had
//! been submitted alone; a blueprint of built-in actions is validated
//! without reading the registered ones.
use std::time::Duration;

use serde_json::json;
use synapse_e2e::{postgres, task, wait_for_goal, Stack};

#[test]
fn goals_submitted_together_each_run_with_their_own_input_to_their_own_end() {
    let stack = Stack::start("submit-plans", &[]);
    let mut client = stack.pg();
    // A root that reads its goal, a join of two parents, an output.
    let blueprint = r#"{"steps":[{"id":"double","action":"transform","params":{"expr":"input.n * 2"}},
                                 {"id":"echo","action":"transform","params":{"expr":"input"},
                                  "input":"{'goal': goal.id}"},
                                 {"id":"sum","action":"transform",
                                  "params":{"expr":"input.double + 1"}}],
                        "edges":[{"from":"double","to":"sum"},{"from":"echo","to":"sum"}],
                        "output":"{'sum': steps.sum.result, 'goal': steps.echo.result.goal}"}"#;
    let ids: Vec<i64> = client
        .query_one(
            "SELECT synapse.submit_plans($1::text::jsonb,
                                         ARRAY(SELECT jsonb_build_object('n', n) FROM generate_series(1, 50) n))",
            &[&blueprint],
        )
        .unwrap()
        .get(0);
    assert_eq!(ids.len(), 50);
    let _worker = stack.start_worker("submit-plans", &[]);
    for (place, id) in ids.iter().enumerate() {
        let status = wait_for_goal(&stack, *id, Duration::from_secs(60));
        let n = place as i64 + 1;
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(
            status["result"],
            json!({"sum": n * 2 + 1, "goal": id}),
            "{status}"
        );
        assert_eq!(task(&status, "sum")["status"], "succeeded");
    }
}

#[test]
fn a_bulk_submit_into_a_fresh_database_checks_each_goal_by_probe_not_by_scanning_the_ones_before() {
    // Each task's foreign key is checked against synapse.goals with a plan
    // the session keeps. Made while the table was a page (a new install that
    // ran a few goals, which autovacuum analysed), that plan scanned the
    // table for every goal of the statement: N²/2 rows read for N goals
    // (3 000 goals: 4.5 million).
    let stack = Stack::start("bulk-submit", &[]);
    let mut client = stack.pg();
    client
        .batch_execute(
            "SELECT synapse.submit_plan('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}'::jsonb)
               FROM generate_series(1, 20)",
        )
        .unwrap();
    client
        .batch_execute("VACUUM ANALYZE synapse.goals")
        .unwrap();
    let mut client = stack.pg();
    let goals = 3_000;
    let mut tx = client.transaction().unwrap();
    let submitted: i64 = tx
        .query_one(
            "SELECT count(synapse.submit_plan('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}'::jsonb))
               FROM generate_series(1, $1::int)",
            &[&goals],
        )
        .unwrap()
        .get(0);
    assert_eq!(submitted, i64::from(goals));
    let scanned: i64 = tx
        .query_one(
            "SELECT seq_tup_read FROM pg_stat_xact_user_tables WHERE relid = 'synapse.goals'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    // A scan is fine while the table is a few pages: a few hundred rows.
    assert!(
        scanned < 100 * i64::from(goals),
        "{scanned} rows of goals scanned to submit {goals} goals"
    );
}

#[test]
fn a_blueprint_of_built_in_actions_is_validated_without_reading_the_registered_ones() {
    // Reading synapse.actions slowed the first submit_plan on a new
    // connection, and a validation of built-ins alone never needs it. One
    // naming a registered action still reads them on every call, so a
    // changed registration is seen (the plan kept for a repeated blueprint
    // is checked against them).
    let stack = Stack::start("submit-reads-actions", &[]);
    let mut client = stack.pg();
    client
        .batch_execute(
            "INSERT INTO synapse.actions (name, description) VALUES ('resize_image', 'test')",
        )
        .unwrap();
    let mut client = stack.pg();
    let mut tx = client.transaction().unwrap();
    let scans_of_actions = |tx: &mut postgres::Transaction| -> i64 {
        tx.query_one(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables
              WHERE relid = 'synapse.actions'::regclass",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let submit = |tx: &mut postgres::Transaction, action: &str| {
        tx.execute(
            "SELECT synapse.submit_plan(jsonb_build_object('steps', jsonb_build_array(
                        jsonb_build_object('id', 'a', 'action', $1::text))))
               FROM generate_series(1, 2)",
            &[&action],
        )
        .unwrap();
    };
    submit(&mut tx, "noop");
    assert_eq!(scans_of_actions(&mut tx), 0);
    submit(&mut tx, "resize_image");
    assert_eq!(scans_of_actions(&mut tx), 2, "once a call");
    tx.commit().unwrap();
}

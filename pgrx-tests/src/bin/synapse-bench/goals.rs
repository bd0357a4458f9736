//! Submitting Synapse goals and waiting for them to end.
use std::time::{Duration, Instant};

use serde_json::Value;
use synapse_e2e::{postgres, wait_for_goal, wait_until, Stack};

/// Blueprint of the no-op tasks the throughput and latency figures use.
pub const NOOP: &str = r#"{"steps":[{"id":"t","action":"noop"}],"output":"{}"}"#;

pub fn one_i64(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).expect(sql).get(0)
}

/// Submits `count` goals of `blueprint` in one statement (one transaction);
/// returns the (first, last) goal id.
pub fn submit_goals(client: &mut postgres::Client, blueprint: &str, count: usize) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT min(id), max(id) FROM (
               SELECT synapse.submit_plan($1::text::jsonb) AS id FROM generate_series(1, $2::int)) s",
            &[&blueprint, &(count as i32)],
        )
        .expect("submitting goals");
    (row.get(0), row.get(1))
}

/// `count` goals of `blueprint` with `submit_plans`, one call (autocommit),
/// each with the input `{}`.
pub fn submit_plans(client: &mut postgres::Client, blueprint: &str, count: usize) {
    let submitted: i32 = client
        .query_one(
            "SELECT cardinality(synapse.submit_plans($1::text::jsonb, array_fill('{}'::jsonb, ARRAY[$2::int])))",
            &[&blueprint, &(count as i32)],
        )
        .expect("submit_plans")
        .get(0);
    assert_eq!(submitted, count as i32);
}

/// Whether every goal with an id in `first..=last` has ended. The task check
/// runs first: it reads the small partial index of unfinished tasks, so
/// polling it stays cheap while many goals are left.
pub fn goals_finished(client: &mut postgres::Client, (first, last): (i64, i64)) -> bool {
    client
        .query_one(
            "SELECT NOT EXISTS (SELECT FROM synapse.tasks
                                 WHERE finished_at IS NULL AND goal_id BETWEEN $1 AND $2)
                AND NOT EXISTS (SELECT FROM synapse.goals
                                 WHERE finished_at IS NULL AND id BETWEEN $1 AND $2)",
            &[&first, &last],
        )
        .expect("goals finished?")
        .get(0)
}

pub fn wait_for_goals(client: &mut postgres::Client, ids: (i64, i64), limit: Duration) {
    wait_until("the goals to finish", limit, || {
        goals_finished(client, ids).then_some(())
    });
}

/// Goals finished so far.
pub fn finished_goals(client: &mut postgres::Client) -> i64 {
    one_i64(
        client,
        "SELECT count(*) FROM synapse.goals WHERE finished_at IS NOT NULL",
    )
}

/// Submits `blueprint` and waits for its goal to succeed; returns the goal
/// id, the time from submit sent to the goal's end, and the submit's own time.
pub fn run_plan(
    stack: &Stack,
    client: &mut postgres::Client,
    blueprint: &Value,
) -> (i64, Duration, Duration) {
    let text = blueprint.to_string();
    let started = Instant::now();
    let id: i64 = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&text])
        .unwrap()
        .get(0);
    let submitted = started.elapsed();
    let status = wait_for_goal(stack, id, Duration::from_secs(600));
    assert_eq!(status["status"], "succeeded");
    (id, started.elapsed(), submitted)
}

/// Empties the goal history (and with it tasks and edges) so each throughput
/// run starts from the same tables; the runs' polls and the workers' index
/// scans then do not grow with the goals of earlier runs.
pub fn forget_goals(client: &mut postgres::Client) {
    // The forwarder's transactions can lock tasks before goals; the TRUNCATE
    // locks them the other way round. Giving up on a lock before the deadlock
    // check would run (deadlock_timeout, 1 s) keeps the forwarder from ever
    // being a deadlock's victim (it would restart); then try again.
    for _ in 0..100 {
        let mut transaction = client.transaction().expect("BEGIN");
        match transaction
            .batch_execute("SET LOCAL lock_timeout = '100ms'; TRUNCATE synapse.goals CASCADE")
        {
            Ok(()) => return transaction.commit().expect("COMMIT"),
            Err(error) if error.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
            Err(error) => panic!("truncating the goals: {error}"),
        }
    }
    panic!("truncating the goals: the locks never came free");
}

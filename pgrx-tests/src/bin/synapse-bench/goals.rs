//! Submitting Synapse goals and waiting for them to end.
use std::time::{Duration, Instant};

use serde_json::Value;
use synapse_e2e::{postgres, wait_until, GoalWaiter};

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
/// each with the input `{}`; returns the highest goal id it gave.
pub fn submit_plans(client: &mut postgres::Client, blueprint: &str, count: usize) -> i64 {
    let row = client
        .query_one(
            "SELECT cardinality(ids), (SELECT max(id) FROM unnest(ids) AS id)
               FROM synapse.submit_plans($1::text::jsonb, array_fill('{}'::jsonb, ARRAY[$2::int])) AS ids",
            &[&blueprint, &(count as i32)],
        )
        .expect("submit_plans");
    let submitted: i32 = row.get(0);
    assert_eq!(submitted, count as i32);
    row.get(1)
}

/// Watches the goals with ids in `first..=last` until all have ended.
pub struct GoalsWatch {
    /// No goal below it is still running.
    first_unfinished: i64,
    last: i64,
}

impl GoalsWatch {
    pub fn new((first, last): (i64, i64)) -> GoalsWatch {
        GoalsWatch {
            first_unfinished: first,
            last,
        }
    }

    /// Whether every goal has ended. Each look starts at the first goal the
    /// last one found running, so it reads only the goals that ended since
    /// (goals end roughly in id order): a look from the start would walk the
    /// index entries of every goal ended so far, and take the measured
    /// drain's CPU (2 ms a look, about 7 % of a 100 000-goal drain's Postgres time).
    pub fn all_finished(&mut self, client: &mut postgres::Client) -> bool {
        let first: Option<i64> = client
            .query_one(
                "SELECT min(id) FROM synapse.goals WHERE id BETWEEN $1 AND $2 AND finished_at IS NULL",
                &[&self.first_unfinished, &self.last],
            )
            .expect("goals finished?")
            .get(0);
        match first {
            Some(id) => {
                self.first_unfinished = id;
                false
            }
            None => true,
        }
    }
}

pub fn wait_for_goals(client: &mut postgres::Client, ids: (i64, i64), limit: Duration) {
    let mut watch = GoalsWatch::new(ids);
    wait_until("the goals to finish", limit, || {
        watch.all_finished(client).then_some(())
    });
}

/// Goals finished so far.
pub fn finished_goals(client: &mut postgres::Client) -> i64 {
    one_i64(
        client,
        "SELECT count(*) FROM synapse.goals WHERE finished_at IS NOT NULL",
    )
}

/// Submits `blueprint` and waits (on `waiter`) for its goal to succeed;
/// returns the goal id, the time from submit sent to the goal's end, and the
/// submit's own time.
pub fn run_plan(
    waiter: &mut GoalWaiter,
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
    let status = waiter.wait(id, Duration::from_secs(600));
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

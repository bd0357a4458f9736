//! Goal rows: their locks, what expressions see of them, their end.
use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::{Row, Statement};

use super::by_id::{by_id, ids};
use super::{column, Result};
use crate::engine::decide::{goal_value, GoalVariables};
use crate::stored::{Steps, STEPS_OF_GOAL};

/// What expressions see of each of `goal_ids`.
pub async fn goal_variables(
    tx: &impl GenericClient,
    goal_ids: &[i64],
) -> Result<HashMap<i64, GoalVariables>> {
    let statement = tx
        .prepare_cached(
            "SELECT id, goal, input, params FROM synapse.goals WHERE id = ANY($1::bigint[])",
        )
        .await?;
    tx.query(&statement, &[&goal_ids])
        .await?
        .iter()
        .map(|row| {
            let goal_id: i64 = column(row, 0)?;
            let goal = goal_value(goal_id, column(row, 1)?, column(row, 2)?, column(row, 3)?);
            Ok((goal_id, GoalVariables { goal: goal.into() }))
        })
        .collect()
}

/// `steps` of goal `goal_id`.
pub async fn steps_of(tx: &impl GenericClient, goal_id: i64) -> Result<Steps> {
    let statement = tx.prepare_cached(STEPS_OF_GOAL).await?;
    let row = tx.query_one(&statement, &[&goal_id]).await?;
    Ok(Steps::of(column(&row, 0)?))
}

/// Locks those of `goal_ids` that are running, in id order, and returns
/// their ids. Nothing else is read: a goal's blueprint (its `output`) is read
/// only when the goal ends ([`goal_endings`]).
///
/// The engine runs of one goal share this lock (`FOR KEY SHARE`): they
/// record outcomes and resolve edges side by side, and take turns only where
/// they meet, on the row of a join (whose counts they update) and when they
/// look for the goal's end ([`goal_endings`]). The runs of a goal with a step
/// that cancels running tasks (a join with `cancel_others`, a map step,
/// which fails fast) take turns (`FOR NO KEY UPDATE`): such a cancel waits for
/// a task whose end another run is recording, while that run waits for the
/// row the cancelling run holds (the join's, the map step's), and one of the
/// two would be ended by Postgres's deadlock detection, a second later.
///
/// `cancel_goal`, `retry_goal` and `signal` lock the goal `FOR UPDATE`, which
/// waits for the engine runs in flight. A shared row lock does not queue
/// behind it, so runs pass the goal's gate first (`synapse._share_goals`, a
/// lock the lock manager queues: those three close it before they wait for
/// the row), and a run arriving after them waits its turn. The gate holds an
/// entry of Postgres's lock table until commit: a batch passes the gates of
/// its first [`MOST_GATES`] goals, and takes turns on the rows of the rest.
/// Lock order, everywhere: the goal (gate, then row) first, then its task
/// rows.
pub async fn lock_running_goals(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<i64>> {
    GoalLock::prepare(tx, goal_ids).await?.take(tx).await
}

/// [`lock_running_goals`]'s statements, prepared, so that a caller can send
/// them with its next statement, in one round trip.
pub(super) struct GoalLock<'a> {
    goal_ids: &'a [i64],
    /// Those of `goal_ids` whose gates the run passes.
    shared: Vec<i64>,
    gates: Statement,
    rows: Statement,
}

impl<'a> GoalLock<'a> {
    pub(super) async fn prepare(tx: &impl GenericClient, goal_ids: &'a [i64]) -> Result<Self> {
        let (gates, rows) = futures_util::future::try_join(
            tx.prepare_cached(PASS_GATES),
            tx.prepare_cached(LOCK_RUNNING_GOALS),
        )
        .await?;
        Ok(GoalLock {
            goal_ids,
            shared: gated(goal_ids),
            gates,
            rows,
        })
    }

    /// Passes the gates, then locks the rows (sent together: the lock runs
    /// once the gates are passed, on a snapshot taken then); returns the
    /// running goals' ids.
    pub(super) async fn take(&self, tx: &impl GenericClient) -> Result<Vec<i64>> {
        let (_, rows) = futures_util::future::try_join(
            tx.execute(&self.gates, &[&self.shared]),
            tx.query(&self.rows, &[&self.goal_ids, &self.shared]),
        )
        .await?;
        goal_ids_of(rows)
    }
}

/// The most goals whose gates one transaction holds (see
/// [`lock_running_goals`]): Postgres's lock table has room for about 64 locks
/// a connection, shared by all.
pub const MOST_GATES: usize = 64;

/// Those of `goal_ids` whose gates a batch passes: the first [`MOST_GATES`]
/// in id order.
fn gated(goal_ids: &[i64]) -> Vec<i64> {
    let mut ids = goal_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(MOST_GATES);
    ids
}

/// The statement that passes the gates of `$1` (see [`lock_running_goals`]).
pub const PASS_GATES: &str = "SELECT synapse._share_goals($1::bigint[])";

/// Whether the engine runs of goal `g` take turns: one probe of an index
/// that holds few rows (`OFFSET 0` keeps it a probe: made a join, on the
/// statistics of tables still empty, it may be planned as a scan of every
/// task, kept for the session's life).
macro_rules! taking_turns {
    () => {
        "EXISTS (SELECT FROM synapse.tasks t
                  WHERE t.goal_id = g.id AND (t.cancel_others OR t.for_each_expr IS NOT NULL)
                 OFFSET 0)"
    };
}

/// The statement of [`lock_running_goals`]: `$1` the goals, `$2` those of
/// them whose gates the transaction passed; the others take turns.
pub const LOCK_RUNNING_GOALS: &str = concat!(
    "WITH alone AS (
          SELECT g.id FROM synapse.goals g
           WHERE g.id = ANY($1::bigint[]) AND g.status = 'running'
             AND (g.id <> ALL($2::bigint[]) OR ",
    taking_turns!(),
    ")
           ORDER BY g.id FOR NO KEY UPDATE),
     shared AS (
          SELECT g.id FROM synapse.goals g
           WHERE g.id = ANY($2::bigint[]) AND g.status = 'running' AND NOT ",
    taking_turns!(),
    "
           ORDER BY g.id FOR KEY SHARE)
     SELECT id FROM (SELECT id FROM alone UNION ALL SELECT id FROM shared) locked ORDER BY id"
);

/// Locks those of `goal_ids` that are running, in id order, for one engine
/// run at a time: for the rare runs that must not overlap another of the
/// same goal (carrying on after lapsed leases, a goal run again), and for
/// the look at a goal's end ([`goal_endings`]).
pub async fn lock_running_goals_alone(
    tx: &impl GenericClient,
    goal_ids: &[i64],
) -> Result<Vec<i64>> {
    let statement = tx.prepare_cached(LOCK_RUNNING_GOALS_ALONE).await?;
    goal_ids_of(tx.query(&statement, &[&goal_ids]).await?)
}

const LOCK_RUNNING_GOALS_ALONE: &str = "SELECT id FROM synapse.goals
                                         WHERE id = ANY($1::bigint[]) AND status = 'running'
                                         ORDER BY id FOR NO KEY UPDATE";

pub(super) fn goal_ids_of(rows: Vec<Row>) -> Result<Vec<i64>> {
    rows.iter().map(|row| column(row, 0)).collect()
}

/// How a goal whose steps have all ended comes out.
pub struct GoalEnding {
    /// Goal id.
    pub goal_id: i64,
    /// The blueprint's `output` expression, if it has one.
    pub output: Option<String>,
    /// Failed steps with no taken `failure`/`always` edge out of them, and steps failed
    /// by a definition error whatever their edges: `(step, error)`.
    pub unhandled_failures: Vec<(String, String)>,
    /// The default result: the results of the succeeded leaf steps (read
    /// only for a goal with no `output`).
    pub leaf_results: Value,
    /// Set when those results together are more than one stored JSON value
    /// may hold (then `leaf_results` is empty): their size in bytes.
    pub leaf_results_oversized: Option<i64>,
}

/// The statement reading goals' endings (see [`goal_endings`]), for the
/// goals of `$1` whose steps have all ended and that meet `$only`.
macro_rules! goal_endings {
    ($only:expr) => {
        concat!(
            "SELECT ended.id, ended.output, steps.unhandled, steps.errors, steps.leaf_results, steps.oversized
               FROM (SELECT g.id, g.blueprint ->> 'output' AS output
                       FROM synapse.goals g
                       LEFT JOIN LATERAL (SELECT true AS found FROM synapse.tasks t
                                           WHERE t.goal_id = g.id AND t.finished_at IS NULL
                                           LIMIT 1) unfinished ON true
                      WHERE g.id = ANY($1::bigint[]) AND unfinished.found IS NULL
                        AND ", $only, "
                     OFFSET 0) ended
              CROSS JOIN LATERAL (
                    SELECT coalesce(array_agg(s.step::text ORDER BY s.id) FILTER (WHERE s.unhandled), '{}') AS unhandled,
                           coalesce(array_agg(coalesce(s.error, 'failed') ORDER BY s.id) FILTER (WHERE s.unhandled), '{}')
                             AS errors,
                           -- The default result, only if it fits one jsonb value:
                           -- built past it, the statement would fail, and with it
                           -- the outcomes that ended the goal, at every attempt.
                           coalesce(jsonb_object_agg(s.step, s.result)
                                      FILTER (WHERE s.leaf AND s.leaf_bytes <= ", max_stored_json_bytes!(), "),
                                    '{}') AS leaf_results,
                           max(s.leaf_bytes) FILTER (WHERE s.leaf_bytes > ", max_stored_json_bytes!(), ") AS oversized
                      FROM (SELECT s.*,
                                   -- Its size as one jsonb value.
                                   sum(CASE WHEN s.leaf
                                            THEN ", stored_size!("s.step", "coalesce(s.result, 'null'::jsonb)"), "
                                       END) OVER () AS leaf_bytes
                              FROM (SELECT t.id, t.step, t.error, t.result,
                                   -- A failure no taken failure/always edge handles, or a definition error.
                                   t.status = 'failed'
                                     AND (t.failure_kind IS NOT DISTINCT FROM 'definition'
                                          OR NOT EXISTS (SELECT FROM synapse.edges e
                                                          WHERE e.goal_id = t.goal_id AND e.from_step = t.step
                                                            AND e.state = 'taken'
                                                            AND e.on_outcome IN ('failure', 'always')
                                                         OFFSET 0)) AS unhandled,
                                   -- A succeeded step with no edge out of it, read only
                                   -- for the default result.
                                   t.status = 'succeeded' AND ended.output IS NULL
                                     AND NOT EXISTS (SELECT FROM synapse.edges e
                                                      WHERE e.goal_id = t.goal_id AND e.from_step = t.step
                                                     OFFSET 0) AS leaf
                              FROM synapse.tasks t
                             WHERE t.goal_id = ended.id AND t.map_index IS NULL
                               -- A goal with an output reads its failures alone.
                               AND (t.status = 'failed' OR (t.status = 'succeeded' AND ended.output IS NULL))
                            OFFSET 0) s) s) steps
              ORDER BY ended.id"
        )
    };
}

/// The endings of those of `goal_ids` whose every step has ended. The goals
/// are locked for one engine run at a time first ([`lock_running_goals_alone`]),
/// the caller having written its steps' ends: of the runs that end a goal's
/// last steps at once, the last to take the lock sees every other's ends
/// committed, and finishes the goal. The lock and the read go out together,
/// one round trip; the read runs once the lock is held, on a snapshot taken
/// then. Whether a goal has a task left is one index probe; an ended
/// goal's steps are then read once (its failures alone if it has an
/// `output`), each with a probe of its edges (a subquery per row, so that
/// the planner never merges every step of a goal with every edge: a plan it
/// chose on tables still empty read W² rows to end a W-wide goal). `OFFSET 0`
/// keeps the goals still running out before their steps are read, each
/// step's columns computed once, and each probe a probe: without it the
/// planner may look the steps up in a hash of every edge in the table, read
/// whole to end one wide goal.
pub async fn goal_endings(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<GoalEnding>> {
    if goal_ids.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx.prepare_cached(GOAL_ENDINGS).await?;
    // Both prepared first: a statement still to be prepared would go out
    // after the other.
    let lock = tx.prepare_cached(LOCK_RUNNING_GOALS_ALONE).await?;
    let (_, rows) = futures_util::future::try_join(
        tx.query(&lock, &[&goal_ids]),
        tx.query(&statement, &[&goal_ids]),
    )
    .await?;
    endings_of(&rows)
}

const GOAL_ENDINGS: &str = goal_endings!("true");

/// [`goal_endings`] of goals that have one step, with no lock: that step's
/// end is the only one that can end its goal, and the caller wrote it. Sent
/// with the outcomes ([`super::lock_goals_and_record`]), it saves such a goal
/// the lock and the round trip of the look every other goal takes. The
/// blueprint says how many steps (a map step's instances are rows of their
/// own): a look at the goal's tasks would read each version of the task the
/// caller just wrote.
pub(super) const ENDINGS_OF_ONE_STEP_GOALS: &str = goal_endings!(
    "g.blueprint -> 'steps' -> 1 IS NULL AND g.blueprint -> 'steps' -> 0 ->> 'for_each' IS NULL"
);

/// The endings an endings statement's `rows` hold.
pub(super) fn endings_of(rows: &[Row]) -> Result<Vec<GoalEnding>> {
    rows.iter()
        .map(|row| {
            let steps: Vec<String> = column(row, 2)?;
            let errors: Vec<String> = column(row, 3)?;
            Ok(GoalEnding {
                goal_id: column(row, 0)?,
                output: column(row, 1)?,
                unhandled_failures: steps.into_iter().zip(errors).collect(),
                leaf_results: column(row, 4)?,
                leaf_results_oversized: column(row, 5)?,
            })
        })
        .collect()
}

/// How a goal finished.
pub struct GoalFinish {
    /// Goal id.
    pub goal_id: i64,
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// Result of a succeeded goal.
    pub result: Option<Value>,
    /// Why a goal failed.
    pub error: Option<String>,
}

/// `running → succeeded | failed`, for many goals in one statement.
pub async fn finish_goals(tx: &impl GenericClient, finishes: &[GoalFinish]) -> Result<()> {
    if finishes.is_empty() {
        return Ok(());
    }
    let statement = tx.prepare_cached(FINISH_GOALS).await?;
    finish_goals_with(tx, &statement, finishes).await
}

/// [`finish_goals`] with its statement already prepared, so that a caller
/// can send it with others in one round trip.
pub(super) async fn finish_goals_with(
    tx: &impl GenericClient,
    statement: &Statement,
    finishes: &[GoalFinish],
) -> Result<()> {
    if finishes.is_empty() {
        return Ok(());
    }
    let finishes: Vec<(i64, Finish)> = finishes
        .iter()
        .map(|finish| {
            (
                finish.goal_id,
                Finish {
                    status: finish.status,
                    result: finish.result.as_ref(),
                    error: finish.error.as_deref(),
                },
            )
        })
        .collect();
    tx.execute(statement, &[&ids(&finishes), &by_id(&finishes)])
        .await?;
    Ok(())
}

/// The statement of [`finish_goals`]: by id, joined to nothing (see by_id).
pub(super) const FINISH_GOALS: &str = "UPDATE synapse.goals g SET (status, result, error) = (
        SELECT r.f ->> 'status', r.f -> 'result', r.f ->> 'error'
          FROM (SELECT $2::jsonb -> g.id::text) AS r(f))
  WHERE g.id = ANY($1::bigint[]) AND g.status = 'running'";

/// A goal's finish as [`finish_goals`] reads it.
#[derive(Debug, Serialize)]
struct Finish<'a> {
    status: &'static str,
    /// Absent, not null: a goal may succeed with null for its result.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    error: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_passes_the_gates_of_its_first_goals_once_each_in_id_order() {
        assert_eq!(gated(&[9, 3, 9, 1]), vec![1, 3, 9]);
        let many: Vec<i64> = (0..200).rev().collect();
        let shared = gated(&many);
        assert_eq!(shared.len(), MOST_GATES);
        assert_eq!(shared.first(), Some(&0));
        assert_eq!(shared.last(), Some(&(MOST_GATES as i64 - 1)));
    }
}

//! Goal rows: their locks, what expressions see of them, their end.
use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;

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
/// Lock order, everywhere: a goal row first, then its task rows. The
/// completer takes these locks before it records any outcome, as
/// `cancel_goal` locks the goal before cancelling its tasks, so the two never
/// wait for each other in a cycle; the id order keeps engine runs that touch
/// several goals from deadlocking each other.
pub async fn lock_running_goals(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<i64>> {
    let statement = tx.prepare_cached(LOCK_RUNNING_GOALS).await?;
    goal_ids_of(tx.query(&statement, &[&goal_ids]).await?)
}

pub(super) const LOCK_RUNNING_GOALS: &str = "SELECT id FROM synapse.goals
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

/// The endings of those of `goal_ids` whose every step has ended, in one
/// statement. Whether a goal has a task left is one index probe; an ended
/// goal's steps are then read once (its failures alone if it has an
/// `output`), each with a probe of its edges (a subquery per row, so that
/// the planner never merges every step of a goal with every edge: a plan it
/// chose on tables still empty read W² rows to end a W-wide goal). `OFFSET 0`
/// keeps the goals still running out before their steps are read, each
/// step's columns computed once, and each probe a probe: without it the
/// planner may look the steps up in a hash of every edge in the table, read
/// whole to end one wide goal.
pub async fn goal_endings(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<GoalEnding>> {
    let statement = tx
        .prepare_cached(concat!(
            "SELECT ended.id, ended.output, steps.unhandled, steps.errors, steps.leaf_results, steps.oversized
               FROM (SELECT g.id, g.blueprint ->> 'output' AS output
                       FROM synapse.goals g
                       LEFT JOIN LATERAL (SELECT true AS found FROM synapse.tasks t
                                           WHERE t.goal_id = g.id AND t.finished_at IS NULL
                                           LIMIT 1) unfinished ON true
                      WHERE g.id = ANY($1::bigint[]) AND unfinished.found IS NULL
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
        ))
        .await?;
    tx.query(&statement, &[&goal_ids])
        .await?
        .iter()
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
    let statement = tx
        .prepare_cached(
            // By id, joined to nothing (see by_id).
            "UPDATE synapse.goals g SET (status, result, error) = (
                    SELECT r.f ->> 'status', r.f -> 'result', r.f ->> 'error'
                      FROM (SELECT $2::jsonb -> g.id::text) AS r(f))
              WHERE g.id = ANY($1::bigint[]) AND g.status = 'running'",
        )
        .await?;
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
    tx.execute(&statement, &[&ids(&finishes), &by_id(&finishes)])
        .await?;
    Ok(())
}

/// A goal's finish as [`finish_goals`] reads it.
#[derive(Debug, Serialize)]
struct Finish<'a> {
    status: &'static str,
    /// Absent, not null: a goal may succeed with null for its result.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    error: Option<&'a str>,
}

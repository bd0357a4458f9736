//! The statements of goal steps (SPEC §4.7): starting a child goal for an
//! attempt, and ending the steps whose child has ended.
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::error::SqlState;

use super::{column, Result, StoreError};
use crate::engine::child::Child;

/// What starting a child goal came to.
pub enum Started {
    /// The child runs; the step waits for it.
    Child(i64),
    /// The attempt no longer holds the step (or its goal no longer runs).
    Fenced,
    /// The child cannot be started (an invalid blueprint, too deep): why,
    /// every problem listed.
    Refused(String),
}

/// Starts the child goal of attempt `attempt` of goal step `task_id`, with
/// `input`, and makes the step wait for it.
pub async fn start(
    tx: &impl GenericClient,
    task_id: i64,
    attempt: i32,
    child: &Child,
    input: &Value,
) -> Result<Started> {
    let (text, planner, blueprint) = match child {
        Child::Goal { text, planner } => (Some(text.as_str()), Some(planner.as_str()), None),
        Child::Blueprint(blueprint) => (None, None, Some(blueprint)),
    };
    let statement = tx
        .prepare_cached("SELECT synapse._start_child($1, $2, $3, $4, $5, $6)")
        .await?;
    match tx
        .query_one(
            &statement,
            &[&task_id, &attempt, &text, &planner, &blueprint, input],
        )
        .await
    {
        Ok(row) => Ok(match column::<Option<i64>>(&row, 0)? {
            Some(child) => Started::Child(child),
            None => Started::Fenced,
        }),
        Err(error) => match error.as_db_error() {
            Some(db)
                if [
                    SqlState::INVALID_PARAMETER_VALUE,
                    SqlState::PROGRAM_LIMIT_EXCEEDED,
                    SqlState::INVALID_TEXT_REPRESENTATION,
                ]
                .contains(db.code()) =>
            {
                Ok(Started::Refused(match db.detail() {
                    Some(detail) if !detail.is_empty() => {
                        format!("{}\n{detail}", db.message())
                    }
                    _ => db.message().to_owned(),
                }))
            }
            _ => Err(StoreError::from(error)),
        },
    }
}

/// Ends those goal steps among `task_ids` that wait for a child goal that
/// has ended (the caller holds their goals' locks): `succeeded` with the
/// child's result; else `retrying` with a new child to come when an attempt
/// is left, or `failed` with the child's error. A step already ended, or
/// whose child still runs, is left alone, so a repeated message changes
/// nothing.
pub async fn settle(tx: &impl GenericClient, task_ids: &[i64]) -> Result<()> {
    let statement = tx
        .prepare_cached(
            "WITH ended AS (
                 SELECT t.id, c.id AS child, c.status AS child_status, c.result, c.error,
                        CASE WHEN c.status = 'succeeded' THEN 'succeeded'
                             WHEN t.attempts - t.attempts_before < t.max_attempts THEN 'retrying'
                             ELSE 'failed' END AS status,
                        -- Exponential backoff with jitter, as the worker's own retries.
                        now() + least(t.backoff_ms * power(2, greatest(t.attempts - t.attempts_before - 1, 0))
                                      * (0.5 + random()), 86400000) * interval '1 millisecond' AS run_at
                   FROM synapse.tasks t JOIN synapse.goals c ON c.id = t.child_goal_id
                  WHERE t.id = ANY($1::bigint[]) AND t.status = 'waiting'
                    AND c.status IN ('succeeded', 'failed', 'cancelled')
                    FOR NO KEY UPDATE OF t),
             settled AS (
                 UPDATE synapse.tasks t
                    SET status = e.status,
                        result = CASE WHEN e.status = 'succeeded' THEN e.result END,
                        error = CASE WHEN e.status <> 'succeeded' THEN
                                    format('child goal %s %s: %s', e.child, e.child_status,
                                           coalesce(e.error, e.child_status)) END,
                        failure_kind = CASE WHEN e.status = 'failed' THEN 'action' END,
                        run_at = CASE WHEN e.status = 'retrying' THEN e.run_at END
                   FROM ended e
                  WHERE t.id = e.id
              RETURNING t.id, t.attempts, t.started_at, t.status, t.error)
             -- A failed attempt is kept, as every other.
             INSERT INTO synapse.attempts (task_id, attempt, started_at, error)
             SELECT id, attempts, started_at, error FROM settled WHERE status <> 'succeeded'",
        )
        .await?;
    tx.execute(&statement, &[&task_ids]).await?;
    Ok(())
}

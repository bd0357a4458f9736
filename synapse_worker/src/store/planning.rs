//! Planning a submitted goal: counting attempts, claiming it, installing
//! its plan or failing it.
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::{begin, column, data_message, Result};

/// Most planning attempts of one goal: a goal whose planning keeps failing
/// (an error, a worker dying) fails after this many instead of being sent to
/// the planners forever.
pub const MAX_PLAN_ATTEMPTS: i32 = 3;

/// A planning attempt that was counted.
pub struct PlanAttempt {
    /// Its number, 1 for the first.
    pub number: i32,
    /// What made the previous attempt fail, if it said.
    pub previous_error: Option<String>,
}

/// Counts a planning attempt of a submitted goal, committed on its own so
/// that an attempt which never finishes (a worker killed while planning)
/// counts too. `None` for a goal that is not submitted (a duplicate message,
/// a goal already planned or cancelled) or that another transaction holds
/// (another planner is at it): the message is dropped.
pub async fn count_plan_attempt(
    client: &mut deadpool_postgres::Client,
    goal_id: i64,
) -> Result<Option<PlanAttempt>> {
    let tx = begin(client).await?;
    let statement = tx
        .prepare_cached(
            "WITH m AS (
                 SELECT id FROM synapse.goals WHERE id = $1 AND status = 'submitted'
                    FOR NO KEY UPDATE SKIP LOCKED)
             UPDATE synapse.goals g SET plan_attempts = g.plan_attempts + 1
               FROM m WHERE g.id = m.id
          RETURNING g.plan_attempts, g.error",
        )
        .await?;
    let attempt = match tx.query_opt(&statement, &[&goal_id]).await? {
        Some(row) => Some(PlanAttempt {
            number: column(&row, 0)?,
            previous_error: column(&row, 1)?,
        }),
        None => None,
    };
    tx.commit().await?;
    Ok(attempt)
}

/// Keeps why a planning attempt failed (the goal stays submitted, for the
/// sweep to send again); the next attempt reports it if it gives up.
pub async fn note_planning_error(
    client: &impl GenericClient,
    goal_id: i64,
    error: &str,
) -> Result<()> {
    let statement = client
        .prepare_cached(
            "UPDATE synapse.goals SET error = $2 WHERE id = $1 AND status = 'submitted'",
        )
        .await?;
    client.execute(&statement, &[&goal_id, &error]).await?;
    Ok(())
}

/// A goal a planner claimed.
pub struct GoalToPlan {
    /// Goal text.
    pub goal: String,
    /// Goal input, or why it cannot be read (e.g. JSON nested deeper than
    /// serde_json reads): such a goal fails saying so.
    pub input: std::result::Result<Value, String>,
    /// Planner name.
    pub planner: String,
}

/// Claims a submitted goal for planning (`submitted → planning`); `None` for
/// a duplicate message or a goal already planned or cancelled.
pub async fn claim_goal(tx: &impl GenericClient, goal_id: i64) -> Result<Option<GoalToPlan>> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.goals SET status = 'planning', error = NULL WHERE id = $1 AND status = 'submitted'
          RETURNING goal, input, coalesce(planner, 'template')",
        )
        .await?;
    let Some(row) = tx.query_opt(&statement, &[&goal_id]).await? else {
        return Ok(None);
    };
    Ok(Some(GoalToPlan {
        goal: column(&row, 0)?,
        input: column::<Value>(&row, 1)
            .map_err(|error| format!("cannot read the goal's input: {}", data_message(error))),
        planner: column(&row, 2)?,
    }))
}

/// Installs a planned blueprint (the extension validates it and creates the
/// tasks, or fails the goal); returns the problems, empty on success.
pub async fn install_plan(
    tx: &impl GenericClient,
    goal_id: i64,
    blueprint: &Value,
    template: Option<&str>,
    params: &Value,
) -> Result<Value> {
    let statement = tx
        .prepare_cached("SELECT synapse._install_plan($1, $2, $3, $4)")
        .await?;
    column(
        &tx.query_one(&statement, &[&goal_id, blueprint, &template, params])
            .await?,
        0,
    )
}

/// Fails a goal that could not be planned.
pub async fn fail_planning(tx: &impl GenericClient, goal_id: i64, error: &str) -> Result<()> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.goals SET status = 'failed', error = $2 WHERE id = $1 AND status IN ('submitted', 'planning')",
        )
        .await?;
    tx.execute(&statement, &[&goal_id, &error]).await?;
    Ok(())
}

/// Templates in the order the template planner tries them.
pub async fn templates(tx: &impl GenericClient) -> Result<Vec<(String, String, Value)>> {
    let statement = tx
        .prepare_cached(
            "SELECT name, pattern, blueprint FROM synapse.templates ORDER BY priority DESC, name",
        )
        .await?;
    tx.query(&statement, &[])
        .await?
        .iter()
        .map(|row| Ok((column(row, 0)?, column(row, 1)?, column(row, 2)?)))
        .collect()
}

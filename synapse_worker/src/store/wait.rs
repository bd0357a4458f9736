//! The statements of wait steps (SPEC §4.9): starting them (the extension
//! evaluates their deadline and takes a signal kept for them).
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::{column, Result};

/// How a wait step that started came out at once.
pub struct Started {
    /// The wait step's task id.
    pub task_id: i64,
    /// `waiting`, `succeeded` (a kept signal was taken) or `failed`.
    pub status: String,
    /// Its result when it succeeded.
    pub result: Value,
    /// Why it failed: its `params.until` could not be evaluated.
    pub error: Option<String>,
}

/// Starts the wait steps the engine decided to run, with their inputs.
pub async fn start(tx: &impl GenericClient, waits: &[(i64, Value)]) -> Result<Vec<Started>> {
    if waits.is_empty() {
        return Ok(Vec::new());
    }
    let waits = Value::Array(
        waits
            .iter()
            .map(|(task_id, input)| Value::Array(vec![Value::from(*task_id), input.clone()]))
            .collect(),
    );
    let statement = tx
        .prepare_cached(
            "SELECT task_id, status, coalesce(result, 'null'::jsonb), error FROM synapse._start_waits($1)",
        )
        .await?;
    tx.query(&statement, &[&waits])
        .await?
        .iter()
        .map(|row| {
            Ok(Started {
                task_id: column(row, 0)?,
                status: column(row, 1)?,
                result: column(row, 2)?,
                error: column(row, 3)?,
            })
        })
        .collect()
}

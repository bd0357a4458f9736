//! The console's buttons: each calls the SQL API as the console's role, so
//! the same checks apply as in psql, and a refusal comes back as its error.
use serde::Deserialize;
use serde_json::{json, Value};

use super::ApiError;

/// `POST api/goals/ID/signal`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    name: String,
    #[serde(default = "empty_object")]
    payload: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// `POST api/goals/ID/retry`: the steps to run again (none: the failed and cancelled ones).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    #[serde(default)]
    steps: Option<Vec<String>>,
}

/// `synapse.cancel_goal`: whether the goal was still running.
pub async fn cancel(client: &tokio_postgres::Client, id: i64) -> Result<Value, ApiError> {
    let row = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&id])
        .await?;
    Ok(json!({"cancelled": row.try_get::<_, Option<bool>>(0)?}))
}

/// `synapse.signal`: whether a waiting step took it at once.
pub async fn signal(
    client: &tokio_postgres::Client,
    id: i64,
    signal: &Signal,
) -> Result<Value, ApiError> {
    let row = client
        .query_one(
            "SELECT synapse.signal($1, $2, $3)",
            &[&id, &signal.name, &signal.payload],
        )
        .await?;
    Ok(json!({"taken": row.try_get::<_, Option<bool>>(0)?}))
}

/// `synapse.retry_goal`.
pub async fn retry(
    client: &tokio_postgres::Client,
    id: i64,
    retry: &Retry,
) -> Result<Value, ApiError> {
    let row = client
        .query_one("SELECT synapse.retry_goal($1, $2)", &[&id, &retry.steps])
        .await?;
    Ok(json!({"retried": row.try_get::<_, Option<bool>>(0)?}))
}

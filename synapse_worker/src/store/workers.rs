//! The worker's own rows: its start and stop, its actions, the extension
//! it runs against.
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::{column, Result};

/// Publishes this worker's actions in the catalogue.
pub async fn register_actions(
    client: &impl GenericClient,
    actions: &[(String, String, Option<Value>, bool)],
    worker: &str,
) -> Result<()> {
    let statement = client
        .prepare_cached(
            "INSERT INTO synapse.actions (name, description, params_schema, builtin, registered_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE
                SET description = excluded.description, params_schema = excluded.params_schema,
                    builtin = excluded.builtin, registered_by = excluded.registered_by, updated_at = now()",
        )
        .await?;
    for (name, description, schema, builtin) in actions {
        client
            .execute(&statement, &[name, description, schema, builtin, &worker])
            .await?;
    }
    Ok(())
}

/// The version of the synapse extension in the database (its SQL objects),
/// `None` if it is not installed.
pub async fn extension_version(client: &impl GenericClient) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'synapse'",
            &[],
        )
        .await?;
    row.map(|row| column(&row, 0)).transpose()
}

/// What a starting worker learns of the extension's settings.
pub struct ExtensionSettings {
    /// `synapse.key_prefix`, if this session can read it.
    pub key_prefix: Option<String>,
    /// `synapse.redis_url`, if this role may read it (superuser-only).
    pub redis_url: Option<String>,
}

/// Records that `worker` started and serves `queues` (a restart under the
/// same identity starts afresh; workers stopped more than 7 days ago are
/// forgotten), and reads the extension's Redis settings in the same statement.
pub async fn worker_started(
    client: &impl GenericClient,
    worker: &str,
    queues: &[String],
) -> Result<ExtensionSettings> {
    let statement = client
        .prepare_cached(
            "WITH forgotten AS (
                 DELETE FROM synapse.workers
                  WHERE stopped_at < now() - interval '7 days' AND identity <> $1)
             INSERT INTO synapse.workers AS w (identity, queues) VALUES ($1, $2)
             ON CONFLICT (identity) DO UPDATE
                SET queues = excluded.queues, started_at = now(), last_seen_at = now(),
                    stopped_at = NULL, lost_at = NULL
          RETURNING current_setting('synapse.key_prefix', true),
                    -- pg_settings shows only what this role may read.
                    (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'synapse.redis_url')",
        )
        .await?;
    let row = client.query_one(&statement, &[&worker, &queues]).await?;
    Ok(ExtensionSettings {
        key_prefix: column(&row, 0)?,
        redis_url: column(&row, 1)?,
    })
}

/// Records that `worker` stopped: it serves no queue any more.
pub async fn worker_stopped(client: &impl GenericClient, worker: &str) -> Result<()> {
    let statement = client
        .prepare_cached(
            "UPDATE synapse.workers SET stopped_at = now(), last_seen_at = now() WHERE identity = $1",
        )
        .await?;
    client.execute(&statement, &[&worker]).await?;
    Ok(())
}

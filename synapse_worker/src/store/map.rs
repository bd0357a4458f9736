//! The statements of map steps (SPEC §4.6): starting them (the extension
//! evaluates the list and writes the instances), reading their progress,
//! queueing instances held back by `max_parallel`, and ending them.
//!
//! A step's own row is looked up as `coalesce(map_index, -1) = -1`, the key
//! of the `tasks_step` index: `map_index IS NULL` would make Postgres walk
//! every instance of the step to find it.
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::{column, Queued, Result};

/// How a map step that started came out at once.
pub struct Started {
    /// The map step's task id.
    pub task_id: i64,
    /// `waiting` (its instances run), `succeeded` (an empty list) or `failed`.
    pub status: String,
    /// Why it failed: its list or an input could not be evaluated.
    pub error: Option<String>,
}

/// Starts the map steps `task_ids` the engine decided to run.
pub async fn start(tx: &impl GenericClient, task_ids: &[i64]) -> Result<Vec<Started>> {
    if task_ids.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached("SELECT task_id, status, error FROM synapse._start_maps($1)")
        .await?;
    tx.query(&statement, &[&task_ids])
        .await?
        .iter()
        .map(|row| {
            Ok(Started {
                task_id: column(row, 0)?,
                status: column(row, 1)?,
                error: column(row, 2)?,
            })
        })
        .collect()
}

/// Where a waiting map step stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The map step's task id.
    pub task_id: i64,
    /// Its goal.
    pub goal_id: i64,
    /// Its step id.
    pub step: String,
    /// Instances in all.
    pub size: i32,
    /// Index of the next instance to queue.
    pub next: i32,
    /// Instances ended.
    pub ended: i32,
    /// Instances failed.
    pub failed: i32,
    /// Most instances queued or running at once.
    pub max_parallel: Option<i32>,
    /// Failures the step tolerates.
    pub tolerate: i32,
}

/// The waiting map steps among `(goal_id, step)`.
pub async fn progress(tx: &impl GenericClient, maps: &[(i64, String)]) -> Result<Vec<Progress>> {
    let goals: Vec<i64> = maps.iter().map(|(goal_id, _)| *goal_id).collect();
    let steps: Vec<&str> = maps.iter().map(|(_, step)| step.as_str()).collect();
    let statement = tx
        .prepare_cached(
            "SELECT m.id, m.goal_id, m.step, m.map_size, m.map_next, m.map_ended, m.map_failed, m.max_parallel,
                    m.tolerate
               FROM unnest($1::bigint[], $2::text[]) AS s(goal_id, step)
               JOIN synapse.tasks m ON m.goal_id = s.goal_id AND m.step = s.step AND coalesce(m.map_index, -1) = -1
              WHERE m.status = 'waiting'
              ORDER BY m.id",
        )
        .await?;
    tx.query(&statement, &[&goals, &steps])
        .await?
        .iter()
        .map(|row| {
            Ok(Progress {
                task_id: column(row, 0)?,
                goal_id: column(row, 1)?,
                step: column(row, 2)?,
                size: column(row, 3)?,
                next: column(row, 4)?,
                ended: column(row, 5)?,
                failed: column(row, 6)?,
                max_parallel: column(row, 7)?,
                tolerate: column(row, 8)?,
            })
        })
        .collect()
}

/// Counts again the instances of the map steps of `instance_ids` that ended:
/// for instances no worker recorded (the forwarder failed them when their
/// last lease lapsed). Counting afresh makes a repeated message harmless.
pub async fn recount(tx: &impl GenericClient, instance_ids: &[i64]) -> Result<()> {
    if instance_ids.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks m
                SET map_ended = (SELECT count(*) FROM synapse.tasks i
                                  WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                                    AND i.status IN ('succeeded', 'failed')),
                    map_failed = (SELECT count(*) FROM synapse.tasks i
                                   WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                                     AND i.status = 'failed')
               FROM (SELECT DISTINCT goal_id, step FROM synapse.tasks
                      WHERE id = ANY($1::bigint[]) AND map_index IS NOT NULL) s
              WHERE m.goal_id = s.goal_id AND m.step = s.step AND coalesce(m.map_index, -1) = -1 AND m.status = 'waiting'",
        )
        .await?;
    tx.execute(&statement, &[&instance_ids]).await?;
    Ok(())
}

/// Queues the instances `from..to` of each map step `(task_id, from, to)`,
/// held back until now by `max_parallel`; returns them.
pub async fn queue_instances(
    tx: &impl GenericClient,
    ranges: &[(i64, i32, i32)],
) -> Result<Vec<Queued>> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = ranges.iter().map(|(id, _, _)| *id).collect();
    let from: Vec<i32> = ranges.iter().map(|(_, from, _)| *from).collect();
    let to: Vec<i32> = ranges.iter().map(|(_, _, to)| *to).collect();
    let statement = tx
        .prepare_cached(
            "WITH advanced AS (
                 UPDATE synapse.tasks m SET map_next = r.to_index
                   FROM unnest($1::bigint[], $2::int[], $3::int[]) AS r(id, from_index, to_index)
                  WHERE m.id = r.id AND m.map_next = r.from_index
              RETURNING m.goal_id, m.step, r.from_index, r.to_index)
             UPDATE synapse.tasks i SET status = 'queued'
               FROM advanced a
              WHERE i.goal_id = a.goal_id AND i.step = a.step
                AND coalesce(i.map_index, -1) >= a.from_index AND coalesce(i.map_index, -1) < a.to_index
                AND i.status = 'pending'
          RETURNING i.id, i.queue",
        )
        .await?;
    tx.query(&statement, &[&ids, &from, &to])
        .await?
        .iter()
        .map(|row| {
            Ok(Queued {
                id: column(row, 0)?,
                queue: column(row, 1)?,
            })
        })
        .collect()
}

/// Ends map steps whose instances have all ended within their tolerance:
/// `succeeded`, with the instances' results in index order (`null` for a
/// failed one). Returns `(task_id, result)`.
pub async fn succeed(tx: &impl GenericClient, task_ids: &[i64]) -> Result<Vec<(i64, Value)>> {
    if task_ids.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks m
                SET status = 'succeeded',
                    result = (SELECT coalesce(jsonb_agg(CASE WHEN i.status = 'succeeded' THEN i.result END
                                                        ORDER BY i.map_index), '[]')
                                FROM synapse.tasks i
                               WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL)
              WHERE m.id = ANY($1::bigint[]) AND m.status = 'waiting'
          RETURNING m.id, m.result",
        )
        .await?;
    tx.query(&statement, &[&task_ids])
        .await?
        .iter()
        .map(|row| Ok((column(row, 0)?, column(row, 1)?)))
        .collect()
}

/// A map step that failed.
pub struct Failed {
    /// The map step's task id.
    pub task_id: i64,
    /// Why, with the first failed instance's error.
    pub error: String,
    /// An instance failed by a definition error: so does the step.
    pub definition_error: bool,
}

/// Fails map steps whose failed instances exceed their tolerance; their
/// instances not yet ended are cancelled (a running one stops at its next
/// heartbeat). `(task_id, what failed)`, e.g. "3 of 10 instances failed
/// (tolerate 1)".
pub async fn fail(tx: &impl GenericClient, failures: &[(i64, String)]) -> Result<Vec<Failed>> {
    if failures.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = failures.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<&str> = failures.iter().map(|(_, reason)| reason.as_str()).collect();
    let statement = tx
        .prepare_cached(
            "WITH failing AS (
                 SELECT m.id, m.goal_id, m.step, r.reason,
                        (SELECT format('instance %s: %s', i.map_index, coalesce(i.error, 'failed'))
                           FROM synapse.tasks i
                          WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                            AND i.status = 'failed'
                          ORDER BY i.map_index LIMIT 1) AS first_error,
                        EXISTS (SELECT FROM synapse.tasks i
                                 WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                                   AND i.status = 'failed' AND i.failure_kind = 'definition') AS definition
                   FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)
                   JOIN synapse.tasks m ON m.id = r.id
                  WHERE m.status = 'waiting'),
             cancelled AS (
                 UPDATE synapse.tasks i
                    SET status = 'cancelled', error = format('step %s failed: %s', f.step, f.reason)
                   FROM failing f
                  WHERE i.goal_id = f.goal_id AND i.step = f.step AND i.map_index IS NOT NULL
                    AND i.status IN ('pending', 'queued', 'running', 'retrying'))
             UPDATE synapse.tasks m
                SET status = 'failed', error = concat_ws('; ', f.reason, f.first_error),
                    failure_kind = CASE WHEN f.definition THEN 'definition' ELSE 'action' END
               FROM failing f
              WHERE m.id = f.id
          RETURNING m.id, m.error, f.definition",
        )
        .await?;
    tx.query(&statement, &[&ids, &reasons])
        .await?
        .iter()
        .map(|row| {
            Ok(Failed {
                task_id: column(row, 0)?,
                error: column(row, 1)?,
                definition_error: column(row, 2)?,
            })
        })
        .collect()
}

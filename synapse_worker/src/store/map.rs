//! The statements of map steps (SPEC §4.6): starting them (the extension
//! evaluates the list and writes the instances), reading their progress,
//! queueing instances held back by `max_parallel`, and ending them.
//!
//! A step's own row is looked up as `coalesce(map_index, -1) = -1`, the key
//! of the `tasks_step` index: `map_index IS NULL` would make Postgres walk
//! every instance of the step to find it.
use deadpool_postgres::GenericClient;
use serde_json::Value;

use super::by_id::{by_id, ids};
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
              CROSS JOIN LATERAL (
                    SELECT m.* FROM synapse.tasks m
                     WHERE m.goal_id = s.goal_id AND m.step = s.step AND coalesce(m.map_index, -1) = -1
                     LIMIT 1) m
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

/// The map steps of the instances among `$1` (task ids), one probe each.
macro_rules! map_steps_of_instances {
    () => {
        "SELECT s.id FROM synapse.tasks i
          CROSS JOIN LATERAL (
                SELECT s.id FROM synapse.tasks s
                 WHERE s.goal_id = i.goal_id AND s.step = i.step AND coalesce(s.map_index, -1) = -1
                 LIMIT 1) s
          WHERE i.id = ANY($1::bigint[]) AND i.map_index IS NOT NULL"
    };
}

/// Counts again the instances of the map steps of `instance_ids` that ended:
/// for instances no worker recorded (the forwarder failed them when their
/// last lease lapsed). Counting afresh makes a repeated message harmless.
/// The map steps are locked first, by a statement of their own: the count
/// then runs on a snapshot taken once no other batch can still be counting
/// an instance on them (a count waiting for such a batch inside its own
/// statement would go on with the snapshot it began with, missing that
/// instance, and the map step would wait for it forever).
pub async fn recount(tx: &impl GenericClient, instance_ids: &[i64]) -> Result<()> {
    if instance_ids.is_empty() {
        return Ok(());
    }
    let lock = tx
        .prepare_cached(concat!(
            "SELECT m.id FROM synapse.tasks m WHERE m.id = ANY(ARRAY(",
            map_steps_of_instances!(),
            "))
              ORDER BY m.id FOR NO KEY UPDATE"
        ))
        .await?;
    let statement = tx
        .prepare_cached(concat!(
            "UPDATE synapse.tasks m
                SET map_ended = (SELECT count(*) FROM synapse.tasks i
                                  WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                                    AND i.status IN ('succeeded', 'failed')),
                    map_failed = (SELECT count(*) FROM synapse.tasks i
                                   WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                                     AND i.status = 'failed')
              WHERE m.id = ANY(ARRAY(", map_steps_of_instances!(), "))
                AND m.status = 'waiting'"
        ))
        .await?;
    futures_util::future::try_join(
        tx.query(&lock, &[&instance_ids]),
        tx.execute(&statement, &[&instance_ids]),
    )
    .await?;
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
    let ranges: Vec<(i64, (i32, i32))> = ranges
        .iter()
        .map(|&(id, from, to)| (id, (from, to)))
        .collect();
    let statement = tx
        .prepare_cached(
            "WITH advanced AS (
                 UPDATE synapse.tasks m SET map_next = ($2::jsonb -> m.id::text ->> 1)::int
                  WHERE m.id = ANY($1::bigint[]) AND m.map_next = ($2::jsonb -> m.id::text ->> 0)::int
              RETURNING m.goal_id, m.step, m.map_next AS to_index, ($2::jsonb -> m.id::text ->> 0)::int AS from_index)
             UPDATE synapse.tasks i SET status = 'queued'
              WHERE i.id = ANY(ARRAY(
                        SELECT i.id FROM advanced a
                         CROSS JOIN LATERAL (
                               -- OFFSET 0: a scan of each step's range, not a join.
                               SELECT i.id FROM synapse.tasks i
                                WHERE i.goal_id = a.goal_id AND i.step = a.step
                                  AND coalesce(i.map_index, -1) >= a.from_index AND coalesce(i.map_index, -1) < a.to_index
                               OFFSET 0) i))
                AND i.status = 'pending'
          RETURNING i.id, i.queue",
        )
        .await?;
    tx.query(&statement, &[&ids(&ranges), &by_id(&ranges)])
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

/// A map step whose instances all ended within its tolerance.
pub struct Ended {
    /// The map step's task id.
    pub task_id: i64,
    /// Its result, the instances' results in index order (`null` for a
    /// failed one); or, when they cannot be one value, why it failed (a
    /// definition error).
    pub result: std::result::Result<Value, String>,
}

/// Ends map steps whose instances have all ended within their tolerance:
/// `succeeded`, with the instances' results in index order (`null` for a
/// failed one); or `failed` by a definition error if those results are more
/// than one jsonb value holds. Built past it, the statement would fail, and
/// with it the outcome of the last instance, at every attempt: they are
/// measured in the same pass.
pub async fn end(tx: &impl GenericClient, task_ids: &[i64]) -> Result<Vec<Ended>> {
    if task_ids.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached(concat!(
            "WITH ending AS (
                 SELECT m.id, r.results, r.bytes,
                        format('the result of map step %s would hold %s bytes of its instances'' results; '
                               'one stored JSON value holds at most %s', m.step, r.bytes, ", max_stored_json_bytes!(), ") AS error
                   FROM synapse.tasks m
                  CROSS JOIN LATERAL (
                        SELECT coalesce(jsonb_agg(i.result ORDER BY i.map_index)
                                          FILTER (WHERE i.bytes <= ", max_stored_json_bytes!(), "), '[]') AS results,
                               max(i.bytes) AS bytes
                          FROM (SELECT i.map_index, i.result,
                                       sum(", stored_size!("''", "coalesce(i.result, 'null'::jsonb)"), ") OVER () AS bytes
                                  FROM (SELECT i.map_index, CASE WHEN i.status = 'succeeded' THEN i.result END AS result
                                          FROM synapse.tasks i
                                         WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL) i) i) r
                  WHERE m.id = ANY($1::bigint[]) AND m.status = 'waiting')
             UPDATE synapse.tasks m
                SET (status, result, error, failure_kind) = (
                    SELECT CASE WHEN fits THEN 'succeeded' ELSE 'failed' END,
                           CASE WHEN fits THEN e.results END,
                           CASE WHEN NOT fits THEN e.error END,
                           CASE WHEN NOT fits THEN 'definition' END
                      FROM ending e, LATERAL (SELECT coalesce(e.bytes <= ", max_stored_json_bytes!(), ", true) AS fits) f
                     WHERE e.id = m.id)
              WHERE m.id = ANY(ARRAY(SELECT id FROM ending))
          RETURNING m.id, m.status = 'succeeded', m.result, m.error"
        ))
        .await?;
    tx.query(&statement, &[&task_ids])
        .await?
        .iter()
        .map(|row| {
            let succeeded: bool = column(row, 1)?;
            Ok(Ended {
                task_id: column(row, 0)?,
                result: match succeeded {
                    true => Ok(column(row, 2)?),
                    false => Err(column(row, 3)?),
                },
            })
        })
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
    let statement = tx
        .prepare_cached(
            "WITH failing AS (
                 SELECT m.id, m.goal_id, m.step, m.reason,
                        (SELECT format('instance %s: %s', i.map_index, coalesce(i.error, 'failed'))
                           FROM synapse.tasks i
                          WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                            AND i.status = 'failed'
                          ORDER BY i.map_index LIMIT 1) AS first_error,
                        EXISTS (SELECT FROM synapse.tasks i
                                 WHERE i.goal_id = m.goal_id AND i.step = m.step AND i.map_index IS NOT NULL
                                   AND i.status = 'failed' AND i.failure_kind = 'definition') AS definition
                   FROM (SELECT m.*, $2::jsonb ->> m.id::text AS reason FROM synapse.tasks m
                          WHERE m.id = ANY($1::bigint[]) AND m.status = 'waiting') m),
             cancelled AS (
                 UPDATE synapse.tasks i
                    SET status = 'cancelled',
                        error = (SELECT format('step %s failed: %s', f.step, f.reason) FROM failing f
                                  WHERE f.goal_id = i.goal_id AND f.step = i.step)
                  WHERE i.id = ANY(ARRAY(
                            SELECT i.id FROM failing f
                             CROSS JOIN LATERAL (
                                   -- OFFSET 0: a scan of each step's instances, not a join.
                                   SELECT i.id FROM synapse.tasks i
                                    WHERE i.goal_id = f.goal_id AND i.step = f.step AND i.map_index IS NOT NULL
                                   OFFSET 0) i))
                    AND i.status IN ('pending', 'queued', 'running', 'retrying'))
             UPDATE synapse.tasks m
                SET (status, error, failure_kind) = (
                    SELECT 'failed', concat_ws('; ', f.reason, f.first_error),
                           CASE WHEN f.definition THEN 'definition' ELSE 'action' END
                      FROM failing f WHERE f.id = m.id)
              WHERE m.id = ANY(ARRAY(SELECT id FROM failing))
          RETURNING m.id, m.error, m.failure_kind = 'definition'",
        )
        .await?;
    tx.query(&statement, &[&ids(failures), &by_id(failures)])
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

//! Which pending steps their inbound edges have decided.
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Row;

use super::{column, Result, StoreError};
use crate::blueprint::Join;
use crate::engine::decide::{Inbound, ParentResult, ParentResults, ReadyTask};

/// Those of `steps` (goal, step) that are pending, in goal and id order,
/// each with how its inbound edges stand: [`crate::engine::decide::decide_join`]
/// tells whether it runs, is skipped or still waits (a step that waits is
/// returned too: its goal has a step left, and needs no look for its end).
/// Each step is looked at through index probes only (the LATERAL
/// subqueries keep the planner from scanning the whole goal, which made long
/// chains quadratic), and decided from its counts (a step with one inbound
/// edge: from that edge): its inbound edges are read only for what a
/// decision cannot do without, the parents' results of a default input, or
/// the edges a join `all` missed, and only once nothing is pending.
pub async fn pending_steps(
    tx: &impl GenericClient,
    steps: &[(i64, String)],
) -> Result<Vec<ReadyTask>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx.prepare_cached(PENDING_STEPS).await?;
    let (goal_ids, step_ids) = ready_arguments(steps);
    tx.query(&statement, &[&goal_ids, &step_ids])
        .await?
        .iter()
        .map(ready_task)
        .collect()
}

/// How the inbound edges of the pending step `c` stand, as `pending_inbound`
/// and `taken_inbound`: the counts kept on its row, or, for a step with one
/// inbound edge (which keeps none), that edge's state.
macro_rules! inbound_counts {
    () => {
        "coalesce(sole.pending, c.pending_inbound) AS pending_inbound,
                coalesce(sole.taken, c.taken_inbound) AS taken_inbound
           FROM (SELECT) AS one_row
           LEFT JOIN LATERAL (
                SELECT (e.state = 'pending')::int AS pending, (e.state = 'taken')::int AS taken
                  FROM synapse.edges e
                 WHERE c.inbound = 1 AND e.goal_id = c.goal_id AND e.to_step = c.step) sole ON true"
    };
}

pub(super) const PENDING_STEPS: &str = concat!("SELECT s.goal_id, t.id, t.step, t.join_mode, t.input_expr, t.inbound, t.pending_inbound,
                    t.taken_inbound, coalesce(edges.not_taken_from, '{}'), coalesce(edges.parent_results, '{}'),
                    t.for_each_expr IS NOT NULL, t.cancel_others, t.until_expr IS NOT NULL, t.action = 'wait',
                    t.queue, CASE WHEN edges.input_bytes > ", max_stored_json_bytes!(), " THEN edges.input_bytes END
              FROM unnest($1::bigint[], $2::text[]) AS s(goal_id, step)
             CROSS JOIN LATERAL (
                   SELECT c.id, c.step, c.join_mode, c.input_expr, c.for_each_expr, c.cancel_others, c.until_expr,
                          c.action, c.queue, c.inbound, k.pending_inbound, k.taken_inbound
                     FROM synapse.tasks c
                    CROSS JOIN LATERAL (SELECT ", inbound_counts!(), ") k
                    WHERE c.goal_id = s.goal_id AND c.step = s.step AND coalesce(c.map_index, -1) = -1 AND c.status = 'pending'
                    LIMIT 1) t
              LEFT JOIN LATERAL (
                   SELECT array_agg(e.from_step ORDER BY e.position) FILTER (WHERE e.state <> 'taken') AS not_taken_from,
                          -- Only if they fit the one jsonb value Postgres can hold:
                          -- built past it, the statement would fail, and with it the
                          -- outcomes that decided the step, at every attempt.
                          jsonb_object_agg(e.from_step, e.result)
                            FILTER (WHERE e.result IS NOT NULL AND e.input_bytes <= ", max_stored_json_bytes!(), ") AS parent_results,
                          max(e.input_bytes) AS input_bytes
                     FROM (SELECT e.from_step, e.position, e.state, p.result,
                                  -- The default input's size as one jsonb value.
                                  sum(", stored_size!("e.from_step", "p.result"), ")
                                    OVER () AS input_bytes
                             FROM synapse.edges e
                             LEFT JOIN LATERAL (", parent_result!(), ") p ON e.state = 'taken' AND t.input_expr IS NULL
                            WHERE e.goal_id = s.goal_id AND e.to_step = t.step
                              -- Only when the decision needs them (a one-time filter: no
                              -- scan otherwise): a step that may run, and has its own
                              -- input or parents' results to read; or a join `all`
                              -- that missed an edge. Never a join that still waits (a
                              -- wide fan-in's join is read with each batch of parents).
                              AND (t.pending_inbound = 0 OR t.join_mode NOT IN ('any', 'all'))
                              AND ((t.input_expr IS NULL AND t.taken_inbound > 0)
                                   OR (t.join_mode = 'all' AND t.pending_inbound = 0 AND t.taken_inbound < t.inbound))) e) edges
                ON true
             ORDER BY s.goal_id, t.id");

pub(super) fn ready_arguments(steps: &[(i64, String)]) -> (Vec<i64>, Vec<&str>) {
    steps
        .iter()
        .map(|(goal_id, step)| (*goal_id, step.as_str()))
        .unzip()
}

pub(super) fn ready_task(row: &Row) -> Result<ReadyTask> {
    let count = |index| -> Result<u32> {
        let count: i32 = column(row, index)?;
        u32::try_from(count).map_err(|_| StoreError::Data(format!("inbound count {count}")))
    };
    let Value::Object(parent_results) = column::<Value>(row, 9)? else {
        return Err(StoreError::Data("parent results are not an object".into()));
    };
    let parent_results = ParentResults {
        results: parent_results
            .into_iter()
            .map(|(step, result)| ParentResult::new(step, result))
            .collect(),
        oversized: column(row, 15)?,
    };
    Ok(ReadyTask {
        goal_id: column(row, 0)?,
        id: column(row, 1)?,
        step: column(row, 2)?,
        join: {
            let join: &str = column(row, 3)?;
            Join::from_column(join)
                .ok_or_else(|| StoreError::Data(format!("join mode {join:?}")))?
        },
        input_expr: column(row, 4)?,
        inbound: Inbound {
            total: count(5)?,
            pending: count(6)?,
            taken: count(7)?,
        },
        not_taken_from: column(row, 8)?,
        parent_results,
        is_map: column(row, 10)?,
        cancel_others: column(row, 11)?,
        looping: column(row, 12)?,
        is_wait: column(row, 13)?,
        queue: column(row, 14)?,
    })
}

/// The pending steps of `goal_id` with no inbound edge left to resolve: what
/// a goal run again (`retry_goal`) starts with. In a goal that runs, the
/// engine decides each step as its last inbound edge resolves, so there are
/// none; asking twice finds none the second time.
pub async fn undecided_steps(tx: &impl GenericClient, goal_id: i64) -> Result<Vec<String>> {
    let statement = tx
        .prepare_cached(
            concat!(
                "SELECT c.step FROM synapse.tasks c
                  CROSS JOIN LATERAL (SELECT ", inbound_counts!(), ") k
                  WHERE c.goal_id = $1 AND c.status = 'pending' AND c.map_index IS NULL AND k.pending_inbound = 0
                  ORDER BY c.id"
            ),
        )
        .await?;
    tx.query(&statement, &[&goal_id])
        .await?
        .iter()
        .map(|row| column(row, 0))
        .collect()
}

/// The steps of `goal_id` that ended (succeeded or failed) with outbound
/// edges still pending: their carry-on never happened (their goal was
/// cancelled first), which a goal run again must make up for.
pub async fn ended_with_pending_edges(tx: &impl GenericClient, goal_id: i64) -> Result<Vec<i64>> {
    let statement = tx
        .prepare_cached(
            "SELECT t.id FROM synapse.tasks t
              WHERE t.goal_id = $1 AND t.map_index IS NULL AND t.status IN ('succeeded', 'failed')
                AND EXISTS (SELECT FROM synapse.edges e
                             WHERE e.goal_id = t.goal_id AND e.from_step = t.step AND e.state = 'pending')
              ORDER BY t.id",
        )
        .await?;
    tx.query(&statement, &[&goal_id])
        .await?
        .iter()
        .map(|row| column(row, 0))
        .collect()
}

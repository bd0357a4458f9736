//! Outbound edges: reading those still pending, writing how they resolved.
use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use serde::{Serialize, Serializer};
use serde_json::Value;
use tokio_postgres::types::{Json, ToSql};

use super::ready::{pending_steps, ready_arguments, ready_task, PENDING_STEPS};
use super::{column, Result, StoreError};
use crate::blueprint::{EdgeOn, Join};
use crate::engine::decide::{Inbound, ParentResults, ReadyTask};

/// An outbound edge.
#[derive(Debug)]
pub struct OutboundEdge {
    /// Step it leads to.
    pub to: String,
    /// Condition.
    pub when: Option<String>,
    /// Outcome it follows.
    pub on: EdgeOn,
    /// The step it leads to, pending, when this is its one inbound edge
    /// (known only where the edge was read with it): how the edge resolves
    /// decides it ([`crate::engine::decide::decided_by_sole_edge`]).
    pub sole: Option<ReadyTask>,
}

fn parse_on(on: &str) -> Result<EdgeOn> {
    EdgeOn::from_column(on).ok_or_else(|| StoreError::Data(format!("edge outcome {on:?}")))
}

/// The still pending outbound edges of `step`, in blueprint order.
pub async fn outbound_edges(
    tx: &impl GenericClient,
    goal_id: i64,
    step: &str,
) -> Result<Vec<OutboundEdge>> {
    let statement = tx
        .prepare_cached(
            "SELECT array_agg(to_step ORDER BY position), array_agg(when_expr ORDER BY position),
                    array_agg(on_outcome::text ORDER BY position)
               FROM synapse.edges
              WHERE goal_id = $1 AND from_step = $2 AND state = 'pending'",
        )
        .await?;
    let row = tx.query_one(&statement, &[&goal_id, &step]).await?;
    outbound_from_arrays(column(&row, 0)?, column(&row, 1)?, column(&row, 2)?)
}

/// Outbound edges from parallel arrays (NULL: none).
pub(super) fn outbound_from_arrays(
    to: Option<Vec<String>>,
    when: Option<Vec<Option<String>>>,
    on: Option<Vec<String>>,
) -> Result<Vec<OutboundEdge>> {
    let (to, when, on) = (
        to.unwrap_or_default(),
        when.unwrap_or_default(),
        on.unwrap_or_default(),
    );
    to.into_iter()
        .zip(when)
        .zip(on)
        .map(|((to, when), on)| {
            Ok(OutboundEdge {
                to,
                when,
                on: parse_on(&on)?,
                sole: None,
            })
        })
        .collect()
}

/// A successor as the record of its parent's outcome reads it.
#[derive(serde::Deserialize)]
struct SoleSuccessor {
    step: String,
    id: i64,
    join: String,
    input_expr: Option<String>,
    is_map: bool,
    cancel_others: bool,
    looping: bool,
    is_wait: bool,
    queue: String,
}

/// `edges` of a step of `goal_id`, with the successors whose one inbound edge
/// each is (`sole`: a JSON list, NULL for none).
pub(super) fn with_sole_successors(
    goal_id: i64,
    mut edges: Vec<OutboundEdge>,
    sole: Option<Value>,
) -> Result<Vec<OutboundEdge>> {
    let Some(sole) = sole else {
        return Ok(edges);
    };
    let successors: Vec<SoleSuccessor> = serde_json::from_value(sole)
        .map_err(|error| StoreError::Data(format!("sole successors: {error}")))?;
    let position: HashMap<String, usize> = edges
        .iter()
        .enumerate()
        .map(|(index, edge)| (edge.to.clone(), index))
        .collect();
    for successor in successors {
        let Some(&index) = position.get(&successor.step) else {
            continue;
        };
        edges[index].sole = Some(ReadyTask {
            goal_id,
            id: successor.id,
            join: Join::from_column(&successor.join)
                .ok_or_else(|| StoreError::Data(format!("join mode {:?}", successor.join)))?,
            step: successor.step,
            input_expr: successor.input_expr,
            inbound: Inbound {
                total: 1,
                pending: 1,
                taken: 0,
            },
            not_taken_from: Vec::new(),
            parent_results: ParentResults::default(),
            is_map: successor.is_map,
            cancel_others: successor.cancel_others,
            looping: successor.looping,
            is_wait: successor.is_wait,
            queue: successor.queue,
        });
    }
    Ok(edges)
}

/// How one outbound edge resolved.
#[derive(Debug)]
pub struct EdgeResolution {
    /// The goal.
    pub goal_id: i64,
    /// Step it leaves.
    pub from: String,
    /// Step it leads to.
    pub to: String,
    /// `taken`, `not_taken` or `error`.
    pub state: &'static str,
    /// Why its condition failed.
    pub error: Option<String>,
    /// The step it leads to may keep counts of its inbound edges (it was
    /// not read as a pending step with this edge its only one): the
    /// resolution then looks for it, to count on it.
    pub may_count: bool,
}

/// Records how edges resolved (of any steps and goals), then reads those of
/// `steps` (goal, step) still pending ([`pending_steps`]): both statements go out
/// together, one round trip. Postgres runs the read once the resolutions are
/// written, so it sees them, as if each had been awaited.
pub async fn resolve_edges_then_read(
    tx: &impl GenericClient,
    resolutions: &[EdgeResolution],
    steps: &[(i64, String)],
) -> Result<Vec<ReadyTask>> {
    if resolutions.is_empty() {
        return pending_steps(tx, steps).await;
    }
    // Both prepared first: a statement still to be prepared would go out
    // after the other.
    let resolve = tx.prepare_cached(resolve_statement(resolutions)).await?;
    let ready = tx.prepare_cached(PENDING_STEPS).await?;
    let columns = ResolveColumns::of(resolutions);
    let parameters = columns.parameters();
    let resolve = tx.execute(&resolve, &parameters);
    if steps.is_empty() {
        resolve.await?;
        return Ok(Vec::new());
    }
    let (goal_ids, step_ids) = ready_arguments(steps);
    let (_, rows) =
        futures_util::future::try_join(resolve, tx.query(&ready, &[&goal_ids, &step_ids])).await?;
    rows.iter().map(ready_task).collect()
}

/// Records how edges resolved, and nothing else.
pub async fn resolve_edges(tx: &impl GenericClient, resolutions: &[EdgeResolution]) -> Result<()> {
    resolve_edges_then_read(tx, resolutions, &[]).await?;
    Ok(())
}

/// The parameters of [`resolve_statement`]: each edge's key, one array per
/// column, and how each resolved, keyed by edge.
pub(super) struct ResolveColumns<'a> {
    goal_ids: Vec<i64>,
    from: Vec<&'a str>,
    to: Vec<&'a str>,
    states: Json<ResolutionsByEdge<'a>>,
}

impl<'a> ResolveColumns<'a> {
    pub(super) fn of(resolutions: &'a [EdgeResolution]) -> Self {
        ResolveColumns {
            goal_ids: resolutions.iter().map(|r| r.goal_id).collect(),
            from: resolutions.iter().map(|r| r.from.as_str()).collect(),
            to: resolutions.iter().map(|r| r.to.as_str()).collect(),
            states: Json(ResolutionsByEdge(resolutions)),
        }
    }

    pub(crate) fn parameters(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.goal_ids, &self.from, &self.to, &self.states]
    }
}

/// Resolutions as `{"goal:from:to": [state, error, may_count], …}` (step
/// ids hold no `:`), written straight from the borrowed resolutions.
#[derive(Debug)]
struct ResolutionsByEdge<'a>(&'a [EdgeResolution]);

impl Serialize for ResolutionsByEdge<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.0
                .iter()
                .map(|r| (EdgeKey(r), (r.state, r.error.as_deref(), r.may_count))),
        )
    }
}

/// An edge's key in [`ResolutionsByEdge`].
struct EdgeKey<'a>(&'a EdgeResolution);

impl Serialize for EdgeKey<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let EdgeResolution {
            goal_id, from, to, ..
        } = self.0;
        serializer.collect_str(&format_args!("{goal_id}:{from}:{to}"))
    }
}

/// The edges' own write: how each resolved, found by its key.
macro_rules! update_edges {
    () => {
        "
                 UPDATE synapse.edges e SET (state, error, resolved_at) = (
                        SELECT r.o ->> 0, r.o ->> 1, statement_timestamp()
                          FROM (SELECT $4::jsonb -> concat(e.goal_id, ':', e.from_step, ':', e.to_step)) AS r(o))
                  -- Each edge found by its key, one probe an edge, and updated
                  -- by the row found, joined to nothing (see by_id). An edge is
                  -- resolved by the one engine run that ended its step, or by a
                  -- cancel, which holds off engine runs (its goal lock): the
                  -- row cannot move between the probe and the update.
                  WHERE e.ctid = ANY(ARRAY(
                            SELECT p.ctid FROM unnest($1::bigint[], $2::text[], $3::text[]) AS r(goal_id, from_step, to_step)
                             CROSS JOIN LATERAL (
                                   SELECT p.ctid FROM synapse.edges p
                                    WHERE p.goal_id = r.goal_id AND p.from_step = r.from_step AND p.to_step = r.to_step
                                    LIMIT 1) p))
                    AND e.state = 'pending' AND $4::jsonb ? concat(e.goal_id, ':', e.from_step, ':', e.to_step)"
    };
}

/// Each edge resolved counts on its target, in the same statement (pending,
/// and taken): its join is decided from the counts, and no later read has to
/// look for its edges. A step with one inbound edge keeps no counts: that
/// edge says how it stands, and the row is written once, when the step is
/// decided (a second write of each of a 2 000-wide fan-out's steps in one
/// transaction doubled the cost of queueing them).
const RESOLVE_EDGES: &str = concat!(
    "WITH resolved AS (",
    update_edges!(),
    "
              RETURNING e.goal_id, e.to_step, e.state,
                        ($4::jsonb -> concat(e.goal_id, ':', e.from_step, ':', e.to_step) ->> 2)::bool AS may_count),
             -- The steps that keep counts (more than one inbound edge), each
             -- found by its key, one probe an edge, and counted; not looked
             -- for when the edge is known to be its step's only one (a wide
             -- fan-out's root resolves thousands of those).
             counted AS (
                 SELECT s.id, count(*)::int AS resolved, count(*) FILTER (WHERE r.state = 'taken')::int AS taken
                   FROM resolved r
                  CROSS JOIN LATERAL (
                        SELECT s.id FROM synapse.tasks s
                         WHERE r.may_count AND s.goal_id = r.goal_id AND s.step = r.to_step
                           AND coalesce(s.map_index, -1) = -1 AND s.inbound > 1
                         LIMIT 1) s
                  GROUP BY s.id),
             -- By id, joined to nothing (see by_id): the counts as one object.
             counts AS (
                 SELECT jsonb_object_agg(id, jsonb_build_array(resolved, taken)) AS by_id FROM counted)
             UPDATE synapse.tasks t
                SET (pending_inbound, taken_inbound) = (
                    SELECT t.pending_inbound - (k.counts ->> 0)::int, t.taken_inbound + (k.counts ->> 1)::int
                      FROM (SELECT (SELECT by_id FROM counts) -> t.id::text) AS k(counts))
              WHERE t.id = ANY(ARRAY(SELECT id FROM counted))"
);

/// The edges alone, when none may count on its step (a chain's, a fan-out's
/// root's): no write of `tasks`, so none of its statement triggers either.
const RESOLVE_EDGES_ALONE: &str = update_edges!();

/// The statement that records `resolutions`: [`RESOLVE_EDGES`], or the
/// edges alone when none may count on its step. Both take
/// [`ResolveColumns::parameters`].
pub(super) fn resolve_statement(resolutions: &[EdgeResolution]) -> &'static str {
    if resolutions.iter().any(|r| r.may_count) {
        RESOLVE_EDGES
    } else {
        RESOLVE_EDGES_ALONE
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn resolution(
        goal_id: i64,
        to: &str,
        state: &'static str,
        error: Option<&str>,
        may_count: bool,
    ) -> EdgeResolution {
        EdgeResolution {
            goal_id,
            from: "check".into(),
            to: to.into(),
            state,
            error: error.map(Into::into),
            may_count,
        }
    }

    #[test]
    fn only_edges_that_may_count_on_their_step_write_tasks_too() {
        let sole = resolution(7, "notify", "error", Some("no such key"), false);
        let join = resolution(7, "join", "taken", None, true);
        assert_eq!(
            resolve_statement(std::slice::from_ref(&sole)),
            RESOLVE_EDGES_ALONE
        );
        assert!(!RESOLVE_EDGES_ALONE.contains("synapse.tasks"));
        assert_eq!(resolve_statement(&[sole, join]), RESOLVE_EDGES);
    }

    #[test]
    fn resolutions_are_keyed_by_goal_from_and_to_with_their_state_and_error() {
        let resolutions = [
            resolution(7, "refund", "taken", None, true),
            resolution(12, "notify", "error", Some("no such key"), false),
        ];
        assert_eq!(
            serde_json::to_value(ResolutionsByEdge(&resolutions)).unwrap(),
            json!({"7:check:refund": ["taken", null, true],
                   "12:check:notify": ["error", "no such key", false]})
        );
    }
}

//! `synapse.goal_graph()`: the DAG as Mermaid or DOT.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use synapse_worker::graph::{self, Format, Link, Node};

use crate::error::{Error, Result};

/// The goal's DAG as Mermaid (`mermaid`) or Graphviz (`dot`), coloured by status.
#[pg_extern(stable)]
fn goal_graph(
    goal_id: i64,
    format: default!(&str, "'mermaid'"),
) -> std::result::Result<String, ErrorReport> {
    Ok(render(goal_id, format)?)
}

fn render(goal_id: i64, format: &str) -> Result<String> {
    let format: Format = format.parse().map_err(Error::InvalidParameter)?;
    Spi::connect(|client| {
        let goal = client.select(
            "SELECT goal, status FROM synapse.goals WHERE id = $1",
            None,
            &[goal_id.into()],
        )?;
        let Some(row) = goal.into_iter().next() else {
            return Err(Error::GoalNotFound(goal_id));
        };
        let title = format!(
            "goal {goal_id}: {} ({})",
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default()
        );
        // A map step is one node, with its instances' counts.
        let tasks: Vec<(String, String, String, i32, Option<String>)> = client
            .select(
                "SELECT step, action, status, attempts, map_size, coalesce(map_ended, 0), coalesce(map_failed, 0),
                        CASE WHEN until_expr IS NOT NULL THEN iteration END, child_goal_id,
                        CASE WHEN action = 'wait' THEN params END
                   FROM synapse.tasks WHERE goal_id = $1 AND map_index IS NULL ORDER BY id",
                None,
                &[goal_id.into()],
            )?
            .map(|row| {
                let map = match row.get::<i32>(5)? {
                    Some(size) => Some((
                        size.into(),
                        row.get::<i32>(6)?.unwrap_or_default().into(),
                        row.get::<i32>(7)?.unwrap_or_default().into(),
                    )),
                    None => None,
                };
                let wait = row.get::<pgrx::JsonB>(10)?.map(|pgrx::JsonB(params)| params);
                let detail = graph::detail(map, row.get(8)?, row.get(9)?, wait.as_ref());
                Ok((
                    row.get(1)?.unwrap_or_default(),
                    row.get(2)?.unwrap_or_default(),
                    row.get(3)?.unwrap_or_default(),
                    row.get(4)?.unwrap_or_default(),
                    detail,
                ))
            })
            .collect::<std::result::Result<_, pgrx::spi::Error>>()?;
        let edges: Vec<(String, String, Option<String>, String, String)> = client
            .select(
                "SELECT from_step, to_step, when_expr, on_outcome, state FROM synapse.edges
                  WHERE goal_id = $1 ORDER BY position",
                None,
                &[goal_id.into()],
            )?
            .map(|row| {
                Ok((
                    row.get(1)?.unwrap_or_default(),
                    row.get(2)?.unwrap_or_default(),
                    row.get(3)?,
                    row.get(4)?.unwrap_or_default(),
                    row.get(5)?.unwrap_or_default(),
                ))
            })
            .collect::<std::result::Result<_, pgrx::spi::Error>>()?;
        let nodes: Vec<Node<'_>> = tasks
            .iter()
            .map(|(step, action, status, attempts, detail)| Node {
                step,
                action,
                status,
                attempts: *attempts,
                detail: detail.clone(),
            })
            .collect();
        let links: Vec<Link<'_>> = edges
            .iter()
            .map(|(from, to, when, on, state)| Link {
                from,
                to,
                when: when.as_deref(),
                on,
                state,
            })
            .collect();
        Ok(graph::render(format, &title, &nodes, &links))
    })
}

//! Child goals (SPEC §4.7): a `goal` step's attempt starts a goal of its own
//! and waits for it, holding no worker. The worker evaluates the step's
//! params and calls `synapse._start_child`; the child's end is sent to the
//! step's queue (see `synapse._goal_event`), where a worker ends the step.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use super::json_arg::JsonbArg;
use super::{check, install, root_starts, GoalContext, Installing, RootInputs};
use crate::error::{Error, Result};
use crate::gucs;

/// The goal a step's attempt waits for, once started.
struct Parent {
    goal_id: i64,
    task_id: i64,
    depth: i32,
}

/// Starts the child goal of attempt `attempt` of goal step `task_id`: a goal
/// text planned by `planner`, or a `blueprint` validated now (every problem
/// listed in the error). The step then waits for it. NULL when the attempt
/// no longer holds the step, or its goal no longer runs: nothing is started.
#[pg_extern(name = "_start_child")]
fn start_child(
    task_id: i64,
    attempt: i32,
    goal: Option<&str>,
    planner: Option<&str>,
    blueprint: Option<JsonbArg>,
    input: JsonbArg,
) -> std::result::Result<Option<i64>, pgrx::pg_sys::panic::ErrorReport> {
    let Some(parent) = lock_parent(task_id, attempt)? else {
        return Ok(None);
    };
    let depth = parent.depth + 1;
    let max_depth = gucs::max_depth();
    if depth > max_depth {
        return Err(Error::LimitExceeded {
            path: "$".into(),
            message: format!(
                "the child goal would be at depth {depth}, deeper than synapse.max_depth ({max_depth})"
            ),
        }
        .into());
    }
    let input = input.into_value("input")?;
    let child = match (goal, blueprint) {
        (Some(text), None) => {
            submitted(&parent, depth, text, planner.unwrap_or("template"), input)?
        }
        (None, Some(blueprint)) => {
            planned(&parent, depth, blueprint.into_value("blueprint")?, input)?
        }
        _ => {
            return Err(Error::InvalidParameter(
                "a child goal needs a goal text or a blueprint, not both".into(),
            )
            .into())
        }
    };
    Spi::run_with_args(
        "UPDATE synapse.tasks SET status = 'waiting', child_goal_id = $2 WHERE id = $1",
        &[task_id.into(), child.into()],
    )
    .map_err(Error::from)?;
    Ok(Some(child))
}

/// Locks the step's goal (running) and then the step (held by `attempt`):
/// goal row first, as everywhere, so a cancel of the parent waits for the
/// child to exist and cancels it too.
fn lock_parent(task_id: i64, attempt: i32) -> Result<Option<Parent>> {
    let goal = Spi::get_two_with_args::<i64, i32>(
        "SELECT g.id, g.depth FROM synapse.goals g
          WHERE g.id = (SELECT t.goal_id FROM synapse.tasks t WHERE t.id = $1) AND g.status = 'running'
            FOR NO KEY UPDATE OF g",
        &[task_id.into()],
    );
    let (goal_id, depth) = match goal {
        Ok((Some(goal_id), Some(depth))) => (goal_id, depth),
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let held = Spi::get_one_with_args::<i64>(
        "SELECT id FROM synapse.tasks WHERE id = $1 AND status = 'running' AND attempts = $2
            FOR NO KEY UPDATE",
        &[task_id.into(), attempt.into()],
    );
    match held {
        Ok(Some(_)) => Ok(Some(Parent {
            goal_id,
            task_id,
            depth,
        })),
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// A child goal left to a planner: `submitted`.
fn submitted(parent: &Parent, depth: i32, text: &str, planner: &str, input: Value) -> Result<i64> {
    if text.trim().is_empty() || text.len() > 10_000 {
        return Err(Error::InvalidParameter(format!(
            "a child goal's text must have 1 to 10000 characters, got {}",
            text.len()
        )));
    }
    insert(parent, depth, text, Some(planner), None, "submitted", input)
}

/// A child goal whose blueprint is given: validated, then installed at once.
fn planned(parent: &Parent, depth: i32, doc: Value, input: Value) -> Result<i64> {
    let plan = check(&doc)?;
    let text = plan.name.clone().unwrap_or_else(|| "plan".into());
    let id = insert(
        parent,
        depth,
        &text,
        None,
        Some(doc),
        "running",
        input.clone(),
    )?;
    let goal = GoalContext {
        id,
        text,
        input,
        params: json!({}),
    };
    let roots = root_starts(&plan, &goal, &mut RootInputs::new())?;
    install(&plan, vec![Installing { goal, roots }])?;
    Ok(id)
}

fn insert(
    parent: &Parent,
    depth: i32,
    text: &str,
    planner: Option<&str>,
    blueprint: Option<Value>,
    status: &str,
    input: Value,
) -> Result<i64> {
    // A child belongs to its parent's owner (0.5.0 on; before the update,
    // goals have none).
    let insert = if crate::installed::has_column(c"goals", c"owner") {
        "INSERT INTO synapse.goals (goal, input, planner, blueprint, status, parent_goal_id,
                                    parent_task_id, depth, owner)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, p.owner FROM synapse.goals p WHERE p.id = $6
         RETURNING id"
    } else {
        "INSERT INTO synapse.goals (goal, input, planner, blueprint, status, parent_goal_id,
                                    parent_task_id, depth)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id"
    };
    // No row limit: the statement trigger that records the event fires at its end.
    Spi::connect_mut(|client| {
        client
            .update(
                insert,
                None,
                &[
                    text.into(),
                    JsonB(input).into(),
                    planner.into(),
                    blueprint.map(JsonB).into(),
                    status.into(),
                    parent.goal_id.into(),
                    parent.task_id.into(),
                    depth.into(),
                ],
            )?
            .first()
            .get_one::<i64>()
    })?
    .ok_or_else(|| Error::InvalidParameter("the child goal was not recorded".into()))
}

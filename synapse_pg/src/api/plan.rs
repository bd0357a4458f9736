//! Validating blueprints and installing plans: goal, tasks and edges in one
//! transaction, roots queued.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::HashSet;

use crate::error::{Error, Result};
use pgrx::pg_sys::panic::ErrorReport;
use synapse_worker::blueprint::{self, cel, Blueprint, Problem};

/// Checks a blueprint without running anything: `[]` or a list of `{path, message}`.
#[pg_extern(stable)]
fn validate_blueprint(blueprint: Option<JsonB>) -> std::result::Result<JsonB, ErrorReport> {
    let problems = match blueprint {
        None => vec![Problem {
            path: "$".into(),
            message: "blueprint must not be NULL".into(),
        }],
        Some(JsonB(doc)) => validate(&doc)?.err().unwrap_or_default(),
    };
    Ok(JsonB(json!(problems)))
}

/// Records a goal whose blueprint is given, after validating it, and queues its roots.
#[pg_extern]
fn submit_plan(
    blueprint: Option<JsonB>,
    input: default!(Option<JsonB>, "'{}'"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> std::result::Result<i64, ErrorReport> {
    Ok(submit(
        blueprint.map(|b| b.0),
        input.map(|i| i.0),
        idempotency_key,
    )?)
}

/// Installs the plan of a goal a planner is working on: `[]`, or the problems
/// that made the goal fail (then no task was created).
#[pg_extern(name = "_install_plan")]
fn install_plan_for_goal(
    goal_id: i64,
    blueprint: JsonB,
    template: Option<&str>,
    params: default!(Option<JsonB>, "'{}'"),
) -> std::result::Result<JsonB, ErrorReport> {
    Ok(JsonB(json!(plan_goal(
        goal_id,
        &blueprint.0,
        template,
        params.map(|p| p.0)
    )?)))
}

fn known_actions() -> Result<HashSet<String>> {
    Ok(Spi::connect(|client| {
        client
            .select("SELECT name FROM synapse.actions", None, &[])?
            .map(|row| row.get::<String>(1))
            .collect::<std::result::Result<Vec<_>, _>>()
    })?
    .into_iter()
    .flatten()
    .collect())
}

fn validate(doc: &Value) -> Result<std::result::Result<Blueprint, Vec<Problem>>> {
    let known = known_actions()?;
    Ok(blueprint::validate(doc, &|name| known.contains(name)))
}

/// Validates `doc`, failing with every problem listed.
pub(super) fn check(doc: &Value) -> Result<Blueprint> {
    validate(doc)?.map_err(Error::InvalidBlueprint)
}

fn submit(
    blueprint: Option<Value>,
    input: Option<Value>,
    idempotency_key: Option<&str>,
) -> Result<i64> {
    let doc =
        blueprint.ok_or_else(|| Error::InvalidParameter("blueprint must not be NULL".into()))?;
    let input = input
        .ok_or_else(|| Error::InvalidParameter("input must be JSON, not NULL (use '{}')".into()))?;
    if let Some(key) = idempotency_key {
        if let Some(id) = goal_with_key(key)? {
            return Ok(id);
        }
    }
    let plan = check(&doc)?;
    let mut goal = GoalContext {
        id: 0,
        text: plan.name.clone().unwrap_or_else(|| "plan".into()),
        input,
        params: json!({}),
    };
    // No row limit (Spi::get_one_* sets one): a DML statement stopped at its
    // first RETURNING row never reaches its end, where the statement trigger
    // that records its event fires.
    let inserted = Spi::connect_mut(|client| {
        client
            .update(
                "INSERT INTO synapse.goals (goal, input, planner, blueprint, status, idempotency_key)
                 VALUES ($1, $2, NULL, $3, 'running', $4)
                 ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
                None,
                &[
                    goal.text.clone().into(),
                    JsonB(goal.input.clone()).into(),
                    JsonB(doc).into(),
                    idempotency_key.into(),
                ],
            )?
            .first()
            .get_one::<i64>()
    });
    let id = match inserted {
        Ok(Some(id)) => id,
        // Another transaction committed the same key meanwhile: that goal is the answer.
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => {
            return goal_with_key(idempotency_key.unwrap_or_default())?
                .ok_or_else(|| Error::InvalidParameter("idempotency key vanished".into()));
        }
        Err(error) => return Err(error.into()),
    };
    goal.id = id;
    // An error here aborts the transaction, taking the goal row with it.
    let roots = root_inputs(&plan, &goal).map_err(Error::InvalidBlueprint)?;
    install(id, &plan, &roots)?;
    Ok(id)
}

fn goal_with_key(key: &str) -> Result<Option<i64>> {
    Ok(Spi::get_one_with_args::<i64>(
        "SELECT id FROM synapse.goals WHERE idempotency_key = $1",
        &[key.into()],
    )
    .or_else(|error| match error {
        pgrx::spi::Error::InvalidPosition => Ok(None),
        other => Err(other),
    })?)
}

/// What expressions see as `goal`.
struct GoalContext {
    id: i64,
    text: String,
    input: Value,
    params: Value,
}

impl GoalContext {
    fn variables(&self) -> Map<String, Value> {
        let mut vars = Map::new();
        vars.insert(
            "goal".into(),
            json!({"id": self.id, "goal": self.text, "input": self.input, "params": self.params}),
        );
        vars.insert("steps".into(), json!({}));
        vars
    }
}

/// The inputs of the root steps, in declaration order: `goal.input`, or the
/// step's `input` expression evaluated over `goal` (no step has run yet).
fn root_inputs(
    plan: &Blueprint,
    goal: &GoalContext,
) -> std::result::Result<Vec<(String, Value)>, Vec<Problem>> {
    let vars = goal.variables();
    let mut inputs = Vec::new();
    let mut problems = Vec::new();
    for root in plan.roots() {
        let (index, step) = plan
            .steps
            .iter()
            .enumerate()
            .find(|(_, s)| s.id == root)
            .expect("root is a step");
        let value = match &step.input {
            None => Ok(goal.input.clone()),
            Some(source) => cel::compile(source).and_then(|expr| expr.evaluate(&vars)),
        };
        match value {
            Ok(value) => inputs.push((root.to_owned(), value)),
            Err(message) => problems.push(Problem {
                path: format!("$.steps[{index}].input"),
                message: format!("cannot evaluate the input of root step \"{root}\": {message}"),
            }),
        }
    }
    if problems.is_empty() {
        Ok(inputs)
    } else {
        Err(problems)
    }
}

/// Writes every task and edge of `plan` for goal `goal_id`; roots are queued
/// with their inputs, the rest wait as pending.
fn install(goal_id: i64, plan: &Blueprint, root_inputs: &[(String, Value)]) -> Result<()> {
    let tasks: Vec<Value> = plan
        .steps
        .iter()
        .map(|step| {
            let root = root_inputs.iter().find(|(id, _)| *id == step.id);
            json!({
                "step": step.id,
                "action": step.action,
                "params": step.params,
                "input_expr": step.input,
                "input": root.map(|(_, input)| input),
                "queue": step.queue,
                "join_mode": step.join,
                "max_attempts": step.retries + 1,
                "backoff_ms": step.backoff.as_millis() as u64,
                "timeout_ms": step.timeout.as_millis() as u64,
                "status": if root.is_some() { "queued" } else { "pending" },
            })
        })
        .collect();
    Spi::run_with_args(
        "INSERT INTO synapse.tasks (goal_id, step, action, params, input_expr, input, queue, join_mode,
                                    max_attempts, backoff_ms, timeout_ms, status)
         SELECT $1, t.step, t.action, t.params, t.input_expr, t.input, t.queue, t.join_mode,
                t.max_attempts, t.backoff_ms, t.timeout_ms, t.status
           FROM jsonb_to_recordset($2)
                AS t(step text, action text, params jsonb, input_expr text, input jsonb, queue text,
                     join_mode text, max_attempts integer, backoff_ms bigint, timeout_ms bigint, status text)",
        &[goal_id.into(), JsonB(Value::Array(tasks)).into()],
    )?;
    if !plan.edges.is_empty() {
        let edges: Vec<Value> = plan
            .edges
            .iter()
            .enumerate()
            .map(|(i, edge)| json!({"position": i + 1, "from": edge.from, "to": edge.to, "when": edge.when, "on": edge.on}))
            .collect();
        Spi::run_with_args(
            "INSERT INTO synapse.edges (goal_id, position, from_step, to_step, when_expr, on_outcome)
             SELECT $1, e.position, e.\"from\", e.\"to\", e.\"when\", e.\"on\"
               FROM jsonb_to_recordset($2)
                    AS e(position integer, \"from\" text, \"to\" text, \"when\" text, \"on\" text)",
            &[goal_id.into(), JsonB(Value::Array(edges)).into()],
        )?;
    }
    Ok(())
}

/// The planner's half of planning: validate the chosen blueprint and install it
/// for a goal that is `submitted` or `planning`, or fail the goal listing why.
fn plan_goal(
    goal_id: i64,
    doc: &Value,
    template: Option<&str>,
    params: Option<Value>,
) -> Result<Vec<Problem>> {
    let params = params.unwrap_or_else(|| json!({}));
    let row = Spi::get_two_with_args::<String, JsonB>(
        "SELECT goal, input FROM synapse.goals WHERE id = $1 AND status IN ('submitted', 'planning') FOR UPDATE",
        &[goal_id.into()],
    );
    let (text, input) = match row {
        Ok((Some(text), Some(JsonB(input)))) => (text, input),
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => {
            return Err(Error::InvalidParameter(format!(
                "goal {goal_id} does not exist or is not waiting for a plan"
            )))
        }
        Err(error) => return Err(error.into()),
    };
    let goal = GoalContext {
        id: goal_id,
        text,
        input,
        params: params.clone(),
    };
    let outcome =
        validate(doc)?.and_then(|plan| root_inputs(&plan, &goal).map(|roots| (plan, roots)));
    match outcome {
        Ok((plan, roots)) => {
            Spi::run_with_args(
                "UPDATE synapse.goals SET blueprint = $2, template = $3, params = $4, status = 'running' WHERE id = $1",
                &[goal_id.into(), JsonB(doc.clone()).into(), template.into(), JsonB(params).into()],
            )?;
            install(goal_id, &plan, &roots)?;
            Ok(Vec::new())
        }
        Err(problems) => {
            let error = std::iter::once("invalid blueprint:".to_owned())
                .chain(
                    problems
                        .iter()
                        .map(|p| format!("{}: {}", p.path, p.message)),
                )
                .collect::<Vec<_>>()
                .join("\n");
            Spi::run_with_args(
                "UPDATE synapse.goals SET blueprint = $2, template = $3, params = $4, status = 'failed', error = $5
                  WHERE id = $1",
                &[goal_id.into(), JsonB(doc.clone()).into(), template.into(), JsonB(params).into(), error.into()],
            )?;
            Ok(problems)
        }
    }
}

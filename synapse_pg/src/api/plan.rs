//! Validating blueprints and installing plans: goal, tasks and edges in one
//! transaction, roots queued.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use pgrx::pg_sys::panic::ErrorReport;
use synapse_worker::blueprint::{self, cel, limits, Blueprint, Problem};

mod json_arg;
mod prepared;
pub(super) use json_arg::JsonbArg;
use prepared::{oid, prepared};

/// How many steps are handled between two interrupt checks.
const INTERRUPT_EVERY: usize = 256;

/// Checks a blueprint without running anything: `[]` or a list of `{path, message}`.
#[pg_extern(stable)]
fn validate_blueprint(blueprint: Option<JsonbArg>) -> std::result::Result<JsonB, ErrorReport> {
    let problems = match blueprint {
        None => vec![Problem {
            path: "$".into(),
            message: "blueprint must not be NULL".into(),
        }],
        Some(arg) => match arg.into_value("blueprint") {
            Ok(doc) => validate(&doc)?.err().unwrap_or_default(),
            Err(error) => vec![refusal(error)?],
        },
    };
    Ok(JsonB(json!(problems)))
}

/// Records a goal whose blueprint is given, after validating it, and queues its roots.
#[pg_extern]
fn submit_plan(
    blueprint: Option<JsonbArg>,
    input: default!(Option<JsonbArg>, "'{}'"),
    idempotency_key: default!(Option<&str>, "NULL"),
) -> std::result::Result<i64, ErrorReport> {
    Ok(submit(blueprint, input, idempotency_key)?)
}

/// Installs the plan of a goal a planner is working on: `[]`, or the problems
/// that made the goal fail (then no task was created).
#[pg_extern(name = "_install_plan")]
fn install_plan_for_goal(
    goal_id: i64,
    blueprint: JsonbArg,
    template: Option<&str>,
    params: default!(Option<JsonbArg>, "'{}'"),
) -> std::result::Result<JsonB, ErrorReport> {
    Ok(JsonB(json!(plan_goal(
        goal_id, blueprint, template, params
    )?)))
}

/// A value refused at the door (over a limit, or unreadable) as a problem;
/// any other error stays an error.
fn refusal(error: Error) -> Result<Problem> {
    match error {
        Error::LimitExceeded { path, message } => Ok(Problem { path, message }),
        Error::InvalidParameter(message) => Ok(Problem {
            path: "$".into(),
            message,
        }),
        other => Err(other),
    }
}

/// The registered actions, with their `params_schema` if they have one.
fn known_actions() -> Result<HashMap<String, Option<Value>>> {
    Ok(Spi::connect(|client| {
        let actions = prepared(
            client,
            "SELECT name, params_schema FROM synapse.actions",
            &[],
        )?;
        client
            .select(&*actions, None, &[])?
            .map(|row| Ok((row.get::<String>(1)?, row.get::<JsonB>(2)?)))
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
    })?
    .into_iter()
    .filter_map(|(name, schema)| Some((name?, schema.map(|JsonB(schema)| schema))))
    .collect())
}

fn validate(doc: &Value) -> Result<std::result::Result<Blueprint, Vec<Problem>>> {
    let known = known_actions()?;
    Ok(blueprint::validate_with_params_schemas(
        doc,
        &|name| known.contains_key(name),
        &|name| known.get(name).cloned().flatten(),
        &|| {
            pgrx::check_for_interrupts!();
        },
    ))
}

/// Validates `doc`, failing with every problem listed.
pub(super) fn check(doc: &Value) -> Result<Blueprint> {
    validate(doc)?.map_err(Error::InvalidBlueprint)
}

fn submit(
    blueprint: Option<JsonbArg>,
    input: Option<JsonbArg>,
    idempotency_key: Option<&str>,
) -> Result<i64> {
    let doc = blueprint
        .ok_or_else(|| Error::InvalidParameter("blueprint must not be NULL".into()))?
        .into_value("blueprint")?;
    let input = input
        .ok_or_else(|| Error::InvalidParameter("input must be JSON, not NULL (use '{}')".into()))?
        .into_value("input")?;
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
        let insert = prepared(
            client,
            "INSERT INTO synapse.goals (goal, input, planner, blueprint, status, idempotency_key)
             VALUES ($1, $2, NULL, $3, 'running', $4)
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            &[
                oid(PgBuiltInOids::TEXTOID),
                oid(PgBuiltInOids::JSONBOID),
                oid(PgBuiltInOids::JSONBOID),
                oid(PgBuiltInOids::TEXTOID),
            ],
        )?;
        client
            .update(
                &*insert,
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
    let roots = root_inputs(&plan, &goal)?;
    install(id, &plan, &roots, &goal.input)?;
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

/// The inputs of the root steps, by step index: `None` for `goal.input` (the
/// default), else the step's `input` expression evaluated over `goal` (no step
/// has run yet). Every evaluation problem is listed; an evaluated input over the
/// JSON limits is refused.
fn root_inputs(plan: &Blueprint, goal: &GoalContext) -> Result<HashMap<usize, Option<Value>>> {
    let vars = goal.variables();
    let roots: HashSet<&str> = plan.roots().into_iter().collect();
    let mut inputs = HashMap::with_capacity(roots.len());
    let mut problems = Vec::new();
    for (index, step) in plan.steps.iter().enumerate() {
        if index.is_multiple_of(INTERRUPT_EVERY) {
            pgrx::check_for_interrupts!();
        }
        if !roots.contains(step.id.as_str()) {
            continue;
        }
        let Some(source) = &step.input else {
            inputs.insert(index, None);
            continue;
        };
        let path = format!("$.steps[{index}].input");
        match cel::compile(source).and_then(|expr| expr.evaluate(&vars)) {
            Ok(value) => {
                let what = format!("the input of root step \"{}\"", step.id);
                limits::check_json(&what, &value)
                    .map_err(|message| Error::LimitExceeded { path, message })?;
                inputs.insert(index, Some(value));
            }
            Err(message) => problems.push(Problem {
                path,
                message: format!(
                    "cannot evaluate the input of root step \"{}\": {message}",
                    step.id
                ),
            }),
        }
    }
    if problems.is_empty() {
        Ok(inputs)
    } else {
        Err(Error::InvalidBlueprint(problems))
    }
}

/// Writes every task and edge of `plan` for goal `goal_id`; roots are queued
/// with their inputs (`goal_input` passed once, not copied per root), the rest
/// wait as pending.
fn install(
    goal_id: i64,
    plan: &Blueprint,
    root_inputs: &HashMap<usize, Option<Value>>,
    goal_input: &Value,
) -> Result<()> {
    let mut inbound: HashMap<&str, usize> = HashMap::new();
    for edge in &plan.edges {
        *inbound.entry(edge.to.as_str()).or_default() += 1;
    }
    let mut tasks = Vec::with_capacity(plan.steps.len());
    for (index, step) in plan.steps.iter().enumerate() {
        if index.is_multiple_of(INTERRUPT_EVERY) {
            pgrx::check_for_interrupts!();
        }
        let root = root_inputs.get(&index);
        tasks.push(json!({
            "step": step.id,
            "action": step.action,
            "params": step.params,
            "input_expr": step.input,
            "input": root.and_then(Option::as_ref),
            "goal_input": matches!(root, Some(None)),
            "queue": step.queue,
            "join_mode": step.join,
            "max_attempts": step.retries + 1,
            "backoff_ms": step.backoff.as_millis() as u64,
            "timeout_ms": step.timeout.as_millis() as u64,
            "status": if root.is_some() { "queued" } else { "pending" },
            "pending_inbound": inbound.get(step.id.as_str()).copied().unwrap_or(0),
        }));
    }
    // Between installing this build and `ALTER EXTENSION synapse UPDATE`, the
    // tables are still 0.2.0's: plans go in without the counts, which the
    // update then computes from the pending edges.
    let (counts, count_values) = if tasks_count_inbound() {
        (", pending_inbound", ", t.pending_inbound")
    } else {
        ("", "")
    };
    let insert_tasks = format!(
        "INSERT INTO synapse.tasks (goal_id, step, action, params, input_expr, input, queue, join_mode,
                                    max_attempts, backoff_ms, timeout_ms, status{counts})
         SELECT $1, t.step, t.action, t.params, t.input_expr,
                CASE WHEN t.goal_input THEN $3 ELSE t.input END, t.queue, t.join_mode,
                t.max_attempts, t.backoff_ms, t.timeout_ms, t.status{count_values}
           FROM jsonb_to_recordset($2)
                AS t(step text, action text, params jsonb, input_expr text, input jsonb, goal_input boolean,
                     queue text, join_mode text, max_attempts integer, backoff_ms bigint, timeout_ms bigint,
                     status text, pending_inbound integer)"
    );
    Spi::connect_mut(|client| {
        let insert = prepared(
            client,
            &insert_tasks,
            &[
                oid(PgBuiltInOids::INT8OID),
                oid(PgBuiltInOids::JSONBOID),
                oid(PgBuiltInOids::JSONBOID),
            ],
        )?;
        client
            .update(
                &*insert,
                None,
                &[
                    goal_id.into(),
                    JsonB(Value::Array(tasks)).into(),
                    JsonB(goal_input.clone()).into(),
                ],
            )
            .map(drop)
    })?;
    pgrx::check_for_interrupts!();
    if !plan.edges.is_empty() {
        let edges: Vec<Value> = plan
            .edges
            .iter()
            .enumerate()
            .map(|(i, edge)| json!({"position": i + 1, "from": edge.from, "to": edge.to, "when": edge.when, "on": edge.on}))
            .collect();
        Spi::connect_mut(|client| {
            let insert = prepared(
                client,
                "INSERT INTO synapse.edges (goal_id, position, from_step, to_step, when_expr, on_outcome)
                 SELECT $1, e.position, e.\"from\", e.\"to\", e.\"when\", e.\"on\"
                   FROM jsonb_to_recordset($2)
                        AS e(position integer, \"from\" text, \"to\" text, \"when\" text, \"on\" text)",
                &[oid(PgBuiltInOids::INT8OID), oid(PgBuiltInOids::JSONBOID)],
            )?;
            client
                .update(
                    &*insert,
                    None,
                    &[goal_id.into(), JsonB(Value::Array(edges)).into()],
                )
                .map(drop)
        })?;
    }
    Ok(())
}

/// Whether `synapse.tasks` has `pending_inbound` (from 0.3.0 on); syscache
/// lookups only.
fn tasks_count_inbound() -> bool {
    // SAFETY: catalogue lookups by name, inside a transaction; each answers
    // InvalidOid (or 0) when the object does not exist.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"synapse".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return false;
        }
        let tasks = pg_sys::get_relname_relid(c"tasks".as_ptr(), schema);
        tasks != pg_sys::InvalidOid && pg_sys::get_attnum(tasks, c"pending_inbound".as_ptr()) > 0
    }
}

/// The planner's half of planning: validate the chosen blueprint and install it
/// for a goal that is `submitted` or `planning`, or fail the goal listing why
/// (a blueprint or params over the JSON limits is not even read, nor kept).
fn plan_goal(
    goal_id: i64,
    blueprint: JsonbArg,
    template: Option<&str>,
    params: Option<JsonbArg>,
) -> Result<Vec<Problem>> {
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
    let read = blueprint.into_value("blueprint").and_then(|doc| {
        let params = match params {
            Some(params) => params.into_value("params")?,
            None => json!({}),
        };
        Ok((doc, params))
    });
    let (doc, params) = match read {
        Ok(read) => read,
        Err(error) => {
            let problems = vec![refusal(error)?];
            fail_goal(goal_id, None, template, None, &problems)?;
            return Ok(problems);
        }
    };
    let goal = GoalContext {
        id: goal_id,
        text,
        input,
        params: params.clone(),
    };
    let outcome = match validate(&doc)? {
        Ok(plan) => match root_inputs(&plan, &goal) {
            Ok(roots) => Ok((plan, roots)),
            Err(Error::InvalidBlueprint(problems)) => Err(problems),
            Err(error) => Err(vec![refusal(error)?]),
        },
        Err(problems) => Err(problems),
    };
    match outcome {
        Ok((plan, roots)) => {
            Spi::run_with_args(
                "UPDATE synapse.goals SET blueprint = $2, template = $3, params = $4, status = 'running' WHERE id = $1",
                &[goal_id.into(), JsonB(doc).into(), template.into(), JsonB(params).into()],
            )?;
            install(goal_id, &plan, &roots, &goal.input)?;
            Ok(Vec::new())
        }
        Err(problems) => {
            fail_goal(goal_id, Some(doc), template, Some(params), &problems)?;
            Ok(problems)
        }
    }
}

/// Fails a goal whose plan could not be installed, listing every problem.
fn fail_goal(
    goal_id: i64,
    doc: Option<Value>,
    template: Option<&str>,
    params: Option<Value>,
    problems: &[Problem],
) -> Result<()> {
    let error = std::iter::once("invalid blueprint:".to_owned())
        .chain(
            problems
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message)),
        )
        .collect::<Vec<_>>()
        .join("\n");
    Spi::run_with_args(
        "UPDATE synapse.goals SET blueprint = $2, template = $3, params = coalesce($4, '{}'), status = 'failed',
                error = $5
          WHERE id = $1",
        &[
            goal_id.into(),
            doc.map(JsonB).into(),
            template.into(),
            params.map(JsonB).into(),
            error.into(),
        ],
    )?;
    Ok(())
}

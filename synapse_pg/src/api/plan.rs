//! Validating blueprints and installing plans: goal, tasks and edges in one
//! transaction, roots queued.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use pgrx::pg_sys::panic::ErrorReport;
use synapse_worker::blueprint::{self, cel, limits, Blueprint, Problem};

mod child;
mod json_arg;
mod map;
mod wait;
use crate::prepared::{oid, prepared};
pub(super) use json_arg::JsonbArg;

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
    let conflict = if goals_have_owners() {
        "(owner, idempotency_key)"
    } else {
        "(idempotency_key)"
    };
    let insert_goal = format!(
        "INSERT INTO synapse.goals (goal, input, planner, blueprint, status, idempotency_key)
         VALUES ($1, $2, NULL, $3, 'running', $4)
         ON CONFLICT {conflict} DO NOTHING RETURNING id"
    );
    let inserted = Spi::connect_mut(|client| {
        let insert = prepared(
            client,
            &insert_goal,
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
    let roots = root_starts(&plan, &goal)?;
    install(id, &plan, roots, &goal)?;
    Ok(id)
}

fn goal_with_key(key: &str) -> Result<Option<i64>> {
    Ok(Spi::get_one_with_args::<i64>(
        if goals_have_owners() {
            "SELECT id FROM synapse.goals WHERE owner = synapse._caller() AND idempotency_key = $1"
        } else {
            "SELECT id FROM synapse.goals WHERE idempotency_key = $1"
        },
        &[key.into()],
    )
    .or_else(|error| match error {
        pgrx::spi::Error::InvalidPosition => Ok(None),
        other => Err(other),
    })?)
}

/// `steps` as expressions see it: step id → `{status, result}`.
fn steps_variable(goal_id: i64) -> std::result::Result<Value, pgrx::spi::Error> {
    Ok(Spi::get_one_with_args::<JsonB>(
        "SELECT coalesce(jsonb_object_agg(step, jsonb_build_object('status', status, 'result', result)), '{}')
           FROM synapse.tasks WHERE goal_id = $1 AND map_index IS NULL",
        &[goal_id.into()],
    )?
    .map_or(Value::Null, |JsonB(steps)| steps))
}

/// What expressions see as `goal`.
struct GoalContext {
    id: i64,
    text: String,
    input: Value,
    params: Value,
}

impl GoalContext {
    /// `goal`: `{id, goal, input, params}`.
    fn value(&self) -> Value {
        json!({"id": self.id, "goal": self.text, "input": self.input, "params": self.params})
    }

    fn variables(&self) -> Map<String, Value> {
        let mut vars = Map::new();
        vars.insert("goal".into(), self.value());
        vars.insert("steps".into(), json!({}));
        vars
    }
}

/// How a root step starts when its plan is installed.
enum RootStart {
    /// Queued with `goal.input` (the default).
    GoalInput,
    /// Queued with its `input` expression evaluated.
    Input(Value),
    /// A map step: its instances, from its list evaluated.
    Map(map::Expansion),
    /// A wait step (never queued), with its input.
    Wait(Value),
}

/// How the root steps start, by step index: each `input` expression (and
/// `for_each` list) evaluated over `goal` (no step has run yet). Every
/// evaluation problem is listed; an evaluated input over the JSON limits is
/// refused.
fn root_starts(plan: &Blueprint, goal: &GoalContext) -> Result<HashMap<usize, RootStart>> {
    let vars = goal.variables();
    let roots: HashSet<&str> = plan.roots().into_iter().collect();
    let mut starts = HashMap::with_capacity(roots.len());
    let mut problems = Vec::new();
    for (index, step) in plan.steps.iter().enumerate() {
        if index.is_multiple_of(INTERRUPT_EVERY) {
            pgrx::check_for_interrupts!();
        }
        if !roots.contains(step.id.as_str()) {
            continue;
        }
        if let Some(for_each) = &step.for_each {
            match map::expand(&step.id, for_each, step.input.as_deref(), &vars) {
                Ok(expansion) => {
                    starts.insert(index, RootStart::Map(expansion));
                }
                Err(message) => {
                    let path = format!("$.steps[{index}].for_each");
                    if let Some(error) = over_budget(&path, &message) {
                        return Err(error);
                    }
                    problems.push(Problem { path, message })
                }
            }
            continue;
        }
        let waits = step.action == blueprint::wait::ACTION;
        let Some(source) = &step.input else {
            let start = if waits {
                RootStart::Wait(goal.input.clone())
            } else {
                RootStart::GoalInput
            };
            if let RootStart::Wait(input) = &start {
                problems.extend(wait::until_problem(index, step, &goal.value(), input));
            }
            starts.insert(index, start);
            continue;
        };
        let path = format!("$.steps[{index}].input");
        let evaluated = if step.until.is_some() {
            // A loop's first run: no previous result yet.
            let mut first_run = vars.clone();
            first_run.insert("previous".into(), Value::Null);
            first_run.insert("iteration".into(), json!(1));
            cel::compile(source).and_then(|expr| expr.evaluate(&first_run))
        } else {
            cel::compile(source).and_then(|expr| expr.evaluate(&vars))
        };
        match evaluated {
            Ok(value) => {
                let what = format!("the input of root step \"{}\"", step.id);
                limits::check_json(&what, &value)
                    .map_err(|message| Error::LimitExceeded { path, message })?;
                let start = if waits {
                    problems.extend(wait::until_problem(index, step, &goal.value(), &value));
                    RootStart::Wait(value)
                } else {
                    RootStart::Input(value)
                };
                starts.insert(index, start);
            }
            Err(message) => {
                let message = format!(
                    "cannot evaluate the input of root step \"{}\": {message}",
                    step.id
                );
                if let Some(error) = over_budget(&path, &message) {
                    return Err(error);
                }
                problems.push(Problem { path, message })
            }
        }
    }
    if problems.is_empty() {
        Ok(starts)
    } else {
        Err(Error::InvalidBlueprint(problems))
    }
}

/// An evaluation a cancel stopped ends the statement as Postgres cancels it;
/// one over its budget is refused as such (54000), not as a wrong plan.
fn over_budget(path: &str, message: &str) -> Option<Error> {
    use synapse_worker::blueprint::cel_budget::{EXCEEDED, INTERRUPTED};
    if message.contains(INTERRUPTED) {
        pgrx::check_for_interrupts!();
    }
    message.contains(EXCEEDED).then(|| Error::LimitExceeded {
        path: path.to_owned(),
        message: message.to_owned(),
    })
}

/// Writes every task and edge of `plan` for goal `goal_id`; roots are queued
/// with their inputs (`goal_input` passed once, not copied per root), root
/// map steps start with their instances, the rest wait as pending.
fn install(
    goal_id: i64,
    plan: &Blueprint,
    mut root_starts: HashMap<usize, RootStart>,
    goal: &GoalContext,
) -> Result<()> {
    let goal_input = &goal.input;
    let mut inbound: HashMap<&str, usize> = HashMap::new();
    for edge in &plan.edges {
        *inbound.entry(edge.to.as_str()).or_default() += 1;
    }
    // Only a plan that maps, loops or joins early writes those columns: the
    // common plan's statement stays as lean as before they existed.
    let grows_plan = plan.steps.iter().any(grows);
    let mut tasks = Vec::with_capacity(plan.steps.len());
    for (index, step) in plan.steps.iter().enumerate() {
        if index.is_multiple_of(INTERRUPT_EVERY) {
            pgrx::check_for_interrupts!();
        }
        let root = root_starts.get(&index);
        let queued = matches!(root, Some(RootStart::GoalInput | RootStart::Input(_)));
        let mut task = json!({
            "step": step.id,
            "action": step.action,
            "params": step.params,
            "input_expr": step.input,
            "input": match root {
                Some(RootStart::Input(input)) => Some(input),
                _ => None,
            },
            "goal_input": matches!(root, Some(RootStart::GoalInput)),
            "queue": step.queue,
            "join_mode": step.join.to_column(),
            "max_attempts": step.retries + 1,
            "backoff_ms": step.backoff.as_millis() as u64,
            "timeout_ms": step.timeout.as_millis() as u64,
            "status": if queued { "queued" } else { "pending" },
            "pending_inbound": inbound.get(step.id.as_str()).copied().unwrap_or(0),
        });
        if grows_plan {
            let growth = json!({
                "cancel_others": step.cancel_others,
                "for_each_expr": step.for_each,
                "max_parallel": step.max_parallel,
                "tolerate": step.tolerate,
                "until_expr": step.until,
                "max_iterations": step.until.as_ref().map(|_| {
                    step.max_iterations.unwrap_or(blueprint::DEFAULT_MAX_ITERATIONS)
                }),
                "iteration": step.until.as_ref().map(|_| 1),
            });
            if let (Value::Object(task), Value::Object(growth)) = (&mut task, growth) {
                task.extend(growth);
            }
        }
        tasks.push(task);
    }
    // Between installing this build and `ALTER EXTENSION synapse UPDATE`, the
    // tables are still those of the release installed: plans go in with the
    // columns it has (the update computes the inbound counts 0.2.0 lacks), and
    // a plan that needs a later column is refused until the update.
    let columns = task_columns();
    let (counts, count_values) = if columns >= TaskColumns::InboundCounts {
        (", pending_inbound", ", t.pending_inbound")
    } else {
        ("", "")
    };
    let (growth, growth_values, growth_types) = match (grows_plan, columns) {
        (false, _) => ("", "", ""),
        (true, TaskColumns::PlansThatGrow) => (
            ", cancel_others, for_each_expr, max_parallel, tolerate, until_expr, max_iterations, iteration",
            ", t.cancel_others, t.for_each_expr, t.max_parallel, t.tolerate, t.until_expr, t.max_iterations,
               t.iteration",
            ", cancel_others boolean, for_each_expr text, max_parallel integer, tolerate integer,
               until_expr text, max_iterations integer, iteration integer",
        ),
        (true, _) => {
            return Err(Error::InvalidParameter(
                "this plan maps, loops or joins early: run ALTER EXTENSION synapse UPDATE first"
                    .into(),
            ))
        }
    };
    let insert_tasks = format!(
        "INSERT INTO synapse.tasks (goal_id, step, action, params, input_expr, input, queue, join_mode,
                                    max_attempts, backoff_ms, timeout_ms, status{counts}{growth})
         SELECT $1, t.step, t.action, t.params, t.input_expr,
                CASE WHEN t.goal_input THEN $3 ELSE t.input END, t.queue, t.join_mode,
                t.max_attempts, t.backoff_ms, t.timeout_ms, t.status{count_values}{growth_values}
           FROM jsonb_to_recordset($2)
                AS t(step text, action text, params jsonb, input_expr text, input jsonb, goal_input boolean,
                     queue text, join_mode text, max_attempts integer, backoff_ms bigint, timeout_ms bigint,
                     status text, pending_inbound integer{growth_types})"
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
    let step_task = |index: usize| {
        Spi::get_one_with_args::<i64>(
            "SELECT id FROM synapse.tasks WHERE goal_id = $1 AND step = $2 AND map_index IS NULL",
            &[goal_id.into(), plan.steps[index].id.as_str().into()],
        )?
        .ok_or_else(|| Error::InvalidParameter("a root step was not installed".into()))
    };
    for (index, start) in root_starts.drain() {
        match start {
            RootStart::Map(expansion) => {
                map::start(step_task(index)?, expansion)?;
            }
            // A failed start cannot happen here (root_starts evaluated its
            // `until`); a kept signal taken at once has its edges resolved by
            // a worker (its event asks one to).
            RootStart::Wait(input) => {
                wait::start(step_task(index)?, &goal.value(), input)?;
            }
            RootStart::GoalInput | RootStart::Input(_) => {}
        }
    }
    Ok(())
}

/// Whether a step needs the columns of plans that grow (0.4.0).
fn grows(step: &blueprint::Step) -> bool {
    step.for_each.is_some()
        || step.until.is_some()
        || step.cancel_others
        || step.join.early().is_some()
}

/// Which release's columns `synapse.tasks` has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TaskColumns {
    /// 0.1.0 and 0.2.0.
    Original,
    /// 0.3.0: `pending_inbound`.
    InboundCounts,
    /// 0.4.0: maps, loops and early joins.
    PlansThatGrow,
}

/// Whether `synapse.<table>` has `column`; syscache lookups only.
pub(super) fn has_column(table: &std::ffi::CStr, column: &std::ffi::CStr) -> bool {
    // SAFETY: catalogue lookups by name, inside a transaction; each answers
    // InvalidOid (or 0) when the object does not exist.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"synapse".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return false;
        }
        let relation = pg_sys::get_relname_relid(table.as_ptr(), schema);
        relation != pg_sys::InvalidOid && pg_sys::get_attnum(relation, column.as_ptr()) > 0
    }
}

/// Whether goals have owners (0.5.0): until `ALTER EXTENSION synapse
/// UPDATE`, idempotency keys stay global, as the release installed has them.
fn goals_have_owners() -> bool {
    has_column(c"goals", c"owner")
}

/// Which columns `synapse.tasks` has; syscache lookups only.
fn task_columns() -> TaskColumns {
    let has = |column: &std::ffi::CStr| has_column(c"tasks", column);
    if has(c"for_each_expr") {
        TaskColumns::PlansThatGrow
    } else if has(c"pending_inbound") {
        TaskColumns::InboundCounts
    } else {
        TaskColumns::Original
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
        Ok(plan) => match root_starts(&plan, &goal) {
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
            install(goal_id, &plan, roots, &goal)?;
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

//! Validating blueprints and installing plans: goal, tasks and edges in one
//! transaction, roots queued.
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use pgrx::pg_sys::panic::ErrorReport;
use synapse_worker::blueprint::{self, cel, limits, Blueprint, Problem};
use synapse_worker::stored::{Steps, STEPS_OF_GOAL};

mod child;
mod grown;
mod json_arg;
mod map;
mod validated;
mod wait;
use crate::installed::has_column;
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
    let input = input
        .ok_or_else(|| Error::InvalidParameter("input must be JSON, not NULL (use '{}')".into()))?;
    let submission = Submission {
        input,
        key: idempotency_key,
        name: "input".into(),
    };
    Ok(submit(blueprint, &[submission], false)?[0])
}

/// Records one goal of `blueprint` per element of `inputs`, validating the
/// blueprint once, in statements that write every goal, task and edge at
/// once; returns their ids in the order of `inputs`. `idempotency_keys`, if
/// given, holds one key (or NULL) per input, as `submit_plan`'s.
#[pg_extern]
fn submit_plans(
    blueprint: Option<JsonbArg>,
    inputs: Option<Array<'_, JsonbArg>>,
    idempotency_keys: default!(Option<Array<'_, &str>>, "NULL"),
) -> std::result::Result<Vec<i64>, ErrorReport> {
    let inputs = inputs.ok_or_else(|| {
        Error::InvalidParameter("inputs must be an array of JSON values, not NULL".into())
    })?;
    let keys: Vec<Option<&str>> = match &idempotency_keys {
        None => vec![None; inputs.len()],
        Some(keys) if keys.len() == inputs.len() => keys.iter().collect(),
        Some(keys) => {
            return Err(Error::InvalidParameter(format!(
                "idempotency_keys has {} elements and inputs {}: give one key (or NULL) per input",
                keys.len(),
                inputs.len()
            ))
            .into())
        }
    };
    let mut submissions = Vec::with_capacity(inputs.len());
    for (index, (input, key)) in inputs.iter().zip(keys).enumerate() {
        // SQL counts array elements from 1.
        let name = format!("inputs[{}]", index + 1);
        let input = input.ok_or_else(|| {
            Error::InvalidParameter(format!("{name} must be JSON, not NULL (use '{{}}')"))
        })?;
        submissions.push(Submission { input, key, name });
    }
    Ok(submit(blueprint, &submissions, true)?)
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

/// The registered actions, with their `params_schema` if they have one. A
/// built-in's is left out: validation checks the params of built-ins itself
/// and never reads their schemas, and converting them took a tenth of a
/// one-step `submit_plan`.
type Registered = HashMap<String, Option<Value>>;

fn registered_actions() -> Result<Registered> {
    Ok(Spi::connect(|client| {
        let actions = prepared(
            client,
            "SELECT name, CASE WHEN name <> ALL ($1) THEN params_schema END FROM synapse.actions",
            &[oid(PgBuiltInOids::TEXTARRAYOID)],
        )?;
        client
            .select(
                &*actions,
                None,
                &[blueprint::BUILTIN_ACTIONS.to_vec().into()],
            )?
            .map(|row| Ok((row.get::<String>(1)?, row.get::<JsonB>(2)?)))
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
    })?
    .into_iter()
    .filter_map(|(name, schema)| Some((name?, schema.map(|JsonB(schema)| schema))))
    .collect())
}

/// The registered actions, read the first time validation asks about one.
/// Validation asks only about actions that are not built in, so a blueprint
/// of built-ins alone (most one-step goals) reads nothing: the read, the
/// first in a session to plan, made the first `submit_plan` on a new
/// connection 4.3–4.6 ms rather than 4.0.
#[derive(Default)]
struct LazyRegistered(RefCell<Option<Result<Registered>>>);

impl LazyRegistered {
    /// `answer` applied to the registered actions; `unread` if reading them failed
    /// (the error comes out of [`LazyRegistered::into_read`]).
    fn ask<T>(&self, unread: T, answer: impl FnOnce(&Registered) -> T) -> T {
        let mut read = self.0.borrow_mut();
        match read.get_or_insert_with(registered_actions) {
            Ok(registered) => answer(registered),
            Err(_) => unread,
        }
    }

    /// What was read, `None` if nothing was asked; or the error reading failed with.
    fn into_read(self) -> Result<Option<Registered>> {
        self.0.into_inner().transpose()
    }
}

/// A blueprint validated: the plan, or every problem found.
type Validation = std::result::Result<Blueprint, Vec<Problem>>;

fn validate(doc: &Value) -> Result<Validation> {
    Ok(validate_reading(doc)?.0)
}

/// [`validate`], with the registered actions it read: `None` when its
/// outcome depends on none of them.
fn validate_reading(doc: &Value) -> Result<(Validation, Option<Registered>)> {
    let registered = LazyRegistered::default();
    let outcome = blueprint::validate_with_params_schemas(
        doc,
        &|name| registered.ask(false, |known| known.contains_key(name)),
        &|name| registered.ask(None, |known| known.get(name).cloned().flatten()),
        &|| {
            pgrx::check_for_interrupts!();
        },
    );
    Ok((outcome, registered.into_read()?))
}

/// Validates `doc`, failing with every problem listed.
pub(super) fn check(doc: &Value) -> Result<Blueprint> {
    validate(doc)?.map_err(Error::InvalidBlueprint)
}

/// A goal to submit: its input as given, its idempotency key, and what
/// errors call its input.
struct Submission<'a> {
    input: JsonbArg,
    key: Option<&'a str>,
    name: String,
}

/// Records a goal of `blueprint` for each of `submissions` (or finds the goal
/// its key already names) and installs the new goals' plans; their ids, in
/// order. With `many`, each error about an input names it.
fn submit(blueprint: Option<JsonbArg>, submissions: &[Submission], many: bool) -> Result<Vec<i64>> {
    let blueprint =
        blueprint.ok_or_else(|| Error::InvalidParameter("blueprint must not be NULL".into()))?;
    validated::check_limits(blueprint)?;
    let mut inputs = Vec::with_capacity(submissions.len());
    for submission in submissions {
        inputs.push(Some(submission.input.into_value(&submission.name)?));
    }
    let keys: Vec<&str> = submissions.iter().filter_map(|s| s.key).collect();
    let known = goals_with_keys(&keys)?;
    let mut ids: Vec<Option<i64>> = submissions
        .iter()
        .map(|s| s.key.and_then(|key| known.get(key).copied()))
        .collect();
    // A key given twice is submitted once, at its first place.
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let mut new: Vec<usize> = Vec::new();
    for (index, submission) in submissions.iter().enumerate() {
        if ids[index].is_some() {
            continue;
        }
        match submission.key {
            Some(key) if first_with_key.contains_key(key) => {}
            Some(key) => {
                first_with_key.insert(key, index);
                new.push(index);
            }
            None => new.push(index),
        }
    }
    if !new.is_empty() {
        let plan = validated::validated(blueprint)?;
        let text = plan.name.clone().unwrap_or_else(|| "plan".into());
        let inserted = insert_goals(&text, blueprint, submissions, &new)?;
        let mut installing = Vec::with_capacity(new.len());
        let mut compiled = RootInputs::new();
        for (index, id) in new.into_iter().zip(inserted) {
            let Some(id) = id else {
                // Another transaction committed the same key meanwhile: that goal is the answer.
                let key = submissions[index].key.unwrap_or_default();
                let id = goals_with_keys(&[key])?.get(key).copied();
                ids[index] =
                    Some(id.ok_or_else(|| {
                        Error::InvalidParameter("idempotency key vanished".into())
                    })?);
                continue;
            };
            ids[index] = Some(id);
            let goal = GoalContext {
                id,
                text: text.clone(),
                input: inputs[index].take().unwrap_or_default(),
                params: json!({}),
            };
            // An error here aborts the statement, taking the goal rows with it.
            let roots = root_starts(&plan, &goal, &mut compiled).map_err(|error| {
                if many {
                    naming(error, &submissions[index].name)
                } else {
                    error
                }
            })?;
            installing.push(Installing { goal, roots });
        }
        install(&plan, installing)?;
    }
    submissions
        .iter()
        .enumerate()
        .map(|(index, submission)| {
            ids[index]
                .or_else(|| {
                    let first = first_with_key.get(submission.key?)?;
                    ids[*first]
                })
                .ok_or_else(|| Error::InvalidParameter(format!("{} has no goal", submission.name)))
        })
        .collect()
}

/// `error` about the goal of input `name`, saying so.
fn naming(error: Error, name: &str) -> Error {
    match error {
        Error::InvalidBlueprint(problems) => Error::InvalidBlueprint(
            problems
                .into_iter()
                .map(|problem| Problem {
                    path: problem.path,
                    message: format!("{} (for {name})", problem.message),
                })
                .collect(),
        ),
        Error::LimitExceeded { path, message } => Error::LimitExceeded {
            path,
            message: format!("{message} (for {name})"),
        },
        other => other,
    }
}

/// Inserts the goals of `submissions[new]`, running: per place of `new`, its
/// id, or `None` where a goal with its key was committed meanwhile.
fn insert_goals(
    text: &str,
    blueprint: JsonbArg,
    submissions: &[Submission],
    new: &[usize],
) -> Result<Vec<Option<i64>>> {
    let conflict = if goals_have_owners() {
        "(owner, idempotency_key)"
    } else {
        "(idempotency_key)"
    };
    if let [only] = new {
        // One goal, as every submit_plan call: the plain statement, without
        // the set's ordinality, sequence draws and join.
        let submission = &submissions[*only];
        let insert_goal = format!(
            "INSERT INTO synapse.goals (goal, input, planner, blueprint, status, idempotency_key)
             VALUES ($1, $2, NULL, $3, 'running', $4)
             ON CONFLICT {conflict} DO NOTHING RETURNING id"
        );
        // No row limit (Spi::get_one_* sets one): a DML statement stopped at
        // its first RETURNING row never reaches its end, where the statement
        // trigger that records its event fires.
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
                        text.into(),
                        submission.input.into(),
                        blueprint.into(),
                        submission.key.into(),
                    ],
                )?
                .first()
                .get_one::<i64>()
        });
        return match inserted {
            Ok(id) => Ok(vec![id]),
            Err(pgrx::spi::Error::InvalidPosition) => Ok(vec![None]),
            Err(error) => Err(error.into()),
        };
    }
    // The identity's sequence, drawn in the order given; the goals' events
    // come from the statement trigger, at the statement's end.
    let insert_goals = format!(
        "WITH given AS (
              SELECT nextval('synapse.goals_id_seq'::regclass) AS id, g.input, g.key, g.place
                FROM unnest($1::jsonb[], $2::text[]) WITH ORDINALITY AS g(input, key, place)),
         inserted AS (
              INSERT INTO synapse.goals (id, goal, input, planner, blueprint, status, idempotency_key)
              OVERRIDING SYSTEM VALUE
              SELECT id, $3, input, NULL, $4, 'running', key FROM given
              ON CONFLICT {conflict} DO NOTHING RETURNING id)
         SELECT i.id FROM given LEFT JOIN inserted i USING (id) ORDER BY given.place"
    );
    let inputs: Vec<JsonbArg> = new.iter().map(|&index| submissions[index].input).collect();
    let keys: Vec<Option<&str>> = new.iter().map(|&index| submissions[index].key).collect();
    Ok(Spi::connect_mut(|client| {
        let insert = prepared(
            client,
            &insert_goals,
            &[
                oid(PgBuiltInOids::JSONBARRAYOID),
                oid(PgBuiltInOids::TEXTARRAYOID),
                oid(PgBuiltInOids::TEXTOID),
                oid(PgBuiltInOids::JSONBOID),
            ],
        )?;
        client
            .update(
                &*insert,
                None,
                &[inputs.into(), keys.into(), text.into(), blueprint.into()],
            )?
            .map(|row| row.get::<i64>(1))
            .collect::<std::result::Result<Vec<_>, _>>()
    })?)
}

/// The goals (of this owner) that `keys` already name: key → goal id.
fn goals_with_keys(keys: &[&str]) -> Result<HashMap<String, i64>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(Spi::connect(|client| {
        let query = if goals_have_owners() {
            "SELECT idempotency_key, id FROM synapse.goals
              WHERE owner = synapse._caller() AND idempotency_key = ANY($1)"
        } else {
            "SELECT idempotency_key, id FROM synapse.goals WHERE idempotency_key = ANY($1)"
        };
        client
            .select(query, None, &[keys.to_vec().into()])?
            .map(|row| Ok((row.get::<String>(1)?, row.get::<i64>(2)?)))
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
    })?
    .into_iter()
    .filter_map(|(key, id)| Some((key?, id?)))
    .collect())
}

/// `steps` as expressions see it: step id → `{status, result}`; or why an
/// expression reading them cannot be evaluated (they cannot be one value).
fn steps_variable(
    goal_id: i64,
) -> std::result::Result<std::result::Result<Value, String>, pgrx::spi::Error> {
    let steps = Spi::get_one_with_args::<JsonB>(STEPS_OF_GOAL, &[goal_id.into()])?
        .map_or(Value::Null, |JsonB(steps)| steps);
    Ok(match Steps::of(steps) {
        Steps::Map(steps) => Ok(steps),
        Steps::Oversized(bytes) => Err(Steps::oversized_error(bytes)),
    })
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

/// The roots' `input` expressions, by step index, compiled once for every
/// goal of a submit.
type RootInputs = HashMap<usize, std::result::Result<cel::Expression, String>>;

/// How the root steps start, by step index: each `input` expression (and
/// `for_each` list) evaluated over `goal` (no step has run yet). Every
/// evaluation problem is listed; an evaluated input over the JSON limits is
/// refused.
fn root_starts(
    plan: &Blueprint,
    goal: &GoalContext,
    compiled: &mut RootInputs,
) -> Result<HashMap<usize, RootStart>> {
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
        let expression = compiled
            .entry(index)
            .or_insert_with(|| cel::compile(source))
            .as_ref()
            .map_err(Clone::clone);
        let evaluated = if step.until.is_some() {
            // A loop's first run: no previous result yet.
            let mut first_run = vars.clone();
            first_run.insert("previous".into(), Value::Null);
            first_run.insert("iteration".into(), json!(1));
            expression.and_then(|expr| expr.evaluate(&first_run))
        } else {
            expression.and_then(|expr| expr.evaluate(&vars))
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

/// A goal whose plan is being installed: what its expressions see, and how
/// its roots start.
struct Installing {
    goal: GoalContext,
    roots: HashMap<usize, RootStart>,
}

/// Writes every task and edge of `plan` for each of `goals` (their rows
/// written), one statement for all tasks and one for all edges; roots are
/// queued with their inputs (each goal's input passed once, not copied per
/// root), root map steps start with their instances, the rest wait as pending.
/// The caller holds `goals` (inserted by its transaction, or locked by the
/// planner's claim): tasks and edges have no foreign key checking that their
/// goal stays (schema.sql says why).
fn install(plan: &Blueprint, goals: Vec<Installing>) -> Result<()> {
    grown::replan_goal_checks_as_goals_grow();
    let mut inbound: HashMap<&str, usize> = HashMap::new();
    for edge in &plan.edges {
        *inbound.entry(edge.to.as_str()).or_default() += 1;
    }
    // Only a plan that maps, loops or joins early writes those columns: the
    // common plan's statement stays as lean as before they existed.
    let grows_plan = plan.steps.iter().any(grows);
    // Between installing this build and `ALTER EXTENSION synapse UPDATE`, the
    // tables are still those of the release installed: plans go in with the
    // columns it has (the update computes the inbound counts 0.2.0 lacks), and
    // a plan that needs a later column is refused until the update.
    let columns = task_columns();
    if grows_plan && columns < TaskColumns::PlansThatGrow {
        return Err(Error::InvalidParameter(
            "this plan maps, loops or joins early: run ALTER EXTENSION synapse UPDATE first".into(),
        ));
    }
    let mut tasks = TaskArrays::default();
    for Installing { goal, roots } in &goals {
        for (index, step) in plan.steps.iter().enumerate() {
            if index.is_multiple_of(INTERRUPT_EVERY) {
                pgrx::check_for_interrupts!();
            }
            let root = roots.get(&index);
            let queued = matches!(root, Some(RootStart::GoalInput | RootStart::Input(_)));
            tasks.push(
                goal.id,
                step,
                match root {
                    Some(RootStart::Input(input)) => Some(input),
                    _ => None,
                },
                matches!(root, Some(RootStart::GoalInput)),
                if queued { "queued" } else { "pending" },
                inbound.get(step.id.as_str()).copied().unwrap_or(0),
            );
        }
    }
    let arrays = tasks.columns(
        columns >= TaskColumns::InboundCounts,
        grows_plan,
        columns >= TaskColumns::JoinCounts,
    );
    // Arrays, one per column, not a JSON document: thousands of steps are
    // neither written out as JSON nor parsed back. $1 and $2 are the goals'
    // ids and inputs, each input passed once for the roots that start with it
    // (`goal_input`), not copied per root: joined by id (a subquery reading
    // each from `goals` made a bulk submit_plan half as slow again), or, for
    // one goal, as every submit_plan call, taken as it is, with no join to
    // start.
    let stored: Vec<&str> = arrays
        .iter()
        .map(|column| column.name)
        .filter(|name| !matches!(*name, "goal_input" | "input"))
        .collect();
    let (goal_input, joined) = if goals.len() == 1 {
        ("($2::jsonb[])[1]", "")
    } else {
        (
            "g.input",
            " LEFT JOIN unnest($1::bigint[], $2::jsonb[]) AS g(id, input) ON t.goal_input AND g.id = t.goal_id",
        )
    };
    let parameters = arrays
        .iter()
        .enumerate()
        .map(|(index, column)| format!("${}::{}[]", index + 3, column.sql_type));
    // One row (a 1-step plan for one goal) read by subscript: the executor's
    // start of `unnest` over a dozen arrays costs more than the row (the
    // statement alone, EXPLAIN ANALYZE of 194 in a row, three rounds: median
    // 122–129 µs with unnest, 88–106 with subscripts).
    let rows = if goals.len() * plan.steps.len() == 1 {
        let first: Vec<String> = parameters.map(|array| format!("({array})[1]")).collect();
        format!("(SELECT {})", first.join(", "))
    } else {
        format!("unnest({})", parameters.collect::<Vec<_>>().join(", "))
    };
    let insert_tasks = format!(
        "INSERT INTO synapse.tasks (input, {listed})
         SELECT CASE WHEN t.goal_input THEN {goal_input} ELSE t.input END, {selected}
           FROM {rows} AS t({all}){joined}",
        listed = stored.join(", "),
        selected = stored
            .iter()
            .map(|name| format!("t.{name}"))
            .collect::<Vec<_>>()
            .join(", "),
        all = arrays
            .iter()
            .map(|column| column.name)
            .collect::<Vec<_>>()
            .join(", "),
    );
    let mut argument_types = vec![
        oid(PgBuiltInOids::INT8ARRAYOID),
        oid(PgBuiltInOids::JSONBARRAYOID),
    ];
    argument_types.extend(arrays.iter().map(|column| oid(column.array)));
    let goal_ids: Vec<i64> = goals.iter().map(|installing| installing.goal.id).collect();
    let goal_inputs: Vec<JsonB> = goals
        .iter()
        .map(|installing| JsonB(installing.goal.input.clone()))
        .collect();
    Spi::connect_mut(|client| {
        let insert = prepared(client, &insert_tasks, &argument_types)?;
        let mut arguments = vec![goal_ids.into(), goal_inputs.into()];
        arguments.extend(arrays.into_iter().map(|column| column.values));
        client.update(&*insert, None, &arguments).map(drop)
    })?;
    pgrx::check_for_interrupts!();
    if !plan.edges.is_empty() {
        insert_edges(plan, &goals)?;
    }
    for Installing { goal, roots } in goals {
        let step_task = |index: usize| {
            Spi::get_one_with_args::<i64>(
                "SELECT id FROM synapse.tasks WHERE goal_id = $1 AND step = $2 AND map_index IS NULL",
                &[goal.id.into(), plan.steps[index].id.as_str().into()],
            )?
            .ok_or_else(|| Error::InvalidParameter("a root step was not installed".into()))
        };
        for (index, start) in roots {
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
    }
    Ok(())
}

/// The edges of `plan`, for each of `goals`, in one statement. Arrays, not a
/// JSON document: thousands of edges are neither written out as JSON nor
/// parsed back.
fn insert_edges(plan: &Blueprint, goals: &[Installing]) -> Result<()> {
    let count = plan.edges.len();
    let mut positions = Vec::with_capacity(count);
    let (mut from, mut to, mut when, mut on) = (
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
        Vec::with_capacity(count),
    );
    for (index, edge) in plan.edges.iter().enumerate() {
        positions.push(i32::try_from(index + 1).unwrap_or(i32::MAX));
        from.push(edge.from.as_str());
        to.push(edge.to.as_str());
        when.push(edge.when.as_deref());
        on.push(edge.on.to_column());
    }
    let goal_ids: Vec<i64> = goals.iter().map(|installing| installing.goal.id).collect();
    Spi::connect_mut(|client| {
        let insert = prepared(
            client,
            "INSERT INTO synapse.edges (goal_id, position, from_step, to_step, when_expr, on_outcome)
             SELECT g.id, e.position, e.from_step, e.to_step, e.when_expr, e.on_outcome
               FROM unnest($1::bigint[]) AS g(id)
              CROSS JOIN unnest($2::integer[], $3::text[], $4::text[], $5::text[], $6::text[])
                    AS e(position, from_step, to_step, when_expr, on_outcome)",
            &[
                oid(PgBuiltInOids::INT8ARRAYOID),
                oid(PgBuiltInOids::INT4ARRAYOID),
                oid(PgBuiltInOids::TEXTARRAYOID),
                oid(PgBuiltInOids::TEXTARRAYOID),
                oid(PgBuiltInOids::TEXTARRAYOID),
                oid(PgBuiltInOids::TEXTARRAYOID),
            ],
        )?;
        client
            .update(
                &*insert,
                None,
                &[
                    goal_ids.into(),
                    positions.into(),
                    from.into(),
                    to.into(),
                    when.into(),
                    on.into(),
                ],
            )
            .map(drop)
    })?;
    Ok(())
}

/// The tasks of a plan, one array per column of `synapse.tasks`.
#[derive(Default)]
struct TaskArrays<'p> {
    goal_input: Vec<bool>,
    input: Vec<Option<JsonB>>,
    goal_id: Vec<i64>,
    step: Vec<&'p str>,
    action: Vec<&'p str>,
    params: Vec<Option<JsonB>>,
    input_expr: Vec<Option<&'p str>>,
    queue: Vec<&'p str>,
    join_mode: Vec<String>,
    max_attempts: Vec<i32>,
    backoff_ms: Vec<i64>,
    timeout_ms: Vec<i64>,
    status: Vec<&'static str>,
    pending_inbound: Vec<i32>,
    cancel_others: Vec<bool>,
    for_each_expr: Vec<Option<&'p str>>,
    max_parallel: Vec<Option<i32>>,
    tolerate: Vec<i32>,
    until_expr: Vec<Option<&'p str>>,
    max_iterations: Vec<Option<i32>>,
    iteration: Vec<Option<i32>>,
}

/// JSON null is stored as SQL NULL.
fn stored_json(value: &Value) -> Option<JsonB> {
    (!value.is_null()).then(|| JsonB(value.clone()))
}

fn column_int(value: impl TryInto<i32>) -> i32 {
    value.try_into().unwrap_or(i32::MAX)
}

fn column_millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl<'p> TaskArrays<'p> {
    fn push(
        &mut self,
        goal_id: i64,
        step: &'p blueprint::Step,
        input: Option<&Value>,
        goal_input: bool,
        status: &'static str,
        pending_inbound: usize,
    ) {
        self.goal_input.push(goal_input);
        self.input.push(input.and_then(stored_json));
        self.goal_id.push(goal_id);
        self.step.push(&step.id);
        self.action.push(&step.action);
        self.params.push(stored_json(&step.params));
        self.input_expr.push(step.input.as_deref());
        self.queue.push(&step.queue);
        self.join_mode.push(step.join.to_column());
        self.max_attempts
            .push(column_int(step.retries.saturating_add(1)));
        self.backoff_ms.push(column_millis(step.backoff));
        self.timeout_ms.push(column_millis(step.timeout));
        self.status.push(status);
        self.pending_inbound.push(column_int(pending_inbound));
        self.cancel_others.push(step.cancel_others);
        self.for_each_expr.push(step.for_each.as_deref());
        self.max_parallel.push(step.max_parallel.map(column_int));
        self.tolerate.push(column_int(step.tolerate));
        self.until_expr.push(step.until.as_deref());
        self.max_iterations.push(step.until.as_ref().map(|_| {
            column_int(
                step.max_iterations
                    .unwrap_or(blueprint::DEFAULT_MAX_ITERATIONS),
            )
        }));
        self.iteration.push(step.until.as_ref().map(|_| 1));
    }

    /// The arrays as `unnest` reads them, `goal_input` and `input` first.
    /// The inbound counts, the columns of plans that grow and the join
    /// counts only when asked (see [`TaskColumns`]).
    fn columns(self, with_counts: bool, with_growth: bool, with_join_counts: bool) -> Vec<Column> {
        const BOOLS: PgBuiltInOids = PgBuiltInOids::BOOLARRAYOID;
        const INTS: PgBuiltInOids = PgBuiltInOids::INT4ARRAYOID;
        const BIGINTS: PgBuiltInOids = PgBuiltInOids::INT8ARRAYOID;
        const JSONBS: PgBuiltInOids = PgBuiltInOids::JSONBARRAYOID;
        const TEXTS: PgBuiltInOids = PgBuiltInOids::TEXTARRAYOID;
        let mut columns = Vec::new();
        let mut add = |name, sql_type, array, values: DatumWithOid<'static>| {
            columns.push(Column {
                name,
                sql_type,
                array,
                values,
            });
        };
        add("goal_input", "boolean", BOOLS, self.goal_input.into());
        add("input", "jsonb", JSONBS, self.input.into());
        add("goal_id", "bigint", BIGINTS, self.goal_id.into());
        add("step", "text", TEXTS, self.step.into());
        add("action", "text", TEXTS, self.action.into());
        add("params", "jsonb", JSONBS, self.params.into());
        add("input_expr", "text", TEXTS, self.input_expr.into());
        add("queue", "text", TEXTS, self.queue.into());
        add("join_mode", "text", TEXTS, self.join_mode.into());
        add("max_attempts", "integer", INTS, self.max_attempts.into());
        add("backoff_ms", "bigint", BIGINTS, self.backoff_ms.into());
        add("timeout_ms", "bigint", BIGINTS, self.timeout_ms.into());
        add("status", "text", TEXTS, self.status.into());
        if with_join_counts {
            // Before any resolves, every inbound edge is pending.
            add(
                "inbound",
                "integer",
                INTS,
                self.pending_inbound.clone().into(),
            );
        }
        if with_counts {
            add(
                "pending_inbound",
                "integer",
                INTS,
                self.pending_inbound.into(),
            );
        }
        if with_growth {
            add("cancel_others", "boolean", BOOLS, self.cancel_others.into());
            add("for_each_expr", "text", TEXTS, self.for_each_expr.into());
            add("max_parallel", "integer", INTS, self.max_parallel.into());
            add("tolerate", "integer", INTS, self.tolerate.into());
            add("until_expr", "text", TEXTS, self.until_expr.into());
            add(
                "max_iterations",
                "integer",
                INTS,
                self.max_iterations.into(),
            );
            add("iteration", "integer", INTS, self.iteration.into());
        }
        columns
    }
}

/// One array of [`TaskArrays::columns`].
struct Column {
    name: &'static str,
    /// Its element type, as SQL spells it.
    sql_type: &'static str,
    array: PgBuiltInOids,
    values: DatumWithOid<'static>,
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
    /// 0.10.0: `inbound` and `taken_inbound`.
    JoinCounts,
}

/// Whether goals have owners (0.5.0): until `ALTER EXTENSION synapse
/// UPDATE`, idempotency keys stay global, as the release installed has them.
fn goals_have_owners() -> bool {
    has_column(c"goals", c"owner")
}

/// Which columns `synapse.tasks` has; syscache lookups only.
fn task_columns() -> TaskColumns {
    let has = |column: &std::ffi::CStr| has_column(c"tasks", column);
    if has(c"inbound") {
        TaskColumns::JoinCounts
    } else if has(c"for_each_expr") {
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
        Ok(plan) => match root_starts(&plan, &goal, &mut RootInputs::new()) {
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
            install(&plan, vec![Installing { goal, roots }])?;
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

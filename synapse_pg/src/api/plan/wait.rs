//! Starting wait steps (SPEC §4.9): when a `wait` step would run it is not
//! queued; it goes `pending → waiting` with its deadline in `run_at` (the
//! forwarder's timers end it then), and a signal kept for it is taken at
//! once. Root waits start when their plan is installed; the others when the
//! engine decides them (`synapse._start_waits`). The caller holds the goal's
//! lock, as `synapse.signal` takes it: a signal and a wait never miss each
//! other.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use crate::error::Result;
use synapse_worker::blueprint::cel;
use synapse_worker::blueprint::wait::Wait;

/// How a wait step came out of starting.
pub(super) enum Started {
    /// It waits.
    Waiting,
    /// A signal kept for it was taken at once: succeeded with this result.
    Succeeded(Value),
    /// Its `params.until` could not be evaluated (a definition error).
    Failed(String),
}

/// Starts pending wait step `task_id` of goal `goal` (`{id, goal, input,
/// params}`) with its evaluated `input`.
pub(super) fn start(task_id: i64, goal: &Value, input: Value) -> Result<Started> {
    let Some((goal_id, step, params)) = pending_wait(task_id)? else {
        return Ok(Started::Waiting);
    };
    let wait = match Wait::from_params(&params) {
        Ok(wait) => wait,
        // Validated at install; a row written otherwise fails alone.
        Err((key, message)) => {
            return fail(task_id, &format!("params.{key} of step {step}: {message}"))
        }
    };
    let (seconds, until, signal) = match &wait {
        Wait::Signal { name, timeout, .. } => {
            (timeout.map(|d| d.as_secs_f64()), None, Some(name.as_str()))
        }
        Wait::For(duration) => (Some(duration.as_secs_f64()), None, None),
        Wait::Until(source) => match until_time(goal_id, goal, &input, source) {
            Ok(time) => (None, Some(time), None),
            Err(message) => {
                let error = format!(
                    "cannot evaluate the params.until \"{source}\" of step {step}: {message}"
                );
                return fail(task_id, &error);
            }
        },
    };
    Spi::run_with_args(
        "UPDATE synapse.tasks
            SET status = 'waiting', input = $2,
                -- From now, not from the transaction's start: a sql step's
                -- successors start in the transaction that ran its query.
                run_at = coalesce(statement_timestamp() + $3 * interval '1 second', $4::timestamptz)
          WHERE id = $1 AND status = 'pending'",
        &[
            task_id.into(),
            JsonB(input).into(),
            seconds.into(),
            until.into(),
        ],
    )?;
    let Some(name) = signal else {
        return Ok(Started::Waiting);
    };
    let kept = Spi::get_one_with_args::<i64>(
        "SELECT id FROM synapse.signals WHERE goal_id = $1 AND name = $2 AND taken_by IS NULL
          ORDER BY id LIMIT 1 FOR UPDATE",
        &[goal_id.into(), name.into()],
    )
    .or_else(none_if_no_row)?;
    let Some(signal_id) = kept else {
        return Ok(Started::Waiting);
    };
    let taken = Spi::get_one_with_args::<bool>(
        "SELECT synapse._take_signal($1, $2)",
        &[task_id.into(), signal_id.into()],
    )?
    .unwrap_or(false);
    if !taken {
        return Ok(Started::Waiting);
    }
    let result = Spi::get_one_with_args::<JsonB>(
        "SELECT result FROM synapse.tasks WHERE id = $1",
        &[task_id.into()],
    )?
    .map_or(Value::Null, |JsonB(result)| result);
    Ok(Started::Succeeded(result))
}

fn none_if_no_row<T>(error: pgrx::spi::Error) -> std::result::Result<Option<T>, pgrx::spi::Error> {
    match error {
        pgrx::spi::Error::InvalidPosition => Ok(None),
        other => Err(other),
    }
}

/// A root wait step's `params.until` that cannot be evaluated at install, as
/// a problem of the blueprint (as a root's input is).
pub(super) fn until_problem(
    index: usize,
    step: &synapse_worker::blueprint::Step,
    goal: &Value,
    input: &Value,
) -> Option<synapse_worker::blueprint::Problem> {
    let Ok(Wait::Until(source)) = Wait::from_params(&step.params) else {
        return None;
    };
    let goal_id = goal.get("id").and_then(Value::as_i64).unwrap_or_default();
    let message = until_time(goal_id, goal, input, &source).err()?;
    Some(synapse_worker::blueprint::Problem {
        path: format!("$.steps[{index}].params.until"),
        message: format!(
            "cannot evaluate the params.until of root step \"{}\": {message}",
            step.id
        ),
    })
}

/// `params.until` evaluated over `goal`, `steps` and `input`: an RFC 3339
/// time, as Postgres reads it.
fn until_time(
    goal_id: i64,
    goal: &Value,
    input: &Value,
    source: &str,
) -> std::result::Result<String, String> {
    let mut vars = Map::new();
    vars.insert("goal".into(), goal.clone());
    let steps = if cel::reads(source, "steps") {
        super::steps_variable(goal_id).map_err(|error| error.to_string())??
    } else {
        Value::Object(Map::new())
    };
    vars.insert("steps".into(), steps);
    vars.insert("input".into(), input.clone());
    let value = cel::compile(source).and_then(|expression| expression.evaluate(&vars))?;
    let Value::String(text) = value else {
        return Err(format!(
            "gave {}, not an RFC 3339 time",
            synapse_worker::blueprint::json_kind(&value)
        ));
    };
    // Strict RFC 3339 (Postgres alone would also take 'tomorrow' or a date
    // without an offset).
    text.parse::<jiff::Timestamp>()
        .map_err(|error| format!("gave \"{text}\", not an RFC 3339 time ({error})"))?;
    Ok(text)
}

/// Fails pending wait step `task_id`: a definition error, which takes only
/// `always` edges.
fn fail(task_id: i64, error: &str) -> Result<Started> {
    Spi::run_with_args(
        "UPDATE synapse.tasks SET status = 'failed', error = $2, failure_kind = 'definition'
          WHERE id = $1 AND status = 'pending'",
        &[task_id.into(), error.into()],
    )?;
    Ok(Started::Failed(error.to_owned()))
}

/// The goal, step and params of `task_id` if it is a pending wait step.
fn pending_wait(task_id: i64) -> Result<Option<(i64, String, Value)>> {
    Ok(Spi::connect(|client| {
        let row = client.select(
            "SELECT goal_id, step, params FROM synapse.tasks
              WHERE id = $1 AND status = 'pending' AND action = 'wait'",
            Some(1),
            &[task_id.into()],
        )?;
        let Some(row) = row.into_iter().next() else {
            return Ok::<_, pgrx::spi::Error>(None);
        };
        Ok(Some((
            row.get::<i64>(1)?.unwrap_or_default(),
            row.get::<String>(2)?.unwrap_or_default(),
            row.get::<JsonB>(3)?
                .map_or(Value::Null, |JsonB(params)| params),
        )))
    })?)
}

/// Starts the wait steps the engine decided to run, with their evaluated
/// inputs (`[[task_id, input], …]`); the caller holds their goals' locks.
/// Each answers the status it took (`waiting`; `succeeded` when a kept
/// signal was taken, with the result; `failed` when `params.until` could not
/// be evaluated, with the error). Tasks that are not pending wait steps
/// answer `waiting` and are left alone.
// pgrx reads the columns from the signature itself: no type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(name = "_start_waits")]
fn start_waits(
    waits: JsonB,
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(task_id, i64),
            name!(status, String),
            name!(result, Option<JsonB>),
            name!(error, Option<String>),
        ),
    >,
    pgrx::pg_sys::panic::ErrorReport,
> {
    let JsonB(Value::Array(waits)) = waits else {
        return Err(crate::error::Error::InvalidParameter(
            "waits must be a JSON array of [task_id, input]".into(),
        )
        .into());
    };
    let mut started = Vec::with_capacity(waits.len());
    for wait in waits {
        pgrx::check_for_interrupts!();
        let (Some(task_id), input) = (wait.get(0).and_then(Value::as_i64), wait.get(1)) else {
            continue;
        };
        let goal = goal_of(task_id)?;
        let row = match start(task_id, &goal, input.cloned().unwrap_or(Value::Null))? {
            Started::Waiting => (task_id, "waiting".to_owned(), None, None),
            Started::Succeeded(result) => {
                (task_id, "succeeded".to_owned(), Some(JsonB(result)), None)
            }
            Started::Failed(error) => (task_id, "failed".to_owned(), None, Some(error)),
        };
        started.push(row);
    }
    Ok(TableIterator::new(started))
}

/// `goal` as expressions see it, for the goal of `task_id`.
fn goal_of(task_id: i64) -> Result<Value> {
    Ok(Spi::get_one_with_args::<JsonB>(
        "SELECT jsonb_build_object('id', g.id, 'goal', g.goal, 'input', g.input, 'params', g.params)
           FROM synapse.goals g WHERE g.id = (SELECT t.goal_id FROM synapse.tasks t WHERE t.id = $1)",
        &[task_id.into()],
    )
    .or_else(none_if_no_row)?
    .map_or(Value::Null, |JsonB(goal)| goal))
}

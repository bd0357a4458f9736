//! Starting map steps (SPEC §4.6): when a step with `for_each` would run, its
//! list is evaluated and the step becomes one instance per item (task rows
//! with `map_index`), the first `max_parallel` of them queued. The step itself
//! waits (`waiting`, no worker) until the worker's engine has seen every
//! instance end. Root maps start when their plan is installed; the others
//! when the engine decides them (`synapse._start_maps`).
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{Map, Value};

use super::INTERRUPT_EVERY;
use crate::error::{Error, Result};
use crate::prepared::{oid, prepared};
use synapse_worker::blueprint::{cel, limits, MAX_MAP_ITEMS};
use synapse_worker::stored::json_array_runs;

/// A map step's list and the input of each of its instances.
pub(super) struct Expansion {
    /// The `for_each` items.
    items: Vec<Value>,
    /// Each instance's input, when the step has an `input` expression (else
    /// the input is the item).
    inputs: Option<Vec<Value>>,
}

/// Evaluates `for_each` over `vars` (`goal`, `steps`), then each instance's
/// input with `item` and `index` added; an error says which expression and
/// which item could not be evaluated.
pub(super) fn expand(
    step: &str,
    for_each: &str,
    input_expr: Option<&str>,
    vars: &Map<String, Value>,
) -> std::result::Result<Expansion, String> {
    let list = cel::compile(for_each)
        .and_then(|expression| expression.evaluate(vars))
        .map_err(|message| {
            format!("cannot evaluate the for_each \"{for_each}\" of step {step}: {message}")
        })?;
    let Value::Array(items) = list else {
        return Err(format!(
            "the for_each \"{for_each}\" of step {step} gave {}, not a list",
            synapse_worker::blueprint::json_kind(&list)
        ));
    };
    if items.len() > MAX_MAP_ITEMS {
        return Err(format!(
            "the for_each \"{for_each}\" of step {step} gave {} items; the limit is {MAX_MAP_ITEMS}",
            items.len()
        ));
    }
    let inputs = match input_expr {
        None => None,
        Some(source) => {
            let expression = cel::compile(source).map_err(|message| {
                format!("cannot evaluate the input \"{source}\" of step {step}: {message}")
            })?;
            let mut instance_vars = vars.clone();
            let mut inputs = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                if index.is_multiple_of(INTERRUPT_EVERY) {
                    pgrx::check_for_interrupts!();
                }
                instance_vars.insert("item".into(), item.clone());
                instance_vars.insert("index".into(), Value::from(index));
                let input = expression.evaluate(&instance_vars).map_err(|message| {
                    format!(
                        "cannot evaluate the input \"{source}\" of step {step} for item {index}: {message}"
                    )
                })?;
                inputs.push(input);
            }
            Some(inputs)
        }
    };
    for (index, input) in inputs.as_ref().unwrap_or(&items).iter().enumerate() {
        limits::check_json(
            &format!("the input of instance {index} of step {step}"),
            input,
        )?;
    }
    Ok(Expansion { items, inputs })
}

/// Starts map step `task_id` (pending) with its evaluated list: `waiting`
/// with its instances written, or `succeeded` with `[]` at once for an empty
/// list. Returns the status it took.
pub(super) fn start(task_id: i64, expansion: Expansion) -> Result<&'static str> {
    if expansion.items.is_empty() {
        Spi::run_with_args(
            "UPDATE synapse.tasks SET status = 'succeeded', result = '[]', map_size = 0, map_next = 0,
                    map_ended = 0, map_failed = 0
              WHERE id = $1 AND status = 'pending'",
            &[task_id.into()],
        )?;
        return Ok("succeeded");
    }
    let size = expansion.items.len() as i32;
    let (inputs, items) = match expansion.inputs {
        Some(inputs) => (inputs, Some(expansion.items)),
        None => (expansion.items, None),
    };
    Spi::connect_mut(|client| {
        // Its goal held until the transaction ends, so that it is not deleted
        // while the instances go in: the check a foreign key made for every
        // row inserted, once (schema.sql says why tasks have no key).
        let hold = prepared(
            client,
            "SELECT g.id FROM synapse.goals g
              WHERE g.id = (SELECT t.goal_id FROM synapse.tasks t WHERE t.id = $1) FOR KEY SHARE OF g",
            &[oid(PgBuiltInOids::INT8OID)],
        )?;
        if client.update(&*hold, None, &[task_id.into()])?.is_empty() {
            return Err(Error::InvalidParameter(format!(
                "map step {task_id} has no goal"
            )));
        }
        // The map row first: the instances copy its configuration.
        let started = prepared(
            client,
            "UPDATE synapse.tasks SET status = 'waiting', map_size = $2, map_ended = 0, map_failed = 0,
                    map_next = least($2, coalesce(max_parallel, $2))
              WHERE id = $1 AND status = 'pending'",
            &[oid(PgBuiltInOids::INT8OID), oid(PgBuiltInOids::INT4OID)],
        )?;
        client.update(&*started, None, &[task_id.into(), size.into()])?;
        // The instances from index $4 on, `inputs` ($2) and `items` ($3) as
        // JSON arrays' text, in runs of about RUN_BYTES: never one array
        // past what one jsonb value holds.
        let instances = prepared(
            client,
            "INSERT INTO synapse.tasks (goal_id, step, action, params, input, queue, max_attempts, backoff_ms,
                                        timeout_ms, status, map_index, map_item)
             SELECT m.goal_id, m.step, m.action, m.params, i.input, m.queue, m.max_attempts, m.backoff_ms,
                    m.timeout_ms, CASE WHEN i.n + $4 <= m.map_next THEN 'queued' ELSE 'pending' END,
                    (i.n - 1 + $4)::integer, i.item
               FROM synapse.tasks m,
                    ROWS FROM (jsonb_array_elements($2::jsonb), jsonb_array_elements($3::jsonb))
                      WITH ORDINALITY AS i(input, item, n)
              WHERE m.id = $1
              ORDER BY i.n",
            &[
                oid(PgBuiltInOids::INT8OID),
                oid(PgBuiltInOids::TEXTOID),
                oid(PgBuiltInOids::TEXTOID),
                oid(PgBuiltInOids::INT4OID),
            ],
        )?;
        let columns: Vec<&[Value]> = match &items {
            Some(items) => vec![&inputs, items],
            None => vec![&inputs],
        };
        let mut first = 0;
        for run in json_array_runs(&columns) {
            let mut arrays = run.arrays.into_iter();
            client.update(
                &*instances,
                None,
                &[
                    task_id.into(),
                    arrays.next().into(),
                    arrays.next().into(),
                    (first as i32).into(),
                ],
            )?;
            first += run.rows;
        }
        Ok::<_, Error>(())
    })?;
    Ok("waiting")
}

/// Fails map step `task_id` (pending) whose list or inputs could not be
/// evaluated: a definition error, which takes only `always` edges.
fn fail(task_id: i64, error: &str) -> Result<()> {
    Spi::run_with_args(
        "UPDATE synapse.tasks SET status = 'failed', error = $2, failure_kind = 'definition'
          WHERE id = $1 AND status = 'pending'",
        &[task_id.into(), error.into()],
    )?;
    Ok(())
}

/// Starts the map steps `task_ids` that the engine decided to run (the caller
/// holds their goals' locks): each answers the status it took (`waiting`,
/// `succeeded` for an empty list, `failed` when its list or an input could
/// not be evaluated) and the error. Tasks that are not pending map steps are
/// left out.
#[pg_extern(name = "_start_maps")]
fn start_maps(
    task_ids: Vec<i64>,
) -> std::result::Result<
    TableIterator<
        'static,
        (
            name!(task_id, i64),
            name!(status, String),
            name!(error, Option<String>),
        ),
    >,
    pgrx::pg_sys::panic::ErrorReport,
> {
    let mut started = Vec::with_capacity(task_ids.len());
    for task_id in task_ids {
        pgrx::check_for_interrupts!();
        let Some(map) = pending_map(task_id)? else {
            continue;
        };
        let expansion = map
            .variables()?
            .and_then(|vars| expand(&map.step, &map.for_each, map.input_expr.as_deref(), &vars));
        match expansion {
            Ok(expansion) => started.push((task_id, start(task_id, expansion)?.to_owned(), None)),
            Err(error) => {
                fail(task_id, &error)?;
                started.push((task_id, "failed".to_owned(), Some(error)));
            }
        }
    }
    Ok(TableIterator::new(started))
}

/// A map step about to start, with what its expressions see.
struct PendingMap {
    goal_id: i64,
    step: String,
    for_each: String,
    input_expr: Option<String>,
    goal: Value,
}

impl PendingMap {
    /// `goal`, and `steps` when an expression reads it; an error when they
    /// cannot be one value.
    fn variables(&self) -> Result<std::result::Result<Map<String, Value>, String>> {
        let mut vars = Map::new();
        vars.insert("goal".into(), self.goal.clone());
        let reads_steps = cel::reads(&self.for_each, "steps")
            || self
                .input_expr
                .as_deref()
                .is_some_and(|source| cel::reads(source, "steps"));
        let steps = match reads_steps {
            true => super::steps_variable(self.goal_id)?,
            false => Ok(Value::Object(Map::new())),
        };
        Ok(steps
            .map(|steps| {
                vars.insert("steps".into(), steps);
                vars
            })
            .map_err(|message| {
                format!(
                    "cannot evaluate the expressions of step {}: {message}",
                    self.step
                )
            }))
    }
}

fn pending_map(task_id: i64) -> Result<Option<PendingMap>> {
    Ok(Spi::connect(|client| {
        let row = client.select(
            "SELECT t.goal_id, t.step, t.for_each_expr, t.input_expr,
                    (SELECT jsonb_build_object('id', g.id, 'goal', g.goal, 'input', g.input, 'params', g.params)
                       FROM synapse.goals g WHERE g.id = t.goal_id)
               FROM synapse.tasks t
              WHERE t.id = $1 AND t.status = 'pending' AND t.for_each_expr IS NOT NULL",
            Some(1),
            &[task_id.into()],
        )?;
        let Some(row) = row.into_iter().next() else {
            return Ok::<_, pgrx::spi::Error>(None);
        };
        Ok(Some(PendingMap {
            goal_id: row.get::<i64>(1)?.unwrap_or_default(),
            step: row.get::<String>(2)?.unwrap_or_default(),
            for_each: row.get::<String>(3)?.unwrap_or_default(),
            input_expr: row.get::<String>(4)?,
            goal: row.get::<JsonB>(5)?.map_or(Value::Null, |JsonB(goal)| goal),
        }))
    })?)
}

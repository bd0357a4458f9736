//! Claiming tasks for a worker, keeping their leases, giving them back.
use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde_json::{Map, Value};
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::Row;
use tracing::warn;

use super::by_id::ids;
use super::input::{given_by_id, GivenById, TaskInput};
use super::{column, data_message, millis, Result};
use crate::stored::Steps;

/// A task this worker claimed.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    /// Task id.
    pub id: i64,
    /// Goal id.
    pub goal_id: i64,
    /// Step id.
    pub step: String,
    /// Action name.
    pub action: String,
    /// Action params.
    pub params: Value,
    /// Evaluated input.
    pub input: Value,
    /// `goal` for its parameter expressions: null unless one of them mentions it.
    pub goal: Value,
    /// `steps` for its parameter expressions: null unless one of them mentions it.
    pub steps: Value,
    /// This attempt's number: the fencing token for every later write.
    pub attempt: i32,
    /// Identity of the worker that claimed it (kept with a failed attempt).
    pub worker: String,
    /// retries + 1.
    pub max_attempts: i32,
    /// Base backoff.
    pub backoff: Duration,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Error left by the previous attempt (e.g. its lease expired).
    pub previous_error: Option<String>,
    /// How long it waited between being queued and this claim.
    pub queue_wait: Duration,
    /// Why its `params` or `input` could not be read (`params` and `input`
    /// are then null): the attempt fails with this error, unrun.
    pub unreadable: Option<String>,
    /// Set when its expressions mention `steps` and they cannot be one value
    /// (`steps` is then null): their size in bytes. An expression that reads
    /// `steps` then fails the attempt (see `ActionContext::expression`).
    pub steps_oversized: Option<i64>,
    /// Instance of a map step: its index.
    pub map_index: Option<i32>,
    /// What its expressions see besides `goal`, `steps` and `input`: `item`
    /// and `index` in a map instance, `previous` and `iteration` in a loop.
    pub extras: Map<String, Value>,
    /// A looping step: when it runs again.
    pub looping: Option<Looping>,
    /// Attempts spent by earlier iterations of a loop: this iteration's
    /// attempt is `attempt - attempts_before`.
    pub attempts_before: i32,
    /// A root step (no inbound edge): its end may be its goal's last.
    pub root: bool,
}

/// A step that runs again until `until` holds (§4.8).
#[derive(Debug, Clone)]
pub struct Looping {
    /// CEL over `result` (and what the step's expressions see).
    pub until: String,
    /// The step's `input` expression, evaluated again for the next iteration.
    pub input_expr: Option<String>,
    /// This run, 1 for the first.
    pub iteration: i32,
    /// Most runs.
    pub max_iterations: i32,
}

impl ClaimedTask {
    /// This attempt's number within its iteration (a step that does not loop
    /// has one iteration): what `retries` counts.
    pub fn attempt_in_iteration(&self) -> i32 {
        self.attempt - self.attempts_before
    }
}

/// Claims the queued tasks among `task_ids` in one statement: `queued →
/// running`, attempt + 1, with a lease. Ids that are not queued (a duplicate
/// message, a cancelled goal) are left out of the answer, and so are tasks
/// another transaction has locked (a cancel, a timer, another claim): a claim
/// never waits, and the skipped task is cancelled anyway or dispatched again
/// by the sweep. A task whose row cannot be read comes back with
/// [`ClaimedTask::unreadable`] set, so that it fails alone. Only tasks of
/// `queues` are claimed: a message pushed onto the wrong list (whoever may
/// write to Redis) never runs a task on a worker not meant for its queue.
pub async fn claim_tasks(
    client: &impl GenericClient,
    claim: &Claim<'_>,
) -> Result<Vec<ClaimedTask>> {
    let statement = client.prepare_cached(CLAIM_TASKS).await?;
    let arguments = ClaimArguments::of(claim);
    let rows = client.query(&statement, &arguments.parameters()).await?;
    Ok(claimed_tasks(&rows, claim.worker))
}

/// A claim of tasks by id, for a worker.
pub struct Claim<'a> {
    /// The tasks to claim, if queued.
    pub task_ids: &'a [i64],
    /// Tasks still pending, (id, input), that the claim queues and claims
    /// in one write (local continuation): a step its transaction decided
    /// to run, which no other worker could have been told of yet.
    pub pending: &'a [(i64, TaskInput)],
    /// Only tasks of these queues are claimed.
    pub queues: &'a [&'a str],
    /// How long the claim holds them.
    pub lease: Duration,
    /// Who claims them (`leased_by`).
    pub worker: &'a str,
}

/// The parameters of [`CLAIM_TASKS`].
pub(super) struct ClaimArguments<'c> {
    claim: &'c Claim<'c>,
    lease_ms: f64,
    pending_ids: Vec<i64>,
    pending_inputs: Json<GivenById<'c>>,
}

impl<'c> ClaimArguments<'c> {
    pub(super) fn of(claim: &'c Claim<'c>) -> Self {
        ClaimArguments {
            claim,
            lease_ms: millis(claim.lease),
            pending_ids: ids(claim.pending),
            pending_inputs: given_by_id(claim.pending),
        }
    }

    pub(super) fn parameters(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.claim.task_ids,
            &self.lease_ms,
            &self.claim.worker,
            &self.claim.queues,
            &self.pending_ids,
            &self.pending_inputs,
        ]
    }
}

// Each table read by id or by key, joined to nothing (see by_id).
// `status || ''`: the rows are found by id, never by scanning the
// partial index of all queued tasks (see lock_goals_and_record).
// The pending tasks ($5, given inputs $6 by id) are not skipped when locked: left
// pending, nothing would ever queue them; the claim waits for them instead.
pub(super) const CLAIM_TASKS: &str = concat!("WITH c AS (
                 SELECT c.id FROM synapse.tasks c
                  WHERE c.id = ANY($1::bigint[]) AND c.status || '' = 'queued' AND c.queue = ANY($4::text[])
                  ORDER BY c.id
                    FOR NO KEY UPDATE OF c SKIP LOCKED),
             p AS (
                 SELECT c.id FROM synapse.tasks c
                  WHERE c.id = ANY($5::bigint[]) AND c.status = 'pending' AND c.queue = ANY($4::text[])
                  ORDER BY c.id
                    FOR NO KEY UPDATE OF c),
             claimed AS (
                 UPDATE synapse.tasks t
                    SET status = 'running', attempts = t.attempts + 1,
                        input = CASE WHEN t.status = 'pending' THEN ", given_or_parent_results!("$6"), " ELSE t.input END,
                        -- From now: a transaction that ran a sql step claims its
                        -- successors too, long after it began.
                        lease_expires_at = statement_timestamp() + $2 * interval '1 millisecond', leased_by = $3
                  WHERE t.id = ANY(ARRAY(SELECT id FROM c UNION ALL SELECT id FROM p))
              RETURNING t.id, t.goal_id, t.step, t.action, t.params, t.input, t.attempts, t.max_attempts,
                        t.backoff_ms, t.timeout_ms, t.error, t.queued_at, t.map_index, t.map_item, t.until_expr,
                        t.input_expr, t.iteration, t.max_iterations, t.attempts_before, t.result,
                        -- The expressions the worker evaluates: only those that
                        -- mention goal or steps pay for them.
                        concat(t.params ->> 'expr', ' ', t.params ->> 'args', ' ', t.until_expr, ' ',
                               CASE WHEN t.until_expr IS NOT NULL THEN t.input_expr END, ' ',
                               CASE WHEN t.action = 'goal' THEN concat(t.params ->> 'goal', ' ', t.params ->> 'blueprint') END)
                          AS expressions,
                        t.inbound = 0 AS root)
             SELECT c.id, c.goal_id, c.step, c.action, c.params, coalesce(c.input, 'null'::jsonb), c.attempts,
                    c.max_attempts, c.backoff_ms, c.timeout_ms, c.error,
                    greatest(extract(epoch FROM statement_timestamp() - c.queued_at), 0)::float8,
                    CASE WHEN c.expressions LIKE '%goal%'
                         THEN (SELECT jsonb_build_object('id', g.id, 'goal', g.goal, 'input', g.input, 'params', g.params)
                                 FROM synapse.goals g WHERE g.id = c.goal_id)
                         ELSE 'null'::jsonb END,
                    CASE WHEN c.expressions LIKE '%steps%' THEN (", steps_of_goal!("c.goal_id"), ") ELSE 'null'::jsonb END,
                    c.map_index, CASE WHEN c.map_index IS NOT NULL THEN coalesce(c.map_item, c.input) END,
                    c.until_expr, c.input_expr, c.iteration, c.max_iterations, c.attempts_before,
                    CASE WHEN c.iteration > 1 THEN c.result END, c.root
               FROM claimed c");

/// The tasks a claim's rows hold; a row whose identity cannot be read is
/// left out (its lease lapses and the timers deal with it).
pub(super) fn claimed_tasks(rows: &[Row], worker: &str) -> Vec<ClaimedTask> {
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        match claimed_task(row, worker) {
            Ok(task) => claimed.push(task),
            Err(error) => warn!(%error, "a claimed task cannot be read"),
        }
    }
    claimed
}

/// One claimed row. `params` and `input` are user data: when they cannot be
/// read, the task is still returned, marked [`ClaimedTask::unreadable`].
fn claimed_task(row: &Row, worker: &str) -> Result<ClaimedTask> {
    let mut unreadable = None;
    let mut user_json = |index: usize, name: &str| match column::<Value>(row, index) {
        Ok(value) => value,
        Err(error) => {
            unreadable.get_or_insert(format!(
                "cannot read the task's {name}: {}",
                data_message(error)
            ));
            Value::Null
        }
    };
    let params = user_json(4, "params");
    let input = user_json(5, "input");
    let goal = user_json(12, "goal");
    let (steps, steps_oversized) = match Steps::of(user_json(13, "steps")) {
        Steps::Map(steps) => (steps, None),
        Steps::Oversized(bytes) => (Value::Null, Some(bytes)),
    };
    let map_index: Option<i32> = column(row, 14)?;
    let mut extras = Map::new();
    if let Some(index) = map_index {
        extras.insert("item".into(), user_json(15, "item"));
        extras.insert("index".into(), Value::from(index));
    }
    let until: Option<String> = column(row, 16)?;
    let looping = match until {
        Some(until) => {
            let iteration: i32 = column::<Option<i32>>(row, 18)?.unwrap_or(1);
            extras.insert(
                "previous".into(),
                column::<Option<Value>>(row, 21)
                    .ok()
                    .flatten()
                    .unwrap_or(Value::Null),
            );
            extras.insert("iteration".into(), Value::from(iteration));
            Some(Looping {
                until,
                input_expr: column(row, 17)?,
                iteration,
                max_iterations: column::<Option<i32>>(row, 19)?.unwrap_or(1),
            })
        }
        None => None,
    };
    Ok(ClaimedTask {
        id: column(row, 0)?,
        goal_id: column(row, 1)?,
        step: column(row, 2)?,
        action: column(row, 3)?,
        params,
        input,
        goal,
        steps,
        attempt: column(row, 6)?,
        worker: worker.to_owned(),
        max_attempts: column(row, 7)?,
        backoff: Duration::from_millis(column::<i64>(row, 8)?.max(0) as u64),
        timeout: Duration::from_millis(column::<i64>(row, 9)?.max(0) as u64),
        previous_error: column(row, 10)?,
        queue_wait: Duration::from_secs_f64(
            column::<Option<f64>>(row, 11)?
                .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
                .unwrap_or(0.0),
        ),
        unreadable,
        steps_oversized,
        map_index,
        extras,
        looping,
        attempts_before: column(row, 20)?,
        root: column(row, 22)?,
    })
}

/// Extends the lease; `false` when this attempt no longer holds the task
/// (cancelled, or the lease expired and the task was re-queued). The same
/// statement notes that `worker` was seen (at most once a second).
pub async fn heartbeat(
    client: &impl GenericClient,
    task_id: i64,
    attempt: i32,
    lease: Duration,
    worker: &str,
) -> Result<bool> {
    // `status || ''`, as in every lookup of a running task by id: the plain
    // form lets a plan made while the tasks were few walk every running
    // task's entry in tasks_lease_due (dead ones included) instead of the
    // primary key.
    let statement = client
        .prepare_cached(
            "WITH seen AS (
                 UPDATE synapse.workers SET last_seen_at = now()
                  WHERE identity = $4 AND last_seen_at < now() - interval '1 second')
             UPDATE synapse.tasks SET lease_expires_at = now() + $3 * interval '1 millisecond'
              WHERE id = $1 AND status || '' = 'running' AND attempts = $2",
        )
        .await?;
    Ok(client
        .execute(&statement, &[&task_id, &attempt, &millis(lease), &worker])
        .await?
        == 1)
}

/// Gives a claimed task back unrun (shutdown): `running → queued`, and the
/// attempt does not count.
pub async fn release_task(client: &impl GenericClient, task_id: i64, attempt: i32) -> Result<bool> {
    // `status || ''`: see heartbeat.
    let statement = client
        .prepare_cached(
            "UPDATE synapse.tasks SET status = 'queued', attempts = attempts - 1
              WHERE id = $1 AND status || '' = 'running' AND attempts = $2",
        )
        .await?;
    Ok(client.execute(&statement, &[&task_id, &attempt]).await? == 1)
}

//! Every SQL statement the worker runs, in one place. Each state change is
//! conditional on the current state; the extension's triggers turn the
//! changes into events.
use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Transaction};
use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{IsolationLevel, Row};
use tracing::{debug, warn};

use crate::blueprint::{EdgeOn, Join};
use crate::engine::{goal_value, EndedStep, GoalVariables, Inbound, Outcome};

pub mod child;
pub mod map;
pub mod open;
pub mod wait;

/// A database failure, and whether retrying the transaction may help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres said no (or the connection broke).
    #[error("postgres: {}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("postgres pool: {}", crate::connection_error::describe("", .0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A row did not look as the schema promises.
    #[error("unexpected data: {0}")]
    Data(String),
    /// The worker is shutting down and records nothing more.
    #[error("the worker is stopping")]
    Stopped,
}

/// The server's message and SQLSTATE when there is one ("db error" alone says nothing).
fn describe(error: &tokio_postgres::Error) -> String {
    crate::connection_error::describe("", error)
}

impl StoreError {
    /// Postgres could not be reached at all (as opposed to refusing a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Postgres(error) => error.as_db_error().is_none(),
            StoreError::Pool(_) => true,
            StoreError::Data(_) | StoreError::Stopped => false,
        }
    }

    /// A statement this connection prepared before a column it returns
    /// changed type or collation (an extension update did it): Postgres
    /// refuses to run it again, so it must be prepared anew.
    pub fn is_stale_statement(&self) -> bool {
        let StoreError::Postgres(error) = self else {
            return false;
        };
        error.as_db_error().is_some_and(|db| {
            *db.code() == SqlState::FEATURE_NOT_SUPPORTED
                && db
                    .message()
                    .starts_with("cached plan must not change result type")
        })
    }

    /// Deadlocks and serialization failures: run the transaction again.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Postgres(error) => matches!(
                error.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED) | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            ),
            StoreError::Pool(_) => true,
            StoreError::Data(_) | StoreError::Stopped => false,
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// How often a transaction that deadlocked, failed to serialize or ran a
/// stale statement is tried.
const TRANSACTION_TRIES: u32 = 5;

/// Starts a READ COMMITTED transaction, whatever the database's
/// `default_transaction_isolation` or the session's settings. Every
/// transaction of the worker starts here: the engine's goal locks only work
/// if each statement after the lock sees what the previous holder committed
/// (a fresh snapshot per statement), and claims and heartbeats must not fail
/// to serialize against a concurrent completion or cancel.
pub async fn begin(client: &mut deadpool_postgres::Client) -> Result<Transaction<'_>> {
    Ok(client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await?)
}

/// What [`begin`] sends, for a transaction begun without tokio-postgres's
/// `Transaction` ([`open`]).
const START_READ_COMMITTED: &str = "START TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// Runs a transaction again when it deadlocked or failed to serialize, or
/// ran a statement prepared before the schema changed under it: then every
/// connection of `pool` forgets what it prepared (each would fail the same
/// way), and the statements are prepared again on their next use.
pub async fn with_retries<T, F, Fut>(pool: &deadpool_postgres::Pool, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Err(error) if error.is_transient() && tries < TRANSACTION_TRIES => {
                debug!(%error, tries, "transaction retried");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(tries))).await;
            }
            Err(error) if error.is_stale_statement() && tries < TRANSACTION_TRIES => {
                warn!(%error, "the schema changed under prepared statements: preparing them again");
                pool.manager().statement_caches.clear();
            }
            other => return other,
        }
    }
}

/// Column `index` of `row`, or a [`StoreError::Data`] saying why it cannot be
/// read (`Row::get` would panic, e.g. on JSON nested deeper than serde_json reads).
fn column<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T> {
    row.try_get(index).map_err(|error| {
        // The cause (e.g. "recursion limit exceeded") is not in the Display.
        let cause = std::error::Error::source(&error)
            .map(|cause| format!(": {cause}"))
            .unwrap_or_default();
        StoreError::Data(format!("{error}{cause}"))
    })
}

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
    pub pending: &'a [(i64, Value)],
    /// Only tasks of these queues are claimed.
    pub queues: &'a [&'a str],
    /// How long the claim holds them.
    pub lease: Duration,
    /// Who claims them (`leased_by`).
    pub worker: &'a str,
}

/// The parameters of [`CLAIM_TASKS`].
struct ClaimArguments<'c> {
    claim: &'c Claim<'c>,
    lease_ms: f64,
    pending_ids: Vec<i64>,
    pending_inputs: Vec<&'c Value>,
}

impl<'c> ClaimArguments<'c> {
    fn of(claim: &'c Claim<'c>) -> Self {
        let (pending_ids, pending_inputs) = queue_arguments(claim.pending);
        ClaimArguments {
            claim,
            lease_ms: millis(claim.lease),
            pending_ids,
            pending_inputs,
        }
    }

    fn parameters(&self) -> [&(dyn ToSql + Sync); 6] {
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

// `status || ''`: the rows are found by id, never by scanning the
// partial index of all queued tasks (see lock_goals_and_record).
// The pending tasks ($5, inputs $6) are not skipped when locked: left
// pending, nothing would ever queue them; the claim waits for them instead.
const CLAIM_TASKS: &str = "WITH c AS (
                 SELECT c.id, c.params, c.until_expr, c.input_expr, c.action, c.status FROM synapse.tasks c
                  WHERE c.id = ANY($1::bigint[]) AND c.status || '' = 'queued' AND c.queue = ANY($4::text[])
                  ORDER BY c.id
                    FOR NO KEY UPDATE OF c SKIP LOCKED),
             p AS (
                 SELECT c.id, c.params, c.until_expr, c.input_expr, c.action, c.status, p.input FROM synapse.tasks c
                   JOIN unnest($5::bigint[], $6::jsonb[]) AS p(id, input) ON c.id = p.id
                  WHERE c.status = 'pending' AND c.queue = ANY($4::text[])),
             m AS (
                 -- The expressions the worker evaluates: only those that mention
                 -- goal or steps pay for them.
                 SELECT c.id, c.status, c.input, concat(c.params ->> 'expr', ' ', c.params ->> 'args', ' ', c.until_expr, ' ',
                                     CASE WHEN c.until_expr IS NOT NULL THEN c.input_expr END, ' ',
                                     CASE WHEN c.action = 'goal' THEN concat(c.params ->> 'goal', ' ', c.params ->> 'blueprint') END)
                        AS expressions
                   FROM (SELECT *, NULL::jsonb AS input FROM c UNION ALL SELECT * FROM p) c)
             UPDATE synapse.tasks t
                SET status = 'running', attempts = t.attempts + 1,
                    input = CASE WHEN m.status = 'pending' THEN m.input ELSE t.input END,
                    -- From now: a transaction that ran a sql step claims its
                    -- successors too, long after it began.
                    lease_expires_at = statement_timestamp() + $2 * interval '1 millisecond', leased_by = $3
               FROM m, synapse.goals g
              WHERE t.id = m.id AND t.status || '' = m.status AND g.id = t.goal_id
          RETURNING t.id, t.goal_id, t.step, t.action, t.params, coalesce(t.input, 'null'::jsonb), t.attempts,
                    t.max_attempts, t.backoff_ms, t.timeout_ms, t.error,
                    greatest(extract(epoch FROM statement_timestamp() - t.queued_at), 0)::float8,
                    -- Only a parameter expression that mentions them pays for goal and steps.
                    CASE WHEN m.expressions LIKE '%goal%'
                         THEN jsonb_build_object('id', g.id, 'goal', g.goal, 'input', g.input, 'params', g.params)
                         ELSE 'null'::jsonb END,
                    CASE WHEN m.expressions LIKE '%steps%'
                         THEN (SELECT coalesce(jsonb_object_agg(s.step, jsonb_build_object('status', s.status, 'result', s.result)), '{}')
                                 FROM synapse.tasks s WHERE s.goal_id = t.goal_id AND s.map_index IS NULL)
                         ELSE 'null'::jsonb END,
                    t.map_index, CASE WHEN t.map_index IS NOT NULL THEN coalesce(t.map_item, t.input) END,
                    t.until_expr, t.input_expr, t.iteration, t.max_iterations, t.attempts_before,
                    CASE WHEN t.iteration > 1 THEN t.result END";

/// The tasks a claim's rows hold; a row whose identity cannot be read is
/// left out (its lease lapses and the timers deal with it).
fn claimed_tasks(rows: &[Row], worker: &str) -> Vec<ClaimedTask> {
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
    let steps = user_json(13, "steps");
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
        map_index,
        extras,
        looping,
        attempts_before: column(row, 20)?,
    })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
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

/// The outcome of one attempt.
#[derive(Debug, Clone)]
pub enum AttemptOutcome {
    /// Succeeded with this result.
    Succeeded(Value),
    /// Failed; another attempt runs after `delay`.
    Retry {
        /// The error.
        error: String,
        /// Backoff before the next attempt.
        delay: Duration,
    },
    /// Failed for good.
    Failed(String),
    /// Failed for good because an expression of the step could not be evaluated: a
    /// definition error, which takes only `always` edges and fails the goal.
    DefinitionError(String),
    /// A loop's run succeeded and `until` did not hold: it runs again with
    /// this input, `previous` being this result.
    Again {
        /// This run's result.
        result: Value,
        /// The next run's input.
        input: Value,
    },
}

/// What recording an outcome did.
#[derive(Debug)]
pub enum Recorded {
    /// This attempt no longer holds the task: nothing written.
    Fenced,
    /// The task waits for its next attempt.
    Retrying,
    /// A loop was queued for its next iteration.
    Again,
    /// The step ended; the engine takes it from here.
    Ended(StepEnd),
}

/// A step that ended, with what the engine needs to carry on.
#[derive(Debug)]
pub struct StepEnd {
    /// The goal it belongs to.
    pub goal_id: i64,
    /// `goal` for expressions.
    pub goal: GoalVariables,
    /// How it ended.
    pub ended: EndedStep,
    /// Its outbound edges, still pending, in blueprint order (none for an
    /// instance of a map step: the step's edges resolve once, for all).
    pub outbound: Vec<OutboundEdge>,
    /// Instance of a map step: its index.
    pub map_index: Option<i32>,
}

/// The outcomes' write, returning what the engine needs of each that
/// ended (see [`lock_goals_and_record`]).
macro_rules! recorded_outcomes {
    () => {
        "WITH recorded AS (
             UPDATE synapse.tasks t
                SET status = r.status, result = r.result, error = r.error, failure_kind = r.kind,
                    -- A retry's delay from now, not from the transaction's start
                    -- (a sql step's began before its query ran).
                    run_at = statement_timestamp() + r.delay_ms * interval '1 millisecond',
                    -- A loop's next iteration: its own input, and retries of its own.
                    input = coalesce(r.input, t.input),
                    iteration = t.iteration + (r.status = 'queued')::int,
                    attempts_before = CASE WHEN r.status = 'queued' THEN t.attempts ELSE t.attempts_before END
               FROM unnest($1::bigint[], $2::int[], $3::text[], $4::jsonb[], $5::text[], $6::float8[], $7::text[],
                           $8::text[], $9::jsonb[])
                    AS r(id, attempt, status, result, error, delay_ms, kind, worker, input),
                    synapse.goals g
              WHERE t.id = r.id AND t.status || '' = 'running' AND t.attempts = r.attempt AND g.id = t.goal_id
          RETURNING t.id, r.attempt,
                    -- What expressions see of the goal, for a step's end only: an
                    -- instance's end reads neither (a goal's input may be a large list).
                    CASE WHEN t.map_index IS NULL THEN g.goal END AS goal,
                    CASE WHEN t.map_index IS NULL THEN g.input END AS input,
                    CASE WHEN t.map_index IS NULL THEN g.params END AS params,
                    r.status, r.error, r.worker, t.started_at, t.goal_id, t.step, t.map_index)"
    };
}

/// The steps' pending outbound edges and sole successors, read for each
/// outcome [`recorded_outcomes`] wrote.
macro_rules! outbound_of_recorded {
    () => {
        "
             SELECT r.id, r.attempt, r.goal, r.input, r.params, o.to_steps, o.whens, o.ons, r.map_index, o.sole
               FROM recorded r
               -- The step's pending outbound edges, in one look. An instance's end
               -- resolves no edge: its map step's does, once.
               LEFT JOIN LATERAL (
                    SELECT array_agg(e.to_step ORDER BY e.position) AS to_steps,
                           array_agg(e.when_expr ORDER BY e.position) AS whens,
                           array_agg(e.on_outcome::text ORDER BY e.position) AS ons,
                           -- The successors whose one inbound edge this is: how it
                           -- resolves decides them, with nothing more to read. (json:
                           -- half the cost of jsonb, which sorts every object's keys.)
                           json_agg(json_build_object('step', c.step, 'id', c.id, 'join', c.join_mode,
                                                        'input_expr', c.input_expr,
                                                        'is_map', c.for_each_expr IS NOT NULL,
                                                        'cancel_others', c.cancel_others,
                                                        'looping', c.until_expr IS NOT NULL,
                                                        'is_wait', c.action = 'wait', 'queue', c.queue))
                               FILTER (WHERE c.inbound = 1 AND c.status = 'pending') AS sole
                      FROM synapse.edges e
                      LEFT JOIN synapse.tasks c
                        ON c.goal_id = e.goal_id AND c.step = e.to_step AND coalesce(c.map_index, -1) = -1
                     WHERE r.map_index IS NULL AND e.goal_id = r.goal_id AND e.from_step = r.step
                       AND e.state = 'pending') o ON true"
    };
}

/// Records outcomes of every kind: an instance's end counts on its map step,
/// a failure or retry keeps its attempt.
const RECORD_OUTCOMES: &str = concat!(
    recorded_outcomes!(),
    ",
             -- Each instance that ended counts on its map step, in this statement
             -- (the goal lock orders the counts); the engine decides the step.
             counted AS (
                 UPDATE synapse.tasks m SET map_ended = m.map_ended + c.ended, map_failed = m.map_failed + c.failed
                   FROM (SELECT goal_id, step, count(*)::int AS ended,
                                count(*) FILTER (WHERE status = 'failed')::int AS failed
                           FROM recorded WHERE map_index IS NOT NULL AND status IN ('succeeded', 'failed')
                          GROUP BY goal_id, step) c
                  WHERE m.goal_id = c.goal_id AND m.step = c.step AND coalesce(m.map_index, -1) = -1 AND m.status = 'waiting'),
             -- Only a failure costs a row: the attempt, kept with its error.
             kept AS (
                 INSERT INTO synapse.attempts (task_id, attempt, worker, started_at, error)
                 SELECT id, attempt, worker, started_at, error FROM recorded
                  WHERE status IN ('retrying', 'failed'))
",
    outbound_of_recorded!()
);

/// Records outcomes that are successes (or loop runs) of steps that are not
/// map instances.
const RECORD_SUCCESSES: &str = concat!(recorded_outcomes!(), "\n", outbound_of_recorded!());

/// Locks those of `goal_ids` that are running (as [`lock_running_goals`]),
/// then records many attempts' outcomes in one statement, each only if its
/// attempt still holds the task: the attempt number fences out a worker whose
/// lease expired. Outcomes are told apart by task *and* attempt, so two
/// attempts of one task in the same batch each get their own answer (the stale
/// one is [`Recorded::Fenced`]). Returns the goals locked, and the answers in
/// the order of `outcomes`.
///
/// Lock order: the goals first, like every writer of task rows that may wait.
/// The two statements go out together, one round trip: Postgres runs the
/// second once the first holds its locks, on a snapshot taken then, as if
/// each had been awaited.
pub async fn lock_goals_and_record(
    tx: &impl GenericClient,
    goal_ids: &[i64],
    outcomes: &[(&ClaimedTask, &AttemptOutcome)],
) -> Result<(Vec<i64>, Vec<Recorded>)> {
    let mut ids = Vec::with_capacity(outcomes.len());
    let mut attempts = Vec::with_capacity(outcomes.len());
    let mut statuses = Vec::with_capacity(outcomes.len());
    let mut results: Vec<Option<&Value>> = Vec::with_capacity(outcomes.len());
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(outcomes.len());
    let mut delays: Vec<Option<f64>> = Vec::with_capacity(outcomes.len());
    let mut kinds: Vec<Option<&str>> = Vec::with_capacity(outcomes.len());
    let mut workers: Vec<&str> = Vec::with_capacity(outcomes.len());
    let mut inputs: Vec<Option<&Value>> = Vec::with_capacity(outcomes.len());
    for (task, outcome) in outcomes {
        ids.push(task.id);
        workers.push(task.worker.as_str());
        attempts.push(task.attempt);
        let (status, result, error, delay) = match outcome {
            AttemptOutcome::Succeeded(result) => ("succeeded", Some(result), None, None),
            AttemptOutcome::Retry { error, delay } => {
                ("retrying", None, Some(error.as_str()), Some(millis(*delay)))
            }
            AttemptOutcome::Failed(error) | AttemptOutcome::DefinitionError(error) => {
                ("failed", None, Some(error.as_str()), None)
            }
            AttemptOutcome::Again { result, .. } => ("queued", Some(result), None, None),
        };
        inputs.push(match outcome {
            AttemptOutcome::Again { input, .. } => Some(input),
            _ => None,
        });
        kinds.push(match outcome {
            AttemptOutcome::Failed(_) => Some("action"),
            AttemptOutcome::DefinitionError(_) => Some("definition"),
            _ => None,
        });
        statuses.push(status);
        results.push(result);
        errors.push(error);
        delays.push(delay);
    }
    // `t.status || '' = 'running'` rather than `t.status = 'running'`: the
    // plain form lets the planner scan the partial index of running tasks
    // (tasks_lease_due) instead of looking the batch up by id, and that index
    // holds a dead entry for every task that ran since the last vacuum.
    // Both prepared first: a statement still to be prepared would go out
    // after the other.
    let lock = tx.prepare_cached(LOCK_RUNNING_GOALS).await?;
    // An outcome that counts on its map step or keeps its attempt's error
    // needs the statement that writes those; others leave them out (their
    // empty writes cost a fifth of a lone outcome's record).
    let writes_more = outcomes.iter().any(|(task, outcome)| {
        task.map_index.is_some()
            || matches!(
                outcome,
                AttemptOutcome::Retry { .. }
                    | AttemptOutcome::Failed(_)
                    | AttemptOutcome::DefinitionError(_)
            )
    });
    let record = tx
        .prepare_cached(if writes_more {
            RECORD_OUTCOMES
        } else {
            RECORD_SUCCESSES
        })
        .await?;
    let (locked, rows) = futures_util::future::try_join(
        tx.query(&lock, &[&goal_ids]),
        tx.query(
            &record,
            &[
                &ids, &attempts, &statuses, &results, &errors, &delays, &kinds, &workers, &inputs,
            ],
        ),
    )
    .await?;
    // (task id, attempt) → the position of that outcome in `outcomes`.
    let asked: HashMap<(i64, i32), usize> = outcomes
        .iter()
        .enumerate()
        .map(|(index, (task, _))| ((task.id, task.attempt), index))
        .collect();
    let mut recorded: HashMap<usize, Recorded> = HashMap::new();
    for row in rows {
        let key: (i64, i32) = (column(&row, 0)?, column(&row, 1)?);
        let Some(&index) = asked.get(&key) else {
            return Err(StoreError::Data(format!(
                "recorded attempt {} of task {} was not asked for",
                key.1, key.0
            )));
        };
        let (task, outcome) = outcomes[index];
        let ended = |outcome, result: Option<&Value>, error: Option<&String>| EndedStep {
            step: task.step.clone(),
            outcome,
            result: result.cloned().unwrap_or(Value::Null),
            error: error.cloned(),
            input: task.input.clone(),
            definition_error: false,
        };
        let ended = match outcome {
            AttemptOutcome::Succeeded(result) => ended(Outcome::Succeeded, Some(result), None),
            AttemptOutcome::Failed(error) => ended(Outcome::Failed, None, Some(error)),
            AttemptOutcome::DefinitionError(error) => EndedStep {
                definition_error: true,
                ..ended(Outcome::Failed, None, Some(error))
            },
            AttemptOutcome::Retry { .. } => {
                recorded.insert(index, Recorded::Retrying);
                continue;
            }
            AttemptOutcome::Again { .. } => {
                recorded.insert(index, Recorded::Again);
                continue;
            }
        };
        let goal = GoalVariables {
            goal: match column::<Option<String>>(&row, 2)? {
                Some(text) => goal_value(task.goal_id, &text, column(&row, 3)?, column(&row, 4)?),
                None => Value::Null,
            },
        };
        recorded.insert(
            index,
            Recorded::Ended(StepEnd {
                goal_id: task.goal_id,
                goal,
                ended,
                outbound: with_sole_successors(
                    task.goal_id,
                    outbound_from_arrays(column(&row, 5)?, column(&row, 6)?, column(&row, 7)?)?,
                    column(&row, 9)?,
                )?,
                map_index: column(&row, 8)?,
            }),
        );
    }
    let recorded = (0..outcomes.len())
        .map(|index| recorded.remove(&index).unwrap_or(Recorded::Fenced))
        .collect();
    Ok((goal_ids_of(locked)?, recorded))
}

/// What expressions see of each of `goal_ids`.
pub async fn goal_variables(
    tx: &impl GenericClient,
    goal_ids: &[i64],
) -> Result<HashMap<i64, GoalVariables>> {
    let statement = tx
        .prepare_cached(
            "SELECT id, goal, input, params FROM synapse.goals WHERE id = ANY($1::bigint[])",
        )
        .await?;
    tx.query(&statement, &[&goal_ids])
        .await?
        .iter()
        .map(|row| {
            let goal_id: i64 = column(row, 0)?;
            let goal = goal_value(goal_id, column(row, 1)?, column(row, 2)?, column(row, 3)?);
            Ok((goal_id, GoalVariables { goal }))
        })
        .collect()
}

/// The goals of `task_ids`, in id order: what to lock before touching them.
pub async fn goals_of_tasks(tx: &impl GenericClient, task_ids: &[i64]) -> Result<Vec<i64>> {
    let statement = tx
        .prepare_cached(
            "SELECT DISTINCT goal_id FROM synapse.tasks WHERE id = ANY($1::bigint[]) ORDER BY goal_id",
        )
        .await?;
    tx.query(&statement, &[&task_ids])
        .await?
        .iter()
        .map(|row| column(row, 0))
        .collect()
}

/// Those of `task_ids` that ended with no worker to carry on while their goal
/// runs, as steps that ended, with their still pending outbound edges: tasks
/// the forwarder failed when their last lease lapsed, and root map steps
/// whose list was empty when their plan was installed. The caller holds the
/// goal locks. A task already carried on has no pending edge left and costs
/// the engine nothing more than a look at its goal.
pub async fn ended_without_a_worker(
    tx: &impl GenericClient,
    task_ids: &[i64],
) -> Result<Vec<StepEnd>> {
    let statement = tx
        .prepare_cached(
            "SELECT t.goal_id, t.step, t.error, coalesce(t.input, 'null'::jsonb), g.goal, g.input, g.params,
                    t.failure_kind IS NOT DISTINCT FROM 'definition',
                    (SELECT array_agg(e.to_step ORDER BY e.position) FROM synapse.edges e
                      WHERE e.goal_id = t.goal_id AND e.from_step = t.step AND e.state = 'pending'),
                    (SELECT array_agg(e.when_expr ORDER BY e.position) FROM synapse.edges e
                      WHERE e.goal_id = t.goal_id AND e.from_step = t.step AND e.state = 'pending'),
                    (SELECT array_agg(e.on_outcome::text ORDER BY e.position) FROM synapse.edges e
                      WHERE e.goal_id = t.goal_id AND e.from_step = t.step AND e.state = 'pending'),
                    t.status = 'succeeded', coalesce(t.result, 'null'::jsonb), t.map_index
               FROM synapse.tasks t JOIN synapse.goals g ON g.id = t.goal_id
              WHERE t.id = ANY($1::bigint[]) AND t.status IN ('failed', 'succeeded') AND g.status = 'running'
              ORDER BY t.id",
        )
        .await?;
    tx.query(&statement, &[&task_ids])
        .await?
        .iter()
        .map(|row| {
            let goal_id: i64 = column(row, 0)?;
            let map_index: Option<i32> = column(row, 13)?;
            let succeeded: bool = column(row, 11)?;
            Ok(StepEnd {
                goal_id,
                goal: GoalVariables {
                    goal: goal_value(goal_id, column(row, 4)?, column(row, 5)?, column(row, 6)?),
                },
                ended: EndedStep {
                    step: column(row, 1)?,
                    outcome: if succeeded {
                        Outcome::Succeeded
                    } else {
                        Outcome::Failed
                    },
                    result: column(row, 12)?,
                    error: column(row, 2)?,
                    input: column(row, 3)?,
                    definition_error: column(row, 7)?,
                },
                outbound: match map_index {
                    Some(_) => Vec::new(),
                    None => {
                        outbound_from_arrays(column(row, 8)?, column(row, 9)?, column(row, 10)?)?
                    }
                },
                map_index,
            })
        })
        .collect()
}

/// `steps` for expressions: step id → `{status, result}`.
pub async fn steps_map(tx: &impl GenericClient, goal_id: i64) -> Result<Value> {
    let statement = tx
        .prepare_cached(
            "SELECT coalesce(jsonb_object_agg(step, jsonb_build_object('status', status, 'result', result)), '{}')
               FROM synapse.tasks WHERE goal_id = $1 AND map_index IS NULL",
        )
        .await?;
    column(&tx.query_one(&statement, &[&goal_id]).await?, 0)
}

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
    /// decides it ([`crate::engine::decided_by_sole_edge`]).
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
fn outbound_from_arrays(
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
fn with_sole_successors(
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
            taken_parent_results: Map::new(),
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
}

/// Records how edges resolved (of any steps and goals), then reads which of
/// `steps` (goal, step) are ready ([`ready_tasks`]): both statements go out
/// together, one round trip. Postgres runs the read once the resolutions are
/// written, so it sees them, as if each had been awaited.
pub async fn resolve_edges_then_ready(
    tx: &impl GenericClient,
    resolutions: &[EdgeResolution],
    steps: &[(i64, String)],
) -> Result<Vec<ReadyTask>> {
    if resolutions.is_empty() {
        return ready_tasks(tx, steps).await;
    }
    // Both prepared first: a statement still to be prepared would go out
    // after the other.
    let resolve = tx.prepare_cached(RESOLVE_EDGES).await?;
    let ready = tx.prepare_cached(READY_TASKS).await?;
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
    resolve_edges_then_ready(tx, resolutions, &[]).await?;
    Ok(())
}

/// The parameters of [`RESOLVE_EDGES`], one array per column.
pub(crate) struct ResolveColumns<'a> {
    goal_ids: Vec<i64>,
    from: Vec<&'a str>,
    to: Vec<&'a str>,
    states: Vec<&'static str>,
    errors: Vec<Option<&'a str>>,
}

impl<'a> ResolveColumns<'a> {
    pub(crate) fn of(resolutions: &'a [EdgeResolution]) -> Self {
        ResolveColumns {
            goal_ids: resolutions.iter().map(|r| r.goal_id).collect(),
            from: resolutions.iter().map(|r| r.from.as_str()).collect(),
            to: resolutions.iter().map(|r| r.to.as_str()).collect(),
            states: resolutions.iter().map(|r| r.state).collect(),
            errors: resolutions.iter().map(|r| r.error.as_deref()).collect(),
        }
    }

    pub(crate) fn parameters(&self) -> [&(dyn ToSql + Sync); 5] {
        [
            &self.goal_ids,
            &self.from,
            &self.to,
            &self.states,
            &self.errors,
        ]
    }
}

/// Each edge resolved counts on its target, in the same statement (pending,
/// and taken): its join is decided from the counts, and no later read has to
/// look for its edges. A step with one inbound edge keeps no counts: that
/// edge says how it stands, and the row is written once, when the step is
/// decided (a second write of each of a 2 000-wide fan-out's steps in one
/// transaction doubled the cost of queueing them).
const RESOLVE_EDGES: &str = "WITH resolved AS (
                 UPDATE synapse.edges e SET state = r.state, error = r.error, resolved_at = statement_timestamp()
                   FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[])
                        AS r(goal_id, from_step, to_step, state, error)
                  WHERE e.goal_id = r.goal_id AND e.from_step = r.from_step AND e.to_step = r.to_step
                    AND e.state = 'pending'
              RETURNING e.goal_id, e.to_step, e.state)
             UPDATE synapse.tasks t
                SET pending_inbound = t.pending_inbound - c.resolved, taken_inbound = t.taken_inbound + c.taken
               FROM (SELECT goal_id, to_step, count(*)::int AS resolved,
                            count(*) FILTER (WHERE state = 'taken')::int AS taken
                       FROM resolved GROUP BY 1, 2) c
              WHERE t.goal_id = c.goal_id AND t.step = c.to_step AND t.inbound > 1";

/// Fails a step that has not run because its condition or input could not be
/// evaluated (a definition error); `None` if it was no longer pending.
pub async fn fail_pending_task(
    tx: &impl GenericClient,
    goal_id: i64,
    step: &str,
    error: &str,
) -> Result<Option<EndedStep>> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks SET status = 'failed', error = $3, failure_kind = 'definition'
              WHERE goal_id = $1 AND step = $2 AND coalesce(map_index, -1) = -1 AND status = 'pending'",
        )
        .await?;
    let failed = tx.execute(&statement, &[&goal_id, &step, &error]).await? == 1;
    Ok(failed.then(|| EndedStep {
        step: step.to_owned(),
        outcome: Outcome::Failed,
        result: Value::Null,
        error: Some(error.to_owned()),
        input: Value::Null,
        definition_error: true,
    }))
}

/// A pending step whose inbound edges have all resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyTask {
    /// Its goal.
    pub goal_id: i64,
    /// Task id.
    pub id: i64,
    /// Step id.
    pub step: String,
    /// Join mode.
    pub join: Join,
    /// Input expression.
    pub input_expr: Option<String>,
    /// How its inbound edges stand.
    pub inbound: Inbound,
    /// The steps of its inbound edges not taken, in blueprint order: read
    /// only for a join `all` that is to be skipped (they say why).
    pub not_taken_from: Vec<String>,
    /// Parent id → result for the taken inbound edges: the default input
    /// (read only for a step with one and a taken edge).
    pub taken_parent_results: Map<String, Value>,
    /// A map step: it starts its instances instead of being queued.
    pub is_map: bool,
    /// When it starts, its parents that have not ended are cancelled.
    pub cancel_others: bool,
    /// A loop: its input sees `previous` (null) and `iteration` (1).
    pub looping: bool,
    /// A wait step: it waits instead of being queued.
    pub is_wait: bool,
    /// The queue it goes to.
    pub queue: String,
}

/// Those of `steps` (goal, step) that are pending with every inbound edge
/// resolved (or, for a join `first` or n, with any resolved), in goal and id
/// order. Each step is looked at through index probes only (the LATERAL
/// subqueries keep the planner from scanning the whole goal, which made long
/// chains quadratic), and decided from its counts (a step with one inbound
/// edge: from that edge): its inbound edges are read only for what a
/// decision cannot do without, the parents' results of a default input, or
/// the edges a join `all` missed.
pub async fn ready_tasks(
    tx: &impl GenericClient,
    steps: &[(i64, String)],
) -> Result<Vec<ReadyTask>> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx.prepare_cached(READY_TASKS).await?;
    let (goal_ids, step_ids) = ready_arguments(steps);
    tx.query(&statement, &[&goal_ids, &step_ids])
        .await?
        .iter()
        .map(ready_task)
        .collect()
}

/// How the inbound edges of the pending step `c` stand, as `pending_inbound`
/// and `taken_inbound`: the counts kept on its row, or, for a step with one
/// inbound edge (which keeps none), that edge's state.
macro_rules! inbound_counts {
    () => {
        "coalesce(sole.pending, c.pending_inbound) AS pending_inbound,
                coalesce(sole.taken, c.taken_inbound) AS taken_inbound
           FROM (SELECT) AS one_row
           LEFT JOIN LATERAL (
                SELECT (e.state = 'pending')::int AS pending, (e.state = 'taken')::int AS taken
                  FROM synapse.edges e
                 WHERE c.inbound = 1 AND e.goal_id = c.goal_id AND e.to_step = c.step) sole ON true"
    };
}

const READY_TASKS: &str = concat!("SELECT s.goal_id, t.id, t.step, t.join_mode, t.input_expr, t.inbound, t.pending_inbound,
                    t.taken_inbound, coalesce(edges.not_taken_from, '{}'), coalesce(edges.parent_results, '{}'),
                    t.for_each_expr IS NOT NULL, t.cancel_others, t.until_expr IS NOT NULL, t.action = 'wait',
                    t.queue
              FROM unnest($1::bigint[], $2::text[]) AS s(goal_id, step)
             CROSS JOIN LATERAL (
                   SELECT c.id, c.step, c.join_mode, c.input_expr, c.for_each_expr, c.cancel_others, c.until_expr,
                          c.action, c.queue, c.inbound, k.pending_inbound, k.taken_inbound
                     FROM synapse.tasks c
                    CROSS JOIN LATERAL (SELECT ", inbound_counts!(), ") k
                    WHERE c.goal_id = s.goal_id AND c.step = s.step AND coalesce(c.map_index, -1) = -1 AND c.status = 'pending'
                      AND (k.pending_inbound = 0 OR c.join_mode NOT IN ('any', 'all'))
                    LIMIT 1) t
              LEFT JOIN LATERAL (
                   SELECT array_agg(e.from_step ORDER BY e.position) FILTER (WHERE e.state <> 'taken') AS not_taken_from,
                          jsonb_object_agg(e.from_step,
                                       (SELECT coalesce(p.result, 'null'::jsonb) FROM synapse.tasks p
                                         WHERE p.goal_id = s.goal_id AND p.step = e.from_step AND coalesce(p.map_index, -1) = -1))
                                   FILTER (WHERE e.state = 'taken' AND t.input_expr IS NULL) AS parent_results
                     FROM synapse.edges e
                    WHERE e.goal_id = s.goal_id AND e.to_step = t.step
                      -- Only when the decision needs them (a one-time filter: no
                      -- scan otherwise).
                      AND ((t.input_expr IS NULL AND t.taken_inbound > 0)
                           OR (t.join_mode = 'all' AND t.pending_inbound = 0 AND t.taken_inbound < t.inbound))) edges
                ON true
             ORDER BY s.goal_id, t.id");

fn ready_arguments(steps: &[(i64, String)]) -> (Vec<i64>, Vec<&str>) {
    steps
        .iter()
        .map(|(goal_id, step)| (*goal_id, step.as_str()))
        .unzip()
}

fn ready_task(row: &Row) -> Result<ReadyTask> {
    let count = |index| -> Result<u32> {
        let count: i32 = column(row, index)?;
        u32::try_from(count).map_err(|_| StoreError::Data(format!("inbound count {count}")))
    };
    let Value::Object(taken_parent_results) = column::<Value>(row, 9)? else {
        return Err(StoreError::Data("parent results are not an object".into()));
    };
    Ok(ReadyTask {
        goal_id: column(row, 0)?,
        id: column(row, 1)?,
        step: column(row, 2)?,
        join: {
            let join: &str = column(row, 3)?;
            Join::from_column(join)
                .ok_or_else(|| StoreError::Data(format!("join mode {join:?}")))?
        },
        input_expr: column(row, 4)?,
        inbound: Inbound {
            total: count(5)?,
            pending: count(6)?,
            taken: count(7)?,
        },
        not_taken_from: column(row, 8)?,
        taken_parent_results,
        is_map: column(row, 10)?,
        cancel_others: column(row, 11)?,
        looping: column(row, 12)?,
        is_wait: column(row, 13)?,
        queue: column(row, 14)?,
    })
}

/// The pending steps of `goal_id` with no inbound edge left to resolve: what
/// a goal run again (`retry_goal`) starts with. In a goal that runs, the
/// engine decides each step as its last inbound edge resolves, so there are
/// none; asking twice finds none the second time.
pub async fn undecided_steps(tx: &impl GenericClient, goal_id: i64) -> Result<Vec<String>> {
    let statement = tx
        .prepare_cached(
            concat!(
                "SELECT c.step FROM synapse.tasks c
                  CROSS JOIN LATERAL (SELECT ", inbound_counts!(), ") k
                  WHERE c.goal_id = $1 AND c.status = 'pending' AND c.map_index IS NULL AND k.pending_inbound = 0
                  ORDER BY c.id"
            ),
        )
        .await?;
    tx.query(&statement, &[&goal_id])
        .await?
        .iter()
        .map(|row| column(row, 0))
        .collect()
}

/// The steps of `goal_id` that ended (succeeded or failed) with outbound
/// edges still pending: their carry-on never happened (their goal was
/// cancelled first), which a goal run again must make up for.
pub async fn ended_with_pending_edges(tx: &impl GenericClient, goal_id: i64) -> Result<Vec<i64>> {
    let statement = tx
        .prepare_cached(
            "SELECT t.id FROM synapse.tasks t
              WHERE t.goal_id = $1 AND t.map_index IS NULL AND t.status IN ('succeeded', 'failed')
                AND EXISTS (SELECT FROM synapse.edges e
                             WHERE e.goal_id = t.goal_id AND e.from_step = t.step AND e.state = 'pending')
              ORDER BY t.id",
        )
        .await?;
    tx.query(&statement, &[&goal_id])
        .await?
        .iter()
        .map(|row| column(row, 0))
        .collect()
}

/// Queues `tasks` (id, input): `pending → queued`.
pub async fn queue_tasks(tx: &impl GenericClient, tasks: &[(i64, Value)]) -> Result<Vec<Queued>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx.prepare_cached(QUEUE_TASKS).await?;
    let (ids, inputs) = queue_arguments(tasks);
    tx.query(&statement, &[&ids, &inputs])
        .await?
        .iter()
        .map(|row| {
            Ok(Queued {
                id: column(row, 0)?,
                queue: column(row, 1)?,
            })
        })
        .collect()
}

/// What a transaction writes with its last round trip.
pub struct LastWrites<'a> {
    /// Edge resolutions, written first.
    pub resolutions: &'a [EdgeResolution],
    /// Tasks to queue (id, input).
    pub tasks: &'a [(i64, Value)],
}

/// The transaction's last round trip: writes `last` (the edge resolutions,
/// then the tasks queued), claims for the worker what `claim` names (tasks
/// queued earlier in the transaction, and pending ones it queues as it
/// claims them) and commits with
/// [`commit_and_chain`], the statements sent together. A statement that fails
/// aborts the transaction, whose COMMIT then fails too: its error is the
/// answer. Returns the tasks claimed.
pub async fn queue_claim_and_commit(
    client: &deadpool_postgres::Client,
    last: LastWrites<'_>,
    claim: Option<&Claim<'_>>,
) -> Result<Vec<ClaimedTask>> {
    // Prepared first (cached after a connection's first use): a statement
    // still to be prepared would go out after the COMMIT.
    let resolve = client.prepare_cached(RESOLVE_EDGES).await?;
    let queue = client.prepare_cached(QUEUE_TASKS).await?;
    let claiming = client.prepare_cached(CLAIM_TASKS).await?;
    let LastWrites { resolutions, tasks } = last;
    let resolve_columns = ResolveColumns::of(resolutions);
    let (ids, inputs) = queue_arguments(tasks);
    let claim_arguments = claim.map(ClaimArguments::of);
    let resolving = async {
        if resolutions.is_empty() {
            return Ok(0);
        }
        client
            .execute(&resolve, &resolve_columns.parameters())
            .await
    };
    let queuing = async {
        if tasks.is_empty() {
            return Ok(0);
        }
        client.execute(&queue, &[&ids, &inputs]).await
    };
    let claimed = async {
        match &claim_arguments {
            Some(arguments) => client.query(&claiming, &arguments.parameters()).await,
            None => Ok(Vec::new()),
        }
    };
    let committed = commit_and_chain(client);
    let (resolved, queued, claimed, committed) =
        futures_util::join!(resolving, queuing, claimed, committed);
    resolved?;
    queued?;
    let claimed = claimed?;
    committed?;
    Ok(claimed_tasks(
        &claimed,
        claim.map_or("", |claim| claim.worker),
    ))
}

/// Commits the transaction on `client` and leaves it in a new, empty one
/// with the same characteristics, which the next batch may use
/// ([`open::Kept`]).
pub async fn commit_and_chain(client: &deadpool_postgres::Client) -> Result<()> {
    Ok(client.batch_execute("COMMIT AND CHAIN").await?)
}

const QUEUE_TASKS: &str = "UPDATE synapse.tasks t SET status = 'queued', input = r.input
                             FROM unnest($1::bigint[], $2::jsonb[]) AS r(id, input)
                            WHERE t.id = r.id AND t.status = 'pending'
                        RETURNING t.id, t.queue";

fn queue_arguments(tasks: &[(i64, Value)]) -> (Vec<i64>, Vec<&Value>) {
    tasks.iter().map(|(id, input)| (*id, input)).unzip()
}

/// A task the engine queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Task id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
}

/// Cancels the direct parents of `step` that have not ended (with their
/// instances, for a map step): `step` started without them (`cancel_others`).
/// A running parent stops at its next heartbeat and its outcome is not
/// recorded. Returns the parent steps cancelled.
pub async fn cancel_parents(
    tx: &impl GenericClient,
    goal_id: i64,
    step: &str,
) -> Result<Vec<String>> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks t SET status = 'cancelled', error = format('cancelled: step %s started without it', $2::text)
               FROM (SELECT from_step FROM synapse.edges
                      WHERE goal_id = $1 AND to_step = $2 AND state = 'pending') p
              WHERE t.goal_id = $1 AND t.step = p.from_step
                AND t.status IN ('pending', 'queued', 'running', 'retrying', 'waiting')
          RETURNING t.step, t.map_index IS NULL",
        )
        .await?;
    let mut cancelled = Vec::new();
    for row in tx.query(&statement, &[&goal_id, &step]).await? {
        if column::<bool>(&row, 1)? {
            cancelled.push(column(&row, 0)?);
        }
    }
    Ok(cancelled)
}

/// `pending → skipped`, each with its reason, in one statement.
pub async fn skip_tasks(tx: &impl GenericClient, tasks: &[(i64, String)]) -> Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.tasks t SET status = 'skipped', error = r.reason
               FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)
              WHERE t.id = r.id AND t.status = 'pending'",
        )
        .await?;
    let ids: Vec<i64> = tasks.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<&str> = tasks.iter().map(|(_, reason)| reason.as_str()).collect();
    tx.execute(&statement, &[&ids, &reasons]).await?;
    Ok(())
}

/// Locks those of `goal_ids` that are running, in id order, and returns
/// their ids. Nothing else is read: a goal's blueprint (its `output`) is read
/// only when the goal ends ([`goal_endings`]).
///
/// Lock order, everywhere: a goal row first, then its task rows. The
/// completer takes these locks before it records any outcome, as
/// `cancel_goal` locks the goal before cancelling its tasks, so the two never
/// wait for each other in a cycle; the id order keeps engine runs that touch
/// several goals from deadlocking each other.
pub async fn lock_running_goals(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<i64>> {
    let statement = tx.prepare_cached(LOCK_RUNNING_GOALS).await?;
    goal_ids_of(tx.query(&statement, &[&goal_ids]).await?)
}

const LOCK_RUNNING_GOALS: &str = "SELECT id FROM synapse.goals
                                   WHERE id IN (SELECT unnest($1::bigint[])) AND status = 'running'
                                   ORDER BY id FOR NO KEY UPDATE";

fn goal_ids_of(rows: Vec<Row>) -> Result<Vec<i64>> {
    rows.iter().map(|row| column(row, 0)).collect()
}

/// How a goal whose steps have all ended comes out.
pub struct GoalEnding {
    /// Goal id.
    pub goal_id: i64,
    /// The blueprint's `output` expression, if it has one.
    pub output: Option<String>,
    /// Failed steps with no taken `failure`/`always` edge out of them, and steps failed
    /// by a definition error whatever their edges: `(step, error)`.
    pub unhandled_failures: Vec<(String, String)>,
    /// The default result: the results of the succeeded leaf steps.
    pub leaf_results: Value,
}

/// The endings of those of `goal_ids` whose every step has ended, in one
/// statement. Whether a goal has a task left is one index probe; an ended
/// goal's steps are then read once, each with a probe of its edges (a
/// subquery per row, so that the planner never merges every step of a goal
/// with every edge: a plan it chose on tables still empty read W² rows to end
/// a W-wide goal). `OFFSET 0` keeps the goals still running out before their
/// steps are read.
pub async fn goal_endings(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<GoalEnding>> {
    let statement = tx
        .prepare_cached(
            "SELECT ended.id, ended.output, steps.unhandled, steps.errors, steps.leaf_results
               FROM (SELECT g.id, g.blueprint ->> 'output' AS output
                       FROM synapse.goals g
                       LEFT JOIN LATERAL (SELECT true AS found FROM synapse.tasks t
                                           WHERE t.goal_id = g.id AND t.finished_at IS NULL
                                           LIMIT 1) unfinished ON true
                      WHERE g.id = ANY($1::bigint[]) AND unfinished.found IS NULL
                     OFFSET 0) ended
              CROSS JOIN LATERAL (
                    SELECT coalesce(array_agg(s.step::text ORDER BY s.id) FILTER (WHERE s.unhandled), '{}') AS unhandled,
                           coalesce(array_agg(coalesce(s.error, 'failed') ORDER BY s.id) FILTER (WHERE s.unhandled), '{}')
                             AS errors,
                           coalesce(jsonb_object_agg(s.step, s.result) FILTER (WHERE s.leaf), '{}') AS leaf_results
                      FROM (SELECT t.id, t.step, t.error, t.result,
                                   -- A failure no taken failure/always edge handles, or a definition error.
                                   t.status = 'failed'
                                     AND (t.failure_kind IS NOT DISTINCT FROM 'definition'
                                          OR NOT EXISTS (SELECT FROM synapse.edges e
                                                          WHERE e.goal_id = t.goal_id AND e.from_step = t.step
                                                            AND e.state = 'taken'
                                                            AND e.on_outcome IN ('failure', 'always'))) AS unhandled,
                                   -- A succeeded step with no edge out of it.
                                   t.status = 'succeeded'
                                     AND NOT EXISTS (SELECT FROM synapse.edges e
                                                      WHERE e.goal_id = t.goal_id AND e.from_step = t.step) AS leaf
                              FROM synapse.tasks t
                             WHERE t.goal_id = ended.id AND t.map_index IS NULL
                               AND t.status IN ('failed', 'succeeded')) s) steps
              ORDER BY ended.id",
        )
        .await?;
    tx.query(&statement, &[&goal_ids])
        .await?
        .iter()
        .map(|row| {
            let steps: Vec<String> = column(row, 2)?;
            let errors: Vec<String> = column(row, 3)?;
            Ok(GoalEnding {
                goal_id: column(row, 0)?,
                output: column(row, 1)?,
                unhandled_failures: steps.into_iter().zip(errors).collect(),
                leaf_results: column(row, 4)?,
            })
        })
        .collect()
}

/// How a goal finished.
pub struct GoalFinish {
    /// Goal id.
    pub goal_id: i64,
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// Result of a succeeded goal.
    pub result: Option<Value>,
    /// Why a goal failed.
    pub error: Option<String>,
}

/// `running → succeeded | failed`, for many goals in one statement.
pub async fn finish_goals(tx: &impl GenericClient, finishes: &[GoalFinish]) -> Result<()> {
    if finishes.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.goals g SET status = r.status, result = r.result, error = r.error
               FROM unnest($1::bigint[], $2::text[], $3::jsonb[], $4::text[]) AS r(id, status, result, error)
              WHERE g.id = r.id AND g.status = 'running'",
        )
        .await?;
    let ids: Vec<i64> = finishes.iter().map(|f| f.goal_id).collect();
    let statuses: Vec<&str> = finishes.iter().map(|f| f.status).collect();
    let results: Vec<Option<&Value>> = finishes.iter().map(|f| f.result.as_ref()).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
    tx.execute(&statement, &[&ids, &statuses, &results, &errors])
        .await?;
    Ok(())
}

/// Most planning attempts of one goal: a goal whose planning keeps failing
/// (an error, a worker dying) fails after this many instead of being sent to
/// the planners forever.
pub const MAX_PLAN_ATTEMPTS: i32 = 3;

/// A planning attempt that was counted.
pub struct PlanAttempt {
    /// Its number, 1 for the first.
    pub number: i32,
    /// What made the previous attempt fail, if it said.
    pub previous_error: Option<String>,
}

/// Counts a planning attempt of a submitted goal, committed on its own so
/// that an attempt which never finishes (a worker killed while planning)
/// counts too. `None` for a goal that is not submitted (a duplicate message,
/// a goal already planned or cancelled) or that another transaction holds
/// (another planner is at it): the message is dropped.
pub async fn count_plan_attempt(
    client: &mut deadpool_postgres::Client,
    goal_id: i64,
) -> Result<Option<PlanAttempt>> {
    let tx = begin(client).await?;
    let statement = tx
        .prepare_cached(
            "WITH m AS (
                 SELECT id FROM synapse.goals WHERE id = $1 AND status = 'submitted'
                    FOR NO KEY UPDATE SKIP LOCKED)
             UPDATE synapse.goals g SET plan_attempts = g.plan_attempts + 1
               FROM m WHERE g.id = m.id
          RETURNING g.plan_attempts, g.error",
        )
        .await?;
    let attempt = match tx.query_opt(&statement, &[&goal_id]).await? {
        Some(row) => Some(PlanAttempt {
            number: column(&row, 0)?,
            previous_error: column(&row, 1)?,
        }),
        None => None,
    };
    tx.commit().await?;
    Ok(attempt)
}

/// Keeps why a planning attempt failed (the goal stays submitted, for the
/// sweep to send again); the next attempt reports it if it gives up.
pub async fn note_planning_error(
    client: &impl GenericClient,
    goal_id: i64,
    error: &str,
) -> Result<()> {
    let statement = client
        .prepare_cached(
            "UPDATE synapse.goals SET error = $2 WHERE id = $1 AND status = 'submitted'",
        )
        .await?;
    client.execute(&statement, &[&goal_id, &error]).await?;
    Ok(())
}

/// A goal a planner claimed.
pub struct GoalToPlan {
    /// Goal text.
    pub goal: String,
    /// Goal input, or why it cannot be read (e.g. JSON nested deeper than
    /// serde_json reads): such a goal fails saying so.
    pub input: std::result::Result<Value, String>,
    /// Planner name.
    pub planner: String,
}

/// Claims a submitted goal for planning (`submitted → planning`); `None` for
/// a duplicate message or a goal already planned or cancelled.
pub async fn claim_goal(tx: &impl GenericClient, goal_id: i64) -> Result<Option<GoalToPlan>> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.goals SET status = 'planning', error = NULL WHERE id = $1 AND status = 'submitted'
          RETURNING goal, input, coalesce(planner, 'template')",
        )
        .await?;
    let Some(row) = tx.query_opt(&statement, &[&goal_id]).await? else {
        return Ok(None);
    };
    Ok(Some(GoalToPlan {
        goal: column(&row, 0)?,
        input: column::<Value>(&row, 1)
            .map_err(|error| format!("cannot read the goal's input: {}", data_message(error))),
        planner: column(&row, 2)?,
    }))
}

/// The message of a [`StoreError`], without the variant's prefix when it is
/// about the data itself.
fn data_message(error: StoreError) -> String {
    match error {
        StoreError::Data(message) => message,
        other => other.to_string(),
    }
}

/// Installs a planned blueprint (the extension validates it and creates the
/// tasks, or fails the goal); returns the problems, empty on success.
pub async fn install_plan(
    tx: &impl GenericClient,
    goal_id: i64,
    blueprint: &Value,
    template: Option<&str>,
    params: &Value,
) -> Result<Value> {
    let statement = tx
        .prepare_cached("SELECT synapse._install_plan($1, $2, $3, $4)")
        .await?;
    column(
        &tx.query_one(&statement, &[&goal_id, blueprint, &template, params])
            .await?,
        0,
    )
}

/// Fails a goal that could not be planned.
pub async fn fail_planning(tx: &impl GenericClient, goal_id: i64, error: &str) -> Result<()> {
    let statement = tx
        .prepare_cached(
            "UPDATE synapse.goals SET status = 'failed', error = $2 WHERE id = $1 AND status IN ('submitted', 'planning')",
        )
        .await?;
    tx.execute(&statement, &[&goal_id, &error]).await?;
    Ok(())
}

/// Templates in the order the template planner tries them.
pub async fn templates(tx: &impl GenericClient) -> Result<Vec<(String, String, Value)>> {
    let statement = tx
        .prepare_cached(
            "SELECT name, pattern, blueprint FROM synapse.templates ORDER BY priority DESC, name",
        )
        .await?;
    tx.query(&statement, &[])
        .await?
        .iter()
        .map(|row| Ok((column(row, 0)?, column(row, 1)?, column(row, 2)?)))
        .collect()
}

/// Publishes this worker's actions in the catalogue.
pub async fn register_actions(
    client: &impl GenericClient,
    actions: &[(String, String, Option<Value>, bool)],
    worker: &str,
) -> Result<()> {
    let statement = client
        .prepare_cached(
            "INSERT INTO synapse.actions (name, description, params_schema, builtin, registered_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name) DO UPDATE
                SET description = excluded.description, params_schema = excluded.params_schema,
                    builtin = excluded.builtin, registered_by = excluded.registered_by, updated_at = now()",
        )
        .await?;
    for (name, description, schema, builtin) in actions {
        client
            .execute(&statement, &[name, description, schema, builtin, &worker])
            .await?;
    }
    Ok(())
}

/// The version of the synapse extension in the database (its SQL objects),
/// `None` if it is not installed.
pub async fn extension_version(client: &impl GenericClient) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'synapse'",
            &[],
        )
        .await?;
    row.map(|row| column(&row, 0)).transpose()
}

/// What a starting worker learns of the extension's settings.
pub struct ExtensionSettings {
    /// `synapse.key_prefix`, if this session can read it.
    pub key_prefix: Option<String>,
    /// `synapse.redis_url`, if this role may read it (superuser-only).
    pub redis_url: Option<String>,
}

/// Records that `worker` started and serves `queues` (a restart under the
/// same identity starts afresh; workers stopped more than 7 days ago are
/// forgotten), and reads the extension's Redis settings in the same statement.
pub async fn worker_started(
    client: &impl GenericClient,
    worker: &str,
    queues: &[String],
) -> Result<ExtensionSettings> {
    let statement = client
        .prepare_cached(
            "WITH forgotten AS (
                 DELETE FROM synapse.workers
                  WHERE stopped_at < now() - interval '7 days' AND identity <> $1)
             INSERT INTO synapse.workers AS w (identity, queues) VALUES ($1, $2)
             ON CONFLICT (identity) DO UPDATE
                SET queues = excluded.queues, started_at = now(), last_seen_at = now(),
                    stopped_at = NULL, lost_at = NULL
          RETURNING current_setting('synapse.key_prefix', true),
                    -- pg_settings shows only what this role may read.
                    (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'synapse.redis_url')",
        )
        .await?;
    let row = client.query_one(&statement, &[&worker, &queues]).await?;
    Ok(ExtensionSettings {
        key_prefix: column(&row, 0)?,
        redis_url: column(&row, 1)?,
    })
}

/// Records that `worker` stopped: it serves no queue any more.
pub async fn worker_stopped(client: &impl GenericClient, worker: &str) -> Result<()> {
    let statement = client
        .prepare_cached(
            "UPDATE synapse.workers SET stopped_at = now(), last_seen_at = now() WHERE identity = $1",
        )
        .await?;
    client.execute(&statement, &[&worker]).await?;
    Ok(())
}

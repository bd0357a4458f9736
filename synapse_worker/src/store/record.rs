//! Recording attempts' outcomes, and reading back the steps that ended
//! with what the engine needs to carry on.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde::{Serialize, Serializer};
use serde_json::Value;
use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::claim::ClaimedTask;
use super::edges::{outbound_from_arrays, with_sole_successors, OutboundEdge};
use super::goals::{endings_of, GoalEnding, GoalLock, ENDINGS_OF_ONE_STEP_GOALS};
use super::{column, millis, Result, StoreError};
use crate::engine::decide::{goal_value, EndedStep, GoalVariables, Outcome};

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

impl AttemptOutcome {
    /// Whether the step ends with it (no retry, no next run of a loop).
    fn ends_the_step(&self) -> bool {
        matches!(
            self,
            AttemptOutcome::Succeeded(_)
                | AttemptOutcome::Failed(_)
                | AttemptOutcome::DefinitionError(_)
        )
    }
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
/// ended (see [`lock_goals_and_record`]). The batch is one jsonb object
/// keyed by task and attempt: each row finds its own outcome by its current
/// attempt, joined to nothing (see by_id), and an attempt that no
/// longer holds its task finds none.
macro_rules! recorded_outcomes {
    () => {
        "WITH recorded AS (
             UPDATE synapse.tasks t
                SET (status, result, error, failure_kind, run_at, input, iteration, attempts_before) = (
                    SELECT r.o ->> 'status', r.o -> 'result', r.o ->> 'error', r.o ->> 'kind',
                           -- A retry's delay from now, not from the transaction's start
                           -- (a sql step's began before its query ran).
                           statement_timestamp() + (r.o ->> 'delay_ms')::float8 * interval '1 millisecond',
                           -- A loop's next iteration: its own input, and retries of its own.
                           coalesce(r.o -> 'input', t.input),
                           t.iteration + (r.o ->> 'status' = 'queued')::int,
                           CASE WHEN r.o ->> 'status' = 'queued' THEN t.attempts ELSE t.attempts_before END
                      FROM (SELECT $1::jsonb -> concat(t.id, ':', t.attempts)) AS r(o))
              WHERE t.id = ANY($2::bigint[]) AND t.status || '' = 'running' AND $1::jsonb ? concat(t.id, ':', t.attempts)
          RETURNING t.id, t.attempts AS attempt, t.status, t.error,
                    $1::jsonb -> concat(t.id, ':', t.attempts) ->> 'worker' AS worker,
                    t.started_at, t.goal_id, t.step, t.map_index)"
    };
}

/// The steps' pending outbound edges and sole successors, read for each
/// outcome [`recorded_outcomes`] wrote.
macro_rules! outbound_of_recorded {
    () => {
        "
             SELECT r.id, r.attempt, g.goal, g.input, g.params, o.to_steps, o.whens, o.ons, r.map_index, o.sole
               FROM (SELECT r.*, r.map_index IS NULL
                                 AND row_number() OVER (PARTITION BY r.goal_id, r.map_index IS NULL ORDER BY r.id) = 1
                                 AS reads_goal
                       FROM recorded r) r
               -- What expressions see of the goal, once a goal: with the first
               -- of its steps' ends, shared by the others (a goal's input may be
               -- large; a wide fan-in ends many steps of one goal at once). An
               -- instance's end reads none (the input may be the list it maps
               -- over). A probe by key (LIMIT keeps it one; see by_id).
               LEFT JOIN LATERAL (
                    SELECT g.goal, g.input, g.params FROM synapse.goals g
                     WHERE r.reads_goal AND g.id = r.goal_id
                     LIMIT 1) g ON true
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
                      -- Each successor by its key, one probe an edge: joined
                      -- instead, on statistics of tables still empty, the
                      -- planner read every step of a W-wide goal for each of
                      -- the W edges of its root (LIMIT keeps it a probe).
                      LEFT JOIN LATERAL (
                           SELECT c.step, c.id, c.join_mode, c.input_expr, c.for_each_expr, c.cancel_others,
                                  c.until_expr, c.action, c.queue, c.inbound, c.status
                             FROM synapse.tasks c
                            WHERE c.goal_id = e.goal_id AND c.step = e.to_step AND coalesce(c.map_index, -1) = -1
                            LIMIT 1) c ON true
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
             -- (the map step's row lock orders the counts: a batch counting
             -- after another reads the step once that one committed); the
             -- engine decides the step.
             -- Each map step found by its key, one probe an instance, and
             -- updated by id, joined to nothing (see by_id).
             instances_ended AS (
                 SELECT m.id, count(*)::int AS ended, count(*) FILTER (WHERE r.status = 'failed')::int AS failed
                   FROM recorded r
                  CROSS JOIN LATERAL (
                        SELECT m.id FROM synapse.tasks m
                         WHERE m.goal_id = r.goal_id AND m.step = r.step AND coalesce(m.map_index, -1) = -1
                         LIMIT 1) m
                  WHERE r.map_index IS NOT NULL AND r.status IN ('succeeded', 'failed')
                  GROUP BY m.id),
             counted AS (
                 UPDATE synapse.tasks m
                    SET (map_ended, map_failed) = (
                        SELECT m.map_ended + (k.counts ->> 0)::int, m.map_failed + (k.counts ->> 1)::int
                          FROM (SELECT (SELECT jsonb_object_agg(id, jsonb_build_array(ended, failed))
                                          FROM instances_ended) -> m.id::text) AS k(counts))
                  WHERE m.id = ANY(ARRAY(SELECT id FROM instances_ended)) AND m.status = 'waiting'),
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

/// A batch of outcomes as one JSON object keyed by `task:attempt`, written
/// straight from the borrowed outcomes.
#[derive(Debug)]
struct OutcomesByAttempt<'a>(&'a [(&'a ClaimedTask, &'a AttemptOutcome)]);

/// One outcome as [`recorded_outcomes`] reads it.
#[derive(Serialize)]
struct OutcomeFields<'a> {
    status: &'static str,
    /// Absent, not null: a success may have null for its result.
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    error: Option<&'a str>,
    delay_ms: Option<f64>,
    kind: Option<&'static str>,
    worker: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a Value>,
}

impl<'a> OutcomeFields<'a> {
    fn of(task: &'a ClaimedTask, outcome: &'a AttemptOutcome) -> Self {
        let (status, result, error, delay_ms, kind, input) = match outcome {
            AttemptOutcome::Succeeded(result) => {
                ("succeeded", Some(result), None, None, None, None)
            }
            AttemptOutcome::Retry { error, delay } => (
                "retrying",
                None,
                Some(error.as_str()),
                Some(millis(*delay)),
                None,
                None,
            ),
            AttemptOutcome::Failed(error) | AttemptOutcome::DefinitionError(error) => {
                let kind = match outcome {
                    AttemptOutcome::DefinitionError(_) => "definition",
                    _ => "action",
                };
                ("failed", None, Some(error.as_str()), None, Some(kind), None)
            }
            AttemptOutcome::Again { result, input } => {
                ("queued", Some(result), None, None, None, Some(input))
            }
        };
        OutcomeFields {
            status,
            result,
            error,
            delay_ms,
            kind,
            worker: &task.worker,
            input,
        }
    }
}

impl Serialize for OutcomesByAttempt<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(task, outcome)| {
            (
                format!("{}:{}", task.id, task.attempt),
                OutcomeFields::of(task, outcome),
            )
        }))
    }
}

/// What [`lock_goals_and_record`] did.
pub struct Recording {
    /// The goals it locked: those of the batch still running.
    pub running: Vec<i64>,
    /// What became of each outcome, in the order asked.
    pub recorded: Vec<Recorded>,
    /// The endings of goals of one step that the batch ended, read with the
    /// outcomes ([`ENDINGS_OF_ONE_STEP_GOALS`]).
    pub goals_ended: Vec<GoalEnding>,
}

/// Locks those of `goal_ids` that are running (as [`super::lock_running_goals`]),
/// then records many attempts' outcomes in one statement, each only if its
/// attempt still holds the task: the attempt number fences out a worker whose
/// lease expired. Outcomes are told apart by task *and* attempt, so two
/// attempts of one task in the same batch each get their own answer (the stale
/// one is [`Recorded::Fenced`]). The root steps that end may be all their
/// goal has: those goals' endings are read after the outcomes.
///
/// Lock order: the goals first (their gates, then `FOR KEY SHARE`: shared
/// with the goal's other engine runs), like every writer of task rows that
/// may wait. The statements go out together, one round trip: Postgres runs
/// each once the one before it holds its locks, on a snapshot taken then, as
/// if each had been awaited.
pub async fn lock_goals_and_record(
    tx: &impl GenericClient,
    goal_ids: &[i64],
    outcomes: &[(&ClaimedTask, &AttemptOutcome)],
) -> Result<Recording> {
    let ids: Vec<i64> = outcomes.iter().map(|(task, _)| task.id).collect();
    // `t.status || '' = 'running'` rather than `t.status = 'running'`: the
    // plain form lets the planner scan the partial index of running tasks
    // (tasks_lease_due) instead of looking the batch up by id, and that index
    // holds a dead entry for every task that ran since the last vacuum.
    // Both prepared first: a statement still to be prepared would go out
    // after the other.
    let lock = GoalLock::prepare(tx, goal_ids).await?;
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
    let mut ending_alone: Vec<i64> = outcomes
        .iter()
        .filter(|(task, outcome)| task.root && task.map_index.is_none() && outcome.ends_the_step())
        .map(|(task, _)| task.goal_id)
        .collect();
    ending_alone.sort_unstable();
    ending_alone.dedup();
    let endings = if ending_alone.is_empty() {
        None
    } else {
        Some(tx.prepare_cached(ENDINGS_OF_ONE_STEP_GOALS).await?)
    };
    let (locked, rows, ended) = futures_util::future::try_join3(
        lock.take(tx),
        async {
            Ok(tx
                .query(&record, &[&Json(OutcomesByAttempt(outcomes)), &ids])
                .await?)
        },
        async {
            Ok(match &endings {
                Some(endings) => tx.query(endings, &[&ending_alone]).await?,
                None => Vec::new(),
            })
        },
    )
    .await?;
    // (task id, attempt) → the position of that outcome in `outcomes`.
    let asked: HashMap<(i64, i32), usize> = outcomes
        .iter()
        .enumerate()
        .map(|(index, (task, _))| ((task.id, task.attempt), index))
        .collect();
    let at = |row: &Row| -> Result<usize> {
        let key: (i64, i32) = (column(row, 0)?, column(row, 1)?);
        asked.get(&key).copied().ok_or_else(|| {
            StoreError::Data(format!(
                "recorded attempt {} of task {} was not asked for",
                key.1, key.0
            ))
        })
    };
    // One row of each goal carries what expressions see of it; every step
    // end of that goal shares it.
    let mut goals: HashMap<i64, Arc<Value>> = HashMap::new();
    for row in &rows {
        if let Some(text) = column::<Option<String>>(row, 2)? {
            let goal_id = outcomes[at(row)?].0.goal_id;
            let value = goal_value(goal_id, &text, column(row, 3)?, column(row, 4)?);
            goals.insert(goal_id, Arc::new(value));
        }
    }
    let mut recorded: HashMap<usize, Recorded> = HashMap::new();
    for row in rows {
        let index = at(&row)?;
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
            goal: goals.get(&task.goal_id).cloned().unwrap_or_default(),
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
    Ok(Recording {
        running: locked,
        recorded,
        goals_ended: endings_of(&ended)?,
    })
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
               FROM synapse.tasks t
               -- A probe by key (see by_id): joined, on stale statistics, every
               -- goal was read, and every task of each.
               CROSS JOIN LATERAL (
                    SELECT g.goal, g.input, g.params FROM synapse.goals g
                     WHERE g.id = t.goal_id AND g.status = 'running'
                     LIMIT 1) g
              WHERE t.id = ANY($1::bigint[]) AND t.status IN ('failed', 'succeeded')
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
                    goal: Arc::new(goal_value(
                        goal_id,
                        column(row, 4)?,
                        column(row, 5)?,
                        column(row, 6)?,
                    )),
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

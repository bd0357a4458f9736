//! Runs tasks: claim them (a popped batch in one statement) with a lease, run
//! each action under a timeout while heartbeating the lease, then hand the
//! outcome to the completer, which records it and runs the engine.
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::actions::{ActionContext, ActionError};
use crate::engine::child;
use crate::slots::Slot;
use crate::store::{self, AttemptOutcome, ClaimedTask, StoreError};
use crate::worker::Shared;

/// The transaction-retry policy lives with the transactions, in the store;
/// kept here for callers that know it by this path.
pub use crate::store::with_retries;

/// Longest pause between attempts, whatever the backoff and attempt number:
/// the longest `backoff` blueprint validation accepts (24 h), so a backoff
/// that validated is never silently cut short at its first retry.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The `task_id` of a `task.queued` message.
pub fn task_id(payload: &str) -> Option<i64> {
    serde_json::from_str::<Value>(payload)
        .ok()?
        .get("task_id")?
        .as_i64()
}

/// What a queue message asks of a worker.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueMessage {
    /// `task.queued`: claim the task and run it.
    Run(i64),
    /// `task.failed` or `task.succeeded`: it ended with no worker there (its
    /// last lease lapsed, or a root map step's list was empty); or the end of
    /// the child goal a goal step waits for (`goal.*` with `parent_task_id`):
    /// end the step, resolve its edges and carry its goal on.
    CarryOn(i64),
    /// `goal.running` of a goal run again (`retry_goal`): start its steps.
    Resume(i64),
}

/// Reads a queue message; `None` if it is malformed.
pub fn queue_message(payload: &str) -> Option<QueueMessage> {
    let message = serde_json::from_str::<Value>(payload).ok()?;
    if let Some(parent_task_id) = message.get("parent_task_id").and_then(Value::as_i64) {
        return Some(QueueMessage::CarryOn(parent_task_id));
    }
    if message.get("event").and_then(Value::as_str) == Some("goal.running") {
        return Some(QueueMessage::Resume(message.get("goal_id")?.as_i64()?));
    }
    let task_id = message.get("task_id")?.as_i64()?;
    match message.get("event").and_then(Value::as_str) {
        Some("task.failed" | "task.succeeded") => Some(QueueMessage::CarryOn(task_id)),
        _ => Some(QueueMessage::Run(task_id)),
    }
}

/// Backoff before attempt `attempt + 1`: `base · 2^(attempt-1)`, times a
/// random factor in [0.5, 1.5) so that failures in step do not retry in step.
pub fn retry_delay(base: Duration, attempt: i32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).clamp(0, 30) as u32;
    base.saturating_mul(1 << exponent)
        .mul_f64(jitter.clamp(0.5, 1.5))
        .min(MAX_RETRY_DELAY)
}

/// What happened to a task this worker handled.
pub enum Handled {
    /// The outcome was recorded: `succeeded`, `retrying` or `failed`.
    Recorded(&'static str),
    /// A newer attempt owns the task: nothing was written.
    Fenced,
    /// The goal was cancelled or the lease lost while it ran.
    Lost,
    /// Given back unrun at shutdown.
    Released,
}

/// Claims, in one statement, the tasks of the `task.queued` messages popped
/// from `list`. Messages whose task is not queued any more (duplicates,
/// cancelled goals) are dropped; if Postgres is unreachable they all go back.
pub async fn claim(shared: &Shared, list: &str, payloads: &[String]) -> Vec<ClaimedTask> {
    let mut task_ids = Vec::with_capacity(payloads.len());
    let mut carry_on = Vec::new();
    let mut resume = Vec::new();
    for payload in payloads {
        match queue_message(payload) {
            Some(QueueMessage::Run(id)) => task_ids.push(id),
            Some(QueueMessage::CarryOn(id)) => carry_on.push(id),
            Some(QueueMessage::Resume(goal_id)) => resume.push(goal_id),
            None => warn!(payload, "dropping a malformed queue message"),
        }
    }
    if !carry_on.is_empty() {
        carry_on_after(shared, &carry_on).await;
    }
    if !resume.is_empty() {
        resume_goals(shared, &mut resume).await;
    }
    if task_ids.is_empty() {
        return Vec::new();
    }
    let Some(queue) = shared.config.queue_of(list) else {
        warn!(
            list,
            "task messages on a list this worker does not serve; dropped"
        );
        return Vec::new();
    };
    // One statement, committed on its own: no BEGIN and COMMIT round trips
    // between the message and the handler (the pool's sessions are READ
    // COMMITTED whatever the database's default, see worker::pool).
    let claimed = with_retries(&shared.pool, || async {
        let client = shared.pool.get().await?;
        let claim = store::Claim {
            task_ids: &task_ids,
            pending: &[],
            queues: &[queue],
            lease: shared.config.lease,
            worker: &shared.config.identity,
        };
        store::claim_tasks(&client, &claim).await
    })
    .await;
    match claimed {
        Ok(claimed) => {
            shared.postgres_reachable();
            if claimed.len() < task_ids.len() {
                debug!(
                    dropped = task_ids.len() - claimed.len(),
                    "tasks not queued any more (duplicate messages or cancelled) or held by another transaction; dropped"
                );
            }
            claimed
        }
        Err(error) if error.is_unavailable() => {
            shared.hand_back(list, payloads, &error).await;
            Vec::new()
        }
        Err(error) => {
            // The sweep dispatches them again.
            warn!(?task_ids, %error, "could not claim tasks");
            Vec::new()
        }
    }
}

/// Runs the engine for tasks that ended with no worker there: the forwarder
/// failed them when their last lease lapsed, or they are root map steps whose
/// list was empty. None resolved their edges (nor counted an instance on its
/// map step). Goals are
/// locked first, as everywhere, for one such run at a time: a duplicate
/// message then finds the work done. If this fails the goal waits for the
/// next such message (a duplicate, or none): logged loudly.
async fn carry_on_after(shared: &Shared, task_ids: &[i64]) {
    let carried = with_retries(&shared.pool, || async {
        let mut client = shared.pool.get().await?;
        let tx = store::begin(&mut client).await?;
        let goal_ids = store::goals_of_tasks(&tx, task_ids).await?;
        let running = store::lock_running_goals_alone(&tx, &goal_ids).await?;
        store::child::settle(&tx, task_ids).await?;
        let ends = store::ended_without_a_worker(&tx, task_ids).await?;
        store::map::recount(&tx, task_ids).await?;
        let carried = ends.len();
        if carried > 0 {
            crate::engine::steps_ended_in_locked_goals(&tx, ends, running, Vec::new(), false)
                .await?;
        }
        tx.commit().await?;
        Ok(carried)
    })
    .await;
    match carried {
        Ok(carried) => debug!(?task_ids, carried, "carried on after lapsed leases"),
        Err(error) => {
            warn!(?task_ids, %error, "could not carry on after tasks whose lease lapsed")
        }
    }
}

/// Starts the steps of goals run again (`retry_goal`). If this fails the
/// goal waits for the next such message: logged loudly.
async fn resume_goals(shared: &Shared, goal_ids: &mut Vec<i64>) {
    goal_ids.sort_unstable();
    goal_ids.dedup();
    let resumed = with_retries(&shared.pool, || async {
        let mut client = shared.pool.get().await?;
        let tx = store::begin(&mut client).await?;
        let queued = crate::engine::resume(&tx, goal_ids).await?;
        tx.commit().await?;
        Ok(queued.len())
    })
    .await;
    match resumed {
        Ok(queued) => debug!(?goal_ids, queued, "goals run again"),
        Err(error) => warn!(?goal_ids, %error, "could not start the steps of goals run again"),
    }
}

/// Runs [`execute`] as a task of its own on `tasks`. Boxed: the future holds
/// the state of every action, and tokio copies a task's future by value as it
/// spawns it and again as it ends (a fifth of a chain step's worker CPU).
pub fn spawn_execute(
    tasks: &TaskTracker,
    shared: Arc<Shared>,
    claimed: ClaimedTask,
    abort: CancellationToken,
    slot: Slot,
) {
    tasks.spawn(Box::pin(async move {
        execute(&shared, claimed, &abort, slot).await;
    }));
}

/// Runs a claimed task, holding `slot` (one of the worker's concurrency
/// slots) until its outcome is handed to the completer, and records it.
async fn execute(shared: &Shared, claimed: ClaimedTask, abort: &CancellationToken, slot: Slot) {
    let task_id = claimed.id;
    let metrics = &crate::metrics::METRICS;
    metrics.queue_wait.observe(claimed.queue_wait.as_secs_f64());
    metrics.in_flight.inc();
    let started = std::time::Instant::now();
    let handled = run_claimed(shared, &claimed, abort, slot).await;
    metrics.in_flight.dec();
    let elapsed = started.elapsed();
    metrics
        .task_duration
        .with_label_values(&[&claimed.action])
        .observe(elapsed.as_secs_f64());
    let outcome = match &handled {
        Ok(Handled::Recorded(outcome)) => *outcome,
        Ok(Handled::Fenced) => "fenced",
        Ok(Handled::Lost) => "lost",
        Ok(Handled::Released) => "released",
        Err(_) => "unrecorded",
    };
    metrics
        .tasks
        .with_label_values(&[&claimed.action, outcome])
        .inc();
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    match handled {
        Ok(Handled::Recorded(_)) => {
            debug!(task_id, step = %claimed.step, elapsed_ms, "task recorded")
        }
        Ok(Handled::Fenced) => {
            warn!(
                task_id,
                attempt = claimed.attempt,
                "outcome rejected: a newer attempt owns the task"
            )
        }
        Ok(Handled::Lost) => info!(
            task_id,
            attempt = claimed.attempt,
            "task cancelled or lease lost; stopped"
        ),
        Ok(Handled::Released) => info!(task_id, "released unfinished task at shutdown"),
        Err(error) => {
            warn!(task_id, %error, "could not record the outcome; the lease will expire and it runs again")
        }
    }
}

async fn run_claimed(
    shared: &Shared,
    task: &ClaimedTask,
    abort: &CancellationToken,
    slot: Slot,
) -> Result<Handled, StoreError> {
    if let Some(error) = &task.unreadable {
        // Poison data: this task fails alone, saying why; its neighbours run.
        warn!(task_id = task.id, %error, "task cannot be read; failed");
        return record(shared, task, AttemptOutcome::Failed(error.clone()), slot).await;
    }
    if task.attempt_in_iteration() > task.max_attempts {
        // Re-queued after the lease of its last attempt expired: nothing left to try.
        let error = task
            .previous_error
            .clone()
            .unwrap_or_else(|| "lease expired".to_owned());
        return record(shared, task, AttemptOutcome::Failed(error), slot).await;
    }
    let context = ActionContext {
        goal_id: task.goal_id,
        task_id: task.id,
        step: task.step.clone(),
        attempt: task.attempt,
        params: task.params.clone(),
        input: task.input.clone(),
        goal: task.goal.clone(),
        steps: task.steps.clone(),
        steps_oversized: task.steps_oversized,
        extras: task.extras.clone(),
        timeout: task.timeout,
    };
    if task.action == child::ACTION {
        return start_child(shared, task, &context, slot).await;
    }
    if task.action == crate::sql_step::ACTION {
        return crate::sql_step::run(shared, task, &context, abort, slot).await;
    }
    let Some(action) = shared.actions.get(&task.action) else {
        let error = format!("this worker has no action \"{}\"", task.action);
        return record(shared, task, AttemptOutcome::Failed(error), slot).await;
    };
    let run = tokio::time::timeout(task.timeout, action.run(&context));
    let outcome = tokio::select! {
        result = run => match result {
            Ok(result) => outcome_of(task, &context, result),
            Err(_) => failure(task, format!("timed out after {}", crate::blueprint::format_duration(task.timeout))),
        },
        () = hold_lease(shared, task) => return Ok(Handled::Lost),
        () = abort.cancelled() => {
            let mut client = shared.pool.get().await?;
            let tx = store::begin(&mut client).await?;
            store::release_task(&tx, task.id, task.attempt).await?;
            tx.commit().await?;
            return Ok(Handled::Released);
        }
    };
    record(shared, task, outcome, slot).await
}

/// A goal step's attempt: starts its child goal, and the step waits for it
/// without this worker (its slot is free at once). A child that cannot be
/// started fails the attempt, saying why.
async fn start_child(
    shared: &Shared,
    task: &ClaimedTask,
    context: &ActionContext,
    slot: Slot,
) -> Result<Handled, StoreError> {
    let child = match child::child_of(context) {
        Ok(child) => child,
        Err(error) => {
            return record(shared, task, AttemptOutcome::DefinitionError(error), slot).await
        }
    };
    let started = {
        let mut client = shared.pool.get().await?;
        let tx = store::begin(&mut client).await?;
        let started = store::child::start(&tx, task.id, task.attempt, &child, &task.input).await?;
        tx.commit().await?;
        started
    };
    match started {
        store::child::Started::Child(child_goal_id) => {
            info!(
                task_id = task.id,
                child_goal_id, "child goal started; the step waits for it"
            );
            Ok(Handled::Recorded("waiting"))
        }
        store::child::Started::Fenced => Ok(Handled::Fenced),
        store::child::Started::Refused(error) => {
            record(shared, task, AttemptOutcome::Failed(error), slot).await
        }
    }
}

/// What an attempt that ran to its end comes to: its result (or, for a loop,
/// another iteration), or a failure to retry or not.
pub(crate) fn outcome_of(
    task: &ClaimedTask,
    context: &ActionContext,
    result: Result<Value, ActionError>,
) -> AttemptOutcome {
    match result {
        Ok(value) => match &task.looping {
            None => AttemptOutcome::Succeeded(value),
            Some(looping) => crate::engine::looping::after_run(context, looping, value),
        },
        // Another attempt would evaluate the same expression over the same values.
        Err(ActionError::Definition(error)) => AttemptOutcome::DefinitionError(error),
        Err(error) if error.is_retryable() => failure(task, error.message().to_owned()),
        Err(error) => AttemptOutcome::Failed(error.message().to_owned()),
    }
}

pub(crate) fn failure(task: &ClaimedTask, error: String) -> AttemptOutcome {
    let attempt = task.attempt_in_iteration();
    if attempt < task.max_attempts {
        let jitter = 0.5 + rand::random::<f64>();
        AttemptOutcome::Retry {
            error,
            delay: retry_delay(task.backoff, attempt, jitter),
        }
    } else {
        AttemptOutcome::Failed(error)
    }
}

/// Heartbeats every third of the lease; returns when the attempt no longer
/// holds the task (the goal was cancelled, or the lease lapsed and the task
/// went to another worker).
pub(crate) async fn hold_lease(shared: &Shared, task: &ClaimedTask) {
    let period = shared.config.lease / 3;
    loop {
        tokio::time::sleep(period).await;
        let held = async {
            let mut client = shared.pool.get().await?;
            let tx = store::begin(&mut client).await?;
            let held = store::heartbeat(
                &tx,
                task.id,
                task.attempt,
                shared.config.lease,
                &shared.config.identity,
            )
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(held)
        };
        match held.await {
            Ok(true) => {}
            Ok(false) => return,
            // Keep running: the lease outlives a short database hiccup.
            Err(error) => warn!(task_id = task.id, %error, "heartbeat failed"),
        }
    }
}

/// Records the outcome (and runs the engine) through the completer, which
/// batches it with the outcomes of other tasks; `slot` is free for the next
/// task as soon as the completer took the outcome. The lease is renewed while
/// the outcome waits: a busy completer must not let finished work lapse and
/// run again. Should the attempt lose the task meanwhile (cancelled), the
/// completer still answers, and fences the outcome.
pub(crate) async fn record(
    shared: &Shared,
    task: &ClaimedTask,
    outcome: AttemptOutcome,
    slot: Slot,
) -> Result<Handled, StoreError> {
    // Only a failure pays for this copy: what the WARN line below tells.
    let failed = match &outcome {
        AttemptOutcome::Succeeded(_) | AttemptOutcome::Again { .. } => None,
        AttemptOutcome::Retry { error, delay } => Some((error.clone(), Some(*delay))),
        AttemptOutcome::Failed(error) | AttemptOutcome::DefinitionError(error) => {
            Some((error.clone(), None))
        }
    };
    let answer = shared.completer.hand_over(task.clone(), outcome).await?;
    drop(slot);
    let recording = answer.wait();
    tokio::pin!(recording);
    let handled = tokio::select! {
        handled = &mut recording => handled,
        () = hold_lease(shared, task) => recording.await,
    };
    if let (Ok(Handled::Recorded(_)), Some((error, delay))) = (&handled, failed) {
        let next = match delay {
            Some(delay) => format!("retry at {}", rfc3339(std::time::SystemTime::now() + delay)),
            None => "giving up".to_owned(),
        };
        warn!(
            goal_id = task.goal_id,
            step = %task.step,
            attempt = task.attempt,
            max_attempts = task.max_attempts,
            %error,
            next = %next,
            "attempt failed"
        );
    }
    handled
}

/// `2026-11-30T01:22:59.123Z` (UTC, milliseconds).
fn rfc3339(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs();
    let (days, of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_times_are_told_in_utc() {
        let at = |seconds: u64, millis: u64| {
            rfc3339(
                std::time::UNIX_EPOCH
                    + Duration::from_secs(seconds)
                    + Duration::from_millis(millis),
            )
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_796_001_779, 123), "2026-11-30T01:22:59.123Z");
    }

    #[test]
    fn a_goal_running_again_asks_to_start_its_steps() {
        assert_eq!(
            queue_message(r#"{"v":1,"event":"goal.running","goal_id":12}"#),
            Some(QueueMessage::Resume(12))
        );
        assert_eq!(queue_message(r#"{"v":1,"event":"goal.running"}"#), None);
    }

    #[test]
    fn a_failed_task_message_asks_to_carry_on() {
        assert_eq!(
            queue_message(
                r#"{"v":1,"event":"task.failed","goal_id":1,"task_id":9,"step":"a","queue":"default","attempt":1}"#
            ),
            Some(QueueMessage::CarryOn(9))
        );
        assert_eq!(
            queue_message(
                r#"{"v":1,"event":"task.succeeded","goal_id":1,"task_id":9,"step":"a","queue":"default","attempt":0}"#
            ),
            Some(QueueMessage::CarryOn(9))
        );
        assert_eq!(
            queue_message(
                r#"{"v":1,"event":"task.queued","goal_id":1,"task_id":9,"step":"a","queue":"default","attempt":2}"#
            ),
            Some(QueueMessage::Run(9))
        );
        assert_eq!(
            queue_message(r#"{"v":1,"event":"goal.failed","goal_id":12,"parent_task_id":9}"#),
            Some(QueueMessage::CarryOn(9))
        );
        assert_eq!(queue_message("not json"), None);
    }

    #[test]
    fn task_ids_come_from_queue_messages() {
        let payload = r#"{"v":1,"event":"task.queued","goal_id":7,"task_id":42,"step":"s","queue":"default","attempt":1}"#;
        assert_eq!(task_id(payload), Some(42));
        assert_eq!(task_id("not json"), None);
        assert_eq!(task_id(r#"{"v":1}"#), None);
    }

    #[test]
    fn retry_delays_grow_exponentially_with_bounded_jitter() {
        let base = Duration::from_secs(1);
        assert_eq!(retry_delay(base, 1, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(base, 2, 1.0), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 4, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(base, 3, 0.5), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 3, 9.0), Duration::from_secs(6));
        assert_eq!(retry_delay(base, 40, 1.0), MAX_RETRY_DELAY);
    }

    #[test]
    fn the_longest_backoff_validation_accepts_is_never_cut_short() {
        let blueprint = |backoff: Duration| {
            serde_json::json!({"steps": [{"id": "a", "action": "noop", "retries": 1,
                "backoff": crate::blueprint::format_duration(backoff)}]})
        };
        let accepted = crate::blueprint::validate(&blueprint(MAX_RETRY_DELAY), &|_| true)
            .expect("the longest retry delay is a valid backoff");
        assert_eq!(accepted.steps[0].backoff, MAX_RETRY_DELAY);
        assert_eq!(retry_delay(MAX_RETRY_DELAY, 1, 1.0), MAX_RETRY_DELAY);
        let longer = MAX_RETRY_DELAY + Duration::from_secs(3600);
        assert!(
            crate::blueprint::validate(&blueprint(longer), &|_| true).is_err(),
            "validation accepts a backoff longer than the cap"
        );
    }
}

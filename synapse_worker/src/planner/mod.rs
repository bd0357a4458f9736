//! Planners turn a goal into a blueprint. The template planner ships with
//! the worker; others plug in by name through [`Planner`].
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use serde_json::{Map, Value};

use crate::store::{self, with_retries, StoreError};

mod template;
pub use template::TemplatePlanner;

/// What a planner is asked to plan.
pub struct GoalRequest {
    /// Goal id.
    pub id: i64,
    /// Goal text.
    pub goal: String,
    /// Goal input.
    pub input: Value,
}

/// A planner's answer.
pub struct Plan {
    /// The blueprint (validated by the extension when installed).
    pub blueprint: Value,
    /// Template used, if any.
    pub template: Option<String>,
    /// `goal.params` for expressions.
    pub params: Map<String, Value>,
}

/// Why a goal could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The goal cannot be planned; it fails with this message.
    #[error("{0}")]
    Rejected(String),
    /// The database failed; planning is retried.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The future a planner returns.
pub type PlanFuture<'a> = Pin<Box<dyn Future<Output = Result<Plan, PlanError>> + Send + 'a>>;

/// Turns goals into blueprints. Runs inside the planning transaction, so it
/// may read Postgres through `tx`.
pub trait Planner: Send + Sync + 'static {
    /// Name goals ask for (`submit_goal(..., planner => 'name')`).
    fn name(&self) -> &str;
    /// Plans one goal.
    fn plan<'a>(&'a self, tx: &'a Transaction<'a>, goal: &'a GoalRequest) -> PlanFuture<'a>;
}

/// Planners by name.
#[derive(Clone, Default)]
pub struct PlannerRegistry {
    planners: BTreeMap<String, Arc<dyn Planner>>,
}

impl PlannerRegistry {
    /// The built-in planners.
    pub fn builtins() -> Self {
        let mut registry = Self::default();
        registry.register(TemplatePlanner::default());
        registry
    }

    /// Adds (or replaces) a planner.
    pub fn register(&mut self, planner: impl Planner) -> &mut Self {
        self.planners
            .insert(planner.name().to_owned(), Arc::new(planner));
        self
    }

    /// The planner called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Planner>> {
        self.planners.get(name).cloned()
    }

    /// Names of every planner, for error messages.
    pub fn names(&self) -> Vec<&str> {
        self.planners.keys().map(String::as_str).collect()
    }
}

/// The `goal_id` of a `goal.submitted` message.
pub fn goal_id(payload: &str) -> Option<i64> {
    serde_json::from_str::<Value>(payload)
        .ok()?
        .get("goal_id")?
        .as_i64()
}

/// How one planning attempt ended: the template used, or why the goal failed.
type Planned = Result<Option<String>, String>;

/// Handles one `goal.submitted` message: counts the attempt, then claims the
/// goal, asks its planner for a blueprint and installs it (or fails the goal
/// saying why), all in one transaction, so a worker dying midway leaves the
/// goal submitted for the sweep to dispatch again. A goal whose planning
/// fails [`store::MAX_PLAN_ATTEMPTS`] times fails with the last error.
pub async fn plan_goal(shared: &crate::worker::Shared, list: &str, payload: &str) {
    let Some(goal_id) = goal_id(payload) else {
        tracing::warn!(payload, "dropping a malformed planner message");
        return;
    };
    let started = std::time::Instant::now();
    let planned = attempt_planning(shared, goal_id).await;
    let elapsed = started.elapsed();
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    let outcome = match &planned {
        Ok(Some(Ok(_))) => Some("planned"),
        Ok(Some(Err(_))) => Some("failed"),
        _ => None,
    };
    if let Some(outcome) = outcome {
        crate::metrics::METRICS
            .planning
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }
    match planned {
        Ok(None) => tracing::debug!(
            goal_id,
            "goal is not waiting for a plan (duplicate message, or another planner has it); dropped"
        ),
        Ok(Some(Ok(template))) => tracing::info!(
            goal_id,
            template = template.as_deref(),
            elapsed_ms,
            "goal planned"
        ),
        Ok(Some(Err(reason))) => {
            tracing::info!(goal_id, %reason, "goal could not be planned; failed")
        }
        Err(error) if error.is_unavailable() => {
            shared.hand_back(list, &[payload.to_owned()], &error).await
        }
        Err(error) => {
            tracing::warn!(goal_id, %error, "planning failed; the sweep dispatches the goal again")
        }
    }
}

/// `None`: the goal was not waiting for this planner (dropped).
async fn attempt_planning(
    shared: &crate::worker::Shared,
    goal_id: i64,
) -> Result<Option<Planned>, StoreError> {
    let attempt = with_retries(&shared.pool, || async {
        let mut client = shared.pool.get().await?;
        store::count_plan_attempt(&mut client, goal_id).await
    })
    .await?;
    let Some(attempt) = attempt else {
        return Ok(None);
    };
    if attempt.number > store::MAX_PLAN_ATTEMPTS {
        // The earlier attempts failed, or their workers died before saying why.
        let last = attempt
            .previous_error
            .unwrap_or_else(|| "the worker planning it stopped before it finished".to_owned());
        return give_up(shared, goal_id, &last).await.map(Some);
    }
    match with_retries(&shared.pool, || plan_once(shared, goal_id)).await {
        Err(error) if !error.is_unavailable() => {
            let message = error.to_string();
            if attempt.number >= store::MAX_PLAN_ATTEMPTS {
                return give_up(shared, goal_id, &message).await.map(Some);
            }
            let noted = with_retries(&shared.pool, || async {
                let client = shared.pool.get().await?;
                store::note_planning_error(&client, goal_id, &message).await
            })
            .await;
            if let Err(noted) = noted {
                tracing::warn!(goal_id, error = %noted, "could not keep the planning error");
            }
            Err(error)
        }
        other => other,
    }
}

/// Fails a goal whose planning failed [`store::MAX_PLAN_ATTEMPTS`] times.
async fn give_up(
    shared: &crate::worker::Shared,
    goal_id: i64,
    last_error: &str,
) -> Result<Planned, StoreError> {
    let message = format!(
        "planning failed {} times: {last_error}",
        store::MAX_PLAN_ATTEMPTS
    );
    with_retries(&shared.pool, || async {
        let mut client = shared.pool.get().await?;
        let tx = store::begin(&mut client).await?;
        store::fail_planning(&tx, goal_id, &message).await?;
        Ok(tx.commit().await?)
    })
    .await?;
    Ok(Err(message))
}

/// One planning transaction; `None` if the goal is no longer submitted.
async fn plan_once(
    shared: &crate::worker::Shared,
    goal_id: i64,
) -> Result<Option<Planned>, StoreError> {
    let mut client = shared.pool.get().await?;
    let tx = store::begin(&mut client).await?;
    let Some(claimed) = store::claim_goal(&tx, goal_id).await? else {
        return Ok(None);
    };
    let outcome = match (shared.planners.get(&claimed.planner), claimed.input) {
        (_, Err(unreadable)) => Err(unreadable),
        (None, _) => Err(format!(
            "unknown planner \"{}\" (this worker has: {})",
            claimed.planner,
            shared.planners.names().join(", ")
        )),
        (Some(planner), Ok(input)) => {
            let request = GoalRequest {
                id: goal_id,
                goal: claimed.goal,
                input,
            };
            match planner.plan(&tx, &request).await {
                Ok(plan) => Ok(plan),
                Err(PlanError::Rejected(message)) => Err(message),
                Err(PlanError::Store(error)) => return Err(error),
            }
        }
    };
    let result = match outcome {
        Ok(plan) => {
            let params = Value::Object(plan.params);
            let problems = store::install_plan(
                &tx,
                goal_id,
                &plan.blueprint,
                plan.template.as_deref(),
                &params,
            )
            .await?;
            match problems.as_array().map(Vec::len).unwrap_or(0) {
                0 => Ok(plan.template),
                n => Err(format!("the planned blueprint has {n} problems")),
            }
        }
        Err(message) => {
            store::fail_planning(&tx, goal_id, &message).await?;
            Err(message)
        }
    };
    tx.commit().await?;
    Ok(Some(result))
}

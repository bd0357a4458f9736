//! Planners turn a goal into a blueprint. The template planner ships with
//! the worker; others plug in by name through [`Planner`].
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use deadpool_postgres::Transaction;
use serde_json::{Map, Value};

use crate::store::StoreError;

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

/// Handles one `goal.submitted` message: claims the goal, asks its planner
/// for a blueprint and installs it (or fails the goal saying why), all in one
/// transaction, so a worker dying midway leaves the goal submitted for the
/// sweep to dispatch again.
pub async fn plan_goal(shared: &crate::worker::Shared, list: &str, payload: &str) {
    let Some(goal_id) = goal_id(payload) else {
        tracing::warn!(payload, "dropping a malformed planner message");
        return;
    };
    let started = std::time::Instant::now();
    let planned = crate::executor::with_retries(|| async {
        let mut client = shared.pool.get().await?;
        let tx = client.transaction().await?;
        let Some(claimed) = crate::store::claim_goal(&tx, goal_id).await? else {
            return Ok(None);
        };
        let outcome = match shared.planners.get(&claimed.planner) {
            None => Err(format!(
                "unknown planner \"{}\" (this worker has: {})",
                claimed.planner,
                shared.planners.names().join(", ")
            )),
            Some(planner) => {
                let request = GoalRequest {
                    id: goal_id,
                    goal: claimed.goal,
                    input: claimed.input,
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
                let problems = crate::store::install_plan(
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
                crate::store::fail_planning(&tx, goal_id, &message).await?;
                Err(message)
            }
        };
        tx.commit().await?;
        Ok(Some(result))
    })
    .await;
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
            "goal is not waiting for a plan (duplicate message); dropped"
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

//! Actions: what a step does. The built-ins live here; custom actions
//! implement [`Action`] and are registered in an [`ActionRegistry`] by the
//! binary that embeds the worker.
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

mod exec;
mod http;
mod http_fence;
mod limit;
mod numeric;
mod simple;
pub(crate) mod sql;
mod statement;

pub use exec::Exec;
pub use http::Http;
pub use http_fence::HttpFence;
pub use limit::ResultLimit;
pub use simple::{Fail, Noop, Sleep, Transform};
pub use sql::Sql;

/// What one attempt of a step sees.
pub struct ActionContext {
    /// Goal id.
    pub goal_id: i64,
    /// Task id.
    pub task_id: i64,
    /// Step id.
    pub step: String,
    /// Attempt number, from 1.
    pub attempt: i32,
    /// The step's `params` from the blueprint.
    pub params: Value,
    /// The step's evaluated input.
    pub input: Value,
    /// `goal` for the step's expressions (`{id, goal, input, params}`); null when no
    /// parameter expression of the step reads it.
    pub goal: Value,
    /// `steps` for the step's expressions (id → `{status, result}`); null when no
    /// parameter expression of the step reads it.
    pub steps: Value,
    /// Set when `steps` cannot be one value (it is then null): their size in
    /// bytes. An expression that reads `steps` then fails ([`Self::expression`]).
    pub steps_oversized: Option<i64>,
    /// What the step's expressions see besides `goal`, `steps` and `input`:
    /// `item` and `index` in an instance of a map step, `previous` and
    /// `iteration` in a loop; empty otherwise.
    pub extras: serde_json::Map<String, Value>,
    /// The attempt's time limit; the executor enforces it, actions may use it
    /// for their own I/O timeouts.
    pub timeout: Duration,
}

impl ActionContext {
    /// `source` compiled, to be evaluated over [`Self::variables`]: an error
    /// if it does not compile, or reads `steps` when they are missing.
    pub fn expression(&self, source: &str) -> Result<crate::blueprint::cel::Expression, String> {
        crate::stored::Steps::compile(source, self.steps_oversized)
    }

    /// What the step's expressions see (SPEC §4 contexts): `goal`, `steps`,
    /// `input`, and the extras of a map instance or a loop.
    pub fn variables(&self) -> serde_json::Map<String, Value> {
        let mut vars = serde_json::Map::new();
        vars.insert("goal".to_owned(), self.goal.clone());
        vars.insert("steps".to_owned(), self.steps.clone());
        vars.insert("input".to_owned(), self.input.clone());
        vars.extend(self.extras.clone());
        vars
    }
}

/// Why an attempt failed, and what should happen next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ActionError {
    /// A failure worth retrying (the step's `retries` and `backoff` apply).
    #[error("{0}")]
    Retryable(String),
    /// Retrying cannot help (bad params, a 4xx answer): the step fails now.
    #[error("{0}")]
    Permanent(String),
    /// An expression of the step could not be evaluated (a missing key, a wrong type):
    /// the blueprint is wrong, not the world. The step fails now, takes only its
    /// `always` edges (never `failure` ones), and the goal fails.
    #[error("{0}")]
    Definition(String),
}

impl ActionError {
    /// The message recorded as the task's error.
    pub fn message(&self) -> &str {
        match self {
            ActionError::Retryable(message)
            | ActionError::Permanent(message)
            | ActionError::Definition(message) => message,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ActionError::Retryable(_))
    }
}

/// The future an action returns.
pub type ActionFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, ActionError>> + Send + 'a>>;

/// A step action. `run` is called once per attempt; it is dropped (cancelled)
/// when the attempt times out, the goal is cancelled or the lease is lost, so
/// it must not leave work behind that outlives the future (e.g. spawn child
/// processes with `kill_on_drop`).
pub trait Action: Send + Sync + 'static {
    /// Name used in blueprints (`"action": "<name>"`).
    fn name(&self) -> &str;
    /// One line for the `synapse.actions` catalogue.
    fn description(&self) -> &str;
    /// Optional JSON schema of `params`, published in the catalogue.
    fn params_schema(&self) -> Option<Value> {
        None
    }
    /// Runs one attempt; the result becomes the step's `result`.
    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a>;
}

/// The actions a worker can run, by name.
#[derive(Clone, Default)]
pub struct ActionRegistry {
    actions: BTreeMap<String, Arc<dyn Action>>,
}

impl ActionRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in actions. `http` reaches only what `allowed_http` allows;
    /// `exec` runs only the programs in `allowed_programs`; `sql` is given
    /// (its pool must be one of its own: it resets every connection after
    /// each step); `http` and `exec` stop reading at `limit`.
    pub fn builtins(
        sql: Sql,
        allowed_http: HttpFence,
        allowed_programs: Vec<String>,
        limit: ResultLimit,
    ) -> Self {
        let mut registry = Self::new();
        registry.register(Noop);
        registry.register(Sleep);
        registry.register(Fail);
        registry.register(Transform);
        registry.register(Http::new(allowed_http).with_result_limit(limit));
        registry.register(Exec::new(allowed_programs).with_result_limit(limit));
        registry.register(sql);
        registry
    }

    /// The same actions, each of whose results must fit `limit` (serialized as
    /// JSON): a larger one fails the attempt, permanently, instead of being
    /// recorded.
    pub fn bounded(self, limit: ResultLimit) -> Self {
        let actions = self
            .actions
            .into_iter()
            .map(|(name, inner)| {
                let bounded: Arc<dyn Action> = Arc::new(Bounded { inner, limit });
                (name, bounded)
            })
            .collect();
        Self { actions }
    }

    /// Adds (or replaces) an action.
    pub fn register(&mut self, action: impl Action) -> &mut Self {
        self.actions
            .insert(action.name().to_owned(), Arc::new(action));
        self
    }

    /// Adds (or replaces) an action that is already shared.
    pub fn register_shared(&mut self, action: Arc<dyn Action>) -> &mut Self {
        self.actions.insert(action.name().to_owned(), action);
        self
    }

    /// The action called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Action>> {
        self.actions.get(name).cloned()
    }

    /// Every registered action, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Action>> {
        self.actions.values()
    }
}

/// An action whose results are measured before they are recorded.
struct Bounded {
    inner: Arc<dyn Action>,
    limit: ResultLimit,
}

impl Action for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn description(&self) -> &str {
        self.inner.description()
    }

    fn params_schema(&self) -> Option<Value> {
        self.inner.params_schema()
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(async move {
            let value = self.inner.run(context).await?;
            self.limit.check(&value)?;
            Ok(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::simple::tests::context;
    use super::*;

    #[tokio::test]
    async fn results_over_the_limit_fail_whatever_the_action() {
        let mut registry = ActionRegistry::new();
        registry.register(Noop);
        let registry = registry.bounded(ResultLimit::new(64));
        let noop = registry.get("noop").expect("registered");
        assert_eq!(noop.name(), "noop");
        let small = json!({"a": 1});
        assert_eq!(
            noop.run(&context(json!({}), small.clone())).await,
            Ok(small)
        );
        let err = noop
            .run(&context(json!({}), json!("x".repeat(100))))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent(
                "result is larger than the 64 bytes limit (--max-result-size)".to_owned()
            )
        );
    }

    #[tokio::test]
    async fn results_nested_deeper_than_any_stored_document_fail_whatever_the_action() {
        let mut registry = ActionRegistry::new();
        registry.register(Noop);
        let registry = registry.bounded(ResultLimit::default());
        let noop = registry.get("noop").expect("registered");
        let nested = |levels: usize| (0..levels).fold(json!(1), |inner, _| json!([inner]));
        assert!(noop.run(&context(json!({}), nested(64))).await.is_ok());
        assert_eq!(
            noop.run(&context(json!({}), nested(65))).await,
            Err(ActionError::Permanent(
                "result is nested 65 levels deep; the limit is 64".to_owned()
            ))
        );
    }
}

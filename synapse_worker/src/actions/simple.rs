//! The built-in actions that touch nothing outside the worker: `noop`, `sleep`,
//! `fail` and `transform`, plus the parameter helpers every built-in shares.
//!
//! Each action accepts exactly the `params` that blueprint validation accepts
//! (`blueprint::validate`); a step that slipped past validation (e.g. a plan
//! written before a rule existed) fails permanently with a message naming the
//! field, since retrying the same parameters cannot help.

use std::time::Duration;

use serde_json::{json, Value};

use super::{Action, ActionContext, ActionError, ActionFuture};
use crate::blueprint::cel;
use crate::stored::Steps;

/// The longest `sleep`, as validation allows it (24 h).
const MAX_SLEEP_MS: u64 = 86_400_000;

/// The field `key` of the step's `params`: `None` when absent.
///
/// A missing `params` arrives as `null` from callers that build contexts by hand,
/// so `null` counts as an empty object.
pub(super) fn param<'a>(
    context: &'a ActionContext,
    key: &str,
) -> Result<Option<&'a Value>, ActionError> {
    match &context.params {
        Value::Object(fields) => Ok(fields.get(key)),
        Value::Null => Ok(None),
        other => Err(ActionError::Permanent(format!(
            "params: expected an object, got {}",
            kind(other)
        ))),
    }
}

/// A required string parameter.
pub(super) fn required_str<'a>(
    context: &'a ActionContext,
    key: &str,
) -> Result<&'a str, ActionError> {
    match param(context, key)? {
        None => Err(ActionError::Permanent(format!(
            "params.{key}: \"{key}\" is required"
        ))),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(expected(key, "a string", other)),
    }
}

/// An optional string parameter. Like validation, a present `null` is refused:
/// these fields have defaults, and `null` is not one of their values.
pub(super) fn optional_str<'a>(
    context: &'a ActionContext,
    key: &str,
) -> Result<Option<&'a str>, ActionError> {
    match param(context, key)? {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(expected(key, "a string", other)),
    }
}

/// The permanent error for parameter `key` holding the wrong kind of value.
pub(super) fn expected(key: &str, what: &str, got: &Value) -> ActionError {
    ActionError::Permanent(format!("params.{key}: expected {what}, got {}", kind(got)))
}

pub(super) use crate::blueprint::json_kind as kind;

/// Compiles and evaluates the CEL expression in parameter `key` over what every
/// expression of a step sees: `goal`, `steps` and the step's `input`.
///
/// Both failures are definition errors: the expression and its variables are the
/// same on every attempt, and the blueprint, not the world, is wrong.
pub(super) fn evaluate_param(
    context: &ActionContext,
    key: &str,
    expr: &str,
) -> Result<Value, ActionError> {
    let program = cel::compile(expr).map_err(|e| {
        ActionError::Definition(format!("params.{key}: invalid CEL expression: {e}"))
    })?;
    let cannot = |e: String| {
        ActionError::Definition(format!("cannot evaluate params.{key} \"{expr}\": {e}"))
    };
    Steps::check(&program, context.steps_oversized).map_err(cannot)?;
    program.evaluate(&context.variables()).map_err(cannot)
}

/// `noop`: the result is the input. Useful for joins and as a placeholder.
pub struct Noop;

impl Action for Noop {
    fn name(&self) -> &str {
        "noop"
    }

    fn description(&self) -> &str {
        "Does nothing; the result is the step's input."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({"type": "object"}))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(async move { Ok(context.input.clone()) })
    }
}

/// `sleep`: waits `params.ms` milliseconds (at most 24 h), then returns the input.
pub struct Sleep;

impl Action for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }

    fn description(&self) -> &str {
        "Waits params.ms milliseconds; the result is the step's input."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({
            "type": "object",
            "required": ["ms"],
            "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS}}
        }))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(async move {
            let ms = match param(context, "ms")? {
                None => {
                    return Err(ActionError::Permanent(
                        "params.ms: \"ms\" is required".to_owned(),
                    ))
                }
                Some(value) => match value.as_u64() {
                    Some(ms) if ms <= MAX_SLEEP_MS => ms,
                    Some(ms) => {
                        return Err(ActionError::Permanent(format!(
                            "params.ms: ms must be at most {MAX_SLEEP_MS} (24h), got {ms}"
                        )))
                    }
                    None => return Err(expected("ms", "a non-negative integer", value)),
                },
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(context.input.clone())
        })
    }
}

/// `fail`: always fails with `params.message` (default `"failed"`).
///
/// The failure is *retryable* on purpose: the action exists to exercise failure
/// handling, and a retryable error lets a blueprint test its `retries`, `backoff`
/// and `failure` edges all at once (with `retries: 0` it fails at once anyway).
pub struct Fail;

impl Action for Fail {
    fn name(&self) -> &str {
        "fail"
    }

    fn description(&self) -> &str {
        "Always fails (retryably) with params.message; for testing retries and failure edges."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({
            "type": "object",
            "properties": {"message": {"type": "string"}}
        }))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(async move {
            let message = optional_str(context, "message")?.unwrap_or("failed");
            Err(ActionError::Retryable(message.to_owned()))
        })
    }
}

/// `transform`: evaluates the CEL expression `params.expr` over `goal`, `steps` and
/// `input` (the step input); the result is its value.
pub struct Transform;

impl Action for Transform {
    fn name(&self) -> &str {
        "transform"
    }

    fn description(&self) -> &str {
        "Evaluates the CEL expression params.expr over goal, steps and input; the result is its value."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({
            "type": "object",
            "required": ["expr"],
            "properties": {"expr": {"type": "string", "description": "CEL over input and params"}}
        }))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(async move {
            let expr = required_str(context, "expr")?;
            evaluate_param(context, "expr", expr)
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Instant;

    use super::*;

    /// A context for one attempt with the given params and input.
    pub(in crate::actions) fn context(params: Value, input: Value) -> ActionContext {
        ActionContext {
            goal_id: 1,
            task_id: 2,
            step: "s".to_owned(),
            attempt: 1,
            params,
            input,
            goal: json!({"id": 1, "goal": "g", "input": {"threshold": 3}, "params": {}}),
            steps: json!({"a": {"status": "succeeded", "result": {"n": 7}},
                          "skipped": {"status": "skipped", "result": null}}),
            steps_oversized: None,
            extras: serde_json::Map::new(),
            timeout: Duration::from_secs(10),
        }
    }

    async fn run(action: &dyn Action, params: Value, input: Value) -> Result<Value, ActionError> {
        action.run(&context(params, input)).await
    }

    #[tokio::test]
    async fn noop_returns_input() {
        let input = json!({"a": [1, 2], "b": null});
        assert_eq!(run(&Noop, json!({}), input.clone()).await, Ok(input));
        assert_eq!(run(&Noop, Value::Null, json!(3)).await, Ok(json!(3)));
    }

    #[tokio::test]
    async fn sleep_waits_then_returns_input() {
        let started = Instant::now();
        let result = run(&Sleep, json!({"ms": 30}), json!({"x": 1})).await;
        assert_eq!(result, Ok(json!({"x": 1})));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(run(&Sleep, json!({"ms": 0}), json!(1)).await, Ok(json!(1)));
    }

    #[tokio::test]
    async fn sleep_rejects_what_validation_rejects() {
        for (params, fragment) in [
            (json!({}), "\"ms\" is required"),
            (
                json!({"ms": -5}),
                "expected a non-negative integer, got a number",
            ),
            (json!({"ms": 1.5}), "expected a non-negative integer"),
            (json!({"ms": "10"}), "got a string"),
            (json!({"ms": 86_400_001}), "at most 86400000"),
            (json!([1]), "params: expected an object"),
        ] {
            let err = run(&Sleep, params.clone(), json!(null)).await.unwrap_err();
            assert!(!err.is_retryable(), "{params}: {err:?}");
            assert!(err.message().contains(fragment), "{params}: {err:?}");
        }
    }

    #[tokio::test]
    async fn fail_is_retryable_with_its_message() {
        assert_eq!(
            run(&Fail, json!({"message": "boom"}), json!(null)).await,
            Err(ActionError::Retryable("boom".to_owned()))
        );
        assert_eq!(
            run(&Fail, json!({}), json!(null)).await,
            Err(ActionError::Retryable("failed".to_owned()))
        );
    }

    #[tokio::test]
    async fn fail_with_a_non_string_message_is_permanent() {
        let err = run(&Fail, json!({"message": 5}), json!(null))
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(
            err.message(),
            "params.message: expected a string, got a number"
        );
    }

    #[tokio::test]
    async fn transform_evaluates_over_goal_steps_and_input() {
        let params = json!({
            "expr": "{'severity': input.rows[0].priority > goal.input.threshold ? 'high' : 'low', 'n': steps.a.result.n}"
        });
        let input = json!({"rows": [{"priority": 5}]});
        assert_eq!(
            run(&Transform, params, input).await,
            Ok(json!({"severity": "high", "n": 7}))
        );
        // `params` is not a variable: every expression of a step sees the same three.
        let err = run(&Transform, json!({"expr": "params.expr"}), json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ActionError::Definition(_)), "{err:?}");
    }

    #[tokio::test]
    async fn reading_a_skipped_steps_result_says_it_was_skipped() {
        let err = run(
            &Transform,
            json!({"expr": "steps.skipped.result.x"}),
            json!({}),
        )
        .await
        .unwrap_err();
        assert!(
            err.message()
                .contains("steps.skipped was skipped: it has no result"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn transform_compile_error_is_a_definition_error() {
        let err = run(&Transform, json!({"expr": "{'a': }"}), json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ActionError::Definition(_)), "{err:?}");
        assert!(
            err.message()
                .starts_with("params.expr: invalid CEL expression: "),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn transform_evaluation_error_is_a_definition_error() {
        let err = run(&Transform, json!({"expr": "input.missing + 1"}), json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, ActionError::Definition(_)), "{err:?}");
        assert_eq!(
            err.message(),
            "cannot evaluate params.expr \"input.missing + 1\": No such key: missing"
        );
    }

    #[tokio::test]
    async fn with_steps_too_large_only_an_expression_reading_them_fails() {
        let mut context = context(json!({"expr": "'next steps'"}), json!({}));
        context.steps = Value::Null;
        context.steps_oversized = Some(300_000_000);
        assert_eq!(Transform.run(&context).await, Ok(json!("next steps")));
        context.params = json!({"expr": "size(steps)"});
        match Transform.run(&context).await {
            Err(ActionError::Definition(message)) => assert_eq!(
                message,
                format!(
                    "cannot evaluate params.expr \"size(steps)\": {}",
                    Steps::oversized_error(300_000_000)
                )
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn transform_requires_a_string_expr() {
        let err = run(&Transform, json!({}), json!({})).await.unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent("params.expr: \"expr\" is required".to_owned())
        );
        let err = run(&Transform, json!({"expr": 1}), json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            ActionError::Permanent("params.expr: expected a string, got a number".to_owned())
        );
    }

    #[test]
    fn names_match_the_builtin_list() {
        let names = [Noop.name(), Sleep.name(), Fail.name(), Transform.name()];
        for name in names {
            assert!(crate::blueprint::BUILTIN_ACTIONS.contains(&name), "{name}");
        }
    }
}

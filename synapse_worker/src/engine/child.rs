//! Child goals (SPEC §4.7): what a `goal` step's attempt starts, from its
//! params evaluated over what the step's expressions see. The child runs as a
//! goal of its own; the step waits for it, holding no worker, and ends with it.
use serde_json::Value;

use crate::actions::ActionContext;

/// The built-in action that runs a child goal.
pub const ACTION: &str = "goal";

/// The child goal an attempt starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    /// A goal text, planned by a planner.
    Goal {
        /// The goal text.
        text: String,
        /// The planner's name.
        planner: String,
    },
    /// A blueprint, validated when the child is started.
    Blueprint(Value),
}

/// Evaluates the step's `params.goal` (CEL giving the goal text) or
/// `params.blueprint` (an object, or CEL giving one). An expression that
/// cannot be evaluated, or gives the wrong kind of value, is a definition
/// error: the message says which.
pub fn child_of(context: &ActionContext) -> Result<Child, String> {
    let params = context.params.as_object().cloned().unwrap_or_default();
    let vars = context.variables();
    let evaluate = |key: &str, source: &str| -> Result<Value, String> {
        context
            .expression(source)
            .and_then(|expression| expression.evaluate(&vars))
            .map_err(|message| format!("cannot evaluate params.{key} \"{source}\": {message}"))
    };
    match (params.get("goal"), params.get("blueprint")) {
        (Some(Value::String(source)), None) => match evaluate("goal", source)? {
            Value::String(text) => Ok(Child::Goal {
                text,
                planner: params
                    .get("planner")
                    .and_then(Value::as_str)
                    .unwrap_or("template")
                    .to_owned(),
            }),
            other => Err(format!(
                "params.goal \"{source}\" gave {}, not a goal text",
                crate::blueprint::json_kind(&other)
            )),
        },
        (None, Some(Value::Object(blueprint))) => {
            Ok(Child::Blueprint(Value::Object(blueprint.clone())))
        }
        (None, Some(Value::String(source))) => match evaluate("blueprint", source)? {
            blueprint @ Value::Object(_) => Ok(Child::Blueprint(blueprint)),
            other => Err(format!(
                "params.blueprint \"{source}\" gave {}, not a blueprint object",
                crate::blueprint::json_kind(&other)
            )),
        },
        _ => Err("a goal step needs params.goal (a goal text) or params.blueprint (a plan)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};
    use std::time::Duration;

    fn context(params: Value, input: Value) -> ActionContext {
        ActionContext {
            goal_id: 1,
            task_id: 2,
            step: "child".into(),
            attempt: 1,
            params,
            input,
            goal: json!({"id": 1, "goal": "g", "input": {}, "params": {}}),
            steps: json!({"plan": {"status": "succeeded", "result": {"steps": [{"id": "a", "action": "noop"}]}}}),
            steps_oversized: None,
            extras: Map::new(),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_goal_text_is_evaluated_and_planned_by_the_template_planner_by_default() {
        let child = child_of(&context(
            json!({"goal": "'triage incident ' + string(input.id)"}),
            json!({"id": 7}),
        ));
        assert_eq!(
            child,
            Ok(Child::Goal {
                text: "triage incident 7".into(),
                planner: "template".into()
            })
        );
    }

    #[test]
    fn a_blueprint_is_given_or_computed_by_an_earlier_step() {
        let given = json!({"steps": [{"id": "x", "action": "noop"}]});
        assert_eq!(
            child_of(&context(json!({"blueprint": given.clone()}), json!({}))),
            Ok(Child::Blueprint(given))
        );
        assert_eq!(
            child_of(&context(
                json!({"blueprint": "steps.plan.result"}),
                json!({})
            )),
            Ok(Child::Blueprint(
                json!({"steps": [{"id": "a", "action": "noop"}]})
            ))
        );
    }

    #[test]
    fn values_of_the_wrong_kind_say_so() {
        let error = child_of(&context(json!({"goal": "input.id"}), json!({"id": 7}))).unwrap_err();
        assert_eq!(
            error,
            "params.goal \"input.id\" gave a number, not a goal text"
        );
        let error = child_of(&context(json!({"blueprint": "[1]"}), json!({}))).unwrap_err();
        assert!(error.contains("not a blueprint object"), "{error}");
        let error = child_of(&context(json!({"goal": "input.missing"}), json!({}))).unwrap_err();
        assert!(error.starts_with("cannot evaluate params.goal"), "{error}");
    }
}

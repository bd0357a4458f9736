//! Loops (SPEC §4.8): after each successful run of a step with `until`, the
//! condition decides whether the step succeeds with this result or runs
//! again as the next iteration, its input evaluated anew with `previous`.
//! Decided by the worker that ran it, over what the step's expressions see.
use serde_json::{Map, Value};

use crate::actions::ActionContext;
use crate::blueprint::limits;
use crate::store::{AttemptOutcome, Looping};

/// What a loop's successful run leads to: success once `until` holds, the
/// next iteration while it does not, failure after `max_iterations`. An
/// expression that cannot be evaluated is a definition error.
pub fn after_run(context: &ActionContext, looping: &Looping, result: Value) -> AttemptOutcome {
    let mut vars = context.variables();
    vars.insert("result".into(), result.clone());
    let until = &looping.until;
    let met = context
        .expression(until)
        .and_then(|expression| expression.evaluate_bool(&vars));
    match met {
        Err(message) => AttemptOutcome::DefinitionError(format!(
            "cannot evaluate the until \"{until}\" of step {}: {message}",
            context.step
        )),
        Ok(true) => AttemptOutcome::Succeeded(result),
        Ok(false) if looping.iteration >= looping.max_iterations => {
            AttemptOutcome::Failed(format!(
                "until \"{until}\" was not met after {} iterations",
                looping.iteration
            ))
        }
        Ok(false) => match next_input(context, looping, &result) {
            Ok(input) => AttemptOutcome::Again { result, input },
            Err(message) => AttemptOutcome::DefinitionError(message),
        },
    }
}

/// The next iteration's input: the step's `input` expression evaluated with
/// `previous` (this result) and the next `iteration`, or the same input when
/// the step has none (its parents' results do not change).
fn next_input(context: &ActionContext, looping: &Looping, result: &Value) -> Result<Value, String> {
    let Some(source) = &looping.input_expr else {
        return Ok(context.input.clone());
    };
    let mut vars = Map::new();
    vars.insert("goal".into(), context.goal.clone());
    vars.insert("steps".into(), context.steps.clone());
    vars.insert("previous".into(), result.clone());
    vars.insert("iteration".into(), Value::from(looping.iteration + 1));
    context
        .expression(source)
        .and_then(|expression| expression.evaluate(&vars))
        .map_err(|message| {
            format!(
                "cannot evaluate the input \"{source}\" of step {} for iteration {}: {message}",
                context.step,
                looping.iteration + 1
            )
        })
        .and_then(|input| {
            let what = format!(
                "the input of step {} for iteration {}",
                context.step,
                looping.iteration + 1
            );
            limits::check_depth(&what, &input).map(|()| input)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn context(input: Value, iteration: i32) -> ActionContext {
        let mut extras = Map::new();
        extras.insert("previous".into(), Value::Null);
        extras.insert("iteration".into(), json!(iteration));
        ActionContext {
            goal_id: 1,
            task_id: 2,
            step: "ask".into(),
            attempt: 1,
            params: json!({}),
            input,
            goal: Value::Null,
            steps: Value::Null,
            steps_oversized: None,
            extras,
            timeout: Duration::from_secs(1),
        }
    }

    fn looping(until: &str, input_expr: Option<&str>, iteration: i32) -> Looping {
        Looping {
            until: until.into(),
            input_expr: input_expr.map(str::to_owned),
            iteration,
            max_iterations: 3,
        }
    }

    #[test]
    fn a_loop_succeeds_with_the_result_that_met_until() {
        let outcome = after_run(
            &context(json!({}), 1),
            &looping("result.ok", None, 1),
            json!({"ok": true}),
        );
        assert!(matches!(outcome, AttemptOutcome::Succeeded(ref r) if r == &json!({"ok": true})));
    }

    #[test]
    fn a_loop_runs_again_with_its_input_evaluated_over_previous_and_iteration() {
        let outcome = after_run(
            &context(json!({"n": 0}), 1),
            &looping(
                "result.n >= 3",
                Some("{'n': previous == null ? 0 : previous.n, 'iteration': iteration}"),
                1,
            ),
            json!({"n": 1}),
        );
        match outcome {
            AttemptOutcome::Again { result, input } => {
                assert_eq!(result, json!({"n": 1}));
                assert_eq!(input, json!({"n": 1, "iteration": 2}));
            }
            other => panic!("{other:?}"),
        }
        let same_input = after_run(
            &context(json!({"n": 0}), 1),
            &looping("false", None, 2),
            json!(null),
        );
        assert!(
            matches!(same_input, AttemptOutcome::Again { ref input, .. } if input == &json!({"n": 0}))
        );
    }

    #[test]
    fn a_loop_fails_after_max_iterations_saying_until_was_not_met() {
        let outcome = after_run(&context(json!({}), 3), &looping("false", None, 3), json!(1));
        assert!(
            matches!(outcome, AttemptOutcome::Failed(ref e) if e == "until \"false\" was not met after 3 iterations"),
            "{outcome:?}"
        );
    }

    #[test]
    fn an_until_that_cannot_be_evaluated_is_a_definition_error() {
        let outcome = after_run(
            &context(json!({}), 1),
            &looping("result.missing > 1", None, 1),
            json!({}),
        );
        assert!(
            matches!(outcome, AttemptOutcome::DefinitionError(ref e) if e.contains("until")),
            "{outcome:?}"
        );
    }

    #[test]
    fn with_steps_too_large_only_an_until_reading_them_fails() {
        let mut context = context(json!({}), 1);
        context.steps_oversized = Some(300_000_000);
        let met = after_run(&context, &looping("'steps' != ''", None, 1), json!(1));
        assert!(matches!(met, AttemptOutcome::Succeeded(_)), "{met:?}");
        let reading = after_run(&context, &looping("size(steps) > 0", None, 1), json!(1));
        assert!(
            matches!(reading, AttemptOutcome::DefinitionError(ref e)
                if e.ends_with(&crate::stored::Steps::oversized_error(300_000_000))),
            "{reading:?}"
        );
    }
}

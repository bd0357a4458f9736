//! What one stored JSON value holds, shared by the worker's statements and
//! the extension's: the limit, how a value is measured against it, and a
//! goal's `steps` built only when they fit. Past the limit, a statement
//! building one value fails, and with it the transaction around it at every
//! attempt: the value is measured in the same pass and refused instead.
use std::fmt::Write;

use serde_json::Value;

use crate::blueprint::cel;

/// The most a jsonb value holds, in Postgres's own encoding: past it, the
/// statement building one fails. (A macro, for the statements' text.)
macro_rules! max_stored_json_bytes {
    () => {
        268435455
    };
}

/// [`max_stored_json_bytes`], for messages.
pub const MAX_STORED_JSON_BYTES: i64 = max_stored_json_bytes!();

/// What `$value` (a jsonb result, keyed by `$key` in an object of results)
/// adds to that object, as Postgres stores it: the value rebuilt, to measure
/// it uncompressed, with room for its key (NULL for a NULL value).
macro_rules! stored_size {
    ($key:literal, $value:literal) => {
        concat!(
            "octet_length(",
            $key,
            ") + 8 + pg_column_size(",
            $value,
            "
              || CASE WHEN jsonb_typeof(",
            $value,
            ") = 'object' THEN '{}'::jsonb ELSE '[]'::jsonb END)"
        )
    };
}

/// A scalar subquery over the goal whose id is `$goal_id`: its `steps`; or,
/// when they cannot be one value, their size in bytes (a JSON number in
/// place of the object). Each result is copied once more to be measured:
/// only for expressions that read `steps`.
macro_rules! steps_of_goal {
    ($goal_id:literal) => {
        concat!(
            "SELECT CASE WHEN max(s.bytes) > ", max_stored_json_bytes!(), " THEN to_jsonb(max(s.bytes))
                         ELSE coalesce(jsonb_object_agg(s.step, s.entry)
                                         FILTER (WHERE s.bytes <= ", max_stored_json_bytes!(), "), '{}') END
               FROM (SELECT s.step, s.entry, sum(", stored_size!("s.step", "s.entry"), ") OVER () AS bytes
                       FROM (SELECT s.step, jsonb_build_object('status', s.status, 'result', s.result) AS entry
                               FROM synapse.tasks s WHERE s.goal_id = ", $goal_id, " AND s.map_index IS NULL) s) s"
        )
    };
}

/// [`steps_of_goal`] for the goal `$1`.
pub const STEPS_OF_GOAL: &str = steps_of_goal!("$1");

/// A goal's `steps`, or their size when they cannot be one value.
#[derive(Debug, Clone, PartialEq)]
pub enum Steps {
    /// Step id → `{status, result}`.
    Map(Value),
    /// Their size in bytes, over [`MAX_STORED_JSON_BYTES`].
    Oversized(i64),
}

impl Steps {
    /// Why an expression reading `steps` of `bytes` cannot be evaluated.
    pub fn oversized_error(bytes: i64) -> String {
        format!(
            "`steps` would hold {bytes} bytes of the goal's step results; one stored JSON value \
             holds at most {MAX_STORED_JSON_BYTES}"
        )
    }

    /// `source` compiled where `steps` may be missing for being `oversized`
    /// bytes: an error if it does not compile, or if it reads `steps` then.
    /// Only an expression that really reads it fails (not one that says
    /// "steps" in a string).
    pub fn compile(source: &str, oversized: Option<i64>) -> Result<cel::Expression, String> {
        let expression = cel::compile(source)?;
        Steps::check(&expression, oversized)?;
        Ok(expression)
    }

    /// An error if `expression` reads `steps` while they are missing for
    /// being `oversized` bytes.
    pub fn check(expression: &cel::Expression, oversized: Option<i64>) -> Result<(), String> {
        match oversized {
            Some(bytes) if expression.reads("steps") => Err(Steps::oversized_error(bytes)),
            _ => Ok(()),
        }
    }

    /// From what [`steps_of_goal`] gives.
    pub fn of(steps: Value) -> Steps {
        match steps.as_i64() {
            Some(bytes) => Steps::Oversized(bytes),
            None => Steps::Map(steps),
        }
    }
}

/// How much JSON text a statement writing many values as arrays carries:
/// far under what one jsonb value holds, even where a value's binary form
/// is larger than its text.
pub const RUN_BYTES: usize = 16 << 20;

/// A run of rows as JSON arrays, one per column.
#[derive(Debug, PartialEq)]
pub struct JsonRun {
    /// Each column's values of the run, as a JSON array's text.
    pub arrays: Vec<String>,
    /// How many rows it holds.
    pub rows: usize,
}

/// Rows of `columns` (of one length) as JSON arrays of text, cut into runs:
/// a run ends once its values hold [`RUN_BYTES`] (so a run passes it by one
/// row at most). Each value is written once, straight into its array.
pub fn json_array_runs(columns: &[&[Value]]) -> Vec<JsonRun> {
    let rows = columns.first().map_or(0, |column| column.len());
    let mut runs = Vec::new();
    let mut run = JsonRun {
        arrays: vec![String::new(); columns.len()],
        rows: 0,
    };
    for row in 0..rows {
        for (array, column) in run.arrays.iter_mut().zip(columns) {
            let separator = if run.rows == 0 { '[' } else { ',' };
            // Writing to a String cannot fail.
            let _ = write!(array, "{separator}{}", column[row]);
        }
        run.rows += 1;
        if run.arrays.iter().map(String::len).sum::<usize>() >= RUN_BYTES || row + 1 == rows {
            let next = JsonRun {
                arrays: vec![String::new(); columns.len()],
                rows: 0,
            };
            let mut ended = std::mem::replace(&mut run, next);
            ended.arrays.iter_mut().for_each(|array| array.push(']'));
            runs.push(ended);
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn with_steps_too_large_only_an_expression_reading_them_is_refused() {
        let refused = Steps::compile("size(steps) > 0", Some(300_000_000)).unwrap_err();
        assert_eq!(refused, Steps::oversized_error(300_000_000));
        assert!(Steps::compile("'next steps' + input.steps", Some(300_000_000)).is_ok());
        assert!(Steps::compile("size(steps) > 0", None).is_ok());
        // Not compiled: the compiler's error, whatever the size.
        assert!(Steps::compile("steps +", Some(300_000_000))
            .unwrap_err()
            .contains("Syntax error"));
    }

    #[test]
    fn steps_are_an_object_or_else_their_size() {
        assert_eq!(
            Steps::of(json!({"a": {"status": "succeeded", "result": 1}})),
            Steps::Map(json!({"a": {"status": "succeeded", "result": 1}}))
        );
        assert_eq!(Steps::of(json!(300_000_000)), Steps::Oversized(300_000_000));
        // A task's expressions that do not read them get null.
        assert_eq!(Steps::of(Value::Null), Steps::Map(Value::Null));
    }

    #[test]
    fn rows_are_written_as_arrays_in_runs_within_the_limit() {
        let inputs = [json!({"a": [1, 2]}), json!("x")];
        let items = [json!(1), Value::Null];
        assert_eq!(
            json_array_runs(&[&inputs, &items]),
            [JsonRun {
                arrays: vec![r#"[{"a":[1,2]},"x"]"#.into(), "[1,null]".into()],
                rows: 2
            }]
        );
        assert_eq!(json_array_runs(&[&[]]), []);
        // A run ends once it holds RUN_BYTES.
        let half = json!("x".repeat(RUN_BYTES / 2));
        let runs = json_array_runs(&[&[half.clone(), half.clone(), json!(1), half]]);
        assert_eq!(runs.iter().map(|run| run.rows).collect::<Vec<_>>(), [2, 2]);
        assert!(runs[1].arrays[0].starts_with("[1,\""));
        let parsed: Value = serde_json::from_str(&runs[0].arrays[0]).unwrap();
        assert_eq!(parsed.as_array().unwrap().len(), 2);
    }
}

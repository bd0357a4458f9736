//! What one stored JSON value holds, shared by the worker's statements and
//! the extension's: the limit, how a value is measured against it, and a
//! goal's `steps` built only when they fit. Past the limit, a statement
//! building one value fails, and with it the transaction around it at every
//! attempt: the value is measured in the same pass and refused instead.
use serde_json::Value;

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

    /// From what [`steps_of_goal`] gives.
    pub fn of(steps: Value) -> Steps {
        match steps.as_i64() {
            Some(bytes) => Steps::Oversized(bytes),
            None => Steps::Map(steps),
        }
    }
}

/// The most JSON text a statement writing many values in one array
/// parameter carries: well under what one jsonb value holds, even where a
/// value's binary form is larger than its text.
pub const RUN_BYTES: usize = 16 << 20;

/// `value`'s size as JSON text.
pub fn json_text_size(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(0, |text| text.len())
}

/// Values of `sizes` (in order) cut into runs of at most [`RUN_BYTES`] (a
/// larger value is a run of its own): where each run ends, the last at
/// their count.
pub fn run_ends(sizes: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut count, mut bytes) = (0, 0);
    for size in sizes {
        if bytes > 0 && bytes + size > RUN_BYTES {
            ends.push(count);
            bytes = 0;
        }
        bytes += size;
        count += 1;
    }
    ends.push(count);
    ends
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
    fn values_are_cut_into_runs_within_the_limit() {
        assert_eq!(run_ends([]), vec![0]);
        assert_eq!(run_ends([1, 2, 3]), vec![3]);
        let half = RUN_BYTES / 2;
        assert_eq!(run_ends([half, half, 1, half]), vec![2, 4]);
        assert_eq!(run_ends([RUN_BYTES * 2, 1]), vec![1, 2]);
        assert_eq!(
            json_text_size(&json!({"a": [1, 2]})),
            r#"{"a":[1,2]}"#.len()
        );
    }
}

//! The JSON budgets every document the engine accepts must fit (SPEC §4 rule 5):
//! 1 MiB of compact JSON text and 64 levels of nesting. Blueprints, goal inputs and
//! the inputs of root steps are held to them.
//!
//! Both measures are computed without recursion, so a document nested far deeper than
//! the limit cannot exhaust the stack of whoever checks it.

use std::io;

use serde_json::Value;

/// The largest JSON document accepted, measured as compact JSON text.
pub const MAX_JSON_BYTES: usize = 1 << 20;

/// The deepest nesting of arrays and objects accepted: `{}` is 1 level, `[{}]` 2,
/// a scalar 0.
pub const MAX_JSON_DEPTH: usize = 64;

/// Length of the compact JSON text of `value`, without building the string.
pub fn json_len(value: &Value) -> usize {
    json_len_within(value, usize::MAX).unwrap_or(usize::MAX)
}

/// Length of the compact JSON text of `value` if it is at most `limit`
/// bytes; `None` as soon as it passes the limit (the rest is never written).
pub fn json_len_within(value: &Value, limit: usize) -> Option<usize> {
    struct Counter {
        written: usize,
        limit: usize,
    }
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written = self.written.saturating_add(buf.len());
            if self.written > self.limit {
                return Err(io::Error::other("over the limit"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter { written: 0, limit };
    // Serializing a `Value` fails only when the counter stops it.
    serde_json::to_writer(&mut counter, value).ok()?;
    Some(counter.written)
}

/// How deeply arrays and objects nest in `value` (see [`MAX_JSON_DEPTH`]); iterative.
pub fn json_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(items) => {
                deepest = deepest.max(depth + 1);
                pending.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(fields) => {
                deepest = deepest.max(depth + 1);
                pending.extend(fields.values().map(|field| (field, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The message for `what` (e.g. `input`) taking `bytes` bytes of JSON text.
pub fn size_message(what: &str, bytes: usize) -> String {
    format!("{what} is {bytes} bytes; the limit is 1 MiB ({MAX_JSON_BYTES} bytes of JSON text)")
}

/// The message for `what` nesting `depth` levels deep.
pub fn depth_message(what: &str, depth: usize) -> String {
    format!("{what} is nested {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
}

/// Why `value`, called `what` in the message, is over a JSON limit.
/// The size is checked first.
pub fn check_json(what: &str, value: &Value) -> Result<(), String> {
    let bytes = json_len(value);
    if bytes > MAX_JSON_BYTES {
        return Err(size_message(what, bytes));
    }
    check_depth(what, value)
}

/// Why `value`, called `what` in the message, nests too deep: for documents
/// bounded in size elsewhere (a step's result) or not at all (the input the
/// engine makes of its parents' results), but read back by the worker's JSON
/// reader, which stops at 128 levels.
pub fn check_depth(what: &str, value: &Value) -> Result<(), String> {
    let depth = json_depth(value);
    if depth > MAX_JSON_DEPTH {
        return Err(depth_message(what, depth));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(levels: usize) -> Value {
        let mut value = json!(1);
        for level in 0..levels {
            value = if level % 2 == 0 {
                json!([value])
            } else {
                json!({ "k": value })
            };
        }
        value
    }

    #[test]
    fn depth_counts_containers() {
        assert_eq!(json_depth(&json!(1)), 0);
        assert_eq!(json_depth(&json!({})), 1);
        assert_eq!(json_depth(&json!([{}])), 2);
        assert_eq!(json_depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
        assert_eq!(json_depth(&nested(500)), 500);
    }

    #[test]
    fn length_is_compact_text() {
        let value = json!({"a": [1, "x\n"], "b": null});
        assert_eq!(json_len(&value), value.to_string().len());
    }

    #[test]
    fn limits_name_the_field() {
        assert_eq!(check_json("input", &nested(MAX_JSON_DEPTH)), Ok(()));
        assert_eq!(
            check_json("input", &nested(200)),
            Err("input is nested 200 levels deep; the limit is 64".to_owned())
        );
        let big = json!({ "pad": "x".repeat(MAX_JSON_BYTES) });
        let message = check_json("blueprint", &big).unwrap_err();
        assert!(
            message.starts_with("blueprint is 1048586 bytes; the limit is 1 MiB"),
            "{message}"
        );
    }
}

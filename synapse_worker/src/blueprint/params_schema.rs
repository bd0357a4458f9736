//! The `params_schema` of a registered action: a JSON Schema its steps' `params`
//! are checked against during validation.
//!
//! Only local schemas are supported: no `$ref` is fetched over the network or
//! from files, so a schema that needs one is refused as invalid.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::Value;

use super::validate::{index_path, key_path, Problem};

/// Longest message kept from one schema violation, in characters: the
/// validator quotes the offending value, which may be large.
const MAX_MESSAGE_CHARS: usize = 300;

/// A compiled `params_schema`.
pub struct ParamsSchema {
    validator: jsonschema::Validator,
}

impl fmt::Debug for ParamsSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ParamsSchema")
    }
}

impl ParamsSchema {
    /// Compiles `schema`; `Err` says why it is not a valid JSON Schema.
    pub fn new(schema: &Value) -> Result<Self, String> {
        let built = catch_unwind(AssertUnwindSafe(|| {
            jsonschema::options()
                .should_validate_formats(true)
                .build(schema)
                .map_err(|error| shorten(&error.to_string()))
        }));
        match built {
            Ok(Ok(validator)) => Ok(Self { validator }),
            Ok(Err(message)) => Err(message),
            Err(_) => Err("the schema could not be compiled".to_owned()),
        }
    }

    /// Every violation of the schema by `params` (at JSON path `path`), with the
    /// path of the offending value.
    pub fn check(&self, path: &str, params: &Value) -> Vec<Problem> {
        let checked = catch_unwind(AssertUnwindSafe(|| {
            self.validator
                .iter_errors(params)
                .map(|error| Problem {
                    path: instance_path(path, params, error.instance_path().as_str()),
                    message: shorten(&error.to_string()),
                })
                .collect::<Vec<_>>()
        }));
        checked.unwrap_or_else(|_| {
            vec![Problem {
                path: path.to_owned(),
                message: "the params could not be checked against the action's params_schema"
                    .to_owned(),
            }]
        })
    }
}

/// The JSON path of the value at JSON Pointer `pointer` inside `value`
/// (itself at `path`): a segment is an index where the value is an array.
fn instance_path(path: &str, value: &Value, pointer: &str) -> String {
    let mut out = path.to_owned();
    let mut current = Some(value);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match (current, segment.parse::<usize>()) {
            (Some(Value::Array(items)), Ok(index)) => {
                out = index_path(&out, index);
                current = items.get(index);
            }
            _ => {
                out = key_path(&out, &segment);
                current = current.and_then(|v| v.get(segment.as_str()));
            }
        }
    }
    out
}

fn shorten(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => message.to_owned(),
        Some((at, _)) => format!("{}…", &message[..at]),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn paths_follow_arrays_and_odd_keys() {
        let params = json!({"a": [{"b c": 1}], "0": 2});
        assert_eq!(instance_path("$", &params, ""), "$");
        assert_eq!(instance_path("$", &params, "/a/0/b c"), "$.a[0][\"b c\"]");
        assert_eq!(instance_path("$", &params, "/0"), "$[\"0\"]");
    }

    #[test]
    fn long_messages_are_shortened() {
        let schema = ParamsSchema::new(&json!({"properties": {"x": {"type": "string"}}})).unwrap();
        let problems = schema.check("$", &json!({"x": vec![1; 1000]}));
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }
}

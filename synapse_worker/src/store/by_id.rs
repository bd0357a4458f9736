//! Batches handed to a statement as one JSON object keyed by row id.
//!
//! The engine's statements read each table by id or by key and join a batch
//! to nothing: each row finds its own values with `->` in a jsonb parameter.
//! Joined instead (`UPDATE … FROM unnest($1, $2)`), on statistics that call
//! a table of thousands of rows nearly empty (most goals deleted, then
//! vacuumed), the planner put the whole table on the outer side of the join:
//! every claim read every task.
use serde::{Serialize, Serializer};
use tokio_postgres::types::Json;

/// `(id, value)` pairs as `{"id": value, …}`, written straight from the
/// borrowed values.
#[derive(Debug)]
pub(super) struct ById<'a, T>(&'a [(i64, T)]);

impl<T: Serialize> Serialize for ById<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(id, value)| (id, value)))
    }
}

/// `pairs` as a jsonb parameter.
pub(super) fn by_id<T>(pairs: &[(i64, T)]) -> Json<ById<'_, T>> {
    Json(ById(pairs))
}

/// The ids of `pairs`, for `id = ANY($n)`.
pub(super) fn ids<T>(pairs: &[(i64, T)]) -> Vec<i64> {
    pairs.iter().map(|(id, _)| *id).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn keys_are_the_ids_as_text_and_values_are_kept_as_they_are() {
        let pairs = [(7, json!({"a": [1, 2]})), (-1, Value::Null)];
        assert_eq!(
            serde_json::to_value(ById(&pairs)).unwrap(),
            json!({"7": {"a": [1, 2]}, "-1": null})
        );
        assert_eq!(ids(&pairs), vec![7, -1]);
    }
}

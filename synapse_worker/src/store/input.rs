//! The input a step is queued with: its own, evaluated by the engine, or its
//! default, its parents' results, which Postgres assembles from the parents'
//! rows in the statement that queues it. Built by the worker instead, a large
//! result before a wide fan-out was copied into every successor's input in
//! the worker's memory and sent back in one parameter, which outgrew what one
//! jsonb value may hold (256 MB): the parent's outcome could not be recorded.
use serde::{Serialize, Serializer};
use serde_json::Value;
use tokio_postgres::types::Json;

/// The input a step is queued with.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskInput {
    /// Its own (an `input` expression's value, or a root's goal input).
    Given(Value),
    /// Its default: parent step → result, of its taken inbound edges.
    ParentResults,
}

/// The given inputs of `(id, input)` pairs as `{"id": input, …}`; a step
/// that takes its parents' results has no entry.
#[derive(Debug)]
pub(super) struct GivenById<'a>(&'a [(i64, TaskInput)]);

impl Serialize for GivenById<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().filter_map(|(id, input)| match input {
            TaskInput::Given(value) => Some((id, value)),
            TaskInput::ParentResults => None,
        }))
    }
}

/// `pairs`' given inputs as a jsonb parameter ([`given_or_parent_results`]).
pub(super) fn given_by_id(pairs: &[(i64, TaskInput)]) -> Json<GivenById<'_>> {
    Json(GivenById(pairs))
}

/// The result of the parent step of edge `e` (`null` for none), found by
/// its key: one probe.
macro_rules! parent_result {
    () => {
        "SELECT coalesce(p.result, 'null'::jsonb) AS result FROM synapse.tasks p
          WHERE p.goal_id = e.goal_id AND p.step = e.from_step AND coalesce(p.map_index, -1) = -1
          LIMIT 1"
    };
}

/// The input of task row `t`: its entry in `$given` (a jsonb object by id,
/// [`given_by_id`]), or else its parents' results, of its taken inbound
/// edges (whose resolutions must be written before).
macro_rules! given_or_parent_results {
    ($given:literal) => {
        concat!(
            "coalesce(",
            $given,
            "::jsonb -> t.id::text,
                  (SELECT coalesce(jsonb_object_agg(e.from_step, p.result), '{}')
                     FROM synapse.edges e
                    CROSS JOIN LATERAL (",
            parent_result!(),
            ") p
                    WHERE e.goal_id = t.goal_id AND e.to_step = t.step AND e.state = 'taken'))"
        )
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_given_inputs_are_sent_even_null_ones() {
        let pairs = [
            (7, TaskInput::Given(json!({"a": 1}))),
            (8, TaskInput::ParentResults),
            (9, TaskInput::Given(Value::Null)),
        ];
        assert_eq!(
            serde_json::to_value(GivenById(&pairs)).unwrap(),
            json!({"7": {"a": 1}, "9": null})
        );
    }
}

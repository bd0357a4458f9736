//! The blueprint (PlanBlueprint) model: a DAG of steps joined by conditional edges.
//!
//! This module is shared by the `synapse` extension (synchronous validation in
//! `submit_plan` and `validate_blueprint`) and by the worker (planner, graph engine), so it
//! depends on nothing beyond serde, `cel`, `regex` and `jsonschema` (for the `params_schema`
//! of registered actions). Use [`validate`] to turn untrusted
//! JSON into a [`Blueprint`]: it reports every problem with its JSON path, whereas plain
//! deserialization stops at the first.

pub mod cel;
pub mod duration;
pub mod limits;
mod params_schema;
pub mod scope;
mod validate;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::duration::{format_duration, parse_duration};
pub use self::params_schema::ParamsSchema;
pub use self::validate::{
    is_valid_queue, kind as json_kind, validate, validate_interruptible,
    validate_with_params_schemas, Problem, MAX_BLUEPRINT_BYTES, MAX_STEPS,
};

/// Actions every worker implements; any other action must be registered by a worker in
/// `synapse.actions`.
pub const BUILTIN_ACTIONS: &[&str] = &["noop", "sleep", "fail", "transform", "http", "exec", "sql"];

/// A workflow plan: steps, the edges between them, and how to compute the goal's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blueprint {
    /// A label for people; not used by the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The steps, in declaration order (which also breaks ties in scheduling order).
    pub steps: Vec<Step>,
    /// Dependencies: `to` waits for `from` to end.
    #[serde(default)]
    pub edges: Vec<Edge>,
    /// CEL computing the goal's result from `goal` and `steps`; by default, a map of the
    /// results of the succeeded leaf steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// One unit of work: an action run with parameters, retried on failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique within the blueprint; matches `^[a-z][a-z0-9_]{0,62}$`.
    pub id: String,
    /// The action to run: a built-in ([`BUILTIN_ACTIONS`]) or one a worker registered.
    pub action: String,
    /// Action parameters (a JSON object).
    #[serde(default = "default_params")]
    pub params: serde_json::Value,
    /// CEL computing the step's input; by default `goal.input` for a root step, else a
    /// map from parent id to parent result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The work queue the step is dispatched on.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// How many times a failed attempt is retried.
    #[serde(default)]
    pub retries: u32,
    /// Base delay before a retry (grows exponentially, with jitter).
    #[serde(default = "default_backoff", with = "duration::serde_str")]
    pub backoff: Duration,
    /// Time limit of one attempt.
    #[serde(default = "default_timeout", with = "duration::serde_str")]
    pub timeout: Duration,
    /// How the step combines its inbound edges.
    #[serde(default)]
    pub join: Join,
}

fn default_params() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn default_queue() -> String {
    "default".to_owned()
}

fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_timeout() -> Duration {
    Duration::from_secs(300)
}

/// How a step with several inbound edges decides to run once they have all resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Join {
    /// Run if at least one inbound edge was taken.
    #[default]
    Any,
    /// Run only if every inbound edge was taken.
    All,
}

/// Which outcome of the `from` step an edge follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeOn {
    /// The `from` step succeeded.
    #[default]
    Success,
    /// The `from` step failed after its retries.
    Failure,
    /// The `from` step succeeded or failed.
    Always,
}

/// A dependency between two steps, taken when the outcome matches `on` and `when` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// The step that must end first.
    pub from: String,
    /// The step that waits.
    pub to: String,
    /// CEL condition over the `from` step's outcome; absent means true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Which outcome of `from` the edge follows.
    #[serde(default)]
    pub on: EdgeOn,
}

impl Blueprint {
    /// The step with this id.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// Steps without an inbound edge, in declaration order: they are queued when the plan
    /// is installed.
    pub fn roots(&self) -> Vec<&str> {
        let targets: HashSet<&str> = self.edges.iter().map(|e| e.to.as_str()).collect();
        self.steps
            .iter()
            .map(|s| s.id.as_str())
            .filter(|id| !targets.contains(id))
            .collect()
    }

    /// Edges leading into step `id`, in declaration order.
    pub fn inbound<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Edge> + 'a {
        self.edges.iter().filter(move |e| e.to == id)
    }

    /// Edges leaving step `id`, in declaration order.
    pub fn outbound<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Edge> + 'a {
        self.edges.iter().filter(move |e| e.from == id)
    }

    /// Step ids ordered so that every edge points forward; among the steps ready at the same
    /// time, declaration order wins, so the order is deterministic.
    ///
    /// Steps on a cycle (or after one) are left out, which only happens for a blueprint that
    /// did not pass [`validate`]: comparing the length with `steps.len()` detects it.
    /// Edges naming unknown steps are ignored.
    pub fn topological_order(&self) -> Vec<&str> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut indegree = vec![0usize; self.steps.len()];
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); self.steps.len()];
        for edge in &self.edges {
            if let (Some(&from), Some(&to)) =
                (index.get(edge.from.as_str()), index.get(edge.to.as_str()))
            {
                indegree[to] += 1;
                children[from].push(to);
            }
        }
        // A min-heap of declaration indices (Kahn's algorithm) gives the deterministic order.
        let mut ready: BinaryHeap<Reverse<usize>> = indegree
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == 0)
            .map(|(i, _)| Reverse(i))
            .collect();
        let mut order = Vec::with_capacity(self.steps.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(self.steps[i].id.as_str());
            for &child in &children[i] {
                indegree[child] -= 1;
                if indegree[child] == 0 {
                    ready.push(Reverse(child));
                }
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal_step(id: &str) -> Step {
        serde_json::from_value(json!({"id": id, "action": "noop"})).unwrap()
    }

    fn diamond() -> Blueprint {
        serde_json::from_value(json!({
            "steps": [
                {"id": "d", "action": "noop"},
                {"id": "b", "action": "noop"},
                {"id": "c", "action": "noop"},
                {"id": "a", "action": "noop"}
            ],
            "edges": [
                {"from": "a", "to": "b"}, {"from": "a", "to": "c"},
                {"from": "b", "to": "d"}, {"from": "c", "to": "d"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn step_defaults() {
        let step = minimal_step("x");
        assert_eq!(step.params, json!({}));
        assert_eq!(step.input, None);
        assert_eq!(step.queue, "default");
        assert_eq!(step.retries, 0);
        assert_eq!(step.backoff, Duration::from_secs(1));
        assert_eq!(step.timeout, Duration::from_secs(300));
        assert_eq!(step.join, Join::Any);
    }

    #[test]
    fn edge_defaults_and_lowercase_enums() {
        let edge: Edge = serde_json::from_value(json!({"from": "a", "to": "b"})).unwrap();
        assert_eq!(edge.on, EdgeOn::Success);
        assert_eq!(edge.when, None);
        let edge: Edge =
            serde_json::from_value(json!({"from": "a", "to": "b", "on": "failure"})).unwrap();
        assert_eq!(edge.on, EdgeOn::Failure);
        assert_eq!(
            serde_json::to_value(EdgeOn::Always).unwrap(),
            json!("always")
        );
        assert_eq!(serde_json::to_value(Join::All).unwrap(), json!("all"));
    }

    #[test]
    fn durations_serialize_as_strings() {
        let step: Step = serde_json::from_value(
            json!({"id": "x", "action": "noop", "backoff": "250ms", "timeout": "2h"}),
        )
        .unwrap();
        assert_eq!(step.backoff, Duration::from_millis(250));
        let back = serde_json::to_value(&step).unwrap();
        assert_eq!(back["backoff"], json!("250ms"));
        assert_eq!(back["timeout"], json!("2h"));
        assert!(serde_json::from_value::<Step>(
            json!({"id": "x", "action": "noop", "timeout": "2 hours"})
        )
        .is_err());
    }

    #[test]
    fn unknown_fields_are_rejected_by_serde() {
        let err =
            serde_json::from_value::<Step>(json!({"id": "x", "action": "noop", "retires": 1}))
                .unwrap_err();
        assert!(err.to_string().contains("retires"), "{err}");
    }

    #[test]
    fn serialization_round_trips() {
        let bp = diamond();
        let text = serde_json::to_string(&bp).unwrap();
        let again: Blueprint = serde_json::from_str(&text).unwrap();
        assert_eq!(again, bp);
        // Absent options stay absent rather than becoming nulls.
        assert!(!text.contains("null"), "{text}");
    }

    #[test]
    fn graph_helpers() {
        let bp = diamond();
        assert_eq!(bp.roots(), vec!["a"]);
        assert_eq!(bp.step("c").map(|s| s.action.as_str()), Some("noop"));
        assert!(bp.step("zz").is_none());
        let into_d: Vec<&str> = bp.inbound("d").map(|e| e.from.as_str()).collect();
        assert_eq!(into_d, vec!["b", "c"]);
        let out_of_a: Vec<&str> = bp.outbound("a").map(|e| e.to.as_str()).collect();
        assert_eq!(out_of_a, vec!["b", "c"]);
        assert_eq!(bp.outbound("d").count(), 0);
    }

    #[test]
    fn topological_order_respects_edges_then_declaration_order() {
        let bp = diamond();
        assert_eq!(bp.topological_order(), vec!["a", "b", "c", "d"]);

        let independent = Blueprint {
            name: None,
            steps: vec![minimal_step("z"), minimal_step("y"), minimal_step("x")],
            edges: vec![],
            output: None,
        };
        assert_eq!(independent.topological_order(), vec!["z", "y", "x"]);
        assert_eq!(independent.roots(), vec!["z", "y", "x"]);
    }

    #[test]
    fn topological_order_leaves_out_a_cycle() {
        let mut bp = diamond();
        bp.edges.push(Edge {
            from: "d".into(),
            to: "a".into(),
            when: None,
            on: EdgeOn::Success,
        });
        assert!(bp.topological_order().len() < bp.steps.len());
    }

    #[test]
    fn builtin_actions_are_listed() {
        for name in ["noop", "sleep", "fail", "transform", "http", "exec", "sql"] {
            assert!(BUILTIN_ACTIONS.contains(&name), "{name}");
        }
    }
}

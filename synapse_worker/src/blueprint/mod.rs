//! The blueprint (PlanBlueprint) model: a DAG of steps joined by conditional edges.
//!
//! This module is shared by the `synapse` extension (synchronous validation in
//! `submit_plan` and `validate_blueprint`) and by the worker (planner, graph engine), so it
//! depends on nothing beyond serde, `cel`, `regex` and `jsonschema` (for the `params_schema`
//! of registered actions). Use [`validate`] to turn untrusted
//! JSON into a [`Blueprint`]: it reports every problem with its JSON path, whereas plain
//! deserialization stops at the first.

pub mod cel;
pub mod cel_budget;
pub mod duration;
pub mod limits;
mod params_schema;
pub mod scope;
mod validate;
pub mod wait;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use self::duration::{format_duration, parse_duration};
pub use self::params_schema::ParamsSchema;
pub use self::validate::{
    is_valid_queue, kind as json_kind, validate, validate_interruptible,
    validate_with_params_schemas, warm_up, Problem, MAX_BLUEPRINT_BYTES, MAX_STEPS,
};

/// Actions every worker implements; any other action must be registered by a worker in
/// `synapse.actions`.
pub const BUILTIN_ACTIONS: &[&str] = &[
    "noop",
    "sleep",
    "fail",
    "transform",
    "http",
    "exec",
    "sql",
    "goal",
    "wait",
];

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
    /// Time limit of one attempt. A `wait` step has none (validation refuses the field):
    /// its limit is `params.timeout`.
    #[serde(default = "default_timeout", with = "duration::serde_str")]
    pub timeout: Duration,
    /// How the step combines its inbound edges.
    #[serde(default)]
    pub join: Join,
    /// With `first` or n: when the step starts, its direct parents that have not ended
    /// are cancelled (§4.8).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_others: bool,
    /// CEL giving a list: the step runs once per item, as instances (§4.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// Most instances of a map step queued or running at once; unbounded when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// How many instances of a map step may fail with the step still succeeding.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tolerate: u32,
    /// CEL boolean over `result`: the step runs again until it holds (§4.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Most runs of a looping step (default [`DEFAULT_MAX_ITERATIONS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
}

/// Most items a `for_each` list may have.
pub const MAX_MAP_ITEMS: usize = 10_000;
/// Runs of a looping step when `max_iterations` is not given.
pub const DEFAULT_MAX_ITERATIONS: u32 = 10;
/// Highest `max_iterations` accepted.
pub const MAX_ITERATIONS: u32 = 1_000;

fn is_zero(value: &u32) -> bool {
    *value == 0
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

/// How a step with several inbound edges decides to run (§4, §4.8). In JSON: `"any"`,
/// `"all"`, `"first"`, or an integer n.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "JoinJson", into = "JoinJson")]
pub enum Join {
    /// Once every inbound edge resolved: run if at least one was taken.
    #[default]
    Any,
    /// Once every inbound edge resolved: run only if every one was taken.
    All,
    /// Run as soon as one inbound edge is taken; skipped once none can be.
    First,
    /// Run as soon as n inbound edges are taken; skipped once n no longer can be.
    Count(u32),
}

impl Join {
    /// How many taken inbound edges start the step without waiting for the others
    /// (`first` and n), or `None` for a join that waits for every edge.
    pub fn early(self) -> Option<u32> {
        match self {
            Join::First => Some(1),
            Join::Count(n) => Some(n),
            Join::Any | Join::All => None,
        }
    }

    /// How the join is stored in `synapse.tasks.join_mode`.
    pub fn to_column(self) -> String {
        match self {
            Join::Any => "any".into(),
            Join::All => "all".into(),
            Join::First => "first".into(),
            Join::Count(n) => n.to_string(),
        }
    }

    /// Reads `synapse.tasks.join_mode` back.
    pub fn from_column(text: &str) -> Option<Join> {
        match text {
            "any" => Some(Join::Any),
            "all" => Some(Join::All),
            "first" => Some(Join::First),
            count => count.parse().ok().map(Join::Count),
        }
    }
}

/// [`Join`] as JSON: a name or a count.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum JoinJson {
    Count(u32),
    Name(String),
}

impl TryFrom<JoinJson> for Join {
    type Error = String;

    fn try_from(json: JoinJson) -> Result<Self, Self::Error> {
        match json {
            JoinJson::Count(n) => Ok(Join::Count(n)),
            JoinJson::Name(name) => match name.as_str() {
                "any" => Ok(Join::Any),
                "all" => Ok(Join::All),
                "first" => Ok(Join::First),
                other => Err(format!(
                    "expected \"any\", \"all\", \"first\" or a count, got \"{other}\""
                )),
            },
        }
    }
}

impl From<Join> for JoinJson {
    fn from(join: Join) -> Self {
        match join {
            Join::Count(n) => JoinJson::Count(n),
            other => JoinJson::Name(other.to_column()),
        }
    }
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

impl EdgeOn {
    /// How the outcome is stored in `synapse.edges.on_outcome`.
    pub fn to_column(self) -> &'static str {
        match self {
            EdgeOn::Success => "success",
            EdgeOn::Failure => "failure",
            EdgeOn::Always => "always",
        }
    }

    /// Reads `synapse.edges.on_outcome` back.
    pub fn from_column(text: &str) -> Option<EdgeOn> {
        [EdgeOn::Success, EdgeOn::Failure, EdgeOn::Always]
            .into_iter()
            .find(|on| on.to_column() == text)
    }
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
        assert_eq!(serde_json::to_value(Join::Count(2)).unwrap(), json!(2));
        let step: Step =
            serde_json::from_value(json!({"id": "x", "action": "noop", "join": "first"})).unwrap();
        assert_eq!(step.join, Join::First);
        let step: Step =
            serde_json::from_value(json!({"id": "x", "action": "noop", "join": 2})).unwrap();
        assert_eq!(step.join, Join::Count(2));
        for join in [Join::Any, Join::All, Join::First, Join::Count(3)] {
            assert_eq!(Join::from_column(&join.to_column()), Some(join));
        }
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
        for name in [
            "noop",
            "sleep",
            "fail",
            "transform",
            "http",
            "exec",
            "sql",
            "goal",
            wait::ACTION,
        ] {
            assert!(BUILTIN_ACTIONS.contains(&name), "{name}");
        }
    }
}

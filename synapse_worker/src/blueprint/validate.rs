//! Blueprint validation: walks the JSON document field by field and reports every problem
//! with its JSON path, then deserializes the [`Blueprint`] once nothing is wrong.
//!
//! Serde alone would stop at the first error and could not check cross-references
//! (edges naming steps, cycles) or CEL, so the walk mirrors the model by hand; its rules
//! are kept in step with the serde attributes in `mod.rs` (e.g. `null` is accepted exactly
//! where the model has an `Option`).

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::duration::{format_duration, parse_duration};
use super::limits::{depth_message, json_depth, json_len, size_message, MAX_JSON_DEPTH};
use super::params_schema::ParamsSchema;
use super::scope::{Site, StepKind, CEL_NAMES};
use super::wait::{self, Wait};
use super::{cel, Blueprint, Join, BUILTIN_ACTIONS, MAX_ITERATIONS, MAX_MAP_ITEMS};

/// The most steps a blueprint may have.
pub const MAX_STEPS: usize = 10_000;

/// The largest blueprint accepted, measured as compact JSON.
pub const MAX_BLUEPRINT_BYTES: usize = super::limits::MAX_JSON_BYTES;

/// How many steps or edges are checked between two calls of the interrupt hook.
const INTERRUPT_EVERY: usize = 64;

/// Longest accepted `name`, in characters.
const MAX_NAME_CHARS: usize = 200;

/// Most `retries` a step may ask for.
const MAX_RETRIES: u64 = 100;

/// Longest `sleep` (24 h), in milliseconds.
const MAX_SLEEP_MS: u64 = 86_400_000;

/// Shortest and longest accepted `backoff` and `timeout`.
const MIN_DURATION: std::time::Duration = std::time::Duration::from_millis(1);
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A pathological document can have millions of problems; a list that long helps no one
/// and would make an enormous Postgres error message.
const MAX_PROBLEMS: usize = 1_000;

const TOP_FIELDS: &[&str] = &["name", "steps", "edges", "output"];
const STEP_FIELDS: &[&str] = &[
    "id",
    "action",
    "params",
    "input",
    "queue",
    "retries",
    "backoff",
    "timeout",
    "join",
    "cancel_others",
    "for_each",
    "max_parallel",
    "tolerate",
    "until",
    "max_iterations",
];
const EDGE_FIELDS: &[&str] = &["from", "to", "when", "on"];
const HTTP_METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
const GOAL_PARAMS: &[&str] = &["goal", "planner", "blueprint"];

const STEP_ID_PATTERN: &str = "^[a-z][a-z0-9_]{0,62}$";
const QUEUE_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,64}$";

static STEP_ID_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(STEP_ID_PATTERN).expect("valid step id pattern"));

/// Whether `name` is a valid queue name (the rule steps and `--queues` share).
pub fn is_valid_queue(name: &str) -> bool {
    QUEUE_RE.is_match(name)
}

/// Planners are named like steps (SPEC §4.7); which ones exist is known only to the
/// workers, so the name is checked here and the planner when the child is planned.
const PLANNER_PATTERN: &str = "^[a-z][a-z0-9_]{0,62}$";

static PLANNER_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(PLANNER_PATTERN).expect("valid planner pattern"));

static QUEUE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(QUEUE_PATTERN).expect("valid queue pattern"));
static PLAIN_KEY_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new("^[A-Za-z_][A-Za-z0-9_]*$").expect("valid key pattern"));

/// One thing wrong with a blueprint: where (a JSONPath-like `path` from the document root,
/// e.g. `$.steps[2].id`) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Where the problem is: `$`, `$.steps`, `$.steps[2].id`, `$.edges[0].when`, ...
    pub path: String,
    /// What is wrong, as a sentence for people.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Checks a blueprint document and returns the [`Blueprint`] it describes, or every problem
/// found (never just the first).
///
/// `is_known_action` says whether a non-built-in action is registered (in
/// `synapse.actions`); built-in actions are always known.
pub fn validate(
    doc: &Value,
    is_known_action: &dyn Fn(&str) -> bool,
) -> Result<Blueprint, Vec<Problem>> {
    validate_interruptible(doc, is_known_action, &|| {})
}

/// [`validate`], calling `check_interrupts` regularly (every few steps and edges, and
/// through the cycle search) so that a caller inside a Postgres backend can let query
/// cancel and `statement_timeout` stop the work. The hook may unwind; it is never
/// called while a CEL expression is being compiled.
pub fn validate_interruptible(
    doc: &Value,
    is_known_action: &dyn Fn(&str) -> bool,
    check_interrupts: &dyn Fn(),
) -> Result<Blueprint, Vec<Problem>> {
    validate_with_params_schemas(doc, is_known_action, &|_| None, check_interrupts)
}

/// Does once what the first validation in a process would otherwise do: build
/// the JSON Schema meta-schema validators and the CEL parser's tables. The
/// extension calls it in the postmaster, so every backend starts warm.
/// Whether the sample it validates passed (it always should: see the test).
pub fn warm_up() -> bool {
    let doc = serde_json::json!({
        "steps": [{"id": "a", "action": "warm", "params": {"n": 1}},
                  {"id": "b", "action": "warm", "input": "{'x': steps.a.result.n}"}],
        "edges": [{"from": "a", "to": "b", "when": "result.n > 0 && size(goal.input) >= 0"}]
    });
    let schema = serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}});
    validate_with_params_schemas(&doc, &|_| true, &|_| Some(schema.clone()), &|| {}).is_ok()
}

/// [`validate_interruptible`], also checking the `params` of each step whose
/// (non-built-in) action has a `params_schema`: `params_schema` returns that
/// schema, if any. A schema that is not a valid JSON Schema is reported as a
/// problem of the steps using it.
pub fn validate_with_params_schemas(
    doc: &Value,
    is_known_action: &dyn Fn(&str) -> bool,
    params_schema: &dyn Fn(&str) -> Option<Value>,
    check_interrupts: &dyn Fn(),
) -> Result<Blueprint, Vec<Problem>> {
    let mut checker = Checker {
        problems: Vec::new(),
        step_refs: Vec::new(),
        dropped: 0,
        is_known_action,
        params_schema,
        schemas: HashMap::new(),
        check_interrupts,
    };
    checker.document(doc);
    if checker.dropped > 0 {
        checker.problems.push(Problem {
            path: "$".to_owned(),
            message: format!(
                "{} more problems were found; only the first {MAX_PROBLEMS} are listed",
                checker.dropped
            ),
        });
    }
    if !checker.problems.is_empty() {
        return Err(checker.problems);
    }
    check_interrupts();
    // The walk above accepts only what the model accepts, so this is not expected to fail;
    // if the two ever disagree, the serde error still comes back as a problem.
    Blueprint::deserialize(doc).map_err(|e| {
        vec![Problem {
            path: "$".to_owned(),
            message: e.to_string(),
        }]
    })
}

/// `path` followed by an object key, as `.key` or, for keys that are not identifiers,
/// `["key"]`.
pub(super) fn key_path(path: &str, key: &str) -> String {
    if PLAIN_KEY_RE.is_match(key) {
        format!("{path}.{key}")
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_else(|_| format!("\"{key}\""));
        format!("{path}[{quoted}]")
    }
}

/// `path` followed by an array index.
pub(super) fn index_path(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// The kind of a JSON value, with its article, for "expected X, got Y" messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `key` is set to something other than `null` (which counts as absent).
fn is_present(obj: &Map<String, Value>, key: &str) -> bool {
    obj.get(key).is_some_and(|value| !value.is_null())
}

/// Whether a step asks for retries: `retries` is a positive integer.
fn retries_asked(obj: &Map<String, Value>) -> bool {
    obj.get("retries")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0)
}

/// What the step walk learned that the edge and cycle checks need.
struct StepIndex {
    /// Every step id that is a string, valid or not, with its first index: an edge naming
    /// a step whose id is malformed should not also be reported as naming an unknown step.
    ids: HashMap<String, usize>,
    /// The steps with `join` "first" or n, whose count is checked against their inbound
    /// edges once the edges are known.
    early_joins: Vec<EarlyJoin>,
}

/// A step that runs after its first n taken inbound edges: it needs at least n of them.
struct EarlyJoin {
    path: String,
    step: String,
    join: Join,
}

/// What the edge walk learned.
struct EdgeWalk<'v> {
    /// Edges as (from, to) step indices, or `None` when the graph has a cycle or `edges`
    /// is not an array.
    graph: Option<Vec<(usize, usize)>>,
    /// How many edges lead into each step, by id, counting every edge whose `to` names a
    /// step (even one reported for another reason, so that a typo in `from` does not add
    /// a join problem); `None` when `edges` is not an array.
    inbound: Option<HashMap<&'v str, usize>>,
}

/// A compiled expression that names steps: checked once every step and edge is known.
struct StepRefs {
    path: String,
    site: Site,
    /// The step whose expression it is (for `when`, the edge's `from` step), by index.
    owner: Option<usize>,
    steps: Vec<String>,
}

struct Checker<'a> {
    problems: Vec<Problem>,
    step_refs: Vec<StepRefs>,
    dropped: usize,
    is_known_action: &'a dyn Fn(&str) -> bool,
    params_schema: &'a dyn Fn(&str) -> Option<Value>,
    /// The compiled `params_schema` of each action met so far.
    schemas: HashMap<String, Option<Result<ParamsSchema, String>>>,
    check_interrupts: &'a dyn Fn(),
}

impl Checker<'_> {
    fn report(&mut self, path: impl Into<String>, message: impl Into<String>) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem {
                path: path.into(),
                message: message.into(),
            });
        } else {
            self.dropped += 1;
        }
    }

    fn expected(&mut self, path: &str, what: &str, got: &Value) {
        self.report(path, format!("expected {what}, got {}", kind(got)));
    }

    /// Reports the fields of `obj` that are not in `allowed`.
    fn unknown_fields(&mut self, path: &str, obj: &Map<String, Value>, allowed: &[&str]) {
        for key in obj.keys() {
            if !allowed.contains(&key.as_str()) {
                self.report(
                    key_path(path, key),
                    format!(
                        "unknown field \"{key}\" (expected one of: {})",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    /// A required string field: reports it missing or mistyped.
    fn required_str<'v>(
        &mut self,
        path: &str,
        obj: &'v Map<String, Value>,
        key: &str,
    ) -> Option<&'v str> {
        let field = key_path(path, key);
        match obj.get(key) {
            None => {
                self.report(field, format!("\"{key}\" is required"));
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.expected(&field, "a string", other);
                None
            }
        }
    }

    /// An optional string field; `null` counts as absent.
    fn optional_str<'v>(
        &mut self,
        path: &str,
        obj: &'v Map<String, Value>,
        key: &str,
    ) -> Option<&'v str> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.expected(&key_path(path, key), "a string", other);
                None
            }
        }
    }

    /// A field with a default: present means it must be a string (`null` is not accepted,
    /// as serde would not accept it either).
    fn defaulted_str<'v>(
        &mut self,
        path: &str,
        obj: &'v Map<String, Value>,
        key: &str,
    ) -> Option<&'v str> {
        match obj.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.expected(&key_path(path, key), "a string", other);
                None
            }
        }
    }

    /// Reports `expr` at `path` unless it compiles as CEL and uses only the variables
    /// its `site` sees in a step of this `kind`; the steps it names are checked later
    /// ([`Self::step_references`]).
    fn cel(&mut self, path: &str, expr: &str, site: Site, kind: StepKind, owner: Option<usize>) {
        let compiled = match cel::compile(expr) {
            Ok(compiled) => compiled,
            Err(e) => {
                self.report(path, format!("invalid CEL expression: {e}"));
                return;
            }
        };
        let refs = compiled.references();
        let visible = site.variables(kind);
        for name in &refs.variables {
            if !visible.contains(&name.as_str()) && !CEL_NAMES.contains(&name.as_str()) {
                let mut message = format!(
                    "unknown variable \"{name}\" (this expression sees: {})",
                    visible.join(", ")
                );
                if let Some(hint) = site.unseen_hint(kind, name) {
                    message.push_str("; ");
                    message.push_str(hint);
                }
                self.report(path, message);
            }
        }
        if !refs.steps.is_empty() {
            self.step_refs.push(StepRefs {
                path: path.to_owned(),
                site,
                owner,
                steps: refs.steps,
            });
        }
    }

    /// An optional CEL field.
    fn optional_cel(
        &mut self,
        path: &str,
        obj: &Map<String, Value>,
        key: &str,
        site: Site,
        kind: StepKind,
        owner: Option<usize>,
    ) {
        if let Some(expr) = self.optional_str(path, obj, key) {
            self.cel(&key_path(path, key), expr, site, kind, owner);
        }
    }

    /// Every `steps.<id>` must name a step and, where the expression runs after the
    /// steps upstream of its own, one of those: any other step may not have ended (or
    /// even started) when it runs. Upstream is not checked on a graph with a cycle.
    fn step_references(&mut self, index: &StepIndex, graph: Option<&[(usize, usize)]>) {
        let refs = std::mem::take(&mut self.step_refs);
        if refs.is_empty() {
            return;
        }
        let upstream = graph.map(|graph| Upstream::new(index, graph, self.check_interrupts));
        let name_of = |i: usize| {
            index
                .ids
                .iter()
                .find(|(_, &at)| at == i)
                .map(|(name, _)| name.as_str())
                .unwrap_or("?")
        };
        for (n, r) in refs.iter().enumerate() {
            if n.is_multiple_of(INTERRUPT_EVERY) {
                (self.check_interrupts)();
            }
            for step in &r.steps {
                let Some(&at) = index.ids.get(step) else {
                    self.report(r.path.as_str(), format!("steps.{step} is not a step"));
                    continue;
                };
                let (Some(upstream), Some(owner), true) =
                    (&upstream, r.owner, r.site.reads_upstream_only())
                else {
                    continue;
                };
                let seen = match r.site {
                    // A condition runs when its `from` step ended: that step counts.
                    Site::When => at == owner || upstream.is_ancestor(at, owner),
                    _ => upstream.is_ancestor(at, owner),
                };
                if !seen {
                    let owner = name_of(owner);
                    let message = if r.site == Site::When {
                        format!("steps.{step} is not step {owner} or upstream of it, so it may not have ended when this condition is evaluated")
                    } else {
                        format!("steps.{step} is not upstream of step {owner}, so it may not have ended when this expression is evaluated")
                    };
                    self.report(r.path.as_str(), message);
                }
            }
        }
    }

    /// A non-negative integer no larger than `max`; `name` is used in the range message.
    fn bounded_uint(&mut self, path: &str, value: &Value, name: &str, max: u64, unit: &str) {
        match value.as_u64() {
            None => self.expected(path, "a non-negative integer", value),
            Some(n) if n > max => {
                self.report(path, format!("{name} must be at most {max}{unit}, got {n}"))
            }
            Some(_) => {}
        }
    }

    /// An integer from `min` to `max`; the value itself is quoted when it is a number
    /// out of range (negative, fractional or too large), so the message shows what to fix.
    fn integer_in(&mut self, path: &str, value: &Value, name: &str, min: u64, max: u64) {
        match (value, value.as_u64()) {
            (_, Some(n)) if (min..=max).contains(&n) => {}
            (Value::Number(n), _) => self.report(
                path,
                format!("{name} must be an integer from {min} to {max}, got {n}"),
            ),
            (other, _) => self.expected(path, &format!("an integer from {min} to {max}"), other),
        }
    }

    fn document(&mut self, doc: &Value) {
        let Some(obj) = doc.as_object() else {
            self.report(
                "$",
                format!("blueprint must be a JSON object, got {}", kind(doc)),
            );
            return;
        };
        // Over a budget, nothing else is worth the work of checking.
        let size = json_len(doc);
        if size > MAX_BLUEPRINT_BYTES {
            self.report("$", size_message("blueprint", size));
            return;
        }
        let depth = json_depth(doc);
        if depth > MAX_JSON_DEPTH {
            self.report("$", depth_message("blueprint", depth));
            return;
        }
        self.unknown_fields("$", obj, TOP_FIELDS);

        if let Some(name) = self.optional_str("$", obj, "name") {
            let chars = name.chars().count();
            if chars > MAX_NAME_CHARS {
                self.report(
                    "$.name",
                    format!("name is {chars} characters; the limit is {MAX_NAME_CHARS}"),
                );
            }
        }

        let index = self.steps(obj.get("steps"));
        let edges = self.edges(obj.get("edges"), &index);
        if let Some(inbound) = &edges.inbound {
            self.early_joins(&index.early_joins, inbound);
        }
        self.optional_cel("$", obj, "output", Site::Output, StepKind::Plain, None);
        self.step_references(&index, edges.graph.as_deref());
    }

    /// A `join` of "first" or n needs that many inbound edges: with fewer, the step
    /// could never run.
    fn early_joins(&mut self, joins: &[EarlyJoin], inbound: &HashMap<&str, usize>) {
        for early in joins {
            let has = inbound.get(early.step.as_str()).copied().unwrap_or(0);
            let needs = early.join.early().unwrap_or(0) as usize;
            if has >= needs {
                continue;
            }
            let has = match has {
                0 => "none".to_owned(),
                n => n.to_string(),
            };
            let step = &early.step;
            let message = match early.join {
                Join::Count(n) => format!(
                    "join {n} needs at least {n} inbound edge{}; step \"{step}\" has {has}",
                    if n == 1 { "" } else { "s" }
                ),
                _ => format!("join \"first\" needs an inbound edge; step \"{step}\" has none"),
            };
            self.report(early.path.as_str(), message);
        }
    }

    fn steps(&mut self, steps: Option<&Value>) -> StepIndex {
        let mut index = StepIndex {
            ids: HashMap::new(),
            early_joins: Vec::new(),
        };
        let steps = match steps {
            None => {
                self.report("$.steps", "\"steps\" is required");
                return index;
            }
            Some(Value::Array(steps)) => steps,
            Some(other) => {
                self.expected("$.steps", "an array", other);
                return index;
            }
        };
        if steps.is_empty() {
            self.report("$.steps", "at least one step is required");
        }
        if steps.len() > MAX_STEPS {
            self.report(
                "$.steps",
                format!("{} steps; the limit is {MAX_STEPS}", steps.len()),
            );
        }
        for (i, step) in steps.iter().enumerate() {
            if i.is_multiple_of(INTERRUPT_EVERY) {
                (self.check_interrupts)();
            }
            self.step(&index_path("$.steps", i), i, step, &mut index);
        }
        index
    }

    fn step(&mut self, path: &str, i: usize, step: &Value, index: &mut StepIndex) {
        let Some(obj) = step.as_object() else {
            self.expected(path, "an object", step);
            return;
        };
        self.unknown_fields(path, obj, STEP_FIELDS);

        let id = self.required_str(path, obj, "id");
        if let Some(id) = id {
            let id_path = key_path(path, "id");
            if !STEP_ID_RE.is_match(id) {
                self.report(
                    id_path.as_str(),
                    format!("invalid step id \"{id}\": must match {STEP_ID_PATTERN}"),
                );
            }
            match index.ids.get(id) {
                Some(&first) => self.report(
                    id_path,
                    format!("duplicate step id \"{id}\" (first used by $.steps[{first}])"),
                ),
                None => {
                    index.ids.insert(id.to_owned(), i);
                }
            }
        }

        // Known before any expression is checked: a map or loop step's expressions see
        // more variables.
        let has_for_each = is_present(obj, "for_each");
        let has_until = is_present(obj, "until");
        let kind = StepKind::from_fields(has_for_each, has_until);

        let action = self.required_str(path, obj, "action");
        if let Some(action) = action {
            self.action(&key_path(path, "action"), action);
        }

        let params_path = key_path(path, "params");
        let empty = Map::new();
        let params = match obj.get("params") {
            None => Some(&empty),
            Some(Value::Object(params)) => Some(params),
            Some(other) => {
                self.expected(&params_path, "an object", other);
                None
            }
        };
        if let (Some(action), Some(params)) = (action, params) {
            self.builtin_params(&params_path, action, params, kind, i);
            if !BUILTIN_ACTIONS.contains(&action) {
                self.schema_params(&params_path, action, obj.get("params"));
            }
        }

        self.optional_cel(path, obj, "input", Site::StepInput, kind, Some(i));

        if let Some(queue) = self.defaulted_str(path, obj, "queue") {
            if !QUEUE_RE.is_match(queue) {
                self.report(
                    key_path(path, "queue"),
                    format!("invalid queue \"{queue}\": must match {QUEUE_PATTERN}"),
                );
            }
        }

        let is_wait = action == Some(wait::ACTION);
        if is_wait {
            self.wait_step(path, obj);
        }

        // On a wait step, any retry at all is the problem, however many.
        if let Some(retries) = obj
            .get("retries")
            .filter(|_| !is_wait || !retries_asked(obj))
        {
            self.bounded_uint(
                &key_path(path, "retries"),
                retries,
                "retries",
                MAX_RETRIES,
                "",
            );
        }
        self.duration(path, obj, "backoff");
        // A wait step's timeout was refused above whatever its value.
        if !is_wait {
            self.duration(path, obj, "timeout");
        }

        let join = self.join(path, obj);
        if let (Some(join @ (Join::First | Join::Count(_))), Some(id)) = (join, id) {
            index.early_joins.push(EarlyJoin {
                path: key_path(path, "join"),
                step: id.to_owned(),
                join,
            });
        }
        self.cancel_others(path, obj, join);

        self.optional_cel(path, obj, "for_each", Site::ForEach, kind, Some(i));
        self.map_only(path, obj, "max_parallel", 1, has_for_each);
        self.map_only(path, obj, "tolerate", 0, has_for_each);

        let until_path = key_path(path, "until");
        if let Some(until) = self.optional_str(path, obj, "until") {
            self.cel(&until_path, until, Site::Until, kind, Some(i));
        }
        // A wait step's for_each and until were each refused already.
        if has_for_each && has_until && !is_wait {
            self.report(
                until_path,
                "for_each and until do not combine on one step; run the loop (or the map) \
                 in a child goal, a step with action \"goal\"",
            );
        }
        if let Some(value) = obj.get("max_iterations").filter(|v| !v.is_null()) {
            let field = key_path(path, "max_iterations");
            if has_until {
                let max = u64::from(MAX_ITERATIONS);
                self.integer_in(&field, value, "max_iterations", 1, max);
            } else {
                self.report(field, "max_iterations applies only to a step with until");
            }
        }
    }

    /// The step's `join` (absent: `any`), or `None` when it is not a valid one.
    fn join(&mut self, path: &str, obj: &Map<String, Value>) -> Option<Join> {
        const EXPECTED: &str = "\"any\", \"all\", \"first\" or a number of edges";
        let field = key_path(path, "join");
        let refuse = |checker: &mut Self, message: String| {
            checker.report(field.as_str(), message);
            None
        };
        match obj.get("join") {
            None => Some(Join::Any),
            Some(Value::String(name)) => match name.as_str() {
                "any" => Some(Join::Any),
                "all" => Some(Join::All),
                "first" => Some(Join::First),
                other => refuse(self, format!("expected {EXPECTED}, got \"{other}\"")),
            },
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => refuse(
                    self,
                    "join counts inbound edges and must be at least 1, got 0".into(),
                ),
                Some(count) => match u32::try_from(count) {
                    Ok(count) => Some(Join::Count(count)),
                    Err(_) => refuse(
                        self,
                        format!("join {count} is more edges than a blueprint can have"),
                    ),
                },
                None => refuse(
                    self,
                    format!("join counts inbound edges and must be a whole number, got {n}"),
                ),
            },
            Some(other) => {
                self.expected(&field, EXPECTED, other);
                None
            }
        }
    }

    /// `cancel_others: true` cancels the parents a step did not wait for, so it needs a
    /// join that does not wait for them all. `join` is `None` when it was refused, so as
    /// not to report the same mistake twice.
    fn cancel_others(&mut self, path: &str, obj: &Map<String, Value>, join: Option<Join>) {
        let field = key_path(path, "cancel_others");
        match obj.get("cancel_others") {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => {
                if let Some(join @ (Join::Any | Join::All)) = join {
                    self.report(
                        field,
                        format!(
                            "cancel_others needs join \"first\" or a count; this step's join is \"{}\"",
                            join.to_column()
                        ),
                    );
                }
            }
            Some(other) => self.expected(&field, "a boolean", other),
        }
    }

    /// A field of map steps only (`max_parallel`, `tolerate`): an integer from `min` to
    /// [`MAX_MAP_ITEMS`], on a step with `for_each`.
    fn map_only(
        &mut self,
        path: &str,
        obj: &Map<String, Value>,
        key: &str,
        min: u64,
        has_for_each: bool,
    ) {
        // `max_parallel` is optional, so `null` means absent; `tolerate` has a default,
        // which (like serde) refuses `null`.
        let value = match obj.get(key) {
            None => return,
            Some(Value::Null) if key == "max_parallel" => return,
            Some(value) => value,
        };
        let field = key_path(path, key);
        if has_for_each {
            self.integer_in(&field, value, key, min, MAX_MAP_ITEMS as u64);
        } else {
            self.report(field, format!("{key} applies only to a step with for_each"));
        }
    }

    /// Checks `params` (absent: `{}`) against the `params_schema` of `action`, if any.
    fn schema_params(&mut self, path: &str, action: &str, params: Option<&Value>) {
        if !self.schemas.contains_key(action) {
            let compiled = (self.params_schema)(action).map(|schema| ParamsSchema::new(&schema));
            self.schemas.insert(action.to_owned(), compiled);
        }
        let empty = Value::Object(Map::new());
        let params = params.unwrap_or(&empty);
        let problems = match self.schemas.get(action) {
            Some(Some(Ok(schema))) => schema.check(path, params),
            Some(Some(Err(error))) => vec![Problem {
                path: path.to_owned(),
                message: format!(
                    "the params_schema of action \"{action}\" is not a valid JSON Schema: {error}"
                ),
            }],
            _ => Vec::new(),
        };
        for problem in problems {
            self.report(problem.path, problem.message);
        }
    }

    fn action(&mut self, path: &str, action: &str) {
        if action.is_empty() {
            self.report(path, "action must not be empty");
        } else if !BUILTIN_ACTIONS.contains(&action) && !(self.is_known_action)(action) {
            self.report(
                path,
                format!(
                    "unknown action \"{action}\" (built-ins: {}; others must be registered \
                     by a worker in synapse.actions)",
                    BUILTIN_ACTIONS.join(", ")
                ),
            );
        }
    }

    fn duration(&mut self, path: &str, obj: &Map<String, Value>, key: &str) {
        let field = key_path(path, key);
        let text = match obj.get(key) {
            None => return,
            Some(Value::String(s)) => s,
            Some(other) => {
                self.expected(&field, "a duration string such as \"30s\"", other);
                return;
            }
        };
        match parse_duration(text) {
            Err(e) => self.report(field, e),
            Ok(d) if !(MIN_DURATION..=MAX_DURATION).contains(&d) => self.report(
                field,
                format!(
                    "{key} must be between {} and {}, got \"{text}\"",
                    format_duration(MIN_DURATION),
                    format_duration(MAX_DURATION)
                ),
            ),
            Ok(_) => {}
        }
    }

    /// Parameter checks of the built-in actions; registered actions are checked by
    /// their worker, which alone knows their parameters.
    fn builtin_params(
        &mut self,
        path: &str,
        action: &str,
        params: &Map<String, Value>,
        kind: StepKind,
        step: usize,
    ) {
        match action {
            "sleep" => match params.get("ms") {
                None => self.report(key_path(path, "ms"), "\"ms\" is required"),
                Some(ms) => {
                    self.bounded_uint(&key_path(path, "ms"), ms, "ms", MAX_SLEEP_MS, " (24h)")
                }
            },
            "fail" => {
                self.defaulted_str(path, params, "message");
            }
            "transform" => {
                if let Some(expr) = self.required_str(path, params, "expr") {
                    self.cel(
                        &key_path(path, "expr"),
                        expr,
                        Site::StepParam,
                        kind,
                        Some(step),
                    );
                }
            }
            "http" => self.http_params(path, params),
            "exec" => self.exec_params(path, params),
            "goal" => self.goal_params(path, params, kind, step),
            wait::ACTION => self.wait_params(path, params, kind, step),
            "sql" => {
                if let Some(query) = self.required_str(path, params, "query") {
                    if query.trim().is_empty() {
                        self.report(key_path(path, "query"), "query must not be empty");
                    }
                }
                if let Some(args) = self.defaulted_str(path, params, "args") {
                    self.cel(
                        &key_path(path, "args"),
                        args,
                        Site::StepParam,
                        kind,
                        Some(step),
                    );
                }
            }
            _ => {}
        }
    }

    fn http_params(&mut self, path: &str, params: &Map<String, Value>) {
        if let Some(url) = self.required_str(path, params, "url") {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.report(
                    key_path(path, "url"),
                    format!("url must start with http:// or https://, got \"{url}\""),
                );
            }
        }
        if let Some(method) = self.defaulted_str(path, params, "method") {
            if !HTTP_METHODS.contains(&method) {
                self.report(
                    key_path(path, "method"),
                    format!(
                        "unknown method \"{method}\" (expected one of: {})",
                        HTTP_METHODS.join(", ")
                    ),
                );
            }
        }
        let headers_path = key_path(path, "headers");
        match params.get("headers") {
            None => {}
            Some(Value::Object(headers)) => {
                for (name, value) in headers {
                    if !value.is_string() {
                        self.expected(&key_path(&headers_path, name), "a string", value);
                    }
                }
            }
            Some(other) => self.expected(&headers_path, "an object", other),
        }
    }

    /// A child goal (SPEC §4.7): a goal text to plan or a blueprint to run, never both.
    /// Presence is by key, so that `null` is reported as a wrong value rather than as
    /// a missing one.
    fn goal_params(
        &mut self,
        path: &str,
        params: &Map<String, Value>,
        kind: StepKind,
        step: usize,
    ) {
        self.unknown_fields(path, params, GOAL_PARAMS);
        let has_goal = params.contains_key("goal");
        let has_blueprint = params.contains_key("blueprint");
        match (has_goal, has_blueprint) {
            (false, false) => self.report(
                path,
                "a goal step needs params.goal (a goal text) or params.blueprint (a plan)",
            ),
            (true, true) => self.report(
                path,
                "params.goal and params.blueprint do not combine: give a goal text to plan \
                 or a blueprint to run, not both",
            ),
            _ => {}
        }

        let goal_path = key_path(path, "goal");
        match params.get("goal") {
            None => {}
            Some(Value::String(expr)) => {
                self.cel(&goal_path, expr, Site::StepParam, kind, Some(step))
            }
            Some(other) => self.expected(
                &goal_path,
                "a string (a CEL expression giving the goal text)",
                other,
            ),
        }

        if let Some(planner) = self.defaulted_str(path, params, "planner") {
            let planner_path = key_path(path, "planner");
            if !PLANNER_RE.is_match(planner) {
                self.report(
                    planner_path.as_str(),
                    format!("invalid planner \"{planner}\": must match {PLANNER_PATTERN}"),
                );
            }
            // With both goal and blueprint, the "do not combine" problem already says it.
            if has_blueprint && !has_goal {
                self.report(
                    planner_path,
                    "params.planner applies only with params.goal: a given blueprint is not \
                     planned",
                );
            }
        }

        let blueprint_path = key_path(path, "blueprint");
        match params.get("blueprint") {
            None => {}
            Some(doc @ Value::Object(_)) => self.nested_blueprint(&blueprint_path, doc),
            Some(Value::String(expr)) => {
                self.cel(&blueprint_path, expr, Site::StepParam, kind, Some(step))
            }
            Some(other) => self.expected(
                &blueprint_path,
                "an object (a blueprint) or a string (a CEL expression giving one)",
                other,
            ),
        }
    }

    /// A wait (SPEC §4.9): its params as [`Wait::from_params`] reads them, and
    /// `params.until` as a step parameter expression.
    fn wait_params(
        &mut self,
        path: &str,
        params: &Map<String, Value>,
        kind: StepKind,
        step: usize,
    ) {
        let fault = match Wait::from_object(params) {
            Ok(_) => None,
            Err((key, message)) => {
                let at = if key.is_empty() {
                    path.to_owned()
                } else {
                    key_path(path, key)
                };
                self.report(at, message);
                Some(key)
            }
        };
        // Checked even when another param is at fault, so that one pass lists both.
        if fault != Some("until") {
            if let Some(Value::String(expr)) = params.get("until") {
                if !expr.trim().is_empty() {
                    let until_path = key_path(path, "until");
                    self.cel(&until_path, expr, Site::StepParam, kind, Some(step));
                }
            }
        }
    }

    /// The step fields a wait step refuses: it holds no worker and runs no attempt, so
    /// it cannot map, loop, retry or have an attempt's time limit.
    fn wait_step(&mut self, path: &str, obj: &Map<String, Value>) {
        if is_present(obj, "for_each") {
            self.report(
                key_path(path, "for_each"),
                "a wait step cannot have for_each: to wait once per item, map a child goal \
                 (a step with action \"goal\" and for_each) whose blueprint holds the wait",
            );
        }
        if is_present(obj, "until") {
            self.report(
                key_path(path, "until"),
                "a wait step cannot loop with until: to wait again and again, loop a child \
                 goal (a step with action \"goal\" and until) whose blueprint holds the wait; \
                 to wait until a time, use params.until",
            );
        }
        if retries_asked(obj) {
            self.report(
                key_path(path, "retries"),
                "a wait step does not retry: handle its timeout with an on: failure edge",
            );
        }
        if obj.contains_key("timeout") {
            self.report(
                key_path(path, "timeout"),
                "a wait step's time limit is params.timeout (with params.signal); the step \
                 timeout, a limit on one attempt, does not apply",
            );
        }
    }

    /// A blueprint given inline for a child goal: checked now, by the same rules, with
    /// its problems placed under `path`. It is a goal of its own, so its expressions name
    /// its own steps; a fresh checker keeps them apart from this blueprint's. Recursion
    /// is bounded, as every level adds to the JSON nesting the outer document already
    /// passed.
    fn nested_blueprint(&mut self, path: &str, doc: &Value) {
        let mut inner = Checker {
            problems: Vec::new(),
            step_refs: Vec::new(),
            dropped: 0,
            is_known_action: self.is_known_action,
            params_schema: self.params_schema,
            schemas: std::mem::take(&mut self.schemas),
            check_interrupts: self.check_interrupts,
        };
        inner.document(doc);
        self.schemas = std::mem::take(&mut inner.schemas);
        self.dropped += inner.dropped;
        let clean = inner.problems.is_empty();
        for problem in inner.problems {
            // Every path the walk makes starts with `$`; should one not, it still lands
            // under the child rather than being lost.
            let rest = problem.path.strip_prefix('$').unwrap_or(&problem.path);
            self.report(format!("{path}{rest}"), problem.message);
        }
        // As at the top level: the walk and the model are meant to agree, but if they
        // ever do not, the child would only fail when its step runs.
        if clean {
            if let Err(e) = Blueprint::deserialize(doc) {
                self.report(path, e.to_string());
            }
        }
    }

    fn exec_params(&mut self, path: &str, params: &Map<String, Value>) {
        let argv_path = key_path(path, "argv");
        match params.get("argv") {
            None => self.report(argv_path, "\"argv\" is required"),
            Some(Value::Array(argv)) => {
                if argv.is_empty() {
                    self.report(argv_path.as_str(), "argv must not be empty");
                }
                for (j, arg) in argv.iter().enumerate() {
                    let arg_path = index_path(&argv_path, j);
                    match arg {
                        Value::String(s) if j == 0 && s.is_empty() => {
                            self.report(arg_path, "the program name must not be empty");
                        }
                        Value::String(_) => {}
                        other => self.expected(&arg_path, "a string", other),
                    }
                }
            }
            Some(other) => self.expected(&argv_path, "an array of strings", other),
        }
    }

    /// Checks the edges; returns the graph and how many edges lead into each step.
    fn edges<'v>(&mut self, edges: Option<&'v Value>, index: &StepIndex) -> EdgeWalk<'v> {
        let edges = match edges {
            None => {
                return EdgeWalk {
                    graph: Some(Vec::new()),
                    inbound: Some(HashMap::new()),
                }
            }
            Some(Value::Array(edges)) => edges,
            Some(other) => {
                self.expected("$.edges", "an array", other);
                return EdgeWalk {
                    graph: None,
                    inbound: None,
                };
            }
        };
        let mut inbound: HashMap<&str, usize> = HashMap::new();
        // Edges that name two distinct existing steps, once each: the graph the cycle check
        // walks, as (from, to) step indices.
        let mut graph: Vec<(usize, usize)> = Vec::new();
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, edge) in edges.iter().enumerate() {
            if i.is_multiple_of(INTERRUPT_EVERY) {
                (self.check_interrupts)();
            }
            let path = index_path("$.edges", i);
            let Some(obj) = edge.as_object() else {
                self.expected(&path, "an object", edge);
                continue;
            };
            self.unknown_fields(&path, obj, EDGE_FIELDS);
            let from = self.edge_end(&path, obj, "from", index);
            let to = self.edge_end(&path, obj, "to", index);
            let from_i = from.map(|(_, i)| i);
            if let Some((to, _)) = to {
                *inbound.entry(to).or_default() += 1;
            }
            if let (Some((from, from_i)), Some((to, to_i))) = (from, to) {
                if from == to {
                    self.report(
                        path.as_str(),
                        format!("self-edge: step \"{from}\" cannot depend on itself"),
                    );
                } else if let Some(first) = seen.get(&(from, to)) {
                    self.report(
                        path.as_str(),
                        format!(
                            "duplicate edge \"{from}\" -> \"{to}\" (first declared at $.edges[{first}])"
                        ),
                    );
                } else {
                    seen.insert((from, to), i);
                    graph.push((from_i, to_i));
                }
            }
            self.optional_cel(&path, obj, "when", Site::When, StepKind::Plain, from_i);
            if let Some(on) = self.defaulted_str(&path, obj, "on") {
                if !["success", "failure", "always"].contains(&on) {
                    self.report(
                        key_path(&path, "on"),
                        format!("expected \"success\", \"failure\" or \"always\", got \"{on}\""),
                    );
                }
            }
        }
        (self.check_interrupts)();
        let graph = match find_cycle(index, &graph, self.check_interrupts) {
            Some(cycle) => {
                self.report("$.edges", format!("cycle: {}", cycle.join(" -> ")));
                None
            }
            None => Some(graph),
        };
        EdgeWalk {
            graph,
            inbound: Some(inbound),
        }
    }

    /// An edge's `from` or `to`: a string naming a declared step, returned with its index.
    fn edge_end<'v>(
        &mut self,
        path: &str,
        obj: &'v Map<String, Value>,
        key: &str,
        index: &StepIndex,
    ) -> Option<(&'v str, usize)> {
        let name = self.required_str(path, obj, key)?;
        match index.ids.get(name) {
            Some(&i) => Some((name, i)),
            None => {
                self.report(key_path(path, key), format!("unknown step \"{name}\""));
                None
            }
        }
    }
}

/// Which steps are upstream of which, for a graph without a cycle: one bit set of
/// ancestors per step, built in topological order (steps x steps / 8 bytes at most,
/// 12.5 MB for the largest blueprint, and only when some expression names a step).
struct Upstream {
    words: usize,
    bits: Vec<u64>,
}

impl Upstream {
    fn new(index: &StepIndex, graph: &[(usize, usize)], check_interrupts: &dyn Fn()) -> Self {
        let n = index.ids.values().max().map_or(0, |&i| i + 1);
        let words = n.div_ceil(64);
        let mut bits = vec![0u64; n * words];
        let mut parents: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut indegree = vec![0usize; n];
        for &(from, to) in graph {
            parents[to].push(from);
            children[from].push(to);
            indegree[to] += 1;
        }
        let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        let mut done = 0usize;
        while let Some(step) = ready.pop() {
            done += 1;
            if done.is_multiple_of(INTERRUPT_EVERY) {
                check_interrupts();
            }
            for &parent in &parents[step] {
                for w in 0..words {
                    let inherited = bits[parent * words + w];
                    bits[step * words + w] |= inherited;
                }
                bits[step * words + parent / 64] |= 1 << (parent % 64);
            }
            for &child in &children[step] {
                indegree[child] -= 1;
                if indegree[child] == 0 {
                    ready.push(child);
                }
            }
        }
        Self { words, bits }
    }

    /// Whether `ancestor` is upstream of `step` (a path of edges leads from it).
    fn is_ancestor(&self, ancestor: usize, step: usize) -> bool {
        self.bits
            .get(step * self.words + ancestor / 64)
            .is_some_and(|word| word & (1 << (ancestor % 64)) != 0)
    }
}

/// The first cycle met by a depth-first search that starts from the steps in declaration
/// order and follows edges in declaration order, as step ids with the first repeated last
/// (`[a, b, c, a]`). Iterative, because a 10 000-step chain would overflow a recursive
/// search on a small stack.
fn find_cycle(
    index: &StepIndex,
    graph: &[(usize, usize)],
    check_interrupts: &dyn Fn(),
) -> Option<Vec<String>> {
    let mut names: Vec<&str> = vec![""; index.ids.len()];
    let mut slot: HashMap<usize, usize> = HashMap::new();
    // Step indices are sparse when some steps were invalid: map them to dense slots,
    // ordered by declaration.
    let mut by_decl: Vec<(&str, usize)> = index.ids.iter().map(|(n, &i)| (n.as_str(), i)).collect();
    by_decl.sort_by_key(|&(_, i)| i);
    for (dense, (name, step_i)) in by_decl.iter().enumerate() {
        names[dense] = name;
        slot.insert(*step_i, dense);
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
    for (from, to) in graph {
        children[slot[from]].push(slot[to]);
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; names.len()];
    for start in 0..names.len() {
        if mark[start] != Mark::New {
            continue;
        }
        if start.is_multiple_of(INTERRUPT_EVERY) {
            check_interrupts();
        }
        // Each frame: a node on the current path and the next child to visit.
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::OnPath;
        while let Some(frame) = stack.last_mut() {
            let (node, next) = *frame;
            if let Some(&child) = children[node].get(next) {
                frame.1 += 1;
                match mark[child] {
                    Mark::New => {
                        mark[child] = Mark::OnPath;
                        stack.push((child, 0));
                    }
                    Mark::OnPath => {
                        let from = stack
                            .iter()
                            .position(|&(n, _)| n == child)
                            .expect("a node on the path is on the stack");
                        let mut cycle: Vec<String> = stack[from..]
                            .iter()
                            .map(|&(n, _)| names[n].to_owned())
                            .collect();
                        cycle.push(names[child].to_owned());
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_warm_up_sample_exercises_schemas_and_expressions() {
        assert!(warm_up());
    }
    use crate::blueprint::scope::StepKind;
    use crate::blueprint::{EdgeOn, Join};
    use serde_json::json;
    use std::time::Duration;

    fn no_registered(_: &str) -> bool {
        false
    }

    fn problems(doc: &Value) -> Vec<Problem> {
        match validate(doc, &no_registered) {
            Ok(bp) => panic!("expected problems, got a valid blueprint: {bp:?}"),
            Err(problems) => problems,
        }
    }

    /// Asserts that validation reports exactly one problem, at `path`, whose message
    /// contains `fragment`.
    fn assert_only(doc: Value, path: &str, fragment: &str) {
        let found = problems(&doc);
        assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
        assert_eq!(found[0].path, path, "{found:#?}");
        assert!(
            found[0].message.contains(fragment),
            "message {:?} lacks {fragment:?}",
            found[0].message
        );
    }

    /// A document with one step built from `step`.
    fn one_step(step: Value) -> Value {
        json!({ "steps": [step] })
    }

    fn valid(doc: Value) -> Blueprint {
        match validate(&doc, &no_registered) {
            Ok(bp) => bp,
            Err(problems) => panic!("unexpected problems: {problems:#?}"),
        }
    }

    /// The newcomer's order plan: a fetch, a branch on the amount, a failure edge.
    fn order_plan(when: &str) -> Value {
        json!({
          "steps": [
            {"id": "fetch", "action": "sql",
             "params": {"query": "select amount from orders where id = $1", "args": "[input.order_id]"},
             "input": "goal.input"},
            {"id": "fraud_check", "action": "http", "params": {"url": "http://127.0.0.1:9/fraud"}},
            {"id": "manual_review", "action": "transform", "params": {"expr": "{'held': true}"}},
            {"id": "ship", "action": "noop"}
          ],
          "edges": [
            {"from": "fetch", "to": "fraud_check", "when": when},
            {"from": "fetch", "to": "ship", "when": "result.rows[0].amount <= 1"},
            {"from": "fraud_check", "to": "manual_review", "on": "failure"}
          ],
          "output": "{'shipped': steps.ship.status == 'succeeded'}"
        })
    }

    #[test]
    fn a_misspelt_variable_in_when_is_refused_with_what_the_condition_sees() {
        valid(order_plan("result.rows[0].amount > 1"));
        assert_only(
            order_plan("reslt.rows[0].amount > 1"),
            "$.edges[0].when",
            "unknown variable \"reslt\" (this expression sees: goal, steps, result, error, status, input)",
        );
    }

    #[test]
    fn a_misspelt_variable_in_input_params_or_output_is_refused() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": "gaol.input"})),
            "$.steps[0].input",
            "unknown variable \"gaol\" (this expression sees: goal, steps)",
        );
        // A step's input does not see `input`: it is what computes it.
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": "input.x"})),
            "$.steps[0].input",
            "unknown variable \"input\"",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "transform", "params": {"expr": "inptu.x"}})),
            "$.steps[0].params.expr",
            "unknown variable \"inptu\" (this expression sees: goal, steps, input)",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "sql",
                            "params": {"query": "select $1", "args": "[goal.params.id, params.x]"}})),
            "$.steps[0].params.args",
            "unknown variable \"params\"",
        );
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop"}], "output": "{'r': result}"}),
            "$.output",
            "unknown variable \"result\" (this expression sees: goal, steps)",
        );
    }

    #[test]
    fn every_step_expression_sees_goal_steps_and_input() {
        valid(json!({
            "steps": [
                {"id": "a", "action": "noop", "input": "goal.input"},
                {"id": "b", "action": "transform", "input": "steps.a.result",
                 "params": {"expr": "{'a': steps.a.result, 'in': input, 'g': goal.input}"}},
                {"id": "c", "action": "sql",
                 "params": {"query": "select $1, $2", "args": "[goal.params.id, steps.b.result]"}}
            ],
            "edges": [
                {"from": "a", "to": "b", "when": "status == 'succeeded' && error == null && input == goal.input && steps.a.status == 'succeeded'"},
                {"from": "b", "to": "c"}
            ],
            "output": "steps.c.result"
        }));
    }

    #[test]
    fn a_reference_to_a_step_that_does_not_exist_is_refused() {
        assert_only(
            json!({
                "steps": [{"id": "fetch", "action": "noop"},
                          {"id": "use", "action": "noop", "input": "steps.fecth.result"}],
                "edges": [{"from": "fetch", "to": "use"}]
            }),
            "$.steps[1].input",
            "steps.fecth is not a step",
        );
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop"}], "output": "steps['b'].status"}),
            "$.output",
            "steps.b is not a step",
        );
    }

    #[test]
    fn a_reference_to_a_step_that_is_not_upstream_is_refused() {
        // b and c are siblings: c may run before b ends.
        let siblings = |expr: &str| {
            json!({
                "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                          {"id": "c", "action": "transform", "params": {"expr": expr}}],
                "edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "c"}],
                "output": "steps.b.result"
            })
        };
        valid(siblings("steps.a.result"));
        assert_only(
            siblings("steps.b.result"),
            "$.steps[2].params.expr",
            "steps.b is not upstream of step c",
        );
        // A step cannot read its own result, nor a condition a step after its `from`.
        assert_only(
            json!({
                "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop", "input": "steps.b.result"}],
                "edges": [{"from": "a", "to": "b", "when": "steps.a.status == 'succeeded'"}]
            }),
            "$.steps[1].input",
            "steps.b is not upstream of step b",
        );
        let found = problems(&json!({
            "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}],
            "edges": [{"from": "a", "to": "b", "when": "steps.b.status == 'x'"}]
        }));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].path, "$.edges[0].when");
        assert!(
            found[0]
                .message
                .contains("steps.b is not step a or upstream of it"),
            "{found:#?}"
        );
        // Two levels up is upstream too.
        valid(json!({
            "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                      {"id": "c", "action": "noop", "input": "steps.a.result"}],
            "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]
        }));
    }

    #[test]
    fn macro_variables_and_presence_tests_are_not_unknown() {
        valid(one_step(
            json!({"id": "a", "action": "transform", "params": {"expr":
            "input.items.exists(x, x > 1) && input.items.all(x, x > 0) && \
             input.items.map(i, i * 2).filter(d, d > 2).size() > 0 && \
             input.items.exists_one(y, y == 1) && has(input.score) && \
             type(input.items) == list && [1].map(steps, steps)[0] == 1"}}),
        ));
        // A macro variable is in scope only inside its macro.
        assert_only(
            one_step(json!({"id": "a", "action": "transform",
                            "params": {"expr": "input.items.exists(x, x > 1) && x > 1"}})),
            "$.steps[0].params.expr",
            "unknown variable \"x\"",
        );
        // has(steps.x) asks whether a step exists: not a use of it.
        valid(one_step(
            json!({"id": "a", "action": "noop", "input": "has(steps.other) ? 1 : 2"}),
        ));
    }

    #[test]
    fn step_references_in_a_graph_with_a_cycle_are_only_checked_for_existence() {
        let found = problems(&json!({
            "steps": [{"id": "a", "action": "noop", "input": "steps.b.result"},
                      {"id": "b", "action": "noop", "input": "steps.zz.result"}],
            "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]
        }));
        let messages: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "$.edges: cycle: a -> b -> a".to_owned(),
                "$.steps[1].input: steps.zz is not a step".to_owned()
            ]
        );
    }

    fn spec_example() -> Value {
        json!({
          "name": "triage",
          "steps": [
            {"id": "fetch",    "action": "sql", "params": {"query": "select ..."}, "retries": 2},
            {"id": "classify", "action": "transform",
             "params": {"expr": "{'severity': input.rows[0].priority > 3 ? 'high' : 'low'}"},
             "input": "steps.fetch.result"},
            {"id": "page",     "action": "http", "params": {"method": "POST", "url": "http://127.0.0.1:9/page"}},
            {"id": "backlog",  "action": "noop"},
            {"id": "close",    "action": "noop"}
          ],
          "edges": [
            {"from": "fetch", "to": "classify"},
            {"from": "classify", "to": "page",    "when": "result.severity == 'high'"},
            {"from": "classify", "to": "backlog", "when": "result.severity != 'high'"},
            {"from": "page", "to": "close"}, {"from": "backlog", "to": "close"}
          ],
          "output": "{'closed': steps.close.status == 'succeeded'}"
        })
    }

    #[test]
    fn spec_example_is_valid() {
        let bp = valid(spec_example());
        assert_eq!(bp.name.as_deref(), Some("triage"));
        assert_eq!(bp.roots(), vec!["fetch"]);
        assert_eq!(
            bp.topological_order(),
            vec!["fetch", "classify", "page", "backlog", "close"]
        );
        let fetch = bp.step("fetch").unwrap();
        assert_eq!(fetch.retries, 2);
        assert_eq!(fetch.queue, "default");
        assert_eq!(fetch.timeout, Duration::from_secs(300));
        assert_eq!(bp.step("close").unwrap().join, Join::Any);
        assert_eq!(bp.inbound("close").count(), 2);
        assert_eq!(
            bp.edges[1].when.as_deref(),
            Some("result.severity == 'high'")
        );
        assert_eq!(bp.edges[1].on, EdgeOn::Success);
    }

    #[test]
    fn validated_blueprint_round_trips() {
        let bp = valid(spec_example());
        let again = valid(serde_json::to_value(&bp).unwrap());
        assert_eq!(again, bp);
    }

    #[test]
    fn every_field_set_is_valid() {
        let bp = valid(json!({
            "name": null,
            "steps": [
                {"id": "a", "action": "sleep", "params": {"ms": 10}, "input": null,
                 "queue": "fast.lane:1-x_y", "retries": 100, "backoff": "1ms",
                 "timeout": "24h", "join": "all"},
                {"id": "b", "action": "exec", "params": {"argv": ["echo", "hi"]}, "join": "all"},
                {"id": "c", "action": "fail", "params": {"message": "boom"}},
                {"id": "d", "action": "http", "params": {"url": "https://example.com",
                  "method": "DELETE", "headers": {"X-Token": "t"}, "body": [1, {"a": null}]}},
                {"id": "e", "action": "sql", "params": {"query": "select $1", "args": "[goal.id]"}}
            ],
            "edges": [
                {"from": "a", "to": "b", "on": "always", "when": null},
                {"from": "b", "to": "c", "on": "failure"}
            ],
            "output": null
        }));
        assert_eq!(bp.steps[0].join, Join::All);
        assert_eq!(bp.steps[0].backoff, Duration::from_millis(1));
        assert_eq!(bp.steps[0].timeout, Duration::from_secs(86_400));
        assert_eq!(bp.edges[0].on, EdgeOn::Always);
        assert_eq!(bp.roots(), vec!["a", "d", "e"]);
    }

    #[test]
    fn join_all_with_one_inbound_edge_is_fine() {
        valid(json!({
            "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop", "join": "all"}],
            "edges": [{"from": "a", "to": "b"}]
        }));
    }

    #[test]
    fn registered_actions_are_known() {
        let doc = one_step(json!({"id": "a", "action": "send_mail"}));
        assert!(validate(&doc, &|name| name == "send_mail").is_ok());
        assert!(validate(&doc, &|_| false).is_err());
    }

    /// Validates `doc` where `fetch` is registered with `schema` as its params_schema.
    fn with_schema(doc: &Value, schema: &Value) -> Result<Blueprint, Vec<Problem>> {
        validate_with_params_schemas(
            doc,
            &|name| name == "fetch",
            &|name| (name == "fetch").then(|| schema.clone()),
            &|| {},
        )
    }

    fn url_schema() -> Value {
        json!({
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "tries": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}}
            }
        })
    }

    fn fetch_after_noop(params: Value) -> Value {
        json!({"steps": [
            {"id": "a", "action": "noop"},
            {"id": "b", "action": "fetch", "params": params}
        ]})
    }

    fn as_pairs(problems: &[Problem]) -> Vec<(&str, &str)> {
        problems
            .iter()
            .map(|p| (p.path.as_str(), p.message.as_str()))
            .collect()
    }

    #[test]
    fn params_schema_requires_its_properties() {
        let found = with_schema(&fetch_after_noop(json!({})), &url_schema()).unwrap_err();
        assert_eq!(
            as_pairs(&found),
            [("$.steps[1].params", "\"url\" is a required property")]
        );
        // No params at all are checked as `{}`.
        let doc = json!({"steps": [{"id": "b", "action": "fetch"}]});
        let found = with_schema(&doc, &url_schema()).unwrap_err();
        assert_eq!(
            as_pairs(&found),
            [("$.steps[0].params", "\"url\" is a required property")]
        );
    }

    #[test]
    fn params_schema_reports_each_wrong_value_with_its_path() {
        let doc = fetch_after_noop(json!({"url": "x", "tries": "three", "tags": ["a", 2]}));
        let found = with_schema(&doc, &url_schema()).unwrap_err();
        let mut pairs = as_pairs(&found);
        pairs.sort();
        assert_eq!(
            pairs,
            [
                ("$.steps[1].params.tags[1]", "2 is not of type \"string\""),
                (
                    "$.steps[1].params.tries",
                    "\"three\" is not of type \"integer\""
                ),
                ("$.steps[1].params.url", "\"x\" is not a \"uri\""),
            ]
        );
    }

    #[test]
    fn params_matching_the_schema_pass() {
        let doc = fetch_after_noop(json!({"url": "https://example.com/a", "tries": 3, "tags": []}));
        assert!(with_schema(&doc, &url_schema()).is_ok());
        // CEL expressions are strings in JSON, checked as written.
        let schema = json!({"type": "object", "properties": {"expr": {"type": "string"}}});
        let doc = fetch_after_noop(json!({"expr": "input.x + 1"}));
        assert!(with_schema(&doc, &schema).is_ok());
        // Without a schema, anything goes.
        let doc = fetch_after_noop(json!({"anything": [1]}));
        assert!(validate(&doc, &|name| name == "fetch").is_ok());
    }

    #[test]
    fn params_schema_is_not_applied_to_builtins() {
        let doc = one_step(json!({"id": "a", "action": "sleep", "params": {"ms": 5}}));
        let reject_all = json!({"not": {}});
        let result =
            validate_with_params_schemas(&doc, &|_| true, &|_| Some(reject_all.clone()), &|| {});
        assert!(result.is_ok());
    }

    #[test]
    fn an_invalid_params_schema_is_reported_not_fatal() {
        for schema in [
            json!({"type": "strnig"}),
            json!({"minLength": -1}),
            json!(7),
            json!({"$ref": "https://example.com/schema.json"}),
            json!({"pattern": "("}),
        ] {
            assert!(ParamsSchema::new(&schema).is_err(), "{schema} was accepted");
            let found = with_schema(&fetch_after_noop(json!({"url": "x"})), &schema).unwrap_err();
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].path, "$.steps[1].params");
            assert!(
                found[0].message.starts_with(
                    "the params_schema of action \"fetch\" is not a valid JSON Schema: "
                ),
                "{}",
                found[0].message
            );
        }
    }

    #[test]
    fn several_problems_in_several_places_are_all_reported() {
        let doc = json!({
            "name": 7,
            "steps": [
                {"id": "Fetch", "action": "sql", "params": {}, "retires": 2},
                {"id": "b", "action": "foo", "timeout": "5 minutes"},
                {"id": "b", "action": "noop", "join": "both"}
            ],
            "edges": [
                {"from": "b", "to": "nowhere", "when": "result.x >"}
            ],
            "output": "steps."
        });
        let found = problems(&doc);
        let expect = [
            ("$.name", "expected a string"),
            ("$.steps[0].retires", "unknown field \"retires\""),
            ("$.steps[0].id", "invalid step id \"Fetch\""),
            ("$.steps[0].params.query", "\"query\" is required"),
            ("$.steps[1].action", "unknown action \"foo\""),
            ("$.steps[1].timeout", "invalid duration"),
            (
                "$.steps[2].id",
                "duplicate step id \"b\" (first used by $.steps[1])",
            ),
            (
                "$.steps[2].join",
                "expected \"any\", \"all\", \"first\" or a number of edges, got \"both\"",
            ),
            ("$.edges[0].to", "unknown step \"nowhere\""),
            ("$.edges[0].when", "invalid CEL expression"),
            ("$.output", "invalid CEL expression"),
        ];
        for (path, fragment) in expect {
            assert!(
                found
                    .iter()
                    .any(|p| p.path == path && p.message.contains(fragment)),
                "missing {path}: {fragment} in {found:#?}"
            );
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    // Document-level rules.

    #[test]
    fn document_must_be_an_object() {
        assert_only(json!([1]), "$", "must be a JSON object, got an array");
    }

    #[test]
    fn unknown_top_level_field() {
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop"}], "edge": []}),
            "$.edge",
            "unknown field \"edge\"",
        );
    }

    #[test]
    fn steps_are_required() {
        assert_only(json!({}), "$.steps", "\"steps\" is required");
    }

    #[test]
    fn steps_must_be_an_array() {
        assert_only(json!({"steps": {}}), "$.steps", "expected an array");
    }

    #[test]
    fn steps_must_not_be_empty() {
        assert_only(json!({"steps": []}), "$.steps", "at least one step");
    }

    #[test]
    fn too_many_steps() {
        let steps: Vec<Value> = (0..=MAX_STEPS)
            .map(|i| json!({"id": format!("s{i}"), "action": "noop"}))
            .collect();
        assert_only(
            json!({ "steps": steps }),
            "$.steps",
            "10001 steps; the limit is 10000",
        );
    }

    #[test]
    fn exactly_max_steps_is_fine() {
        let steps: Vec<Value> = (0..MAX_STEPS)
            .map(|i| json!({"id": format!("s{i}"), "action": "noop"}))
            .collect();
        let edges: Vec<Value> = (1..MAX_STEPS)
            .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
            .collect();
        let bp = valid(json!({ "steps": steps, "edges": edges }));
        assert_eq!(bp.topological_order().len(), MAX_STEPS);
    }

    #[test]
    fn blueprint_too_large() {
        let doc = json!({
            "steps": [{"id": "a", "action": "noop", "params": {"pad": "x".repeat(MAX_BLUEPRINT_BYTES)}}]
        });
        let size = serde_json::to_string(&doc).unwrap().len();
        assert_only(
            doc,
            "$",
            &format!("blueprint is {size} bytes; the limit is 1 MiB"),
        );
    }

    #[test]
    fn over_a_budget_nothing_else_is_checked() {
        // The bad CEL would be a second problem if the walk went on.
        let doc = json!({
            "steps": [{"id": "a", "action": "noop", "input": "1 +",
                       "params": {"pad": "x".repeat(MAX_BLUEPRINT_BYTES)}}]
        });
        assert_eq!(problems(&doc).len(), 1);
    }

    #[test]
    fn blueprint_nested_too_deeply() {
        let mut pad = json!(1);
        for _ in 0..100 {
            pad = json!([pad]);
        }
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": "1 +", "params": {"pad": pad}})),
            "$",
            "blueprint is nested 104 levels deep; the limit is 64",
        );
    }

    #[test]
    fn the_interrupt_hook_runs_through_a_long_validation() {
        let steps: Vec<Value> = (0..1000)
            .map(|i| json!({"id": format!("s{i}"), "action": "noop"}))
            .collect();
        let edges: Vec<Value> = (1..1000)
            .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
            .collect();
        let calls = std::cell::Cell::new(0usize);
        let doc = json!({ "steps": steps, "edges": edges });
        validate_interruptible(&doc, &no_registered, &|| calls.set(calls.get() + 1))
            .expect("valid");
        assert!(calls.get() >= 2 * 1000 / INTERRUPT_EVERY, "{}", calls.get());
    }

    #[test]
    fn name_must_be_a_string() {
        assert_only(
            json!({"name": ["x"], "steps": [{"id": "a", "action": "noop"}]}),
            "$.name",
            "expected a string, got an array",
        );
    }

    #[test]
    fn name_too_long() {
        assert_only(
            json!({"name": "é".repeat(201), "steps": [{"id": "a", "action": "noop"}]}),
            "$.name",
            "name is 201 characters; the limit is 200",
        );
        valid(json!({"name": "é".repeat(200), "steps": [{"id": "a", "action": "noop"}]}));
    }

    #[test]
    fn output_must_compile() {
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop"}], "output": "steps.a.result +"}),
            "$.output",
            "invalid CEL expression",
        );
    }

    #[test]
    fn output_must_be_a_string() {
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop"}], "output": {"x": 1}}),
            "$.output",
            "expected a string",
        );
    }

    // Step rules.

    #[test]
    fn step_must_be_an_object() {
        assert_only(
            json!({"steps": ["a"]}),
            "$.steps[0]",
            "expected an object, got a string",
        );
    }

    #[test]
    fn unknown_step_field() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "retires": 3})),
            "$.steps[0].retires",
            "unknown field \"retires\"",
        );
    }

    #[test]
    fn unknown_field_with_odd_name_gets_a_bracket_path() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "my field": 3})),
            "$.steps[0][\"my field\"]",
            "unknown field \"my field\"",
        );
    }

    #[test]
    fn step_id_required() {
        assert_only(
            one_step(json!({"action": "noop"})),
            "$.steps[0].id",
            "\"id\" is required",
        );
    }

    #[test]
    fn step_id_must_be_a_string() {
        assert_only(
            one_step(json!({"id": 1, "action": "noop"})),
            "$.steps[0].id",
            "expected a string, got a number",
        );
    }

    #[test]
    fn step_id_pattern() {
        for bad in ["Fetch", "1a", "", "a-b", &format!("a{}", "b".repeat(63))] {
            assert_only(
                one_step(json!({"id": bad, "action": "noop"})),
                "$.steps[0].id",
                "must match ^[a-z][a-z0-9_]{0,62}$",
            );
        }
        valid(one_step(
            json!({"id": format!("a{}", "b".repeat(62)), "action": "noop"}),
        ));
    }

    #[test]
    fn duplicate_step_id_reported_at_second_occurrence() {
        assert_only(
            json!({"steps": [
                {"id": "a", "action": "noop"},
                {"id": "b", "action": "noop"},
                {"id": "a", "action": "noop"}
            ]}),
            "$.steps[2].id",
            "duplicate step id \"a\" (first used by $.steps[0])",
        );
    }

    #[test]
    fn action_required() {
        assert_only(
            one_step(json!({"id": "a"})),
            "$.steps[0].action",
            "\"action\" is required",
        );
    }

    #[test]
    fn action_must_be_a_string() {
        assert_only(
            one_step(json!({"id": "a", "action": true})),
            "$.steps[0].action",
            "expected a string, got a boolean",
        );
    }

    #[test]
    fn action_must_not_be_empty() {
        assert_only(
            one_step(json!({"id": "a", "action": ""})),
            "$.steps[0].action",
            "must not be empty",
        );
    }

    #[test]
    fn unknown_action() {
        assert_only(
            one_step(json!({"id": "a", "action": "foo"})),
            "$.steps[0].action",
            "unknown action \"foo\" (built-ins: noop, sleep, fail, transform, http, exec, sql, goal, \
             wait; others must be registered by a worker in synapse.actions)",
        );
    }

    #[test]
    fn params_must_be_an_object() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "params": [1]})),
            "$.steps[0].params",
            "expected an object, got an array",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "params": null})),
            "$.steps[0].params",
            "expected an object, got null",
        );
    }

    #[test]
    fn input_must_compile() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": "goal.input["})),
            "$.steps[0].input",
            "invalid CEL expression",
        );
    }

    #[test]
    fn input_must_be_a_string() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": 3})),
            "$.steps[0].input",
            "expected a string",
        );
    }

    #[test]
    fn queue_pattern() {
        for bad in ["", "has space", &"q".repeat(65)] {
            assert_only(
                one_step(json!({"id": "a", "action": "noop", "queue": bad})),
                "$.steps[0].queue",
                "must match ^[A-Za-z0-9_.:-]{1,64}$",
            );
        }
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "queue": null})),
            "$.steps[0].queue",
            "expected a string, got null",
        );
    }

    #[test]
    fn retries_must_be_a_non_negative_integer() {
        for bad in [json!(-1), json!(1.5), json!("2"), json!(null)] {
            assert_only(
                one_step(json!({"id": "a", "action": "noop", "retries": bad})),
                "$.steps[0].retries",
                "expected a non-negative integer",
            );
        }
    }

    #[test]
    fn retries_at_most_100() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "retries": 101})),
            "$.steps[0].retries",
            "retries must be at most 100, got 101",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "retries": u64::MAX})),
            "$.steps[0].retries",
            "at most 100",
        );
    }

    #[test]
    fn backoff_must_be_a_duration() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "backoff": "1.5s"})),
            "$.steps[0].backoff",
            "invalid duration \"1.5s\"",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "backoff": 1000})),
            "$.steps[0].backoff",
            "expected a duration string",
        );
    }

    #[test]
    fn backoff_range() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "backoff": "0ms"})),
            "$.steps[0].backoff",
            "backoff must be between 1ms and 24h, got \"0ms\"",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "backoff": "25h"})),
            "$.steps[0].backoff",
            "backoff must be between 1ms and 24h",
        );
    }

    #[test]
    fn timeout_must_be_a_duration() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "timeout": "5 m"})),
            "$.steps[0].timeout",
            "invalid duration",
        );
    }

    #[test]
    fn timeout_range() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "timeout": "1441m"})),
            "$.steps[0].timeout",
            "timeout must be between 1ms and 24h, got \"1441m\"",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "timeout": "0s"})),
            "$.steps[0].timeout",
            "timeout must be between",
        );
    }

    #[test]
    fn join_is_a_name_or_a_number_of_edges() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "join": "ALL"})),
            "$.steps[0].join",
            "expected \"any\", \"all\", \"first\" or a number of edges, got \"ALL\"",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "join": true})),
            "$.steps[0].join",
            "expected \"any\", \"all\", \"first\" or a number of edges, got a boolean",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "join": null})),
            "$.steps[0].join",
            "got null",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "join": 0})),
            "$.steps[0].join",
            "join counts inbound edges and must be at least 1, got 0",
        );
        for n in [json!(-1), json!(1.5)] {
            assert_only(
                one_step(json!({"id": "a", "action": "noop", "join": n})),
                "$.steps[0].join",
                &format!("join counts inbound edges and must be a whole number, got {n}"),
            );
        }
    }

    /// Steps a, b and c all lead into d, whose fields are `d`.
    fn three_into_one(d: Value) -> Value {
        let mut d = d;
        d["id"] = json!("d");
        d["action"] = json!("noop");
        json!({
            "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                      {"id": "c", "action": "noop"}, d],
            "edges": [{"from": "a", "to": "d"}, {"from": "b", "to": "d"}, {"from": "c", "to": "d"}]
        })
    }

    #[test]
    fn join_first_and_counts_up_to_the_inbound_edges_are_valid() {
        let bp = valid(three_into_one(
            json!({"join": "first", "cancel_others": true}),
        ));
        assert_eq!(bp.steps[3].join, Join::First);
        assert!(bp.steps[3].cancel_others);
        for n in 1..=3 {
            let bp = valid(three_into_one(json!({"join": n})));
            assert_eq!(bp.steps[3].join, Join::Count(n));
            assert!(!bp.steps[3].cancel_others);
        }
    }

    #[test]
    fn join_count_above_the_inbound_edges_is_refused() {
        assert_only(
            three_into_one(json!({"join": 4})),
            "$.steps[3].join",
            "join 4 needs at least 4 inbound edges; step \"d\" has 3",
        );
        assert_only(
            json!({
                "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                          {"id": "x", "action": "noop", "join": 3}],
                "edges": [{"from": "a", "to": "x"}, {"from": "b", "to": "x"}]
            }),
            "$.steps[2].join",
            "join 3 needs at least 3 inbound edges; step \"x\" has 2",
        );
        assert_only(
            json!({
                "steps": [{"id": "a", "action": "noop"}, {"id": "x", "action": "noop", "join": 2}],
                "edges": [{"from": "a", "to": "x"}]
            }),
            "$.steps[1].join",
            "join 2 needs at least 2 inbound edges; step \"x\" has 1",
        );
    }

    #[test]
    fn join_first_or_a_count_on_a_root_step_is_refused() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "join": "first"})),
            "$.steps[0].join",
            "join \"first\" needs an inbound edge; step \"a\" has none",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "join": 1})),
            "$.steps[0].join",
            "join 1 needs at least 1 inbound edge; step \"a\" has none",
        );
        // `any` and `all` on a root are fine: the step is queued at install.
        valid(one_step(
            json!({"id": "a", "action": "noop", "join": "all"}),
        ));
    }

    #[test]
    fn an_edge_with_a_wrong_from_still_counts_toward_join() {
        let mut doc = three_into_one(json!({"join": 3}));
        doc["edges"][0]["from"] = json!("zz");
        assert_only(doc, "$.edges[0].from", "unknown step \"zz\"");
    }

    #[test]
    fn join_counts_are_not_checked_when_edges_is_not_an_array() {
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop", "join": 2}], "edges": {}}),
            "$.edges",
            "expected an array",
        );
    }

    #[test]
    fn cancel_others_needs_join_first_or_a_count() {
        assert_only(
            three_into_one(json!({"cancel_others": true})),
            "$.steps[3].cancel_others",
            "cancel_others needs join \"first\" or a count; this step's join is \"any\"",
        );
        assert_only(
            three_into_one(json!({"join": "all", "cancel_others": true})),
            "$.steps[3].cancel_others",
            "cancel_others needs join \"first\" or a count; this step's join is \"all\"",
        );
        valid(three_into_one(json!({"join": 2, "cancel_others": true})));
        valid(three_into_one(json!({"cancel_others": false})));
        assert_only(
            three_into_one(json!({"join": "first", "cancel_others": "yes"})),
            "$.steps[3].cancel_others",
            "expected a boolean, got a string",
        );
        // A refused join is reported once, not again through cancel_others.
        assert_only(
            three_into_one(json!({"join": "frist", "cancel_others": true})),
            "$.steps[3].join",
            "got \"frist\"",
        );
    }

    /// A map step over `goal.input.urls`, with `fields` added.
    fn map_step(fields: Value) -> Value {
        let mut step = json!({"id": "fetch", "action": "noop", "for_each": "goal.input.urls"});
        for (key, value) in fields.as_object().into_iter().flatten() {
            step[key] = value.clone();
        }
        one_step(step)
    }

    #[test]
    fn a_map_step_sees_item_and_index_in_input_and_params() {
        let bp = valid(json!({
            "steps": [
                {"id": "list", "action": "noop"},
                {"id": "fetch", "action": "transform", "for_each": "steps.list.result.urls",
                 "input": "{'url': item, 'n': index, 'g': goal.input}",
                 "params": {"expr": "{'url': input.url, 'again': item, 'at': index}"},
                 "max_parallel": 4, "tolerate": 2},
                {"id": "store", "action": "sql", "for_each": "[1, 2]",
                 "params": {"query": "select $1", "args": "[item, index, input]"},
                 "max_parallel": null}
            ],
            "edges": [{"from": "list", "to": "fetch"}]
        }));
        let fetch = &bp.steps[1];
        assert_eq!(fetch.for_each.as_deref(), Some("steps.list.result.urls"));
        assert_eq!(fetch.max_parallel, Some(4));
        assert_eq!(fetch.tolerate, 2);
        assert_eq!(bp.steps[2].max_parallel, None);
        assert_eq!(StepKind::of(fetch), StepKind::Map);
        assert_eq!(StepKind::of(&bp.steps[0]), StepKind::Plain);
        valid(map_step(json!({"for_each": null, "input": "goal.input"})));
    }

    #[test]
    fn item_and_index_are_refused_outside_a_map_step() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": "item"})),
            "$.steps[0].input",
            "unknown variable \"item\" (this expression sees: goal, steps); item and index \
             exist only in a map step (with for_each)",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "transform", "params": {"expr": "input[index]"}})),
            "$.steps[0].params.expr",
            "unknown variable \"index\" (this expression sees: goal, steps, input)",
        );
        // An edge condition is about the whole step, not one instance.
        let found = problems(&json!({
            "steps": [{"id": "a", "action": "noop", "for_each": "[1]"}, {"id": "b", "action": "noop"}],
            "edges": [{"from": "a", "to": "b", "when": "item == 1"}]
        }));
        assert_eq!(as_pairs(&found), vec![("$.edges[0].when",
            "unknown variable \"item\" (this expression sees: goal, steps, result, error, status, input)")]);
    }

    #[test]
    fn for_each_is_evaluated_before_its_instances_so_it_sees_no_item() {
        assert_only(
            map_step(json!({"for_each": "[index, 2]"})),
            "$.steps[0].for_each",
            "unknown variable \"index\" (this expression sees: goal, steps); for_each is \
             evaluated before its instances exist",
        );
        assert_only(
            map_step(json!({"for_each": "input.urls"})),
            "$.steps[0].for_each",
            "unknown variable \"input\"",
        );
    }

    #[test]
    fn for_each_must_be_a_cel_string_that_compiles() {
        assert_only(
            map_step(json!({"for_each": ["a", "b"]})),
            "$.steps[0].for_each",
            "expected a string, got an array",
        );
        assert_only(
            map_step(json!({"for_each": "[1,"})),
            "$.steps[0].for_each",
            "invalid CEL expression",
        );
    }

    #[test]
    fn for_each_and_until_read_only_upstream_steps() {
        let siblings = |field: &str, expr: &str| {
            let mut c = json!({"id": "c", "action": "noop", "for_each": "[1]"});
            c[field] = json!(expr);
            json!({
                "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}, c],
                "edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "c"}]
            })
        };
        valid(siblings("for_each", "steps.a.result"));
        assert_only(
            siblings("for_each", "steps.b.result"),
            "$.steps[2].for_each",
            "steps.b is not upstream of step c",
        );
        let mut doc = siblings("until", "steps.b.status == 'succeeded'");
        doc["steps"][2]["for_each"] = Value::Null;
        assert_only(doc, "$.steps[2].until", "steps.b is not upstream of step c");
        let mut doc = siblings("until", "steps.a.status == 'succeeded'");
        doc["steps"][2]["for_each"] = Value::Null;
        valid(doc);
    }

    #[test]
    fn max_parallel_and_tolerate_ranges() {
        assert_only(
            map_step(json!({"max_parallel": 0})),
            "$.steps[0].max_parallel",
            "max_parallel must be an integer from 1 to 10000, got 0",
        );
        assert_only(
            map_step(json!({"max_parallel": 10_001})),
            "$.steps[0].max_parallel",
            "max_parallel must be an integer from 1 to 10000, got 10001",
        );
        assert_only(
            map_step(json!({"max_parallel": "4"})),
            "$.steps[0].max_parallel",
            "expected an integer from 1 to 10000, got a string",
        );
        assert_only(
            map_step(json!({"tolerate": -1})),
            "$.steps[0].tolerate",
            "tolerate must be an integer from 0 to 10000, got -1",
        );
        assert_only(
            map_step(json!({"tolerate": 0.5})),
            "$.steps[0].tolerate",
            "tolerate must be an integer from 0 to 10000, got 0.5",
        );
        // tolerate has a default, so, as for serde, null is not "absent".
        assert_only(
            map_step(json!({"tolerate": null})),
            "$.steps[0].tolerate",
            "expected an integer from 0 to 10000, got null",
        );
        let bp = valid(map_step(
            json!({"max_parallel": 10_000, "tolerate": 10_000}),
        ));
        assert_eq!(bp.steps[0].max_parallel, Some(10_000));
        assert_eq!(bp.steps[0].tolerate, 10_000);
        valid(map_step(json!({"max_parallel": 1, "tolerate": 0})));
    }

    #[test]
    fn max_parallel_and_tolerate_need_for_each() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "max_parallel": 2})),
            "$.steps[0].max_parallel",
            "max_parallel applies only to a step with for_each",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "tolerate": 1})),
            "$.steps[0].tolerate",
            "tolerate applies only to a step with for_each",
        );
        assert_only(
            map_step(json!({"for_each": null, "tolerate": 1})),
            "$.steps[0].tolerate",
            "tolerate applies only to a step with for_each",
        );
        valid(one_step(
            json!({"id": "a", "action": "noop", "max_parallel": null}),
        ));
    }

    /// A loop step that polls until `result.done`, with `fields` added.
    fn loop_step(fields: Value) -> Value {
        let mut step = json!({"id": "poll", "action": "noop", "until": "result.done"});
        for (key, value) in fields.as_object().into_iter().flatten() {
            step[key] = value.clone();
        }
        one_step(step)
    }

    #[test]
    fn a_loop_step_sees_previous_and_iteration_and_its_until_sees_result() {
        let bp = valid(loop_step(json!({
            "action": "transform",
            "input": "previous == null ? goal.input : previous",
            "params": {"expr": "{'n': iteration, 'last': previous, 'in': input}"},
            "until": "result.done || (iteration >= 3 && input == previous)",
            "max_iterations": 1000
        })));
        let poll = &bp.steps[0];
        assert_eq!(
            poll.until.as_deref(),
            Some("result.done || (iteration >= 3 && input == previous)")
        );
        assert_eq!(poll.max_iterations, Some(1000));
        assert_eq!(StepKind::of(poll), StepKind::Loop);
        let bp = valid(loop_step(json!({"max_iterations": null})));
        assert_eq!(bp.steps[0].max_iterations, None);
    }

    #[test]
    fn previous_and_iteration_are_refused_outside_a_loop_step() {
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "input": "previous"})),
            "$.steps[0].input",
            "unknown variable \"previous\" (this expression sees: goal, steps); previous and \
             iteration exist only in a loop step (with until, without for_each)",
        );
        assert_only(
            map_step(json!({"action": "transform", "params": {"expr": "iteration"}})),
            "$.steps[0].params.expr",
            "unknown variable \"iteration\" (this expression sees: goal, steps, input, item, index)",
        );
        assert_only(
            json!({"steps": [{"id": "a", "action": "noop", "until": "true"}],
                   "output": "iteration"}),
            "$.output",
            "unknown variable \"iteration\" (this expression sees: goal, steps)",
        );
    }

    #[test]
    fn result_is_seen_by_until_only_among_a_step_expressions() {
        valid(loop_step(json!({"until": "result.done && input != null"})));
        assert_only(
            loop_step(json!({"input": "result"})),
            "$.steps[0].input",
            "unknown variable \"result\" (this expression sees: goal, steps, previous, iteration)",
        );
    }

    #[test]
    fn until_must_be_a_cel_string_that_compiles() {
        assert_only(
            loop_step(json!({"until": true})),
            "$.steps[0].until",
            "expected a string, got a boolean",
        );
        assert_only(
            loop_step(json!({"until": "result.done &&"})),
            "$.steps[0].until",
            "invalid CEL expression",
        );
        assert_only(
            loop_step(json!({"until": "reslt.done"})),
            "$.steps[0].until",
            "unknown variable \"reslt\" (this expression sees: goal, steps, input, previous, \
             iteration, result)",
        );
    }

    #[test]
    fn max_iterations_range_and_needs_until() {
        for n in [json!(0), json!(1001), json!(-3)] {
            assert_only(
                loop_step(json!({"max_iterations": n})),
                "$.steps[0].max_iterations",
                &format!("max_iterations must be an integer from 1 to 1000, got {n}"),
            );
        }
        assert_only(
            loop_step(json!({"max_iterations": "5"})),
            "$.steps[0].max_iterations",
            "expected an integer from 1 to 1000, got a string",
        );
        valid(loop_step(json!({"max_iterations": 1})));
        assert_only(
            one_step(json!({"id": "a", "action": "noop", "max_iterations": 5})),
            "$.steps[0].max_iterations",
            "max_iterations applies only to a step with until",
        );
        assert_only(
            loop_step(json!({"until": null, "max_iterations": 5})),
            "$.steps[0].max_iterations",
            "max_iterations applies only to a step with until",
        );
    }

    #[test]
    fn for_each_and_until_on_one_step_are_refused() {
        assert_only(
            map_step(json!({"until": "result.size() > 0"})),
            "$.steps[0].until",
            "for_each and until do not combine on one step; run the loop (or the map) in a \
             child goal",
        );
    }

    #[test]
    fn new_step_fields_round_trip() {
        let doc = json!({
            "steps": [
                {"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                {"id": "m", "action": "noop", "join": 2, "cancel_others": true,
                 "for_each": "[1, 2, 3]", "max_parallel": 2, "tolerate": 1},
                {"id": "l", "action": "noop", "join": "first", "until": "result == null",
                 "max_iterations": 7}
            ],
            "edges": [{"from": "a", "to": "m"}, {"from": "b", "to": "m"}, {"from": "m", "to": "l"}]
        });
        let bp = valid(doc);
        let again = valid(serde_json::to_value(&bp).unwrap());
        assert_eq!(again, bp);
        assert_eq!(bp.steps[2].join, Join::Count(2));
        assert_eq!(bp.steps[3].join, Join::First);
    }

    // Built-in action parameters.

    #[test]
    fn sleep_requires_ms() {
        assert_only(
            one_step(json!({"id": "a", "action": "sleep"})),
            "$.steps[0].params.ms",
            "\"ms\" is required",
        );
    }

    #[test]
    fn sleep_ms_range() {
        assert_only(
            one_step(json!({"id": "a", "action": "sleep", "params": {"ms": -5}})),
            "$.steps[0].params.ms",
            "expected a non-negative integer",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "sleep", "params": {"ms": 86_400_001}})),
            "$.steps[0].params.ms",
            "ms must be at most 86400000",
        );
        valid(one_step(
            json!({"id": "a", "action": "sleep", "params": {"ms": 0}}),
        ));
    }

    #[test]
    fn fail_message_must_be_a_string() {
        assert_only(
            one_step(json!({"id": "a", "action": "fail", "params": {"message": 5}})),
            "$.steps[0].params.message",
            "expected a string",
        );
        valid(one_step(json!({"id": "a", "action": "fail"})));
    }

    #[test]
    fn transform_requires_expr() {
        assert_only(
            one_step(json!({"id": "a", "action": "transform"})),
            "$.steps[0].params.expr",
            "\"expr\" is required",
        );
    }

    #[test]
    fn transform_expr_must_compile() {
        assert_only(
            one_step(json!({"id": "a", "action": "transform", "params": {"expr": "{'a': }"}})),
            "$.steps[0].params.expr",
            "invalid CEL expression",
        );
    }

    #[test]
    fn http_requires_url() {
        assert_only(
            one_step(json!({"id": "a", "action": "http"})),
            "$.steps[0].params.url",
            "\"url\" is required",
        );
    }

    #[test]
    fn http_url_scheme() {
        assert_only(
            one_step(json!({"id": "a", "action": "http", "params": {"url": "ftp://x"}})),
            "$.steps[0].params.url",
            "must start with http:// or https://",
        );
    }

    #[test]
    fn http_method() {
        assert_only(
            one_step(json!({"id": "a", "action": "http",
                "params": {"url": "http://x", "method": "FETCH"}})),
            "$.steps[0].params.method",
            "unknown method \"FETCH\"",
        );
    }

    #[test]
    fn http_headers_are_strings() {
        assert_only(
            one_step(json!({"id": "a", "action": "http",
                "params": {"url": "http://x", "headers": {"X-Retry": 3}}})),
            "$.steps[0].params.headers[\"X-Retry\"]",
            "expected a string, got a number",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "http",
                "params": {"url": "http://x", "headers": ["a"]}})),
            "$.steps[0].params.headers",
            "expected an object",
        );
    }

    #[test]
    fn exec_requires_argv() {
        assert_only(
            one_step(json!({"id": "a", "action": "exec"})),
            "$.steps[0].params.argv",
            "\"argv\" is required",
        );
    }

    #[test]
    fn exec_argv_shape() {
        assert_only(
            one_step(json!({"id": "a", "action": "exec", "params": {"argv": []}})),
            "$.steps[0].params.argv",
            "argv must not be empty",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "exec", "params": {"argv": "ls -l"}})),
            "$.steps[0].params.argv",
            "expected an array of strings",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "exec", "params": {"argv": ["ls", 1]}})),
            "$.steps[0].params.argv[1]",
            "expected a string",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "exec", "params": {"argv": [""]}})),
            "$.steps[0].params.argv[0]",
            "program name must not be empty",
        );
    }

    #[test]
    fn sql_requires_query() {
        assert_only(
            one_step(json!({"id": "a", "action": "sql"})),
            "$.steps[0].params.query",
            "\"query\" is required",
        );
        assert_only(
            one_step(json!({"id": "a", "action": "sql", "params": {"query": "  "}})),
            "$.steps[0].params.query",
            "query must not be empty",
        );
    }

    #[test]
    fn sql_args_must_compile() {
        assert_only(
            one_step(json!({"id": "a", "action": "sql",
                "params": {"query": "select $1", "args": "[goal.id"}})),
            "$.steps[0].params.args",
            "invalid CEL expression",
        );
    }

    #[test]
    fn registered_action_params_are_not_checked_here() {
        let doc = one_step(json!({"id": "a", "action": "custom", "params": {"anything": [1]}}));
        assert!(validate(&doc, &|_| true).is_ok());
    }

    // Child goals (action "goal", SPEC §4.7).

    /// Validates with `goal` known whether or not it is listed among the built-ins, so
    /// that these tests do not depend on the order in which the action lands.
    fn check_goal(doc: &Value) -> Result<Blueprint, Vec<Problem>> {
        validate(doc, &|name| name == "goal")
    }

    fn goal_valid(doc: Value) -> Blueprint {
        match check_goal(&doc) {
            Ok(bp) => bp,
            Err(problems) => panic!("unexpected problems: {problems:#?}"),
        }
    }

    /// Every problem as `path: message`.
    fn goal_problems(doc: Value) -> Vec<String> {
        match check_goal(&doc) {
            Ok(bp) => panic!("expected problems, got a valid blueprint: {bp:?}"),
            Err(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }

    /// Asserts exactly one problem, at `path`, whose message contains `fragment`.
    fn assert_goal_only(doc: Value, path: &str, fragment: &str) {
        let found = check_goal(&doc).err().unwrap_or_default();
        assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
        assert_eq!(found[0].path, path, "{found:#?}");
        assert!(
            found[0].message.contains(fragment),
            "message {:?} lacks {fragment:?}",
            found[0].message
        );
    }

    /// One goal step, `g`, with these params.
    fn goal_step(params: Value) -> Value {
        one_step(json!({"id": "g", "action": "goal", "params": params}))
    }

    /// `find` then `g` (a goal step with these params), and `other`, a sibling of both.
    fn after_find(params: Value) -> Value {
        json!({
            "steps": [{"id": "find", "action": "noop"}, {"id": "other", "action": "noop"},
                      {"id": "g", "action": "goal", "params": params}],
            "edges": [{"from": "find", "to": "g"}],
            "output": "steps.other.result"
        })
    }

    #[test]
    fn goal_step_with_a_goal_text_is_valid() {
        let bp = goal_valid(one_step(json!({
            "id": "g", "action": "goal", "input": "{'topic': goal.input.topic}",
            "params": {"goal": "'summarize ' + input.topic", "planner": "template"}
        })));
        assert_eq!(bp.steps[0].params["planner"], "template");
        goal_valid(goal_step(json!({"goal": "'triage ' + goal.goal"})));
    }

    #[test]
    fn goal_step_needs_a_goal_or_a_blueprint() {
        let needs = "$.steps[0].params: a goal step needs params.goal (a goal text) or \
                     params.blueprint (a plan)";
        assert_eq!(goal_problems(goal_step(json!({}))), [needs]);
        assert_eq!(
            goal_problems(one_step(json!({"id": "g", "action": "goal"}))),
            [needs]
        );
    }

    #[test]
    fn goal_and_blueprint_do_not_combine() {
        assert_eq!(
            goal_problems(goal_step(json!({
                "goal": "'x'", "planner": "template",
                "blueprint": {"steps": [{"id": "a", "action": "noop"}]}
            }))),
            [
                "$.steps[0].params: params.goal and params.blueprint do not combine: give a goal \
              text to plan or a blueprint to run, not both"
            ]
        );
    }

    #[test]
    fn goal_params_refuse_unknown_keys() {
        assert_eq!(
            goal_problems(goal_step(json!({"goal": "'x'", "input": "goal.input"}))),
            [
                "$.steps[0].params.input: unknown field \"input\" (expected one of: goal, \
              planner, blueprint)"
            ]
        );
    }

    #[test]
    fn goal_text_must_be_a_cel_string_over_the_step_param_scope() {
        assert_goal_only(
            goal_step(json!({"goal": 5})),
            "$.steps[0].params.goal",
            "expected a string (a CEL expression giving the goal text), got a number",
        );
        // null is a wrong value, not a missing one: one problem, not two.
        assert_goal_only(
            goal_step(json!({"goal": null})),
            "$.steps[0].params.goal",
            "got null",
        );
        assert_goal_only(
            goal_step(json!({"goal": "'summarize ' +"})),
            "$.steps[0].params.goal",
            "invalid CEL expression",
        );
        // A plain goal text is not CEL: it must be quoted.
        assert_goal_only(
            goal_step(json!({"goal": "summarize the report"})),
            "$.steps[0].params.goal",
            "invalid CEL expression",
        );
        assert_goal_only(
            goal_step(json!({"goal": "'summarize ' + item"})),
            "$.steps[0].params.goal",
            "unknown variable \"item\" (this expression sees: goal, steps, input); item and \
             index exist only in a map step (with for_each)",
        );
    }

    #[test]
    fn goal_text_reads_upstream_steps_only() {
        goal_valid(after_find(json!({"goal": "steps.find.result.text"})));
        assert_eq!(
            goal_problems(after_find(json!({"goal": "steps.other.result.text"}))),
            [
                "$.steps[2].params.goal: steps.other is not upstream of step g, so it may not \
              have ended when this expression is evaluated"
            ]
        );
        assert_goal_only(
            after_find(json!({"goal": "steps.fnd.result.text"})),
            "$.steps[2].params.goal",
            "steps.fnd is not a step",
        );
    }

    #[test]
    fn planner_is_a_name() {
        for name in [
            "template",
            "llm2",
            "my_planner",
            &format!("p{}", "x".repeat(62)),
        ] {
            goal_valid(goal_step(json!({"goal": "'x'", "planner": name})));
        }
        for name in [
            "Template",
            "",
            "2fast",
            "my-planner",
            &format!("p{}", "x".repeat(63)),
        ] {
            assert_goal_only(
                goal_step(json!({"goal": "'x'", "planner": name})),
                "$.steps[0].params.planner",
                &format!("invalid planner \"{name}\": must match ^[a-z][a-z0-9_]{{0,62}}$"),
            );
        }
        for planner in [json!(3), json!(null)] {
            assert_goal_only(
                goal_step(json!({"goal": "'x'", "planner": planner})),
                "$.steps[0].params.planner",
                "expected a string",
            );
        }
    }

    #[test]
    fn planner_applies_only_with_a_goal_text() {
        assert_eq!(
            goal_problems(goal_step(json!({
                "planner": "template",
                "blueprint": {"steps": [{"id": "a", "action": "noop"}]}
            }))),
            [
                "$.steps[0].params.planner: params.planner applies only with params.goal: a \
              given blueprint is not planned"
            ]
        );
    }

    #[test]
    fn inline_blueprint_is_validated_and_kept() {
        let child = json!({
            "name": "child",
            "steps": [{"id": "a", "action": "transform", "params": {"expr": "input"}},
                      {"id": "b", "action": "noop", "input": "steps.a.result"}],
            "edges": [{"from": "a", "to": "b"}],
            "output": "steps.b.result"
        });
        let bp = goal_valid(goal_step(json!({ "blueprint": child })));
        assert_eq!(bp.steps[0].params["blueprint"], child);
    }

    #[test]
    fn inline_blueprint_problems_have_paths_under_the_step() {
        assert_goal_only(
            goal_step(json!({"blueprint": {"steps": [
                {"id": "a", "action": "noop"}, {"id": "b", "action": "nope"}
            ]}})),
            "$.steps[0].params.blueprint.steps[1].action",
            "unknown action \"nope\"",
        );
        assert_eq!(
            goal_problems(goal_step(json!({"blueprint": {"stpes": []}}))),
            [
                "$.steps[0].params.blueprint.stpes: unknown field \"stpes\" (expected one \
                 of: name, steps, edges, output)",
                "$.steps[0].params.blueprint.steps: \"steps\" is required"
            ]
        );
        // A grandchild's problem lands under both levels.
        assert_goal_only(
            json!({"steps": [{"id": "a", "action": "noop"},
                {"id": "g", "action": "goal", "params": {"blueprint": {"steps": [
                    {"id": "h", "action": "goal",
                     "params": {"blueprint": {"steps": [{"id": "Bad", "action": "noop"}]}}}
                ]}}}
            ]}),
            "$.steps[1].params.blueprint.steps[0].params.blueprint.steps[0].id",
            "invalid step id \"Bad\"",
        );
    }

    #[test]
    fn inline_blueprint_names_its_own_steps() {
        // The child is a goal of its own: `steps` there are the child's, and the
        // parent's steps are out of its reach.
        assert_goal_only(
            after_find(json!({"blueprint": {
                "steps": [{"id": "a", "action": "noop", "input": "steps.find.result"}]
            }})),
            "$.steps[2].params.blueprint.steps[0].input",
            "steps.find is not a step",
        );
        goal_valid(goal_step(json!({"blueprint": {
            "steps": [{"id": "g", "action": "noop"}], "output": "steps.g.result"
        }})));
    }

    #[test]
    fn blueprint_may_be_an_expression_over_upstream_steps() {
        goal_valid(after_find(json!({"blueprint": "steps.find.result"})));
        assert_goal_only(
            after_find(json!({"blueprint": "steps.other.result"})),
            "$.steps[2].params.blueprint",
            "steps.other is not upstream of step g",
        );
        assert_goal_only(
            goal_step(json!({"blueprint": "steps.find.result +"})),
            "$.steps[0].params.blueprint",
            "invalid CEL expression",
        );
        assert_goal_only(
            goal_step(json!({"blueprint": "plan"})),
            "$.steps[0].params.blueprint",
            "unknown variable \"plan\" (this expression sees: goal, steps, input)",
        );
    }

    #[test]
    fn blueprint_of_another_type_is_refused() {
        for (value, got) in [
            (json!(7), "a number"),
            (json!([{"id": "a", "action": "noop"}]), "an array"),
            (json!(null), "null"),
        ] {
            assert_eq!(
                goal_problems(goal_step(json!({ "blueprint": value }))),
                [format!(
                    "$.steps[0].params.blueprint: expected an object (a blueprint) or a \
                     string (a CEL expression giving one), got {got}"
                )]
            );
        }
    }

    #[test]
    fn a_map_over_a_goal_step_runs_one_child_per_item() {
        let bp = goal_valid(one_step(json!({
            "id": "g", "action": "goal", "for_each": "goal.input.topics", "max_parallel": 2,
            "tolerate": 1, "input": "{'topic': item, 'n': index}",
            "params": {"goal": "'research ' + item + ' (' + string(index) + ')'"}
        })));
        assert_eq!(StepKind::of(&bp.steps[0]), StepKind::Map);
        goal_valid(one_step(json!({
            "id": "g", "action": "goal", "for_each": "goal.input.plans",
            "params": {"blueprint": "item"}
        })));
    }

    // Waits (action "wait", SPEC §4.9).

    /// One wait step, `w`, with these params and other fields.
    fn wait_step(params: Value, fields: Value) -> Value {
        let mut step = json!({"id": "w", "action": "wait", "params": params});
        for (key, value) in fields.as_object().into_iter().flatten() {
            step[key] = value.clone();
        }
        one_step(step)
    }

    /// Every problem as `path: message`.
    fn all_problems(doc: Value) -> Vec<String> {
        problems(&doc).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_signal_wait_with_a_timeout_handled_by_a_failure_edge_is_valid() {
        let bp = valid(json!({
            "steps": [
                {"id": "ask", "action": "noop"},
                {"id": "approval", "action": "wait",
                 "params": {"signal": "order.42:approved", "timeout": "5m"}},
                {"id": "ship", "action": "noop", "input": "steps.approval.result.payload"},
                {"id": "escalate", "action": "noop"}
            ],
            "edges": [
                {"from": "ask", "to": "approval"},
                {"from": "approval", "to": "ship"},
                {"from": "approval", "to": "escalate", "on": "failure"}
            ]
        }));
        let wait = Wait::from_params(&bp.steps[1].params).unwrap();
        assert_eq!(
            wait,
            Wait::Signal {
                name: "order.42:approved".into(),
                timeout: Some(Duration::from_secs(300)),
                timeout_text: Some("5m".into())
            }
        );
        assert_eq!(bp.edges[2].on, EdgeOn::Failure);
        // retries: 0 asks for no retry, so it is not refused.
        valid(wait_step(json!({"signal": "go"}), json!({"retries": 0})));
    }

    #[test]
    fn a_wait_for_a_duration_is_valid() {
        let bp = valid(wait_step(json!({"for": "720h"}), json!({})));
        assert_eq!(
            Wait::from_params(&bp.steps[0].params),
            Ok(Wait::For(Duration::from_secs(720 * 3600)))
        );
    }

    #[test]
    fn a_wait_until_a_time_sees_input_and_goal() {
        let until = "has(input.deadline) ? input.deadline : goal.input.deadline";
        let bp = valid(wait_step(
            json!({ "until": until }),
            json!({"input": "goal.input.order"}),
        ));
        assert_eq!(
            Wait::from_params(&bp.steps[0].params),
            Ok(Wait::Until(until.into()))
        );
        // Upstream steps are readable, like any step parameter.
        valid(json!({
            "steps": [{"id": "plan", "action": "noop"},
                      {"id": "w", "action": "wait",
                       "params": {"until": "steps.plan.result.at"}}],
            "edges": [{"from": "plan", "to": "w"}]
        }));
    }

    #[test]
    fn a_wait_until_is_a_step_param_expression() {
        assert_only(
            wait_step(json!({"until": "deadline"}), json!({})),
            "$.steps[0].params.until",
            "unknown variable \"deadline\" (this expression sees: goal, steps, input)",
        );
        assert_only(
            wait_step(json!({"until": "result.at"}), json!({})),
            "$.steps[0].params.until",
            "unknown variable \"result\"",
        );
        assert_only(
            wait_step(json!({"until": "goal.input.at +"}), json!({})),
            "$.steps[0].params.until",
            "invalid CEL expression",
        );
        assert_eq!(
            all_problems(json!({
                "steps": [{"id": "other", "action": "noop"},
                          {"id": "w", "action": "wait",
                           "params": {"until": "steps.other.result.at"}}]
            })),
            [
                "$.steps[1].params.until: steps.other is not upstream of step w, so it may not \
              have ended when this expression is evaluated"
            ]
        );
    }

    #[test]
    fn wait_params_problems_are_at_their_key() {
        assert_eq!(
            all_problems(one_step(json!({"id": "w", "action": "wait"}))),
            [
                "$.steps[0].params: a wait step needs one of params.signal (a signal name), \
              params.for (a duration such as \"10m\") or params.until (a CEL expression \
              giving an RFC 3339 time)"
            ]
        );
        assert_eq!(
            all_problems(wait_step(json!({"signal": "a", "payload": {}}), json!({}))),
            [
                "$.steps[0].params.payload: unknown field \"payload\" (expected one of: signal, \
              for, until, timeout)"
            ]
        );
        assert_eq!(
            all_problems(wait_step(json!({"signal": "a", "for": "1m"}), json!({}))),
            [
                "$.steps[0].params.for: params.signal and params.for do not combine: a wait \
              step waits for one thing (a signal, a duration or a time)"
            ]
        );
        assert_eq!(
            all_problems(wait_step(json!({"for": "1m", "timeout": "2m"}), json!({}))),
            [
                "$.steps[0].params.timeout: params.timeout applies only with params.signal: a \
              wait for a duration or a time ends when it comes"
            ]
        );
        assert_only(
            wait_step(json!({"signal": "needs approval"}), json!({})),
            "$.steps[0].params.signal",
            "invalid signal name \"needs approval\": ' ' is not allowed",
        );
        assert_only(
            wait_step(json!({"signal": "a", "timeout": "5 m"}), json!({})),
            "$.steps[0].params.timeout",
            "invalid duration \"5 m\"",
        );
        assert_only(
            wait_step(json!({"for": "0s"}), json!({})),
            "$.steps[0].params.for",
            "params.for must be longer than 0, got \"0s\"",
        );
        assert_only(
            wait_step(json!({"until": ""}), json!({})),
            "$.steps[0].params.until",
            "params.until must not be empty",
        );
    }

    #[test]
    fn wait_until_is_checked_even_when_another_param_is_at_fault() {
        assert_eq!(
            all_problems(wait_step(
                json!({"until": "deadline", "timeout": "1m"}),
                json!({})
            )),
            [
                "$.steps[0].params.timeout: params.timeout applies only with params.signal: \
                 a wait for a duration or a time ends when it comes",
                "$.steps[0].params.until: unknown variable \"deadline\" (this expression \
                 sees: goal, steps, input)"
            ]
        );
    }

    #[test]
    fn a_wait_step_does_not_map() {
        assert_only(
            wait_step(
                json!({"signal": "a"}),
                json!({"for_each": "goal.input.items"}),
            ),
            "$.steps[0].for_each",
            "a wait step cannot have for_each: to wait once per item, map a child goal (a \
             step with action \"goal\" and for_each) whose blueprint holds the wait",
        );
    }

    #[test]
    fn a_wait_step_does_not_loop() {
        assert_only(
            wait_step(
                json!({"for": "1m"}),
                json!({"until": "result.woke_at != null"}),
            ),
            "$.steps[0].until",
            "a wait step cannot loop with until: to wait again and again, loop a child goal \
             (a step with action \"goal\" and until) whose blueprint holds the wait; to wait \
             until a time, use params.until",
        );
        // With for_each too: each is refused, and nothing more is said.
        assert_eq!(
            all_problems(wait_step(
                json!({"for": "1m"}),
                json!({"for_each": "[1]", "until": "true"})
            ))
            .len(),
            2
        );
    }

    #[test]
    fn a_wait_step_does_not_retry() {
        for retries in [1, 100, 101] {
            assert_only(
                wait_step(json!({"signal": "a"}), json!({ "retries": retries })),
                "$.steps[0].retries",
                "a wait step does not retry: handle its timeout with an on: failure edge",
            );
        }
        // A malformed count is reported as such.
        assert_only(
            wait_step(json!({"signal": "a"}), json!({"retries": -1})),
            "$.steps[0].retries",
            "expected a non-negative integer",
        );
    }

    #[test]
    fn a_wait_step_has_no_step_timeout() {
        for timeout in [json!("5m"), json!("0s"), json!(null)] {
            assert_only(
                wait_step(json!({"signal": "a"}), json!({ "timeout": timeout })),
                "$.steps[0].timeout",
                "a wait step's time limit is params.timeout (with params.signal); the step \
                 timeout, a limit on one attempt, does not apply",
            );
        }
    }

    // Edge rules.

    fn two_steps(edges: Value) -> Value {
        json!({
            "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}],
            "edges": edges
        })
    }

    #[test]
    fn edges_must_be_an_array() {
        assert_only(
            two_steps(json!({"from": "a"})),
            "$.edges",
            "expected an array",
        );
    }

    #[test]
    fn edge_must_be_an_object() {
        assert_only(
            two_steps(json!(["a->b"])),
            "$.edges[0]",
            "expected an object",
        );
    }

    #[test]
    fn unknown_edge_field() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "b", "if": "true"}])),
            "$.edges[0].if",
            "unknown field \"if\"",
        );
    }

    #[test]
    fn edge_from_required() {
        assert_only(
            two_steps(json!([{"to": "b"}])),
            "$.edges[0].from",
            "\"from\" is required",
        );
    }

    #[test]
    fn edge_to_required() {
        assert_only(
            two_steps(json!([{"from": "a"}])),
            "$.edges[0].to",
            "\"to\" is required",
        );
    }

    #[test]
    fn edge_from_must_name_a_step() {
        assert_only(
            two_steps(json!([{"from": "x", "to": "b"}])),
            "$.edges[0].from",
            "unknown step \"x\"",
        );
    }

    #[test]
    fn edge_to_must_name_a_step() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "zz"}])),
            "$.edges[0].to",
            "unknown step \"zz\"",
        );
    }

    #[test]
    fn edge_to_a_malformed_step_id_is_not_also_unknown() {
        assert_only(
            json!({
                "steps": [{"id": "a", "action": "noop"}, {"id": "B", "action": "noop"}],
                "edges": [{"from": "a", "to": "B"}]
            }),
            "$.steps[1].id",
            "invalid step id",
        );
    }

    #[test]
    fn self_edge() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "a"}])),
            "$.edges[0]",
            "self-edge: step \"a\"",
        );
    }

    #[test]
    fn duplicate_edge() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "b"}, {"from": "a", "to": "b", "on": "failure"}])),
            "$.edges[1]",
            "duplicate edge \"a\" -> \"b\" (first declared at $.edges[0])",
        );
    }

    #[test]
    fn edge_when_must_compile() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "b", "when": "result.score >"}])),
            "$.edges[0].when",
            "invalid CEL expression",
        );
    }

    #[test]
    fn edge_on_values() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "b", "on": "sucess"}])),
            "$.edges[0].on",
            "expected \"success\", \"failure\" or \"always\", got \"sucess\"",
        );
        assert_only(
            two_steps(json!([{"from": "a", "to": "b", "on": null}])),
            "$.edges[0].on",
            "expected a string",
        );
    }

    #[test]
    fn cycle_is_reported_once_in_order() {
        assert_only(
            json!({
                "steps": [
                    {"id": "start", "action": "noop"},
                    {"id": "a", "action": "noop"},
                    {"id": "b", "action": "noop"},
                    {"id": "c", "action": "noop"}
                ],
                "edges": [
                    {"from": "start", "to": "a"},
                    {"from": "a", "to": "b"},
                    {"from": "b", "to": "c"},
                    {"from": "c", "to": "a"},
                    {"from": "c", "to": "b"}
                ]
            }),
            "$.edges",
            "cycle: a -> b -> c -> a",
        );
    }

    #[test]
    fn two_step_cycle() {
        assert_only(
            two_steps(json!([{"from": "a", "to": "b"}, {"from": "b", "to": "a", "on": "failure"}])),
            "$.edges",
            "cycle: a -> b -> a",
        );
    }

    #[test]
    fn long_chain_cycle_does_not_overflow() {
        let n = MAX_STEPS;
        let steps: Vec<Value> = (0..n)
            .map(|i| json!({"id": format!("s{i}"), "action": "noop"}))
            .collect();
        let mut edges: Vec<Value> = (1..n)
            .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
            .collect();
        edges.push(json!({"from": format!("s{}", n - 1), "to": "s0"}));
        let found = problems(&json!({ "steps": steps, "edges": edges }));
        assert_eq!(found.len(), 1, "{:?}", &found[..1]);
        assert_eq!(found[0].path, "$.edges");
        assert!(found[0].message.starts_with("cycle: s0 -> s1 -> "));
        assert!(found[0].message.ends_with("-> s9999 -> s0"));
    }

    #[test]
    fn problem_list_is_capped() {
        let steps: Vec<Value> = (0..MAX_PROBLEMS + 10).map(|_| json!(1)).collect();
        let found = problems(&json!({ "steps": steps }));
        assert_eq!(found.len(), MAX_PROBLEMS + 1);
        let last = found.last().unwrap();
        assert_eq!(last.path, "$");
        assert!(
            last.message.contains("10 more problems"),
            "{}",
            last.message
        );
    }

    #[test]
    fn problem_display_and_json() {
        let p = Problem {
            path: "$.steps[0].id".into(),
            message: "bad".into(),
        };
        assert_eq!(p.to_string(), "$.steps[0].id: bad");
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"path": "$.steps[0].id", "message": "bad"})
        );
    }
}

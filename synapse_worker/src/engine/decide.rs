//! The engine's decisions, as plain functions of what the store read: how
//! an edge resolves, whether a step runs, waits or is skipped. Nothing here
//! reads or writes the database.
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::blueprint::{cel, limits, EdgeOn, Join};
use crate::stored::{Steps, MAX_STORED_JSON_BYTES};

/// How a step ended, as edges see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The action succeeded.
    Succeeded,
    /// The action failed for good (retries exhausted, or a permanent error).
    Failed,
    /// No inbound edge let it run.
    Skipped,
    /// Its goal was cancelled.
    Cancelled,
}

impl Outcome {
    /// The task status this outcome is stored as.
    pub fn status(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A step that just ended, with what its outbound edges may look at.
#[derive(Debug, Clone)]
pub struct EndedStep {
    /// Step id.
    pub step: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Its result (succeeded steps).
    pub result: Value,
    /// Its error message (failed steps).
    pub error: Option<String>,
    /// The input it ran with.
    pub input: Value,
    /// It failed because an expression could not be evaluated (its own, or the `when`
    /// of an edge into it): it takes only `always` edges, and the goal fails.
    pub definition_error: bool,
}

/// How an edge resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The outcome matched `on` and `when` held.
    Taken,
    /// It did not.
    NotTaken,
    /// `when` could not be evaluated; the `to` step fails with this error.
    Error(String),
}

impl Resolution {
    /// The edge state stored for this resolution.
    pub fn state(&self) -> &'static str {
        match self {
            Resolution::Taken => "taken",
            Resolution::NotTaken => "not_taken",
            Resolution::Error(_) => "error",
        }
    }
}

/// Resolves one outbound edge of `from` (rule 2): taken iff the outcome
/// matches `on` and `when` is true; a skipped or cancelled step takes no edge,
/// and a step failed by a definition error takes only `always` edges: a
/// `failure` edge handles the world failing, not a wrong blueprint.
pub fn resolve_edge(
    on: EdgeOn,
    when: Option<&str>,
    from: &EndedStep,
    variables: &Variables,
) -> Resolution {
    let matches = match (from.outcome, on) {
        (Outcome::Skipped | Outcome::Cancelled, _) => false,
        (_, EdgeOn::Always) => true,
        (Outcome::Failed, EdgeOn::Failure) => !from.definition_error,
        (Outcome::Succeeded, EdgeOn::Success) => true,
        _ => false,
    };
    if !matches {
        return Resolution::NotTaken;
    }
    let Some(source) = when else {
        return Resolution::Taken;
    };
    match variables
        .expression(source)
        .and_then(|expression| expression.evaluate_bool(&variables.values))
    {
        Ok(true) => Resolution::Taken,
        Ok(false) => Resolution::NotTaken,
        Err(error) => Resolution::Error(error),
    }
}

/// What to do with a pending step once its inbound edges are known (rule 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinDecision {
    /// Some inbound edge is still pending.
    Wait,
    /// Queue it.
    Run,
    /// Skip it, for this reason.
    Skip(String),
}

/// How a step's inbound edges stand: the counts kept on its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// Inbound edges in all (0: a root step).
    pub total: u32,
    /// Not resolved yet.
    pub pending: u32,
    /// Resolved taken.
    pub taken: u32,
}

/// Decides a step from its inbound counts; `not_taken_from` (the steps of
/// the edges not taken) only says why a join `all` is skipped. `any` and
/// `all` wait for every edge; `first` and n decide as soon as enough edges
/// are taken, or as soon as too few still can be (§4.8).
pub fn decide_join(join: Join, inbound: Inbound, not_taken_from: &[String]) -> JoinDecision {
    let Inbound {
        total,
        pending,
        taken,
    } = inbound;
    if total == 0 {
        // A root step (decided when its goal runs again): nothing holds it back.
        return JoinDecision::Run;
    }
    if let Some(needed) = join.early() {
        return if taken >= needed {
            JoinDecision::Run
        } else if taken + pending < needed {
            JoinDecision::Skip(format!(
                "join {}: {taken} of {total} inbound edges taken, {needed} needed",
                join.to_column(),
            ))
        } else {
            JoinDecision::Wait
        };
    }
    if pending > 0 {
        return JoinDecision::Wait;
    }
    match join {
        Join::All if taken < total => JoinDecision::Skip(format!(
            "join all: edge from {} not taken",
            not_taken_from.join(", ")
        )),
        _ if taken > 0 => JoinDecision::Run,
        _ => JoinDecision::Skip("no inbound edge was taken".to_owned()),
    }
}

/// `task`, pending, once its one inbound edge, from `from`, resolved as
/// `resolution`: what reading it back would say of it.
pub fn decided_by_sole_edge(
    mut task: ReadyTask,
    resolution: &Resolution,
    from: &ParentResult,
) -> ReadyTask {
    let taken = *resolution == Resolution::Taken;
    task.inbound = Inbound {
        total: 1,
        pending: 0,
        taken: u32::from(taken),
    };
    if !taken {
        task.not_taken_from = vec![from.step.clone()];
    } else if task.input_expr.is_none() {
        task.parent_results.results.push(from.clone());
    }
    task
}

/// A parent's result in a step's default input: shared, not copied (one
/// parent may feed thousands of successors), with how deeply it nests.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentResult {
    /// The parent step.
    pub step: String,
    /// Its result.
    pub result: Arc<Value>,
    /// How deeply the result nests ([`limits::json_depth`]).
    pub depth: usize,
}

impl ParentResult {
    /// `step`'s result, as its successors' default inputs hold it.
    pub fn of(step: &EndedStep) -> Self {
        ParentResult::new(step.step.clone(), step.result.clone())
    }

    /// `step`'s `result`.
    pub fn new(step: String, result: Value) -> Self {
        ParentResult {
            step,
            depth: limits::json_depth(&result),
            result: Arc::new(result),
        }
    }
}

/// A step's default input: parent → result, of its taken inbound edges.
/// Postgres assembles it from the parents' rows where the step is queued
/// ([`crate::store::TaskInput::ParentResults`]); the engine only checks that
/// it can be stored, and builds it for a wait step, which starts at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParentResults {
    /// The results.
    pub results: Vec<ParentResult>,
    /// Set when together they are more than one stored JSON value may hold
    /// (then `results` is empty): their size in bytes.
    pub oversized: Option<i64>,
}

impl ParentResults {
    /// Why the input cannot be stored (`what` names it): too large for one
    /// value, or nested a level above its deepest result, too deep.
    pub fn check(&self, what: &str) -> Result<(), String> {
        if let Some(bytes) = self.oversized {
            return Err(format!(
                "{what} would hold {bytes} bytes of its parents' results; one stored JSON value \
                 holds at most {MAX_STORED_JSON_BYTES}: give the step an input expression"
            ));
        }
        let depth = self.depth();
        if depth > limits::MAX_JSON_DEPTH {
            return Err(limits::depth_message(what, depth));
        }
        Ok(())
    }

    /// How deeply the input nests: a level above its deepest result.
    pub fn depth(&self) -> usize {
        1 + self
            .results
            .iter()
            .map(|parent| parent.depth)
            .max()
            .unwrap_or(0)
    }

    /// The input itself.
    pub fn to_value(&self) -> Value {
        Value::Object(
            self.results
                .iter()
                .map(|parent| (parent.step.clone(), Value::clone(&parent.result)))
                .collect(),
        )
    }
}

/// What a goal's expressions see, by name: `goal`, `steps`, and what their
/// place adds (`result`, `previous`, …).
#[derive(Debug, Clone, Default)]
pub struct Variables {
    /// By name.
    pub values: Map<String, Value>,
    /// Set when the goal's `steps` cannot be one value (`steps` is then
    /// missing): their size in bytes.
    pub steps_oversized: Option<i64>,
}

impl Variables {
    /// `source` compiled; an error if it cannot be, or if it reads `steps`
    /// and they are missing.
    pub fn expression(&self, source: &str) -> Result<cel::Expression, String> {
        Steps::compile(source, self.steps_oversized)
    }
}

/// What expressions see of the goal.
#[derive(Debug, Clone)]
pub struct GoalVariables {
    /// `goal`: `{id, goal, input, params}`; null until an expression needs it
    /// (the end of a map step's instance does not read it: a goal's input
    /// may be the large list the step maps over). Shared by the steps of one
    /// goal that end together: read once, not once a step.
    pub goal: Arc<Value>,
}

/// A pending step whose inbound edges have all resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyTask {
    /// Its goal.
    pub goal_id: i64,
    /// Task id.
    pub id: i64,
    /// Step id.
    pub step: String,
    /// Join mode.
    pub join: Join,
    /// Input expression.
    pub input_expr: Option<String>,
    /// How its inbound edges stand.
    pub inbound: Inbound,
    /// The steps of its inbound edges not taken, in blueprint order: read
    /// only for a join `all` that is to be skipped (they say why).
    pub not_taken_from: Vec<String>,
    /// The results of the taken inbound edges' parents: the default input
    /// (read only for a step with one and a taken edge).
    pub parent_results: ParentResults,
    /// A map step: it starts its instances instead of being queued.
    pub is_map: bool,
    /// When it starts, its parents that have not ended are cancelled.
    pub cancel_others: bool,
    /// A loop: its input sees `previous` (null) and `iteration` (1).
    pub looping: bool,
    /// A wait step: it waits instead of being queued.
    pub is_wait: bool,
    /// The queue it goes to.
    pub queue: String,
}

/// `goal` as expressions see it.
pub fn goal_value(id: i64, text: &str, input: Value, params: Value) -> Value {
    json!({"id": id, "goal": text, "input": input, "params": params})
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ended(outcome: Outcome, result: Value) -> EndedStep {
        EndedStep {
            step: "a".into(),
            outcome,
            result,
            error: None,
            input: Value::Null,
            definition_error: false,
        }
    }

    pub(crate) fn sole_successor(join: Join, input_expr: Option<&str>) -> ReadyTask {
        ReadyTask {
            goal_id: 1,
            id: 7,
            step: "b".into(),
            join,
            input_expr: input_expr.map(str::to_owned),
            inbound: Inbound {
                total: 1,
                pending: 1,
                taken: 0,
            },
            not_taken_from: Vec::new(),
            parent_results: ParentResults::default(),
            is_map: false,
            cancel_others: false,
            looping: false,
            is_wait: false,
            queue: "default".into(),
        }
    }

    #[test]
    fn a_successor_decided_by_its_one_edge_taken_runs_with_its_parents_result() {
        let parent = ParentResult::of(&ended(Outcome::Succeeded, json!({"amount": "12.50"})));
        let task =
            decided_by_sole_edge(sole_successor(Join::All, None), &Resolution::Taken, &parent);
        let expected = Inbound {
            total: 1,
            pending: 0,
            taken: 1,
        };
        assert_eq!(task.inbound, expected);
        assert_eq!(
            task.parent_results.to_value(),
            json!({"a": {"amount": "12.50"}})
        );
        assert_eq!(task.parent_results.depth(), 2);
        assert_eq!(
            decide_join(task.join, task.inbound, &task.not_taken_from),
            JoinDecision::Run
        );
        // An input of its own: the parents' results are not its input.
        let own = decided_by_sole_edge(
            sole_successor(Join::Any, Some("{}")),
            &Resolution::Taken,
            &parent,
        );
        assert!(own.parent_results.results.is_empty());
    }

    #[test]
    fn a_default_input_nests_a_level_above_its_deepest_parent_result() {
        let results = ParentResults {
            results: vec![
                ParentResult::new("a".into(), json!([[1]])),
                ParentResult::new("b".into(), json!(3)),
            ],
            oversized: None,
        };
        assert_eq!(results.depth(), 3);
        assert_eq!(results.to_value(), json!({"a": [[1]], "b": 3}));
        assert_eq!(ParentResults::default().depth(), 1);
        assert_eq!(results.check("the input of step j"), Ok(()));
        let oversized = ParentResults {
            results: Vec::new(),
            oversized: Some(294_000_000),
        };
        assert_eq!(
            oversized.check("the input of step j"),
            Err(
                "the input of step j would hold 294000000 bytes of its parents' results; one \
                 stored JSON value holds at most 268435455: give the step an input expression"
                    .to_owned()
            )
        );
    }

    #[test]
    fn a_successor_whose_one_edge_is_not_taken_is_skipped_and_says_why() {
        let parent = ParentResult::of(&ended(Outcome::Failed, Value::Null));
        let all = decided_by_sole_edge(
            sole_successor(Join::All, None),
            &Resolution::NotTaken,
            &parent,
        );
        assert_eq!(all.inbound.pending, 0);
        assert_eq!(all.inbound.taken, 0);
        assert_eq!(
            decide_join(all.join, all.inbound, &all.not_taken_from),
            JoinDecision::Skip("join all: edge from a not taken".into())
        );
        let any = decided_by_sole_edge(
            sole_successor(Join::Any, None),
            &Resolution::NotTaken,
            &parent,
        );
        assert_eq!(
            decide_join(any.join, any.inbound, &any.not_taken_from),
            JoinDecision::Skip("no inbound edge was taken".into())
        );
        let first = decided_by_sole_edge(
            sole_successor(Join::First, None),
            &Resolution::NotTaken,
            &parent,
        );
        assert!(matches!(
            decide_join(first.join, first.inbound, &first.not_taken_from),
            JoinDecision::Skip(_)
        ));
    }

    fn vars_with_result(result: Value) -> Variables {
        let mut vars = Variables::default();
        vars.values.insert("result".into(), result);
        vars
    }

    #[test]
    fn an_edge_is_taken_when_the_outcome_matches_on_and_when_holds() {
        let ok = ended(Outcome::Succeeded, json!({"severity": "high"}));
        let when = Some("result.severity == 'high'");
        assert_eq!(
            resolve_edge(
                EdgeOn::Success,
                when,
                &ok,
                &vars_with_result(ok.result.clone())
            ),
            Resolution::Taken
        );
        let low = ended(Outcome::Succeeded, json!({"severity": "low"}));
        assert_eq!(
            resolve_edge(
                EdgeOn::Success,
                when,
                &low,
                &vars_with_result(low.result.clone())
            ),
            Resolution::NotTaken
        );
        assert_eq!(
            resolve_edge(EdgeOn::Failure, None, &ok, &Variables::default()),
            Resolution::NotTaken
        );
        assert_eq!(
            resolve_edge(EdgeOn::Always, None, &ok, &Variables::default()),
            Resolution::Taken
        );
        let failed = ended(Outcome::Failed, Value::Null);
        assert_eq!(
            resolve_edge(EdgeOn::Failure, None, &failed, &Variables::default()),
            Resolution::Taken
        );
        assert_eq!(
            resolve_edge(EdgeOn::Success, None, &failed, &Variables::default()),
            Resolution::NotTaken
        );
        assert_eq!(
            resolve_edge(EdgeOn::Always, None, &failed, &Variables::default()),
            Resolution::Taken
        );
    }

    #[test]
    fn a_step_failed_by_a_definition_error_takes_only_always_edges() {
        let broken = EndedStep {
            definition_error: true,
            ..ended(Outcome::Failed, Value::Null)
        };
        assert_eq!(
            resolve_edge(EdgeOn::Failure, None, &broken, &Variables::default()),
            Resolution::NotTaken
        );
        assert_eq!(
            resolve_edge(EdgeOn::Always, None, &broken, &Variables::default()),
            Resolution::Taken
        );
    }

    #[test]
    fn a_skipped_or_cancelled_step_takes_no_edge() {
        for outcome in [Outcome::Skipped, Outcome::Cancelled] {
            assert_eq!(
                resolve_edge(
                    EdgeOn::Always,
                    None,
                    &ended(outcome, Value::Null),
                    &Variables::default()
                ),
                Resolution::NotTaken
            );
        }
    }

    #[test]
    fn a_condition_reading_steps_too_large_to_be_one_value_is_an_error() {
        let ok = ended(Outcome::Succeeded, json!({"n": 2}));
        let mut vars = vars_with_result(json!({"n": 2}));
        vars.steps_oversized = Some(300_000_000);
        assert_eq!(
            resolve_edge(EdgeOn::Success, Some("size(steps) > 0"), &ok, &vars),
            Resolution::Error(
                "`steps` would hold 300000000 bytes of the goal's step results; one stored JSON \
                 value holds at most 268435455"
                    .into()
            )
        );
        // A condition that does not read them is decided as ever.
        assert_eq!(
            resolve_edge(EdgeOn::Success, Some("result.n > 1"), &ok, &vars),
            Resolution::Taken
        );
    }

    #[test]
    fn a_condition_that_cannot_be_evaluated_is_an_error() {
        let ok = ended(Outcome::Succeeded, json!({}));
        let resolution = resolve_edge(
            EdgeOn::Success,
            Some("result.missing > 1"),
            &ok,
            &vars_with_result(json!({})),
        );
        assert!(
            matches!(resolution, Resolution::Error(ref message) if message.contains("missing")),
            "{resolution:?}"
        );
        let not_bool = resolve_edge(EdgeOn::Success, Some("1 + 1"), &ok, &Variables::default());
        assert!(
            matches!(not_bool, Resolution::Error(ref message) if message.contains("boolean")),
            "{not_bool:?}"
        );
    }

    fn edges(states: &[(&str, &str)]) -> Vec<(String, String)> {
        states
            .iter()
            .map(|(from, state)| (from.to_string(), state.to_string()))
            .collect()
    }

    /// [`decide_join`] on the counts of `edges` (`(from, state)`), as the
    /// store keeps them.
    fn decide(join: Join, edges: &[(String, String)]) -> JoinDecision {
        let count = |state: &str| edges.iter().filter(|(_, s)| s == state).count() as u32;
        let inbound = Inbound {
            total: edges.len() as u32,
            pending: count("pending"),
            taken: count("taken"),
        };
        let not_taken_from: Vec<String> = edges
            .iter()
            .filter(|(_, state)| state != "taken")
            .map(|(from, _)| from.clone())
            .collect();
        decide_join(join, inbound, &not_taken_from)
    }

    #[test]
    fn joins_wait_for_every_inbound_edge_then_run_or_skip() {
        assert_eq!(
            decide(Join::Any, &edges(&[("a", "taken"), ("b", "pending")])),
            JoinDecision::Wait
        );
        assert_eq!(
            decide(Join::Any, &edges(&[("a", "taken"), ("b", "not_taken")])),
            JoinDecision::Run
        );
        assert_eq!(
            decide(Join::Any, &edges(&[("a", "not_taken"), ("b", "error")])),
            JoinDecision::Skip("no inbound edge was taken".into())
        );
        assert_eq!(
            decide(Join::All, &edges(&[("a", "taken"), ("b", "taken")])),
            JoinDecision::Run
        );
        assert_eq!(
            decide(Join::All, &edges(&[("a", "taken"), ("b", "not_taken")])),
            JoinDecision::Skip("join all: edge from b not taken".into())
        );
    }

    #[test]
    fn first_and_n_run_as_soon_as_enough_edges_are_taken() {
        assert_eq!(
            decide(Join::First, &edges(&[("a", "pending"), ("b", "taken")])),
            JoinDecision::Run
        );
        assert_eq!(
            decide(Join::First, &edges(&[("a", "pending"), ("b", "not_taken")])),
            JoinDecision::Wait
        );
        let three = |states: [&'static str; 3]| {
            edges(&[("a", states[0]), ("b", states[1]), ("c", states[2])])
        };
        assert_eq!(
            decide(Join::Count(2), &three(["taken", "pending", "taken"])),
            JoinDecision::Run
        );
        assert_eq!(
            decide(Join::Count(2), &three(["taken", "pending", "pending"])),
            JoinDecision::Wait
        );
    }

    #[test]
    fn first_and_n_are_skipped_as_soon_as_they_can_no_longer_be_reached() {
        assert_eq!(
            decide(Join::First, &edges(&[("a", "not_taken"), ("b", "error")])),
            JoinDecision::Skip("join first: 0 of 2 inbound edges taken, 1 needed".into())
        );
        assert_eq!(
            decide(
                Join::Count(2),
                &edges(&[("a", "not_taken"), ("b", "pending"), ("c", "not_taken")])
            ),
            JoinDecision::Skip("join 2: 0 of 3 inbound edges taken, 2 needed".into())
        );
    }
}

//! The conditional graph engine (SPEC §4 semantics).
//!
//! Runs inside the transaction that records a step's outcome: resolves the
//! step's outbound edges, queues or skips the successors whose inbound edges
//! have all resolved (skips cascade), and finishes the goal when every step
//! has ended. The decisions are plain functions ([`decide`]); [`steps_ended`]
//! applies them through the store.
//!
//! Concurrency: the engine runs of one goal go side by side. Each passes its
//! goals' gates and holds their rows `FOR KEY SHARE` (in id order) before it
//! writes a task row, which only `cancel_goal`, `retry_goal` and `signal`
//! wait for, and runs arriving after one of those wait for it (the runs of
//! a goal with a step that cancels running tasks take turns instead:
//! [`store::lock_running_goals`]). They run in
//! READ COMMITTED transactions ([`store::begin`]): a statement that waited
//! for a row lock, and every statement after it, sees what the holder
//! committed. Where runs meet they take turns on a row:
//! - a join keeps counts of its inbound edges on its row, updated by the
//!   statement that resolves them; of two parents finishing at once, the one
//!   whose update comes second reads the join after the first committed,
//!   and it alone sees no edge pending and decides the join;
//! - a map step counts its instances that ended the same way (its goal's
//!   runs take turns anyway);
//! - the run that may have ended a goal (it queued nothing and left no step
//!   waiting) locks the goal for itself before it looks at its tasks: the
//!   last of the runs ending a goal's last steps sees every other's ends,
//!   and finishes the goal.
//!
//! Runs that meet on rows in opposite orders (skips cascading into two joins
//! from both ends at once) deadlock; Postgres ends one, and its transaction
//! runs again ([`store::with_retries`]).
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use deadpool_postgres::GenericClient;
use serde_json::{Map, Value};

use crate::blueprint::{cel, limits};
use crate::store::{
    self, EdgeResolution, GoalEnding, GoalFinish, OutboundEdge, Queued, StepEnd, StoreError,
    TaskInput,
};
use crate::stored::{Steps, MAX_STORED_JSON_BYTES};
use decide::{
    decide_join, decided_by_sole_edge, resolve_edge, EndedStep, GoalVariables, JoinDecision,
    Outcome, ParentResult, ReadyTask, Resolution, Variables,
};

pub mod child;
pub mod decide;
pub mod looping;
pub mod map;

/// Whether an expression reads `steps` (so the step map must be loaded).
fn reads_steps(source: &str) -> bool {
    cel::reads(source, "steps")
}

/// Whether an expression reads `goal` (so the goal must be copied in: its
/// input may be large).
fn reads_goal(source: &str) -> bool {
    cel::reads(source, "goal")
}

/// What expressions of `goal_id` see: `goal` (null unless `with_goal`) and
/// `steps` (empty unless `with_steps`; missing if they cannot be one value).
async fn variables_for(
    tx: &impl GenericClient,
    goal_id: i64,
    goal: &GoalVariables,
    with_goal: bool,
    with_steps: bool,
) -> Result<Variables, StoreError> {
    let mut vars = Variables::default();
    let goal = match goal.goal.as_ref() {
        _ if !with_goal => Value::Null,
        Value::Null => store::goal_variables(tx, &[goal_id])
            .await?
            .remove(&goal_id)
            .map_or(Value::Null, |variables| {
                Arc::unwrap_or_clone(variables.goal)
            }),
        goal => goal.clone(),
    };
    vars.values.insert("goal".into(), goal);
    let steps = match with_steps {
        true => store::steps_of(tx, goal_id).await?,
        false => Steps::Map(Value::Object(Map::new())),
    };
    match steps {
        Steps::Map(steps) => {
            vars.values.insert("steps".into(), steps);
        }
        Steps::Oversized(bytes) => vars.steps_oversized = Some(bytes),
    }
    Ok(vars)
}

/// Decides `edges`, the pending outbound edges of `from`, into
/// `resolutions`; returns the successors and the edges whose condition
/// failed (target, error).
async fn decide_outbound(
    tx: &impl GenericClient,
    goal_id: i64,
    goal: &GoalVariables,
    from: &EndedStep,
    edges: Vec<OutboundEdge>,
    resolutions: &mut Vec<EdgeResolution>,
) -> Result<Resolved, StoreError> {
    if edges.is_empty() {
        return Ok(Resolved::default());
    }
    // Built once for every condition of this step, and only if an edge has
    // one: the goal they copy may be large.
    let condition_vars = if edges.iter().any(|edge| edge.when.is_some()) {
        // One `steps` snapshot serves every condition of this step.
        let reads = |what: fn(&str) -> bool| {
            edges
                .iter()
                .any(|edge| edge.when.as_deref().is_some_and(what))
        };
        let mut vars =
            variables_for(tx, goal_id, goal, reads(reads_goal), reads(reads_steps)).await?;
        vars.values.insert("result".into(), from.result.clone());
        vars.values.insert(
            "error".into(),
            from.error.clone().map_or(Value::Null, Value::String),
        );
        vars.values.insert(
            "status".into(),
            Value::String(from.outcome.status().to_owned()),
        );
        vars.values.insert("input".into(), from.input.clone());
        vars
    } else {
        Variables::default()
    };
    // Shared by the successors it decides: one copy of its result, not one each.
    let parent = edges
        .iter()
        .any(|edge| edge.sole.is_some())
        .then(|| ParentResult::of(from));
    let mut resolved = Resolved::default();
    for edge in edges {
        let resolution = resolve_edge(edge.on, edge.when.as_deref(), from, &condition_vars);
        let error = match &resolution {
            Resolution::Error(message) => {
                let error = format!(
                    "edge {} -> {}: condition failed (when \"{}\"): {message}",
                    from.step,
                    edge.to,
                    edge.when.as_deref().unwrap_or_default()
                );
                resolved.broken.push((edge.to.clone(), error.clone()));
                Some(error)
            }
            _ => None,
        };
        resolutions.push(EdgeResolution {
            goal_id,
            from: from.step.clone(),
            to: edge.to.clone(),
            state: resolution.state(),
            error,
            may_count: edge.sole.is_none(),
        });
        // A successor whose condition failed fails first (see `propagate`).
        if let (Some(task), Some(parent), false) = (
            edge.sole,
            &parent,
            matches!(resolution, Resolution::Error(_)),
        ) {
            resolved
                .decided
                .push(decided_by_sole_edge(task, &resolution, parent));
        }
        resolved.successors.push(edge.to);
    }
    Ok(resolved)
}

/// Applies the consequences of steps that ended together (and of every
/// step that ends because of them) and finishes the goals with nothing left
/// to run. Locks the goals first (goal rows before task rows, in id order),
/// then goes on as [`steps_ended_in_locked_goals`].
pub async fn steps_ended(
    tx: &impl GenericClient,
    ends: Vec<StepEnd>,
) -> Result<Vec<Queued>, StoreError> {
    let mut goal_ids: Vec<i64> = ends.iter().map(|end| end.goal_id).collect();
    goal_ids.sort_unstable();
    goal_ids.dedup();
    let running = store::lock_running_goals(tx, &goal_ids).await?;
    Ok(
        steps_ended_in_locked_goals(tx, ends, running, Vec::new(), false)
            .await?
            .queued,
    )
}

/// [`steps_ended`] for a caller that already holds the goal locks:
/// `running` is what [`store::lock_running_goals`] answered for the goals of
/// `ends` (those not in it are no longer running, and nothing is decided
/// for them); `goals_ended`: endings the caller already read, of goals whose
/// one step ended ([`store::Recording::goals_ended`]). The statements serve
/// the whole batch: a batch of single-step goals costs the same handful of
/// statements as one goal. With
/// `caller_queues_last`, the tasks queued after which nothing more is written
/// for their goal are left to the caller, who queues them with the
/// transaction's last round trip ([`Carried::to_queue`]), and so are the
/// goals' finishes ([`Carried::to_finish`]).
pub async fn steps_ended_in_locked_goals(
    tx: &impl GenericClient,
    ends: Vec<StepEnd>,
    running: Vec<i64>,
    goals_ended: Vec<GoalEnding>,
    caller_queues_last: bool,
) -> Result<Carried, StoreError> {
    let mut goals: BTreeMap<i64, (GoalVariables, Vec<Resolved>)> = BTreeMap::new();
    let mut resolutions = Vec::new();
    // Instances end their map step only when the last of them (or one too
    // many failing) ends: decided first, the steps that ended join the rest.
    let (instance_ends, mut ends): (Vec<StepEnd>, Vec<StepEnd>) =
        ends.into_iter().partition(|end| end.map_index.is_some());
    let mut carried = Carried::default();
    if !instance_ends.is_empty() {
        let mut maps: Vec<(i64, String)> = instance_ends
            .iter()
            .filter(|end| running.contains(&end.goal_id))
            .map(|end| (end.goal_id, end.ended.step.clone()))
            .collect();
        maps.sort_unstable();
        maps.dedup();
        let (ended_maps, instances) = map::instances_ended(tx, &maps).await?;
        carried.queued.extend(instances);
        for (goal_id, ended) in ended_maps {
            let goal = match instance_ends.iter().find(|end| end.goal_id == goal_id) {
                Some(end) => end.goal.clone(),
                None => continue,
            };
            let outbound = store::outbound_edges(tx, goal_id, &ended.step).await?;
            ends.push(StepEnd {
                goal_id,
                goal,
                ended,
                outbound,
                map_index: None,
            });
        }
        for end in instance_ends {
            goals
                .entry(end.goal_id)
                .or_insert_with(|| (end.goal, Vec::new()));
        }
    }
    for end in ends {
        let resolved = if end.outbound.is_empty() {
            None
        } else {
            let (goal_id, edges) = (end.goal_id, end.outbound);
            Some(
                decide_outbound(tx, goal_id, &end.goal, &end.ended, edges, &mut resolutions)
                    .await?,
            )
        };
        let (_, seeds) = goals
            .entry(end.goal_id)
            .or_insert_with(|| (end.goal, Vec::new()));
        seeds.extend(resolved);
    }
    // Only the goals of `ends` that are running: a cancelled goal has
    // nothing left to decide.
    let running: Vec<i64> = running
        .into_iter()
        .filter(|goal_id| goals.contains_key(goal_id))
        .collect();
    let firsts: Vec<(i64, Resolved)> = running
        .iter()
        .map(|goal_id| {
            let (_, seeds) = goals
                .get_mut(goal_id)
                .expect("filtered to the goals of ends");
            (*goal_id, merge_seeds(std::mem::take(seeds)))
        })
        .collect();
    // Every goal's first look at its successors goes out with the resolutions.
    let reads: Vec<(i64, String)> = firsts
        .iter()
        .flat_map(|(goal_id, resolved)| ready_reads(*goal_id, resolved))
        .collect();
    let mut unwritten = Unwritten(resolutions);
    // With nothing to read, the resolutions may wait for the caller's last
    // round trip (a chain step: one round trip less).
    let mut ready = if reads.is_empty() && caller_queues_last {
        Vec::new()
    } else {
        store::resolve_edges_then_read(tx, &std::mem::take(&mut unwritten.0), &reads).await?
    };
    let mut carrying_on = Vec::new();
    for (goal_id, first) in firsts {
        let first_ready = first.broken.is_empty().then(|| {
            let (of_goal, others) = std::mem::take(&mut ready)
                .into_iter()
                .partition(|task| task.goal_id == goal_id);
            ready = others;
            of_goal
        });
        let goal = &goals[&goal_id].0;
        let round = Round {
            goal_id,
            goal,
            caller_queues_last,
        };
        let propagated = propagate(tx, round, first, first_ready, &mut unwritten).await?;
        if !propagated.carried.is_empty() || propagated.left_waiting {
            carrying_on.push(goal_id);
        }
        carried.extend(propagated.carried);
    }
    let may_have_ended = may_have_ended(&running, &carrying_on);
    let (mut endings, to_look_at) = already_ended(goals_ended, may_have_ended);
    if !to_look_at.is_empty() {
        unwritten.write(tx).await?;
        endings.extend(store::goal_endings(tx, &to_look_at).await?);
    }
    let finishes = goal_finishes(tx, endings, |goal_id| &goals[&goal_id].0).await?;
    if caller_queues_last {
        carried.to_resolve = unwritten.0;
        carried.to_finish = finishes;
    } else {
        unwritten.write(tx).await?;
        store::finish_goals(tx, &finishes).await?;
    }
    Ok(carried)
}

/// The input `task` is queued with: its `input` expression's value, else
/// the goal's input for a root, else its parents' results (made where it is
/// written); an error says why it cannot run.
fn task_input(task: &ReadyTask, input_vars: &Variables) -> Result<TaskInput, String> {
    match &task.input_expr {
        None if task.inbound.total == 0 => {
            let goal_input = input_vars
                .values
                .get("goal")
                .and_then(|goal| goal.get("input"))
                .cloned()
                .unwrap_or(Value::Null);
            checked_input(&task.step, goal_input).map(TaskInput::Given)
        }
        None => task
            .parent_results
            .check(&format!("the input of step {}", task.step))
            .map(|()| TaskInput::ParentResults),
        Some(source) => evaluate_input(source, task.looping, input_vars)
            .map_err(|message| {
                format!(
                    "cannot evaluate the input \"{source}\" of step {}: {message}",
                    task.step
                )
            })
            .and_then(|input| checked_input(&task.step, input))
            .map(TaskInput::Given),
    }
}

/// A step's `input` expression evaluated (a loop's first run sees no
/// `previous` result yet).
fn evaluate_input(source: &str, looping: bool, input_vars: &Variables) -> Result<Value, String> {
    let expression = input_vars.expression(source)?;
    if looping {
        let mut first_run = input_vars.values.clone();
        first_run.insert("previous".into(), Value::Null);
        first_run.insert("iteration".into(), Value::from(1));
        return expression.evaluate(&first_run);
    }
    expression.evaluate(&input_vars.values)
}

/// `input`, if it nests no deeper than a stored document may. (Not its size:
/// a wide join's input holds many results.)
fn checked_input(step: &str, input: Value) -> Result<Value, String> {
    limits::check_depth(&format!("the input of step {step}"), &input).map(|()| input)
}

/// Whose successors [`propagate`] decides, and how it leaves them.
#[derive(Clone, Copy)]
struct Round<'g> {
    goal_id: i64,
    goal: &'g GoalVariables,
    caller_queues_last: bool,
}

/// The tasks carrying on: queued, or left for the caller to queue.
#[derive(Default)]
pub struct Carried {
    /// The tasks the engine queued.
    pub queued: Vec<Queued>,
    /// The tasks (id, input) the caller queues as the transaction's last
    /// write: nothing more is written for their goals, so a claim of them
    /// then (local continuation) sees each goal as the transaction leaves it.
    pub to_queue: Vec<(i64, TaskInput)>,
    /// The queues of `to_queue` (id, queue).
    pub to_queue_on: Vec<(i64, String)>,
    /// Edge resolutions the caller writes with its last round trip, before
    /// `to_queue`: nothing the engine did after them read an edge.
    pub to_resolve: Vec<EdgeResolution>,
    /// The goals that finished, which the caller writes with its last round
    /// trip: nothing after them is written for those goals.
    pub to_finish: Vec<GoalFinish>,
}

impl Carried {
    fn extend(&mut self, other: Carried) {
        self.queued.extend(other.queued);
        self.to_queue.extend(other.to_queue);
        self.to_queue_on.extend(other.to_queue_on);
        self.to_resolve.extend(other.to_resolve);
        self.to_finish.extend(other.to_finish);
    }

    fn is_empty(&self) -> bool {
        self.queued.is_empty() && self.to_queue.is_empty()
    }
}

/// Carries on goals that run again (`retry_goal`): first the steps that
/// ended with edges left unresolved (the goal was cancelled before their
/// carry-on), then the pending steps with no inbound edge left to resolve,
/// as if those edges had just resolved; and goes on from there. A goal
/// asked twice has nothing left to decide the second time: its goals are
/// locked for one such run at a time.
pub async fn resume(tx: &impl GenericClient, goal_ids: &[i64]) -> Result<Vec<Queued>, StoreError> {
    let running = store::lock_running_goals_alone(tx, goal_ids).await?;
    let mut unresolved = Vec::new();
    for goal_id in &running {
        unresolved.extend(store::ended_with_pending_edges(tx, *goal_id).await?);
    }
    let mut queued = Vec::new();
    if !unresolved.is_empty() {
        let ends = store::ended_without_a_worker(tx, &unresolved).await?;
        queued.extend(
            steps_ended_in_locked_goals(tx, ends, running.clone(), Vec::new(), false)
                .await?
                .queued,
        );
    }
    let running = store::lock_running_goals_alone(tx, &running).await?;
    let goal = GoalVariables {
        goal: Arc::default(),
    };
    for goal_id in &running {
        let steps = store::undecided_steps(tx, *goal_id).await?;
        if !steps.is_empty() {
            let first = Resolved {
                successors: steps,
                ..Resolved::default()
            };
            let round = Round {
                goal_id: *goal_id,
                goal: &goal,
                caller_queues_last: false,
            };
            let mut unwritten = Unwritten::default();
            queued.extend(
                propagate(tx, round, first, None, &mut unwritten)
                    .await?
                    .carried
                    .queued,
            );
        }
    }
    let endings = store::goal_endings(tx, &running).await?;
    let finishes = goal_finishes(tx, endings, |_| &goal).await?;
    store::finish_goals(tx, &finishes).await?;
    Ok(queued)
}

/// The goals of `running` that may have nothing left to run: not those a
/// task was just queued for, which is still to run, nor those with a step
/// left waiting for more of its inbound edges (`carrying_on`). A chain step,
/// and each batch of a fan-in's parents but the last, then skip the look at
/// their goal's tasks.
fn may_have_ended(running: &[i64], carrying_on: &[i64]) -> Vec<i64> {
    running
        .iter()
        .copied()
        .filter(|goal_id| !carrying_on.contains(goal_id))
        .collect()
}

/// Of the goals that may have ended, those whose endings were read with
/// their outcomes (kept), and the others, still to be looked at.
fn already_ended(
    goals_ended: Vec<GoalEnding>,
    may_have_ended: Vec<i64>,
) -> (Vec<GoalEnding>, Vec<i64>) {
    let may_end: HashSet<i64> = may_have_ended.iter().copied().collect();
    let ended: Vec<GoalEnding> = goals_ended
        .into_iter()
        .filter(|ending| may_end.contains(&ending.goal_id))
        .collect();
    let read: HashSet<i64> = ended.iter().map(|ending| ending.goal_id).collect();
    let to_look_at = may_have_ended
        .into_iter()
        .filter(|goal_id| !read.contains(goal_id))
        .collect();
    (ended, to_look_at)
}

/// How the goals of `endings` finish, to be written ([`store::finish_goals`])
/// before the transaction commits.
async fn goal_finishes<'g>(
    tx: &impl GenericClient,
    endings: Vec<GoalEnding>,
    goal_of: impl Fn(i64) -> &'g GoalVariables,
) -> Result<Vec<GoalFinish>, StoreError> {
    let mut finishes = Vec::with_capacity(endings.len());
    for ending in endings {
        let goal = goal_of(ending.goal_id);
        finishes.push(goal_finish(tx, goal, ending).await?);
    }
    Ok(finishes)
}

/// What resolving the outbound edges of steps that ended leads to.
#[derive(Default)]
struct Resolved {
    /// The steps the edges lead to.
    successors: Vec<String>,
    /// The edges whose condition failed (target, error).
    broken: Vec<(String, String)>,
    /// Those successors an edge of theirs alone decides, as reading them
    /// back would find them ([`decided_by_sole_edge`]).
    decided: Vec<ReadyTask>,
}

impl Resolved {
    /// The successors still to be read, to know whether they are ready.
    fn to_read(&self) -> impl Iterator<Item = &String> {
        let decided: HashSet<&str> = self.decided.iter().map(|task| task.step.as_str()).collect();
        self.successors
            .iter()
            .filter(move |step| !decided.contains(step.as_str()))
    }
}

/// The steps that ended together are looked at together: each successor
/// once, whatever number of them lead to it.
fn merge_seeds(seeds: Vec<Resolved>) -> Resolved {
    let mut seen = HashSet::new();
    let mut merged = Resolved::default();
    for seed in seeds {
        merged.successors.extend(
            seed.successors
                .into_iter()
                .filter(|step| seen.insert(step.clone())),
        );
        merged.broken.extend(seed.broken);
        merged.decided.extend(seed.decided);
    }
    merged
}

/// The successors to read with the resolutions that decided them: none when
/// an edge's condition failed, for its target fails first (and then is not
/// ready).
fn ready_reads(goal_id: i64, resolved: &Resolved) -> Vec<(i64, String)> {
    if !resolved.broken.is_empty() {
        return Vec::new();
    }
    of_goal(goal_id, resolved.to_read())
}

fn of_goal<'s>(goal_id: i64, steps: impl IntoIterator<Item = &'s String>) -> Vec<(i64, String)> {
    steps
        .into_iter()
        .map(|step| (goal_id, step.clone()))
        .collect()
}

/// Edge resolutions not written yet: written before the engine's next write
/// or read of anything but goals and the `steps` of expressions, or left to
/// the caller, who writes them with the transaction's last round trip
/// ([`Carried::to_resolve`]). Only resolutions whose successors were all
/// decided without a read wait so.
#[derive(Default)]
struct Unwritten(Vec<EdgeResolution>);

impl Unwritten {
    async fn write(&mut self, tx: &impl GenericClient) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        store::resolve_edges(tx, &std::mem::take(&mut self.0)).await
    }
}

/// What [`propagate`] left of a goal.
struct Propagated {
    /// The tasks it queued, or left to the caller to queue.
    carried: Carried,
    /// A successor it read still waits for more of its inbound edges: the
    /// goal has a step left, so it cannot have ended.
    left_waiting: bool,
}

/// Queues or skips the successors of `first` whose inbound edges have all
/// resolved, following skips and failures until nothing more is decided;
/// returns the tasks it queued, or left to the caller to queue (see
/// [`steps_ended_in_locked_goals`]), and whether a successor still waits.
/// `first_ready`: those successors that are pending, when already read.
async fn propagate(
    tx: &impl GenericClient,
    round: Round<'_>,
    first: Resolved,
    first_ready: Option<Vec<ReadyTask>>,
    unwritten: &mut Unwritten,
) -> Result<Propagated, StoreError> {
    let Round {
        goal_id,
        goal,
        caller_queues_last,
    } = round;
    let mut carried = Carried::default();
    // The steps last seen waiting, and not decided since: a later round may
    // decide one (its last edge resolved by a skip), and a cancel may end one.
    let mut waiting: HashSet<String> = HashSet::new();
    let mut next = Some((first, first_ready));
    let mut worklist: Vec<EndedStep> = Vec::new();
    loop {
        let (resolved, ready) = match next.take() {
            Some(round) => round,
            None => match worklist.pop() {
                Some(from) => {
                    unwritten.write(tx).await?;
                    let edges = store::outbound_edges(tx, goal_id, &from.step).await?;
                    let mut resolutions = Vec::new();
                    let resolved =
                        decide_outbound(tx, goal_id, goal, &from, edges, &mut resolutions).await?;
                    let reads = ready_reads(goal_id, &resolved);
                    let ready = store::resolve_edges_then_read(tx, &resolutions, &reads).await?;
                    let ready = resolved.broken.is_empty().then_some(ready);
                    (resolved, ready)
                }
                None => {
                    return Ok(Propagated {
                        carried,
                        left_waiting: !waiting.is_empty(),
                    })
                }
            },
        };
        if resolved.successors.is_empty() {
            continue;
        }
        if !resolved.broken.is_empty() {
            unwritten.write(tx).await?;
        }
        for (to, error) in &resolved.broken {
            waiting.remove(to);
            if let Some(failed) = store::fail_pending_task(tx, goal_id, to, error).await? {
                worklist.push(failed);
            }
        }
        let mut ready = match ready {
            Some(ready) => ready,
            None => {
                unwritten.write(tx).await?;
                store::pending_steps(tx, &of_goal(goal_id, resolved.to_read())).await?
            }
        };
        ready.extend(resolved.decided);
        ready.sort_unstable_by_key(|task| task.id);
        let reads = |what: fn(&str) -> bool| {
            ready
                .iter()
                .any(|task| task.input_expr.as_deref().is_some_and(what))
        };
        // A root's default input is the goal's.
        let needs_goal = reads(reads_goal) || ready.iter().any(|task| task.inbound.total == 0);
        let input_vars = if needs_goal || reads(|_| true) {
            variables_for(tx, goal_id, goal, needs_goal, reads(reads_steps)).await?
        } else {
            Variables::default()
        };
        let mut queued = Vec::new();
        let mut queues = Vec::new();
        let mut skipped = Vec::new();
        let mut maps = Vec::new();
        let mut waits = Vec::new();
        let mut cancelling = Vec::new();
        for task in ready {
            waiting.remove(&task.step);
            match decide_join(task.join, task.inbound, &task.not_taken_from) {
                JoinDecision::Wait => {
                    waiting.insert(task.step);
                }
                JoinDecision::Run if task.is_map => {
                    if task.cancel_others {
                        cancelling.push(task.step.clone());
                    }
                    // Its input is evaluated per instance, with `item`.
                    maps.push((task.id, task.step));
                }
                JoinDecision::Run => {
                    if task.cancel_others {
                        cancelling.push(task.step.clone());
                    }
                    let input = task_input(&task, &input_vars);
                    match input {
                        Ok(input) if task.is_wait => {
                            let input = match input {
                                TaskInput::Given(input) => input,
                                TaskInput::ParentResults => task.parent_results.to_value(),
                            };
                            waits.push((task.id, task.step, input));
                        }
                        Ok(input) => {
                            queues.push((task.id, task.queue));
                            queued.push((task.id, input));
                        }
                        Err(error) => {
                            unwritten.write(tx).await?;
                            if let Some(failed) =
                                store::fail_pending_task(tx, goal_id, &task.step, &error).await?
                            {
                                worklist.push(failed);
                            }
                        }
                    }
                }
                JoinDecision::Skip(reason) => {
                    skipped.push((task.id, reason.clone()));
                    worklist.push(EndedStep {
                        step: task.step,
                        outcome: Outcome::Skipped,
                        result: Value::Null,
                        error: Some(reason),
                        input: Value::Null,
                        definition_error: false,
                    });
                }
            }
        }
        let last_write = worklist.is_empty()
            && skipped.is_empty()
            && maps.is_empty()
            && waits.is_empty()
            && cancelling.is_empty();
        if caller_queues_last && last_write {
            carried.to_queue.extend(queued);
            carried.to_queue_on.extend(queues);
        } else {
            unwritten.write(tx).await?;
            carried
                .queued
                .extend(store::queue_tasks(tx, &queued).await?);
        }
        store::skip_tasks(tx, &skipped).await?;
        let map_ids: Vec<i64> = maps.iter().map(|(id, _)| *id).collect();
        for started in store::map::start(tx, &map_ids).await? {
            let Some((_, step)) = maps.iter().find(|(id, _)| *id == started.task_id) else {
                continue;
            };
            match started.status.as_str() {
                "succeeded" => worklist.push(map::map_ended(
                    step.clone(),
                    Outcome::Succeeded,
                    Value::Array(Vec::new()),
                    None,
                    false,
                )),
                "failed" => worklist.push(map::map_ended(
                    step.clone(),
                    Outcome::Failed,
                    Value::Null,
                    started.error,
                    true,
                )),
                _ => {}
            }
        }
        let to_start: Vec<(i64, Value)> = waits
            .iter()
            .map(|(id, _, input)| (*id, input.clone()))
            .collect();
        for started in store::wait::start(tx, &to_start).await? {
            let Some((_, step, input)) = waits.iter().find(|(id, _, _)| *id == started.task_id)
            else {
                continue;
            };
            let ended = |outcome, result, error, definition_error| EndedStep {
                step: step.clone(),
                outcome,
                result,
                error,
                input: input.clone(),
                definition_error,
            };
            match started.status.as_str() {
                "succeeded" => {
                    worklist.push(ended(Outcome::Succeeded, started.result, None, false))
                }
                "failed" => worklist.push(ended(Outcome::Failed, Value::Null, started.error, true)),
                _ => {}
            }
        }
        if !cancelling.is_empty() {
            // A cancel may end a step seen waiting: no longer known to wait.
            waiting.clear();
        }
        for step in cancelling {
            for parent in store::cancel_parents(tx, goal_id, &step).await? {
                worklist.push(EndedStep {
                    step: parent,
                    outcome: Outcome::Cancelled,
                    result: Value::Null,
                    error: None,
                    input: Value::Null,
                    definition_error: false,
                });
            }
        }
    }
}

/// How a goal whose steps have all ended finishes (rule 4).
async fn goal_finish(
    tx: &impl GenericClient,
    goal: &GoalVariables,
    ending: GoalEnding,
) -> Result<GoalFinish, StoreError> {
    let output = ending.output.as_deref();
    let goal_id = ending.goal_id;
    let failed = |error: String| GoalFinish {
        goal_id,
        status: "failed",
        result: None,
        error: Some(error),
    };
    if !ending.unhandled_failures.is_empty() {
        let error = ending
            .unhandled_failures
            .iter()
            .map(|(step, error)| format!("step {step} failed: {error}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Ok(failed(error));
    }
    let result = match output {
        Some(source) => {
            let vars =
                variables_for(tx, goal_id, goal, reads_goal(source), reads_steps(source)).await?;
            vars.expression(source)
                .and_then(|expression| expression.evaluate(&vars.values))
        }
        None => match ending.leaf_results_oversized {
            Some(bytes) => return Ok(failed(oversized_result_message(bytes))),
            None => Ok(ending.leaf_results),
        },
    };
    Ok(match result {
        Ok(result) => GoalFinish {
            goal_id,
            status: "succeeded",
            result: Some(result),
            error: None,
        },
        Err(message) => failed(format!(
            "cannot evaluate the blueprint output \"{}\": {message}",
            output.unwrap_or_default()
        )),
    })
}

/// Why a goal with no `output` cannot succeed: its leaf steps' results,
/// `bytes` together, are more than one stored value may hold.
fn oversized_result_message(bytes: i64) -> String {
    format!(
        "the goal's result would hold {bytes} bytes of its leaf steps' results; one stored JSON \
         value holds at most {MAX_STORED_JSON_BYTES}: give the blueprint an output expression"
    )
}

#[cfg(test)]
mod tests {
    use super::decide::tests::{ended, sole_successor};
    use super::*;
    use crate::blueprint::Join;
    use serde_json::json;

    #[test]
    fn a_goal_a_task_was_just_queued_for_is_not_looked_at_for_its_end() {
        assert_eq!(may_have_ended(&[1, 2, 3], &[2]), vec![1, 3]);
        assert_eq!(may_have_ended(&[1, 2], &[1, 2]), Vec::<i64>::new());
        assert_eq!(may_have_ended(&[4], &[]), vec![4]);
    }

    #[test]
    fn a_step_is_queued_with_its_own_input_else_the_goals_else_its_parents_results() {
        let mut vars = Variables::default();
        vars.values
            .insert("goal".into(), json!({"input": {"n": 2}}));
        let mut root = sole_successor(Join::Any, None);
        root.inbound.total = 0;
        assert_eq!(
            task_input(&root, &vars),
            Ok(TaskInput::Given(json!({"n": 2})))
        );
        let own = sole_successor(Join::Any, Some("goal.input.n + 1"));
        assert_eq!(task_input(&own, &vars), Ok(TaskInput::Given(json!(3))));
        let broken = sole_successor(Join::Any, Some("goal.input.missing"));
        assert!(task_input(&broken, &vars)
            .unwrap_err()
            .starts_with("cannot evaluate the input \"goal.input.missing\" of step b: "));
        let parent = ParentResult::of(&ended(Outcome::Succeeded, json!([1])));
        let default =
            decided_by_sole_edge(sole_successor(Join::Any, None), &Resolution::Taken, &parent);
        assert_eq!(task_input(&default, &vars), Ok(TaskInput::ParentResults));
        // A result as deep as a document may be nests one level too deep.
        let deepest = nested(limits::MAX_JSON_DEPTH);
        let parent = ParentResult::of(&ended(Outcome::Succeeded, deepest));
        let too_deep =
            decided_by_sole_edge(sole_successor(Join::Any, None), &Resolution::Taken, &parent);
        assert_eq!(
            task_input(&too_deep, &vars),
            Err("the input of step b is nested 65 levels deep; the limit is 64".to_owned())
        );
        // `steps` too large to be one value: only an expression reading them fails.
        vars.steps_oversized = Some(300_000_000);
        assert_eq!(task_input(&own, &vars), Ok(TaskInput::Given(json!(3))));
        let reading_steps = sole_successor(Join::Any, Some("size(steps)"));
        assert_eq!(
            task_input(&reading_steps, &vars),
            Err(
                "cannot evaluate the input \"size(steps)\" of step b: `steps` would hold \
                 300000000 bytes of the goal's step results; one stored JSON value holds at most \
                 268435455"
                    .to_owned()
            )
        );
    }

    /// `levels` arrays nested around a number.
    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| json!([inner]))
    }

    #[test]
    fn only_the_successors_no_edge_decided_alone_are_read() {
        let parent = ParentResult::of(&ended(Outcome::Succeeded, json!(1)));
        let resolved = Resolved {
            successors: vec!["b".into(), "join".into()],
            broken: Vec::new(),
            decided: vec![decided_by_sole_edge(
                sole_successor(Join::Any, None),
                &Resolution::Taken,
                &parent,
            )],
        };
        assert_eq!(ready_reads(1, &resolved), vec![(1, "join".to_owned())]);
        let broken = Resolved {
            broken: vec![("c".into(), "edge a -> c: condition failed".into())],
            ..resolved
        };
        assert_eq!(ready_reads(1, &broken), Vec::new());
    }

    #[test]
    fn goals_whose_endings_were_read_with_their_outcomes_are_not_looked_at_again() {
        let ending = |goal_id| GoalEnding {
            goal_id,
            output: None,
            unhandled_failures: Vec::new(),
            leaf_results: json!({}),
            leaf_results_oversized: None,
        };
        // 4 was read but carries on (or is no longer running): not ended here.
        let (ended, to_look_at) = already_ended(vec![ending(1), ending(4)], vec![1, 2, 3]);
        let ended: Vec<i64> = ended.iter().map(|ending| ending.goal_id).collect();
        assert_eq!(ended, vec![1]);
        assert_eq!(to_look_at, vec![2, 3]);
    }

    #[test]
    fn only_expressions_that_mention_steps_load_them() {
        assert!(reads_steps("steps.fetch.result.rows"));
        assert!(!reads_steps("result.severity == 'high'"));
    }
}

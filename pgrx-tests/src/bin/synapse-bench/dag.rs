//! DAGs: a chain (each step as a ratio to a single task's latency, measured
//! with the same worker), a 1 → W → 1 fan-out/fan-in on two workers with its
//! join-start delay, the same width as one map step, what a child goal adds
//! to the same work as a plain step, and a transaction of diamonds.
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use synapse_e2e::{postgres, GoalWaiter, Stack, WorkerProcess};

use crate::cost::{cost_figures, measured, Cost, CostWindow};
use crate::figure::{median, median_of, ms, Baseline, Figure};
use crate::goals::{forget_goals, run_plan, submit_goals, wait_for_goals};
use crate::latency::serial_commit_to_start;
use crate::options::Sizes;
use crate::sessions::meter;
use crate::targets::Metric;
use crate::wal;
use crate::workers;

/// A chain of `length` no-op steps; returns ms per step.
fn chain(stack: &Stack, client: &mut postgres::Client, length: usize) -> f64 {
    let steps: Vec<Value> = (0..length)
        .map(|i| json!({"id": format!("s{i}"), "action": "noop", "input": "{}"}))
        .collect();
    let edges: Vec<Value> = (1..length)
        .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
        .collect();
    let blueprint = json!({"steps": steps, "edges": edges, "output": "{}"});
    let (_, elapsed, _) = run_plan(&mut GoalWaiter::new(stack), client, &blueprint);
    ms(elapsed) / length as f64
}

/// What a fan-out/fan-in run measured.
struct FanOutRun {
    wall_ms: f64,
    submit_ms: f64,
    tasks_per_s: f64,
    /// The join's `started_at` − the latest `finished_at` of its parents, ms.
    join_delay_ms: f64,
}

/// 1 → width → 1 fan-out/fan-in in one goal, from submit sent to the goal's end.
fn fan_out(stack: &Stack, client: &mut postgres::Client, width: usize) -> FanOutRun {
    let mut blueprint = synapse_e2e::fan_out_of(
        width,
        json!({"id": "j", "action": "noop", "join": "all", "input": "{}"}),
    );
    blueprint["output"] = json!("{}");
    let (id, elapsed, submitted) = run_plan(&mut GoalWaiter::new(stack), client, &blueprint);
    let join_delay_ms: f64 = client
        .query_one(
            "SELECT (extract(epoch FROM j.started_at - p.last) * 1000)::float8
               FROM synapse.tasks j,
                    (SELECT max(finished_at) AS last FROM synapse.tasks
                      WHERE goal_id = $1 AND step LIKE 'l%') p
              WHERE j.goal_id = $1 AND j.step = 'j'",
            &[&id],
        )
        .unwrap()
        .get(0);
    FanOutRun {
        wall_ms: ms(elapsed),
        submit_ms: ms(submitted),
        tasks_per_s: (width + 2) as f64 / elapsed.as_secs_f64(),
        join_delay_ms,
    }
}

/// A map step of `size` no-op instances over the goal's input, from submit
/// sent to the goal's end; instances/s and wall ms.
fn map(stack: &Stack, client: &mut postgres::Client, size: usize) -> (f64, f64) {
    let blueprint = json!({"steps": [{"id": "each", "action": "noop", "for_each": "goal.input.items"}],
                           "output": "size(steps.each.result)"});
    let input = json!({ "items": (0..size).collect::<Vec<usize>>() });
    let mut waiter = GoalWaiter::new(stack);
    let started = Instant::now();
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
            &[&blueprint.to_string(), &input.to_string()],
        )
        .unwrap()
        .get(0);
    let status = waiter.wait(id, Duration::from_secs(600));
    let elapsed = started.elapsed();
    assert_eq!(status["result"], json!(size), "{}", status["error"]);
    (size as f64 / elapsed.as_secs_f64(), ms(elapsed))
}

/// Goals of one no-op step run one after another, `samples` times, the step
/// plain and as a one-step child goal; the medians, submit sent → goal ended, ms.
fn child_goal(stack: &Stack, client: &mut postgres::Client, samples: usize) -> (f64, f64) {
    let plain = json!({"steps": [{"id": "work", "action": "noop"}], "output": "{}"});
    let child = json!({"steps": [{"id": "work", "action": "goal",
                                  "params": {"blueprint": {"steps": [{"id": "work", "action": "noop"}],
                                                           "output": "{}"}}}],
                       "output": "{}"});
    let mut plain_ms = Vec::with_capacity(samples);
    let mut child_ms = Vec::with_capacity(samples);
    let mut waiter = GoalWaiter::new(stack);
    for _ in 0..samples {
        plain_ms.push(ms(run_plan(&mut waiter, client, &plain).1));
        child_ms.push(ms(run_plan(&mut waiter, client, &child).1));
    }
    (median(plain_ms), median(child_ms))
}

/// What a diamonds run measured.
struct DiamondsRun {
    wall_ms: f64,
    tasks_per_s: f64,
    submit_ms: f64,
}

/// `count` goals a → b, a → c, b → d, c → d (d joins all) submitted in one
/// transaction; from its commit returned until every goal has ended, with
/// its cost over the same window (`workers` running).
fn diamonds(
    stack: &Stack,
    client: &mut postgres::Client,
    meter: &mut postgres::Client,
    workers: &[u32],
    count: usize,
) -> (DiamondsRun, Cost) {
    let blueprint = json!({
        "steps": [
            {"id": "a", "action": "noop"},
            {"id": "b", "action": "noop"},
            {"id": "c", "action": "noop"},
            {"id": "d", "action": "noop", "join": "all", "input": "{}"},
        ],
        "edges": [
            {"from": "a", "to": "b"}, {"from": "a", "to": "c"},
            {"from": "b", "to": "d"}, {"from": "c", "to": "d"},
        ],
        "output": "{}",
    })
    .to_string();
    let sent = Instant::now();
    let ids = submit_goals(client, &blueprint, count);
    let committed = Instant::now();
    let window = CostWindow::open(stack, meter, workers);
    wait_for_goals(client, ids, Duration::from_secs(600));
    let elapsed = committed.elapsed();
    let cost = window.close(stack, meter, workers, (4 * count) as f64);
    let failed = client
        .query_one(
            "SELECT count(*) FROM synapse.goals WHERE id BETWEEN $1 AND $2 AND status <> 'succeeded'",
            &[&ids.0, &ids.1],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(failed, 0, "some diamonds did not succeed");
    let run = DiamondsRun {
        wall_ms: ms(elapsed),
        tasks_per_s: (4 * count) as f64 / elapsed.as_secs_f64(),
        submit_ms: ms(committed - sent),
    };
    (run, cost)
}

pub fn section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let client = &mut stack.pg();
    // From empty tables, as the drains start: not from the history the
    // sections before left (the figures then do not depend on which ran).
    forget_goals(client);
    let meter = &mut meter(stack);
    wal::install(meter);
    let mut figures = Vec::new();
    let worker = workers::start_one(stack, "dag", 32);
    // The chain's reference: single tasks one after another on the same worker.
    let samples = sizes.samples;
    let single: Vec<f64> = (0..runs)
        .map(|_| median(serial_commit_to_start(stack, samples).0))
        .collect();
    figures.push(
        Figure::new(
            format!("single task, serial: commit → handler start p50 ({samples} samples)"),
            median(single),
            "ms",
        )
        .note("the chain's reference, on the chain's worker")
        .is(Baseline::SerialLatency),
    );
    let length = sizes.chain;
    let steps: Vec<f64> = (0..runs).map(|_| chain(stack, client, length)).collect();
    figures.push(
        Figure::new(
            format!("chain of {length} steps, one worker"),
            median(steps),
            "ms/step",
        )
        .note("submit sent → goal ended, ÷ steps; ratio: chain step / single-task latency")
        .versus(Baseline::SerialLatency)
        .metric(Metric::ChainVsSingle),
    );
    let samples = sizes.samples.min(100);
    let children: Vec<(f64, f64)> = (0..runs)
        .map(|_| child_goal(stack, client, samples))
        .collect();
    figures.push(
        Figure::new(
            format!("child goal: one no-op step as a child goal, more than as a plain step ({samples} samples)"),
            median_of(&children, |run| run.1 - run.0),
            "ms",
        )
        .note(format!(
            "submit sent → goal ended, medians: plain {:.2} ms, as a child {:.2} ms; milestone ≤ 5 ms",
            median_of(&children, |run| run.0),
            median_of(&children, |run| run.1)
        )),
    );
    drop(worker);

    let width = sizes.width;
    let pair = workers::start(stack, "fan-out", 2, 64);
    // Not measured: the new workers' sessions prepare and plan their
    // statements (a first fan-out took 460–570 ms against 400–430 after it).
    fan_out(stack, client, width);
    let pids: Vec<u32> = pair.iter().map(WorkerProcess::pid).collect();
    let (fans, fan_costs): (Vec<FanOutRun>, Vec<Cost>) = (0..runs)
        .map(|_| {
            measured(stack, meter, &pids, width + 2, || {
                fan_out(stack, client, width)
            })
        })
        .unzip();
    let size = sizes.map;
    // The instances and their map step.
    let (maps, map_costs): (Vec<(f64, f64)>, Vec<Cost>) = (0..runs)
        .map(|_| measured(stack, meter, &pids, size + 1, || map(stack, client, size)))
        .unzip();
    drop(pair);

    let name = format!("fan-out 1 → {width} → 1, 2 workers × concurrency 64");
    figures.push(
        Figure::new(
            name.clone(),
            median_of(&fans, |run| run.tasks_per_s),
            "tasks/s",
        )
        .note(format!(
            "submit sent → goal ended, after one not measured; median wall {:.0} ms, of which the submit {:.0} ms",
            median_of(&fans, |run| run.wall_ms),
            median_of(&fans, |run| run.submit_ms),
        ))
        .versus(Baseline::PgLifecycle)
        .metric(Metric::FanOut),
    );
    figures.extend(cost_figures(&name, &fan_costs, |cost| cost, ""));
    figures.push(
        Figure::new(
            format!("fan-out 1 → {width} → 1: join-start delay"),
            median_of(&fans, |run| run.join_delay_ms),
            "ms",
        )
        .note("join's started_at − last parent's finished_at: the statements that claimed it and recorded its last parent")
        .metric(Metric::JoinStart),
    );
    let name = format!("map step of {size} no-op instances, 2 workers × concurrency 64");
    figures.push(
        Figure::new(
            name.clone(),
            median_of(&maps, |run| run.0),
            "instances/s",
        )
        .note(format!(
            "submit sent → goal ended, median wall {:.0} ms; milestone of plans that grow: ≥ 5 000/s",
            median_of(&maps, |run| run.1)
        ))
        .versus(Baseline::PgLifecycle),
    );
    figures.extend(cost_figures(&name, &map_costs, |cost| cost, ""));

    let worker = workers::start_one(stack, "diamonds", 32);
    let count = sizes.diamonds;
    let (shapes, shape_costs): (Vec<DiamondsRun>, Vec<Cost>) = (0..runs)
        .map(|_| diamonds(stack, client, meter, &[worker.pid()], count))
        .unzip();
    let name = format!("{count} diamonds in one transaction, one worker, concurrency 32");
    figures.push(
        Figure::new(
            name.clone(),
            median_of(&shapes, |run| run.tasks_per_s),
            "tasks/s",
        )
        .note(format!(
            "{} tasks; commit → all ended {:.0} ms; the submit took {:.0} ms",
            4 * count,
            median_of(&shapes, |run| run.wall_ms),
            median_of(&shapes, |run| run.submit_ms),
        ))
        .versus(Baseline::PgLifecycle),
    );
    figures.extend(cost_figures(&name, &shape_costs, |cost| cost, ""));
    drop(worker);
    figures
}

//! `submit_plan`'s own cost: the first call on a new connection (what a
//! short-lived client pays) and 1-step goals submitted in bulk, per goal.
use std::time::{Duration, Instant};

use synapse_e2e::{postgres, Stack};

use crate::figure::{latency_figures, median, ms, Figure};
use crate::goals::{one_i64, submit_goals, wait_for_goals, NOOP};
use crate::options::Sizes;
use crate::targets::Metric;
use crate::workers;

/// Times one `SELECT synapse.submit_plan(<noop>)` (simple protocol, one round
/// trip, as psql sends it), ms.
fn timed_submit(client: &mut postgres::Client) -> f64 {
    let sql = format!("SELECT synapse.submit_plan('{NOOP}'::jsonb)");
    let sent = Instant::now();
    client.simple_query(&sql).expect("submit_plan");
    ms(sent.elapsed())
}

/// For each of `connections` new connections: its first call and its second
/// (ms); the connect itself is not timed.
fn first_calls(stack: &Stack, connections: usize) -> (Vec<f64>, Vec<f64>) {
    (0..connections)
        .map(|_| {
            let mut client = stack.pg();
            let first = timed_submit(&mut client);
            let second = timed_submit(&mut client);
            (first, second)
        })
        .unzip()
}

/// `count` 1-step goals in one statement (autocommit); ms per goal.
fn bulk(client: &mut postgres::Client, count: usize) -> f64 {
    let sent = Instant::now();
    submit_goals(client, NOOP, count);
    ms(sent.elapsed()) / count as f64
}

pub fn section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let mut client = stack.pg();
    // Goals of earlier sections may never end (submit_goal with no template).
    let before = one_i64(
        &mut client,
        "SELECT coalesce(max(id), 0) FROM synapse.goals",
    );
    let mut figures = Vec::new();
    let connections = sizes.connections;
    let calls: Vec<(Vec<f64>, Vec<f64>)> =
        (0..runs).map(|_| first_calls(stack, connections)).collect();
    let mut first = latency_figures(
        &format!("first submit_plan on a new connection ({connections} connections)"),
        calls.iter().map(|run| run.0.clone()).collect(),
        "the call only (one round trip, commit included), not the connect",
    );
    first[0].metric = Some(Metric::FirstSubmit);
    figures.extend(first);
    figures.push(
        Figure::new(
            "second submit_plan on the same connection p50",
            median(calls.iter().map(|run| median(run.1.clone())).collect()),
            "ms",
        )
        .note("the warm cost, for comparison"),
    );

    let count = sizes.bulk;
    let per_goal: Vec<f64> = (0..runs).map(|_| bulk(&mut client, count)).collect();
    figures.push(
        Figure::new(
            format!("1-step submit_plan in bulk, {count} in one statement"),
            median(per_goal),
            "ms/goal",
        )
        .note(
            "SELECT submit_plan(…) FROM generate_series; statement sent → commit returned ÷ goals",
        )
        .metric(Metric::BulkSubmit),
    );

    // Nothing left queued for the sections after this one.
    let worker = workers::start_one(stack, "submit", 64);
    wait_for_goals(
        &mut client,
        (before + 1, i64::MAX),
        Duration::from_secs(600),
    );
    drop(worker);
    figures
}

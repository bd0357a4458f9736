//! `submit_plan`'s own cost: the first call on a new connection (what a
//! short-lived client pays) and 1-step goals submitted in bulk, per goal, by
//! `submit_plan` calls and by one `submit_plans` call;
//! beside each, the peer's call that queues a job (Graphile Worker's
//! `add_job` and `add_jobs`), measured alike on the same cluster.
use std::time::{Duration, Instant};

use synapse_e2e::{postgres, Stack};

use crate::figure::{latency_figures, median, ms, Baseline, Figure};
use crate::goals::{one_i64, submit_goals, submit_plans, wait_for_goals, NOOP};
use crate::options::Sizes;
use crate::peer;
use crate::targets::Metric;
use crate::workers;

/// Times one call sent with the simple protocol (one round trip, as psql
/// sends it), ms.
fn timed(client: &mut postgres::Client, sql: &str) -> f64 {
    let sent = Instant::now();
    client.simple_query(sql).expect(sql);
    ms(sent.elapsed())
}

/// For each of `connections` new connections (from `connect`): its first
/// `call` and its second (ms); the connect itself is not timed.
fn first_calls(
    connections: usize,
    connect: impl Fn() -> postgres::Client,
    call: &str,
) -> (Vec<f64>, Vec<f64>) {
    (0..connections)
        .map(|_| {
            let mut client = connect();
            let first = timed(&mut client, call);
            let second = timed(&mut client, call);
            (first, second)
        })
        .unzip()
}

/// How long `submit` took for `count` goals or jobs (one statement,
/// autocommit); ms per goal.
fn per_item(count: usize, submit: impl FnOnce()) -> f64 {
    let sent = Instant::now();
    submit();
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
    let runner = peer::install();
    peer::create_database(stack, &mut client, &runner);
    let submit = format!("SELECT synapse.submit_plan('{NOOP}'::jsonb)");
    let add_job = "SELECT graphile_worker.add_job('noop', '{}'::json)";
    // Alternated, so both see the machine in the same state.
    let (calls, peer_calls): (Vec<_>, Vec<_>) = (0..runs)
        .map(|_| {
            (
                first_calls(connections, || stack.pg(), &submit),
                first_calls(connections, || stack.pg_database(peer::DATABASE), add_job),
            )
        })
        .unzip();
    let mut first = latency_figures(
        &format!("first submit_plan on a new connection ({connections} connections)"),
        calls.iter().map(|run| run.0.clone()).collect(),
        "the call only (one round trip, commit included), not the connect",
    );
    first[0].metric = Some(Metric::FirstSubmit);
    first[0].versus.push(Baseline::GraphileFirstAdd);
    figures.extend(first);
    figures.push(
        Figure::new(
            "second submit_plan on the same connection p50",
            median(calls.iter().map(|run| median(run.1.clone())).collect()),
            "ms",
        )
        .note("the warm cost, for comparison"),
    );
    figures.push(
        Figure::new(
            format!("Graphile Worker: first add_job on a new connection ({connections} connections) p50"),
            median(peer_calls.iter().map(|run| median(run.0.clone())).collect()),
            "ms",
        )
        .note("add_job('noop', '{}'), timed alike, in the peer's database")
        .is(Baseline::GraphileFirstAdd),
    );
    figures.push(
        Figure::new(
            "Graphile Worker: second add_job on the same connection p50",
            median(peer_calls.iter().map(|run| median(run.1.clone())).collect()),
            "ms",
        )
        .note("the warm cost, for comparison"),
    );

    let count = sizes.bulk;
    let mut peer_client = stack.pg_database(peer::DATABASE);
    let mut per_goal = Vec::new();
    let mut per_goal_at_once = Vec::new();
    let mut per_job = Vec::new();
    for _ in 0..runs {
        per_goal.push(per_item(count, || {
            submit_goals(&mut client, NOOP, count);
        }));
        per_goal_at_once.push(per_item(count, || {
            submit_plans(&mut client, NOOP, count);
        }));
        per_job.push(per_item(count, || {
            peer::add_noop_jobs(&mut peer_client, count)
        }));
    }
    figures.push(
        Figure::new(
            format!("1-step submit_plan in bulk, {count} in one statement"),
            median(per_goal),
            "ms/goal",
        )
        .note(
            "SELECT submit_plan(…) FROM generate_series; statement sent → commit returned ÷ goals",
        )
        .metric(Metric::BulkSubmit)
        .versus(Baseline::GraphileBulkAdd),
    );
    figures.push(
        Figure::new(
            format!("1-step goals with submit_plans, {count} in one call"),
            median(per_goal_at_once),
            "ms/goal",
        )
        .note("one blueprint, an input per goal; call sent → commit returned ÷ goals")
        .versus(Baseline::GraphileBulkAdd),
    );
    figures.push(
        Figure::new(
            format!("Graphile Worker: add_jobs of {count} no-op jobs in one statement"),
            median(per_job),
            "ms/job",
        )
        .note("its bulk call, timed alike")
        .is(Baseline::GraphileBulkAdd),
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

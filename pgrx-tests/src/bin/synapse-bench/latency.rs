//! Latency: a batch's forwarding, submit → BRPOP, the M3 goal, and commit →
//! handler start, serially and open-loop at 100/s and 1000/s.
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use synapse_e2e::{brpop, postgres, redis, wait_until, GoalWaiter, Stack};

use crate::figure::{latency_figures, median, median_of, ms, ms_between, Baseline, Figure};
use crate::goals::{one_i64, wait_for_goals, NOOP};
use crate::options::Sizes;
use crate::targets::Metric;
use crate::workers;

pub fn llen(redis: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(redis).expect("LLEN")
}

/// Redis clients blocked in a BRPOP (or another blocking command).
fn blocked_clients(redis: &mut redis::Connection) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(redis)
        .expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("blocked_clients in INFO clients")
}

/// Time from the commit of N goals in one transaction until all N are in the
/// planner list (no worker running).
fn batch_to_redis(stack: &Stack, goals: usize) -> f64 {
    let mut client = stack.pg();
    let mut redis = stack.redis();
    redis::cmd("DEL")
        .arg("synapse:planner")
        .query::<()>(&mut redis)
        .unwrap();
    let mut transaction = client.transaction().unwrap();
    transaction
        .execute(
            "SELECT synapse.submit_goal('bench goal ' || n) FROM generate_series(1, $1::int) n",
            &[&(goals as i32)],
        )
        .unwrap();
    transaction.commit().unwrap();
    let committed = Instant::now();
    // Polled tightly: the figure is in milliseconds.
    while llen(&mut redis, "synapse:planner") < goals as i64 {
        std::thread::sleep(Duration::from_micros(200));
    }
    ms(committed.elapsed())
}

/// Latency of single submits: statement sent → popped from Redis by a
/// blocked BRPOP (includes the commit's fsync).
fn submit_to_pop(stack: &Stack, samples: usize) -> Vec<f64> {
    let mut client = stack.pg();
    let mut redis = stack.redis();
    redis::cmd("DEL")
        .arg("synapse:planner")
        .query::<()>(&mut redis)
        .unwrap();
    let statement = client
        .prepare("SELECT synapse.submit_goal('latency probe')")
        .unwrap();
    let mut latencies = Vec::with_capacity(samples);
    let idle_blocked = blocked_clients(&mut redis);
    for _ in 0..samples {
        let (sent_tx, sent_rx) = std::sync::mpsc::channel::<Instant>();
        let url = stack.redis_url();
        let popper = std::thread::spawn(move || {
            let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
            let _ = brpop(&mut redis, "synapse:planner", Duration::from_secs(10)).expect("popped");
            let popped = Instant::now();
            let sent = sent_rx.recv().unwrap();
            ms(popped - sent)
        });
        wait_until("the BRPOP to block", Duration::from_secs(10), || {
            (blocked_clients(&mut redis) > idle_blocked).then_some(())
        });
        let sent = Instant::now();
        client.query_one(&statement, &[]).unwrap();
        sent_tx.send(sent).unwrap();
        latencies.push(popper.join().unwrap());
    }
    latencies
}

/// submit_goal → the M3 goal (planned from a template, 4 steps, conditional
/// edges) has ended.
fn m3_wall(stack: &Stack, client: &mut postgres::Client) -> f64 {
    let mut waiter = GoalWaiter::new(stack);
    let started = Instant::now();
    let id = one_i64(
        client,
        "SELECT synapse.submit_goal('triage incident 7 severity 5')",
    );
    let status = waiter.wait(id, Duration::from_secs(60));
    assert_eq!(status["status"], "succeeded", "{status}");
    ms(started.elapsed())
}

/// One submitted no-op goal: when its statement was sent and when its commit returned.
struct Submitted {
    goal: i64,
    sent: SystemTime,
    committed: SystemTime,
}

/// Commit returned → the claim's `started_at` of each goal's task, ms.
fn commit_to_start(client: &mut postgres::Client, submitted: &[Submitted]) -> Vec<f64> {
    let first = submitted.iter().map(|s| s.goal).min().expect("goals");
    let last = submitted.iter().map(|s| s.goal).max().expect("goals");
    let started: HashMap<i64, SystemTime> = client
        .query(
            "SELECT goal_id, started_at FROM synapse.tasks WHERE goal_id BETWEEN $1 AND $2",
            &[&first, &last],
        )
        .expect("started_at")
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    submitted
        .iter()
        .map(|s| ms_between(s.committed, started[&s.goal]))
        .collect()
}

/// p50 of statement sent → commit returned, ms.
fn submit_p50(submitted: &[Submitted]) -> f64 {
    median(
        submitted
            .iter()
            .map(|s| ms_between(s.sent, s.committed))
            .collect(),
    )
}

/// Single-task goals submitted one after another, each once the previous
/// ended: commit returned → the worker's claim (`started_at`; the handler
/// starts right after it). Also returns the submits' sent → commit p50.
pub fn serial_commit_to_start(stack: &Stack, samples: usize) -> (Vec<f64>, f64) {
    let mut client = stack.pg();
    let statement = client
        .prepare("SELECT synapse.submit_plan($1::text::jsonb)")
        .unwrap();
    let mut waiter = GoalWaiter::new(stack);
    let submitted: Vec<Submitted> = (0..samples)
        .map(|_| {
            let sent = SystemTime::now();
            let goal: i64 = client.query_one(&statement, &[&NOOP]).unwrap().get(0);
            let committed = SystemTime::now();
            let status = waiter.wait(goal, Duration::from_secs(30));
            assert_eq!(status["status"], "succeeded");
            Submitted {
                goal,
                sent,
                committed,
            }
        })
        .collect();
    (
        commit_to_start(&mut client, &submitted),
        submit_p50(&submitted),
    )
}

/// What an open-loop run measured.
struct OpenLoopRun {
    latencies: Vec<f64>,
    submit_p50: f64,
    /// Goals submitted per second, from the first send to the last commit.
    achieved_rate: f64,
    /// The latest any send went out after its scheduled time, ms.
    max_send_lag: f64,
}

/// Single-task goals submitted on a fixed schedule (goal k at k/rate s),
/// never waiting for completions, by a few producers with a connection each
/// and interleaved schedules; then commit returned → `started_at` of each.
/// The schedule starts with a second of warm-up at the same rate, not
/// counted: the producers' new sessions load their caches then (the first
/// call on a connection has a figure of its own, in the submit section).
fn open_loop(stack: &Stack, rate: usize, duration: Duration) -> OpenLoopRun {
    let warm_up = rate;
    let total = warm_up + (rate as f64 * duration.as_secs_f64()).round() as usize;
    // A connection submits one goal at a time, each commit waiting for its
    // fsync (~10 ms under load here): enough producers that each has ~40 ms
    // per goal, so the rate is the schedule's, not the producers' round trips.
    let producers = (rate / 25).clamp(1, 64);
    let clients: Vec<(postgres::Client, postgres::Statement)> = (0..producers)
        .map(|_| {
            let mut client = stack.pg();
            let statement = client
                .prepare("SELECT synapse.submit_plan($1::text::jsonb)")
                .unwrap();
            (client, statement)
        })
        .collect();
    let start = Instant::now() + Duration::from_millis(20);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let results: Vec<(Vec<Submitted>, f64, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(producer, (mut client, statement))| {
                scope.spawn(move || {
                    let mut submitted = Vec::new();
                    let mut max_lag = Duration::ZERO;
                    for k in (producer..total).step_by(producers) {
                        let due = start + interval * k as u32;
                        let now = Instant::now();
                        if now < due {
                            // The schedule, not a synchronisation.
                            std::thread::sleep(due - now);
                        }
                        let lag = Instant::now().saturating_duration_since(due);
                        let sent = SystemTime::now();
                        let goal: i64 = client.query_one(&statement, &[&NOOP]).unwrap().get(0);
                        if k >= warm_up {
                            max_lag = max_lag.max(lag);
                            submitted.push(Submitted {
                                goal,
                                sent,
                                committed: SystemTime::now(),
                            });
                        }
                    }
                    (submitted, ms(max_lag), Instant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let last_commit = results.iter().map(|r| r.2).max().expect("producers");
    let max_send_lag = results.iter().map(|r| r.1).fold(0.0, f64::max);
    let submitted: Vec<Submitted> = results.into_iter().flat_map(|r| r.0).collect();
    let mut client = stack.pg();
    let first = submitted.iter().map(|s| s.goal).min().expect("goals");
    let last = submitted.iter().map(|s| s.goal).max().expect("goals");
    wait_for_goals(&mut client, (first, last), Duration::from_secs(600));
    OpenLoopRun {
        latencies: commit_to_start(&mut client, &submitted),
        submit_p50: submit_p50(&submitted),
        achieved_rate: (total - warm_up) as f64
            / (last_commit - (start + interval * warm_up as u32)).as_secs_f64(),
        max_send_lag,
    }
}

pub fn section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let client = &mut stack.pg();
    let mut figures = Vec::new();
    let batch = sizes.batch;
    let samples = sizes.samples;
    let walls: Vec<f64> = (0..runs).map(|_| batch_to_redis(stack, batch)).collect();
    figures.push(Figure::new(
        format!("{batch} goals in one transaction: commit → all in Redis"),
        median(walls),
        "ms",
    ));
    let pops: Vec<Vec<f64>> = (0..runs).map(|_| submit_to_pop(stack, samples)).collect();
    let mut pop_figures = latency_figures(
        &format!("single submit_goal: sent → BRPOP wakes ({samples} samples)"),
        pops,
        "includes the commit's fsync",
    );
    pop_figures[0].versus.push(Baseline::RedisRoundTrip);
    figures.extend(pop_figures);

    client
        .execute(
            "SELECT synapse.add_template('triage', 'triage incident (?P<id>\\d+) severity (?P<severity>\\d+)', $1::text::jsonb)",
            &[&synapse_e2e::TRIAGE],
        )
        .unwrap();
    let worker = workers::start_one(stack, "latency", 32);
    let walls: Vec<f64> = (0..runs).map(|_| m3_wall(stack, client)).collect();
    figures.push(
        Figure::new("M3 goal: submit_goal → goal succeeded", median(walls), "ms")
            .note("template planner, 4 steps, 2 conditional edges"),
    );

    let serial: Vec<(Vec<f64>, f64)> = (0..runs)
        .map(|_| serial_commit_to_start(stack, samples))
        .collect();
    let submit = median_of(&serial, |run| run.1);
    figures.extend(latency_figures(
        &format!("single task: commit → handler start, serial ({samples} samples)"),
        serial.into_iter().map(|run| run.0).collect(),
        &format!("to the claim's started_at; submit sent → commit p50 {submit:.2} ms"),
    ));

    for rate in [100, 1000] {
        let loops: Vec<OpenLoopRun> = (0..runs)
            .map(|_| open_loop(stack, rate, sizes.open_loop))
            .collect();
        let note = format!(
            "commit returned → claim's started_at (<0 counted 0), after 1 s of warm-up at that rate; \
             one worker, concurrency 32; \
             achieved {:.0}/s, max send lag {:.1} ms, submit p50 {:.2} ms",
            median_of(&loops, |run| run.achieved_rate),
            median_of(&loops, |run| run.max_send_lag),
            median_of(&loops, |run| run.submit_p50),
        );
        let mut rate_figures = latency_figures(
            &format!(
                "open loop {rate}/s for {} s: commit → handler start",
                sizes.open_loop.as_secs()
            ),
            loops.into_iter().map(|run| run.latencies).collect(),
            &note,
        );
        if rate == 1000 {
            // [p50, p90, p99, max]
            rate_figures[0].metric = Some(Metric::CommitToStartP50);
            rate_figures[2].metric = Some(Metric::CommitToStartP99);
        }
        figures.extend(rate_figures);
    }
    drop(worker);
    figures
}

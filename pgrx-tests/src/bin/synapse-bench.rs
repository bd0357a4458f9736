//! `make bench`: measures the pipeline on an isolated stack (its own Postgres
//! cluster and Redis, release builds) and prints a table; `--json FILE` also
//! writes the figures. Each figure is the median of `--runs` runs.
//!
//! Sections, in the order they run:
//! - `latency`: a batch's forwarding, submit → BRPOP, the M3 goal, and
//!   commit → handler start, serially and open-loop at 100/s and 1000/s.
//! - `dag`: a chain, a 1 → W → 1 fan-out/fan-in (with its join-start delay)
//!   and a transaction of diamonds.
//! - `throughput`: no-op tasks, pre-queued and steady-state, over 1/2 workers ×
//!   concurrency 16/64 × `synapse.notify` on/off, with commits and WAL bytes
//!   per task.
//! - `limits`: ceilings of the same Postgres and Redis: a pgbench minimal task
//!   lifecycle, redis-benchmark LPUSH/RPOP/BRPOP, a Redis PING round trip.
//!   Throughput figures are also shown as a ratio to the pgbench lifecycle,
//!   submit → BRPOP to the PING round trip, the chain step to the serial
//!   latency (ratios need both sections in the run).
//! - `idle`: two workers left alone: SQL statements, Redis commands, WAL
//!   bytes, CPU seconds per process.
//!
//! Flags:
//! - `--quick`: tiny sizes (for `make bench-smoke`); the throughput matrix
//!   shrinks to two of its corners.
//! - `--runs N`: runs per figure (default 3).
//! - `--tasks N`: tasks per pre-queued throughput drain (default 100 000;
//!   quick 300).
//! - `--width N`: fan-out width (default 1000; quick 100).
//! - `--only SECTION[,SECTION...]`: run only these sections.
//! - `--json FILE`: also write every figure there.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use synapse_e2e::{brpop, postgres, redis, wait_for_goal, wait_until, Stack, WorkerProcess};

/// Blueprint of the no-op tasks the throughput and latency figures use.
const NOOP: &str = r#"{"steps":[{"id":"t","action":"noop"}],"output":"{}"}"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    Latency,
    Dag,
    Throughput,
    Limits,
    Idle,
}

impl Section {
    const ALL: [Section; 5] = [
        Section::Latency,
        Section::Dag,
        Section::Throughput,
        Section::Limits,
        Section::Idle,
    ];

    fn name(self) -> &'static str {
        match self {
            Section::Latency => "latency",
            Section::Dag => "dag",
            Section::Throughput => "throughput",
            Section::Limits => "limits",
            Section::Idle => "idle",
        }
    }
}

const USAGE: &str = "use --quick, --runs N, --tasks N, --width N, \
    --only latency|dag|throughput|limits|idle[,...], --json FILE";

struct Options {
    runs: usize,
    quick: bool,
    json: Option<String>,
    width: Option<usize>,
    tasks: Option<usize>,
    only: Vec<Section>,
}

fn number(value: Option<String>, flag: &str) -> usize {
    value
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| panic!("{flag} needs a positive number ({USAGE})"))
}

fn options() -> Options {
    let mut options = Options {
        runs: 3,
        quick: false,
        json: None,
        width: None,
        tasks: None,
        only: Section::ALL.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--runs" => options.runs = number(args.next(), "--runs"),
            "--tasks" => options.tasks = Some(number(args.next(), "--tasks")),
            "--width" => options.width = Some(number(args.next(), "--width")),
            "--json" => options.json = Some(args.next().expect("--json FILE")),
            "--only" => {
                let list = args.next().unwrap_or_default();
                options.only = list
                    .split(',')
                    .map(|name| {
                        *Section::ALL
                            .iter()
                            .find(|section| section.name() == name)
                            .unwrap_or_else(|| panic!("unknown section {name:?} ({USAGE})"))
                    })
                    .collect();
            }
            other => panic!("unknown argument {other} ({USAGE})"),
        }
    }
    options
}

/// Sizes and durations of one mode.
struct Sizes {
    batch: usize,
    samples: usize,
    width: usize,
    chain: usize,
    diamonds: usize,
    tasks: usize,
    /// (workers, concurrency, notify) of the throughput matrix.
    matrix: Vec<(usize, usize, bool)>,
    /// Goals per producer transaction in the steady state.
    steady_batch: usize,
    warm_up: Duration,
    window: Duration,
    open_loop: Duration,
    idle: Duration,
    pgbench: Duration,
    redis_requests: usize,
    pings: usize,
}

impl Sizes {
    fn new(options: &Options) -> Sizes {
        let full_matrix = [true, false]
            .into_iter()
            .flat_map(|notify| {
                [(1, 16), (1, 64), (2, 16), (2, 64)]
                    .map(|(workers, concurrency)| (workers, concurrency, notify))
            })
            .collect();
        let sizes = if options.quick {
            Sizes {
                batch: 500,
                samples: 20,
                width: 100,
                chain: 20,
                diamonds: 50,
                tasks: 300,
                matrix: vec![(1, 16, true), (2, 64, false)],
                steady_batch: 20,
                warm_up: Duration::from_millis(200),
                window: Duration::from_millis(500),
                open_loop: Duration::from_secs(1),
                idle: Duration::from_secs(2),
                pgbench: Duration::from_secs(1),
                redis_requests: 2_000,
                pings: 200,
            }
        } else {
            Sizes {
                batch: 10_000,
                samples: 200,
                width: 1_000,
                chain: 500,
                diamonds: 1_000,
                tasks: 100_000,
                matrix: full_matrix,
                steady_batch: 100,
                warm_up: Duration::from_secs(5),
                window: Duration::from_secs(10),
                open_loop: Duration::from_secs(10),
                idle: Duration::from_secs(120),
                pgbench: Duration::from_secs(10),
                redis_requests: 200_000,
                pings: 1_000,
            }
        };
        Sizes {
            width: options.width.unwrap_or(sizes.width),
            tasks: options.tasks.unwrap_or(sizes.tasks),
            ..sizes
        }
    }
}

/// A measured value other figures are compared with.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Baseline {
    /// Tasks/s of the pgbench minimal task lifecycle.
    PgLifecycle,
    /// p50 of a Redis PING round trip, ms.
    RedisRoundTrip,
    /// p50 of commit → handler start, serial single tasks, ms.
    SerialLatency,
}

impl Baseline {
    fn label(self) -> &'static str {
        match self {
            Baseline::PgLifecycle => "pgbench lifecycle",
            Baseline::RedisRoundTrip => "Redis PING RTT",
            Baseline::SerialLatency => "serial task p50",
        }
    }
}

/// One printed figure.
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
    /// Shown as value ÷ baseline when the baseline was measured in this run.
    versus: Option<Baseline>,
    /// The figure is that baseline.
    is: Option<Baseline>,
}

impl Figure {
    fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            note: String::new(),
            versus: None,
            is: None,
        }
    }

    fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    fn versus(mut self, baseline: Baseline) -> Figure {
        self.versus = Some(baseline);
        self
    }

    fn is(mut self, baseline: Baseline) -> Figure {
        self.is = Some(baseline);
        self
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median over runs of one field of each run's result.
fn median_of<T>(runs: &[T], field: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(field).collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// p50, p90, p99 and max of latencies (ms), each the median over the runs.
fn latency_figures(name: &str, runs: Vec<Vec<f64>>, note: &str) -> Vec<Figure> {
    let sorted: Vec<Vec<f64>> = runs
        .into_iter()
        .map(|mut run| {
            run.sort_by(f64::total_cmp);
            run
        })
        .collect();
    [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)]
        .into_iter()
        .map(|(label, p)| {
            Figure::new(
                format!("{name} {label}"),
                median_of(&sorted, |run| percentile(run, p)),
                "ms",
            )
            .note(note)
        })
        .collect()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `later - earlier` in ms, 0 when `later` is not later (clocks of one host).
fn ms_between(earlier: SystemTime, later: SystemTime) -> f64 {
    ms(later.duration_since(earlier).unwrap_or_default())
}

fn one_i64(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).expect(sql).get(0)
}

fn llen(redis: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(redis).expect("LLEN")
}

/// Submits `count` goals of `blueprint` in one transaction; returns the
/// (first, last) goal id.
fn submit_goals(client: &mut postgres::Client, blueprint: &str, count: usize) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT min(id), max(id) FROM (
               SELECT synapse.submit_plan($1::text::jsonb) AS id FROM generate_series(1, $2::int)) s",
            &[&blueprint, &(count as i32)],
        )
        .expect("submitting goals");
    (row.get(0), row.get(1))
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

/// Whether every goal with an id in `first..=last` has ended. The task check
/// runs first: it reads the small partial index of unfinished tasks, so
/// polling it stays cheap while many goals are left.
fn goals_finished(client: &mut postgres::Client, (first, last): (i64, i64)) -> bool {
    client
        .query_one(
            "SELECT NOT EXISTS (SELECT FROM synapse.tasks
                                 WHERE finished_at IS NULL AND goal_id BETWEEN $1 AND $2)
                AND NOT EXISTS (SELECT FROM synapse.goals
                                 WHERE finished_at IS NULL AND id BETWEEN $1 AND $2)",
            &[&first, &last],
        )
        .expect("goals finished?")
        .get(0)
}

fn wait_for_goals(client: &mut postgres::Client, ids: (i64, i64), limit: Duration) {
    wait_until("the goals to finish", limit, || {
        goals_finished(client, ids).then_some(())
    });
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
    let started = Instant::now();
    let id = one_i64(
        client,
        "SELECT synapse.submit_goal('triage incident 7 severity 5')",
    );
    let status = wait_for_goal(stack, id, Duration::from_secs(60));
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
fn serial_commit_to_start(stack: &Stack, samples: usize) -> (Vec<f64>, f64) {
    let mut client = stack.pg();
    let statement = client
        .prepare("SELECT synapse.submit_plan($1::text::jsonb)")
        .unwrap();
    let submitted: Vec<Submitted> = (0..samples)
        .map(|_| {
            let sent = SystemTime::now();
            let goal: i64 = client.query_one(&statement, &[&NOOP]).unwrap().get(0);
            let committed = SystemTime::now();
            let status = wait_for_goal(stack, goal, Duration::from_secs(30));
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
fn open_loop(stack: &Stack, rate: usize, duration: Duration) -> OpenLoopRun {
    let total = (rate as f64 * duration.as_secs_f64()).round() as usize;
    // One connection cannot submit 1000/s (each commit waits for its fsync).
    let producers = (rate / 100).clamp(1, 16);
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
                        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
                        let sent = SystemTime::now();
                        let goal: i64 = client.query_one(&statement, &[&NOOP]).unwrap().get(0);
                        submitted.push(Submitted {
                            goal,
                            sent,
                            committed: SystemTime::now(),
                        });
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
        achieved_rate: total as f64 / (last_commit - start).as_secs_f64(),
        max_send_lag,
    }
}

/// Redis PING round trips, ms.
fn redis_pings(stack: &Stack, count: usize) -> Vec<f64> {
    let mut redis = stack.redis();
    (0..count)
        .map(|_| {
            let sent = Instant::now();
            let _: String = redis::cmd("PING").query(&mut redis).expect("PING");
            ms(sent.elapsed())
        })
        .collect()
}

fn latency_section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
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
    pop_figures[0].versus = Some(Baseline::RedisRoundTrip);
    figures.extend(pop_figures);

    client
        .execute(
            "SELECT synapse.add_template('triage', 'triage incident (?P<id>\\d+) severity (?P<severity>\\d+)', $1::text::jsonb)",
            &[&synapse_e2e::TRIAGE],
        )
        .unwrap();
    let worker = stack.start_worker("bench", &["--concurrency", "32"]);
    let walls: Vec<f64> = (0..runs).map(|_| m3_wall(stack, client)).collect();
    figures.push(
        Figure::new("M3 goal: submit_goal → goal succeeded", median(walls), "ms")
            .note("template planner, 4 steps, 2 conditional edges"),
    );

    let serial: Vec<(Vec<f64>, f64)> = (0..runs)
        .map(|_| serial_commit_to_start(stack, samples))
        .collect();
    let submit = median_of(&serial, |run| run.1);
    let mut serial_figures = latency_figures(
        &format!("single task: commit → handler start, serial ({samples} samples)"),
        serial.into_iter().map(|run| run.0).collect(),
        &format!("to the claim's started_at; submit sent → commit p50 {submit:.2} ms"),
    );
    serial_figures[0].is = Some(Baseline::SerialLatency);
    figures.extend(serial_figures);

    for rate in [100, 1000] {
        let loops: Vec<OpenLoopRun> = (0..runs)
            .map(|_| open_loop(stack, rate, sizes.open_loop))
            .collect();
        let note = format!(
            "commit returned → claim's started_at (<0 counted 0); one worker, concurrency 32; \
             achieved {:.0}/s, max send lag {:.1} ms, submit p50 {:.2} ms",
            median_of(&loops, |run| run.achieved_rate),
            median_of(&loops, |run| run.max_send_lag),
            median_of(&loops, |run| run.submit_p50),
        );
        figures.extend(latency_figures(
            &format!(
                "open loop {rate}/s for {} s: commit → handler start",
                sizes.open_loop.as_secs()
            ),
            loops.into_iter().map(|run| run.latencies).collect(),
            &note,
        ));
    }
    drop(worker);
    figures
}

/// A chain of `length` no-op steps; returns ms per step.
fn chain(stack: &Stack, client: &mut postgres::Client, length: usize) -> f64 {
    let steps: Vec<Value> = (0..length)
        .map(|i| json!({"id": format!("s{i}"), "action": "noop", "input": "{}"}))
        .collect();
    let edges: Vec<Value> = (1..length)
        .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
        .collect();
    let blueprint = json!({"steps": steps, "edges": edges, "output": "{}"});
    let (_, elapsed) = run_plan(stack, client, &blueprint);
    ms(elapsed) / length as f64
}

/// Submits `blueprint` and waits for its goal to succeed; returns the goal
/// id and the time from submit sent to the goal's end.
fn run_plan(stack: &Stack, client: &mut postgres::Client, blueprint: &Value) -> (i64, Duration) {
    let started = Instant::now();
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb)",
            &[&blueprint.to_string()],
        )
        .unwrap()
        .get(0);
    let status = wait_for_goal(stack, id, Duration::from_secs(600));
    assert_eq!(status["status"], "succeeded");
    (id, started.elapsed())
}

/// What a fan-out/fan-in run measured.
struct FanOutRun {
    wall_ms: f64,
    tasks_per_s: f64,
    /// The join's `started_at` − the latest `finished_at` of its parents, ms.
    join_delay_ms: f64,
}

/// 1 → width → 1 fan-out/fan-in in one goal, from submit sent to the goal's end.
fn fan_out(stack: &Stack, client: &mut postgres::Client, width: usize) -> FanOutRun {
    // Short ids keep wide fan-outs under the 1 MiB blueprint limit.
    let mut steps = vec![json!({"id": "r", "action": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        steps.push(json!({"id": format!("l{i}"), "action": "noop"}));
        edges.push(json!({"from": "r", "to": format!("l{i}")}));
        edges.push(json!({"from": format!("l{i}"), "to": "j"}));
    }
    steps.push(json!({"id": "j", "action": "noop", "join": "all", "input": "{}"}));
    let blueprint = json!({"steps": steps, "edges": edges, "output": "{}"});
    let (id, elapsed) = run_plan(stack, client, &blueprint);
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
        tasks_per_s: (width + 2) as f64 / elapsed.as_secs_f64(),
        join_delay_ms,
    }
}

/// What a diamonds run measured.
struct DiamondsRun {
    wall_ms: f64,
    tasks_per_s: f64,
    submit_ms: f64,
}

/// `count` goals a → b, a → c, b → d, c → d (d joins all) submitted in one
/// transaction; from its commit returned until every goal has ended.
fn diamonds(client: &mut postgres::Client, count: usize) -> DiamondsRun {
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
    wait_for_goals(client, ids, Duration::from_secs(600));
    let elapsed = committed.elapsed();
    let failed = client
        .query_one(
            "SELECT count(*) FROM synapse.goals WHERE id BETWEEN $1 AND $2 AND status <> 'succeeded'",
            &[&ids.0, &ids.1],
        )
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(failed, 0, "some diamonds did not succeed");
    DiamondsRun {
        wall_ms: ms(elapsed),
        tasks_per_s: (4 * count) as f64 / elapsed.as_secs_f64(),
        submit_ms: ms(committed - sent),
    }
}

fn dag_section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let client = &mut stack.pg();
    let mut figures = Vec::new();
    let worker = stack.start_worker("bench", &["--concurrency", "32"]);
    let length = sizes.chain;
    let steps: Vec<f64> = (0..runs).map(|_| chain(stack, client, length)).collect();
    figures.push(
        Figure::new(
            format!("chain of {length} steps, one worker"),
            median(steps),
            "ms/step",
        )
        .note("submit sent → goal ended, ÷ steps; ratio: chain step / single-task latency")
        .versus(Baseline::SerialLatency),
    );

    let width = sizes.width;
    let fans: Vec<FanOutRun> = (0..runs).map(|_| fan_out(stack, client, width)).collect();
    figures.push(
        Figure::new(
            format!("fan-out 1 → {width} → 1, one worker, concurrency 32"),
            median_of(&fans, |run| run.tasks_per_s),
            "tasks/s",
        )
        .note(format!(
            "submit sent → goal ended; median wall {:.0} ms",
            median_of(&fans, |run| run.wall_ms)
        ))
        .versus(Baseline::PgLifecycle),
    );
    figures.push(
        Figure::new(
            format!("fan-out 1 → {width} → 1: join-start delay"),
            median_of(&fans, |run| run.join_delay_ms),
            "ms",
        )
        .note("join's started_at − last parent's finished_at (both transaction start times)"),
    );

    let count = sizes.diamonds;
    let shapes: Vec<DiamondsRun> = (0..runs).map(|_| diamonds(client, count)).collect();
    figures.push(
        Figure::new(
            format!("{count} diamonds in one transaction, one worker, concurrency 32"),
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
    drop(worker);
    figures
}

/// One point of the throughput matrix.
struct Config {
    workers: usize,
    concurrency: usize,
    notify: bool,
}

impl Config {
    fn label(&self) -> String {
        format!(
            "{} worker{}, concurrency {}, notify {}",
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            self.concurrency,
            if self.notify { "on" } else { "off" }
        )
    }

    fn start_workers(&self, stack: &Stack) -> Vec<WorkerProcess> {
        let concurrency = self.concurrency.to_string();
        (0..self.workers)
            .map(|i| {
                stack.start_worker(&format!("throughput-{i}"), &["--concurrency", &concurrency])
            })
            .collect()
    }
}

/// `synapse.notify` for sessions opened from now on (the event triggers read it
/// in the writing session, so producers and workers must connect afterwards).
fn set_notify(stack: &Stack, meter: &mut postgres::Client, notify: Option<bool>) {
    let sql = match notify {
        Some(true) => "ALTER DATABASE synapse SET synapse.notify = on",
        Some(false) => "ALTER DATABASE synapse SET synapse.notify = off",
        None => "ALTER DATABASE synapse RESET synapse.notify",
    };
    meter.batch_execute(sql).expect(sql);
    let seen: Option<String> = stack
        .pg()
        .query_one("SELECT current_setting('synapse.notify', true)", &[])
        .expect("synapse.notify")
        .get(0);
    let off = seen.as_deref() == Some("off");
    assert_eq!(
        off,
        notify == Some(false),
        "a new session sees synapse.notify = {seen:?}"
    );
}

/// Empties the goal history (and with it tasks and edges) so each throughput
/// run starts from the same tables; the runs' polls and the workers' index
/// scans then do not grow with the goals of earlier runs.
fn forget_goals(client: &mut postgres::Client) {
    // The forwarder's transactions can lock tasks before goals; the TRUNCATE
    // locks them the other way round. Giving up on a lock before the deadlock
    // check would run (deadlock_timeout, 1 s) keeps the forwarder from ever
    // being a deadlock's victim (it would restart); then try again.
    for _ in 0..100 {
        let mut transaction = client.transaction().expect("BEGIN");
        match transaction
            .batch_execute("SET LOCAL lock_timeout = '100ms'; TRUNCATE synapse.goals CASCADE")
        {
            Ok(()) => return transaction.commit().expect("COMMIT"),
            Err(error) if error.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
            Err(error) => panic!("truncating the goals: {error}"),
        }
    }
    panic!("truncating the goals: the locks never came free");
}

/// A connection to the `postgres` database, for the measuring side of the
/// throughput runs: what it runs never counts in the `synapse` database's
/// statistics.
fn meter(stack: &Stack) -> postgres::Client {
    stack.pg_database("postgres")
}

/// WAL written during a measurement window.
struct WalUse {
    bytes: i64,
    /// Transaction commit records: the commits that wrote (and fsynced), the
    /// forwarder's included.
    commits: i64,
}

/// A measurement window over the WAL. A physical replication slot keeps the
/// window's WAL on disk even if a checkpoint runs meanwhile, so pg_walinspect
/// can count its commit records afterwards.
struct WalWindow {
    start: String,
}

const SLOT: &str = "synapse_bench";

impl WalWindow {
    fn open(meter: &mut postgres::Client) -> WalWindow {
        meter
            .query_one(
                "SELECT pg_create_physical_replication_slot($1, true)::text",
                &[&SLOT],
            )
            .expect("creating the WAL slot");
        let start = meter
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .expect("pg_current_wal_lsn")
            .get(0);
        WalWindow { start }
    }

    fn close(self, meter: &mut postgres::Client) -> WalUse {
        let end: String = meter
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .expect("pg_current_wal_lsn")
            .get(0);
        // pg_walinspect reads only flushed WAL; the WAL writer flushes the rest soon.
        wait_until("the WAL to be flushed", Duration::from_secs(30), || {
            meter
                .query_one(
                    "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                    &[&end],
                )
                .expect("pg_current_wal_flush_lsn")
                .get::<_, bool>(0)
                .then_some(())
        });
        let usage = if end == self.start {
            // Nothing written (pg_walinspect refuses an empty range).
            WalUse {
                bytes: 0,
                commits: 0,
            }
        } else {
            let row = meter
                .query_one(
                    "SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)::bigint,
                            (SELECT coalesce(sum(count), 0)::bigint
                               FROM pg_get_wal_stats($1::text::pg_lsn, $2::text::pg_lsn, true)
                              WHERE \"resource_manager/record_type\" = 'Transaction/COMMIT')",
                    &[&self.start, &end],
                )
                .expect("pg_get_wal_stats");
            WalUse {
                bytes: row.get(0),
                commits: row.get(1),
            }
        };
        meter
            .execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
            .expect("dropping the WAL slot");
        usage
    }
}

/// Committed transactions of the `synapse` database as the statistics know
/// them: a session reports its own when idle (at most once a second) and when
/// it exits; the forwarder (a background worker) only when it exits.
fn xact_commit(meter: &mut postgres::Client) -> i64 {
    one_i64(
        meter,
        "SELECT xact_commit FROM pg_stat_database WHERE datname = 'synapse'",
    )
}

/// Makes `client`'s session report its statistics, this statement's included,
/// before the server says it is ready again (which `batch_execute` waits for).
fn flush_stats(client: &mut postgres::Client) {
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .expect("pg_stat_force_next_flush");
}

fn backend_pid(client: &mut postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("pg_backend_pid")
        .get(0)
}

/// Waits until the only client sessions of the `synapse` database are `keep`:
/// a session reports its pending statistics as it exits, before it leaves
/// pg_stat_activity.
fn wait_for_sessions_to_exit(meter: &mut postgres::Client, keep: &[i32]) {
    wait_until("the sessions to exit", Duration::from_secs(30), || {
        let others = one_i64(
            meter,
            &format!(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = 'synapse' AND backend_type = 'client backend'
                    AND pid <> ALL ('{{{}}}'::int[])",
                keep.iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        (others == 0).then_some(())
    });
}

/// What a pre-queued drain measured.
struct DrainRun {
    tasks_per_s: f64,
    xact_commits_per_task: f64,
    wal_commits_per_task: f64,
    wal_bytes_per_task: f64,
}

/// `tasks` single-step no-op goals queued (and forwarded to Redis) with no
/// worker running, then drained by `config`'s workers: from just before the
/// first worker starts until every goal has ended.
fn pre_queued_drain(stack: &Stack, tasks: usize, config: &Config) -> DrainRun {
    let mut meter = meter(stack);
    let mut poller = stack.pg();
    forget_goals(&mut poller);
    let ids = submit_goals(&mut stack.pg(), NOOP, tasks);
    wait_until(
        "the queue to be in Redis",
        Duration::from_secs(1800),
        || (stack.forwarder_status(&mut poller)["pending"] == 0).then_some(()),
    );
    // As autovacuum would soon: the tables were just emptied and refilled.
    poller
        .batch_execute("ANALYZE synapse.goals, synapse.tasks")
        .expect("ANALYZE");
    // Every other session of ours has exited (its statistics are in) and the
    // poller's are flushed: in the window, only its polls are ours.
    let poller_pid = backend_pid(&mut poller);
    wait_for_sessions_to_exit(&mut meter, &[poller_pid]);
    flush_stats(&mut poller);
    let wal = WalWindow::open(&mut meter);
    let commits_before = xact_commit(&mut meter);
    let started = Instant::now();
    let workers = config.start_workers(stack);
    let mut polls = 0;
    wait_until("the queue to drain", Duration::from_secs(3600), || {
        polls += 1;
        goals_finished(&mut poller, ids).then_some(())
    });
    let elapsed = started.elapsed();
    let wal = wal.close(&mut meter);
    drop(workers);
    drop(poller);
    wait_for_sessions_to_exit(&mut meter, &[]);
    let commits = xact_commit(&mut meter) - commits_before - polls;
    let tasks = tasks as f64;
    DrainRun {
        tasks_per_s: tasks / elapsed.as_secs_f64(),
        xact_commits_per_task: commits as f64 / tasks,
        wal_commits_per_task: wal.commits as f64 / tasks,
        wal_bytes_per_task: wal.bytes as f64 / tasks,
    }
}

/// What a steady-state window measured.
struct SteadyRun {
    tasks_per_s: f64,
    wal_commits_per_task: f64,
    wal_bytes_per_task: f64,
}

/// Goals finished so far (the table holds only this run's goals).
fn finished_goals(client: &mut postgres::Client) -> i64 {
    one_i64(
        client,
        "SELECT count(*) FROM synapse.goals WHERE finished_at IS NOT NULL",
    )
}

/// Workers running while a producer submits batches of no-op goals in a loop,
/// keeping about `backlog` tasks unfinished (enough that no worker waits for
/// work, few enough that the queue does not grow without end); after a
/// warm-up, goals finished per second over a window.
fn steady_state(stack: &Stack, config: &Config, sizes: &Sizes) -> SteadyRun {
    let mut meter = meter(stack);
    let mut observer = stack.pg();
    forget_goals(&mut observer);
    let workers = config.start_workers(stack);
    let batch = sizes.steady_batch;
    let backlog = (8 * config.workers * config.concurrency).max(4 * batch) as i64;
    let stop = AtomicBool::new(false);
    /// Stops the producer when the window ends, or fails: the scope waits for it.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let run = std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            let mut client = stack.pg();
            let unfinished = client
                .prepare("SELECT count(*) FROM synapse.tasks WHERE finished_at IS NULL")
                .unwrap();
            let submit = client
                .prepare(
                    "SELECT synapse.submit_plan($1::text::jsonb) FROM generate_series(1, $2::int)",
                )
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let left: i64 = client.query_one(&unfinished, &[]).unwrap().get(0);
                if left < backlog {
                    client.query(&submit, &[&NOOP, &(batch as i32)]).unwrap();
                } else {
                    // Polled: with notify off, nothing announces completions.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        let stopper = StopOnDrop(&stop);
        // The warm-up and the window are durations, not waits for a condition.
        std::thread::sleep(sizes.warm_up);
        let wal = WalWindow::open(&mut meter);
        let started = Instant::now();
        let before = finished_goals(&mut observer);
        std::thread::sleep(sizes.window);
        let elapsed = started.elapsed();
        let done = finished_goals(&mut observer) - before;
        let wal = wal.close(&mut meter);
        drop(stopper);
        producer.join().unwrap();
        assert!(done > 0, "no goal finished in the window");
        SteadyRun {
            tasks_per_s: done as f64 / elapsed.as_secs_f64(),
            wal_commits_per_task: wal.commits as f64 / done as f64,
            wal_bytes_per_task: wal.bytes as f64 / done as f64,
        }
    });
    // Leave nothing queued for the next run's workers.
    wait_for_goals(&mut observer, (0, i64::MAX), Duration::from_secs(600));
    drop(workers);
    run
}

fn throughput_section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let mut admin = meter(stack);
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .expect("pg_walinspect");
    let mut figures = Vec::new();
    let tasks = sizes.tasks;
    for &(workers, concurrency, notify) in &sizes.matrix {
        let config = Config {
            workers,
            concurrency,
            notify,
        };
        set_notify(stack, &mut admin, Some(notify));
        let label = config.label();
        let drains: Vec<DrainRun> = (0..runs)
            .map(|_| pre_queued_drain(stack, tasks, &config))
            .collect();
        let name = format!("pre-queued {tasks} no-op tasks, {label}");
        figures.push(
            Figure::new(
                name.clone(),
                median_of(&drains, |run| run.tasks_per_s),
                "tasks/s",
            )
            .note("one goal per task; first worker's start → all goals ended")
            .versus(Baseline::PgLifecycle),
        );
        figures.push(
            Figure::new(
                format!("{name}: commits/task (xact_commit)"),
                median_of(&drains, |run| run.xact_commits_per_task),
                "",
            )
            .note("pg_stat_database: sessions' commits, read-only ones too, the forwarder's not"),
        );
        figures.push(
            Figure::new(
                format!("{name}: WAL commit records/task"),
                median_of(&drains, |run| run.wal_commits_per_task),
                "",
            )
            .note("pg_walinspect: writing commits, forwarder included"),
        );
        figures.push(
            Figure::new(
                format!("{name}: WAL bytes/task"),
                median_of(&drains, |run| run.wal_bytes_per_task),
                "B",
            )
            .note("pg_wal_lsn_diff over the drain"),
        );

        let steady: Vec<SteadyRun> = (0..runs)
            .map(|_| steady_state(stack, &config, sizes))
            .collect();
        let name = format!("steady state, {label}");
        figures.push(
            Figure::new(
                name.clone(),
                median_of(&steady, |run| run.tasks_per_s),
                "tasks/s",
            )
            .note(format!(
                "goals ended over {:.1} s after {:.1} s warm-up; producer batches of {}",
                sizes.window.as_secs_f64(),
                sizes.warm_up.as_secs_f64(),
                sizes.steady_batch
            ))
            .versus(Baseline::PgLifecycle),
        );
        figures.push(
            Figure::new(
                format!("{name}: WAL commit records/task"),
                median_of(&steady, |run| run.wal_commits_per_task),
                "",
            )
            .note("pg_walinspect over the window; the producer's commits included"),
        );
        figures.push(
            Figure::new(
                format!("{name}: WAL bytes/task"),
                median_of(&steady, |run| run.wal_bytes_per_task),
                "B",
            )
            .note("pg_wal_lsn_diff over the window"),
        );
    }
    set_notify(stack, &mut admin, None);
    forget_goals(&mut stack.pg());
    figures
}

/// The minimal task lifecycle, one task per script run: insert it queued,
/// claim the oldest queued job (SKIP LOCKED), complete it; three autocommit
/// transactions. The claim always yields one row (id 0 when it found nothing,
/// which a race can cause) so `\gset` never aborts the client.
const LIFECYCLE: &str = r"INSERT INTO bench_limit.jobs (status, payload) VALUES ('queued', '{}');
WITH claimed AS (
  UPDATE bench_limit.jobs SET status = 'running', claimed_at = now()
   WHERE id = (SELECT id FROM bench_limit.jobs WHERE status = 'queued'
                ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)
  RETURNING id)
SELECT coalesce((SELECT id FROM claimed), 0) AS claimed \gset
UPDATE bench_limit.jobs SET status = 'done', finished_at = now() WHERE id = :claimed;
";

fn pgbench_binary() -> std::path::PathBuf {
    // The private install's (scripts/env.sh exports PG_BIN), else PATH's.
    std::env::var_os("PG_BIN")
        .map(|dir| std::path::PathBuf::from(dir).join("pgbench"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "pgbench".into())
}

/// pgbench running the lifecycle script with `clients`; returns tasks/s
/// (pgbench's tps counts script runs).
fn pgbench_lifecycle(stack: &Stack, clients: usize, duration: Duration) -> f64 {
    let mut client = stack.pg();
    client
        .batch_execute("TRUNCATE bench_limit.jobs")
        .expect("TRUNCATE");
    let script = stack.path("lifecycle.sql");
    std::fs::write(&script, LIFECYCLE).expect("writing the pgbench script");
    let output = std::process::Command::new(pgbench_binary())
        .args([
            "-n",
            "-M",
            "prepared",
            "-j",
            "2",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .arg("-p")
        .arg(stack.pg_port.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .arg("-T")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&script)
        .arg(synapse_e2e::DATABASE)
        .output()
        .expect("running pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let done = one_i64(
        &mut client,
        "SELECT count(*) FROM bench_limit.jobs WHERE status = 'done'",
    );
    assert!(done > 0, "pgbench completed no job: {stdout}");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {stdout}"))
}

/// redis-benchmark with `args` (CSV output); returns requests/s per test.
fn redis_benchmark(stack: &Stack, args: &[&str]) -> Vec<(String, f64)> {
    let output = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "--csv"])
        .arg("-p")
        .arg(stack.redis_port.to_string())
        .args(args)
        .output()
        .expect("running redis-benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "redis-benchmark failed: {stdout}");
    let rows: Vec<(String, f64)> = stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(|field| field.trim_matches('"'));
            let test = fields.next()?;
            let rps = fields.next()?.parse().ok()?;
            Some((test.to_owned(), rps))
        })
        .collect();
    assert!(
        !rows.is_empty(),
        "no result in redis-benchmark's output: {stdout}"
    );
    rows
}

fn limits_section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let mut figures = Vec::new();
    let mut client = stack.pg();
    client
        .batch_execute(
            "CREATE SCHEMA bench_limit;
             CREATE TABLE bench_limit.jobs (
                 id bigserial PRIMARY KEY, status text NOT NULL, payload jsonb,
                 claimed_at timestamptz, finished_at timestamptz);
             CREATE INDEX jobs_queued ON bench_limit.jobs (id) WHERE status = 'queued';",
        )
        .expect("creating bench_limit.jobs");
    let seconds = sizes.pgbench.as_secs().max(1);
    let mut best = 0.0_f64;
    for clients in [16, 64] {
        let rate = median(
            (0..runs)
                .map(|_| pgbench_lifecycle(stack, clients, sizes.pgbench))
                .collect(),
        );
        best = best.max(rate);
        figures.push(
            Figure::new(
                format!("limit: minimal task lifecycle, pgbench -c {clients} -j 2 -T {seconds}"),
                rate,
                "tasks/s",
            )
            .note("insert; claim (SKIP LOCKED); complete: 3 commits, synchronous_commit on"),
        );
    }
    figures.push(
        Figure::new(
            "limit: minimal task lifecycle in Postgres (3 commits/task)",
            best,
            "tasks/s",
        )
        .note("the better of the two pgbench runs")
        .is(Baseline::PgLifecycle),
    );
    client
        .batch_execute("DROP SCHEMA bench_limit CASCADE")
        .expect("dropping bench_limit");

    let n = sizes.redis_requests.to_string();
    for pipeline in ["1", "16"] {
        let results: Vec<Vec<(String, f64)>> = (0..runs)
            .map(|_| redis_benchmark(stack, &["-n", &n, "-P", pipeline, "-t", "lpush,rpop"]))
            .collect();
        for (i, (test, _)) in results[0].iter().enumerate() {
            figures.push(
                Figure::new(
                    format!("limit: Redis {test}, redis-benchmark -P {pipeline}"),
                    median_of(&results, |run| run[i].1),
                    "req/s",
                )
                .note(format!("{n} requests, 50 clients")),
            );
        }
    }
    // BRPOP that never blocks: the list is filled first with as many items.
    let brpops: Vec<f64> = (0..runs)
        .map(|_| {
            redis_benchmark(stack, &["-n", &n, "lpush", "bench:brpop", "x"]);
            let rate = redis_benchmark(stack, &["-n", &n, "brpop", "bench:brpop", "1"])[0].1;
            let left = llen(&mut stack.redis(), "bench:brpop");
            assert_eq!(left, 0, "BRPOP left items behind");
            rate
        })
        .collect();
    figures.push(
        Figure::new(
            "limit: Redis BRPOP, redis-benchmark",
            median(brpops),
            "req/s",
        )
        .note(format!("{n} requests, 50 clients, list pre-filled")),
    );

    let pings: Vec<Vec<f64>> = (0..runs).map(|_| redis_pings(stack, sizes.pings)).collect();
    figures.push(
        Figure::new(
            format!("limit: Redis PING round trip p50 ({} PINGs)", sizes.pings),
            median_of(&pings, |run| median(run.clone())),
            "ms",
        )
        .note("one connection, redis crate")
        .is(Baseline::RedisRoundTrip),
    );
    figures
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
}

fn pids_of(pattern: &str) -> Vec<u32> {
    let output = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(pattern)
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Names the processes to watch while idle: each worker, Redis, and each
/// Postgres process by its backend type.
fn idle_processes(
    stack: &Stack,
    client: &mut postgres::Client,
    workers: &[&WorkerProcess],
) -> Vec<(String, u32)> {
    let types: HashMap<u32, String> = client
        .query(
            "SELECT pid, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|row| (row.get::<_, i32>(0) as u32, row.get(1)))
        .collect();
    let pids = stack.postgres_pids();
    let postmaster = pids.first().copied();
    let postgres = pids.into_iter().filter_map(|pid| {
        let kind = if Some(pid) == postmaster {
            "postmaster".to_owned()
        } else {
            // Ours (the probe's backend) is left out.
            types.get(&pid)?.clone()
        };
        Some((format!("postgres {kind}"), pid))
    });
    workers
        .iter()
        .enumerate()
        .map(|(i, worker)| (format!("worker {}", i + 1), worker.pid()))
        .chain(postgres)
        .chain(
            pids_of(&format!("redis-server 127.0.0.1:{}", stack.redis_port))
                .into_iter()
                .map(|pid| ("redis".to_owned(), pid)),
        )
        .collect()
}

/// The stack and two workers left alone: what each side does while idle.
fn idle(stack: &Stack, workers: &[&WorkerProcess], window: Duration) -> Vec<Figure> {
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // Let the last events drain first.
    wait_until("the outbox to drain", Duration::from_secs(60), || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
    // Autovacuum work left by the earlier sections would otherwise land in the window.
    client.batch_execute("VACUUM (ANALYZE)").expect("VACUUM");
    let statements = |client: &mut postgres::Client| -> i64 {
        client
            .query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat%'
                   AND query NOT LIKE '%pg_current_wal_lsn%'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let commands = |redis: &mut redis::Connection| -> i64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(redis).unwrap();
        info.lines()
            .filter(|line| line.starts_with("cmdstat_") && !line.starts_with("cmdstat_info"))
            .filter_map(|line| {
                line.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
            .sum()
    };
    let wal = |client: &mut postgres::Client| -> i64 {
        client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
            .unwrap()
            .get(0)
    };
    let processes = idle_processes(stack, &mut client, workers);
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let (sql_before, redis_before, wal_before) = (
        statements(&mut client),
        commands(&mut redis),
        wal(&mut client),
    );
    // Nothing announces "nothing happened": observe a quiet window.
    std::thread::sleep(window);
    let (sql_after, redis_after, wal_after) = (
        statements(&mut client),
        commands(&mut redis),
        wal(&mut client),
    );
    let seconds = window.as_secs();
    let mut figures = vec![
        Figure::new(
            format!("idle {seconds} s: SQL statements (all clients)"),
            (sql_after - sql_before) as f64,
            "",
        )
        .note("pg_stat_statements"),
        Figure::new(
            format!("idle {seconds} s: Redis commands"),
            (redis_after - redis_before) as f64,
            "",
        )
        .note("INFO commandstats; blocked BRPOPs count when they return"),
        Figure::new(
            format!("idle {seconds} s: WAL bytes"),
            (wal_after - wal_before) as f64,
            "B",
        )
        .note("whole cluster, after a VACUUM"),
    ];
    // Postgres processes of one type are summed (e.g. the client backends).
    let mut by_name: Vec<(String, f64, usize)> = Vec::new();
    let mut postgres_total = 0.0;
    for ((name, pid), before) in processes.iter().zip(cpu_before) {
        let used = cpu_seconds(*pid) - before;
        if name.starts_with("postgres") {
            postgres_total += used;
        }
        match by_name.iter_mut().find(|(known, _, _)| known == name) {
            Some(entry) => {
                entry.1 += used;
                entry.2 += 1;
            }
            None => by_name.push((name.clone(), used, 1)),
        }
    }
    for (name, used, count) in by_name {
        let name = if count > 1 {
            format!("{name} ×{count}")
        } else {
            name
        };
        figures.push(Figure::new(
            format!("idle {seconds} s: CPU of {name}"),
            used,
            "s",
        ));
    }
    figures.push(
        Figure::new(
            format!("idle {seconds} s: CPU of all postgres processes"),
            postgres_total,
            "s",
        )
        .note("postmaster and children, forwarder included"),
    );
    figures
}

/// Ratio text and value of `figure` against its baseline, if measured.
fn ratio(figure: &Figure, baselines: &BTreeMap<Baseline, f64>) -> Option<(f64, Baseline)> {
    let baseline = figure.versus?;
    let base = *baselines.get(&baseline)?;
    (base > 0.0).then(|| (figure.value / base, baseline))
}

/// `value` with up to `digits` significant digits: small values (a round trip
/// in ms) stay readable, large ones carry no noise.
fn formatted(value: f64, digits: i32) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value:.0}");
    }
    let magnitude = value.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).clamp(0, 6) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

fn report(figures: &[(Section, Figure)], options: &Options) {
    let baselines: BTreeMap<Baseline, f64> = figures
        .iter()
        .filter_map(|(_, figure)| Some((figure.is?, figure.value)))
        .collect();
    let width = figures
        .iter()
        .map(|(_, figure)| figure.name.chars().count())
        .max()
        .unwrap_or(6);
    println!();
    println!(
        "{:<width$} {:>11} {:<8} {:<26} note",
        "figure", "value", "unit", "ratio"
    );
    let mut json_figures = BTreeMap::new();
    let mut previous = None;
    for (section, figure) in figures {
        if previous != Some(*section) {
            println!("{:-<1$}", format!("-- {} ", section.name()), width + 60);
            previous = Some(*section);
        }
        let ratio = ratio(figure, &baselines);
        let ratio_text = ratio
            .map(|(value, baseline)| format!("{}× {}", formatted(value, 3), baseline.label()))
            .unwrap_or_default();
        println!(
            "{:<width$} {:>11} {:<8} {:<26} {}",
            figure.name,
            formatted(figure.value, 4),
            figure.unit,
            ratio_text,
            figure.note
        );
        json_figures.insert(
            figure.name.clone(),
            json!({
                "section": section.name(),
                "value": figure.value,
                "unit": figure.unit,
                "note": figure.note,
                "ratio": ratio.map(|(value, baseline)| json!({"value": value, "of": baseline.label()})),
            }),
        );
    }
    if let Some(path) = &options.json {
        let document: Value = json!({
            "runs": options.runs,
            "quick": options.quick,
            "sections": options.only.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "figures": json_figures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&document).unwrap())
            .expect("writing the JSON");
        println!("\nwritten to {path}");
    }
}

fn main() {
    let options = options();
    let sizes = Sizes::new(&options);
    let runs = options.runs;
    let stack = Stack::start("bench", &["synapse.sweep_interval = '1h'"]);
    let mut figures: Vec<(Section, Figure)> = Vec::new();
    for section in Section::ALL {
        if !options.only.contains(&section) {
            continue;
        }
        let measured = match section {
            Section::Latency => latency_section(&stack, &sizes, runs),
            Section::Dag => dag_section(&stack, &sizes, runs),
            Section::Throughput => throughput_section(&stack, &sizes, runs),
            Section::Limits => limits_section(&stack, &sizes, runs),
            Section::Idle => {
                let worker = stack.start_worker("bench", &["--concurrency", "32"]);
                let second = stack.start_worker("bench-2", &["--concurrency", "32"]);
                idle(&stack, &[&worker, &second], sizes.idle)
            }
        };
        figures.extend(measured.into_iter().map(|figure| (section, figure)));
    }
    report(&figures, &options);
}

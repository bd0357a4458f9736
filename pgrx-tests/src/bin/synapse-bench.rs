//! `make bench`: measures the pipeline on an isolated stack (its own Postgres
//! cluster and Redis, release builds) and prints a table; `--json FILE` also
//! writes the figures. Each figure is the median of `--runs` runs.
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use synapse_e2e::{brpop, postgres, redis, wait_for_goal, Stack};

struct Options {
    runs: usize,
    quick: bool,
    json: Option<String>,
    width: Option<usize>,
}

fn options() -> Options {
    let mut options = Options {
        runs: 3,
        quick: false,
        json: None,
        width: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--runs" => options.runs = args.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            "--json" => options.json = Some(args.next().expect("--json FILE")),
            "--width" => options.width = args.next().and_then(|n| n.parse().ok()),
            other => {
                panic!("unknown argument {other} (use --quick, --runs N, --width N, --json FILE)")
            }
        }
    }
    options
}

/// One printed figure.
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// p50 and p99 of latencies (ms) that include a commit.
fn percentiles(name: &str, mut latencies: Vec<f64>) -> Vec<Figure> {
    latencies.sort_by(f64::total_cmp);
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .map(|(label, p)| Figure {
            name: format!("{name} {label}"),
            value: percentile(&latencies, p),
            unit: "ms",
            note: "includes the commit's fsync".into(),
        })
        .collect()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn one_i64(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).expect(sql).get(0)
}

fn llen(redis: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(redis).expect("LLEN")
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
        // Let the BRPOP block first.
        std::thread::sleep(Duration::from_millis(2));
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

/// A chain of `length` no-op steps; returns ms per step.
fn chain(stack: &Stack, client: &mut postgres::Client, length: usize) -> f64 {
    let steps: Vec<Value> = (0..length)
        .map(|i| json!({"id": format!("s{i}"), "action": "noop", "input": "{}"}))
        .collect();
    let edges: Vec<Value> = (1..length)
        .map(|i| json!({"from": format!("s{}", i - 1), "to": format!("s{i}")}))
        .collect();
    let blueprint = json!({"steps": steps, "edges": edges, "output": "{}"}).to_string();
    let started = Instant::now();
    let id: i64 = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&blueprint])
        .unwrap()
        .get(0);
    let status = wait_for_goal(stack, id, Duration::from_secs(600));
    assert_eq!(status["status"], "succeeded");
    ms(started.elapsed()) / length as f64
}

/// `tasks` single-step no-op goals queued with no worker running, then
/// drained by workers started with `flags`; returns tasks/s.
fn drain(stack: &Stack, tasks: usize, workers: usize, flags: &[&str]) -> f64 {
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.submit_plan('{\"steps\":[{\"id\":\"t\",\"action\":\"noop\"}],\"output\":\"{}\"}')
               FROM generate_series(1, $1::int)",
            &[&(tasks as i32)],
        )
        .unwrap();
    synapse_e2e::wait_until("the queue to be in Redis", Duration::from_secs(600), || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
    let running: Vec<_> = (0..workers)
        .map(|i| stack.start_worker(&format!("drain-{i}"), flags))
        .collect();
    let started = Instant::now();
    synapse_e2e::wait_until("the queue to drain", Duration::from_secs(1800), || {
        let left = one_i64(
            &mut client,
            "SELECT count(*) FROM synapse.goals WHERE status = 'running'",
        );
        (left == 0).then_some(())
    });
    let rate = tasks as f64 / started.elapsed().as_secs_f64();
    drop(running);
    rate
}

/// 1 → width → 1 fan-out/fan-in in one goal; returns (ms, tasks/s).
fn fan_out(stack: &Stack, client: &mut postgres::Client, width: usize) -> (f64, f64) {
    // Short ids keep 10 000 steps under the 1 MiB blueprint limit.
    let mut steps = vec![json!({"id": "r", "action": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        steps.push(json!({"id": format!("l{i}"), "action": "noop"}));
        edges.push(json!({"from": "r", "to": format!("l{i}")}));
        edges.push(json!({"from": format!("l{i}"), "to": "j"}));
    }
    steps.push(json!({"id": "j", "action": "noop", "join": "all", "input": "{}"}));
    let blueprint = json!({"steps": steps, "edges": edges, "output": "{}"}).to_string();
    let started = Instant::now();
    let id: i64 = client
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&blueprint])
        .unwrap()
        .get(0);
    let status = wait_for_goal(stack, id, Duration::from_secs(600));
    assert_eq!(status["status"], "succeeded");
    let elapsed = started.elapsed();
    (ms(elapsed), (width + 2) as f64 / elapsed.as_secs_f64())
}

/// Single-task goals submitted one after another: statement sent → the
/// worker's claim (the handler starts right after it).
fn submit_to_handler(stack: &Stack, client: &mut postgres::Client, samples: usize) -> Vec<f64> {
    let blueprint = r#"{"steps":[{"id":"probe","action":"noop"}]}"#;
    let statement = client
        .prepare("SELECT synapse.submit_plan($1::text::jsonb)")
        .unwrap();
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let sent = SystemTime::now();
        let id: i64 = client.query_one(&statement, &[&blueprint]).unwrap().get(0);
        let status = wait_for_goal(stack, id, Duration::from_secs(30));
        assert_eq!(status["status"], "succeeded");
        let started: SystemTime = client
            .query_one(
                "SELECT started_at FROM synapse.tasks WHERE goal_id = $1",
                &[&id],
            )
            .unwrap()
            .get(0);
        latencies.push(ms(started.duration_since(sent).unwrap_or_default()));
    }
    latencies
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

/// The stack and two workers left alone: what each side does while idle.
fn idle(
    stack: &Stack,
    client: &mut postgres::Client,
    workers: &[&synapse_e2e::WorkerProcess],
    window: Duration,
) -> Vec<Figure> {
    let mut redis = stack.redis();
    // Let the last events drain first.
    synapse_e2e::wait_until("the outbox to drain", Duration::from_secs(60), || {
        (stack.forwarder_status(client)["pending"] == 0).then_some(())
    });
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
    let processes: Vec<(String, u32)> = workers
        .iter()
        .enumerate()
        .map(|(i, worker)| (format!("worker {}", i + 1), worker.pid()))
        .chain(
            stack
                .postgres_pids()
                .into_iter()
                .map(|pid| (format!("postgres process {pid}"), pid)),
        )
        .chain(
            pids_of(&format!("redis-server 127.0.0.1:{}", stack.redis_port))
                .into_iter()
                .map(|pid| ("redis".to_owned(), pid)),
        )
        .collect();
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let (sql_before, redis_before, wal_before) =
        (statements(client), commands(&mut redis), wal(client));
    std::thread::sleep(window);
    let (sql_after, redis_after, wal_after) =
        (statements(client), commands(&mut redis), wal(client));
    let seconds = window.as_secs();
    let mut figures = vec![
        Figure {
            name: format!("idle {seconds} s: SQL statements (all clients)"),
            value: (sql_after - sql_before) as f64,
            unit: "",
            note: "pg_stat_statements".into(),
        },
        Figure {
            name: format!("idle {seconds} s: Redis commands"),
            value: (redis_after - redis_before) as f64,
            unit: "",
            note: "INFO commandstats; blocked BRPOPs count when they return".into(),
        },
        Figure {
            name: format!("idle {seconds} s: WAL bytes"),
            value: (wal_after - wal_before) as f64,
            unit: "B",
            note: String::new(),
        },
    ];
    let mut postgres_cpu = 0.0;
    for ((name, pid), before) in processes.iter().zip(cpu_before) {
        let used = cpu_seconds(*pid) - before;
        if name.starts_with("postgres") {
            postgres_cpu += used;
            continue;
        }
        figures.push(Figure {
            name: format!("idle {seconds} s: CPU of {name}"),
            value: used,
            unit: "s",
            note: String::new(),
        });
    }
    figures.push(Figure {
        name: format!("idle {seconds} s: CPU of all postgres processes"),
        value: postgres_cpu,
        unit: "s",
        note: "postmaster and children, forwarder included".into(),
    });
    figures
}

fn main() {
    let options = options();
    let (batch, samples, width, idle_window, chain_length, drained) = if options.quick {
        (500, 20, 200, Duration::from_secs(2), 20, 200)
    } else {
        (10_000, 200, 9_998, Duration::from_secs(120), 500, 20_000)
    };
    let width = options.width.unwrap_or(width);
    let mut figures = Vec::new();

    let stack = Stack::start("bench", &["synapse.sweep_interval = '1h'"]);
    let runs: Vec<f64> = (0..options.runs)
        .map(|_| batch_to_redis(&stack, batch))
        .collect();
    figures.push(Figure {
        name: format!("{batch} goals in one transaction: commit → all in Redis"),
        value: median(runs),
        unit: "ms",
        note: String::new(),
    });
    figures.extend(percentiles(
        &format!("single submit_goal: sent → BRPOP wakes ({samples} samples)"),
        submit_to_pop(&stack, samples),
    ));

    let mut client = stack.pg();
    client
        .execute("SELECT synapse.add_template('triage', 'triage incident (?P<id>\\d+) severity (?P<severity>\\d+)', $1::text::jsonb)", &[&synapse_e2e::TRIAGE])
        .unwrap();
    let worker = stack.start_worker("bench", &["--concurrency", "32"]);
    let runs: Vec<f64> = (0..options.runs)
        .map(|_| m3_wall(&stack, &mut client))
        .collect();
    figures.push(Figure {
        name: "M3 goal: submit_goal → goal succeeded".into(),
        value: median(runs),
        unit: "ms",
        note: "template planner, 4 steps, 2 conditional edges".into(),
    });

    figures.extend(percentiles(
        "single task: submit sent → handler start (serial)",
        submit_to_handler(&stack, &mut client, samples),
    ));

    let runs: Vec<(f64, f64)> = (0..options.runs)
        .map(|_| fan_out(&stack, &mut client, width))
        .collect();
    figures.push(Figure {
        name: format!("fan-out 1 → {width} → 1, one worker, concurrency 32"),
        value: median(runs.iter().map(|r| r.1).collect()),
        unit: "tasks/s",
        note: format!(
            "median wall {:.0} ms",
            median(runs.iter().map(|r| r.0).collect())
        ),
    });
    let runs: Vec<f64> = (0..options.runs)
        .map(|_| chain(&stack, &mut client, chain_length))
        .collect();
    figures.push(Figure {
        name: format!("chain of {chain_length} steps, one worker"),
        value: median(runs),
        unit: "ms/step",
        note: "compare: single task submit → handler start".into(),
    });
    drop(worker);
    for (workers, concurrency) in [(1, "16"), (1, "64"), (2, "64")] {
        let runs: Vec<f64> = (0..options.runs)
            .map(|_| drain(&stack, drained, workers, &["--concurrency", concurrency]))
            .collect();
        figures.push(Figure {
            name: format!("{drained} pre-queued no-op tasks drained: {workers} worker(s), concurrency {concurrency}"),
            value: median(runs),
            unit: "tasks/s",
            note: "one goal per task".into(),
        });
    }
    let worker = stack.start_worker("bench", &["--concurrency", "32"]);
    let second = stack.start_worker("bench-2", &["--concurrency", "32"]);
    figures.extend(idle(&stack, &mut client, &[&worker, &second], idle_window));
    drop(second);
    drop(worker);

    println!();
    println!("{:<72} {:>12}  note", "figure", "value");
    println!("{}", "-".repeat(110));
    let mut json_figures = BTreeMap::new();
    for figure in &figures {
        println!(
            "{:<72} {:>9.2} {:<7} {}",
            figure.name, figure.value, figure.unit, figure.note
        );
        json_figures.insert(
            figure.name.clone(),
            json!({"value": figure.value, "unit": figure.unit, "note": figure.note}),
        );
    }
    if let Some(path) = options.json {
        let document: Value = json!({"runs": options.runs, "figures": json_figures});
        std::fs::write(&path, serde_json::to_string_pretty(&document).unwrap())
            .expect("writing the JSON");
        println!("\nwritten to {path}");
    }
}

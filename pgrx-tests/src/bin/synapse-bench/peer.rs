//! The peer: Graphile Worker 0.17.3 in its batched configuration (local queue
//! of 500, completions and failures batched with no delay), installed by the
//! bench with npm, drained side by side with Synapse on the same cluster (its
//! own database, the same server settings). Both drains are measured alike:
//! N no-op jobs pre-queued in one statement before any worker runs, then two
//! worker processes × concurrency 64, from the first one's start until the
//! queue is empty; CPU of every process, commits and WAL per job.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use synapse_e2e::{postgres, Stack};

use crate::cost::CostWindow;
use crate::figure::{ms, Baseline, Figure};
use crate::options::Sizes;
use crate::sessions::{backend_pid, flush_stats, meter, wait_for_sessions_to_exit, xact_commit};
use crate::statements::{statement_figures, StatementWindow};
use crate::targets::Metric;
use crate::throughput::{
    drain_figures, pre_queued_drain, set_notify, Config, DrainRun, SYNAPSE_DRAIN,
};
use crate::wal;

const VERSION: &str = "0.17.3";
/// The runner the bench writes next to the npm install (ES modules resolve
/// `graphile-worker` from the script's own folder).
const RUNNER: &str = include_str!("graphile-runner.mjs");
/// The peer's database, in the bench's cluster.
pub const DATABASE: &str = "graphile";
const WORKERS: usize = 2;
/// What the runner logs once its worker is up.
const READY: &str = "runner: worker started";
const CONCURRENCY: usize = 64;

/// Where the peer is installed: target/bench/graphile.
fn install_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/graphile")
}

fn installed_version() -> Option<String> {
    let manifest = install_dir().join("node_modules/graphile-worker/package.json");
    let text = std::fs::read_to_string(manifest).ok()?;
    let manifest: serde_json::Value = serde_json::from_str(&text).ok()?;
    manifest["version"].as_str().map(str::to_owned)
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error} (`make setup` installs node and npm)"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Installs graphile-worker at [`VERSION`] with npm unless it already is, and
/// writes the runner.
pub fn install() -> PathBuf {
    let dir = install_dir();
    std::fs::create_dir_all(&dir).expect("creating target/bench/graphile");
    if installed_version().as_deref() != Some(VERSION) {
        let manifest = dir.join("package.json");
        if !manifest.exists() {
            std::fs::write(&manifest, "{\"private\": true}\n").expect("writing package.json");
        }
        println!("peer: installing graphile-worker@{VERSION} with npm");
        run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .arg(format!("graphile-worker@{VERSION}"))
                .current_dir(&dir),
            "npm install graphile-worker",
        );
        assert_eq!(installed_version().as_deref(), Some(VERSION));
    }
    let runner = dir.join("runner.mjs");
    std::fs::write(&runner, RUNNER).expect("writing the runner");
    runner
}

fn database_url(stack: &Stack) -> String {
    format!(
        "postgresql://postgres@127.0.0.1:{}/{DATABASE}",
        stack.pg_port
    )
}

/// A new, empty peer database with Graphile's schema.
pub fn create_database(stack: &Stack, meter: &mut postgres::Client, runner: &PathBuf) {
    meter
        .batch_execute(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        .expect("dropping the peer's database");
    meter
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .expect("creating the peer's database");
    run(
        Command::new("node")
            .arg(runner)
            .arg("migrate")
            .env("DATABASE_URL", database_url(stack)),
        "installing Graphile Worker's schema",
    );
}

/// A Graphile Worker process, killed when dropped.
struct NodeWorker(Child);

impl NodeWorker {
    fn start(stack: &Stack, runner: &PathBuf, index: usize) -> NodeWorker {
        let log =
            std::fs::File::create(stack.path(&format!("graphile-{index}.log"))).expect("peer log");
        let child = Command::new("node")
            .arg(runner)
            .arg("work")
            .env("DATABASE_URL", database_url(stack))
            .env("CONCURRENCY", CONCURRENCY.to_string())
            // No line per job (Graphile logs each success at info otherwise), as
            // Graphile's own performance test runs and as Synapse's workers at info.
            .env("NO_LOG_SUCCESS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("starting node");
        NodeWorker(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Fails the run, with the logs, if the process has exited.
    fn check_alive(&mut self, stack: &Stack) {
        if let Some(status) = self.0.try_wait().expect("try_wait") {
            panic!(
                "a Graphile Worker process exited ({status}):\n{}",
                peer_logs(stack)
            );
        }
    }
}

impl Drop for NodeWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peer_logs(stack: &Stack) -> String {
    (0..WORKERS)
        .map(|i| {
            std::fs::read_to_string(stack.path(&format!("graphile-{i}.log"))).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Adds `jobs` no-op jobs in one statement (`add_jobs`, Graphile's bulk call).
pub fn add_noop_jobs(client: &mut postgres::Client, jobs: usize) {
    let added: i64 = client
        .query_one(
            "SELECT count(*) FROM graphile_worker.add_jobs(array(
               SELECT ROW('noop', '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
                 FROM generate_series(1, $1::int)))",
            &[&(jobs as i32)],
        )
        .expect("adding the jobs")
        .get(0);
    assert_eq!(added, jobs as i64);
}

/// `jobs` no-op jobs added in one statement (`add_jobs`) with no worker
/// running, then drained by two Graphile Worker processes.
fn graphile_drain(stack: &Stack, runner: &PathBuf, jobs: usize) -> DrainRun {
    let mut meter = meter(stack);
    let mut poller = stack.pg_database(DATABASE);
    add_noop_jobs(&mut poller, jobs);
    poller
        .batch_execute("ANALYZE graphile_worker._private_jobs")
        .expect("ANALYZE");
    // Opened first: its session must be gone before the commits are counted.
    let statements = StatementWindow::open(stack);
    let poller_pid = backend_pid(&mut poller);
    wait_for_sessions_to_exit(&mut meter, DATABASE, &[poller_pid]);
    flush_stats(&mut poller);
    let remaining = poller
        .prepare(
            "SELECT count(*), count(*) FILTER (WHERE last_error IS NOT NULL), max(last_error)
               FROM (SELECT last_error FROM graphile_worker._private_jobs LIMIT 1000) j",
        )
        .expect("preparing the poll");
    let commits_before = xact_commit(&mut meter, DATABASE);
    let window = CostWindow::open(stack, &mut meter, &[]);
    let started = Instant::now();
    let mut workers: Vec<NodeWorker> = (0..WORKERS)
        .map(|i| NodeWorker::start(stack, runner, i))
        .collect();
    let deadline = started + Duration::from_secs(3600);
    let mut startup = None;
    let mut polls = 0;
    loop {
        polls += 1;
        if startup.is_none() && peer_logs(stack).contains(READY) {
            startup = Some(started.elapsed());
        }
        let row = poller.query_one(&remaining, &[]).expect("polling the jobs");
        let (left, failed): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(
            failed,
            0,
            "Graphile jobs failed: {:?}\n{}",
            row.get::<_, Option<String>>(2),
            peer_logs(stack)
        );
        if left == 0 {
            break;
        }
        for worker in &mut workers {
            worker.check_alive(stack);
        }
        assert!(
            Instant::now() < deadline,
            "the Graphile jobs did not drain\n{}",
            peer_logs(stack)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let pids: Vec<u32> = workers.iter().map(NodeWorker::pid).collect();
    let jobs = jobs as f64;
    let cost = window.close(stack, &mut meter, &pids, jobs);
    drop(workers);
    drop(poller);
    wait_for_sessions_to_exit(&mut meter, DATABASE, &[]);
    let commits = xact_commit(&mut meter, DATABASE) - commits_before - polls;
    let statements = statements.close(stack, DATABASE, jobs);
    DrainRun {
        tasks_per_s: jobs / elapsed.as_secs_f64(),
        startup_ms: startup.map(ms),
        cost,
        xact_commits_per_task: commits as f64 / jobs,
        statements,
    }
}

/// `synapse.observe` for sessions opened from now on (the drain's workers
/// connect after this); `None` for the default, every change an event.
fn set_observe(meter: &mut postgres::Client, observe: Option<&str>) {
    let sql = match observe {
        Some(observe) => format!("ALTER DATABASE synapse SET synapse.observe = '{observe}'"),
        None => "ALTER DATABASE synapse RESET synapse.observe".to_owned(),
    };
    meter.batch_execute(&sql).expect("setting synapse.observe");
}

pub fn section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let runner = install();
    let mut admin = meter(stack);
    wal::install(&mut admin);
    set_notify(stack, &mut admin, None);
    create_database(stack, &mut admin, &runner);
    let tasks = sizes.tasks;
    let config = Config {
        workers: WORKERS,
        concurrency: CONCURRENCY,
        notify: true,
    };
    // Alternated, so all see the machine in the same state. Synapse runs at
    // its default (every change an event) and at its leanest setting.
    let mut synapse = Vec::new();
    let mut lean = Vec::new();
    let mut graphile = Vec::new();
    for _ in 0..runs {
        synapse.push(pre_queued_drain(stack, tasks, &config));
        set_observe(&mut admin, Some("dispatch"));
        lean.push(pre_queued_drain(stack, tasks, &config));
        set_observe(&mut admin, None);
        graphile.push(graphile_drain(stack, &runner, tasks));
    }
    let mut figures = drain_figures(
        &format!(
            "Synapse: pre-queued {tasks} no-op tasks, {}",
            config.label()
        ),
        SYNAPSE_DRAIN,
        "tasks/s",
        &synapse,
        synapse_e2e::DATABASE,
    );
    figures[0].versus.push(Baseline::Graphile);
    figures[0].versus.push(Baseline::DrainRows);
    figures[0].metric = Some(Metric::DrainVsPeer);
    let mut leanest = drain_figures(
        &format!(
            "Synapse, synapse.observe = dispatch: pre-queued {tasks} no-op tasks, {}",
            config.label()
        ),
        SYNAPSE_DRAIN,
        "tasks/s",
        &lean,
        synapse_e2e::DATABASE,
    );
    leanest[0].versus.push(Baseline::Graphile);
    figures.extend(leanest);
    let mut peer = drain_figures(
        &format!(
            "Graphile Worker {VERSION}: pre-queued {tasks} no-op jobs, \
             {WORKERS} processes, concurrency {CONCURRENCY}"
        ),
        "localQueue.size 500, completeJobBatchDelay 0, failJobBatchDelay 0; \
         first process's start → jobs table empty",
        "jobs/s",
        &graphile,
        DATABASE,
    );
    peer[0].is = Some(Baseline::Graphile);
    figures.extend(peer);
    // Where each drain's Postgres time went, side by side.
    for (name, drains) in [
        ("Synapse drain", &synapse),
        ("Synapse drain, observe = dispatch", &lean),
        ("Graphile drain", &graphile),
    ] {
        if let Some(last) = drains.last() {
            figures.extend(statement_figures(name, &last.statements));
        }
    }
    figures
}

//! Throughput of no-op tasks, pre-queued and steady-state, over 1/2 workers ×
//! concurrency 16/64 × `synapse.notify` on/off, with CPU (all processes),
//! commits and WAL bytes per task beside each rate.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use synapse_e2e::{postgres, wait_until, Stack, WorkerProcess};

use crate::cost::{cost_figures, Cost, CostWindow};
use crate::figure::{median, median_of, ms, Baseline, Figure};
use crate::goals::{
    finished_goals, forget_goals, submit_goals, submit_plans, wait_for_goals, GoalsWatch, NOOP,
};
use crate::options::Sizes;
use crate::sessions::{backend_pid, flush_stats, meter, wait_for_sessions_to_exit, xact_commit};
use crate::statements::{StatementUse, StatementWindow};
use crate::wal;
use crate::workers;

/// One point of the throughput matrix.
pub struct Config {
    pub workers: usize,
    pub concurrency: usize,
    pub notify: bool,
}

impl Config {
    pub fn label(&self) -> String {
        format!(
            "{} worker{}, concurrency {}, notify {}",
            self.workers,
            if self.workers == 1 { "" } else { "s" },
            self.concurrency,
            if self.notify { "on" } else { "off" }
        )
    }

    fn start_workers(&self, stack: &Stack) -> Vec<WorkerProcess> {
        workers::start(stack, "throughput", self.workers, self.concurrency)
    }
}

fn pids(workers: &[WorkerProcess]) -> Vec<u32> {
    workers.iter().map(WorkerProcess::pid).collect()
}

/// `synapse.notify` for sessions opened from now on (the event triggers read it
/// in the writing session, so producers and workers must connect afterwards).
pub fn set_notify(stack: &Stack, meter: &mut postgres::Client, notify: Option<bool>) {
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

/// What a Synapse drain's rate measures.
pub const SYNAPSE_DRAIN: &str = "one goal per task; first worker's start → all goals ended";

/// What a pre-queued drain measured (Synapse's or the peer's).
pub struct DrainRun {
    pub tasks_per_s: f64,
    /// From the window's start until the first worker process was ready
    /// (inside the window), ms; None if the drain ended before it was seen.
    pub startup_ms: Option<f64>,
    /// CPU, WAL commit records and WAL bytes per task.
    pub cost: Cost,
    pub xact_commits_per_task: f64,
    /// Where the run's Postgres time went, the costliest statements first.
    pub statements: Vec<StatementUse>,
}

/// When the first worker was ready, over the runs that saw it.
fn startup_note(runs: &[DrainRun]) -> String {
    let seen: Vec<f64> = runs.iter().filter_map(|run| run.startup_ms).collect();
    if seen.is_empty() {
        "the drain ended before a worker was seen ready".into()
    } else {
        format!(
            "first worker ready after {:.0} ms, inside the window",
            median(seen)
        )
    }
}

/// The figures of a drain: the rate first (named `name`, in `unit`, with
/// `what` it measures as its note), then CPU, commits and WAL per task.
/// `database` is the one whose sessions' commits `xact_commit` counts.
pub fn drain_figures(
    name: &str,
    what: &str,
    unit: &'static str,
    runs: &[DrainRun],
    database: &str,
) -> Vec<Figure> {
    let mut cost = cost_figures(name, runs, |run| &run.cost, "").into_iter();
    let mut figures = vec![
        Figure::new(name, median_of(runs, |run| run.tasks_per_s), unit)
            .note(format!("{what}; {}", startup_note(runs))),
    ];
    // The CPU, then the sessions' commits (read-only ones too), then the WAL.
    figures.extend(cost.next());
    figures.push(
        Figure::new(
            format!("{name}: commits/task (xact_commit)"),
            median_of(runs, |run| run.xact_commits_per_task),
            "",
        )
        .note(format!(
            "pg_stat_database '{database}': sessions' commits, read-only ones too, background workers' not"
        )),
    );
    figures.extend(cost);
    figures
}

/// `tasks` single-step no-op goals queued (and forwarded to Redis) with no
/// worker running, then drained by `config`'s workers: from just before the
/// first worker starts until every goal has ended.
pub fn pre_queued_drain(stack: &Stack, tasks: usize, config: &Config) -> DrainRun {
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
    // Opened first: its session must be gone before the commits are counted.
    let statements = StatementWindow::open(stack);
    // Every other session of ours has exited (its statistics are in) and the
    // poller's are flushed: in the window, only its polls are ours.
    let poller_pid = backend_pid(&mut poller);
    wait_for_sessions_to_exit(&mut meter, synapse_e2e::DATABASE, &[poller_pid]);
    flush_stats(&mut poller);
    let commits_before = xact_commit(&mut meter, synapse_e2e::DATABASE);
    let window = CostWindow::open(stack, &mut meter, &[]);
    let started = Instant::now();
    let workers = workers::spawn(stack, "drain", config.workers, config.concurrency);
    workers[0].wait_started();
    let startup = started.elapsed();
    for worker in &workers[1..] {
        worker.wait_started();
    }
    let mut polls = 0;
    let mut watch = GoalsWatch::new(ids);
    wait_until("the queue to drain", Duration::from_secs(3600), || {
        polls += 1;
        watch.all_finished(&mut poller).then_some(())
    });
    let elapsed = started.elapsed();
    let tasks = tasks as f64;
    let cost = window.close(stack, &mut meter, &pids(&workers), tasks);
    drop(workers);
    drop(poller);
    wait_for_sessions_to_exit(&mut meter, synapse_e2e::DATABASE, &[]);
    let commits = xact_commit(&mut meter, synapse_e2e::DATABASE) - commits_before - polls;
    let statements = statements.close(stack, synapse_e2e::DATABASE, tasks);
    DrainRun {
        tasks_per_s: tasks / elapsed.as_secs_f64(),
        startup_ms: Some(ms(startup)),
        cost,
        xact_commits_per_task: commits as f64 / tasks,
        statements,
    }
}

/// What a steady-state window measured.
struct SteadyRun {
    tasks_per_s: f64,
    cost: Cost,
    /// The producer's looks at its backlog, ms each.
    looks: Vec<f64>,
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
            // The backlog is taken as the goals from the first still running
            // to the last submitted (goals end roughly in id order, so it is
            // a close upper bound), and each look reads only the goals that
            // ended since the last. A count of the unfinished tasks walked
            // every stale index entry of the tasks ended since the table was
            // last vacuumed: 6–13 ms a look in most runs, at up to 100 looks a
            // second most of a core taken from the workers it measures.
            let first_unfinished = client
                .prepare(
                    "SELECT min(id) FROM synapse.goals WHERE id BETWEEN $1 AND $2 AND finished_at IS NULL",
                )
                .unwrap();
            let (mut first, mut last) = (0_i64, -1_i64);
            let mut looks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if last >= first {
                    let look = Instant::now();
                    let found: Option<i64> = client
                        .query_one(&first_unfinished, &[&first, &last])
                        .unwrap()
                        .get(0);
                    first = found.unwrap_or(last + 1);
                    looks.push(ms(look.elapsed()));
                }
                if last - first + 1 < backlog {
                    // A batch as a producer of batches submits it: one call.
                    last = submit_plans(&mut client, NOOP, batch);
                } else {
                    // Polled (with notify off, nothing announces completions),
                    // not so often that the look takes the workers' CPU: the
                    // backlog lasts a few hundred milliseconds.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            looks
        });
        let stopper = StopOnDrop(&stop);
        // The warm-up and the window are durations, not waits for a condition.
        std::thread::sleep(sizes.warm_up);
        let window = CostWindow::open(stack, &mut meter, &pids(&workers));
        let started = Instant::now();
        let before = finished_goals(&mut observer);
        std::thread::sleep(sizes.window);
        let elapsed = started.elapsed();
        let done = finished_goals(&mut observer) - before;
        let cost = window.close(stack, &mut meter, &pids(&workers), done.max(1) as f64);
        drop(stopper);
        let looks = producer.join().unwrap();
        assert!(done > 0, "no goal finished in the window");
        SteadyRun {
            tasks_per_s: done as f64 / elapsed.as_secs_f64(),
            cost,
            looks,
        }
    });
    // Leave nothing queued for the next run's workers.
    wait_for_goals(&mut observer, (0, i64::MAX), Duration::from_secs(600));
    drop(workers);
    run
}

pub fn section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let mut admin = meter(stack);
    wal::install(&mut admin);
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
        let mut drain = drain_figures(
            &format!("pre-queued {tasks} no-op tasks, {label}"),
            SYNAPSE_DRAIN,
            "tasks/s",
            &drains,
            synapse_e2e::DATABASE,
        );
        drain[0].versus.push(Baseline::PgLifecycle);
        figures.extend(drain);

        let steady: Vec<SteadyRun> = (0..runs)
            .map(|_| steady_state(stack, &config, sizes))
            .collect();
        let name = format!("steady state, {label}");
        let mut rate = Figure::new(
            name.clone(),
            median_of(&steady, |run| run.tasks_per_s),
            "tasks/s",
        )
        .note(format!(
            "goals ended over {:.1} s after {:.1} s warm-up; a producer submitting batches of {} (submit_plans), \
             looking at its backlog in {:.2} ms (p50; max {:.1})",
            sizes.window.as_secs_f64(),
            sizes.warm_up.as_secs_f64(),
            sizes.steady_batch,
            median_of(&steady, |run| median(run.looks.clone())),
            steady
                .iter()
                .flat_map(|run| run.looks.iter().copied())
                .fold(0.0, f64::max),
        ))
        .versus(Baseline::PgLifecycle);
        if (workers, concurrency, notify) == (2, 64, true) {
            rate = rate.metric(crate::targets::Metric::Steady);
        }
        figures.push(rate);
        figures.extend(cost_figures(
            &name,
            &steady,
            |run| &run.cost,
            "; the producer's included",
        ));
    }
    set_notify(stack, &mut admin, None);
    forget_goals(&mut stack.pg());
    figures
}

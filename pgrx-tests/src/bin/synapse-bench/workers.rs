//! The benchmark's Synapse workers: logging at info, as a deployment would
//! (the test harness's debug level writes a line per task).
use synapse_e2e::{Stack, WorkerProcess};

/// RUST_LOG of the benchmark's workers.
const LOG: &str = "info";

/// Starts `count` workers with `concurrency` each, all at once, and waits
/// until every one has started.
pub fn start(stack: &Stack, name: &str, count: usize, concurrency: usize) -> Vec<WorkerProcess> {
    let workers = spawn(stack, name, count, concurrency);
    for worker in &workers {
        worker.wait_started();
    }
    workers
}

/// Starts `count` workers with `concurrency` each, all at once, without
/// waiting for them (see [`WorkerProcess::wait_started`]).
pub fn spawn(stack: &Stack, name: &str, count: usize, concurrency: usize) -> Vec<WorkerProcess> {
    let concurrency = concurrency.to_string();
    (0..count)
        .map(|i| {
            stack.spawn_worker(
                &format!("{name}-{i}"),
                &["--concurrency", &concurrency],
                LOG,
            )
        })
        .collect()
}

/// One worker with `concurrency`, started.
pub fn start_one(stack: &Stack, name: &str, concurrency: usize) -> WorkerProcess {
    start(stack, name, 1, concurrency)
        .pop()
        .expect("one worker")
}

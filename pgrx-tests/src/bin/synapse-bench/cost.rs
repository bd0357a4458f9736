//! What a run cost beside its rate: CPU of every process, WAL commit records
//! and WAL bytes, per task, and how busy the machine's cores were over it
//! (whether the rate was bound by the CPU or by waits).
use std::time::{Duration, Instant};

use synapse_e2e::{postgres, Stack};

use crate::cpu::{CpuUse, CpuWindow};
use crate::figure::{median_of, Figure};
use crate::wal::WalWindow;

/// A run's cost, per task.
pub struct Cost {
    pub cpu_us_per_task: CpuUse,
    pub wal_commits_per_task: f64,
    pub wal_bytes_per_task: f64,
    /// CPU of every process ÷ (wall time × cores), in %.
    pub busy_percent: f64,
}

/// A measurement window over the CPU and the WAL.
pub struct CostWindow {
    cpu: CpuWindow,
    wal: WalWindow,
    started: Instant,
}

impl CostWindow {
    /// `meter` is a connection with pg_walinspect (see [`crate::wal::install`]);
    /// `workers` the worker processes already running.
    pub fn open(stack: &Stack, meter: &mut postgres::Client, workers: &[u32]) -> CostWindow {
        let wal = WalWindow::open(meter);
        CostWindow {
            cpu: CpuWindow::open(stack, workers),
            wal,
            started: Instant::now(),
        }
    }

    /// Closes the window over `tasks` tasks; `workers` are every worker
    /// process of the window, still running.
    pub fn close(
        self,
        stack: &Stack,
        meter: &mut postgres::Client,
        workers: &[u32],
        tasks: f64,
    ) -> Cost {
        let wall = self.started.elapsed();
        let cpu = self.cpu.close(stack, workers);
        let wal = self.wal.close(meter);
        Cost {
            cpu_us_per_task: cpu.per_task_us(tasks),
            wal_commits_per_task: wal.commits as f64 / tasks,
            wal_bytes_per_task: wal.bytes as f64 / tasks,
            busy_percent: busy_percent(cpu.total(), wall),
        }
    }
}

/// `cpu_seconds` over `wall` on all of the machine's cores, in %.
fn busy_percent(cpu_seconds: f64, wall: Duration) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    100.0 * cpu_seconds / (wall.as_secs_f64() * cores)
}

/// `run`, measured: its result and its cost over `tasks` tasks.
pub fn measured<T>(
    stack: &Stack,
    meter: &mut postgres::Client,
    workers: &[u32],
    tasks: usize,
    run: impl FnOnce() -> T,
) -> (T, Cost) {
    let window = CostWindow::open(stack, meter, workers);
    let result = run();
    (result, window.close(stack, meter, workers, tasks as f64))
}

/// The figures of the costs of `runs` (each its `cost`), to follow the rate
/// named `name`; `whose` says what else the window counted.
pub fn cost_figures<T>(
    name: &str,
    runs: &[T],
    cost: impl Fn(&T) -> &Cost,
    whose: &str,
) -> Vec<Figure> {
    let median = |field: fn(&Cost) -> f64| median_of(runs, |run| field(cost(run)));
    let cpu = |side: fn(&CpuUse) -> f64| median_of(runs, |run| side(&cost(run).cpu_us_per_task));
    vec![
        Figure::new(
            format!("{name}: CPU/task, all processes"),
            cpu(CpuUse::total),
            "µs",
        )
        .note(format!(
            "postgres {:.0}, workers {:.0}, redis {:.0} µs; the cores {:.0} % busy; /proc utime+stime over the window{whose}",
            cpu(|c| c.postgres),
            cpu(|c| c.workers),
            cpu(|c| c.redis),
            median(|cost| cost.busy_percent),
        )),
        Figure::new(
            format!("{name}: WAL commit records/task"),
            median(|cost| cost.wal_commits_per_task),
            "",
        )
        .note(format!("pg_walinspect over the window{whose}")),
        Figure::new(
            format!("{name}: WAL bytes/task"),
            median(|cost| cost.wal_bytes_per_task),
            "B",
        )
        .note("pg_wal_lsn_diff over the window"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_cpu_over_wall_on_every_core() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let percent = busy_percent(cores * 0.5, Duration::from_secs(2));
        assert!((percent - 25.0).abs() < 1e-9, "{percent}");
    }
}

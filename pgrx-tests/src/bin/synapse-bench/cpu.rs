//! CPU time (user + system, from /proc) of every process of a run over a
//! measurement window: the postmaster and all its children, Redis, and the
//! worker processes. A process started in the window counts from zero; a
//! Postgres child that exits in it is counted through the postmaster's times
//! of its reaped children; workers are read before they are stopped.
use std::collections::HashMap;

use synapse_e2e::Stack;

/// Clock ticks per second of /proc's times (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// utime, stime, cutime and cstime of a live process, in seconds.
fn times(pid: u32) -> Option<[f64; 4]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the parenthesised command name start at the state
    // (field 3 of proc(5)); utime to cstime are fields 14 to 17.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let mut seconds = [0.0; 4];
    for (i, value) in seconds.iter_mut().enumerate() {
        *value = fields.get(11 + i)?.parse::<f64>().ok()? / TICKS_PER_SECOND;
    }
    Some(seconds)
}

/// CPU seconds a process has used so far (0 once it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    times(pid).map_or(0.0, |t| t[0] + t[1])
}

/// What the postmaster and its children have used so far: the postmaster's
/// own time and its reaped children's, and each live child's own.
struct PostgresTimes {
    postmaster: f64,
    children: HashMap<u32, f64>,
}

fn postgres_times(stack: &Stack) -> PostgresTimes {
    let mut pids = stack.postgres_pids().into_iter();
    let postmaster = pids.next().and_then(times).map_or(0.0, |t| t.iter().sum());
    PostgresTimes {
        postmaster,
        children: pids.map(|pid| (pid, cpu_seconds(pid))).collect(),
    }
}

pub fn redis_pid(stack: &Stack) -> Option<u32> {
    std::fs::read_to_string(stack.path("redis/redis.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// CPU seconds used in a window, by side.
#[derive(Clone, Copy, Default)]
pub struct CpuUse {
    pub postgres: f64,
    pub redis: f64,
    pub workers: f64,
}

impl CpuUse {
    pub fn total(&self) -> f64 {
        self.postgres + self.redis + self.workers
    }

    /// Each side in µs per `tasks`.
    pub fn per_task_us(&self, tasks: f64) -> CpuUse {
        let scale = 1e6 / tasks;
        CpuUse {
            postgres: self.postgres * scale,
            redis: self.redis * scale,
            workers: self.workers * scale,
        }
    }
}

pub struct CpuWindow {
    postgres: PostgresTimes,
    redis: f64,
    workers: HashMap<u32, f64>,
}

impl CpuWindow {
    /// Opens the window; `workers` are the worker processes already running
    /// (those started later count from zero).
    pub fn open(stack: &Stack, workers: &[u32]) -> CpuWindow {
        CpuWindow {
            postgres: postgres_times(stack),
            redis: redis_pid(stack).map_or(0.0, cpu_seconds),
            workers: workers.iter().map(|&pid| (pid, cpu_seconds(pid))).collect(),
        }
    }

    /// Closes the window; `workers` are every worker process of the window,
    /// still running.
    pub fn close(self, stack: &Stack, workers: &[u32]) -> CpuUse {
        let now = postgres_times(stack);
        let before = &self.postgres.children;
        // A child gone since the start is in the postmaster's reaped-children
        // time with its whole life: take off what it had used before the window.
        let gone: f64 = before
            .iter()
            .filter(|(pid, _)| !now.children.contains_key(pid))
            .map(|(_, used)| used)
            .sum();
        let children: f64 = now
            .children
            .iter()
            .map(|(pid, used)| used - before.get(pid).copied().unwrap_or(0.0))
            .sum();
        let workers = workers
            .iter()
            .map(|&pid| cpu_seconds(pid) - self.workers.get(&pid).copied().unwrap_or(0.0))
            .sum();
        CpuUse {
            postgres: now.postmaster - self.postgres.postmaster + children - gone,
            redis: redis_pid(stack).map_or(0.0, cpu_seconds) - self.redis,
            workers,
        }
    }
}

//! A printed figure, the baselines figures are compared with, and the
//! statistics that turn runs into one value.
use std::time::{Duration, SystemTime};

use crate::targets::Metric;

/// A measured value other figures are compared with.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Baseline {
    /// Tasks/s of the pgbench minimal task lifecycle.
    PgLifecycle,
    /// p50 of a Redis PING round trip, ms.
    RedisRoundTrip,
    /// p50 of commit → handler start, serial single tasks, ms.
    SerialLatency,
    /// Jobs/s of Graphile Worker draining the pre-queued no-op jobs.
    Graphile,
    /// p50 of Graphile Worker's first `add_job` on a new connection, ms.
    GraphileFirstAdd,
    /// Graphile Worker's `add_jobs` of many no-op jobs, ms per job.
    GraphileBulkAdd,
    /// Tasks/s of pgbench writing only the rows a drained one-step goal writes.
    DrainRows,
}

impl Baseline {
    pub fn label(self) -> &'static str {
        match self {
            Baseline::PgLifecycle => "pgbench lifecycle",
            Baseline::RedisRoundTrip => "Redis PING RTT",
            Baseline::SerialLatency => "single task p50",
            Baseline::Graphile => "Graphile",
            Baseline::GraphileFirstAdd => "Graphile's first add_job",
            Baseline::GraphileBulkAdd => "Graphile's add_jobs",
            Baseline::DrainRows => "its rows alone",
        }
    }
}

/// One printed figure.
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub note: String,
    /// Shown as value ÷ baseline for each baseline measured in this run.
    pub versus: Vec<Baseline>,
    /// The figure is that baseline.
    pub is: Option<Baseline>,
    /// The issue target the figure is measured for.
    pub metric: Option<Metric>,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            note: String::new(),
            versus: Vec::new(),
            is: None,
            metric: None,
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    pub fn versus(mut self, baseline: Baseline) -> Figure {
        self.versus.push(baseline);
        self
    }

    pub fn is(mut self, baseline: Baseline) -> Figure {
        self.is = Some(baseline);
        self
    }

    pub fn metric(mut self, metric: Metric) -> Figure {
        self.metric = Some(metric);
        self
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median over runs of one field of each run's result.
pub fn median_of<T>(runs: &[T], field: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(field).collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// p50, p90, p99 and max of latencies (ms), each the median over the runs.
pub fn latency_figures(name: &str, runs: Vec<Vec<f64>>, note: &str) -> Vec<Figure> {
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

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `later - earlier` in ms, 0 when `later` is not later (clocks of one host).
pub fn ms_between(earlier: SystemTime, later: SystemTime) -> f64 {
    ms(later.duration_since(earlier).unwrap_or_default())
}

/// `value` with up to `digits` significant digits: small values (a round trip
/// in ms) stay readable, large ones carry no noise.
pub fn formatted(value: f64, digits: i32) -> String {
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

//! Issue 11's targets: the figure each is measured by, its milestone and its
//! goal, and whether this run meets them.
use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::figure::{formatted, Baseline, Figure};

/// What a figure measures for a target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Metric {
    /// Synapse's pre-queued drain, 2 workers × 64, beside Graphile's.
    DrainVsPeer,
    /// A chain step beside a single task's commit → handler start.
    ChainVsSingle,
    FanOut,
    JoinStart,
    /// Commit → handler start at 1 000 tasks/s, p50 and p99.
    CommitToStartP50,
    CommitToStartP99,
    FirstSubmit,
    BulkSubmit,
    Steady,
    IdleStatements,
    IdleRedisCommands,
}

#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
    /// At least the rate of Synapse's flat drain measured in the same run.
    FlatDrain,
}

struct Target {
    metric: Metric,
    label: &'static str,
    unit: &'static str,
    /// Measured as the figure's value ÷ this baseline.
    ratio_to: Option<Baseline>,
    milestone: Bound,
    goal: Option<Bound>,
}

/// The table.
const TARGETS: &[Target] = &[
    Target {
        metric: Metric::DrainVsPeer,
        label: "drain of pre-queued single-step goals, 2 workers × 64, ÷ Graphile",
        unit: "×",
        ratio_to: Some(Baseline::Graphile),
        milestone: Bound::AtLeast(0.5),
        goal: Some(Bound::AtLeast(1.0)),
    },
    Target {
        metric: Metric::ChainVsSingle,
        label: "chain step ÷ single-task latency",
        unit: "×",
        ratio_to: Some(Baseline::SerialLatency),
        milestone: Bound::AtMost(1.5),
        goal: Some(Bound::AtMost(1.0)),
    },
    Target {
        metric: Metric::FanOut,
        label: "fan-out 1 → W → 1, 2 workers",
        unit: "tasks/s",
        ratio_to: None,
        milestone: Bound::AtLeast(5_000.0),
        goal: Some(Bound::FlatDrain),
    },
    Target {
        metric: Metric::JoinStart,
        label: "join start after its last parent",
        unit: "ms",
        ratio_to: None,
        milestone: Bound::AtMost(2.0),
        goal: Some(Bound::AtMost(1.0)),
    },
    Target {
        metric: Metric::CommitToStartP50,
        label: "commit → handler start p50, 1 000/s",
        unit: "ms",
        ratio_to: None,
        milestone: Bound::AtMost(0.7),
        goal: Some(Bound::AtMost(0.3)),
    },
    Target {
        metric: Metric::CommitToStartP99,
        label: "commit → handler start p99, 1 000/s",
        unit: "ms",
        ratio_to: None,
        milestone: Bound::AtMost(3.0),
        goal: Some(Bound::AtMost(1.0)),
    },
    Target {
        metric: Metric::FirstSubmit,
        label: "first submit_plan on a new connection (p50)",
        unit: "ms",
        ratio_to: None,
        milestone: Bound::AtMost(2.0),
        goal: Some(Bound::AtMost(0.5)),
    },
    Target {
        metric: Metric::BulkSubmit,
        label: "1-step submit_plan in bulk, per goal",
        unit: "ms",
        ratio_to: None,
        milestone: Bound::AtMost(0.15),
        goal: Some(Bound::AtMost(0.05)),
    },
    Target {
        metric: Metric::Steady,
        label: "steady state, 2 workers × 64 (2× 2 800/s)",
        unit: "tasks/s",
        ratio_to: None,
        milestone: Bound::AtLeast(5_600.0),
        goal: None,
    },
    Target {
        metric: Metric::IdleStatements,
        label: "idle: SQL statements",
        unit: "",
        ratio_to: None,
        milestone: Bound::AtMost(0.0),
        goal: Some(Bound::AtMost(0.0)),
    },
    Target {
        metric: Metric::IdleRedisCommands,
        label: "idle: Redis commands",
        unit: "",
        ratio_to: None,
        milestone: Bound::AtMost(0.0),
        goal: Some(Bound::AtMost(0.0)),
    },
];

impl Bound {
    /// The bound's threshold, if this run measured what it needs.
    fn threshold(self, flat_drain: Option<f64>) -> Option<(&'static str, f64)> {
        match self {
            Bound::AtLeast(x) => Some(("≥", x)),
            Bound::AtMost(x) => Some(("≤", x)),
            Bound::FlatDrain => flat_drain.map(|rate| ("≥", rate)),
        }
    }

    fn text(self, unit: &str, flat_drain: Option<f64>) -> String {
        match (self, self.threshold(flat_drain)) {
            (Bound::FlatDrain, Some((_, rate))) => format!("≥ drain {}", formatted(rate, 4)),
            (Bound::FlatDrain, None) => "as a flat drain".into(),
            (_, Some((sign, x))) => format!("{sign} {}{}", formatted(x, 3), short(unit)),
            (_, None) => unreachable!("fixed bounds have a threshold"),
        }
    }

    fn met(self, value: f64, flat_drain: Option<f64>) -> Option<bool> {
        let (sign, x) = self.threshold(flat_drain)?;
        Some(if sign == "≥" {
            value >= x
        } else {
            value <= x
        })
    }
}

/// Units as printed after a number in the narrow columns.
fn short(unit: &str) -> String {
    match unit {
        "" => String::new(),
        "×" => "×".into(),
        "tasks/s" => "/s".into(),
        other => format!(" {other}"),
    }
}

fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "",
    }
}

/// Prints the targets table for `figures`; returns it as JSON.
pub fn print(figures: &[&Figure], baselines: &BTreeMap<Baseline, f64>, quick: bool) -> Value {
    let find = |metric: Metric| figures.iter().find(|figure| figure.metric == Some(metric));
    let flat_drain = find(Metric::DrainVsPeer).map(|figure| figure.value);
    let width = TARGETS
        .iter()
        .map(|t| t.label.chars().count())
        .max()
        .unwrap_or(0);
    println!();
    println!(
        "issue 11 targets{}",
        if quick {
            " (quick run: tiny sizes, not comparable with the targets)"
        } else {
            ""
        }
    );
    println!(
        "{:<width$} {:>14}  {:>14} {:<8} {:>16} {:<8}",
        "figure", "measured", "milestone", "", "goal", ""
    );
    let mut rows = Vec::new();
    for target in TARGETS {
        let figure = find(target.metric);
        let measured = figure.and_then(|figure| match target.ratio_to {
            None => Some(figure.value),
            Some(baseline) => baselines
                .get(&baseline)
                .filter(|&&base| base > 0.0)
                .map(|base| figure.value / base),
        });
        let milestone = target.milestone.text(target.unit, flat_drain);
        let goal = target
            .goal
            .map(|goal| goal.text(target.unit, flat_drain))
            .unwrap_or_default();
        let milestone_met = measured.and_then(|v| target.milestone.met(v, flat_drain));
        let goal_met = measured.and_then(|v| target.goal?.met(v, flat_drain));
        let measured_text = match (figure, measured) {
            (None, _) => "not run".to_owned(),
            (Some(_), None) => "no baseline".to_owned(),
            (Some(_), Some(value)) => format!("{}{}", formatted(value, 3), short(target.unit)),
        };
        println!(
            "{:<width$} {:>14}  {:>14} {:<8} {:>16} {:<8}",
            target.label,
            measured_text,
            milestone,
            yes_no(milestone_met),
            goal,
            yes_no(goal_met),
        );
        rows.push(json!({
            "target": target.label,
            "figure": figure.map(|figure| figure.name.clone()),
            "measured": measured,
            "unit": target.unit,
            "milestone": milestone,
            "milestone_met": milestone_met,
            "goal": goal,
            "goal_met": goal_met,
        }));
    }
    Value::Array(rows)
}

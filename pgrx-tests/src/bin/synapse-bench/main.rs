//! `make bench`: measures the pipeline on an isolated stack (its own Postgres
//! cluster and Redis, release builds) and prints a table; `--json FILE` also
//! writes the figures. Each figure is the median of `--runs` runs.
//!
//! Sections, in the order they run (one module each):
//! - `latency`: a batch's forwarding, submit → BRPOP, the M3 goal, and
//!   commit → handler start, serially and open-loop at 100/s and 1000/s.
//! - `submit`: the first `submit_plan` on a new connection, and 1-step goals
//!   submitted in bulk (ms per goal; `submit_plan` calls in one statement,
//!   and one `submit_plans` call), each beside the same measure of
//!   Graphile Worker's `add_job` / `add_jobs` (installed as for `peer`).
//! - `dag`: a chain (as a ratio to a single task's latency), a 1 → W → 1
//!   fan-out/fan-in on two workers (with its join-start delay) and a
//!   transaction of diamonds.
//! - `throughput`: no-op tasks, pre-queued and steady-state, over 1/2 workers ×
//!   concurrency 16/64 × `synapse.notify` on/off, with CPU (all processes),
//!   commits and WAL bytes per task.
//! - `peer`: the same pre-queued drain, side by side, by Synapse (2 workers ×
//!   64) and by Graphile Worker 0.17.3 in its batched configuration (2
//!   processes × 64), on the same cluster; Synapse's rate as a ratio to
//!   Graphile's.
//! - `limits`: ceilings of the same Postgres and Redis: a pgbench minimal task
//!   lifecycle, redis-benchmark LPUSH/RPOP/BRPOP, a Redis PING round trip.
//!   Throughput figures are also shown as a ratio to the pgbench lifecycle,
//!   submit → BRPOP to the PING round trip (ratios need both sections in the
//!   run).
//! - `idle`: two workers left alone: SQL statements, Redis commands, WAL
//!   bytes, CPU seconds per process.
//!
//! The report ends with issue 11's targets: each figure measured in the run
//! beside its milestone and goal.
//!
//! Flags:
//! - `--quick`: tiny sizes (for `make bench-smoke`); the throughput matrix
//!   shrinks to two of its corners.
//! - `--runs N`: runs per figure (default 3).
//! - `--tasks N`: tasks per pre-queued drain (default 100 000; quick 300).
//! - `--width N`: fan-out width (default 2000; quick 100).
//! - `--only SECTION[,SECTION...]`: run only these sections.
//! - `--json FILE`: also write every figure there.
mod cost;
mod cpu;
mod dag;
mod figure;
mod goals;
mod idle;
mod latency;
mod limits;
mod options;
mod peer;
mod report;
mod sessions;
mod statements;
mod submit;
mod targets;
mod throughput;
mod wal;
mod workers;

use figure::Figure;
use options::{Options, Section, Sizes};
use synapse_e2e::Stack;

/// The Postgres settings of the benchmark's cluster, the same for Synapse and
/// its peer: what a user would tune (the defaults are 128MB and 1GB), and a
/// sweep that cannot re-dispatch a pre-queued backlog while it drains.
const SETTINGS: &[&str] = &[
    "shared_buffers = '1GB'",
    "max_wal_size = '4GB'",
    "synapse.sweep_interval = '1h'",
];

fn main() {
    let options = Options::parse();
    let sizes = Sizes::new(&options);
    let runs = options.runs;
    let stack = Stack::start("bench", SETTINGS);
    let mut figures: Vec<(Section, Figure)> = Vec::new();
    for section in Section::ALL {
        if !options.only.contains(&section) {
            continue;
        }
        eprintln!("bench: {} …", section.name());
        let measured = match section {
            Section::Latency => latency::section(&stack, &sizes, runs),
            Section::Submit => submit::section(&stack, &sizes, runs),
            Section::Dag => dag::section(&stack, &sizes, runs),
            Section::Throughput => throughput::section(&stack, &sizes, runs),
            Section::Peer => peer::section(&stack, &sizes, runs),
            Section::Limits => limits::section(&stack, &sizes, runs),
            Section::Idle => idle::section(&stack, &sizes),
        };
        figures.extend(measured.into_iter().map(|figure| (section, figure)));
    }
    report::print(&figures, &options, SETTINGS);
}

//! The command line: which sections run, and the sizes and durations each
//! mode measures with.
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Section {
    Latency,
    Submit,
    Dag,
    Throughput,
    Peer,
    Limits,
    Idle,
}

impl Section {
    /// Every section, in the order they run.
    pub const ALL: [Section; 7] = [
        Section::Latency,
        Section::Submit,
        Section::Dag,
        Section::Throughput,
        Section::Peer,
        Section::Limits,
        Section::Idle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::Latency => "latency",
            Section::Submit => "submit",
            Section::Dag => "dag",
            Section::Throughput => "throughput",
            Section::Peer => "peer",
            Section::Limits => "limits",
            Section::Idle => "idle",
        }
    }
}

const USAGE: &str = "use --quick, --runs N, --tasks N, --width N, \
    --only latency|submit|dag|throughput|peer|limits|idle[,...], --json FILE";

pub struct Options {
    pub runs: usize,
    pub quick: bool,
    pub json: Option<String>,
    width: Option<usize>,
    tasks: Option<usize>,
    pub only: Vec<Section>,
}

fn number(value: Option<String>, flag: &str) -> usize {
    value
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| panic!("{flag} needs a positive number ({USAGE})"))
}

impl Options {
    pub fn parse() -> Options {
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
}

/// Sizes and durations of one mode.
pub struct Sizes {
    pub batch: usize,
    pub samples: usize,
    pub width: usize,
    pub chain: usize,
    pub diamonds: usize,
    /// Instances of the map step.
    pub map: usize,
    pub tasks: usize,
    /// Fresh connections, each timing its first `submit_plan`.
    pub connections: usize,
    /// Goals of one bulk `submit_plan` statement.
    pub bulk: usize,
    /// (workers, concurrency, notify) of the throughput matrix.
    pub matrix: Vec<(usize, usize, bool)>,
    /// Goals per producer transaction in the steady state.
    pub steady_batch: usize,
    pub warm_up: Duration,
    pub window: Duration,
    pub open_loop: Duration,
    pub idle: Duration,
    pub pgbench: Duration,
    pub redis_requests: usize,
    pub pings: usize,
}

impl Sizes {
    pub fn new(options: &Options) -> Sizes {
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
                map: 300,
                tasks: 300,
                connections: 5,
                bulk: 300,
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
                width: 2_000,
                chain: 500,
                diamonds: 1_000,
                map: 10_000,
                tasks: 100_000,
                connections: 50,
                bulk: 10_000,
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

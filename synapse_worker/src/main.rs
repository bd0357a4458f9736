//! `synapse-worker`: runs Synapse workers, and submits and inspects goals.
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use synapse_worker::actions::{ActionRegistry, ResultLimit};
use synapse_worker::{Worker, WorkerConfig};

mod client;

/// Exit code for bad configuration (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a goal did not succeed (or a blueprint is invalid).
const EXIT_GOAL_FAILED: u8 = 1;

#[derive(Parser)]
#[command(
    name = "synapse-worker",
    version,
    about = "Synapse worker and command-line client"
)]
struct Cli {
    /// Postgres with the synapse extension.
    #[arg(
        long,
        env = "SYNAPSE_DATABASE_URL",
        global = true,
        default_value = "postgresql://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker: plan goals and execute tasks until SIGTERM/SIGINT.
    #[command(
        after_help = "Example:\n  synapse-worker run --queues critical,default --concurrency 32"
    )]
    Run(RunArgs),
    /// Submit a goal; with --wait, wait for it to end (exit 0 succeeded, 1 otherwise).
    #[command(
        after_help = "Example:\n  synapse-worker submit 'triage incident 42' --input '{\"source\":\"pager\"}' --wait"
    )]
    Submit {
        /// The goal text.
        goal: String,
        /// Goal input (JSON).
        #[arg(long, default_value = "{}")]
        input: String,
        /// Planner name.
        #[arg(long, default_value = "template")]
        planner: String,
        /// Wait until the goal ends and print its status.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (exit 1).
        #[arg(long, value_parser = parse_duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// Print a goal's status as JSON.
    #[command(after_help = "Example:\n  synapse-worker status 42")]
    Status {
        /// Goal id.
        id: i64,
    },
    /// Live view of a goal, redrawn as its events arrive; exits when it ends (0 succeeded, 1 otherwise).
    #[command(after_help = "Example:\n  synapse-worker watch 42")]
    Watch {
        /// Goal id.
        id: i64,
    },
    /// Print a goal's DAG as Mermaid or Graphviz DOT, or render it to SVG.
    #[command(
        after_help = "Examples:\n  synapse-worker graph 42\n  synapse-worker graph 42 --format dot\n  synapse-worker graph 42 --output goal-42.svg   (needs Graphviz)"
    )]
    Graph {
        /// Goal id.
        id: i64,
        /// Output format.
        #[arg(long, default_value = "mermaid", value_parser = ["mermaid", "dot"])]
        format: String,
        /// Render to this SVG file with Graphviz instead of printing.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Check a blueprint file and list every problem with its JSON path.
    #[command(after_help = "Example:\n  synapse-worker validate plan.json")]
    Validate {
        /// Blueprint JSON file.
        file: std::path::PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Redis the extension forwards events to.
    #[arg(
        long,
        env = "SYNAPSE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    redis_url: String,
    /// Prefix of every Redis key (the extension's synapse.key_prefix).
    #[arg(long, env = "SYNAPSE_KEY_PREFIX", default_value = "synapse")]
    key_prefix: String,
    /// Queues to consume, highest priority first.
    #[arg(
        long,
        env = "SYNAPSE_QUEUES",
        default_value = "default",
        value_delimiter = ','
    )]
    queues: Vec<String>,
    /// Most tasks running at once.
    #[arg(long, env = "SYNAPSE_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// Lease on a claimed task; renewed every third of it.
    #[arg(long, env = "SYNAPSE_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Time running tasks get to finish at shutdown before they are released.
    #[arg(long, env = "SYNAPSE_GRACE", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "SYNAPSE_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Programs the exec action may run (comma list, exactly as blueprints name them).
    #[arg(long, env = "SYNAPSE_ALLOW_EXEC", value_delimiter = ',')]
    allow_exec: Vec<String>,
    /// Largest result a step may produce, as JSON (bytes, or e.g. 64KiB, 1MiB); beyond it the step fails.
    #[arg(long, env = "SYNAPSE_MAX_RESULT_SIZE", default_value = "1MiB", value_parser = ResultLimit::parse)]
    max_result_size: ResultLimit,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    synapse_worker::blueprint::parse_duration(text)
}

fn config(database_url: String, args: RunArgs) -> anyhow::Result<(WorkerConfig, ResultLimit)> {
    if let Some(bad) = args
        .queues
        .iter()
        .find(|name| !synapse_worker::blueprint::is_valid_queue(name))
    {
        bail!("--queues: invalid queue name {bad:?}");
    }
    if args.concurrency == 0 || args.concurrency > 10_000 {
        bail!("--concurrency must be between 1 and 10000");
    }
    if args.lease < Duration::from_secs(1) {
        bail!("--lease must be at least 1s");
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    let config = WorkerConfig {
        database_url,
        redis_url: args.redis_url,
        key_prefix: args.key_prefix,
        queues: args.queues,
        concurrency: args.concurrency,
        lease: args.lease,
        grace: args.grace,
        identity: format!("{host}:{}", std::process::id()),
        allow_exec: args.allow_exec,
        metrics_addr: args.metrics_addr,
    };
    Ok((config, args.max_result_size))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Before anything can wait on Postgres or Redis: every wait is cancellable.
        let stop = match stop_signal() {
            Ok(stop) => stop,
            Err(error) => {
                eprintln!("error: cannot listen for SIGTERM and SIGINT: {error}");
                return ExitCode::FAILURE;
            }
        };
        let url = cli.database_url;
        match cli.command {
            Command::Run(args) => {
                let worker = config(url, args).and_then(|(config, limit)| {
                    Worker::with_result_limit(config, ActionRegistry::new(), limit)
                });
                match worker {
                    Ok(worker) => report(run(worker, stop).await),
                    Err(error) => {
                        eprintln!("error: {error:#}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            }
            Command::Submit {
                goal,
                input,
                planner,
                wait,
                timeout,
            } => {
                let submit = client::submit(&url, &goal, &input, &planner, wait, timeout);
                interruptible(submit, stop).await
            }
            Command::Status { id } => interruptible(client::status(&url, id), stop).await,
            Command::Watch { id } => interruptible(client::watch(&url, id), stop).await,
            Command::Graph { id, format, output } => {
                let graph = client::graph(&url, id, &format, output.as_deref());
                interruptible(graph, stop).await
            }
            Command::Validate { file } => interruptible(client::validate(&url, &file), stop).await,
        }
    })
}

/// Runs a client command until it ends or a signal stops it (exit 128 + the
/// signal's number, as shells report a process the signal killed).
async fn interruptible(
    command: impl Future<Output = client::Outcome>,
    stop: impl Future<Output = Stop>,
) -> ExitCode {
    tokio::select! {
        outcome = command => exit(outcome),
        signal = stop => {
            eprintln!("interrupted by {}", signal.name);
            ExitCode::from(128 + signal.number)
        }
    }
}

/// The signal that asked the process to stop.
struct Stop {
    name: &'static str,
    number: u8,
}

/// Resolves at the first SIGTERM or SIGINT. The handlers are installed when
/// this is called, not when it is first polled, so no signal slips by.
fn stop_signal() -> std::io::Result<impl Future<Output = Stop>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => Stop { name: "SIGTERM", number: 15 },
            _ = interrupt.recv() => Stop { name: "SIGINT", number: 2 },
        }
    })
}

fn exit(outcome: client::Outcome) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_GOAL_FAILED),
        Err(client::Failure::Config(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(client::Failure::Other(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `worker` until SIGTERM or SIGINT, then lets it stop (exit 0).
async fn run(
    worker: Worker,
    stop: impl Future<Output = Stop> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let signal = stop.await;
        tracing::info!(signal = signal.name, "stopping");
        signals.cancel();
    });
    worker.run(shutdown).await
}

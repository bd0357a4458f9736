//! `synapse-worker`: runs Synapse workers, and submits and inspects goals.
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use std::collections::HashMap;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use synapse_worker::actions::{ActionRegistry, HttpFence, ResultLimit};
use synapse_worker::password_file;
use synapse_worker::{Worker, WorkerConfig};

mod client;

/// Exit code for bad configuration (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code when a goal did not succeed (or a blueprint is invalid).
const EXIT_GOAL_FAILED: u8 = 1;

/// Where the connection settings come from, for `--help`.
const SETTINGS_HELP: &str = "\
Connection settings: --database-url and --redis-url are taken from the flag, else the
environment (SYNAPSE_DATABASE_URL, SYNAPSE_REDIS_URL), else the file ./.synapse/env of the
current directory (`export NAME=value` lines; `make up` writes it for its local stack), else
the built-in default.";

#[derive(Parser)]
#[command(
    name = "synapse-worker",
    version,
    about = "Synapse worker and command-line client",
    after_help = SETTINGS_HELP
)]
struct Cli {
    /// Postgres with the synapse extension [default: postgresql://postgres@127.0.0.1:5432/postgres,
    /// or SYNAPSE_DATABASE_URL in ./.synapse/env].
    #[arg(
        long,
        env = "SYNAPSE_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// File holding the Postgres password (replacing any in the URL),
    /// kept out of `ps` output and the environment.
    #[arg(
        long,
        env = "SYNAPSE_DATABASE_PASSWORD_FILE",
        global = true,
        value_name = "FILE"
    )]
    database_password_file: Option<std::path::PathBuf>,
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
    /// Submit a goal (planned from its text) or a blueprint file (--plan, with --inputs: a goal per
    /// line); with --wait, wait for it to end and print a one-line summary (exit 0 succeeded, 1 otherwise).
    #[command(
        after_help = "Examples:\n  synapse-worker submit 'triage incident 42' --input '{\"source\":\"pager\"}' --wait\n  synapse-worker submit --plan order.json --input '{\"order_id\":1002}' --wait\n  synapse-worker submit --plan order.json --inputs orders.jsonl   (a goal per line)\n  synapse-worker submit 'triage incident 42' --wait --json   (the whole goal_status)"
    )]
    Submit {
        /// The goal text.
        #[arg(required_unless_present = "plan", conflicts_with = "plan")]
        goal: Option<String>,
        /// Submit this blueprint file (synapse.submit_plan) instead of a goal text.
        #[arg(long, value_name = "FILE", conflicts_with = "planner")]
        plan: Option<std::path::PathBuf>,
        /// Goal input (JSON).
        #[arg(long, default_value = "{}")]
        input: String,
        /// With --plan: a file of inputs, one JSON value per line, each the input of a goal of
        /// the blueprint; all are submitted in one call (synapse.submit_plans) and their ids
        /// printed, one per line.
        #[arg(long, value_name = "FILE", requires = "plan", conflicts_with_all = ["input", "wait"])]
        inputs: Option<std::path::PathBuf>,
        /// Planner name.
        #[arg(long)]
        planner: Option<String>,
        /// Wait until the goal ends; print `goal ID succeeded in 1.2 s: RESULT` or `goal ID failed: ERROR`.
        #[arg(long)]
        wait: bool,
        /// With --wait: print the goal's whole status (goal_status) as JSON instead of the summary.
        #[arg(long, requires = "wait")]
        json: bool,
        /// With --wait: give up after this long (exit 1).
        #[arg(long, value_parser = parse_duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// Preview how a goal text would be planned (synapse.plan_preview), without running anything;
    /// exit 1 when no template matches or the blueprint has problems.
    #[command(
        after_help = "Example:\n  synapse-worker plan 'refund order 1001 because it arrived damaged' --input '{\"amount\": 20}'"
    )]
    Plan {
        /// The goal text.
        goal: String,
        /// Goal input (JSON).
        #[arg(long, default_value = "{}")]
        input: String,
        /// Print the preview as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a goal's status as JSON.
    #[command(after_help = "Example:\n  synapse-worker status 42")]
    Status {
        /// Goal id.
        id: i64,
    },
    /// Follow a goal until it ends (0 succeeded, 1 otherwise): on a terminal, a view redrawn at
    /// each event; otherwise one line per change (task state, goal state).
    #[command(
        after_help = "Examples:\n  synapse-worker watch 42\n  synapse-worker watch 42 | tee goal-42.log"
    )]
    Watch {
        /// Goal id.
        id: i64,
    },
    /// Deliver a signal to a goal (synapse.signal): a step waiting for it takes it now, or it is
    /// kept until one waits.
    #[command(
        after_help = "Example:\n  synapse-worker signal 42 approval --payload '{\"approved\": true, \"by\": \"ana\"}'"
    )]
    Signal {
        /// Goal id.
        id: i64,
        /// Signal name (what the wait step's params.signal names).
        name: String,
        /// Signal payload (JSON), in the step's result as `payload`.
        #[arg(long, default_value = "{}")]
        payload: String,
    },
    /// Run a finished goal again (synapse.retry_goal) from the given steps, or from its failed
    /// and cancelled ones; what ran upstream is kept. Exit 1 if the goal is still running.
    #[command(
        after_help = "Examples:\n  synapse-worker retry 42\n  synapse-worker retry 42 --from charge --from notify"
    )]
    Retry {
        /// Goal id.
        id: i64,
        /// A step to run again, with everything downstream of it (repeat the flag for more).
        #[arg(long = "from", value_name = "STEP")]
        from: Vec<String>,
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
    /// Check a blueprint file and list every problem with its JSON path (exit 0 valid, 1 problems,
    /// 64 unreadable file or catalogue). Works without a database: it knows the built-in
    /// actions, plus those of --actions; when a database is configured (flag, environment or
    /// ./.synapse/env) it also knows the actions registered in synapse.actions.
    #[command(
        after_help = "Examples:\n  synapse-worker validate plan.json\n  synapse-worker validate plan.json --actions actions.json   (offline, e.g. in CI)\n\nThe --actions file is a JSON list of {\"name\": …, \"description\": …, \"params_schema\": …}\n(description and params_schema optional; each step's params are checked against its\naction's params_schema, which must be a valid JSON Schema), e.g. [{\"name\": \"resize_image\"}]."
    )]
    Validate {
        /// Blueprint JSON file.
        file: std::path::PathBuf,
        /// A catalogue of custom actions (JSON list of {name, description?, params_schema?}).
        #[arg(long, value_name = "FILE")]
        actions: Option<std::path::PathBuf>,
    },
    /// Serve the web console: goals, their plans drawn live, and the system, read with the
    /// database role of --database-url (row security decides what it shows).
    #[command(
        after_help = "Examples:\n  synapse-worker ui                          (http://127.0.0.1:8765/)\n  SYNAPSE_UI_TOKEN=… synapse-worker ui --addr 0.0.0.0:8765   (open http://host:8765/?token=…)"
    )]
    Ui {
        /// Where to listen. A non-loopback address needs --token.
        #[arg(long, env = "SYNAPSE_UI_ADDR", default_value = "127.0.0.1:8765")]
        addr: std::net::SocketAddr,
        /// A secret every request must carry (as the cookie a ?token= link sets, or
        /// Authorization: Bearer); at least 16 characters.
        #[arg(long, env = "SYNAPSE_UI_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Redis the extension forwards events to [default: redis://127.0.0.1:6379/0, or
    /// SYNAPSE_REDIS_URL in ./.synapse/env].
    #[arg(long, env = "SYNAPSE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// File holding the Redis password (replacing any in the URL).
    #[arg(long, env = "SYNAPSE_REDIS_PASSWORD_FILE", value_name = "FILE")]
    redis_password_file: Option<std::path::PathBuf>,
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
    /// Threads the worker runs on. One costs least per task: a task's claim, action and
    /// outcome hand it from one part of the worker to the next, and across threads each
    /// hand-over wakes another. More let one process use more cores for heavy steps (large
    /// inputs and results, many expressions); so do more worker processes.
    #[arg(long, env = "SYNAPSE_THREADS", default_value_t = 1)]
    threads: usize,
    /// Lease on a claimed task; renewed every third of it.
    #[arg(long, env = "SYNAPSE_LEASE", default_value = "30s", value_parser = parse_duration)]
    lease: Duration,
    /// Time running tasks get to finish at shutdown before they are released.
    #[arg(long, env = "SYNAPSE_GRACE", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "SYNAPSE_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Destinations the http action may reach (comma list): host names (api.example.com,
    /// *.example.com), IP addresses, CIDRs (10.0.0.0/8), or *, each optionally with :port
    /// (api.example.com:443, [::1]:8080). Checked on the addresses the worker resolves.
    /// Default: none.
    #[arg(long, env = "SYNAPSE_ALLOW_HTTP", value_delimiter = ',')]
    allow_http: Vec<String>,
    /// Programs the exec action may run (comma list, exactly as blueprints name them).
    #[arg(long, env = "SYNAPSE_ALLOW_EXEC", value_delimiter = ',')]
    allow_exec: Vec<String>,
    /// Largest result a step may produce, as JSON (bytes, or e.g. 64KiB, 1MiB); beyond it the step fails.
    #[arg(long, env = "SYNAPSE_MAX_RESULT_SIZE", default_value = "1MiB", value_parser = ResultLimit::parse)]
    max_result_size: ResultLimit,
}

/// Most threads `run --threads` takes.
const MOST_THREADS: usize = 256;

/// The runtime every command runs on: one thread, or `threads` (see `run --threads`).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    synapse_worker::blueprint::parse_duration(text)
}

fn config(
    database_url: String,
    redis_url: String,
    args: RunArgs,
) -> anyhow::Result<(WorkerConfig, ResultLimit)> {
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
    let allow_http = HttpFence::parse(&args.allow_http).map_err(anyhow::Error::msg)?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    let config = WorkerConfig {
        database_url,
        redis_url,
        key_prefix: args.key_prefix,
        queues: args.queues,
        concurrency: args.concurrency,
        lease: args.lease,
        grace: args.grace,
        identity: format!("{host}:{}", std::process::id()),
        allow_http,
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

/// Built-in defaults, used when neither flag, environment nor stack file says.
const DEFAULT_DATABASE_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// The local stack's settings file, relative to the current directory.
const STACK_FILE: &str = ".synapse/env";

/// The settings of `./.synapse/env` (`export NAME=value` lines, `#` comments,
/// values optionally quoted). No file: none. A file that cannot be read or
/// has a line that is not an assignment is a configuration error.
fn stack_settings(path: &std::path::Path) -> anyhow::Result<HashMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
    };
    parse_settings(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_settings(text: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut settings = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let assignment = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, value)) = assignment.split_once('=') else {
            bail!("line {}: expected `export NAME=value`", number + 1);
        };
        let value = value.trim();
        let value = ['\'', '"']
            .iter()
            .find_map(|quote| {
                value
                    .strip_prefix(*quote)
                    .and_then(|inner| inner.strip_suffix(*quote))
            })
            .unwrap_or(value);
        settings.insert(name.trim().to_owned(), value.to_owned());
    }
    Ok(settings)
}

/// A connection setting and where it came from (flag > environment > stack file > default).
fn resolve(
    given: Option<String>,
    source: Option<ValueSource>,
    flag: &'static str,
    env: &'static str,
    stack: &HashMap<String, String>,
    default: &str,
) -> client::Setting {
    let (value, origin) = match (given, source) {
        (Some(value), Some(ValueSource::EnvVariable)) => (value, env),
        (Some(value), _) => (value, flag),
        (None, _) => match stack.get(env) {
            Some(value) => (value.clone(), "./.synapse/env"),
            None => (default.to_owned(), "the built-in default"),
        },
    };
    client::Setting { value, origin }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let database_source = matches.value_source("database_url");
    let redis_source = matches
        .subcommand_matches("run")
        .and_then(|run| run.value_source("redis_url"));
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    init_logging(cli.log_format);
    let stack = match stack_settings(std::path::Path::new(STACK_FILE)) {
        Ok(stack) => stack,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut database = resolve(
        cli.database_url,
        database_source,
        "--database-url",
        "SYNAPSE_DATABASE_URL",
        &stack,
        DEFAULT_DATABASE_URL,
    );
    if let Some(file) = &cli.database_password_file {
        match password_file::read(file, "--database-password-file") {
            Ok(password) => {
                database.value = password_file::postgres_url_with(&database.value, &password)
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let threads = match &cli.command {
        Command::Run(args) => args.threads,
        _ => 1,
    };
    if !(1..=MOST_THREADS).contains(&threads) {
        eprintln!("error: --threads must be between 1 and {MOST_THREADS}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime(threads) {
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
        match cli.command {
            Command::Run(mut args) => {
                let mut redis = resolve(
                    args.redis_url.take(),
                    redis_source,
                    "--redis-url",
                    "SYNAPSE_REDIS_URL",
                    &stack,
                    DEFAULT_REDIS_URL,
                );
                if let Some(file) = &args.redis_password_file {
                    let with_password = password_file::read(file, "--redis-password-file")
                        .and_then(|password| {
                            password_file::redis_url_with(&redis.value, &password)
                        });
                    match with_password {
                        Ok(url) => redis.value = url,
                        Err(error) => {
                            eprintln!("error: {error:#}");
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    }
                }
                // Where the settings came from; the URLs themselves only (masked) when they fail.
                tracing::info!(
                    database_from = %database.origin,
                    redis_from = %redis.origin,
                    "settings"
                );
                let worker =
                    config(database.value, redis.value, args).and_then(|(config, limit)| {
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
                plan,
                input,
                inputs,
                planner,
                wait,
                json,
                timeout,
            } => {
                if let (Some(plan), Some(inputs)) = (&plan, &inputs) {
                    return interruptible(client::submit_many(&database, plan, inputs), stop).await;
                }
                let what = match (goal, plan) {
                    (_, Some(file)) => client::Submission::Plan(file),
                    (Some(text), None) => client::Submission::Goal {
                        text,
                        planner: planner.unwrap_or_else(|| "template".to_owned()),
                    },
                    // clap requires one of them.
                    (None, None) => return ExitCode::from(2),
                };
                let wait = wait.then_some(client::Wait { json, timeout });
                interruptible(client::submit(&database, what, &input, wait), stop).await
            }
            Command::Plan { goal, input, json } => {
                interruptible(client::plan(&database, &goal, &input, json), stop).await
            }
            Command::Status { id } => interruptible(client::status(&database, id), stop).await,
            Command::Watch { id } => interruptible(client::watch(&database, id), stop).await,
            Command::Signal { id, name, payload } => {
                interruptible(client::signal(&database, id, &name, &payload), stop).await
            }
            Command::Retry { id, from } => {
                interruptible(client::retry(&database, id, &from), stop).await
            }
            Command::Graph { id, format, output } => {
                let graph = client::graph(&database, id, &format, output.as_deref());
                interruptible(graph, stop).await
            }
            Command::Validate { file, actions } => {
                let validate = client::validate(&database, &file, actions.as_deref());
                interruptible(validate, stop).await
            }
            Command::Ui { addr, token } => {
                if let Err(error) =
                    synapse_worker::console::access::check_listen(&addr, token.as_deref())
                {
                    eprintln!("error: {error}");
                    return ExitCode::from(EXIT_CONFIG);
                }
                let config = synapse_worker::console::ConsoleConfig {
                    addr,
                    token,
                    database_url: database.value,
                };
                report(synapse_worker::console::serve(config, cancelled_by(stop)).await)
            }
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

/// A token cancelled (and logged) at the first SIGTERM or SIGINT.
fn cancelled_by(stop: impl Future<Output = Stop> + Send + 'static) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let signal = stop.await;
        tracing::info!(signal = signal.name, "stopping");
        signals.cancel();
    });
    shutdown
}

/// Runs `worker` until SIGTERM or SIGINT, then lets it stop (exit 0).
async fn run(
    worker: Worker,
    stop: impl Future<Output = Stop> + Send + 'static,
) -> anyhow::Result<()> {
    worker.run(cancelled_by(stop)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_file_is_read_as_export_lines() {
        let settings = parse_settings(
            "# comment\n\nexport SYNAPSE_DATABASE_URL='postgresql://postgres@127.0.0.1:25432/synapse'\n\
             SYNAPSE_REDIS_URL=\"redis://127.0.0.1:26379/0\"\nexport  OTHER = plain \n",
        )
        .unwrap();
        assert_eq!(
            settings["SYNAPSE_DATABASE_URL"],
            "postgresql://postgres@127.0.0.1:25432/synapse"
        );
        assert_eq!(settings["SYNAPSE_REDIS_URL"], "redis://127.0.0.1:26379/0");
        assert_eq!(settings["OTHER"], "plain");
        let bad = parse_settings("export\n").unwrap_err();
        assert_eq!(bad.to_string(), "line 1: expected `export NAME=value`");
    }

    #[test]
    fn flag_beats_environment_beats_stack_file_beats_default() {
        let stack: HashMap<String, String> =
            [("SYNAPSE_DATABASE_URL".to_owned(), "from-file".to_owned())].into();
        let none = HashMap::new();
        let pick = |given: Option<&str>, source, stack| {
            let setting = resolve(
                given.map(str::to_owned),
                source,
                "--database-url",
                "SYNAPSE_DATABASE_URL",
                stack,
                "built-in",
            );
            (setting.value, setting.origin)
        };
        assert_eq!(
            pick(Some("flag"), Some(ValueSource::CommandLine), &stack),
            ("flag".to_owned(), "--database-url")
        );
        assert_eq!(
            pick(Some("env"), Some(ValueSource::EnvVariable), &stack),
            ("env".to_owned(), "SYNAPSE_DATABASE_URL")
        );
        assert_eq!(
            pick(None, None, &stack),
            ("from-file".to_owned(), "./.synapse/env")
        );
        assert_eq!(
            pick(None, None, &none),
            ("built-in".to_owned(), "the built-in default")
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}

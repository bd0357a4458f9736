//! `synapse-worker`: runs Synapse workers, and submits and inspects goals.
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use synapse_worker::actions::ActionRegistry;
use synapse_worker::{Worker, WorkerConfig};

/// Exit code for bad configuration (sysexits EX_USAGE... EX_CONFIG is 78; 64 is
/// what operators script against for "fix your flags").
const EXIT_CONFIG: u8 = 64;
/// Exit code of `submit --wait` when the goal did not succeed.
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
    /// Print a goal's DAG as Mermaid or Graphviz DOT.
    #[command(
        after_help = "Example:\n  synapse-worker graph 42 --format dot | dot -Tsvg > goal.svg"
    )]
    Graph {
        /// Goal id.
        id: i64,
        /// Output format.
        #[arg(long, default_value = "mermaid", value_parser = ["mermaid", "dot"])]
        format: String,
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
    /// Programs the exec action may run (comma list, exactly as blueprints name them).
    #[arg(long, env = "SYNAPSE_ALLOW_EXEC", value_delimiter = ',')]
    allow_exec: Vec<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    synapse_worker::blueprint::parse_duration(text)
}

fn config(database_url: String, args: RunArgs) -> anyhow::Result<WorkerConfig> {
    let queue = regex::Regex::new(r"^[A-Za-z0-9_.:-]{1,64}$").expect("valid regex");
    if let Some(bad) = args.queues.iter().find(|name| !queue.is_match(name)) {
        bail!("--queues: invalid queue name {bad:?}");
    }
    if args.concurrency == 0 || args.concurrency > 10_000 {
        bail!("--concurrency must be between 1 and 10000");
    }
    if args.lease < Duration::from_secs(1) {
        bail!("--lease must be at least 1s");
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    Ok(WorkerConfig {
        database_url,
        redis_url: args.redis_url,
        key_prefix: args.key_prefix,
        queues: args.queues,
        concurrency: args.concurrency,
        lease: args.lease,
        grace: args.grace,
        identity: format!("{host}:{}", std::process::id()),
        allow_exec: args.allow_exec,
    })
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
        match cli.command {
            Command::Run(args) => {
                let config = match config(cli.database_url, args) {
                    Ok(config) => config,
                    Err(error) => {
                        eprintln!("error: {error:#}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                report(run(config).await)
            }
            Command::Submit {
                goal,
                input,
                planner,
                wait,
                timeout,
            } => match submit(&cli.database_url, &goal, &input, &planner, wait, timeout).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_GOAL_FAILED),
                Err(error) => report(Err(error)),
            },
            Command::Status { id } => report(
                print_query(
                    &cli.database_url,
                    "SELECT jsonb_pretty(synapse.goal_status($1))",
                    id,
                )
                .await,
            ),
            Command::Graph { id, format } => report(graph(&cli.database_url, id, &format).await),
            Command::Validate { file } => match validate(&cli.database_url, &file).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_GOAL_FAILED),
                Err(error) => report(Err(error)),
            },
        }
    })
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

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(_) => return,
            };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        signals.cancel();
    });
    Worker::new(config, ActionRegistry::new())?
        .run(shutdown)
        .await
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to Postgres (check --database-url / SYNAPSE_DATABASE_URL)")?;
    tokio::spawn(connection);
    Ok(client)
}

async fn print_query(url: &str, sql: &str, id: i64) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let row = client.query_one(sql, &[&id]).await.map_err(db_error)?;
    println!("{}", row.get::<_, String>(0));
    Ok(())
}

async fn graph(url: &str, id: i64, format: &str) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let row = client
        .query_one("SELECT synapse.goal_graph($1, $2)", &[&id, &format])
        .await
        .map_err(db_error)?;
    print!("{}", row.get::<_, String>(0));
    Ok(())
}

/// Postgres errors as users should read them: the server's message.
fn db_error(error: tokio_postgres::Error) -> anyhow::Error {
    match error.as_db_error() {
        Some(db) => anyhow::anyhow!("{}", db.message()),
        None => anyhow::Error::new(error),
    }
}

async fn validate(url: &str, file: &std::path::Path) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    // The extension knows the registered actions; validation is the same code either way.
    let client = connect(url).await?;
    let problems: Value = client
        .query_one("SELECT synapse.validate_blueprint($1)", &[&doc])
        .await
        .map_err(db_error)?
        .get(0);
    let problems = problems.as_array().cloned().unwrap_or_default();
    for problem in &problems {
        println!(
            "{}: {}",
            problem["path"].as_str().unwrap_or("$"),
            problem["message"].as_str().unwrap_or("")
        );
    }
    if problems.is_empty() {
        println!("{}: ok", file.display());
    }
    Ok(problems.is_empty())
}

async fn submit(
    url: &str,
    goal: &str,
    input: &str,
    planner: &str,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<bool> {
    let input: Value = serde_json::from_str(input).context("--input is not JSON")?;
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to Postgres (check --database-url / SYNAPSE_DATABASE_URL)")?;
    let (notes, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Drive the connection and hand NOTIFY payloads over.
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(note)) = message {
                let _ = notes.send(note.payload().to_owned());
            }
        }
    });
    if wait {
        // Listen before submitting, so the end cannot slip by unseen.
        client
            .batch_execute("LISTEN synapse_events")
            .await
            .map_err(db_error)?;
    }
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_goal($1, $2, $3)",
            &[&goal, &input, &planner],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if !wait {
        println!("{id}");
        return Ok(true);
    }
    eprintln!("goal {id} submitted; waiting for it to end");
    let deadline = timeout.map(|limit| tokio::time::Instant::now() + limit);
    let status = loop {
        let status: Value = client
            .query_one("SELECT synapse.goal_status($1)", &[&id])
            .await
            .map_err(db_error)?
            .get(0);
        if matches!(
            status["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break status;
        }
        // Wait for any event of this goal, then look again.
        loop {
            let next = notifications.recv();
            let payload = match deadline {
                None => next.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                    Ok(payload) => payload,
                    Err(_) => bail!("goal {id} did not end within the --timeout"),
                },
            };
            let Some(payload) = payload else {
                bail!("the Postgres connection closed while waiting");
            };
            let event: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
            if event["goal_id"].as_i64() == Some(id)
                && event["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("goal."))
            {
                break;
            }
        }
    };
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(status["status"] == "succeeded")
}

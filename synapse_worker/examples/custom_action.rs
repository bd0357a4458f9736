//! A worker binary with a custom action: `word_count` counts the words of
//! `input.text`. Run it like `synapse-worker run`:
//!
//! ```sh
//! cargo run -p synapse_worker --example custom_action -- \
//!     --database-url postgresql://postgres@127.0.0.1:25432/synapse --redis-url redis://127.0.0.1:26379/0
//! ```
//!
//! On start it publishes `word_count` in `synapse.actions`, so blueprints
//! using it validate:
//! `{"steps":[{"id":"count","action":"word_count","input":"{'text': goal.input.text}"}]}`
use std::process::ExitCode;

use clap::Parser;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use synapse_worker::actions::{Action, ActionContext, ActionError, ActionFuture, ActionRegistry};
use synapse_worker::{Worker, WorkerConfig};

/// Counts the words of `input.text`.
struct WordCount;

impl Action for WordCount {
    fn name(&self) -> &str {
        "word_count"
    }

    fn description(&self) -> &str {
        "Counts the words of input.text; result {words}."
    }

    fn params_schema(&self) -> Option<Value> {
        Some(json!({"type": "object", "additionalProperties": false}))
    }

    fn run<'a>(&'a self, context: &'a ActionContext) -> ActionFuture<'a> {
        Box::pin(async move {
            let text = context.input["text"]
                .as_str()
                .ok_or_else(|| ActionError::Permanent("input.text: expected a string".into()))?;
            Ok(json!({"words": text.split_whitespace().count()}))
        })
    }
}

#[derive(Parser)]
struct Args {
    #[arg(long, env = "SYNAPSE_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "SYNAPSE_REDIS_URL")]
    redis_url: String,
    #[arg(long, default_value = "default", value_delimiter = ',')]
    queues: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let args = Args::parse();
    let config = WorkerConfig {
        database_url: args.database_url,
        redis_url: args.redis_url,
        key_prefix: "synapse".into(),
        queues: args.queues,
        concurrency: 8,
        lease: std::time::Duration::from_secs(30),
        grace: std::time::Duration::from_secs(30),
        identity: format!("word-count:{}", std::process::id()),
        allow_http: synapse_worker::actions::HttpFence::none(),
        allow_exec: Vec::new(),
        metrics_addr: None,
    };
    let mut actions = ActionRegistry::new();
    actions.register(WordCount);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    match Worker::new(config, actions) {
        Ok(worker) => match worker.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(64)
        }
    }
}

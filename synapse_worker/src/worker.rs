//! The worker: wires the consumer, planners, executor and actions together
//! and shuts down cleanly.
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::actions::{ActionRegistry, HttpFence, ResultLimit, Sql};
use crate::backoff::Backoff;
use crate::blueprint::BUILTIN_ACTIONS;
use crate::completer::{completer, Completer, CompletionQueue};
use crate::connection_error;
use crate::continuation::Continuation;
use crate::planner::PlannerRegistry;
use crate::postgres_tls::{self, MakeTlsConnector};
use crate::slots::Slots;
use crate::store;

/// How a worker runs (validated; see the CLI for the flags). Its `Debug`
/// output leaves the connection strings out: they may hold passwords.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Postgres connection string.
    pub database_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Prefix of every Redis key (the extension's `synapse.key_prefix`).
    pub key_prefix: String,
    /// Queues to consume, highest priority first.
    pub queues: Vec<String>,
    /// Most tasks (and plannings) at once.
    pub concurrency: usize,
    /// Lease taken on each claimed task; heartbeats renew it.
    pub lease: Duration,
    /// Time in-flight tasks get to finish at shutdown before their leases are released.
    pub grace: Duration,
    /// Name recorded as `leased_by` and `registered_by`.
    pub identity: String,
    /// Destinations the `http` action may reach.
    pub allow_http: HttpFence,
    /// Programs the `exec` action may run.
    pub allow_exec: Vec<String>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("database_url", &"<hidden>")
            .field("redis_url", &"<hidden>")
            .field("key_prefix", &self.key_prefix)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("grace", &self.grace)
            .field("identity", &self.identity)
            .field("allow_http", &self.allow_http)
            .field("allow_exec", &self.allow_exec)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

impl WorkerConfig {
    /// The lists BLMPOP watches: the planner list, then each queue.
    pub fn list_keys(&self) -> Vec<String> {
        std::iter::once(format!("{}:planner", self.key_prefix))
            .chain(
                self.queues
                    .iter()
                    .map(|queue| format!("{}:queue:{queue}", self.key_prefix)),
            )
            .collect()
    }

    /// The queue whose list is `list` (`{prefix}:queue:{queue}`), if this worker serves it.
    pub fn queue_of(&self, list: &str) -> Option<&str> {
        let queue = list
            .strip_prefix(self.key_prefix.as_str())?
            .strip_prefix(":queue:")?;
        self.queues
            .iter()
            .map(String::as_str)
            .find(|served| *served == queue)
    }
}

/// What every task of a worker shares.
pub struct Shared {
    /// Configuration.
    pub config: WorkerConfig,
    /// Postgres connections.
    pub pool: deadpool_postgres::Pool,
    /// Redis client (connections are made from it).
    pub redis: redis::Client,
    /// Actions by name.
    pub actions: ActionRegistry,
    /// The `sql` action, whose steps run in the transaction that records them.
    pub sql: Sql,
    /// Planners by name.
    pub planners: PlannerRegistry,
    /// Records task outcomes, in batches.
    pub completer: Completer,
    /// Concurrency slots: one per task (or planning) running.
    pub slots: Arc<Slots>,
    /// While Postgres is unreachable: when to pop again, and the next pause.
    pause: std::sync::Mutex<Pause>,
}

#[derive(Default)]
struct Pause {
    until: Option<std::time::Instant>,
    backoff: Backoff,
}

/// Puts popped messages back at the head of their list, so that the next
/// pop takes them first, in the order they were popped.
pub async fn push_back(
    connection: &mut redis::aio::MultiplexedConnection,
    list: &str,
    payloads: &[String],
) -> redis::RedisResult<()> {
    redis::cmd("RPUSH")
        .arg(list)
        .arg(payloads.iter().rev().collect::<Vec<_>>())
        .query_async(connection)
        .await
}

impl Shared {
    /// Puts messages back at the head of their list (the next pop takes them
    /// first) and pauses consumption with a capped, growing backoff: Postgres
    /// is down.
    pub async fn hand_back(&self, list: &str, payloads: &[String], error: &store::StoreError) {
        let pause = {
            let mut pause = self
                .pause
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let next = pause.backoff.next_pause();
            pause.until = Some(std::time::Instant::now() + next);
            next
        };
        let url = &self.config.database_url;
        warn!(
            error = %crate::connection_error::describe(url, error),
            database = %crate::connection_error::mask(url),
            pause_ms = pause.as_millis() as u64,
            "postgres unreachable; messages handed back"
        );
        crate::metrics::METRICS
            .reconnects
            .with_label_values(&["postgres"])
            .inc();
        let pushed = async {
            let mut connection = self.redis.get_multiplexed_async_connection().await?;
            push_back(&mut connection, list, payloads).await
        };
        if let Err(error) = pushed.await {
            // The sweep dispatches it again once Postgres is back.
            warn!(%error, "could not hand the messages back to redis");
        }
    }

    /// How long to wait before popping again, if Postgres was unreachable.
    pub fn paused_for(&self) -> Option<Duration> {
        let pause = self
            .pause
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pause
            .until
            .and_then(|until| until.checked_duration_since(std::time::Instant::now()))
    }

    /// Postgres answered: the next outage starts with the shortest pause again.
    pub fn postgres_reachable(&self) {
        let mut pause = self
            .pause
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if pause.until.is_some() {
            *pause = Pause::default();
        }
    }
}

/// A configured worker, ready to run.
pub struct Worker {
    shared: Arc<Shared>,
    completions: CompletionQueue,
}

/// How long a connection attempt to Postgres may take, unless the URL says
/// (`connect_timeout`): an address that drops packets fails like a closed port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After the grace period, how long releasing unfinished tasks (and recording
/// what finished) may take before the worker exits anyway; their leases then
/// expire and the forwarder queues them again.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The `sql` action, with a pool of its own: one connection per concurrent task at most, so a
/// step never waits for another's. Its sessions keep the database's settings.
fn sql_action(url: &str, concurrency: usize) -> anyhow::Result<Sql> {
    let (config, tls) = connection_config(url)?;
    Ok(Sql::new(pool_of(config, tls.clone(), concurrency)?, tls))
}

/// The engine's pool for `url`, sized for `connections`. Its statements are
/// prepared once per connection and always run their generic plan: they find
/// their rows by id, so a plan made for the values at hand buys nothing, and
/// making it cost more than running it (a chain step spent 1.2 of its 3 ms
/// planning at Bind). Its sessions never JIT-compile: the engine's statements
/// touch a handful of rows, but a generic plan estimated over a few large
/// goals can cost enough to cross `jit_above_cost`, and compiling took 0.2 s
/// per statement, under the goal's lock. Their path holds only the system
/// catalogs: a schema someone puts on the database's path cannot capture a
/// name the engine uses. They are READ COMMITTED whatever the database's
/// default, so that a statement run on its own (a claim) cannot fail to
/// serialize against a completion or a cancel. They never plan a scan of a
/// whole table where an index serves: a generic plan made while the tables
/// were empty (a fresh install) is kept for the session's life, and a scan
/// grows with the table (locking a batch's goals took 4 ms instead of 2
/// after a few seconds of steady state).
pub fn pool(url: &str, connections: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let (mut config, tls) = connection_config(url)?;
    const ENGINE_OPTIONS: &str = r"-c jit=off -c search_path=pg_catalog,pg_temp -c plan_cache_mode=force_generic_plan -c default_transaction_isolation=read\ committed -c enable_seqscan=off";
    let options = match config.get_options() {
        Some(options) => format!("{options} {ENGINE_OPTIONS}"),
        None => ENGINE_OPTIONS.to_owned(),
    };
    config.options(&options);
    pool_of(config, tls, connections)
}

/// The configuration and TLS connector `url` asks for (`sslmode`, `sslrootcert`),
/// with the default connect timeout.
pub(crate) fn connection_config(
    url: &str,
) -> anyhow::Result<(tokio_postgres::Config, MakeTlsConnector)> {
    let (mut config, tls) =
        postgres_tls::configure(url).context("--database-url is not a valid Postgres URL")?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok((config, tls))
}

fn pool_of(
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    connections: usize,
) -> anyhow::Result<deadpool_postgres::Pool> {
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(connections)
        .build()
        .context("building the Postgres pool")
}

impl Worker {
    /// A worker with the built-in actions and planners, plus `extra` actions;
    /// results are bounded by the default limit (1 MiB).
    pub fn new(config: WorkerConfig, extra: ActionRegistry) -> anyhow::Result<Worker> {
        Self::with_result_limit(config, extra, ResultLimit::default())
    }

    /// Like [`Worker::new`], with every action's result bounded by `limit`
    /// (`--max-result-size`).
    pub fn with_result_limit(
        config: WorkerConfig,
        extra: ActionRegistry,
        limit: ResultLimit,
    ) -> anyhow::Result<Worker> {
        // Each running task may hold one connection while heartbeating or recording.
        let pool = pool(&config.database_url, config.concurrency + 4)?;
        // `sql` steps get connections of their own: whatever a step does to its
        // session can never reach the claims, heartbeats and the completer.
        let sql = sql_action(&config.database_url, config.concurrency)?.with_result_limit(limit);
        let redis = redis::Client::open(config.redis_url.as_str())
            .context("--redis-url is not a valid Redis URL")?;
        let mut actions = ActionRegistry::builtins(
            sql.clone(),
            config.allow_http.clone(),
            config.allow_exec.clone(),
            limit,
        );
        for action in extra.iter() {
            actions.register_shared(action.clone());
        }
        // Outcomes waiting for their answer: two batches in flight, each up to
        // as many as tasks may run at once.
        let (completer, completions) = completer(2 * config.concurrency);
        let slots = Arc::new(Slots::new(config.concurrency));
        Ok(Worker {
            shared: Arc::new(Shared {
                config,
                pool,
                redis,
                actions: actions.bounded(limit),
                sql,
                planners: PlannerRegistry::builtins(),
                completer,
                slots,
                pause: std::sync::Mutex::new(Pause::default()),
            }),
            completions,
        })
    }

    /// Publishes the actions, then consumes until `shutdown` fires; in-flight
    /// tasks then get the grace period to finish before their leases are
    /// released. `shutdown` is honoured in every state, waiting for Postgres
    /// or Redis included.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let shared = self.shared;
        if !register_actions(&shared, &shutdown).await? {
            info!("stopped before starting");
            return Ok(());
        }
        announce(&shared).await;
        let tasks = TaskTracker::new();
        let abort = CancellationToken::new();
        let (continued, mut to_run) = tokio::sync::mpsc::unbounded_channel();
        let continuation = Continuation {
            slots: shared.slots.clone(),
            queues: shared.config.queues.clone(),
            lease: shared.config.lease,
            identity: shared.config.identity.clone(),
            run: continued,
            stop: shutdown.clone(),
        };
        let stop_completer = CancellationToken::new();
        let completer = tokio::spawn(crate::completer::run(
            shared.pool.clone(),
            self.completions,
            stop_completer.clone(),
            Some(Arc::new(continuation)),
        ));
        // Tasks claimed by local continuation run like popped ones.
        {
            let (shared, tasks, abort) = (shared.clone(), tasks.clone(), abort.clone());
            tokio::spawn(async move {
                while let Some((task, slot)) = to_run.recv().await {
                    crate::executor::spawn_execute(
                        &tasks,
                        shared.clone(),
                        task,
                        abort.clone(),
                        slot,
                    );
                }
            });
        }
        info!(
            queues = ?shared.config.queues,
            concurrency = shared.config.concurrency,
            identity = %shared.config.identity,
            "worker started"
        );
        if let Some(addr) = shared.config.metrics_addr {
            let listener = crate::metrics::serve(addr, shutdown.clone());
            tokio::spawn(async move {
                if let Err(error) = listener.await {
                    warn!(%error, %addr, "cannot serve metrics");
                }
            });
        }
        crate::consumer::consume(shared.clone(), &tasks, shutdown, abort.clone()).await;
        tasks.close();
        info!(in_flight = tasks.len(), "stopping: no new work is taken");
        if tokio::time::timeout(shared.config.grace, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                in_flight = tasks.len(),
                "grace period over: releasing unfinished tasks"
            );
            abort.cancel();
            if tokio::time::timeout(RELEASE_TIMEOUT, tasks.wait())
                .await
                .is_err()
            {
                warn!(
                    in_flight = tasks.len(),
                    "could not release every task (is postgres reachable?); their leases will expire"
                );
            }
        }
        // Every task got its answer, or was given up: nothing is left to record.
        stop_completer.cancel();
        if tokio::time::timeout(RELEASE_TIMEOUT, completer)
            .await
            .is_err()
        {
            warn!("the last outcomes could not be recorded; their leases will expire");
        }
        // Its queues are no longer served by this worker.
        let stopped = async {
            let client = shared.pool.get().await?;
            store::worker_stopped(&client, &shared.config.identity).await
        };
        match tokio::time::timeout(RELEASE_TIMEOUT, stopped).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "could not record that the worker stopped"),
            Err(_) => warn!("could not record that the worker stopped in time"),
        }
        info!("worker stopped");
        Ok(())
    }
}

/// Records that this worker started and which queues it serves (what
/// `goal_status` reads to tell work no worker serves), and warns when its
/// Redis settings differ from the extension's: it would never see the work
/// the forwarder dispatches. A failure here is logged, not fatal.
async fn announce(shared: &Shared) {
    let started = async {
        let client = shared.pool.get().await?;
        store::worker_started(&client, &shared.config.identity, &shared.config.queues).await
    };
    let settings = match started.await {
        Ok(settings) => settings,
        Err(error) => {
            warn!(%error, "could not record the worker in synapse.workers (is the extension up to date?)");
            return;
        }
    };
    if let Some(prefix) = settings
        .key_prefix
        .filter(|p| *p != shared.config.key_prefix)
    {
        warn!(
            key_prefix = %shared.config.key_prefix,
            extension_key_prefix = %prefix,
            "--key-prefix differs from the extension's synapse.key_prefix: this worker will not see the work the forwarder dispatches"
        );
    }
    if let Some(url) = settings.redis_url {
        if !same_redis(&url, &shared.config.redis_url) {
            warn!(
                redis = %connection_error::mask(&shared.config.redis_url),
                extension_redis = %connection_error::mask(&url),
                "--redis-url differs from the extension's synapse.redis_url: this worker may not see the work the forwarder dispatches"
            );
        }
    }
}

/// Whether two Redis URLs name the same server and database (credentials
/// aside); URLs that do not parse are not compared.
fn same_redis(a: &str, b: &str) -> bool {
    use redis::IntoConnectionInfo;
    match (a.into_connection_info(), b.into_connection_info()) {
        (Ok(a), Ok(b)) => {
            a.addr() == b.addr() && a.redis_settings().db() == b.redis_settings().db()
        }
        _ => true,
    }
}

/// The oldest extension this worker's engine is safe on: from 0.22.0,
/// `signal` and `retry_goal` lock a goal `FOR UPDATE`, which waits for the
/// engine runs that hold it `FOR KEY SHARE` (an older `signal` would miss a
/// wait step this worker starts meanwhile), and those runs pass the goal's
/// gate (`synapse._share_goals`), which 0.22.0 brings.
const MIN_EXTENSION_VERSION: &str = "0.22.0";

/// Whether the extension `version` (`major.minor.patch`) is older than
/// [`MIN_EXTENSION_VERSION`]; a version that does not read as one is not.
fn older_than_needed(version: &str) -> bool {
    let numbers = |version: &str| -> Option<Vec<u64>> {
        version.split('.').map(|part| part.parse().ok()).collect()
    };
    match (numbers(version), numbers(MIN_EXTENSION_VERSION)) {
        (Some(version), Some(needed)) => version < needed,
        _ => false,
    }
}

/// Upserts the worker's actions in `synapse.actions`, waiting for Postgres as
/// long as it cannot be reached. `Ok(false)` if `shutdown` fired first.
async fn register_actions(shared: &Shared, shutdown: &CancellationToken) -> anyhow::Result<bool> {
    let actions: Vec<_> = shared
        .actions
        .iter()
        .map(|action| {
            let name = action.name().to_owned();
            let builtin = BUILTIN_ACTIONS.contains(&name.as_str());
            (
                name,
                action.description().to_owned(),
                action.params_schema(),
                builtin,
            )
        })
        .collect();
    // The database may still be starting: wait for it rather than give up.
    let mut backoff = Backoff::default();
    loop {
        // Nothing is written for a worker the extension is too old for.
        let attempt = async {
            let client = shared.pool.get().await?;
            let version = store::extension_version(&client).await?;
            if let Some(version) = version.filter(|version| older_than_needed(version)) {
                return Ok(Some(version));
            }
            store::register_actions(&client, &actions, &shared.config.identity).await?;
            Ok(None)
        };
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            outcome = attempt => outcome,
        };
        match outcome {
            Ok(Some(version)) => anyhow::bail!(
                "the synapse extension in this database is {version}; this worker needs {MIN_EXTENSION_VERSION} or later: \
                 install this release's extension, restart Postgres, then run ALTER EXTENSION synapse UPDATE"
            ),
            Ok(None) => return Ok(true),
            Err(store::StoreError::Postgres(error)) if error.as_db_error().is_some() => {
                return Err(error).context(
                    "registering actions in synapse.actions (is the synapse extension installed?)",
                );
            }
            Err(error) => {
                let url = &shared.config.database_url;
                if refused_for_good(&error) {
                    anyhow::bail!(
                        "{} (check --database-url, SYNAPSE_DATABASE_URL or ./.synapse/env)",
                        connection_error::cannot_connect(url, &error)
                    );
                }
                let pause = backoff.next_pause();
                warn!(
                    error = %connection_error::describe(url, &error),
                    database = %connection_error::mask(url),
                    retry_in_ms = pause.as_millis() as u64,
                    "cannot reach postgres"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(false),
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Whether the server refused a new connection for good: the database does
/// not exist, the role may not log in (SQLSTATE 3D000 and class 28), or the
/// TLS the URL asks for cannot be had (a certificate not trusted, a server
/// without TLS). Waiting would not help; other refusals (starting up, too
/// many connections) pass.
fn refused_for_good(error: &store::StoreError) -> bool {
    let store::StoreError::Pool(deadpool_postgres::PoolError::Backend(error)) = error else {
        return false;
    };
    connection_error::tls_refused(error)
        || error.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code == "3D000" || code.starts_with("28")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig {
            database_url: "postgresql://app:s3cret@db/app".to_owned(),
            redis_url: "rediss://:s3cret@cache:6379/0".to_owned(),
            key_prefix: "synapse".to_owned(),
            queues: vec!["default".to_owned()],
            concurrency: 1,
            lease: Duration::from_secs(30),
            grace: Duration::from_secs(30),
            identity: "w".to_owned(),
            allow_http: HttpFence::none(),
            allow_exec: Vec::new(),
            metrics_addr: None,
        }
    }

    #[test]
    fn an_extension_older_than_the_worker_needs_is_told_apart_by_its_numbers() {
        assert!(older_than_needed("0.21.0"));
        assert!(older_than_needed("0.14.0"));
        assert!(older_than_needed("0.9.0"));
        assert!(!older_than_needed(MIN_EXTENSION_VERSION));
        // Compared as numbers, not as text.
        assert!(!older_than_needed("0.100.0"));
        assert!(!older_than_needed("1.0.0"));
        assert!(!older_than_needed("unknown"));
    }

    #[test]
    fn debug_output_hides_the_connection_strings() {
        let shown = format!("{:?}", config());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("queues: [\"default\"]"), "{shown}");
    }

    #[test]
    fn a_list_names_its_queue_only_if_the_worker_serves_it() {
        let config = WorkerConfig {
            queues: vec!["default".to_owned(), "payments".to_owned()],
            ..config()
        };
        assert_eq!(config.queue_of("synapse:queue:default"), Some("default"));
        assert_eq!(config.queue_of("synapse:queue:payments"), Some("payments"));
        assert_eq!(config.queue_of("synapse:queue:other"), None);
        assert_eq!(config.queue_of("other:queue:default"), None);
        assert_eq!(config.queue_of("synapse:planner"), None);
    }
}

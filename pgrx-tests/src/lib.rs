//! End-to-end test harness: every test gets its own Postgres cluster (with
//! `synapse` preloaded, from the private install `make install` made) and its
//! own Redis, on free ports, started and stopped through `scripts/stack.sh` —
//! the same script `make up` uses.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use postgres;
pub use redis;

/// A running Postgres + Redis pair owned by one test.
pub struct Stack {
    dir: PathBuf,
    /// Postgres port.
    pub pg_port: u16,
    /// Redis port.
    pub redis_port: u16,
    extra_conf: String,
    /// Redis speaks TLS (with a CA made for the stack) and wants this password.
    secure: Option<&'static str>,
    /// Postgres speaks TLS (a certificate from the stack's CA), and only TLS
    /// to every role but `postgres`.
    postgres_tls: bool,
}

/// Database the forwarder serves in test stacks.
pub const DATABASE: &str = "synapse";

/// A configuration line that keeps `synapse` out of `shared_preload_libraries`.
pub const WITHOUT_PRELOAD: &str = "shared_preload_libraries = 'pg_stat_statements'";

/// A local port free now (it may be taken again before it is bound).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

impl Stack {
    /// Starts a stack named after the test. `conf` lines are appended to
    /// postgresql.conf (e.g. `synapse.sweep_interval = '1s'`).
    pub fn start(name: &str, conf: &[&str]) -> Stack {
        Self::start_with(name, conf, None, false)
    }

    /// Like [`Stack::start`], with Redis behind TLS and `password`.
    pub fn start_secure(name: &str, password: &'static str) -> Stack {
        Self::start_with(name, &[], Some(password), false)
    }

    /// Like [`Stack::start`], with Postgres behind TLS (a certificate for
    /// 127.0.0.1 and localhost, signed by [`Stack::ca_file`]). Every role but
    /// `postgres` gets in only over TLS and with a password; `postgres` also
    /// without TLS, since the harness's own client ([`Stack::pg`]) has none.
    pub fn start_postgres_tls(name: &str) -> Stack {
        Self::start_with(name, &[], None, true)
    }

    /// A stack whose Postgres does not preload `synapse`: no forwarder runs.
    pub fn start_without_preload(name: &str) -> Stack {
        Self::start_with(name, &[WITHOUT_PRELOAD], None, false)
    }

    /// Stops Postgres, replaces the extra configuration lines, and starts it
    /// again (waiting for the forwarder unless the lines drop the preload).
    pub fn restart_postgres_with(&mut self, conf: &[&str]) {
        self.script(&["pg-stop", "fast"]);
        self.extra_conf = conf.join("\n");
        self.script(&["pg-start"]);
        if !conf.contains(&WITHOUT_PRELOAD) {
            self.wait_for_forwarder();
        }
    }

    fn start_with(
        name: &str,
        conf: &[&str],
        secure: Option<&'static str>,
        postgres_tls: bool,
    ) -> Stack {
        let dir = workspace_root()
            .join("target/e2e")
            .join(format!("{name}-{}", std::process::id()));
        // A free port can be taken again before the server binds it: retry with new ones.
        let mut failure = String::new();
        for _ in 0..3 {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating the stack folder");
            let stack = Stack {
                dir: dir.clone(),
                pg_port: free_port(),
                redis_port: free_port(),
                extra_conf: conf.join("\n"),
                secure,
                postgres_tls,
            };
            match stack.try_script(&["up"]) {
                Ok(()) => {
                    if !conf.contains(&WITHOUT_PRELOAD) {
                        stack.wait_for_forwarder();
                    }
                    return stack;
                }
                Err(error) => {
                    failure = error;
                    let _ = stack.try_script(&["down"]);
                    std::mem::forget(stack);
                }
            }
        }
        panic!("the stack did not start: {failure}");
    }

    fn try_script(&self, args: &[&str]) -> Result<(), String> {
        let output = Command::new(workspace_root().join("scripts/stack.sh"))
            .args(args)
            .env("SYNAPSE_STACK_DIR", &self.dir)
            .env("SYNAPSE_PGPORT", self.pg_port.to_string())
            .env("SYNAPSE_REDIS_PORT", self.redis_port.to_string())
            .env("SYNAPSE_DATABASE", DATABASE)
            .env("SYNAPSE_PG_CONF", &self.extra_conf)
            .env(
                "SYNAPSE_REDIS_TLS",
                if self.secure.is_some() { "1" } else { "" },
            )
            .env("SYNAPSE_REDIS_PASSWORD", self.secure.unwrap_or_default())
            .env("SYNAPSE_PG_TLS", if self.postgres_tls { "1" } else { "" })
            .output()
            .expect("running scripts/stack.sh");
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "stack.sh {args:?} failed: {}{}\n--- postgres log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.postgres_log()
        ))
    }

    fn script(&self, args: &[&str]) {
        if let Err(error) = self.try_script(args) {
            panic!("{error}");
        }
    }

    /// The server log, for failure messages.
    pub fn postgres_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Where events and work stand, for failure messages: the forwarder's
    /// state, what waits in the outbox, the Redis lists, and the tails of
    /// every log of the stack.
    pub fn diagnostics(&self) -> String {
        let mut report = String::new();
        let query = "SELECT synapse.forwarder_status()::text,
                            (SELECT json_agg(o ORDER BY o.id)::text FROM
                               (SELECT id, event, task_id, dispatch, failures, retry_at
                                  FROM synapse.outbox ORDER BY id LIMIT 20) o)";
        match postgres::Client::connect(&self.database_url(), postgres::NoTls)
            .and_then(|mut client| client.query_one(query, &[]))
        {
            Ok(row) => {
                let forwarder: Option<String> = row.get(0);
                let outbox: Option<String> = row.get(1);
                report += &format!(
                    "--- forwarder: {}\n--- outbox: {}\n",
                    forwarder.unwrap_or_default(),
                    outbox.unwrap_or_else(|| "empty".into())
                );
            }
            Err(error) => report += &format!("--- postgres: {error}\n"),
        }
        let lists = redis::Client::open(self.test_redis_url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
            .and_then(|mut redis| {
                let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut redis)?;
                keys.into_iter()
                    .map(|key| {
                        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut redis)?;
                        let length: i64 = match kind.as_str() {
                            "list" => redis::cmd("LLEN").arg(&key).query(&mut redis)?,
                            "stream" => redis::cmd("XLEN").arg(&key).query(&mut redis)?,
                            _ => -1,
                        };
                        Ok(format!("{key} ({kind}): {length}"))
                    })
                    .collect::<redis::RedisResult<Vec<_>>>()
            });
        report += &format!("--- redis: {lists:?}\n");
        let mut logs: Vec<_> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                    .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            report += &format!("--- {} (last 40 lines):\n{tail}\n", log.display());
        }
        report
    }

    /// The postmaster and its children.
    pub fn postgres_pids(&self) -> Vec<u32> {
        let pidfile =
            std::fs::read_to_string(self.dir.join("pgdata/postmaster.pid")).unwrap_or_default();
        let Some(postmaster) = pidfile
            .lines()
            .next()
            .and_then(|line| line.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let children = Command::new("pgrep")
            .arg("-P")
            .arg(postmaster.to_string())
            .output();
        std::iter::once(postmaster)
            .chain(
                children
                    .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|line| line.trim().parse().ok()),
            )
            .collect()
    }

    /// Connection string of the test database.
    pub fn database_url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{DATABASE}",
            self.pg_port
        )
    }

    /// Redis URL, as the forwarder and workers use it (TLS verified against the stack's CA).
    pub fn redis_url(&self) -> String {
        match self.secure {
            None => format!("redis://127.0.0.1:{}/0", self.redis_port),
            Some(password) => format!("rediss://:{password}@127.0.0.1:{}/0", self.redis_port),
        }
    }

    /// A path inside the stack's folder (readable by the server).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA that signed a secure stack's Redis certificate, and the
    /// Postgres certificate of a stack started with [`Stack::start_postgres_tls`].
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls/ca.crt")
    }

    /// A new Postgres connection to the test database.
    pub fn pg(&self) -> postgres::Client {
        postgres::Client::connect(&self.database_url(), postgres::NoTls)
            .expect("connecting to postgres")
    }

    /// The stack's database URL for `role` (the stack trusts local connections).
    pub fn database_url_as(&self, role: &str) -> String {
        format!("postgresql://{role}@127.0.0.1:{}/{DATABASE}", self.pg_port)
    }

    /// A session as `role`.
    pub fn pg_as(&self, role: &str) -> postgres::Client {
        postgres::Client::connect(&self.database_url_as(role), postgres::NoTls)
            .unwrap_or_else(|error| panic!("connecting as {role}: {error}"))
    }

    /// A new Postgres connection to another database of the cluster, e.g.
    /// `postgres`: its sessions stay out of the test database's statistics.
    pub fn pg_database(&self, database: &str) -> postgres::Client {
        let url = format!(
            "postgresql://postgres@127.0.0.1:{}/{database}",
            self.pg_port
        );
        postgres::Client::connect(&url, postgres::NoTls).expect("connecting to postgres")
    }

    /// The Redis URL for the test's own connections, which skip verification
    /// (the processes under test verify).
    fn test_redis_url(&self) -> String {
        if self.secure.is_some() {
            format!("{}#insecure", self.redis_url())
        } else {
            self.redis_url()
        }
    }

    /// A new Redis connection.
    pub fn redis(&self) -> redis::Connection {
        let connection = redis::Client::open(self.test_redis_url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(5)))
            .expect("connecting to redis");
        connection
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        connection
    }

    /// Stops Redis (nothing saved: its lists are gone).
    pub fn stop_redis(&self) {
        self.script(&["redis-stop"]);
    }

    /// Starts Redis again, empty.
    pub fn start_redis(&self) {
        self.script(&["redis-start"]);
    }

    /// Crashes Postgres (`pg_ctl stop -m immediate`: no shutdown checkpoint,
    /// crash recovery at the next start) and starts it again.
    pub fn crash_and_restart_postgres(&self) {
        self.script(&["pg-stop", "immediate"]);
        self.script(&["pg-start"]);
        self.wait_for_forwarder();
    }

    /// Stops Postgres (fast shutdown).
    pub fn stop_postgres(&self) {
        self.script(&["pg-stop", "fast"]);
    }

    /// Starts Postgres again and waits for the forwarder.
    pub fn start_postgres(&self) {
        self.script(&["pg-start"]);
        self.wait_for_forwarder();
    }

    /// Waits until the forwarder process is up.
    pub fn wait_for_forwarder(&self) {
        let mut client = self.pg();
        wait_until("the forwarder to start", Duration::from_secs(30), || {
            client
                .query_one(
                    "SELECT (synapse.forwarder_status() ->> 'running')::boolean",
                    &[],
                )
                .ok()
                .and_then(|row| row.get::<_, bool>(0).then_some(()))
        });
    }

    /// `synapse.forwarder_status()`.
    pub fn forwarder_status(&self, client: &mut postgres::Client) -> serde_json::Value {
        client
            .query_one("SELECT synapse.forwarder_status()::text", &[])
            .map(|row| serde_json::from_str(row.get::<_, &str>(0)).expect("status is JSON"))
            .expect("forwarder_status()")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Never panic here: a panic while a failed test unwinds would abort
        // the run and leave the servers behind.
        if let Err(error) = self.try_script(&["down"]) {
            eprintln!("{error}");
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `condition` until it yields a value or `limit` passes (then panics
/// naming `what`). For conditions no event announces; the pause is short.
pub fn wait_until<T>(what: &str, limit: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pops one element of `list`, blocking up to `timeout` (Redis BRPOP): the way
/// workers wait, so no polling.
pub fn brpop(redis: &mut redis::Connection, list: &str, timeout: Duration) -> Option<String> {
    let reply: Option<(String, String)> = redis::cmd("BRPOP")
        .arg(list)
        .arg(timeout.as_secs_f64())
        .query(redis)
        .expect("BRPOP");
    reply.map(|(_, value)| value)
}

/// `synapse.submit_plan(blueprint)`: the new goal's id. `blueprint` is JSON
/// text or a `serde_json::Value`.
pub fn submit_plan(
    client: &mut postgres::Client,
    blueprint: &(impl std::fmt::Display + ?Sized),
) -> i64 {
    client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb)",
            &[&blueprint.to_string()],
        )
        .expect("submit_plan")
        .get(0)
}

/// Submits `blueprint` with goal `input` (sent as JSON text); the goal's id.
pub fn submit_plan_with_input(
    client: &mut postgres::Client,
    blueprint: &serde_json::Value,
    input: &serde_json::Value,
) -> i64 {
    client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, $2::text::jsonb)",
            &[&blueprint.to_string(), &input.to_string()],
        )
        .expect("submit_plan")
        .get(0)
}

/// The id of the task of `step` in goal `goal_id`.
pub fn task_id(client: &mut postgres::Client, goal_id: i64, step: &str) -> i64 {
    client
        .query_one(
            "SELECT id FROM synapse.tasks WHERE goal_id = $1 AND step = $2 AND map_index IS NULL",
            &[&goal_id, &step],
        )
        .expect("task row")
        .get(0)
}

/// A blueprint with one `noop` step, as JSON text.
pub const ONE_STEP: &str = r#"{"steps":[{"id":"only","action":"noop"}]}"#;

/// The role workers run as (scripts/stack.sh makes it): the worker capability, no superuser.
pub const WORKER_ROLE: &str = "synapse_worker";

/// RUST_LOG of the workers tests start: the worker's debug lines in its log.
const TEST_LOG: &str = "synapse_worker=debug,info";

/// A `synapse-worker run` process against a stack; killed when dropped.
pub struct WorkerProcess {
    child: std::process::Child,
    /// Where its log goes.
    pub log: PathBuf,
}

/// The example worker with a custom action, built by `make test-e2e`.
pub fn example_binary(name: &str) -> PathBuf {
    workspace_root().join("target/debug/examples").join(name)
}

/// The worker binary `make test-e2e` builds before the tests.
pub fn worker_binary() -> PathBuf {
    std::env::var_os("SYNAPSE_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/synapse-worker"))
}

impl Stack {
    /// Starts a worker with extra `run` flags; waits until it has registered
    /// its actions (its "worker started" log line).
    pub fn start_worker(&self, name: &str, flags: &[&str]) -> WorkerProcess {
        let mut args = vec!["--log-format", "text", "run"];
        args.extend_from_slice(flags);
        self.start_worker_binary(name, &worker_binary(), &args)
    }

    /// Starts `binary` (a worker built on the library) with `args`, like [`Stack::start_worker`].
    pub fn start_worker_binary(&self, name: &str, binary: &Path, args: &[&str]) -> WorkerProcess {
        let worker = self.spawn_worker_binary(name, binary, args, TEST_LOG);
        worker.wait_started();
        worker
    }

    /// Starts a worker with extra `run` flags, logging at `rust_log` (a
    /// `RUST_LOG` value, e.g. `info`), without waiting for it to start (see
    /// [`WorkerProcess::wait_started`]).
    pub fn spawn_worker(&self, name: &str, flags: &[&str], rust_log: &str) -> WorkerProcess {
        let mut args = vec!["--log-format", "text", "run"];
        args.extend_from_slice(flags);
        self.spawn_worker_binary(name, &worker_binary(), &args, rust_log)
    }

    /// Starts `binary` with `args` (after its global flags), logging at
    /// `rust_log`, without waiting for it to start.
    pub fn spawn_worker_binary(
        &self,
        name: &str,
        binary: &Path,
        args: &[&str],
        rust_log: &str,
    ) -> WorkerProcess {
        let log = self.dir.join(format!("worker-{name}.log"));
        let file = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(binary)
            .args(args)
            .env("SYNAPSE_DATABASE_URL", self.database_url_as(WORKER_ROLE))
            .env("SYNAPSE_REDIS_URL", self.redis_url())
            .env(
                "SSL_CERT_FILE",
                if self.secure.is_some() {
                    self.ca_file()
                } else {
                    PathBuf::new()
                },
            )
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "starting {}: {error} (run `make test-e2e`)",
                    binary.display()
                )
            });
        WorkerProcess { child, log }
    }
}

/// A `synapse-worker ui` process; killed when dropped.
pub struct ConsoleProcess {
    /// The process (its log, signals).
    pub process: WorkerProcess,
    /// Where it serves, e.g. `http://127.0.0.1:41234/`.
    pub url: String,
}

impl Stack {
    /// Starts the console as `role` on a free loopback port, with extra `ui`
    /// flags; waits until it listens.
    pub fn start_console(&self, name: &str, role: &str, flags: &[&str]) -> ConsoleProcess {
        let url = self.database_url_as(role);
        let mut args = vec!["--log-format", "text", "--database-url", &url, "ui"];
        if !flags.contains(&"--addr") {
            args.extend_from_slice(&["--addr", "127.0.0.1:0"]);
        }
        args.extend_from_slice(flags);
        let process = self.spawn_worker_binary(name, &worker_binary(), &args, TEST_LOG);
        let url = wait_until("the console to listen", Duration::from_secs(30), || {
            let log = process.log_text();
            let start = log.find("console started url=")? + "console started url=".len();
            let url = log[start..].split_whitespace().next()?.to_owned();
            Some(url)
        });
        ConsoleProcess { process, url }
    }
}

impl WorkerProcess {
    /// Waits until it has registered its actions (its "worker started" log line).
    pub fn wait_started(&self) {
        wait_until("the worker to start", Duration::from_secs(30), || {
            self.log_text().contains("worker started").then_some(())
        });
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for it to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_until("the worker to exit", limit, || {
            child.try_wait().expect("try_wait")
        })
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blueprint that runs `steps` one after another, in the order given.
pub fn chain_of(steps: Vec<serde_json::Value>) -> serde_json::Value {
    let edges: Vec<serde_json::Value> = steps
        .windows(2)
        .map(|pair| serde_json::json!({"from": pair[0]["id"], "to": pair[1]["id"]}))
        .collect();
    serde_json::json!({"steps": steps, "edges": edges})
}

/// A blueprint that runs `length` `noop` steps, `s0` to `s{length - 1}`, one
/// after another.
pub fn noop_chain(length: usize) -> serde_json::Value {
    chain_of(
        (0..length)
            .map(|i| serde_json::json!({"id": format!("s{i}"), "action": "noop"}))
            .collect(),
    )
}

/// A blueprint 1 → `width` → 1: a `noop` root `r`, `noop` steps `l0` to
/// `l{width - 1}` after it, and `join` (whose id is `j`) after them all.
/// Short ids keep wide fan-outs under the 1 MiB blueprint limit.
pub fn fan_out_of(width: usize, join: serde_json::Value) -> serde_json::Value {
    let mut steps = vec![serde_json::json!({"id": "r", "action": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        steps.push(serde_json::json!({"id": format!("l{i}"), "action": "noop"}));
        edges.push(serde_json::json!({"from": "r", "to": format!("l{i}")}));
        edges.push(serde_json::json!({"from": format!("l{i}"), "to": "j"}));
    }
    steps.push(join);
    serde_json::json!({"steps": steps, "edges": edges})
}

/// Submits `blueprint` and waits for its goal to end: its `goal_status()`.
pub fn run_plan(stack: &Stack, blueprint: serde_json::Value) -> serde_json::Value {
    let mut client = stack.pg();
    let id = submit_plan(&mut client, &blueprint);
    wait_for_goal(stack, id, Duration::from_secs(60))
}

/// The error of `step` in a goal's status (it must have one).
pub fn error_of(status: &serde_json::Value, step: &str) -> String {
    task(status, step)["error"]
        .as_str()
        .unwrap_or_else(|| panic!("step {step} has no error: {status}"))
        .to_owned()
}

/// `synapse.goal_status(goal)` as JSON.
pub fn goal_status(client: &mut postgres::Client, goal: i64) -> serde_json::Value {
    let text: String = client
        .query_one("SELECT synapse.goal_status($1)::text", &[&goal])
        .unwrap_or_else(|error| panic!("goal_status({goal}): {error}"))
        .get(0);
    serde_json::from_str(&text).expect("goal_status is JSON")
}

/// The status of `step` (the step's own row, not a map instance) in goal `goal`.
pub fn step_status(client: &mut postgres::Client, goal: i64, step: &str) -> String {
    client
        .query_one(
            "SELECT status FROM synapse.tasks WHERE goal_id = $1 AND step = $2 AND map_index IS NULL",
            &[&goal, &step],
        )
        .unwrap_or_else(|error| panic!("the status of step {step} of goal {goal}: {error}"))
        .get(0)
}

/// Waits until `step` of goal `goal` has status `status`.
pub fn wait_for_step(client: &mut postgres::Client, goal: i64, step: &str, status: &str) {
    wait_until(
        &format!("step {step} of goal {goal} to be {status}"),
        Duration::from_secs(60),
        || (step_status(client, goal, step) == status).then_some(()),
    );
}

/// Runs `sql`, which must fail: its SQLSTATE and message.
pub fn refused(
    client: &mut postgres::Client,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> (String, String) {
    let error = client
        .query(sql, params)
        .map(|rows| panic!("{sql} was accepted: {rows:?}"))
        .unwrap_err();
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a database error: {error}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// Waits for goals to end, on one connection that listens for their events:
/// a measurement that waits goal after goal pays for no new session (whose
/// start would compete with the goal's own dispatch for the CPU). Drop it
/// when done: a listener that stops reading holds up Postgres's
/// notification queue.
pub struct GoalWaiter<'s> {
    stack: &'s Stack,
    listener: postgres::Client,
}

impl<'s> GoalWaiter<'s> {
    /// A waiter on a new connection to `stack`, listening.
    pub fn new(stack: &'s Stack) -> Self {
        let mut listener = stack.pg();
        listener
            .batch_execute("LISTEN synapse_events")
            .expect("LISTEN");
        GoalWaiter { stack, listener }
    }

    /// Waits for goal `id` to end (or fails the test after `limit`): its
    /// `goal_status()`.
    pub fn wait(&mut self, id: i64, limit: Duration) -> serde_json::Value {
        use postgres::fallible_iterator::FallibleIterator;
        let deadline = Instant::now() + limit;
        loop {
            let status: serde_json::Value = self
                .listener
                .query_one("SELECT synapse.goal_status($1)::text", &[&id])
                .map(|row| serde_json::from_str(row.get::<_, &str>(0)).expect("JSON"))
                .expect("goal_status");
            if matches!(
                status["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return status;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "goal {id} did not end within {limit:?}: {status}\n{}",
                self.stack.diagnostics()
            );
            // Any goal event may be ours; look again after each, and at least
            // every second (with synapse.observe or notify off, none may come).
            let mut notifications = self.listener.notifications();
            let mut iter = notifications.timeout_iter(left.min(Duration::from_secs(1)));
            while let Ok(Some(note)) = iter.next() {
                if note.payload().contains(&format!("\"goal_id\":{id}}}")) {
                    break;
                }
            }
        }
    }
}

/// Waits, on NOTIFY events rather than by polling, until goal `id` has ended;
/// returns its `goal_status()`.
pub fn wait_for_goal(stack: &Stack, id: i64, limit: Duration) -> serde_json::Value {
    GoalWaiter::new(stack).wait(id, limit)
}

/// Step → task row fields, from a `goal_status()`.
pub fn task<'a>(status: &'a serde_json::Value, step: &str) -> &'a serde_json::Value {
    status["tasks"]
        .as_array()
        .and_then(|tasks| tasks.iter().find(|task| task["step"] == step))
        .unwrap_or_else(|| panic!("no step {step} in {status}"))
}

/// `(from, to)` → edge state, from a `goal_status()`.
pub fn edge_state(status: &serde_json::Value, from: &str, to: &str) -> String {
    status["edges"]
        .as_array()
        .and_then(|edges| {
            edges
                .iter()
                .find(|edge| edge["from"] == from && edge["to"] == to)
        })
        .and_then(|edge| edge["state"].as_str())
        .unwrap_or_else(|| panic!("no edge {from} -> {to} in {status}"))
        .to_owned()
}

/// Waits until the goal's only (or first) task is `running`, i.e. claimed by a worker.
pub fn wait_for_running_task(client: &mut postgres::Client, goal_id: i64) {
    wait_until("the task to run", Duration::from_secs(60), || {
        let running: bool = client
            .query_one(
                "SELECT bool_or(status = 'running') FROM synapse.tasks WHERE goal_id = $1",
                &[&goal_id],
            )
            .expect("task status")
            .get::<_, Option<bool>>(0)
            .unwrap_or(false);
        running.then_some(())
    });
}

/// What `pg_stat_statements` counted for the statements whose text matches
/// `sql_like` (the query asking left out): their calls, and the buffers
/// they touched (shared hits and reads).
pub fn statement_counts(client: &mut postgres::Client, sql_like: &str) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint,
                    coalesce(sum(shared_blks_hit + shared_blks_read), 0)::bigint
               FROM pg_stat_statements
              WHERE query LIKE $1 AND query NOT LIKE '%pg_stat_statements%'",
            &[&sql_like],
        )
        .expect("pg_stat_statements");
    (row.get(0), row.get(1))
}

/// Asserts that nothing happens during a quiet window: no statement in
/// `pg_stat_statements` whose text matches `sql_like` (other than the probe's
/// own), and no Redis command (besides the probe's INFO) is counted.
pub fn assert_quiet(
    client: &mut postgres::Client,
    redis: &mut redis::Connection,
    sql_like: &str,
    window: Duration,
) {
    let statements = |client: &mut postgres::Client| statement_counts(client, sql_like).0;
    let commands = |redis: &mut redis::Connection| -> String {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(redis)
            .expect("INFO");
        info.lines()
            .filter(|line| line.starts_with("cmdstat_") && !line.starts_with("cmdstat_info"))
            .map(|line| line.split(',').next().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
            .join(";")
    };
    // What was under way when the caller saw its work done (the forwarder
    // finishing its turn) ends first: the count must hold still for a moment.
    let mut last = statements(client);
    wait_until("the statements to settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = statements(client);
        let settled = now == last;
        last = now;
        settled.then_some(())
    });
    let sql_before = statements(client);
    let redis_before = commands(redis);
    // Nothing announces "nothing happened": observe a quiet window.
    std::thread::sleep(window);
    assert_eq!(statements(client), sql_before, "SQL ran while idle");
    assert_eq!(commands(redis), redis_before, "Redis commands while idle");
}

/// The M3 template: parse a goal's numbers, then page or file it depending on
/// the data, then close. Shared by the tests and the benchmark.
pub const TRIAGE: &str = r#"{
  "name": "triage",
  "steps": [
    {"id": "parse", "action": "transform", "input": "goal.params",
     "params": {"expr": "{'priority': int(input.severity), 'incident': input.id}"}},
    {"id": "page", "action": "transform", "params": {"expr": "{'paged': input.parse.incident}"}},
    {"id": "backlog", "action": "noop"},
    {"id": "close", "action": "noop"}
  ],
  "edges": [
    {"from": "parse", "to": "page", "when": "result.priority > 3"},
    {"from": "parse", "to": "backlog", "when": "result.priority <= 3"},
    {"from": "page", "to": "close"},
    {"from": "backlog", "to": "close"}
  ],
  "output": "{'branch': steps.page.status == 'succeeded' ? 'page' : 'backlog', 'incident': steps.parse.result.incident}"
}"#;

/// Every event in the `synapse:events` stream so far, parsed, oldest first.
pub fn stream_events(redis: &mut redis::Connection) -> Vec<serde_json::Value> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("synapse:events")
        .arg("-")
        .arg("+")
        .query(redis)
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| {
            let payload: String = entry.get("payload").expect("a payload field");
            serde_json::from_str(&payload).expect("a JSON payload")
        })
        .collect()
}

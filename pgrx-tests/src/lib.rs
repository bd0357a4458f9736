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
}

/// Database the forwarder serves in test stacks.
pub const DATABASE: &str = "synapse";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

impl Stack {
    /// Starts a stack named after the test. `conf` lines are appended to
    /// postgresql.conf (e.g. `synapse.sweep_interval = '1s'`).
    pub fn start(name: &str, conf: &[&str]) -> Stack {
        let dir = workspace_root()
            .join("target/e2e")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the stack folder");
        let stack = Stack {
            dir,
            pg_port: free_port(),
            redis_port: free_port(),
            extra_conf: conf.join("\n"),
        };
        stack.script(&["up"]);
        stack.wait_for_forwarder();
        stack
    }

    fn script(&self, args: &[&str]) {
        let output = Command::new(workspace_root().join("scripts/stack.sh"))
            .args(args)
            .env("SYNAPSE_STACK_DIR", &self.dir)
            .env("SYNAPSE_PGPORT", self.pg_port.to_string())
            .env("SYNAPSE_REDIS_PORT", self.redis_port.to_string())
            .env("SYNAPSE_DATABASE", DATABASE)
            .env("SYNAPSE_PG_CONF", &self.extra_conf)
            .output()
            .expect("running scripts/stack.sh");
        assert!(
            output.status.success(),
            "stack.sh {args:?} failed: {}{}\n--- postgres log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.postgres_log()
        );
    }

    /// The server log, for failure messages.
    pub fn postgres_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Connection string of the test database.
    pub fn database_url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{DATABASE}",
            self.pg_port
        )
    }

    /// Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.redis_port)
    }

    /// A new Postgres connection to the test database.
    pub fn pg(&self) -> postgres::Client {
        postgres::Client::connect(&self.database_url(), postgres::NoTls)
            .expect("connecting to postgres")
    }

    /// A new Redis connection.
    pub fn redis(&self) -> redis::Connection {
        let connection = redis::Client::open(self.redis_url())
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
        self.script(&["down"]);
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

/// A blueprint with one `noop` step, as JSON text.
pub const ONE_STEP: &str = r#"{"steps":[{"id":"only","action":"noop"}]}"#;

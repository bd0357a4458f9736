//! What a step or an unlucky start cannot do to a worker: `sql` steps cannot
//! change the session the engine (or the next step) uses; results are bounded;
//! SIGTERM and SIGINT stop the worker and the waiting commands in every state,
//! waiting for Postgres or Redis included.
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::json;
use synapse_e2e::{
    error_of, run_plan, submit_plan, submit_plan_with_input, task, wait_for_goal,
    wait_for_running_task, wait_until, worker_binary, Stack,
};

const WAIT: Duration = Duration::from_secs(60);

/// How long a process may take to exit after SIGTERM/SIGINT: a bound on
/// waiting, not a timing assertion (it should take well under a second).
const EXIT_DEADLINE: Duration = Duration::from_secs(5);

/// A local port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

/// A folder for the logs of tests that need no stack.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/e2e")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch folder");
    dir
}

/// A `synapse-worker` process started with `args` and exactly the given
/// `SYNAPSE_*` variables; its output goes to a log file. Killed when dropped.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(log: PathBuf, args: &[&str], env: &[(&str, String)]) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(worker_binary());
        command
            .args(args)
            .env_remove("SYNAPSE_DATABASE_URL")
            .env_remove("SYNAPSE_REDIS_URL")
            .env("RUST_LOG", "synapse_worker=debug,info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap_or_else(|error| {
            panic!("starting synapse-worker: {error} (run `make test-e2e`)")
        });
        Process { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&self, text: &str) {
        wait_until(&format!("{text:?} in the log"), WAIT, || {
            self.log_text().contains(text).then_some(())
        });
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Its exit status, waiting at most [`EXIT_DEADLINE`].
    fn exit(&mut self) -> ExitStatus {
        let child = &mut self.child;
        let log = &self.log;
        let deadline = std::time::Instant::now() + EXIT_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running {EXIT_DEADLINE:?} after the signal:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker against `stack` with extra `run` flags; waits until it started.
fn worker(stack: &Stack, name: &str, flags: &[&str]) -> Process {
    let mut args = vec!["--log-format", "text", "run"];
    args.extend_from_slice(flags);
    let process = Process::start(
        stack.path(&format!("worker-{name}.log")),
        &args,
        &[
            ("SYNAPSE_DATABASE_URL", stack.database_url()),
            ("SYNAPSE_REDIS_URL", stack.redis_url()),
        ],
    );
    process.wait_for_log("worker started");
    process
}

#[test]
fn sql_steps_cannot_change_the_session_of_the_engine_or_of_later_steps() {
    let stack = Stack::start("sql-session", &[]);
    let mut client = stack.pg();
    // One task at a time: the `sql` steps share one connection, over and over.
    let _worker = worker(&stack, "w", &["--concurrency", "1"]);
    let sql = |id: &str, query: &str| json!({"id": id, "action": "sql", "retries": 2, "backoff": "250ms", "params": {"query": query}});
    let status = run_plan(
        &stack,
        json!({"steps": [
            sql("set_timeout", "SET statement_timeout = '1ms'"),
            sql("begin", "/* looks harmless */ -- really\n  begin"),
            sql("set_role", "set role postgres"),
            sql("listen", "LISTEN synapse_events"),
            sql("two", "select 1; commit"),
            // A function call cannot be refused by reading the statement: the
            // session is reset after the step instead.
            sql("poison", "select set_config('statement_timeout', '1ms', false) as timeout, \
                           set_config('synapse_test.poison', 'yes', false) as poison"),
        ]}),
    );
    assert_eq!(status["status"], "failed", "{status}");
    for (step, refused) in [
        (
            "set_timeout",
            "sql: SET is refused: a step cannot change its database session",
        ),
        (
            "begin",
            "sql: BEGIN is refused: a step cannot control transactions",
        ),
        ("set_role", "sql: SET is refused"),
        ("listen", "sql: LISTEN is refused"),
        (
            "two",
            "sql: params.query holds 2 statements; a step runs exactly one",
        ),
    ] {
        let error = error_of(&status, step);
        assert!(error.starts_with(refused), "{step}: {error}");
        assert_eq!(task(&status, step)["status"], "failed");
        assert_eq!(
            task(&status, step)["attempts"],
            1,
            "{step}: refused, not retried"
        );
    }
    assert_eq!(task(&status, "poison")["status"], "succeeded", "{status}");
    assert_eq!(
        task(&status, "poison")["result"],
        json!({"rows": [{"timeout": "1ms", "poison": "yes"}]})
    );

    // Many more goals on the same worker and connections: none sees the poison,
    // each step runs under its own timeout, and the engine is unharmed. (A reset
    // leaves a custom setting that a session once had empty, not undefined.)
    let probe = json!({"steps": [
        {"id": "probe", "action": "sql", "timeout": "30s",
         "params": {"query": "select coalesce(current_setting('synapse_test.poison', true), '') as poison, \
                                     current_setting('statement_timeout') as timeout, \
                                     (select true from pg_sleep(0.01)) as slept, \
                                     (select count(*) from pg_listening_channels()) as listening"}},
        {"id": "after", "action": "noop"}],
        "edges": [{"from": "probe", "to": "after"}]});
    let ids: Vec<i64> = (0..30).map(|_| submit_plan(&mut client, &probe)).collect();
    for id in ids {
        let status = wait_for_goal(&stack, id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(
            task(&status, "probe")["result"],
            json!({"rows": [{"poison": "", "timeout": "30s", "slept": true, "listening": 0}]}),
            "{status}"
        );
    }

    // The step's timeout bounds its statement.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "slow", "action": "sql", "timeout": "1s",
                          "params": {"query": "select pg_sleep(30)"}}]}),
    );
    assert_eq!(task(&status, "slow")["status"], "failed", "{status}");
    let error = error_of(&status, "slow");
    assert!(
        error.contains("statement timeout") || error.contains("timed out after 1s"),
        "{error}"
    );

    // A failed statement's writes are rolled back with it.
    client
        .batch_execute("CREATE TABLE public.audit (id int PRIMARY KEY)")
        .unwrap();
    let status = run_plan(
        &stack,
        json!({"steps": [
            {"id": "write", "action": "sql", "params": {"query": "insert into audit values (1)"}},
            {"id": "fails", "action": "sql",
             "params": {"query": "insert into audit select g from generate_series(2, 3) g union all select 1"}}],
         "edges": [{"from": "write", "to": "fails"}]}),
    );
    assert_eq!(task(&status, "write")["status"], "succeeded", "{status}");
    assert!(error_of(&status, "fails").contains("23505"), "{status}");
    let count: i64 = client
        .query_one("SELECT count(*) FROM public.audit", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "only the first step's row");
}

/// Serves `bodies.len()` requests on a local port, answering the n-th with a
/// 200 and `bodies[n]` bytes of `x`, announced by Content-Length or not (then
/// the body ends when the connection closes). A client that hangs up early
/// is fine.
fn big_body_server(bodies: Vec<(usize, bool)>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (size, announced) in bodies {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let mut stream = stream;
            let length = if announced {
                format!("content-length: {size}\r\n")
            } else {
                String::new()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{length}connection: close\r\n\r\n"
            );
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = size;
            while left > 0 {
                let n = left.min(chunk.len());
                if stream.write_all(&chunk[..n]).is_err() {
                    break;
                }
                left -= n;
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
            // Drain whatever is left so the close is orderly.
            let _ = reader.read_to_end(&mut Vec::new());
        }
    });
    port
}

const MIB: usize = 1024 * 1024;

#[test]
fn results_over_the_limit_fail_their_step_and_the_worker_keeps_serving() {
    let stack = Stack::start("result-limit", &[]);
    let mut default_limit = worker(
        &stack,
        "default",
        &["--allow-exec", "/bin/sh", "--allow-http", "127.0.0.1"],
    );
    let port = big_body_server(vec![(2 * MIB, true), (2 * MIB, false), (1000, true)]);
    let limit_error = "result is larger than the 1 MiB limit (--max-result-size)";
    let http = |id: &str, path: &str| {
        json!({"id": id, "action": "http", "retries": 2, "backoff": "250ms",
               "params": {"url": format!("http://127.0.0.1:{port}/{path}")}})
    };
    let status = run_plan(&stack, json!({"steps": [http("announced", "a")]}));
    let error = error_of(&status, "announced");
    assert!(error.ends_with(limit_error), "{error}");
    assert_eq!(task(&status, "announced")["attempts"], 1, "not retried");
    let status = run_plan(&stack, json!({"steps": [http("streamed", "b")]}));
    let error = error_of(&status, "streamed");
    assert_eq!(
        error,
        format!("GET http://127.0.0.1:{port}/b: {limit_error}")
    );
    let status = run_plan(&stack, json!({"steps": [http("small", "c")]}));
    assert_eq!(task(&status, "small")["status"], "succeeded", "{status}");

    // A program printing without end is stopped at the limit, with its group.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "chatty", "action": "exec", "timeout": "60s",
                          "params": {"argv": ["/bin/sh", "-c", "sleep 600 & while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; done"]}}]}),
    );
    let error = error_of(&status, "chatty");
    assert_eq!(error, format!("program \"/bin/sh\": {limit_error}"));
    let leftovers = Command::new("pgrep")
        .args(["-f", "^sleep 600$"])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(),
        "the program's background process outlived it"
    );

    // The worker is still serving.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "still", "action": "noop"}]}),
    );
    assert_eq!(status["status"], "succeeded", "{status}");
    default_limit.signal("TERM");
    assert!(
        default_limit.exit().success(),
        "{}",
        default_limit.log_text()
    );

    // A smaller limit applies to every action: sql rows, and any result at all.
    let _small = worker(&stack, "small", &["--max-result-size", "64KiB"]);
    let mut client = stack.pg();
    let id = submit_plan_with_input(
        &mut client,
        &json!({"steps": [
            {"id": "rows", "action": "sql", "params": {"query": "select repeat('x', 100000) as big"}},
            {"id": "echo", "action": "noop"},
            {"id": "fits", "action": "sql", "params": {"query": "select repeat('x', 1000) as small"}}]}),
        &json!({"text": "y".repeat(100_000)}),
    );
    let status = wait_for_goal(&stack, id, WAIT);
    let small_error = "result is larger than the 64 KiB limit (--max-result-size)";
    assert_eq!(error_of(&status, "rows"), format!("sql: {small_error}"));
    assert_eq!(error_of(&status, "echo"), small_error);
    assert_eq!(task(&status, "fits")["status"], "succeeded", "{status}");

    let bad = Command::new(worker_binary())
        .args(["run", "--max-result-size", "1 MB"])
        .output()
        .expect("running synapse-worker");
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid size \"1 MB\""), "{stderr}");
}

#[test]
fn sigterm_and_sigint_stop_a_worker_waiting_for_postgres() {
    let dir = scratch("wait-postgres");
    for signal in ["TERM", "INT"] {
        // A mistyped port: nothing answers there.
        let mut process = Process::start(
            dir.join(format!("worker-{signal}.log")),
            &["--log-format", "text", "run"],
            &[
                (
                    "SYNAPSE_DATABASE_URL",
                    format!("postgresql://postgres@127.0.0.1:{}/synapse", closed_port()),
                ),
                (
                    "SYNAPSE_REDIS_URL",
                    format!("redis://127.0.0.1:{}/0", closed_port()),
                ),
            ],
        );
        process.wait_for_log("cannot reach postgres");
        // Into the longer pauses of the backoff.
        wait_until("a few retries", WAIT, || {
            (process.log_text().matches("cannot reach postgres").count() >= 4).then_some(())
        });
        process.signal(signal);
        let status = process.exit();
        assert!(
            status.success(),
            "SIG{signal}: {status:?}\n{}",
            process.log_text()
        );
    }
}

#[test]
fn sigterm_and_sigint_stop_a_worker_waiting_for_redis_and_one_with_work_while_postgres_is_down() {
    let stack = Stack::start("wait-redis", &[]);
    for signal in ["INT", "TERM"] {
        let mut process = Process::start(
            stack.path(&format!("worker-no-redis-{signal}.log")),
            &["--log-format", "text", "run"],
            &[
                ("SYNAPSE_DATABASE_URL", stack.database_url()),
                (
                    "SYNAPSE_REDIS_URL",
                    format!("redis://127.0.0.1:{}/0", closed_port()),
                ),
            ],
        );
        process.wait_for_log("cannot reach redis");
        wait_until("a few retries", WAIT, || {
            (process.log_text().matches("cannot reach redis").count() >= 4).then_some(())
        });
        process.signal(signal);
        let status = process.exit();
        assert!(
            status.success(),
            "SIG{signal}: {status:?}\n{}",
            process.log_text()
        );
    }

    // Work in flight, and Postgres gone: the task cannot be released, the
    // worker still stops, and says why.
    let mut busy = worker(&stack, "busy", &["--grace", "300ms"]);
    let mut client = stack.pg();
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "long", "action": "sleep", "params": {"ms": 600000}}]}),
    );
    wait_for_running_task(&mut client, id);
    drop(client);
    stack.stop_postgres();
    busy.signal("TERM");
    let status = busy.exit();
    assert!(status.success(), "{status:?}\n{}", busy.log_text());
    assert!(
        busy.log_text().contains("worker stopped"),
        "{}",
        busy.log_text()
    );
}

#[test]
fn waiting_commands_stop_at_sigint_and_sigterm() {
    let stack = Stack::start("wait-cli", &[]);
    let mut client = stack.pg();
    // A step on a queue no worker serves: the goal never ends.
    let stuck = json!({"steps": [{"id": "never", "action": "noop", "queue": "nobody"}]});
    let id = submit_plan(&mut client, &stuck).to_string();
    let env = [("SYNAPSE_DATABASE_URL", stack.database_url())];

    let mut watch = Process::start(stack.path("watch.log"), &["watch", &id], &env);
    watch.wait_for_log("never");
    watch.signal("INT");
    let status = watch.exit();
    assert_eq!(status.code(), Some(130), "{}", watch.log_text());
    assert!(
        watch.log_text().contains("interrupted by SIGINT"),
        "{}",
        watch.log_text()
    );

    // No worker plans it: it stays submitted.
    let mut submit = Process::start(
        stack.path("submit.log"),
        &["submit", "stuck", "--wait"],
        &env,
    );
    submit.wait_for_log("waiting for it to end");
    submit.signal("TERM");
    let status = submit.exit();
    assert_eq!(status.code(), Some(143), "{}", submit.log_text());
}

//! Attempt history, workers that stop responding, and work nothing will run,
//! with real `synapse-worker` processes.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{
    goal_status, submit_plan, task, wait_for_goal, wait_for_running_task, wait_until,
    worker_binary, Stack,
};

const WAIT: Duration = Duration::from_secs(60);

/// Answers HTTP requests on a local port: `500` to the first `failures`,
/// then `200 {"ok":true}`; serves `requests` requests. Returns the port.
fn flaky_server(failures: usize, requests: usize) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (served, stream) in listener.incoming().take(requests).enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (status, reply) = if served < failures {
                (500, r#"{"error":"not yet"}"#)
            } else {
                (200, r#"{"ok":true}"#)
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    port
}

/// The identity a worker process records (`host:pid`).
fn identity_of(worker: &synapse_e2e::WorkerProcess) -> String {
    let log = worker.log_text();
    let start = log.find("identity=").expect("the worker logs its identity") + "identity=".len();
    log[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_owned()
}

#[test]
fn every_failed_attempt_is_kept_with_its_worker_times_and_error() {
    let stack = Stack::start("attempts-history", &[]);
    let mut client = stack.pg();
    let worker = stack.start_worker("w", &["--allow-http", "127.0.0.1"]);
    let identity = identity_of(&worker);
    assert!(
        identity.ends_with(&format!(":{}", worker.pid())),
        "{identity}"
    );
    let port = flaky_server(2, 3);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "notify", "action": "http", "retries": 2, "backoff": "50ms",
                           "params": {"method": "POST", "url": format!("http://127.0.0.1:{port}/hook")}}]}),
    );
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let notify = task(&status, "notify");
    assert_eq!(notify["attempts"], 3, "{status}");
    let history = notify["attempts_history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "only failures are kept: {status}");
    for (index, attempt) in history.iter().enumerate() {
        assert_eq!(attempt["attempt"], index as i64 + 1, "{status}");
        assert_eq!(attempt["worker"], identity.as_str(), "{status}");
        assert!(attempt["started_at"].is_string(), "{status}");
        assert!(attempt["finished_at"].is_string(), "{status}");
        let error = attempt["error"].as_str().unwrap();
        assert!(
            error.starts_with(&format!("POST http://127.0.0.1:{port}/hook answered 500")),
            "{error}"
        );
    }
    let ordered: bool = client
        .query_one(
            "SELECT bool_and(started_at <= finished_at) FROM synapse.attempts
              WHERE task_id = (SELECT id FROM synapse.tasks WHERE goal_id = $1)",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(ordered);

    // The worker told each failure at WARN, with what happens next.
    let log = worker.log_text();
    let failures: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("attempt failed"))
        .collect();
    assert_eq!(failures.len(), 2, "{log}");
    for (index, line) in failures.iter().enumerate() {
        assert!(line.contains(&format!("goal_id={id}")), "{line}");
        assert!(line.contains("step=notify"), "{line}");
        assert!(line.contains(&format!("attempt={}", index + 1)), "{line}");
        assert!(line.contains("next=retry at 20"), "{line}");
    }

    // `status` shows the history.
    let shown = Command::new(worker_binary())
        .args(["status", &id.to_string()])
        .env("SYNAPSE_DATABASE_URL", stack.database_url())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(shown.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        task(&shown, "notify")["attempts_history"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // So does `watch`, one line per failed attempt when its output is a pipe.
    let watched = Command::new(worker_binary())
        .args(["watch", &id.to_string()])
        .env("SYNAPSE_DATABASE_URL", stack.database_url())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(watched.status.code(), Some(0));
    let watched = String::from_utf8_lossy(&watched.stdout);
    for number in 1..=2 {
        assert!(
            watched.lines().any(|line| line
                .starts_with(&format!("notify: attempt {number} failed on {identity}"))
                && line.contains("answered 500")),
            "{watched}"
        );
    }
}

#[test]
fn a_step_with_no_attempt_left_whose_worker_died_says_what_may_have_happened() {
    let stack = Stack::start("attempts-lost", &[]);
    let mut client = stack.pg();
    let doomed = stack.start_worker("doomed", &["--lease", "1s"]);
    let identity = identity_of(&doomed);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "fragile", "action": "sleep", "params": {"ms": 60000}}]}),
    );
    wait_for_running_task(&mut client, id);
    doomed.signal("KILL");
    let mut next = stack.start_worker("next", &[]);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let expected = format!(
        "lease of attempt 1 expired: worker {identity} stopped responding; \
         whatever the step did may or may not have happened; no attempt left"
    );
    let fragile = task(&status, "fragile");
    assert_eq!(fragile["error"], expected.as_str(), "{status}");
    let history = fragile["attempts_history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{status}");
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[0]["worker"], identity.as_str());
    assert_eq!(history[0]["error"], expected.as_str());
    assert!(history[0]["started_at"].is_string(), "{status}");
    // The dead worker is not counted as serving its queue any more; the live one is.
    let live: Vec<String> = client
        .query(
            "SELECT identity FROM synapse.workers
              WHERE stopped_at IS NULL AND (lost_at IS NULL OR last_seen_at > lost_at)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(live, vec![identity_of(&next)]);
    next.signal("TERM");
    assert!(next.wait(WAIT).success());
}

/// A scratch folder for a CLI run, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn queued_work_no_live_worker_serves_is_told_until_one_starts() {
    let stack = Stack::start("attempts-no-worker", &[]);
    let mut client = stack.pg();
    let default = stack.start_worker("default", &[]);
    assert!(
        !default.log_text().contains("differs from the extension"),
        "{}",
        default.log_text()
    );
    let dir = Scratch(std::env::temp_dir().join(format!("attempts-cli-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let plan = dir.0.join("gpu.json");
    std::fs::write(
        &plan,
        r#"{"steps": [{"id": "render", "action": "noop", "queue": "gpu"}]}"#,
    )
    .unwrap();
    let err_path = dir.0.join("stderr");
    let mut submit = Command::new(worker_binary())
        .args(["submit", "--plan", plan.to_str().unwrap(), "--wait"])
        .current_dir(&dir.0)
        .env("SYNAPSE_DATABASE_URL", stack.database_url())
        .env_remove("SYNAPSE_REDIS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let id: i64 = wait_until("submit --wait to tell the missing worker", WAIT, || {
        let text = std::fs::read_to_string(&err_path).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.ends_with(": queue gpu: no worker"))?;
        line.strip_prefix("goal ")?.split(':').next()?.parse().ok()
    });
    let status = goal_status(&mut client, id);
    assert_eq!(status["notes"], json!(["queue gpu: no worker"]), "{status}");
    assert_eq!(task(&status, "render")["status"], "queued", "{status}");

    // `watch`, piped, tells it too, and follows the goal to its end.
    let watch_out = dir.0.join("watch");
    let mut watch = Command::new(worker_binary())
        .args(["watch", &id.to_string()])
        .env("SYNAPSE_DATABASE_URL", stack.database_url())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .spawn()
        .unwrap();
    wait_until("watch to tell the missing worker", WAIT, || {
        std::fs::read_to_string(&watch_out)
            .unwrap_or_default()
            .lines()
            .any(|line| line == format!("goal {id}: queue gpu: no worker"))
            .then_some(())
    });

    let mut gpu = stack.start_worker("gpu", &["--queues", "gpu"]);
    wait_until("submit --wait to end", WAIT, || {
        submit.try_wait().unwrap().map(|_| ())
    });
    let watched = wait_until("watch to end", WAIT, || watch.try_wait().unwrap());
    assert!(watched.success());
    let watched = std::fs::read_to_string(&watch_out).unwrap();
    assert!(
        watched
            .lines()
            .any(|line| line.starts_with(&format!("goal {id} succeeded"))),
        "{watched}"
    );
    let out = submit.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("goal {id} succeeded")),
        "{stdout}"
    );
    let status = goal_status(&mut client, id);
    assert_eq!(status["notes"], json!([]), "{status}");

    // Once the gpu worker has stopped, its queue is unserved again.
    gpu.signal("TERM");
    assert!(gpu.wait(WAIT).success());
    let again = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "render", "action": "noop", "queue": "gpu"}]}),
    );
    let status = goal_status(&mut client, again);
    assert_eq!(status["notes"], json!(["queue gpu: no worker"]), "{status}");
}

#[test]
fn a_worker_whose_key_prefix_differs_from_the_extension_s_warns() {
    let stack = Stack::start("attempts-prefix", &[]);
    let worker = stack.start_worker("other", &["--key-prefix", "elsewhere"]);
    let log = worker.log_text();
    let warning = log
        .lines()
        .find(|line| line.contains("--key-prefix differs from the extension's synapse.key_prefix"))
        .unwrap_or_else(|| panic!("no warning in {log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("key_prefix=elsewhere"), "{warning}");
    assert!(
        warning.contains("extension_key_prefix=synapse"),
        "{warning}"
    );
}

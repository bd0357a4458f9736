//! The `synapse-worker` command line against a real stack: every command and
//! its exit codes (0 ok, 1 goal failed or invalid, 2 usage, 64 configuration),
//! where it finds its settings (flag > environment > ./.synapse/env > default),
//! and what it says when it cannot connect.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use synapse_e2e::{wait_for_running_task, wait_until, worker_binary, Stack};

/// Runs the CLI in a folder of its own (no `./.synapse/env`) with the
/// stack's database in the environment.
fn cli(stack: &Stack, args: &[&str]) -> Output {
    let dir = Scratch::new("cli");
    cli_in(
        &dir.0,
        &[("SYNAPSE_DATABASE_URL", &stack.database_url())],
        args,
    )
}

/// Runs the CLI in `dir` with no Synapse setting in its environment but `env`.
fn cli_in(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(worker_binary());
    command
        .args(args)
        .current_dir(dir)
        .env_remove("SYNAPSE_DATABASE_URL")
        .env_remove("SYNAPSE_REDIS_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("running synapse-worker")
}

/// A fresh folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "synapse-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes `text` to `name` in the folder; its path.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const PLAN: &str = r#"{"steps": [{"id": "greet", "action": "transform", "params": {"expr": "'hello ' + input.name"}}]}"#;

#[test]
fn submit_status_graph_and_validate_with_their_exit_codes() {
    let stack = Stack::start("cli", &[]);
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.add_template('greet', '^greet (?P<name>\\w+)$', $1::text::jsonb)",
            &[&PLAN],
        )
        .unwrap();
    client
        .execute(
            "SELECT synapse.add_template('doomed', '^doomed$', '{\"steps\":[{\"id\":\"boom\",\"action\":\"fail\"}]}')",
            &[],
        )
        .unwrap();
    let _worker = stack.start_worker("w", &[]);

    let ok = cli(
        &stack,
        &[
            "submit",
            "greet world",
            "--input",
            r#"{"name": "world"}"#,
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    // One line: `goal ID succeeded in N s: RESULT`.
    let summary = stdout(&ok);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    let (head, result) = summary.trim_end().split_once(": ").unwrap();
    let id = head
        .strip_prefix("goal ")
        .and_then(|rest| rest.split_once(" succeeded in "))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("a summary of a success: {summary}"));
    assert!(head.ends_with(" s"), "{summary}");
    assert_eq!(
        serde_json::from_str::<Value>(result).unwrap(),
        serde_json::json!({"greet": "hello world"})
    );

    let failed = cli(&stack, &["submit", "doomed", "--wait", "--timeout", "60s"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let summary = stdout(&failed);
    assert!(
        summary.starts_with("goal ") && summary.contains(" failed: "),
        "{summary}"
    );
    assert_eq!(summary.lines().count(), 1, "{summary}");

    let json = cli(
        &stack,
        &["submit", "doomed", "--wait", "--json", "--timeout", "60s"],
    );
    assert_eq!(json.status.code(), Some(1), "{}", stderr(&json));
    let status: Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(status["status"], "failed");
    assert_eq!(status["tasks"][0]["step"], "boom");

    // A preview: the template, its params and steps; nothing is submitted.
    let preview = cli(&stack, &["plan", "greet world"]);
    assert_eq!(preview.status.code(), Some(0), "{}", stderr(&preview));
    let shown = stdout(&preview);
    for line in [
        "template: greet\n",
        "  name = \"world\"\n",
        "steps:\n  greet (transform) ",
    ] {
        assert!(shown.contains(line), "{line:?} missing from {shown}");
    }
    let nothing = cli(&stack, &["plan", "deploy the moon base"]);
    assert_eq!(nothing.status.code(), Some(1), "{}", stderr(&nothing));
    let shown = stdout(&nothing);
    assert!(
        shown.starts_with("template: none matches\nproblems:\n  goal: "),
        "{shown}"
    );
    let as_json = cli(&stack, &["plan", "greet world", "--json"]);
    let as_json: Value = serde_json::from_str(&stdout(&as_json)).unwrap();
    assert_eq!(as_json["params"], serde_json::json!({"name": "world"}));

    let queued = cli(&stack, &["submit", "greet later"]);
    assert_eq!(queued.status.code(), Some(0));
    assert!(
        stdout(&queued).trim().parse::<i64>().is_ok(),
        "prints the goal id: {}",
        stdout(&queued)
    );

    let status = cli(&stack, &["status", &id]);
    assert_eq!(status.status.code(), Some(0));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&status)).unwrap()["tasks"][0]["step"],
        "greet"
    );
    let missing = cli(&stack, &["status", "999999"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("goal 999999 does not exist"),
        "{}",
        stderr(&missing)
    );

    let mermaid = cli(&stack, &["graph", &id]);
    assert!(
        stdout(&mermaid).contains("greet[\"<b>greet</b><br/>transform · succeeded\"]:::succeeded"),
        "{}",
        stdout(&mermaid)
    );
    let dot = cli(&stack, &["graph", &id, "--format", "dot"]);
    assert!(stdout(&dot).starts_with("digraph synapse {"));
    let svg_path = std::env::temp_dir().join(format!("synapse-cli-{}.svg", std::process::id()));
    let svg = cli(
        &stack,
        &["graph", &id, "--output", svg_path.to_str().unwrap()],
    );
    assert_eq!(svg.status.code(), Some(0), "{}", stderr(&svg));
    let picture = std::fs::read_to_string(&svg_path).unwrap();
    assert!(
        picture.contains("<svg") && picture.contains("greet"),
        "an SVG of the DAG"
    );
    std::fs::remove_file(&svg_path).unwrap();

    let dir = std::env::temp_dir().join(format!("synapse-cli-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // With a database, the actions registered there are known too.
    client
        .execute(
            "INSERT INTO synapse.actions (name, description) VALUES ('resize_image', 'test')",
            &[],
        )
        .unwrap();
    let custom = dir.join("custom.json");
    std::fs::write(
        &custom,
        r#"{"steps": [{"id": "small", "action": "resize_image"}]}"#,
    )
    .unwrap();
    let registered = cli(&stack, &["validate", custom.to_str().unwrap()]);
    assert_eq!(
        registered.status.code(),
        Some(0),
        "{}{}",
        stdout(&registered),
        stderr(&registered)
    );
    let good = dir.join("good.json");
    std::fs::write(&good, PLAN).unwrap();
    let valid = cli(&stack, &["validate", good.to_str().unwrap()]);
    assert_eq!(valid.status.code(), Some(0));
    assert!(
        stdout(&valid).ends_with("good.json: ok\n"),
        "{}",
        stdout(&valid)
    );
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"steps": [{"id": "A", "action": "nope"}], "edges": [{"from": "A", "to": "b"}]}"#,
    )
    .unwrap();
    let invalid = cli(&stack, &["validate", bad.to_str().unwrap()]);
    assert_eq!(invalid.status.code(), Some(1));
    let listed = stdout(&invalid);
    for path in ["$.steps[0].id:", "$.steps[0].action:", "$.edges[0].to:"] {
        assert!(listed.contains(path), "{path} missing from {listed}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn submit_with_inputs_submits_a_goal_of_the_plan_per_line() {
    let stack = Stack::start("cli-inputs", &[]);
    let mut client = stack.pg();
    let dir = Scratch::new("cli-inputs");
    let plan = dir.write("plan.json", r#"{"steps":[{"id":"a","action":"noop"}]}"#);
    let inputs = dir.write("inputs.jsonl", "{\"n\": 1}\n\n{\"n\": 2}\n{\"n\": 3}\n");
    let submitted = cli(&stack, &["submit", "--plan", &plan, "--inputs", &inputs]);
    assert_eq!(submitted.status.code(), Some(0), "{}", stderr(&submitted));
    let ids: Vec<i64> = stdout(&submitted)
        .lines()
        .map(|line| line.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{}", stdout(&submitted));
    for (place, id) in ids.iter().enumerate() {
        let input: String = client
            .query_one("SELECT input::text FROM synapse.goals WHERE id = $1", &[id])
            .unwrap()
            .get(0);
        assert_eq!(
            serde_json::from_str::<Value>(&input).unwrap(),
            serde_json::json!({"n": place + 1})
        );
    }
    // A line that is not JSON: nothing is submitted, and the line is named.
    let bad = dir.write("bad.jsonl", "{\"n\": 4}\n{oops\n");
    let refused = cli(&stack, &["submit", "--plan", &plan, "--inputs", &bad]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("bad.jsonl line 2 is not JSON"),
        "{}",
        stderr(&refused)
    );
    let goals: i64 = client
        .query_one("SELECT count(*) FROM synapse.goals", &[])
        .unwrap()
        .get(0);
    assert_eq!(goals, 3);
}

#[test]
fn watch_follows_a_goal_to_its_end() {
    let stack = Stack::start("cli-watch", &[]);
    let mut client = stack.pg();
    let _worker = stack.start_worker("w", &[]);
    let id: i64 = client
        .query_one(
            r#"SELECT synapse.submit_plan('{"steps": [{"id": "wait", "action": "sleep", "params": {"ms": 500}},
                                                     {"id": "done", "action": "noop"}],
                                           "edges": [{"from": "wait", "to": "done"}]}')"#,
            &[],
        )
        .unwrap()
        .get(0);
    wait_for_running_task(&mut client, id);
    let watched = cli(&stack, &["watch", &id.to_string()]);
    assert_eq!(watched.status.code(), Some(0), "{}", stderr(&watched));
    let lines = stdout(&watched);
    let lines: Vec<&str> = lines.lines().collect();
    // Piped: no redrawn tables, one line per change, each change once.
    assert!(
        lines[0].starts_with(&format!("goal {id} · ")) && lines[0].ends_with(" · running"),
        "{lines:#?}"
    );
    assert!(
        lines.contains(&"wait: running (sleep, attempt 1)"),
        "{lines:#?}"
    );
    let changed = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(changed("wait: running"), 1, "{lines:#?}");
    assert_eq!(
        changed("wait: succeeded (sleep, attempt 1, "),
        1,
        "{lines:#?}"
    );
    assert_eq!(
        changed("done: succeeded (noop, attempt 1, "),
        1,
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("STEP")), "{lines:#?}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("goal {id} succeeded: ")),
        "{lines:#?}"
    );
    let position = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix)).unwrap();
    assert!(position("wait: succeeded") < position("done: succeeded"));

    // A goal that has already ended: where it stands, then its end.
    let again = cli(&stack, &["watch", &id.to_string()]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let again = stdout(&again);
    assert_eq!(again.lines().count(), 4, "{again}");
    assert!(
        again
            .lines()
            .last()
            .unwrap()
            .starts_with(&format!("goal {id} succeeded: ")),
        "{again}"
    );
}

#[test]
fn usage_and_configuration_errors_have_their_own_exit_codes() {
    let stack = Stack::start("cli-errors", &[]);
    let usage = cli(&stack, &["submit"]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    let unknown = cli(&stack, &["frobnicate"]);
    assert_eq!(unknown.status.code(), Some(2));
    let config = cli(&stack, &["run", "--concurrency", "0"]);
    assert_eq!(config.status.code(), Some(64), "{}", stderr(&config));
    assert!(
        stderr(&config).contains("--concurrency"),
        "{}",
        stderr(&config)
    );
    for threads in ["0", "257"] {
        let config = cli(&stack, &["run", "--threads", threads]);
        assert_eq!(config.status.code(), Some(64), "{}", stderr(&config));
        assert!(
            stderr(&config).contains("--threads must be between 1 and 256"),
            "{}",
            stderr(&config)
        );
    }
    let bad_url = cli(
        &stack,
        &["--database-url", "postgresql://[bad", "status", "1"],
    );
    assert_eq!(bad_url.status.code(), Some(64), "{}", stderr(&bad_url));
    for command in [
        "run", "submit", "plan", "status", "watch", "graph", "validate",
    ] {
        let help = cli(&stack, &[command, "--help"]);
        assert_eq!(help.status.code(), Some(0));
        assert!(
            stdout(&help).contains("Example"),
            "{command} --help has no example"
        );
    }
}

const TYPO: &str = r#"{"steps": [{"id": "fetch", "action": "noop"}, {"id": "ship", "action": "htp"}],
                       "edges": [{"from": "fetch", "to": "ship"}]}"#;

#[test]
fn validate_needs_no_database() {
    // No stack at all, nothing in the environment, no ./.synapse/env.
    let dir = Scratch::new("cli-offline");
    let good = dir.write("good.json", PLAN);
    let valid = cli_in(&dir.0, &[], &["validate", &good]);
    assert_eq!(valid.status.code(), Some(0), "{}", stderr(&valid));
    assert!(
        stdout(&valid).ends_with("good.json: ok\n"),
        "{}",
        stdout(&valid)
    );

    let typo = dir.write("typo.json", TYPO);
    let invalid = cli_in(&dir.0, &[], &["validate", &typo]);
    assert_eq!(invalid.status.code(), Some(1), "{}", stderr(&invalid));
    assert!(
        stdout(&invalid).starts_with("$.steps[1].action: unknown action \"htp\""),
        "{}",
        stdout(&invalid)
    );

    // A custom action: unknown offline, known from an --actions catalogue.
    let custom = dir.write(
        "custom.json",
        r#"{"steps": [{"id": "small", "action": "resize_image", "params": {"width": 64}}]}"#,
    );
    let unknown = cli_in(&dir.0, &[], &["validate", &custom]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        stdout(&unknown).contains("$.steps[0].action:"),
        "{}",
        stdout(&unknown)
    );
    let catalogue = dir.write(
        "actions.json",
        r#"[{"name": "resize_image", "description": "Resize an image",
             "params_schema": {"type": "object", "properties": {"width": {"type": "integer"}}}},
            {"name": "email"}]"#,
    );
    let known = cli_in(&dir.0, &[], &["validate", &custom, "--actions", &catalogue]);
    assert_eq!(
        known.status.code(),
        Some(0),
        "{}{}",
        stdout(&known),
        stderr(&known)
    );

    // Not JSON is a problem of the file (1); an unreadable file or catalogue is configuration (64).
    let broken = dir.write("broken.json", "{\"steps\": [");
    let not_json = cli_in(&dir.0, &[], &["validate", &broken]);
    assert_eq!(not_json.status.code(), Some(1));
    assert!(
        stdout(&not_json).starts_with("$: not JSON: "),
        "{}",
        stdout(&not_json)
    );
    let missing = cli_in(&dir.0, &[], &["validate", "no-such-file.json"]);
    assert_eq!(missing.status.code(), Some(64), "{}", stderr(&missing));
    assert!(
        stderr(&missing).contains("cannot read no-such-file.json"),
        "{}",
        stderr(&missing)
    );
    let bad_catalogue = dir.write("bad-actions.json", r#"{"name": "resize_image"}"#);
    let refused = cli_in(
        &dir.0,
        &[],
        &["validate", &custom, "--actions", &bad_catalogue],
    );
    assert_eq!(refused.status.code(), Some(64), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("--actions"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn the_stack_file_is_found_and_flags_and_environment_override_it() {
    let stack = Stack::start("cli-stack-file", &[]);
    // What `stack.sh up` wrote for this stack, where `make up` leaves it: ./.synapse/env.
    let settings = std::fs::read_to_string(stack.path("env")).expect("stack.sh up writes env");
    assert!(
        settings.contains(&format!(
            "export SYNAPSE_DATABASE_URL='{}'",
            stack.database_url()
        )),
        "{settings}"
    );
    assert!(
        settings.contains(&format!("export SYNAPSE_REDIS_URL='{}'", stack.redis_url())),
        "{settings}"
    );
    let dir = Scratch::new("cli-stack-file");
    dir.write(".synapse/env", &settings);
    let plan = dir.write("plan.json", PLAN);

    // A worker and a client with no flag and no environment: both find the stack.
    let log = dir.0.join("worker.log");
    let mut worker = Command::new(worker_binary())
        .args(["run"])
        .current_dir(&dir.0)
        .env_remove("SYNAPSE_DATABASE_URL")
        .env_remove("SYNAPSE_REDIS_URL")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_until("the worker to start", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("worker started").then_some(())
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("database_from=./.synapse/env"), "{text}");
    assert!(text.contains("redis_from=./.synapse/env"), "{text}");
    let submitted = cli_in(
        &dir.0,
        &[],
        &[
            "submit",
            "--plan",
            &plan,
            "--input",
            r#"{"name": "file"}"#,
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(submitted.status.code(), Some(0), "{}", stderr(&submitted));
    assert!(
        stdout(&submitted).contains(r#"succeeded in "#)
            && stdout(&submitted)
                .trim_end()
                .ends_with(r#": {"greet":"hello file"}"#),
        "{}",
        stdout(&submitted)
    );
    let _ = worker.kill();
    let _ = worker.wait();

    // The environment overrides the file, and the flag overrides both.
    let nowhere = format!("postgresql://postgres@127.0.0.1:{}/synapse", closed_port());
    let from_env = cli_in(
        &dir.0,
        &[("SYNAPSE_DATABASE_URL", &nowhere)],
        &["status", "1"],
    );
    assert_eq!(from_env.status.code(), Some(1));
    assert!(
        stderr(&from_env).contains("connection refused")
            && stderr(&from_env).contains("the URL is from SYNAPSE_DATABASE_URL"),
        "{}",
        stderr(&from_env)
    );
    let from_flag = cli_in(
        &dir.0,
        &[("SYNAPSE_DATABASE_URL", &nowhere)],
        &["--database-url", &stack.database_url(), "status", "1"],
    );
    assert_eq!(from_flag.status.code(), Some(0), "{}", stderr(&from_flag));
    let bad_file = Scratch::new("cli-stack-file-bad");
    bad_file.write(
        ".synapse/env",
        &format!("export SYNAPSE_DATABASE_URL='{nowhere}'\n"),
    );
    let from_file = cli_in(&bad_file.0, &[], &["status", "1"]);
    assert!(
        stderr(&from_file).contains("the URL is from ./.synapse/env"),
        "{}",
        stderr(&from_file)
    );
    // validate checks offline when the stack of ./.synapse/env is not there.
    let offline = cli_in(&bad_file.0, &[], &["validate", &plan]);
    assert_eq!(offline.status.code(), Some(0), "{}", stderr(&offline));
    let broken = Scratch::new("cli-stack-file-broken");
    broken.write(".synapse/env", "this is not an assignment\n");
    let unreadable = cli_in(&broken.0, &[], &["status", "1"]);
    assert_eq!(
        unreadable.status.code(),
        Some(64),
        "{}",
        stderr(&unreadable)
    );
    assert!(
        stderr(&unreadable).contains(".synapse/env"),
        "{}",
        stderr(&unreadable)
    );

    // A missing plan file is configuration (64); an invalid blueprint fails (1).
    let missing = cli_in(&dir.0, &[], &["submit", "--plan", "nope.json"]);
    assert_eq!(missing.status.code(), Some(64), "{}", stderr(&missing));
    let typo = dir.write("typo.json", TYPO);
    let invalid = cli_in(&dir.0, &[], &["submit", "--plan", &typo]);
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        stderr(&invalid).contains("unknown action \"htp\""),
        "{}",
        stderr(&invalid)
    );
}

#[test]
fn connection_errors_say_why_and_never_show_the_password() {
    let stack = Stack::start("cli-connect", &[]);
    let dir = Scratch::new("cli-connect");
    let plan = dir.write("plan.json", PLAN);
    let no_database = format!(
        "postgresql://postgres:s3cret-pw@127.0.0.1:{}/nosuchdb",
        stack.pg_port
    );
    let closed = format!(
        "postgresql://postgres:s3cret-pw@127.0.0.1:{}/synapse",
        closed_port()
    );
    let commands: [&[&str]; 7] = [
        &["status", "1"],
        &["watch", "1"],
        &["graph", "1"],
        &["submit", "some goal"],
        &["submit", "--plan", &plan, "--wait"],
        &["plan", "some goal"],
        &["validate", &plan],
    ];
    for (url, reason) in [
        (&no_database, "database \"nosuchdb\" does not exist"),
        (&closed, "connection refused"),
    ] {
        for command in commands {
            let mut args = vec!["--database-url", url.as_str()];
            args.extend_from_slice(command);
            let output = cli_in(&dir.0, &[], &args);
            let said = stderr(&output);
            assert_eq!(output.status.code(), Some(1), "{command:?}: {said}");
            assert!(said.contains(reason), "{command:?}: {said}");
            assert!(
                said.contains("postgres:***@127.0.0.1"),
                "{command:?}: {said}"
            );
            assert!(!said.contains("s3cret"), "{command:?}: {said}");
        }
    }

    // The worker: a database that does not exist ends it, saying so.
    let refused = cli_in(&dir.0, &[("SYNAPSE_DATABASE_URL", &no_database)], &["run"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("database \"nosuchdb\" does not exist"),
        "{}",
        stderr(&refused)
    );
    assert!(!stderr(&refused).contains("s3cret"), "{}", stderr(&refused));
    // A closed port: it logs why while it waits, until it is stopped.
    let log = dir.0.join("worker.log");
    let mut worker = Command::new(worker_binary())
        .args(["run", "--redis-url", &stack.redis_url()])
        .current_dir(&dir.0)
        .env("SYNAPSE_DATABASE_URL", &closed)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let logged = wait_until("the worker to log why", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("cannot reach postgres").then_some(text)
    });
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(worker.wait().unwrap().code(), Some(0));
    assert!(logged.contains("connection refused"), "{logged}");
    assert!(logged.contains("postgres:***@127.0.0.1"), "{logged}");
    assert!(!logged.contains("s3cret"), "{logged}");
}

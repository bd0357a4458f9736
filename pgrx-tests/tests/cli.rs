//! The `synapse-worker` command line against a real stack: every command and
//! its exit codes (0 ok, 1 goal failed or invalid, 2 usage, 64 configuration).
use std::process::{Command, Output};

use serde_json::Value;
use synapse_e2e::{wait_for_running_task, worker_binary, Stack};

fn cli(stack: &Stack, args: &[&str]) -> Output {
    Command::new(worker_binary())
        .args(args)
        .env("SYNAPSE_DATABASE_URL", stack.database_url())
        .env("NO_COLOR", "1")
        .output()
        .expect("running synapse-worker")
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
    let status: Value = serde_json::from_str(&stdout(&ok)).unwrap();
    assert_eq!(status["status"], "succeeded");
    assert_eq!(
        status["result"],
        serde_json::json!({"greet": "hello world"})
    );
    let id = status["id"].as_i64().unwrap().to_string();

    let failed = cli(&stack, &["submit", "doomed", "--wait", "--timeout", "60s"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    assert_eq!(
        serde_json::from_str::<Value>(&stdout(&failed)).unwrap()["status"],
        "failed"
    );

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
    let views = stdout(&watched);
    // Redrawn at each event: first with `wait` running, last with everything done.
    assert!(views.contains(" running "), "{views}");
    let last = views.trim_end().rsplit("goal ").next().unwrap();
    assert!(last.contains("· succeeded"), "{last}");
    assert!(last.contains("wait → done: taken"), "{last}");
    assert!(
        views.matches(&format!("goal {id} ·")).count() >= 2,
        "{views}"
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
    let bad_url = cli(
        &stack,
        &["--database-url", "postgresql://[bad", "status", "1"],
    );
    assert_eq!(bad_url.status.code(), Some(64), "{}", stderr(&bad_url));
    for command in ["run", "submit", "status", "watch", "graph", "validate"] {
        let help = cli(&stack, &[command, "--help"]);
        assert_eq!(help.status.code(), Some(0));
        assert!(
            stdout(&help).contains("Example"),
            "{command} --help has no example"
        );
    }
}

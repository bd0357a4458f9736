//! The console in a real headless Chromium (Debian's, driven by
//! pgrx-tests/browser/console.mjs with playwright-core): the list, a goal's
//! drawn plan, cancel and a signal seen without a reload, a map of a thousand
//! instances with a child goal, hostile text, the token link. It also takes
//! the screenshot of a goal page the README shows.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{submit_plan, submit_plan_with_input, wait_for_goal, wait_for_step, Stack};

const WAIT: Duration = Duration::from_secs(60);

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

#[test]
fn the_console_in_a_browser_follows_goals_live_and_acts_on_them() {
    let stack = Stack::start("console-browser", &[]);
    stack
        .pg()
        .batch_execute("CREATE ROLE alice LOGIN; SELECT synapse.grant_submitter('alice');")
        .unwrap();
    let _worker = stack.start_worker("w", &["--concurrency", "32"]);
    let mut alice = stack.pg_as("alice");

    let items: Vec<i64> = (0..1000).collect();
    let map = submit_plan_with_input(
        &mut alice,
        &json!({
            "steps": [
                {"id": "each", "action": "noop", "for_each": "goal.input.items"},
                {"id": "child", "action": "goal",
                 "params": {"blueprint": "{'steps': [{'id': 'inner', 'action': 'noop'}]}"}}
            ],
            "edges": [{"from": "each", "to": "child"}]
        }),
        &json!({"items": items}),
    );
    assert_eq!(wait_for_goal(&stack, map, WAIT)["status"], "succeeded");

    let hostile_text = "<img src=x onerror=window.pwned=1>";
    let hostile_error = "<script>window.pwned=2</script>";
    let hostile = submit_plan_with_input(
        &mut alice,
        &json!({
            "steps": [
                {"id": "evil", "action": "transform", "params": {"expr": format!("'{hostile_text}'")}},
                {"id": "boom", "action": "fail", "params": {"message": hostile_error}}
            ],
            "edges": [{"from": "evil", "to": "boom"}]
        }),
        &json!({"note": hostile_text}),
    );
    assert_eq!(wait_for_goal(&stack, hostile, WAIT)["status"], "failed");

    let waiting = submit_plan(
        &mut alice,
        r#"{"steps":[{"id":"hold","action":"wait","params":{"signal":"go"}}]}"#,
    );
    wait_for_step(&mut alice, waiting, "hold", "waiting");

    let branch = submit_plan(
        &mut alice,
        &json!({
            "steps": [
                {"id": "start", "action": "noop"},
                {"id": "approve", "action": "wait", "params": {"signal": "approval", "timeout": "1h"}},
                {"id": "pay", "action": "noop"},
                {"id": "reject", "action": "noop"}
            ],
            "edges": [
                {"from": "start", "to": "approve"},
                {"from": "approve", "to": "pay", "when": "result.payload.approved == true"},
                {"from": "approve", "to": "reject", "when": "result.payload.approved == false"}
            ]
        })
        .to_string(),
    );
    wait_for_step(&mut alice, branch, "approve", "waiting");

    let console = stack.start_console("ui", "alice", &[]);
    let token = "browser-test-token-0123456789";
    let guarded = stack.start_console("ui-token", "alice", &["--token", token]);
    let screenshot = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/console-goal.png");
    let test = json!({
        "url": console.url,
        "tokenUrl": guarded.url,
        "token": token,
        "all": [map, hostile, waiting, branch],
        "branch": branch,
        "branchSteps": ["start", "approve", "pay", "reject"],
        "branchConditions": ["result.payload.approved == true", "result.payload.approved == false"],
        "waiting": waiting,
        "map": map,
        "hostile": hostile,
        "hostileTexts": [hostile_text, hostile_error],
        "screenshot": screenshot,
    });
    assert!(
        browser_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `make setup`"
    );
    let output = Command::new("node")
        .arg("console.mjs")
        .current_dir(browser_dir())
        .env("CONSOLE_TEST", test.to_string())
        .output()
        .expect("running node (make setup installs it)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "no report from the browser: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert_eq!(
        report["problems"],
        json!([]),
        "{report}\n--- console log:\n{}",
        console.process.log_text()
    );
    assert!(output.status.success(), "{report}");
    // Timing is the benchmark's business; the figure is kept for the README.
    eprintln!("measured in the browser: {}", report["measured"]);
    let alice_left = synapse_e2e::goal_status(&mut alice, branch);
    assert_eq!(synapse_e2e::task(&alice_left, "pay")["status"], "succeeded");
    assert_eq!(
        synapse_e2e::goal_status(&mut alice, waiting)["status"],
        "cancelled"
    );
}

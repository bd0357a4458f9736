//! The console's HTTP side (SPEC §8), on the real stack: what each endpoint
//! answers and refuses, as its role sees the goals; the token and Host rules;
//! CSRF on actions; changes pushed as server-sent events.
use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};
use synapse_e2e::{submit_plan, wait_for_goal, wait_for_step, wait_until, worker_binary, Stack};

const WAIT: Duration = Duration::from_secs(60);

const WAITING: &str = r#"{"steps":[{"id":"hold","action":"wait","params":{"signal":"go"}},
                                   {"id":"after","action":"noop"}],
                          "edges":[{"from":"hold","to":"after"}]}"#;

fn http() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Submitters alice and bob; a worker.
fn stack(name: &str) -> Stack {
    let stack = Stack::start(name, &[]);
    stack
        .pg()
        .batch_execute(
            "CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN;
             SELECT synapse.grant_submitter('alice'); SELECT synapse.grant_submitter('bob');",
        )
        .unwrap();
    stack
}

fn get(client: &Client, url: &str) -> (StatusCode, Value) {
    let response = client.get(url).send().unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

/// The CSRF token the page was served with.
fn csrf(client: &Client, base: &str) -> String {
    let page = client.get(base).send().unwrap().text().unwrap();
    let start = page
        .find(r#"name="synapse-csrf" content=""#)
        .expect("the token's meta tag")
        + r#"name="synapse-csrf" content=""#.len();
    page[start..start + page[start..].find('"').unwrap()].to_owned()
}

fn post(client: &Client, url: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.header("x-csrf-token", token);
    }
    let response = request.send().unwrap();
    let status = response.status();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn the_console_shows_what_its_role_may_see_and_says_what_is_wrong() {
    let stack = stack("console-read");
    let _worker = stack.start_worker("w", &[]);
    let mut alice = stack.pg_as("alice");
    let mut bob = stack.pg_as("bob");
    let done = submit_plan(&mut alice, r#"{"steps":[{"id":"only","action":"noop"}]}"#);
    wait_for_goal(&stack, done, WAIT);
    let waiting = submit_plan(&mut alice, WAITING);
    wait_for_step(&mut alice, waiting, "hold", "waiting");
    let bobs = submit_plan(&mut bob, WAITING);
    let console = stack.start_console("ui", "alice", &[]);
    let base = console.url.trim_end_matches('/');
    let client = http();

    let (status, page) = get(&client, &format!("{base}/api/goals"));
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids: Vec<i64> = page["goals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![waiting, done], "newest first, bob's goal unseen");
    assert_eq!(page["counts"]["running"], 1);
    assert_eq!(page["counts"]["succeeded"], 1);
    assert_eq!(page["counts"]["failed"], 0);
    assert_eq!(page["goals"][0]["steps"]["total"], 2);
    assert_eq!(page["goals"][0]["owner"], "alice");

    let (_, running) = get(&client, &format!("{base}/api/goals?status=running"));
    assert_eq!(running["goals"].as_array().unwrap().len(), 1);
    assert_eq!(
        running["counts"]["succeeded"], 1,
        "counts ignore the status filter"
    );
    let (_, first) = get(&client, &format!("{base}/api/goals?limit=1"));
    assert_eq!(first["next_before"], waiting);
    let (_, second) = get(
        &client,
        &format!("{base}/api/goals?limit=1&before={waiting}"),
    );
    assert_eq!(second["goals"][0]["id"], done);
    assert_eq!(second["next_before"], Value::Null);
    let (_, none) = get(&client, &format!("{base}/api/goals?q=%25"));
    assert_eq!(
        none["goals"].as_array().unwrap().len(),
        0,
        "% is taken literally"
    );

    for (query, expected) in [
        ("status=sleeping", "status: no goal status \"sleeping\""),
        (
            "since=soon",
            "invalid input syntax for type timestamp with time zone",
        ),
        ("before=x", "before"),
    ] {
        let (status, body) = get(&client, &format!("{base}/api/goals?{query}"));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        let said = body["error"].as_str().unwrap_or_default();
        assert!(said.contains(expected), "{query}: {body}");
    }

    let (status, goal) = get(&client, &format!("{base}/api/goals/{waiting}"));
    assert_eq!(status, StatusCode::OK, "{goal}");
    assert_eq!(goal["goal"]["tasks"][0]["status"], "waiting");
    assert!(goal["svg"]
        .as_str()
        .unwrap()
        .contains(r#"data-step="hold""#));
    let kinds: Vec<&str> = goal["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "goal.submitted", "{kinds:?}");
    let (status, refused) = get(&client, &format!("{base}/api/goals/{bobs}"));
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        refused,
        json!({"error": format!("goal {bobs} does not exist"), "sqlstate": "P0002"})
    );
    assert_eq!(
        get(&client, &format!("{base}/api/goals/abc")).0,
        StatusCode::BAD_REQUEST
    );
    let (status, body) = get(&client, &format!("{base}/api/goals/{waiting}?dir=up"));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "dir: \"up\" is neither LR nor TB");

    // A submitter reads the queues, actions and workers; the forwarder,
    // templates and schedules need an admin, and say so.
    let (status, system) = get(&client, &format!("{base}/api/system"));
    assert_eq!(status, StatusCode::OK);
    assert!(
        system["forwarder"]["error"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{system}"
    );
    assert!(system["templates"]["error"]
        .as_str()
        .unwrap()
        .contains("permission denied"));
    assert!(system["actions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "noop"));
    assert_eq!(system["workers"].as_array().unwrap().len(), 1);
    assert!(system["workers"][0]["actions"]
        .as_array()
        .unwrap()
        .contains(&json!("noop")));
    assert_eq!(
        system["queues"],
        json!([{"queue": "default", "queued": 0, "running": 0, "waiting": 1}])
    );

    // The page and its assets, with a policy that runs nothing from elsewhere.
    let page = client.get(format!("{base}/")).send().unwrap();
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(!page.text().unwrap().contains("{{CSRF}}"));
    for asset in ["app.js", "app.css"] {
        assert_eq!(
            client
                .get(format!("{base}/{asset}"))
                .send()
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        client
            .get(format!("{base}/nothing"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn actions_need_the_pages_token_and_come_back_with_their_errors() {
    let stack = stack("console-act");
    let _worker = stack.start_worker("w", &[]);
    let mut alice = stack.pg_as("alice");
    let goal = submit_plan(&mut alice, WAITING);
    wait_for_step(&mut alice, goal, "hold", "waiting");
    let bobs = submit_plan(&mut stack.pg_as("bob"), WAITING);
    let console = stack.start_console("ui", "alice", &[]);
    let base = console.url.trim_end_matches('/');
    let client = http();
    let token = csrf(&client, &format!("{base}/"));
    let signal = format!("{base}/api/goals/{goal}/signal");

    for (given, body) in [
        (None, r#"{"name":"go"}"#),
        (Some("forged"), r#"{"name":"go"}"#),
    ] {
        let (status, refused) = post(&client, &signal, given, body);
        assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    }
    // From another site's page: the browser says where it came from.
    let response = client
        .post(&signal)
        .header("content-type", "application/json")
        .header("x-csrf-token", &token)
        .header("origin", "http://evil.example")
        .body(r#"{"name":"go"}"#)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        synapse_e2e::step_status(&mut alice, goal, "hold"),
        "waiting"
    );

    let (status, body) = post(&client, &signal, Some(&token), "{not json");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post(&client, &signal, Some(&token), r#"{"name":"go","extra":1}"#);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post(
        &client,
        &format!("{base}/api/goals/{bobs}/signal"),
        Some(&token),
        r#"{"name":"go"}"#,
    );
    assert_eq!(
        (status, body["sqlstate"].as_str()),
        (StatusCode::NOT_FOUND, Some("P0002")),
        "{body}"
    );
    let (status, body) = post(
        &client,
        &format!("{base}/api/goals/{bobs}/cancel"),
        Some(&token),
        "{}",
    );
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, body) = post(
        &client,
        &signal,
        Some(&token),
        r#"{"name":"go","payload":{"by":"console"}}"#,
    );
    assert_eq!((status, body), (StatusCode::OK, json!({"taken": true})));
    let ended = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(ended["status"], "succeeded");
    assert_eq!(
        ended["tasks"][0]["result"]["payload"],
        json!({"by": "console"})
    );

    let (status, body) = post(
        &client,
        &format!("{base}/api/goals/{goal}/retry"),
        Some(&token),
        r#"{"steps":["nothing"]}"#,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("nothing"),
        "{body}"
    );
    let (status, body) = post(&client, &signal, Some(&token), r#"{"name":"late"}"#);
    assert_eq!(
        (status, body["sqlstate"].as_str()),
        (StatusCode::CONFLICT, Some("55000")),
        "{body}"
    );

    let other = submit_plan(&mut alice, WAITING);
    let (status, body) = post(
        &client,
        &format!("{base}/api/goals/{other}/cancel"),
        Some(&token),
        "{}",
    );
    assert_eq!((status, body), (StatusCode::OK, json!({"cancelled": true})));
    assert_eq!(wait_for_goal(&stack, other, WAIT)["status"], "cancelled");
}

#[test]
fn changes_reach_an_open_page_as_server_sent_events() {
    let stack = stack("console-live");
    let console = stack.start_console("ui", "alice", &[]);
    let base = console.url.trim_end_matches('/');
    let response = Client::builder()
        .build()
        .unwrap()
        .get(format!("{base}/api/events"))
        .send()
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut lines = BufReader::new(response).lines();
    let goal = submit_plan(&mut stack.pg_as("alice"), WAITING);
    let wanted = format!(r#""goal_id":{goal}"#);
    let told = wait_until("the change to be pushed", WAIT, || {
        let line = lines.next()?.ok()?;
        line.contains(&wanted).then_some(line)
    });
    let change: Value = serde_json::from_str(told.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(change["goal_id"], goal);
    assert!(
        change["event"].as_str().unwrap().starts_with("goal."),
        "{change}"
    );
    assert_eq!(
        change.as_object().unwrap().len(),
        2,
        "only the goal and the event: {change}"
    );
}

#[test]
fn beyond_loopback_only_with_a_token_and_only_loopback_names_without() {
    let stack = stack("console-token");
    // No token, not loopback: it does not start.
    let output = Command::new(worker_binary())
        .args([
            "--database-url",
            &stack.database_url_as("alice"),
            "ui",
            "--addr",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not a loopback address: give --token")
    );

    // Loopback without a token: a name other than loopback's is refused (DNS rebinding).
    let console = stack.start_console("open", "alice", &[]);
    let base = console.url.trim_end_matches('/');
    let client = http();
    let response = client
        .get(format!("{base}/api/goals"))
        .header("host", "evil.example")
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::MISDIRECTED_REQUEST);
    drop(console);

    let secret = "correct-horse-battery-staple";
    let console = stack.start_console(
        "token",
        "alice",
        &["--addr", "0.0.0.0:0", "--token", secret],
    );
    let port = console
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/');
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(
        get(&client, &format!("{base}/api/goals")).0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client.get(format!("{base}/")).send().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client
            .get(format!("{base}/?token=wrong"))
            .send()
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    let bearer = client
        .get(format!("{base}/api/goals"))
        .bearer_auth(secret)
        .send()
        .unwrap();
    assert_eq!(bearer.status(), StatusCode::OK);
    // The link with the token sets the cookie and leads to the page without it in the address.
    let link = client
        .get(format!("{base}/?token={secret}"))
        .send()
        .unwrap();
    assert_eq!(link.status(), StatusCode::SEE_OTHER);
    assert_eq!(link.headers()["location"], "/");
    let cookie = link.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let with_cookie = client
        .get(format!("{base}/api/goals"))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .unwrap();
    assert_eq!(with_cookie.status(), StatusCode::OK);
    assert!(
        !console.process.log_text().contains(secret),
        "the token is never logged"
    );
}

#[test]
fn a_role_that_cannot_read_goals_is_told_at_start() {
    let stack = Stack::start("console-norole", &[]);
    stack
        .pg()
        .batch_execute("CREATE ROLE nobody LOGIN")
        .unwrap();
    let output = Command::new(worker_binary())
        .args([
            "--database-url",
            &stack.database_url_as("nobody"),
            "ui",
            "--addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("the console's role cannot read synapse.goals"),
        "{said}"
    );
    assert!(said.contains("grant_submitter"), "{said}");
}

//! `sql` steps run as their goal's owner, in the transaction that records
//! them (SPEC §7), on the real stack with roles that are not superusers: a
//! step sees and does only what its owner could, cannot change role or the
//! session the worker goes on with, and its writes commit exactly once
//! whatever happens to its worker.
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{error_of, postgres, task, wait_for_goal, wait_until, Stack};

const WAIT: Duration = Duration::from_secs(60);

/// alice (a submitter) with a table of her own, a table she may not read,
/// and wk, a worker: none of them a superuser.
fn roles(stack: &Stack) {
    let mut admin = stack.pg();
    admin
        .batch_execute(
            "CREATE ROLE alice LOGIN NOSUPERUSER; CREATE ROLE wk LOGIN NOSUPERUSER;
             SELECT synapse.grant_submitter('alice'); SELECT synapse.grant_worker('wk');
             CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL);
             GRANT SELECT, INSERT ON notes TO alice; GRANT USAGE ON SEQUENCE notes_id_seq TO alice;
             CREATE TABLE secrets (value text); INSERT INTO secrets VALUES ('s3cret');
             CREATE TABLE ledger (goal bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
             GRANT INSERT, SELECT ON ledger TO alice;",
        )
        .unwrap();
}

fn submit_as(client: &mut postgres::Client, blueprint: &Value) -> i64 {
    client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb)",
            &[&blueprint.to_string()],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_sql_step_does_what_its_owner_may_and_nothing_more() {
    let stack = Stack::start("sql-owner", &[]);
    roles(&stack);
    let _worker = stack.start_worker("wk", &["--database-url", &stack.database_url_as("wk")]);
    let mut alice = stack.pg_as("alice");
    // Someone else's goal, which alice's step must not see.
    submit_as(
        &mut stack.pg(),
        &json!({"steps": [{"id": "hold", "action": "wait", "params": {"signal": "never"}}]}),
    );
    let goal = submit_as(
        &mut alice,
        &json!({"steps": [
            {"id": "who", "action": "sql",
             "params": {"query": "select current_user as who, session_user as via"}},
            {"id": "write", "action": "sql",
             "params": {"query": "insert into notes (body) values ($1) returning body", "args": "['hello']"}},
            {"id": "goals", "action": "sql",
             "params": {"query": "select count(*) as seen from synapse.goals"}},
            {"id": "secret", "action": "sql", "params": {"query": "select value from secrets"}}
        ]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let who = &task(&status, "who")["result"]["rows"][0];
    assert_eq!(who["who"], "alice", "{status}");
    assert_eq!(who["via"], "wk", "the worker's session, acting as alice");
    assert_eq!(task(&status, "write")["result"]["rows"][0]["body"], "hello");
    // Row security as alice: her goal, not the other one.
    let goals = &task(&status, "goals")["result"]["rows"][0];
    assert_eq!(goals["seen"], json!(1), "{status}");
    let secret = error_of(&status, "secret");
    assert!(
        secret.contains("42501") && secret.contains("secrets"),
        "{secret}"
    );
}

#[test]
fn a_sql_step_cannot_change_role_or_the_session() {
    let stack = Stack::start("sql-escape", &[]);
    roles(&stack);
    let worker = stack.start_worker(
        "wk",
        &[
            "--database-url",
            &stack.database_url_as("wk"),
            "--concurrency",
            "1",
        ],
    );
    let mut alice = stack.pg_as("alice");
    let attempts = [
        ("program", "copy (select 1) to program 'true'", "42501"),
        ("set_role", "set role wk", "statement"),
        ("begin", "begin", "statement"),
        (
            "role_config",
            "select set_config('role', 'wk', false)",
            "42501",
        ),
        ("temp", "create temp table t (x int)", "42501"),
        ("leave", "select synapse._leave_step('00')", "22023"),
    ];
    let mut steps: Vec<Value> = attempts
        .iter()
        .map(|(id, query, _)| json!({"id": id, "action": "sql", "params": {"query": query}}))
        .collect();
    // A setting a step changes for its session is undone with it: the next
    // step (on the same connection: one worker slot) sees the default.
    steps.push(json!({"id": "path", "action": "sql",
                      "params": {"query": "select set_config('search_path', 'nowhere', false) as set"}}));
    steps.push(json!({"id": "after", "action": "sql",
                      "params": {"query": "select current_setting('search_path') as path, current_user as who"}}));
    let edges: Vec<Value> = (1..steps.len())
        .map(|i| json!({"from": steps[i - 1]["id"], "to": steps[i]["id"], "on": "always"}))
        .collect();
    let goal = submit_as(&mut alice, &json!({"steps": steps, "edges": edges}));
    let status = wait_for_goal(&stack, goal, WAIT);
    for (id, _, expected) in attempts {
        let step = task(&status, id);
        assert_eq!(step["status"], "failed", "{id}: {status}");
        let error = step["error"].as_str().unwrap();
        assert!(error.contains(expected), "{id}: {error}");
    }
    let after = &task(&status, "after")["result"]["rows"][0];
    assert_eq!(after["who"], "alice");
    assert_ne!(after["path"], "nowhere", "{status}");
    // The worker is unharmed: it runs the next goal as before.
    let next = submit_as(
        &mut alice,
        &json!({"steps": [{"id": "who", "action": "sql", "params": {"query": "select current_user as who"}}]}),
    );
    let status = wait_for_goal(&stack, next, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "who")["result"]["rows"][0]["who"], "alice");
    assert!(
        !worker.log_text().contains("panicked"),
        "{}",
        worker.log_text()
    );
}

#[test]
fn a_sql_steps_writes_commit_exactly_once_whatever_happens_to_its_worker() {
    let stack = Stack::start("sql-once", &[]);
    roles(&stack);
    let url = stack.database_url_as("wk");
    let flags = [
        "--database-url",
        url.as_str(),
        "--lease",
        "1s",
        "--concurrency",
        "4",
    ];
    let mut alice = stack.pg_as("alice");
    // Each step writes its row, then takes a while: workers die or stall in
    // the middle, again and again.
    let goals: Vec<i64> = (0..200)
        .map(|_| {
            submit_as(
                &mut alice,
                &json!({"steps": [{"id": "book", "action": "sql", "retries": 100, "backoff": "10ms",
                                   "params": {"query": "insert into ledger (goal) select $1 from pg_sleep(0.4) returning goal",
                                              "args": "[goal.id]"}}]}),
            )
        })
        .collect();
    let mut admin = stack.pg();
    let finished = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM synapse.goals WHERE finished_at IS NOT NULL",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut kills = 0;
    let mut stalls = 0;
    let mut round = 0;
    while finished(&mut admin) < goals.len() as i64 && round < 400 {
        round += 1;
        let worker = stack.start_worker(&format!("w{round}"), &flags);
        // Let it get into some steps (and now and then through some).
        std::thread::sleep(Duration::from_millis(150 + (round * 137) % 750));
        if round % 4 == 0 {
            // Stalled past its lease: its attempts go to another worker, and
            // what it then tries to record is fenced and rolled back.
            worker.signal("STOP");
            let other = stack.start_worker(&format!("o{round}"), &flags);
            std::thread::sleep(Duration::from_millis(1500));
            worker.signal("CONT");
            std::thread::sleep(Duration::from_millis(400));
            other.signal("KILL");
            stalls += 1;
        }
        worker.signal("KILL");
        kills += 1;
    }
    // The last ones finish undisturbed.
    let _last = stack.start_worker("last", &flags);
    wait_until("every goal to finish", Duration::from_secs(120), || {
        (finished(&mut admin) == goals.len() as i64).then_some(())
    });
    // Attempts died with their worker, or were fenced out after a stall.
    let lost: i64 = admin
        .query_one(
            "SELECT count(*) FROM synapse.attempts WHERE error LIKE 'lease of attempt%'",
            &[],
        )
        .unwrap()
        .get(0);
    eprintln!("{kills} kills, {stalls} stalls, {lost} attempts lost");
    assert!(
        lost >= 60 && stalls >= 3,
        "{kills} kills, {stalls} stalls, {lost} attempts lost"
    );
    for goal in &goals {
        let status = wait_for_goal(&stack, *goal, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
    }
    let rows: Vec<(i64, i64)> = admin
        .query(
            "SELECT goal, count(*) FROM ledger GROUP BY goal ORDER BY goal",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(rows.len(), goals.len(), "{rows:?}");
    assert!(rows.iter().all(|(_, n)| *n == 1), "{rows:?}");
}

#[test]
fn a_sql_steps_end_and_its_retry_count_from_when_its_query_ended_not_from_when_it_began() {
    let stack = Stack::start("sql-times", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    // Recorded in the transaction that ran it, a step's end was that
    // transaction's start: before the query's 300 ms; and flaky's retry,
    // due 200 ms after that start, was due at once (its statement times out
    // after 600 ms).
    let goal = submit_as(
        &mut client,
        &json!({"steps": [
            {"id": "slow", "action": "sql", "params": {"query": "select pg_sleep(0.3)"}},
            {"id": "flaky", "action": "sql", "timeout": "600ms", "retries": 1, "backoff": "200ms",
             "params": {"query": "select pg_sleep(5)"}}
        ]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let timed: (bool, bool, bool, bool) = {
        let row = client
            .query_one(
                "SELECT s.finished_at - s.started_at >= interval '300 ms',
                        a.finished_at - a.started_at >= interval '600 ms',
                        -- the backoff less the most jitter takes off
                        f.started_at - a.finished_at >= interval '100 ms',
                        g.finished_at >= greatest(s.finished_at, f.finished_at)
                   FROM synapse.goals g
                   JOIN synapse.tasks s ON s.goal_id = g.id AND s.step = 'slow'
                   JOIN synapse.tasks f ON f.goal_id = g.id AND f.step = 'flaky'
                   JOIN synapse.attempts a ON a.task_id = f.id AND a.attempt = 1
                  WHERE g.id = $1",
                &[&goal],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    assert_eq!(timed, (true, true, true, true), "{status}");

    // A wait after a slow sql step waits its whole time from when it began.
    let goal = submit_as(
        &mut client,
        &json!({"steps": [
            {"id": "slow", "action": "sql", "params": {"query": "select pg_sleep(0.3)"}},
            {"id": "nap", "action": "wait", "params": {"for": "500ms"}}
        ], "edges": [{"from": "slow", "to": "nap"}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let waited: (bool, bool) = {
        let row = client
            .query_one(
                "SELECT n.started_at >= s.finished_at, n.finished_at - n.started_at >= interval '500 ms'
                   FROM synapse.tasks s JOIN synapse.tasks n ON n.goal_id = s.goal_id AND n.step = 'nap'
                  WHERE s.goal_id = $1 AND s.step = 'slow'",
                &[&goal],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(waited, (true, true), "{status}");
}

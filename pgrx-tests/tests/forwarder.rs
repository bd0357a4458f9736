//! The forwarder against a real cluster and a real Redis: events reach Redis
//! with their exact payloads at commit, survive Redis and Postgres outages,
//! and the timers fire on their deadlines.
use postgres::fallible_iterator::FallibleIterator;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use synapse_e2e::{
    assert_quiet, brpop, postgres, redis, statement_counts, stream_events, submit_plan, task_id,
    wait_until, Stack, ONE_STEP,
};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn committed_events_reach_redis_with_their_exact_payloads() {
    let stack = Stack::start("payloads", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();

    let goal = client
        .query_one("SELECT synapse.submit_goal('triage incident 7')", &[])
        .unwrap()
        .get::<_, i64>(0);
    let planned =
        brpop(&mut redis, "synapse:planner", WAIT).expect("goal.submitted in the planner list");
    assert_eq!(
        planned,
        format!(r#"{{"v":1,"event":"goal.submitted","goal_id":{goal}}}"#)
    );

    let plan = submit_plan(&mut client, ONE_STEP);
    let task = task_id(&mut client, plan, "only");
    let queued =
        brpop(&mut redis, "synapse:queue:default", WAIT).expect("task.queued in its queue");
    assert_eq!(
        queued,
        format!(
            r#"{{"v":1,"event":"task.queued","goal_id":{plan},"task_id":{task},"step":"only","queue":"default","attempt":1}}"#
        )
    );

    // Every event, dispatched or not, is in the stream, in commit order.
    let events = wait_until("three events in the stream", WAIT, || {
        let events = stream_events(&mut redis);
        (events.len() == 3).then_some(events)
    });
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["goal.submitted", "goal.running", "task.queued"]);

    // Nothing left behind, and the status says so.
    let status = wait_until("the outbox to drain", WAIT, || {
        let status = stack.forwarder_status(&mut client);
        (status["pending"] == 0).then_some(status)
    });
    assert_eq!(status["running"], true);
    assert_eq!(status["redis_connected"], true);
    assert_eq!(status["forwarded_total"], 3);
    assert!(status["last_forward_at"].is_string());
    assert!(status["last_error"].is_null());
}

#[test]
fn a_rolled_back_transaction_sends_nothing() {
    let stack = Stack::start("rollback", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let mut transaction = client.transaction().unwrap();
    transaction
        .execute("SELECT synapse.submit_goal('never')", &[])
        .unwrap();
    transaction.rollback().unwrap();
    let committed = client
        .query_one("SELECT synapse.submit_goal('kept')", &[])
        .unwrap()
        .get::<_, i64>(0);
    let first = brpop(&mut redis, "synapse:planner", WAIT).unwrap();
    assert_eq!(
        first,
        format!(r#"{{"v":1,"event":"goal.submitted","goal_id":{committed}}}"#)
    );
    let len: i64 = redis::cmd("LLEN")
        .arg("synapse:planner")
        .query(&mut redis)
        .unwrap();
    assert_eq!(len, 0);
}

#[test]
fn a_listener_sees_each_event_as_a_notification() {
    let stack = Stack::start("notify", &[]);
    let mut listener = stack.pg();
    listener.batch_execute("LISTEN synapse_events").unwrap();
    let mut client = stack.pg();
    let goal = client
        .query_one("SELECT synapse.submit_goal('hello')", &[])
        .unwrap()
        .get::<_, i64>(0);

    {
        let mut notifications = listener.notifications();
        let note = notifications
            .timeout_iter(WAIT)
            .next()
            .unwrap()
            .expect("a notification");
        assert_eq!(note.channel(), "synapse_events");
        assert_eq!(
            note.payload(),
            format!(r#"{{"v":1,"event":"goal.submitted","goal_id":{goal}}}"#)
        );
    }

    // With synapse.notify off the event still reaches Redis, without a NOTIFY.
    client.batch_execute("SET synapse.notify = off").unwrap();
    let quiet = client
        .query_one("SELECT synapse.submit_goal('quiet')", &[])
        .unwrap()
        .get::<_, i64>(0);
    let mut redis = stack.redis();
    let _first = brpop(&mut redis, "synapse:planner", WAIT).unwrap();
    let second = brpop(&mut redis, "synapse:planner", WAIT).unwrap();
    assert!(second.contains(&format!("\"goal_id\":{quiet}")), "{second}");
    let mut notifications = listener.notifications();
    assert!(notifications
        .timeout_iter(Duration::from_millis(300))
        .next()
        .unwrap()
        .is_none());
}

#[test]
fn events_wait_while_redis_is_down_and_all_arrive_once_it_is_back() {
    let stack = Stack::start("redis-down", &[]);
    let mut listener = stack.pg();
    listener.batch_execute("LISTEN synapse_events").unwrap();
    let mut client = stack.pg();
    stack.stop_redis();

    let mut expected = BTreeSet::new();
    for i in 0..50 {
        let id: i64 = client
            .query_one("SELECT synapse.submit_goal($1)", &[&format!("goal {i}")])
            .unwrap()
            .get(0);
        expected.insert(id);
    }
    let status = wait_until("the forwarder to report the outage", WAIT, || {
        let status = stack.forwarder_status(&mut client);
        (status["redis_connected"] == false && status["last_error"].is_string()).then_some(status)
    });
    assert_eq!(status["pending"], 50, "{status}");
    // Listeners hear of every event while Redis is down, in order.
    let notified = notified_goals(&mut listener, expected.len());
    assert_eq!(notified, expected.iter().copied().collect::<Vec<_>>());
    let error = status["last_error"].as_str().unwrap();
    assert!(error.starts_with("redis"), "{error}");
    assert!(
        !error.contains("redis://"),
        "the URL must not leak: {error}"
    );

    stack.start_redis();
    let mut redis = stack.redis();
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let payload = brpop(&mut redis, "synapse:planner", WAIT).expect("every goal arrives");
        let event: serde_json::Value = serde_json::from_str(&payload).unwrap();
        seen.push(event["goal_id"].as_i64().unwrap());
    }
    let unique: BTreeSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique, expected);
    assert_eq!(seen.len(), unique.len(), "no duplicates");
    let status = wait_until("the status to recover", WAIT, || {
        let status = stack.forwarder_status(&mut client);
        (status["redis_connected"] == true && status["pending"] == 0).then_some(status)
    });
    assert!(status["last_error"].is_null(), "{status}");
    // Delivering them to Redis NOTIFYs none of them again.
    let last: i64 = client
        .query_one("SELECT synapse.submit_goal('after')", &[])
        .unwrap()
        .get(0);
    assert_eq!(notified_goals(&mut listener, 1), vec![last]);
}

#[test]
fn the_tasks_one_statement_queues_share_a_row_and_reach_their_list_one_message_each() {
    let stack = Stack::start("shared-dispatch", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    stack.stop_redis();
    let goal = submit_plan(
        &mut client,
        r#"{"steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                      {"id": "c", "action": "noop"}, {"id": "d", "action": "noop", "queue": "other"}]}"#,
    );
    let rows = client
        .query(
            "SELECT dispatch, events, task_id FROM synapse.outbox
              WHERE event = 'task.queued' ORDER BY id",
            &[],
        )
        .unwrap();
    let rows: Vec<(String, i32, Option<i64>)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("queue:default".to_owned(), 3, None),
            (
                "queue:other".to_owned(),
                1,
                Some(task_id(&mut client, goal, "d"))
            )
        ]
    );

    stack.start_redis();
    let mut redis = stack.redis();
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let payload = brpop(&mut redis, "synapse:queue:default", WAIT).expect("a message each");
        let event: serde_json::Value = serde_json::from_str(&payload).unwrap();
        seen.insert(event["task_id"].as_i64().unwrap());
    }
    let expected: BTreeSet<i64> = ["a", "b", "c"]
        .iter()
        .map(|step| task_id(&mut client, goal, step))
        .collect();
    assert_eq!(seen, expected);
    assert!(brpop(&mut redis, "synapse:queue:other", WAIT).is_some());
    let status = wait_until("the outbox to drain", WAIT, || {
        let status = stack.forwarder_status(&mut client);
        (status["pending"] == 0).then_some(status)
    });
    assert!(status["last_error"].is_null(), "{status}");
    let queued_events = stream_events(&mut redis)
        .into_iter()
        .filter(|event| event["event"] == "task.queued")
        .count();
    assert_eq!(queued_events, 4, "each event in the stream");
}

/// The goal ids of the next `count` notifications (waiting for each).
fn notified_goals(listener: &mut postgres::Client, count: usize) -> Vec<i64> {
    let mut notifications = listener.notifications();
    let mut waiting = notifications.timeout_iter(WAIT);
    (0..count)
        .map(|_| {
            let note = waiting.next().unwrap().expect("a notification");
            let event: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
            event["goal_id"].as_i64().unwrap()
        })
        .collect()
}

#[test]
fn the_forwarder_comes_back_after_a_postgres_crash_and_delivers() {
    let stack = Stack::start("pg-crash", &[]);
    let mut client = stack.pg();
    stack.stop_redis();
    let mut expected = BTreeSet::new();
    for i in 0..20 {
        let id: i64 = client
            .query_one("SELECT synapse.submit_goal($1)", &[&format!("goal {i}")])
            .unwrap()
            .get(0);
        expected.insert(id);
    }
    drop(client);
    stack.crash_and_restart_postgres();
    stack.start_redis();
    // Redis came back empty and the forwarder may be in its backoff: a new
    // commit must not be needed for the waiting events to go out.
    let mut redis = stack.redis();
    let mut seen = BTreeSet::new();
    while seen.len() < expected.len() {
        let payload = brpop(&mut redis, "synapse:planner", WAIT)
            .expect("events committed before the crash arrive");
        let event: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert!(
            seen.insert(event["goal_id"].as_i64().unwrap()),
            "duplicate {payload}"
        );
    }
    assert_eq!(seen, expected);
    let mut client = stack.pg();
    let after: i64 = client
        .query_one("SELECT synapse.submit_goal('after')", &[])
        .unwrap()
        .get(0);
    let payload = brpop(&mut redis, "synapse:planner", WAIT).unwrap();
    assert!(payload.contains(&format!("\"goal_id\":{after}")));
}

/// Puts a freshly planned task into `running` with a lease, as a worker's claim would.
fn claim(client: &mut postgres::Client, task: i64, lease: &str) {
    client
        .execute(
            "UPDATE synapse.tasks SET status = 'running', attempts = attempts + 1,
                    lease_expires_at = clock_timestamp() + $2::text::interval, leased_by = 'test'
              WHERE id = $1 AND status = 'queued'",
            &[&task, &lease],
        )
        .unwrap();
}

#[test]
fn a_retry_is_queued_by_its_timer_when_run_at_arrives() {
    // The sweep is an hour away: only the run_at timer can queue the retry.
    let stack = Stack::start("retry-timer", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let goal = submit_plan(&mut client, ONE_STEP);
    let task = task_id(&mut client, goal, "only");
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("first dispatch");
    claim(&mut client, task, "1h");
    let run_at: std::time::SystemTime = client
        .query_one(
            "UPDATE synapse.tasks SET status = 'retrying', error = 'boom', run_at = clock_timestamp() + interval '300 ms'
              WHERE id = $1 RETURNING run_at",
            &[&task],
        )
        .unwrap()
        .get(0);
    let payload =
        brpop(&mut redis, "synapse:queue:default", WAIT).expect("the retry is dispatched");
    assert!(payload.contains(r#""attempt":2"#), "{payload}");
    let row = client
        .query_one(
            "SELECT status, queued_at >= $2 FROM synapse.tasks WHERE id = $1",
            &[&task, &run_at],
        )
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "queued");
    assert!(row.get::<_, bool>(1), "queued before its run_at");
}

#[test]
fn an_event_that_commits_after_later_ones_is_still_forwarded() {
    // The forwarder starts its reads above what it has forwarded; a row whose
    // id is lower than ones already sent, committed late, must not be
    // skipped, even when its transaction's xid is newer than the xid of the
    // transaction that wrote the higher id (the completer's pattern: xid
    // early, events late).
    let stack = Stack::start("late-commit", &[]);
    let mut early = stack.pg();
    let mut slow = stack.pg();
    let mut fast = stack.pg();
    let mut redis = stack.redis();
    let goal_of = |payload: String| -> i64 {
        serde_json::from_str::<serde_json::Value>(&payload).unwrap()["goal_id"]
            .as_i64()
            .unwrap()
    };
    let mut early_tx = early.transaction().unwrap();
    early_tx
        .execute("SELECT pg_current_xact_id()", &[])
        .unwrap();
    let mut slow_tx = slow.transaction().unwrap();
    let late: i64 = slow_tx
        .query_one("SELECT synapse.submit_goal('committed last')", &[])
        .unwrap()
        .get(0);
    let sooner: i64 = early_tx
        .query_one("SELECT synapse.submit_goal('older xid, higher id')", &[])
        .unwrap()
        .get(0);
    early_tx.commit().unwrap();
    let payload = brpop(&mut redis, "synapse:planner", WAIT).expect("forwarded");
    assert_eq!(goal_of(payload), sooner);
    for i in 0..3 {
        let id: i64 = fast
            .query_one("SELECT synapse.submit_goal($1)", &[&format!("goal {i}")])
            .unwrap()
            .get(0);
        let payload = brpop(&mut redis, "synapse:planner", WAIT).expect("forwarded");
        assert_eq!(goal_of(payload), id);
    }
    slow_tx.commit().unwrap();
    let payload = brpop(&mut redis, "synapse:planner", WAIT).expect("the late event");
    assert_eq!(goal_of(payload), late);
    // And the reads still start low enough for what comes next.
    let next: i64 = fast
        .query_one("SELECT synapse.submit_goal('after')", &[])
        .unwrap()
        .get(0);
    let payload = brpop(&mut redis, "synapse:planner", WAIT).expect("the next event");
    assert_eq!(goal_of(payload), next);
}

#[test]
fn timers_run_only_when_a_deadline_is_due_not_at_every_event() {
    let stack = Stack::start("timers-due", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let timer_runs =
        |client: &mut postgres::Client| statement_counts(client, "%synapse._run_timers%").0;
    // The first event wakes the forwarder; from then on the only deadline is
    // the sweep, 30 s away.
    submit_plan(&mut client, ONE_STEP);
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("dispatch");
    let before = timer_runs(&mut client);
    for _ in 0..20 {
        submit_plan(&mut client, ONE_STEP);
        brpop(&mut redis, "synapse:queue:default", WAIT).expect("dispatch");
    }
    assert_eq!(
        timer_runs(&mut client),
        before,
        "20 forwarded events, no deadline due: no timer run"
    );
}

/// One `noop` step with an attempt to spare.
const ONE_RETRY: &str = r#"{"steps":[{"id":"only","action":"noop","retries":1}]}"#;

#[test]
fn an_expired_lease_is_requeued() {
    let stack = Stack::start("lease", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let goal = submit_plan(&mut client, ONE_RETRY);
    let task = task_id(&mut client, goal, "only");
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("first dispatch");
    claim(&mut client, task, "200 ms");
    let payload =
        brpop(&mut redis, "synapse:queue:default", WAIT).expect("re-dispatched after the lease");
    assert!(payload.contains(r#""attempt":2"#), "{payload}");
    let row = client
        .query_one(
            "SELECT status, error, attempts FROM synapse.tasks WHERE id = $1",
            &[&task],
        )
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "queued");
    assert_eq!(
        row.get::<_, &str>(1),
        "lease of attempt 1 expired: worker test stopped responding; whatever the step did may or may not have happened; it runs again"
    );
    assert_eq!(row.get::<_, i32>(2), 1);
}

#[test]
fn the_sweep_redispatches_work_a_flushed_redis_lost() {
    let stack = Stack::start("sweep", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let goal = submit_plan(&mut client, ONE_STEP);
    let task = task_id(&mut client, goal, "only");
    wait_until("the first dispatch", WAIT, || {
        let len: i64 = redis::cmd("LLEN")
            .arg("synapse:queue:default")
            .query(&mut redis)
            .unwrap();
        (len == 1).then_some(())
    });
    redis::cmd("FLUSHALL").query::<()>(&mut redis).unwrap();
    let payload =
        brpop(&mut redis, "synapse:queue:default", WAIT).expect("the sweep dispatches it again");
    assert!(
        payload.contains(&format!("\"task_id\":{task}")),
        "{payload}"
    );
    assert!(payload.contains(r#""attempt":1"#), "{payload}");
}

#[test]
fn an_idle_stack_runs_no_sql_and_sends_nothing_to_redis() {
    let (_stack, mut client, mut redis) = stack_left_idle("idle");
    assert_quiet(&mut client, &mut redis, "%synapse%", Duration::from_secs(3));
}

/// A stack that dispatched one goal, saw it cancelled, and forwarded every event.
fn stack_left_idle(name: &str) -> (Stack, postgres::Client, redis::Connection) {
    let stack = Stack::start(name, &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let goal = submit_plan(&mut client, ONE_STEP);
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("dispatch");
    client
        .execute("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap();
    wait_until("the outbox to drain", WAIT, || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
    (stack, client, redis)
}

#[test]
fn a_latch_postgres_sets_for_its_own_reasons_costs_the_forwarder_no_turn() {
    // Postgres sets an idle process's latch at any SIGUSR1 (to catch up with
    // cache invalidations after a burst of DDL or ANALYZE elsewhere, say):
    // only a commit with events, a deadline or a reload owe a turn.
    let (_stack, mut client, mut redis) = stack_left_idle("spurious-latch");
    let pid = forwarder_pid(&mut client).to_string();
    let signalling = AtomicBool::new(true);
    /// Stops the signals however the scope ends, a failed assertion included.
    struct StopSignalling<'a>(&'a AtomicBool);
    impl Drop for StopSignalling<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Relaxed);
        }
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while signalling.load(Ordering::Relaxed) {
                let sent = std::process::Command::new("kill")
                    .args(["-USR1", &pid])
                    .status()
                    .expect("kill");
                assert!(sent.success(), "SIGUSR1 to the forwarder");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let _stop = StopSignalling(&signalling);
        assert_quiet(&mut client, &mut redis, "%synapse%", Duration::from_secs(3));
    });
    // Still awake to what it owes.
    submit_plan(&mut client, ONE_STEP);
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("dispatch after the signals");
}

#[test]
fn a_reload_picks_up_a_new_key_prefix() {
    let stack = Stack::start("sighup", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    client
        .batch_execute("ALTER SYSTEM SET synapse.key_prefix = 'reloaded'")
        .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    // The reload reaches the forwarder asynchronously: submit until one lands under the new prefix.
    let payload = wait_until("an event under the new prefix", WAIT, || {
        client
            .execute("SELECT synapse.submit_goal('after reload')", &[])
            .unwrap();
        brpop(&mut redis, "reloaded:planner", Duration::from_millis(200))
    });
    assert!(payload.contains("goal.submitted"), "{payload}");
}

#[test]
fn events_reach_a_redis_behind_tls_and_a_password_that_is_never_shown() {
    const PASSWORD: &str = "s3cret-pw-42";
    let stack = Stack::start_secure("tls", PASSWORD);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let goal: i64 = client
        .query_one("SELECT synapse.submit_goal('over tls')", &[])
        .unwrap()
        .get(0);
    let payload = brpop(&mut redis, "synapse:planner", WAIT).expect("delivered over TLS");
    assert_eq!(
        payload,
        format!(r#"{{"v":1,"event":"goal.submitted","goal_id":{goal}}}"#)
    );

    // A worker over TLS too, its password from a file: it plans (and fails) the next goal.
    let worker_password = stack.path("worker-redis-password");
    std::fs::write(&worker_password, format!("{PASSWORD}\n")).unwrap();
    let _worker = stack.start_worker(
        "w",
        &[
            "--redis-url",
            &format!("rediss://127.0.0.1:{}/0", stack.redis_port),
            "--redis-password-file",
            &worker_password.display().to_string(),
        ],
    );
    let next: i64 = client
        .query_one("SELECT synapse.submit_goal('no template')", &[])
        .unwrap()
        .get(0);
    let status = synapse_e2e::wait_for_goal(&stack, next, WAIT);
    assert_eq!(status["status"], "failed");

    // The password can come from a file instead (Postgres logs changed settings
    // on reload, so a password in postgresql.conf would reach the server log).
    let file = stack.path("redis-password");
    std::fs::write(&file, "wrong-password\n").unwrap();
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET synapse.redis_password_file = '{}'",
            file.display()
        ))
        .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").unwrap();
    let status = wait_until("the forwarder to report the bad password", WAIT, || {
        client
            .execute("SELECT synapse.submit_goal('after')", &[])
            .unwrap();
        let status = stack.forwarder_status(&mut client);
        (status["redis_connected"] == false && status["last_error"].is_string()).then_some(status)
    });
    assert!(!status.to_string().contains("wrong-password"), "{status}");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    wait_until(
        "the forwarder to reconnect with the password from the file",
        WAIT,
        || {
            let status = stack.forwarder_status(&mut client);
            (status["redis_connected"] == true && status["pending"] == 0).then_some(())
        },
    );
    for log in [stack.postgres_log(), _worker.log_text()] {
        assert!(
            !log.contains(PASSWORD) && !log.contains("wrong-password"),
            "a password reached a log:\n{log}"
        );
    }
}

#[test]
fn an_expired_last_lease_fails_the_task_and_asks_a_worker_to_carry_on() {
    let stack = Stack::start("lease-last", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let goal = submit_plan(&mut client, ONE_STEP);
    let task = task_id(&mut client, goal, "only");
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("first dispatch");
    claim(&mut client, task, "200 ms");
    // Not re-queued (nothing is left to run): failed, and its queue is told,
    // so that a worker resolves the step's edges and finishes the goal.
    let payload = brpop(&mut redis, "synapse:queue:default", WAIT).expect("a message to a worker");
    assert!(payload.contains(r#""event":"task.failed""#), "{payload}");
    assert!(payload.contains(r#""attempt":1"#), "{payload}");
    let row = client
        .query_one(
            "SELECT status, error, attempts FROM synapse.tasks WHERE id = $1",
            &[&task],
        )
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "failed");
    assert_eq!(
        row.get::<_, &str>(1),
        "lease of attempt 1 expired: worker test stopped responding; whatever the step did may or may not have happened; no attempt left"
    );
    assert_eq!(row.get::<_, i32>(2), 1, "attempts unchanged");
}

/// The length of a Redis list.
fn llen(redis: &mut redis::Connection, list: &str) -> i64 {
    redis::cmd("LLEN").arg(list).query(redis).unwrap()
}

#[test]
fn the_sweep_leaves_a_waiting_message_alone() {
    // A queue nobody consumes keeps one message per task, however many sweeps
    // pass; a list that lost its message gets it again.
    let stack = Stack::start("sweep-waiting", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let unconsumed = submit_plan(
        &mut client,
        r#"{"steps":[{"id":"only","action":"noop","queue":"gpu"}]}"#,
    );
    let lost = submit_plan(&mut client, ONE_STEP);
    let lost_task = task_id(&mut client, lost, "only");
    wait_until("both dispatched", WAIT, || {
        (llen(&mut redis, "synapse:queue:gpu") == 1
            && llen(&mut redis, "synapse:queue:default") == 1)
            .then_some(())
    });
    // Three sweeps, each seen by the message it re-dispatches.
    for _ in 0..3 {
        let payload = brpop(&mut redis, "synapse:queue:default", WAIT).expect("a dispatch");
        assert!(
            payload.contains(&format!("\"task_id\":{lost_task}")),
            "{payload}"
        );
    }
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("the sweep after the third pop");
    assert_eq!(
        llen(&mut redis, "synapse:queue:gpu"),
        1,
        "one message, not one per sweep"
    );
    let status = client
        .query_one(
            "SELECT status FROM synapse.tasks WHERE goal_id = $1",
            &[&unconsumed],
        )
        .unwrap();
    assert_eq!(status.get::<_, &str>(0), "queued");
}

#[test]
fn a_redis_outage_does_not_multiply_the_outbox() {
    let stack = Stack::start("sweep-outage", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    stack.stop_redis();
    for _ in 0..10 {
        submit_plan(&mut client, ONE_STEP);
    }
    wait_until("the forwarder to notice", WAIT, || {
        (stack.forwarder_status(&mut client)["last_error"].is_string()).then_some(())
    });
    // Nothing announces that no sweep ran: watch a window of several sweep intervals.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        stack.forwarder_status(&mut client)["pending"],
        20,
        "ten goal.running and ten task.queued, and no sweep copies"
    );
    stack.start_redis();
    wait_until("the outbox to drain", WAIT, || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
}

#[test]
fn a_key_redis_refuses_does_not_hold_back_the_rest() {
    let stack = Stack::start("refused", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // The event stream's key is taken by a string: every XADD is refused.
    redis::cmd("SET")
        .arg("synapse:events")
        .arg("x")
        .query::<()>(&mut redis)
        .unwrap();
    let goal = submit_plan(&mut client, ONE_STEP);
    let task = task_id(&mut client, goal, "only");
    let payload = brpop(&mut redis, "synapse:queue:default", WAIT).expect("dispatch goes on");
    assert!(
        payload.contains(&format!("\"task_id\":{task}")),
        "{payload}"
    );
    // Redis keeps refusing the stream: the events are set aside, with the error.
    let status = wait_until(
        "the refused events to be set aside",
        Duration::from_secs(90),
        || {
            let status = stack.forwarder_status(&mut client);
            (status["pending"] == 0 && status["parked"] == 2).then_some(status)
        },
    );
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("WRONGTYPE"),
        "{status}"
    );
    assert_eq!(
        llen(&mut redis, "synapse:queue:default"),
        0,
        "the dispatch was sent once, not at every retry"
    );
    // Later work flows meanwhile, and the parked events can be replayed once
    // the key is fixed.
    submit_plan(&mut client, ONE_STEP);
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("new work is dispatched");
    redis::cmd("DEL")
        .arg("synapse:events")
        .query::<()>(&mut redis)
        .unwrap();
    let replayed: i64 = client
        .query_one("SELECT synapse.replay_parked_events()", &[])
        .unwrap()
        .get(0);
    assert!(replayed >= 2, "{replayed}");
    let events = wait_until("the replayed events in the stream", WAIT, || {
        let events = stream_events(&mut redis);
        (events.iter().filter(|e| e["goal_id"] == goal).count() == 2).then_some(events)
    });
    assert!(events
        .iter()
        .any(|e| e["event"] == "task.queued" && e["goal_id"] == goal));
    assert_eq!(
        llen(&mut redis, "synapse:queue:default"),
        0,
        "a replayed event whose dispatch went out is not dispatched again"
    );
}

/// The process id of the forwarder, once it runs.
fn forwarder_pid(client: &mut postgres::Client) -> i32 {
    wait_until("the forwarder", WAIT, || {
        client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'synapse forwarder'",
                &[],
            )
            .unwrap()
            .map(|row| row.get::<_, i32>(0))
    })
}

/// Submits goals nobody plans, pops their first dispatch, and returns their ids.
fn submitted_goals(
    client: &mut postgres::Client,
    redis: &mut redis::Connection,
    n: usize,
) -> Vec<i64> {
    let ids: Vec<i64> = (0..n)
        .map(|i| {
            client
                .query_one("SELECT synapse.submit_goal($1)", &[&format!("goal {i}")])
                .unwrap()
                .get(0)
        })
        .collect();
    for _ in 0..n {
        brpop(redis, "synapse:planner", WAIT).expect("first dispatch");
    }
    ids
}

/// With one of two submitted goals locked by `holder`, the sweep passes it by
/// and dispatches the other again, and new work is dispatched, while the lock
/// is held.
fn flows_past_a_locked_goal(
    client: &mut postgres::Client,
    holder: &mut postgres::Client,
    redis: &mut redis::Connection,
) {
    let goals = submitted_goals(client, redis, 2);
    let mut tx = holder.transaction().unwrap();
    tx.execute(
        "SELECT FROM synapse.goals WHERE id = $1 FOR UPDATE",
        &[&goals[0]],
    )
    .unwrap();
    let payload = brpop(redis, "synapse:planner", WAIT).expect("the sweep goes on");
    assert!(
        payload.contains(&format!("\"goal_id\":{}}}", goals[1])),
        "{payload}"
    );
    let goal = submit_plan(client, ONE_STEP);
    let payload = brpop(redis, "synapse:queue:default", WAIT).expect("new work flows");
    assert!(
        payload.contains(&format!("\"goal_id\":{goal}")),
        "{payload}"
    );
    tx.rollback().unwrap();
}

#[test]
fn a_row_lock_held_elsewhere_does_not_hold_up_the_forwarder() {
    let stack = Stack::start("row-lock", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    let mut holder = stack.pg();
    let mut redis = stack.redis();
    flows_past_a_locked_goal(&mut client, &mut holder, &mut redis);
}

#[test]
fn a_database_timeout_does_not_crash_the_forwarder() {
    let stack = Stack::start("db-timeouts", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET lock_timeout = '1ms'; ALTER DATABASE {} SET statement_timeout = '1ms'",
            synapse_e2e::DATABASE,
            synapse_e2e::DATABASE
        ))
        .unwrap();
    // A new forwarder session, with the database's settings: a restart of
    // Postgres (a terminated forwarder was once seen restarted by the
    // postmaster only 30 s later, under load).
    drop(client);
    stack.stop_postgres();
    stack.start_postgres();
    // The test's own sessions start without the timeouts (options of the
    // connection override the database's): a first `SET` could itself be
    // cancelled by them on a busy machine.
    let without_timeouts = || {
        stack
            .database_url()
            .parse::<postgres::Config>()
            .unwrap()
            .options("-c statement_timeout=0 -c lock_timeout=0")
            .connect(postgres::NoTls)
            .unwrap()
    };
    let mut client = without_timeouts();
    let pid = forwarder_pid(&mut client);
    let mut holder = without_timeouts();
    flows_past_a_locked_goal(&mut client, &mut holder, &mut redis);
    assert_eq!(
        forwarder_pid(&mut client),
        pid,
        "the forwarder never restarted"
    );
}

#[test]
fn reloads_while_forwarding_lose_nothing_and_send_nothing_twice() {
    // A reload signals every backend, the forwarder too, as it waits for
    // Redis: the round trip must neither fail (events held back) nor go out
    // again (a batch Redis took, sent twice).
    let stack = Stack::start("reloads", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let pid = forwarder_pid(&mut client);
    let goals = 6_000;
    let forwarded = std::sync::atomic::AtomicBool::new(false);
    let listed = std::thread::scope(|scope| {
        let reloads = scope.spawn(|| {
            let mut client = stack.pg();
            let mut reloads = 0;
            while !forwarded.load(std::sync::atomic::Ordering::Relaxed) {
                client.batch_execute("SELECT pg_reload_conf()").unwrap();
                reloads += 1;
            }
            reloads
        });
        for batch in 0..30 {
            client
                .batch_execute(&format!(
                    "SELECT synapse.submit_goal('goal ' || i) FROM generate_series({}, {}) AS i",
                    batch * 200,
                    batch * 200 + 199
                ))
                .unwrap();
        }
        wait_until("the outbox forwarded", Duration::from_secs(90), || {
            (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
        });
        forwarded.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            reloads.join().unwrap() > 30,
            "reloads ran beside the forwarding"
        );
        llen(&mut redis, "synapse:planner")
    });
    let payloads: Vec<String> = redis::cmd("LRANGE")
        .arg("synapse:planner")
        .arg(0)
        .arg(-1)
        .query(&mut redis)
        .unwrap();
    let distinct: BTreeSet<i64> = payloads
        .iter()
        .map(|payload| {
            serde_json::from_str::<serde_json::Value>(payload).unwrap()["goal_id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(distinct.len(), goals, "every goal dispatched");
    assert_eq!(listed, goals as i64, "no goal dispatched twice");
    assert_eq!(
        forwarder_pid(&mut client),
        pid,
        "the forwarder never restarted"
    );
    let log = stack.postgres_log();
    assert!(!log.contains("terminated by signal"), "{log}");
    assert!(!log.contains("Interrupted system call"), "{log}");
}

#[test]
fn forwarder_status_tells_a_database_it_does_not_serve() {
    let stack = Stack::start("other-db", &[]);
    let mut admin = stack.pg_database("postgres");
    admin.batch_execute("CREATE DATABASE other").unwrap();
    let mut other = stack.pg_database("other");
    other.batch_execute("CREATE EXTENSION synapse").unwrap();
    submit_plan(&mut other, ONE_STEP);
    let status = stack.forwarder_status(&mut other);
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(status["redis_connected"], false, "{status}");
    assert_eq!(status["pending"], 2, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("serves database \"synapse\""),
        "{status}"
    );
    // In the database it serves, all is well.
    let mut client = stack.pg();
    submit_plan(&mut client, ONE_STEP);
    let status = wait_until("the served database to drain", WAIT, || {
        let status = stack.forwarder_status(&mut client);
        (status["pending"] == 0 && status["redis_connected"] == true).then_some(status)
    });
    assert_eq!(status["running"], true, "{status}");
}

#[test]
fn finished_goals_are_deleted_after_the_retention() {
    let stack = Stack::start("retention", &["synapse.retention = '1s'"]);
    let mut client = stack.pg();
    let blueprint = r#"{"steps":[{"id":"a","action":"noop"},{"id":"b","action":"noop"}],
                        "edges":[{"from":"a","to":"b"}]}"#;
    let finished = submit_plan(&mut client, blueprint);
    let running = submit_plan(&mut client, blueprint);
    client
        .execute("SELECT synapse.cancel_goal($1)", &[&finished])
        .unwrap();
    wait_until("the finished goal to be deleted", WAIT, || {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.goals WHERE id = $1",
                &[&finished],
            )
            .unwrap()
            .get(0);
        (left == 0).then_some(())
    });
    let rows: (i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM synapse.tasks WHERE goal_id = $1),
                        (SELECT count(*) FROM synapse.edges WHERE goal_id = $1)",
                &[&finished],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(rows, (0, 0), "tasks and edges go with their goal");
    let kept: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.tasks WHERE goal_id = $1",
            &[&running],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 2, "a running goal is kept");
}

#[test]
fn a_held_snapshot_does_not_make_reads_wade_through_forwarded_rows() {
    let stack = Stack::start("held-snapshot", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // A long report: its snapshot keeps vacuum from removing forwarded rows.
    let mut holder = stack.pg();
    let mut report = holder
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    report
        .query("SELECT count(*) FROM synapse.goals", &[])
        .unwrap();
    // Buffers the forwarder's reads of the outbox touched (a read that steps
    // over deleted rows touches their pages).
    let read_buffers = |client: &mut postgres::Client| {
        statement_counts(client, "%pg_snapshot_xmin(pg_current_snapshot())%").1
    };
    // Load for a minute while the report's snapshot is held, measuring what
    // each round of events costs the forwarder's reads.
    const PER_ROUND: i64 = 200;
    let started = std::time::Instant::now();
    let mut costs = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        let before = read_buffers(&mut client);
        client
            .batch_execute(&format!(
                "SELECT synapse.submit_goal('goal ' || i) FROM generate_series(1, {PER_ROUND}) AS i"
            ))
            .unwrap();
        wait_until("the round forwarded", WAIT, || {
            (llen(&mut redis, "synapse:planner") == PER_ROUND).then_some(())
        });
        redis::cmd("DEL")
            .arg("synapse:planner")
            .query::<()>(&mut redis)
            .unwrap();
        costs.push(read_buffers(&mut client) - before);
    }
    assert!(costs.len() >= 20, "{} rounds", costs.len());
    // From the lowest id, each read would step over the pages of every row
    // forwarded so far: a round would cost more and more. From the floor, it
    // costs about the pages of its own rows, at the end as at the start.
    let mean = |rounds: &[i64]| rounds.iter().sum::<i64>() / rounds.len() as i64;
    let (first, last) = (mean(&costs[..10]), mean(&costs[costs.len() - 10..]));
    assert!(
        last <= 2 * first + 10,
        "buffers per round: first rounds {first}, last rounds {last} ({} rounds: {costs:?})",
        costs.len()
    );
    report.rollback().unwrap();
}

#[test]
fn events_of_concurrent_transactions_that_commit_out_of_id_order_are_all_forwarded() {
    // Several writers whose transactions each draw outbox ids in two
    // statements, interleaved with each other's, commit in any order while
    // the forwarder reads and raises its read floor: nothing may be left
    // behind.
    const WRITERS: usize = 6;
    const TRANSACTIONS: usize = 200;
    let stack = Stack::start("out-of-order", &["synapse.sweep_interval = '1h'"]);
    std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            scope.spawn(|| {
                let mut client = stack.pg();
                for _ in 0..TRANSACTIONS {
                    let mut tx = client.transaction().unwrap();
                    for _ in 0..2 {
                        tx.execute("SELECT synapse.submit_plan($1::text::jsonb)", &[&ONE_STEP])
                            .unwrap();
                    }
                    tx.commit().unwrap();
                }
            });
        }
    });
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let dispatched = (WRITERS * TRANSACTIONS * 2) as i64;
    wait_until("every event forwarded", Duration::from_secs(60), || {
        let status = stack.forwarder_status(&mut client);
        (status["pending"] == 0 && llen(&mut redis, "synapse:queue:default") == dispatched)
            .then_some(())
    });
}

#[test]
fn checking_that_a_batchs_tasks_are_still_queued_reads_those_tasks_not_every_queued_one() {
    let stack = Stack::start("still-queued", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // A backlog nobody runs: 3 000 queued tasks.
    let steps: Vec<serde_json::Value> = (0..3000)
        .map(|i| serde_json::json!({"id": format!("s{i}"), "action": "noop"}))
        .collect();
    submit_plan(&mut client, &serde_json::json!({ "steps": steps }));
    let queue = "synapse:queue:default";
    wait_until("the backlog forwarded", WAIT, || {
        (llen(&mut redis, queue) == 3000).then_some(())
    });
    // Buffers the forwarder's check touched.
    let check_buffers = |client: &mut postgres::Client| {
        statement_counts(client, "%FROM synapse.tasks WHERE id = ANY%").1
    };
    let before = check_buffers(&mut client);
    for forwarded in 1..=20 {
        submit_plan(&mut client, ONE_STEP);
        wait_until("the goal's task forwarded", WAIT, || {
            (llen(&mut redis, queue) == 3000 + forwarded).then_some(())
        });
    }
    // Each check looks up its one task by id: a few pages of the primary
    // key and of the table, not the pages of all 3 000 queued tasks.
    let read = check_buffers(&mut client) - before;
    assert!(read <= 20 * 10, "20 checks read {read} buffers");
}

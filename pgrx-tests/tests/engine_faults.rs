//! Faults the engine must survive: two attempts of one task recorded together,
//! a database whose default isolation is not READ COMMITTED, cancels racing
//! completions, a completion that waits for its goal's lock, poison goals and
//! tasks, planning that keeps failing, and a completer slow enough for a lease
//! to lapse. Some tests drive the worker
//! library directly (claims and the completer), the others real workers.
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use serde_json::json;
use synapse_e2e::{
    postgres, stream_events, submit_plan, task, task_id, wait_for_goal, wait_for_running_task,
    wait_until, Stack, ONE_STEP,
};
use synapse_worker::completer;
use synapse_worker::executor::Handled;
use synapse_worker::store::{self, AttemptOutcome, ClaimedTask};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// JSON nested 200 deep: valid for Postgres, beyond what serde_json reads (128).
const DEEP_JSON: &str = "(repeat('[', 200) || '1' || repeat(']', 200))::jsonb";

fn task_status(client: &mut postgres::Client, task_id: i64) -> String {
    client
        .query_one(
            "SELECT status FROM synapse.tasks WHERE id = $1",
            &[&task_id],
        )
        .expect("task status")
        .get(0)
}

/// Waits until goal `goal` has ended; its status and error, read from the
/// row (for goals whose `goal_status()` holds JSON serde_json cannot read).
fn wait_for_goal_row(client: &mut postgres::Client, goal: i64) -> (String, String) {
    wait_until("the goal to end", WAIT, || {
        let row = client
            .query_one(
                "SELECT status, coalesce(error, '') FROM synapse.goals WHERE id = $1",
                &[&goal],
            )
            .expect("the goal");
        let status: String = row.get(0);
        matches!(status.as_str(), "succeeded" | "failed" | "cancelled")
            .then(|| (status, row.get::<_, String>(1)))
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Claims `task_ids` as a worker does (one READ COMMITTED transaction).
async fn claim(
    pool: &deadpool_postgres::Pool,
    task_ids: &[i64],
    lease: Duration,
) -> Vec<ClaimedTask> {
    let mut client = pool.get().await.expect("a pooled connection");
    let tx = store::begin(&mut client).await.expect("BEGIN");
    let claim = store::Claim {
        task_ids,
        pending: &[],
        queues: &["default"],
        lease,
        worker: "engine-faults-test",
    };
    let claimed = store::claim_tasks(&tx, &claim).await.expect("claim_tasks");
    tx.commit().await.expect("COMMIT");
    claimed
}

/// Polls `future` once: enough for a completer request to be queued.
async fn poll_once<F: Future>(future: Pin<&mut F>) {
    let mut future = Some(future);
    std::future::poll_fn(|cx| {
        if let Some(future) = future.take() {
            let _ = future.poll(cx);
        }
        Poll::Ready(())
    })
    .await;
}

fn handled(answer: Result<Handled, store::StoreError>) -> String {
    match answer {
        Ok(Handled::Recorded(status)) => format!("recorded {status}"),
        Ok(Handled::Fenced) => "fenced".into(),
        Ok(Handled::Lost) => "lost".into(),
        Ok(Handled::Released) => "released".into(),
        Err(error) => format!("error: {error}"),
    }
}

/// Records `outcomes` through the completer as ONE batch, in this order.
async fn record_in_one_batch(
    pool: &deadpool_postgres::Pool,
    outcomes: Vec<(ClaimedTask, AttemptOutcome)>,
) -> Vec<String> {
    let (completer, queue) = completer::completer(outcomes.len());
    let mut pending: Vec<Pin<Box<_>>> = outcomes
        .into_iter()
        .map(|(task, outcome)| Box::pin(completer.record(task, outcome)))
        .collect();
    // Every request is queued before the completer looks at its queue.
    for request in &mut pending {
        poll_once(request.as_mut()).await;
    }
    let stop = CancellationToken::new();
    let serving = tokio::spawn(completer::run(pool.clone(), queue, stop.clone(), None));
    let mut answers = Vec::new();
    for request in pending {
        answers.push(handled(request.await));
    }
    stop.cancel();
    serving.await.expect("the completer stops");
    answers
}

#[test]
fn two_attempts_of_one_task_recorded_in_one_batch_each_get_their_own_answer() {
    let stack = Stack::start("two-attempts", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({
            "steps": [{"id": "first", "action": "noop", "retries": 1},
                      {"id": "second", "action": "noop"}],
            "edges": [{"from": "first", "to": "second"}]
        }),
    );
    let first = task_id(&mut client, goal, "first");
    let second = task_id(&mut client, goal, "second");
    let rt = runtime();
    let pool = synapse_worker::worker::pool(&stack.database_url(), 4).expect("a pool");

    // Attempt 1 is claimed with a short lease and then hangs: the forwarder's
    // timer re-queues the task when the lease lapses.
    let stale = rt.block_on(claim(&pool, &[first], Duration::from_secs(1)));
    assert_eq!(stale.len(), 1, "attempt 1 claimed");
    assert_eq!(stale[0].attempt, 1);
    wait_until("the lapsed lease to re-queue the task", WAIT, || {
        (task_status(&mut client, first) == "queued").then_some(())
    });
    let fresh = rt.block_on(claim(&pool, &[first], Duration::from_secs(60)));
    assert_eq!(fresh.len(), 1, "attempt 2 claimed");
    assert_eq!(fresh[0].attempt, 2);

    // Both outcomes reach the completer together, the newer attempt first.
    let answers = rt.block_on(record_in_one_batch(
        &pool,
        vec![
            (
                fresh[0].clone(),
                AttemptOutcome::Succeeded(json!({"attempt": 2})),
            ),
            (
                stale[0].clone(),
                AttemptOutcome::Retry {
                    error: "attempt 1 gave up".into(),
                    delay: Duration::from_millis(1),
                },
            ),
        ],
    ));
    assert_eq!(answers, ["recorded succeeded", "fenced"]);
    assert_eq!(task_status(&mut client, first), "succeeded");
    assert_eq!(
        task_status(&mut client, second),
        "queued",
        "the edge out of the succeeded step resolved and queued its successor"
    );

    // The second step runs, and the goal ends.
    let next = rt.block_on(claim(&pool, &[second], Duration::from_secs(60)));
    assert_eq!(next.len(), 1);
    let answers = rt.block_on(record_in_one_batch(
        &pool,
        vec![(next[0].clone(), AttemptOutcome::Succeeded(json!("done")))],
    ));
    assert_eq!(answers, ["recorded succeeded"]);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "first")["result"], json!({"attempt": 2}));
    assert_eq!(task(&status, "second")["status"], "succeeded");
}

#[test]
fn a_batch_that_failed_leaves_its_connection_outside_any_transaction() {
    // One connection in the pool: the batch after a failed one gets the
    // connection the failed one used. The completer begins its transactions
    // itself (to keep them open between batches), so it must also end them
    // when a statement fails.
    let stack = Stack::start("failed-batch", &[]);
    let mut client = stack.pg();
    let goals = [
        submit_plan(&mut client, &ONE_STEP),
        submit_plan(&mut client, &ONE_STEP),
    ];
    let tasks: Vec<i64> = goals
        .iter()
        .map(|&goal| task_id(&mut client, goal, "only"))
        .collect();
    let rt = runtime();
    let pool = synapse_worker::worker::pool(&stack.database_url(), 1).expect("a pool");
    let claimed = rt.block_on(claim(&pool, &tasks, Duration::from_secs(60)));
    assert_eq!(claimed.len(), 2);
    // jsonb refuses \u0000: the outcomes' record fails.
    let refused = rt.block_on(record_in_one_batch(
        &pool,
        vec![(
            claimed[0].clone(),
            AttemptOutcome::Succeeded(json!({"text": "a\u{0}b"})),
        )],
    ));
    assert!(refused[0].starts_with("error: "), "{refused:?}");
    let answers = rt.block_on(record_in_one_batch(
        &pool,
        vec![(claimed[1].clone(), AttemptOutcome::Succeeded(json!("done")))],
    ));
    assert_eq!(answers, ["recorded succeeded"]);
    let status = wait_for_goal(&stack, goals[1], WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let log = stack.postgres_log();
    assert!(
        !log.contains("there is already a transaction in progress"),
        "{log}"
    );
}

#[test]
fn joins_run_exactly_once_when_the_database_defaults_to_repeatable_read() {
    let stack = Stack::start("repeatable-read", &[]);
    let mut client = stack.pg();
    client
        .batch_execute(
            "ALTER DATABASE synapse SET default_transaction_isolation = 'repeatable read'",
        )
        .expect("ALTER DATABASE");
    let mut client = stack.pg();
    let isolation: String = client
        .query_one("SHOW default_transaction_isolation", &[])
        .unwrap()
        .get(0);
    assert_eq!(isolation, "repeatable read");
    // The engine's sessions are READ COMMITTED all the same: a claim runs as
    // a statement of its own.
    let rt = runtime();
    let pool = synapse_worker::worker::pool(&stack.database_url(), 1).expect("a pool");
    let engine_isolation: String = rt.block_on(async {
        let client = pool.get().await.expect("a pooled connection");
        client
            .query_one("SHOW transaction_isolation", &[])
            .await
            .expect("SHOW")
            .get(0)
    });
    assert_eq!(engine_isolation, "read committed");
    let workers: Vec<_> = (0..2)
        .map(|i| stack.start_worker(&format!("w{i}"), &["--concurrency", "16"]))
        .collect();
    let diamond = json!({
        "steps": [{"id": "a", "action": "noop"},
                  {"id": "b", "action": "transform", "params": {"expr": "1"}},
                  {"id": "c", "action": "transform", "params": {"expr": "2"}},
                  {"id": "d", "action": "transform", "params": {"expr": "input.b + input.c"}, "join": "all"}],
        "edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "c"},
                  {"from": "b", "to": "d"}, {"from": "c", "to": "d"}]
    });
    let ids: Vec<i64> = (0..300)
        .map(|_| submit_plan(&mut client, &diamond))
        .collect();
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["result"], json!({"d": 3}));
        assert_eq!(task(&status, "d")["attempts"], 1, "{status}");
    }
    let mut redis = stack.redis();
    let mut joins_queued: Vec<i64> = stream_events(&mut redis)
        .iter()
        .filter(|event| event["event"] == "task.queued" && event["step"] == "d")
        .map(|event| event["goal_id"].as_i64().expect("a goal id"))
        .collect();
    joins_queued.sort_unstable();
    assert_eq!(joins_queued, ids, "each join queued exactly once");
    for worker in &workers {
        let log = worker.log_text();
        assert!(!log.contains("could not"), "{log}");
    }
}

#[test]
fn cancels_racing_completions_never_deadlock() {
    let stack = Stack::start("cancel-race", &[]);
    let mut client = stack.pg();
    let chain = json!({
        "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                  {"id": "c", "action": "noop"}],
        "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]
    });
    let ids: Vec<i64> = (0..400).map(|_| submit_plan(&mut client, &chain)).collect();
    let workers: Vec<_> = (0..2)
        .map(|i| stack.start_worker(&format!("w{i}"), &["--concurrency", "16"]))
        .collect();
    // Three clients cancel every goal while the workers drain them.
    let cancellers: Vec<_> = (0..3)
        .map(|k| {
            let url = stack.database_url();
            let mine: Vec<i64> = ids.iter().copied().skip(k).step_by(3).collect();
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
                let mut errors = Vec::new();
                for id in mine {
                    if let Err(error) = client.query_one("SELECT synapse.cancel_goal($1)", &[&id]) {
                        errors.push(format!("cancel_goal({id}): {error:?}"));
                    }
                }
                errors
            })
        })
        .collect();
    let errors: Vec<String> = cancellers
        .into_iter()
        .flat_map(|canceller| canceller.join().expect("a cancelling thread"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert!(
            matches!(status["status"].as_str(), Some("succeeded" | "cancelled")),
            "{status}"
        );
    }
    let unfinished: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.tasks WHERE status IN ('pending', 'queued', 'running', 'retrying')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0);
    for worker in &workers {
        let log = worker.log_text();
        for bad in ["deadlock", "ERROR", "panicked", "could not"] {
            assert!(!log.contains(bad), "worker log has {bad:?}:\n{log}");
        }
    }
    let log = stack.postgres_log();
    for bad in ["deadlock", "ERROR:"] {
        assert!(!log.contains(bad), "postgres log has {bad:?}:\n{log}");
    }
}

#[test]
fn a_goal_whose_input_cannot_be_read_fails_saying_why() {
    let stack = Stack::start("poison-goal", &[]);
    let mut client = stack.pg();
    let submitted = client.query_one(
        &format!("SELECT synapse.submit_goal('x', {DEEP_JSON})"),
        &[],
    );
    let goal: i64 = match submitted {
        Ok(row) => row.get(0),
        // Refused at the door is fine too; then put it there the way a
        // superuser could, before a worker sees the goal.
        Err(_) => {
            let goal: i64 = client
                .query_one("SELECT synapse.submit_goal('x')", &[])
                .unwrap()
                .get(0);
            client
                .execute(
                    &format!("UPDATE synapse.goals SET input = {DEEP_JSON} WHERE id = $1"),
                    &[&goal],
                )
                .unwrap();
            goal
        }
    };
    let worker = stack.start_worker("w", &[]);
    // goal_status() carries the input, which serde_json cannot read either.
    let (status, error) = wait_for_goal_row(&mut client, goal);
    assert_eq!(status, "failed", "{error}");
    assert!(
        error.contains("cannot read the goal's input") && error.contains("recursion limit"),
        "{error}"
    );
    assert!(!worker.log_text().contains("panicked"));
}

#[test]
fn a_poison_task_fails_alone_while_the_rest_of_its_claim_batch_runs() {
    let stack = Stack::start("poison-task", &[]);
    let mut client = stack.pg();
    let ids: Vec<i64> = (0..8).map(|_| submit_plan(&mut client, ONE_STEP)).collect();
    let poison = ids[3];
    client
        .execute(
            &format!("UPDATE synapse.tasks SET input = {DEEP_JSON} WHERE goal_id = $1"),
            &[&poison],
        )
        .unwrap();
    // Every message waits in Redis, so the worker pops and claims them together.
    let mut redis = stack.redis();
    wait_until("the tasks to be dispatched", WAIT, || {
        let waiting: usize = synapse_e2e::redis::cmd("LLEN")
            .arg("synapse:queue:default")
            .query(&mut redis)
            .expect("LLEN");
        (waiting >= ids.len()).then_some(())
    });
    let worker = stack.start_worker("w", &["--concurrency", "16"]);
    for id in &ids {
        let (status, error) = wait_for_goal_row(&mut client, *id);
        let row = client
            .query_one(
                "SELECT status, attempts, coalesce(error, '') FROM synapse.tasks WHERE goal_id = $1",
                &[id],
            )
            .unwrap();
        let (task_status, attempts, task_error): (String, i32, String) =
            (row.get(0), row.get(1), row.get(2));
        if *id == poison {
            assert_eq!(status, "failed", "{error}");
            assert_eq!(task_status, "failed");
            assert!(
                task_error.contains("cannot read the task's input")
                    && task_error.contains("recursion limit"),
                "{task_error}"
            );
        } else {
            assert_eq!(status, "succeeded", "goal {id}: {error}");
            assert_eq!((task_status.as_str(), attempts), ("succeeded", 1));
        }
    }
    assert!(!worker.log_text().contains("panicked"));
}

#[test]
fn planning_that_keeps_failing_gives_up_after_three_attempts() {
    let stack = Stack::start("planning-attempts", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.add_template('explode', 'explode', $1::text::jsonb)",
            &[&ONE_STEP],
        )
        .unwrap();
    // Installing the plan always fails: an error, not a validation problem.
    client
        .batch_execute(
            "CREATE FUNCTION public.refuse_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'no tasks today'; END $$;
             CREATE TRIGGER refuse_tasks BEFORE INSERT ON synapse.tasks
                FOR EACH ROW EXECUTE FUNCTION public.refuse_tasks();",
        )
        .unwrap();
    let exploding: i64 = client
        .query_one("SELECT synapse.submit_goal('explode')", &[])
        .unwrap()
        .get(0);
    let unknown: i64 = client
        .query_one(
            "SELECT synapse.submit_goal('anything', '{}', 'oracle')",
            &[],
        )
        .unwrap()
        .get(0);
    let _worker = stack.start_worker("w", &[]);

    let status = wait_for_goal(&stack, exploding, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("planning failed 3 times: ") && error.contains("no tasks today"),
        "{error}"
    );
    let attempts: i32 = client
        .query_one(
            "SELECT plan_attempts FROM synapse.goals WHERE id = $1",
            &[&exploding],
        )
        .unwrap()
        .get(0);
    assert_eq!(attempts, 3);

    // A goal that cannot be planned at all fails at once.
    let status = wait_for_goal(&stack, unknown, WAIT);
    assert_eq!(status["status"], "failed", "{status}");
    assert_eq!(
        status["error"],
        r#"unknown planner "oracle" (this worker has: template)"#
    );
    let attempts: i32 = client
        .query_one(
            "SELECT plan_attempts FROM synapse.goals WHERE id = $1",
            &[&unknown],
        )
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1);
}

#[test]
fn the_lease_is_renewed_while_an_outcome_waits_to_be_recorded() {
    let stack = Stack::start("lease-while-recording", &[]);
    let mut client = stack.pg();
    let worker = stack.start_worker("w", &["--lease", "1s"]);
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "slow", "action": "sleep", "params": {"ms": 1000}}]}),
    );
    wait_for_running_task(&mut client, goal);
    let only = task_id(&mut client, goal, "slow");
    // Hold the goal: the completer waits for it once the action is done.
    let mut holder = stack.pg();
    let mut hold = holder.transaction().unwrap();
    hold.query_one(
        "SELECT 1 FROM synapse.goals WHERE id = $1 FOR UPDATE",
        &[&goal],
    )
    .unwrap();
    wait_until("the completer to wait for the goal", WAIT, || {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    });
    let lease: String = client
        .query_one(
            "SELECT lease_expires_at::text FROM synapse.tasks WHERE id = $1",
            &[&only],
        )
        .unwrap()
        .get(0);
    wait_until(
        "the lease to be renewed while the outcome waits",
        Duration::from_secs(30),
        || {
            let renewed: bool = client
                .query_one(
                    "SELECT status = 'running' AND attempts = 1 AND lease_expires_at > $2::text::timestamptz
                       FROM synapse.tasks WHERE id = $1",
                    &[&only, &lease],
                )
                .unwrap()
                .get(0);
            renewed.then_some(())
        },
    );
    hold.commit().unwrap();
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "slow")["attempts"], 1, "it ran once");
    assert!(!worker.log_text().contains("a newer attempt owns the task"));
}

#[test]
fn the_engines_plans_made_on_empty_tables_still_find_goals_by_id() {
    // A fresh install: goals is empty and was never analyzed. The engine's
    // sessions keep the generic plan they make now for their whole life; a
    // scan of the whole table would grow with it (a batch's goal locks went
    // from 2 to 4 ms in a steady state of a few seconds).
    let stack = Stack::start("empty-plans", &[]);
    let rt = runtime();
    let pool = synapse_worker::worker::pool(&stack.database_url(), 1).expect("a pool");
    let plan: String = rt.block_on(async {
        let client = pool.get().await.expect("a pooled connection");
        client
            .batch_execute(&format!(
                "PREPARE lock_goals(bigint[], bigint[]) AS {}",
                synapse_worker::store::LOCK_RUNNING_GOALS
            ))
            .await
            .expect("PREPARE");
        client
            .simple_query("EXPLAIN (COSTS OFF) EXECUTE lock_goals('{1,2,3}', '{1,2}')")
            .await
            .expect("EXPLAIN")
            .into_iter()
            .filter_map(|message| match message {
                deadpool_postgres::tokio_postgres::SimpleQueryMessage::Row(row) => {
                    row.get(0).map(str::to_owned)
                }
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    assert!(plan.contains("Index Cond: (id = ANY ($1))"), "{plan}");
    assert!(plan.contains("Index Cond: (id = ANY ($2))"), "{plan}");
    assert!(
        plan.contains("Index Only Scan using tasks_taking_turns"),
        "{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

#[test]
fn an_outcome_waiting_for_its_goals_lock_has_not_touched_its_task() {
    // A completion's goal lock and its outcome go out together, in one round
    // trip. Postgres must still take the goal first, the order `cancel_goal`
    // follows too: a task row locked before its goal's would deadlock a cancel.
    let stack = Stack::start("lock-order", &[]);
    let mut client = stack.pg();
    let goal = submit_plan(&mut client, ONE_STEP);
    let mut holder = stack.pg();
    let mut lock = holder.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM synapse.goals WHERE id = $1 FOR UPDATE",
        &[&goal],
    )
    .unwrap();
    let _worker = stack.start_worker("w", &[]);
    wait_until("the outcome to wait for its goal's lock", WAIT, || {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE usename = $1 AND wait_event_type = 'Lock'",
                &[&synapse_e2e::WORKER_ROLE],
            )
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    });
    let status: String = lock
        .query_one(
            "SELECT status FROM synapse.tasks WHERE goal_id = $1 FOR UPDATE NOWAIT",
            &[&goal],
        )
        .expect("the task's row is not locked by the waiting outcome")
        .get(0);
    assert_eq!(status, "running");
    lock.commit().unwrap();
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
}

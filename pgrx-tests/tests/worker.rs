//! The whole path with real `synapse-worker` processes: submit_goal → planner
//! → engine → actions, driven by outbox events and Redis.
use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{
    assert_quiet, chain_of, edge_state, noop_chain, postgres, redis, run_plan, statement_counts,
    stream_events, submit_plan, submit_plan_with_input, task, wait_for_goal, wait_for_running_task,
    wait_for_step, wait_until, Stack,
};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_goal_is_planned_from_a_template_and_takes_the_branch_its_data_chooses() {
    let stack = Stack::start("m3", &[]);
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.add_template('triage', 'triage incident (?P<id>\\d+) severity (?P<severity>\\d+)', $1::text::jsonb)",
            &[&synapse_e2e::TRIAGE],
        )
        .unwrap();
    let _worker = stack.start_worker("w", &[]);
    let urgent: i64 = client
        .query_one(
            "SELECT synapse.submit_goal('Triage incident 7 severity 5')",
            &[],
        )
        .unwrap()
        .get(0);
    let minor: i64 = client
        .query_one(
            "SELECT synapse.submit_goal('triage incident 8 severity 1')",
            &[],
        )
        .unwrap()
        .get(0);

    let status = wait_for_goal(&stack, urgent, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["template"], "triage");
    assert_eq!(status["params"], json!({"id": "7", "severity": "5"}));
    assert_eq!(status["result"], json!({"branch": "page", "incident": "7"}));
    assert_eq!(
        task(&status, "page")["result"],
        json!({"paged": "7"}),
        "data flows from parse to page"
    );
    assert_eq!(task(&status, "backlog")["status"], "skipped");
    assert_eq!(edge_state(&status, "parse", "page"), "taken");
    assert_eq!(edge_state(&status, "parse", "backlog"), "not_taken");
    assert_eq!(edge_state(&status, "backlog", "close"), "not_taken");
    assert_eq!(task(&status, "close")["status"], "succeeded");

    let status = wait_for_goal(&stack, minor, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(
        status["result"],
        json!({"branch": "backlog", "incident": "8"})
    );
    assert_eq!(task(&status, "page")["status"], "skipped");
    assert_eq!(task(&status, "backlog")["status"], "succeeded");
    assert_eq!(edge_state(&status, "parse", "backlog"), "taken");

    let graph: String = client
        .query_one("SELECT synapse.goal_graph($1)", &[&minor])
        .unwrap()
        .get(0);
    assert!(
        graph.contains("parse -.->|\"result.priority #gt; 3\"| page"),
        "{graph}"
    );
    assert!(
        graph.contains("parse ==>|\"result.priority #lt;= 3\"| backlog"),
        "{graph}"
    );
}

#[test]
fn goals_that_cannot_be_planned_fail_saying_why_and_create_no_task() {
    let stack = Stack::start("planning-errors", &[]);
    let mut client = stack.pg();
    // A template written around the API, with a blueprint the validator refuses.
    client
        .execute(
            r#"INSERT INTO synapse.templates (name, pattern, blueprint)
               VALUES ('broken', '^broken plan$', '{"steps":[{"id":"a","action":"nope"},{"id":"a","action":"noop"}]}')"#,
            &[],
        )
        .unwrap();
    let _worker = stack.start_worker("w", &[]);
    let unmatched: i64 = client
        .query_one("SELECT synapse.submit_goal('deploy the moon')", &[])
        .unwrap()
        .get(0);
    let broken: i64 = client
        .query_one("SELECT synapse.submit_goal('broken plan')", &[])
        .unwrap()
        .get(0);
    let unknown: i64 = client
        .query_one(
            "SELECT synapse.submit_goal('anything', '{}', 'oracle')",
            &[],
        )
        .unwrap()
        .get(0);

    let status = wait_for_goal(&stack, unmatched, WAIT);
    assert_eq!(status["status"], "failed");
    assert_eq!(
        status["error"],
        r#"no template matches goal "deploy the moon""#
    );

    let status = wait_for_goal(&stack, broken, WAIT);
    assert_eq!(status["status"], "failed");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains(r#"$.steps[0].action: unknown action "nope""#),
        "{error}"
    );
    assert!(error.contains("$.steps[1].id"), "{error}");
    assert_eq!(status["tasks"], json!([]));

    let status = wait_for_goal(&stack, unknown, WAIT);
    assert_eq!(
        status["error"],
        r#"unknown planner "oracle" (this worker has: template)"#
    );
    let tasks: i64 = client
        .query_one("SELECT count(*) FROM synapse.tasks", &[])
        .unwrap()
        .get(0);
    assert_eq!(tasks, 0);
}

#[test]
fn failures_retry_with_backoff_time_out_and_are_handled_by_failure_edges() {
    let stack = Stack::start("failures", &[]);
    let _worker = stack.start_worker("w", &[]);

    // Retries: three attempts, each failure recorded as task.retrying first.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "flaky", "action": "fail", "params": {"message": "boom"}, "retries": 2, "backoff": "50ms"}]}),
    );
    assert_eq!(status["status"], "failed");
    assert_eq!(task(&status, "flaky")["attempts"], 3);
    assert_eq!(status["error"], "step flaky failed: boom");
    let mut redis = stack.redis();
    let retrying = stream_events(&mut redis)
        .iter()
        .filter(|event| event["event"] == "task.retrying")
        .count();
    assert_eq!(retrying, 2);

    // A per-attempt timeout fails the attempt.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "slow", "action": "sleep", "params": {"ms": 10000}, "timeout": "200ms"}]}),
    );
    assert_eq!(status["status"], "failed");
    assert_eq!(task(&status, "slow")["error"], "timed out after 200ms");

    // An on: failure edge handles the failure: the goal succeeds.
    let status = run_plan(
        &stack,
        json!({
            "steps": [{"id": "risky", "action": "fail", "params": {"message": "nope"}},
                      {"id": "recover", "action": "transform", "params": {"expr": "{'recovered_from': input.risky}"},
                       "input": "{'risky': steps.risky.status}"},
                      {"id": "celebrate", "action": "noop"}],
            "edges": [{"from": "risky", "to": "recover", "on": "failure"},
                      {"from": "risky", "to": "celebrate"}]
        }),
    );
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(
        task(&status, "recover")["result"],
        json!({"recovered_from": "failed"})
    );
    assert_eq!(task(&status, "celebrate")["status"], "skipped");
    assert_eq!(
        status["result"],
        json!({"recover": {"recovered_from": "failed"}})
    );

    // Without one, the failure fails the goal and skips what followed.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "a", "action": "fail"}, {"id": "b", "action": "noop"}],
               "edges": [{"from": "a", "to": "b"}]}),
    );
    assert_eq!(status["status"], "failed");
    assert_eq!(task(&status, "b")["status"], "skipped");
}

#[test]
fn joins_and_skips_follow_the_blueprint() {
    let stack = Stack::start("joins", &[]);
    let _worker = stack.start_worker("w", &[]);
    let status = run_plan(
        &stack,
        json!({
            "steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                      {"id": "all", "action": "noop", "join": "all"},
                      {"id": "any", "action": "noop", "join": "any"},
                      {"id": "x", "action": "noop"}, {"id": "y", "action": "noop"}, {"id": "z", "action": "noop"}],
            "edges": [{"from": "a", "to": "all"}, {"from": "b", "to": "all", "when": "false"},
                      {"from": "a", "to": "any"}, {"from": "b", "to": "any", "when": "false"},
                      {"from": "b", "to": "x", "when": "false"}, {"from": "x", "to": "y"}, {"from": "y", "to": "z"}]
        }),
    );
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "all")["status"], "skipped");
    assert_eq!(
        task(&status, "all")["error"],
        "join all: edge from b not taken"
    );
    assert_eq!(task(&status, "any")["status"], "succeeded");
    for step in ["x", "y", "z"] {
        assert_eq!(
            task(&status, step)["status"],
            "skipped",
            "the skip cascades down the branch"
        );
    }
    assert_eq!(edge_state(&status, "y", "z"), "not_taken");

    // A condition that cannot be evaluated fails its target, naming the edge.
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}],
               "edges": [{"from": "a", "to": "b", "when": "result.missing == 1"}]}),
    );
    assert_eq!(status["status"], "failed");
    assert_eq!(edge_state(&status, "a", "b"), "error");
    assert!(
        task(&status, "b")["error"]
            .as_str()
            .unwrap()
            .starts_with("edge a -> b: condition failed"),
        "{status}"
    );
}

#[test]
fn two_hundred_diamonds_on_four_workers_run_every_join_exactly_once() {
    let stack = Stack::start("diamonds", &[]);
    let workers: Vec<_> = (0..4)
        .map(|i| stack.start_worker(&format!("w{i}"), &["--concurrency", "8"]))
        .collect();
    let mut client = stack.pg();
    let diamond = json!({
        "steps": [{"id": "top", "action": "noop"},
                  {"id": "left", "action": "transform", "params": {"expr": "1"}},
                  {"id": "right", "action": "transform", "params": {"expr": "2"}},
                  {"id": "join", "action": "transform", "params": {"expr": "input.left + input.right"}, "join": "all"}],
        "edges": [{"from": "top", "to": "left"}, {"from": "top", "to": "right"},
                  {"from": "left", "to": "join"}, {"from": "right", "to": "join"}]
    });
    let ids: Vec<i64> = (0..200)
        .map(|_| submit_plan(&mut client, &diamond))
        .collect();
    for id in &ids {
        let status = wait_for_goal(&stack, *id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["result"], json!({"join": 3}));
        assert_eq!(task(&status, "join")["attempts"], 1);
    }
    // Exactly one task.queued per join, across all four workers.
    let mut redis = stack.redis();
    let mut joins_queued = Vec::new();
    for event in stream_events(&mut redis) {
        if event["event"] == "task.queued" && event["step"] == "join" {
            joins_queued.push(event["goal_id"].as_i64().unwrap());
        }
    }
    let unique: BTreeSet<i64> = joins_queued.iter().copied().collect();
    assert_eq!(joins_queued.len(), 200);
    assert_eq!(unique, ids.iter().copied().collect());
    // The work was shared.
    let busy = workers
        .iter()
        .filter(|worker| worker.log_text().contains("task recorded"))
        .count();
    assert!(busy >= 2, "only {busy} of 4 workers ran tasks");
}

#[test]
fn a_killed_worker_s_task_runs_again_and_a_stale_worker_cannot_overwrite_it() {
    let stack = Stack::start("kill", &[]);
    let mut client = stack.pg();

    // kill -9 mid-task: the lease lapses, the forwarder re-queues, another worker finishes.
    let doomed = stack.start_worker("doomed", &["--lease", "1s"]);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "long", "action": "sleep", "params": {"ms": 1500}, "retries": 1}]}),
    );
    wait_for_running_task(&mut client, id);
    doomed.signal("KILL");
    let _rescuer = stack.start_worker("rescuer", &["--lease", "1s"]);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "long")["attempts"], 2);

    // A frozen worker whose lease expired: its late outcome is fenced out.
    let frozen = stack.start_worker("frozen", &["--lease", "1s", "--queues", "slow"]);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "step", "action": "sleep", "params": {"ms": 800}, "queue": "slow", "retries": 1}]}),
    );
    wait_for_running_task(&mut client, id);
    frozen.signal("STOP");
    let thawed_rival = stack.start_worker("rival", &["--lease", "5s", "--queues", "slow"]);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded");
    assert_eq!(task(&status, "step")["attempts"], 2);
    frozen.signal("CONT");
    wait_until("the stale outcome to be rejected", WAIT, || {
        frozen
            .log_text()
            .contains("outcome rejected: a newer attempt owns the task")
            .then_some(())
    });
    let after = wait_for_goal(&stack, id, WAIT);
    assert_eq!(task(&after, "step")["attempts"], 2);
    drop(thawed_rival);
}

#[test]
fn duplicate_messages_are_harmless_and_a_flushed_redis_is_swept() {
    let stack = Stack::start("duplicates", &["synapse.sweep_interval = '1s'"]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "once", "action": "noop"}]}),
    );
    let payload: String = wait_until("the message", WAIT, || {
        redis::cmd("LINDEX")
            .arg("synapse:queue:default")
            .arg(0)
            .query::<Option<String>>(&mut redis)
            .unwrap()
    });
    for _ in 0..5 {
        redis::cmd("LPUSH")
            .arg("synapse:queue:default")
            .arg(&payload)
            .query::<()>(&mut redis)
            .unwrap();
    }
    let _worker = stack.start_worker("w", &[]);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded");
    assert_eq!(task(&status, "once")["attempts"], 1);
    wait_until("the duplicates to be consumed", WAIT, || {
        let left: i64 = redis::cmd("LLEN")
            .arg("synapse:queue:default")
            .query(&mut redis)
            .unwrap();
        (left == 0).then_some(())
    });

    // FLUSHALL loses queued work; the sweep dispatches it again.
    drop(_worker);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "lost", "action": "noop"}]}),
    );
    wait_until("the message", WAIT, || {
        let len: i64 = redis::cmd("LLEN")
            .arg("synapse:queue:default")
            .query(&mut redis)
            .unwrap();
        (len == 1).then_some(())
    });
    redis::cmd("FLUSHALL").query::<()>(&mut redis).unwrap();
    let _worker = stack.start_worker("w2", &[]);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded");
}

#[test]
fn cancel_reaches_a_running_task_and_sigterm_lets_work_finish() {
    let stack = Stack::start("cancel", &[]);
    let mut client = stack.pg();
    let mut worker = stack.start_worker("w", &["--lease", "1s", "--concurrency", "1"]);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "long", "action": "sleep", "params": {"ms": 60000}}]}),
    );
    wait_for_running_task(&mut client, id);
    assert!(client
        .query_one("SELECT synapse.cancel_goal($1)", &[&id])
        .unwrap()
        .get::<_, bool>(0));
    wait_until("the worker to stop the task", WAIT, || {
        worker
            .log_text()
            .contains("task cancelled or lease lost; stopped")
            .then_some(())
    });
    // Its only slot is free again.
    let status = run_plan(&stack, json!({"steps": [{"id": "next", "action": "noop"}]}));
    assert_eq!(status["status"], "succeeded");

    // SIGTERM: the running task finishes, then the worker exits 0.
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "finish_me", "action": "sleep", "params": {"ms": 700}}]}),
    );
    wait_for_running_task(&mut client, id);
    worker.signal("TERM");
    let exit = worker.wait(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", worker.log_text());
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded");
}

#[test]
fn an_idle_worker_blocks_in_brpop_and_runs_no_sql() {
    let stack = Stack::start("worker-idle", &[]);
    let _worker = stack.start_worker("w", &[]);
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"}],
                                          "edges": [{"from": "a", "to": "b"}]}),
    );
    assert_eq!(status["status"], "succeeded");
    let mut client = stack.pg();
    let mut redis = stack.redis();
    wait_until("the last events to be forwarded", WAIT, || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
    assert_quiet(&mut client, &mut redis, "%", Duration::from_secs(3));
}

/// Answers every HTTP request on a local port with `status` and a JSON body
/// echoing the request body; returns the port. Serves `requests` requests.
fn http_receiver(status: u16, requests: usize) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let reply = format!(r#"{{"echo":{}}}"#, String::from_utf8(body).unwrap());
            write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            )
            .unwrap();
        }
    });
    port
}

#[test]
fn the_sql_http_and_exec_actions_work_against_real_services() {
    let stack = Stack::start("actions", &[]);
    let mut client = stack.pg();
    client
        .batch_execute("CREATE TABLE public.orders (id bigint PRIMARY KEY, amount int NOT NULL, placed date NOT NULL)")
        .unwrap();
    let _worker = stack.start_worker(
        "w",
        &["--allow-exec", "/bin/cat", "--allow-http", "127.0.0.1"],
    );
    let port = http_receiver(200, 1);
    let status = run_plan(
        &stack,
        json!({
            "steps": [
                {"id": "insert", "action": "sql", "input": "{'id': 7, 'amount': 30}",
                 "params": {"query": "insert into orders values ($1, $2, '2026-11-24') returning id, amount, placed",
                            "args": "[input.id, input.amount]"}},
                {"id": "total", "action": "sql",
                 "params": {"query": "select sum(amount)::int as total, count(*) as orders from orders where amount >= $1",
                            "args": "[10]"}},
                {"id": "notify", "action": "http", "input": "steps.total.result.rows[0]",
                 "params": {"method": "POST", "url": format!("http://127.0.0.1:{port}/hook")}},
                {"id": "echo", "action": "exec", "input": "steps.notify.result.body",
                 "params": {"argv": ["/bin/cat"]}},
                {"id": "denied", "action": "exec", "params": {"argv": ["/bin/echo", "hi"]}}
            ],
            "edges": [{"from": "insert", "to": "total"}, {"from": "total", "to": "notify"},
                      {"from": "notify", "to": "echo"}],
            "output": "{'echo': steps.echo.result, 'inserted': steps.insert.result.rows[0]}"
        }),
    );
    assert_eq!(status["status"], "failed", "the denied exec fails the goal");
    assert_eq!(
        task(&status, "insert")["result"],
        json!({"rows": [{"id": 7, "amount": 30, "placed": "2026-11-24"}]})
    );
    assert_eq!(
        task(&status, "total")["result"],
        json!({"rows": [{"total": 30, "orders": 1}]})
    );
    assert_eq!(task(&status, "notify")["result"]["status"], 200);
    assert_eq!(
        task(&status, "notify")["result"]["body"],
        json!({"echo": {"total": 30, "orders": 1}})
    );
    assert_eq!(
        task(&status, "echo")["result"],
        json!({"echo": {"total": 30, "orders": 1}})
    );
    let denied = task(&status, "denied")["error"].as_str().unwrap();
    assert!(denied.contains("is not allowed"), "{denied}");
    assert!(denied.contains("--allow-exec"), "{denied}");

    // A non-2xx answer fails the step; a bad query fails it with Postgres's message.
    let port = http_receiver(404, 1);
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "hook", "action": "http", "params": {"url": format!("http://127.0.0.1:{port}/x")}},
                         {"id": "bad_sql", "action": "sql", "params": {"query": "select * from no_such_table"}}]}),
    );
    assert!(
        task(&status, "hook")["error"]
            .as_str()
            .unwrap()
            .contains("404"),
        "{status}"
    );
    assert!(
        task(&status, "bad_sql")["error"]
            .as_str()
            .unwrap()
            .contains("no_such_table"),
        "{status}"
    );
}

#[test]
fn a_custom_action_registered_by_its_binary_validates_and_runs() {
    let stack = Stack::start("custom", &[]);
    let mut client = stack.pg();
    let blueprint = json!({"steps": [{"id": "count", "action": "word_count", "input": "{'text': goal.input.text}"}]});
    let problems: String = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
            &[&blueprint.to_string()],
        )
        .unwrap()
        .get(0);
    assert!(
        problems.contains("unknown action \\\"word_count\\\""),
        "{problems}"
    );
    let url = stack.database_url();
    let redis_url = stack.redis_url();
    let _worker = stack.start_worker_binary(
        "custom",
        &synapse_e2e::example_binary("custom_action"),
        &["--database-url", &url, "--redis-url", &redis_url],
    );
    let described: String = client
        .query_one(
            "SELECT description FROM synapse.actions WHERE name = 'word_count'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(described.starts_with("Counts the words"));
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb, '{\"text\": \"to be or not to be\"}')",
            &[&blueprint.to_string()],
        )
        .unwrap()
        .get(0);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["result"], json!({"count": {"words": 6}}), "{status}");
}

#[test]
fn a_worker_waits_out_a_postgres_outage_without_losing_its_message() {
    let stack = Stack::start("pg-outage", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // A task's message taken out of Redis before its worker starts, and put
    // back once Postgres is down, so the worker pops it during the outage.
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "later", "action": "noop", "queue": "parked"}]}),
    );
    let payload: String = wait_until("the parked message", WAIT, || {
        redis::cmd("RPOP")
            .arg("synapse:queue:parked")
            .query::<Option<String>>(&mut redis)
            .unwrap()
    });
    let worker = stack.start_worker("w", &["--queues", "parked"]);
    drop(client);
    stack.stop_postgres();
    redis::cmd("LPUSH")
        .arg("synapse:queue:parked")
        .arg(&payload)
        .query::<()>(&mut redis)
        .unwrap();
    wait_until("the worker to hand the message back twice", WAIT, || {
        (worker
            .log_text()
            .matches("postgres unreachable; messages handed back")
            .count()
            >= 2)
            .then_some(())
    });
    stack.start_postgres();
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "later")["attempts"], 1);
}

#[test]
fn a_task_whose_last_lease_expired_fails_and_its_edges_carry_the_goal_on() {
    let stack = Stack::start("lease-exhausted", &[]);
    let mut client = stack.pg();
    let doomed = stack.start_worker("doomed", &["--lease", "1s"]);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "fragile", "action": "sleep", "params": {"ms": 60000}},
                          {"id": "cleanup", "action": "noop"}],
                "edges": [{"from": "fragile", "to": "cleanup", "on": "failure"}]}),
    );
    wait_for_running_task(&mut client, id);
    doomed.signal("KILL");
    let _next = stack.start_worker("next", &[]);
    let status = wait_for_goal(&stack, id, WAIT);
    // The failure edge was resolved by a worker and handled the failure.
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "cleanup")["status"], "succeeded");
    let fragile = task(&status, "fragile");
    assert_eq!(fragile["status"], "failed");
    assert_eq!(
        fragile["attempts"], 1,
        "not claimed again past its last attempt"
    );
    let error = fragile["error"].as_str().unwrap().to_owned();
    assert!(
        error.starts_with("lease of attempt 1 expired: worker "),
        "{error}"
    );
    assert!(
        error.ends_with(" stopped responding; whatever the step did may or may not have happened; no attempt left"),
        "{error}"
    );
}

#[test]
fn metrics_count_tasks_by_action_and_outcome() {
    use std::io::{Read, Write};
    let stack = Stack::start("metrics", &[]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let _worker = stack.start_worker("w", &["--metrics-addr", &addr]);
    let status = run_plan(
        &stack,
        json!({"steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "fail", "retries": 1, "backoff": "10ms"}]}),
    );
    assert_eq!(status["status"], "failed");
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    for line in [
        r#"synapse_tasks_total{action="noop",outcome="succeeded"} 1"#,
        r#"synapse_tasks_total{action="fail",outcome="retrying"} 1"#,
        r#"synapse_tasks_total{action="fail",outcome="failed"} 1"#,
        r#"synapse_task_duration_seconds_count{action="noop"} 1"#,
        "synapse_task_queue_wait_seconds_count 3",
        "synapse_tasks_in_flight 0",
    ] {
        assert!(response.contains(line), "{line} missing from\n{response}");
    }
    // Connection strings never reach the log.
    let log = _worker.log_text();
    assert!(!log.contains("postgresql://"), "{log}");
    assert!(!log.contains("redis://"), "{log}");
}

#[test]
fn at_sigterm_a_task_that_outlives_the_grace_period_is_released_for_another_worker() {
    let stack = Stack::start("release", &[]);
    let mut client = stack.pg();
    let mut leaving = stack.start_worker("leaving", &["--grace", "300ms"]);
    let id = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "long", "action": "sleep", "params": {"ms": 1500}}]}),
    );
    wait_for_running_task(&mut client, id);
    leaving.signal("TERM");
    let exit = leaving.wait(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", leaving.log_text());
    assert!(
        leaving
            .log_text()
            .contains("released unfinished task at shutdown"),
        "{}",
        leaving.log_text()
    );
    let row = client
        .query_one(
            "SELECT status, attempts FROM synapse.tasks WHERE goal_id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "queued", "released, not failed");
    assert_eq!(
        row.get::<_, i32>(1),
        0,
        "the released attempt does not count"
    );
    // Released work is dispatched again (task.queued) and another worker runs it.
    let _next = stack.start_worker("next", &[]);
    let status = wait_for_goal(&stack, id, WAIT);
    assert_eq!(status["status"], "succeeded");
    assert_eq!(task(&status, "long")["attempts"], 1);
}

#[test]
fn a_slot_is_free_for_the_next_task_while_an_outcome_waits_to_be_recorded() {
    let stack = Stack::start("slots", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    let queued = |redis: &mut redis::Connection| -> i64 {
        redis::cmd("LLEN")
            .arg("synapse:queue:default")
            .query(redis)
            .unwrap()
    };
    let blocked = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "a", "action": "noop"}]}),
    );
    // The blocked goal's task is the first one popped.
    wait_until("the first message", WAIT, || {
        (queued(&mut redis) == 1).then_some(())
    });
    let free = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "b", "action": "noop"}]}),
    );
    wait_until("the second message", WAIT, || {
        (queued(&mut redis) == 2).then_some(())
    });
    // Recording an outcome locks its goal first: holding the first goal's row
    // keeps its outcome waiting in the completer.
    let mut holder = stack.pg();
    let mut lock = holder.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM synapse.goals WHERE id = $1 FOR UPDATE",
        &[&blocked],
    )
    .unwrap();
    let _worker = stack.start_worker("w", &["--concurrency", "1"]);

    // With its only slot free again, the worker runs and records the next task.
    let status = wait_for_goal(&stack, free, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let waiting: String = client
        .query_one(
            "SELECT status FROM synapse.tasks WHERE goal_id = $1",
            &[&blocked],
        )
        .unwrap()
        .get(0);
    assert_eq!(waiting, "running", "the first outcome is not recorded yet");

    lock.commit().unwrap();
    let status = wait_for_goal(&stack, blocked, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "a")["attempts"], 1);
}

/// `fan` → `width` parents → `join` (all).
fn fan_in(width: usize) -> Value {
    fan_in_when(width, None)
}

/// [`fan_in`], each edge into the join taken if `when` holds.
fn fan_in_when(width: usize, when: Option<&str>) -> Value {
    let mut steps = vec![json!({"id": "fan", "action": "noop"})];
    let mut edges = Vec::new();
    for i in 0..width {
        let id = format!("p{i}");
        steps.push(json!({"id": id, "action": "noop"}));
        edges.push(json!({"from": "fan", "to": id}));
        edges.push(match when {
            Some(when) => json!({"from": id, "to": "join", "when": when}),
            None => json!({"from": id, "to": "join"}),
        });
    }
    steps.push(json!({"id": "join", "action": "noop", "join": "all"}));
    json!({"steps": steps, "edges": edges, "output": "{}"})
}

#[test]
fn a_two_thousand_wide_fan_in_on_four_workers_joins_once_while_another_is_cancelled() {
    let stack = Stack::start("fan-in", &[]);
    let _workers: Vec<_> = (0..4)
        .map(|i| stack.start_worker(&format!("w{i}"), &["--concurrency", "16"]))
        .collect();
    let width = 2000;
    let blueprint = fan_in(width);
    let mut client = stack.pg();
    let finished = submit_plan(&mut client, &blueprint);
    let cancelled = submit_plan(&mut client, &blueprint);

    // Cancel the second while its parents complete on every worker.
    wait_until("parents of the second goal to complete", WAIT, || {
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.tasks WHERE goal_id = $1 AND status = 'succeeded'",
                &[&cancelled],
            )
            .unwrap()
            .get(0);
        (done >= 200).then_some(())
    });
    let was_cancelled: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&cancelled])
        .unwrap()
        .get(0);
    assert!(was_cancelled);

    let status = wait_for_goal(&stack, finished, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "join")["attempts"], 1);
    let status = wait_for_goal(&stack, cancelled, WAIT);
    assert_eq!(status["status"], "cancelled", "{status}");
    assert_eq!(task(&status, "join")["status"], "cancelled");
    assert_eq!(task(&status, "join")["attempts"], 0);
    let unfinished: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.tasks WHERE goal_id = $1 AND finished_at IS NULL",
            &[&cancelled],
        )
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0, "every task of the cancelled goal ended");

    // The join was queued once for the goal that finished, never for the other.
    let joins_queued: Vec<i64> = stream_events(&mut stack.redis())
        .iter()
        .filter(|event| event["event"] == "task.queued" && event["step"] == "join")
        .map(|event| event["goal_id"].as_i64().unwrap())
        .collect();
    assert_eq!(joins_queued, [finished]);
}

#[test]
fn a_wide_fan_in_reads_each_edge_a_few_times_not_once_per_sibling() {
    // Resolving a parent's edge into a join must find that one edge, and
    // ending the goal must look at each step's edges alone. Probed by the
    // join's side, each resolution read every edge into the join; joined
    // with every edge of the goal, each leaf check read them all: a fan-in
    // of width W read W² index entries (a 2 000-wide fan-out spent 5 ms a
    // batch under the goal's lock resolving edges).
    let stack = Stack::start("fan-in-reads", &[]);
    let mut worker = stack.start_worker("w", &["--concurrency", "32"]);
    let width = 400;
    let mut client = stack.pg();
    let goal = submit_plan(&mut client, &fan_in(width));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");

    let edge_count = 2 * width as i64;
    let reads =
        index_reads_once_stopped(&mut client, &mut worker, "synapse.edges", edge_count, "%");
    // Each edge is read when its parent's outcome is recorded, when it
    // resolves, when its target is decided and when the goal ends: about
    // four reads an edge (W² would be 400 an edge here).
    assert!(
        reads <= 8 * edge_count,
        "{reads} index entries of edges read for {edge_count} edges"
    );
}

#[test]
fn the_steps_of_a_goal_that_end_together_read_the_goal_once() {
    // What expressions see of a goal (its input may be large) was read
    // with every step end a batch recorded: a fan-in's batch of parents
    // returned it once per parent, parsed and copied it once per parent. It
    // is read once a goal and batch now, and each goal's ends share it: two
    // goals whose ends share batches still see each their own input.
    let stack = Stack::start("goal-once", &[]);
    let mut client = stack.pg();
    let width = 300;
    let blueprint = fan_in_when(width, Some("goal.input.go"));
    let go = submit_plan_with_input(&mut client, &blueprint, &json!({"go": true}));
    let stay = submit_plan_with_input(&mut client, &blueprint, &json!({"go": false}));
    let reads_before = goal_index_reads(&mut client);
    let mut worker = stack.start_worker("w", &["--concurrency", "32"]);
    // Polled on the joins' rows, not the goals': a look at a goal reads its index.
    wait_until("both joins to end", WAIT, || {
        let ended: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.tasks
                  WHERE goal_id = ANY($1) AND step = 'join' AND finished_at IS NOT NULL",
                &[&vec![go, stay]],
            )
            .unwrap()
            .get(0);
        (ended == 2).then_some(())
    });
    let reads =
        index_reads_once_stopped(&mut client, &mut worker, "synapse.goals", 2, "goals_pkey")
            - reads_before;
    let status = wait_for_goal(&stack, go, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "join")["status"], "succeeded", "{status}");
    let status = wait_for_goal(&stack, stay, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "join")["status"], "skipped", "{status}");
    // Read once a step end, it was more than the 2 × 302 steps that ended.
    let ends = 2 * (width as i64 + 2);
    assert!(
        reads < ends / 2,
        "{reads} entries of goals_pkey read for {ends} steps that ended"
    );
}

#[test]
fn a_batch_of_parents_whose_join_still_waits_does_not_look_for_its_goals_end() {
    // Each batch of a fan-in's parents looked for its goal's end (a probe of
    // the goal's unfinished tasks, a statement and a round trip under the
    // goal's lock) though the join it had just read still waited for the
    // other parents. Only the join's own end looks now: once for the goal.
    let stack = Stack::start("join-waits", &[]);
    let mut client = stack.pg();
    let width = 300;
    let goal = submit_plan(&mut client, &fan_in(width));
    let scans_before = unfinished_index_scans(&mut client);
    let mut worker = stack.start_worker("w", &["--concurrency", "16"]);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "join")["status"], "succeeded", "{status}");
    worker.signal("TERM");
    worker.wait(WAIT);
    // The parents' ends and the join's: every task of the goal updated
    // at least twice (claimed, recorded), once the sessions reported.
    let updates = 2 * (width as i64 + 2);
    index_reads_once_reported(&mut client, "synapse.tasks", updates, "tasks_pkey");
    let scans = unfinished_index_scans(&mut client) - scans_before;
    assert_eq!(scans, 1, "looks for the end of a goal of {width} parents");
}

#[test]
fn a_goal_of_one_step_ends_without_the_lock_a_goal_of_more_steps_takes_for_its_end() {
    // The end of a goal's only step is the only end that can end the goal:
    // its ending is read with the outcome, and the goal is not locked again
    // to look at its steps. A goal of two steps takes that lock for its end.
    let stack = Stack::start("one-step-ends", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let locks = |client: &mut postgres::Client| {
        statement_counts(client, "%ORDER BY id FOR NO KEY UPDATE%").0
    };
    let before = locks(&mut client);
    let leaf = run_plan(&stack, json!({"steps": [{"id": "only", "action": "noop"}]}));
    assert_eq!(leaf["status"], "succeeded", "{leaf}");
    assert_eq!(leaf["result"], json!({"only": {}}), "{leaf}");
    let output = run_plan(
        &stack,
        json!({"steps": [{"id": "only", "action": "noop"}], "output": "size(steps)"}),
    );
    assert_eq!(output["result"], json!(1), "{output}");
    let failed = run_plan(
        &stack,
        json!({"steps": [{"id": "only", "action": "fail", "params": {"message": "boom"}}]}),
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("step only failed: ") && error.contains("boom"),
        "{failed}"
    );
    assert_eq!(
        locks(&mut client),
        before,
        "goals of one step locked for their end"
    );
    let two = run_plan(&stack, noop_chain(2));
    assert_eq!(two["status"], "succeeded", "{two}");
    assert!(
        locks(&mut client) > before,
        "a goal of two steps ended unlocked"
    );
}

#[test]
fn a_join_seen_waiting_then_skipped_in_the_same_transaction_ends_its_goal() {
    // Recording `x` reads `join` still waiting (the edge from `b` pending),
    // then skips `b`, whose edge decides `join` (skipped: join all) in the
    // same transaction: the goal has nothing left and ends there.
    let stack = Stack::start("join-then-skip", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    let blueprint = json!({
        "steps": [{"id": "x", "action": "noop"}, {"id": "b", "action": "noop"},
                  {"id": "join", "action": "noop", "join": "all"}],
        "edges": [{"from": "x", "to": "join"}, {"from": "x", "to": "b", "when": "false"},
                  {"from": "b", "to": "join"}],
        "output": "{}"
    });
    let goal = submit_plan(&mut client, &blueprint);
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "b")["status"], "skipped", "{status}");
    assert_eq!(task(&status, "join")["status"], "skipped", "{status}");
}

/// Scans so far of the index of unfinished tasks (only the look for a
/// goal's end reads it).
fn unfinished_index_scans(client: &mut postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'tasks_unfinished'",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Entries read so far from the goals' primary key.
fn goal_index_reads(client: &mut postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'goals_pkey'",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_fan_outs_root_finds_each_successor_by_its_key_whatever_the_statistics_say() {
    // Recording the root of a W-wide fan-out reads its W successors. Joined
    // to its edges, on statistics taken while every step had one name, the
    // planner looked each successor up by goal alone and read every step of
    // the goal for each edge: W² index entries (a 2 000-wide fan-out's root
    // took 360 ms to record).
    let stack = Stack::start("fan-out-reads", &[]);
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.submit_plans('{\"steps\": [{\"id\": \"a\", \"action\": \"noop\"}]}',
                                         array_fill('{}'::jsonb, ARRAY[300]))",
            &[],
        )
        .unwrap();
    client
        .batch_execute("ANALYZE synapse.tasks, synapse.edges")
        .unwrap();
    let mut worker = stack.start_worker("w", &["--concurrency", "32"]);
    let width = 400;
    let goal = submit_plan(&mut client, &fan_in(width));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");

    // The one-step goals and the fan-out, each task claimed and recorded.
    let updates = 2 * (300 + width as i64 + 2);
    let reads = index_reads_once_stopped(
        &mut client,
        &mut worker,
        "synapse.tasks",
        updates,
        "tasks_step",
    );
    // Linear, not W² (160 000 here): since a step's default input is made
    // from its parents' rows (one more probe an edge), six runs read 6 656–
    // 8 532 entries, across the 8 000 this bound had been.
    assert!(
        reads < 40 * width as i64,
        "{reads} entries of tasks_step read to run a {width}-wide fan-out"
    );
}

#[test]
fn the_engine_finds_its_batches_by_id_whatever_the_statistics_say() {
    // After most goals are deleted and the tables vacuumed, the statistics
    // say a table of thousands of rows holds one. A claim or record that
    // joined its batch to the tasks (or the goals) was then planned with the
    // whole table as the outer side: every claim read every task. So did
    // the edges' resolution (every edge, for each edge resolved), a map
    // instance's count on its step, and a map's start (every goal).
    let stack = Stack::start("stale-statistics", &[]);
    let mut client = stack.pg();
    client
        .batch_execute(
            "ALTER TABLE synapse.tasks SET (autovacuum_enabled = off);
             ALTER TABLE synapse.goals SET (autovacuum_enabled = off);
             ALTER TABLE synapse.edges SET (autovacuum_enabled = off)",
        )
        .unwrap();
    let park = "SELECT synapse.submit_plans('{\"steps\": [{\"id\": \"a\", \"action\": \"noop\", \"queue\": \"parked\"},
                                                      {\"id\": \"b\", \"action\": \"noop\"}],
                                            \"edges\": [{\"from\": \"a\", \"to\": \"b\"}]}',
                                          array_fill('{}'::jsonb, ARRAY[3000]))";
    client.execute(park, &[]).unwrap();
    client
        .execute(
            "DELETE FROM synapse.goals WHERE id < (SELECT max(id) FROM synapse.goals)",
            &[],
        )
        .unwrap();
    // VACUUM runs alone: not inside a batch of statements.
    client
        .batch_execute("VACUUM synapse.goals, synapse.tasks, synapse.edges")
        .unwrap();
    client.execute(park, &[]).unwrap();
    for table in ["synapse.tasks", "synapse.edges"] {
        let (estimated, parked): (f32, i64) = {
            let row = client
                .query_one(
                    &format!(
                        "SELECT reltuples, (SELECT count(*) FROM {table})
                           FROM pg_class WHERE oid = '{table}'::regclass"
                    ),
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert!(
            estimated < 10.0 && parked >= 3000,
            "statistics of {table} not stale: {estimated} estimated, {parked} rows"
        );
    }

    // What this session read so far, reported now rather than within a second.
    client
        .execute("SELECT pg_stat_force_next_flush()", &[])
        .unwrap();
    let (tasks_updated, tasks_read) =
        index_reads_once_reported(&mut client, "synapse.tasks", 0, "tasks%");
    let (_, goals_read) = index_reads_once_reported(&mut client, "synapse.goals", 0, "goals%");
    let edges_read = rows_read(&mut client, "synapse.edges");

    let mut worker = stack.start_worker("w", &["--concurrency", "32"]);
    let width = 200;
    let fan = submit_plan(&mut client, &fan_in(width));
    let map = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "each", "action": "noop",
                            "for_each": format!("{:?}", (0..width).collect::<Vec<_>>())}]}),
    );
    // A map over nothing ends with no worker: the engine carries on after it.
    let empty_map = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "each", "action": "noop", "for_each": "[]"},
                          {"id": "after", "action": "noop"}],
                "edges": [{"from": "each", "to": "after"}]}),
    );
    // Watched by scans of the goals table, so that the test's own reads
    // count in no index: ordered by id, on these statistics, each look was
    // a walk of the whole primary key, and a slow run looked many times.
    let statuses: Vec<String> = wait_until("the goals to end", WAIT, || {
        let statuses: Vec<String> = client
            .query(
                "SELECT status::text FROM synapse.goals WHERE id + 0 = ANY($1) ORDER BY id + 0",
                &[&vec![fan, map, empty_map]],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        statuses
            .iter()
            .all(|status| matches!(status.as_str(), "succeeded" | "failed" | "cancelled"))
            .then_some(statuses)
    });
    assert_eq!(statuses, ["succeeded", "succeeded", "succeeded"]);
    worker.signal("TERM");
    worker.wait(WAIT);

    // Each task of the fan-in, each instance and the step after the empty
    // map claimed and recorded.
    let updates = tasks_updated + 2 * (width as i64 + 2) + 2 * width as i64 + 2;
    let (_, tasks_after) =
        index_reads_once_reported(&mut client, "synapse.tasks", updates, "tasks%");
    let (_, goals_after) = index_reads_once_reported(&mut client, "synapse.goals", 0, "goals%");
    let (tasks_read, goals_read) = (tasks_after - tasks_read, goals_after - goals_read);
    let edges_read = rows_read(&mut client, "synapse.edges") - edges_read;
    assert!(
        tasks_read < 50 * width as i64,
        "{tasks_read} entries of the tasks' indexes read to run a {width}-wide fan-in and maps beside 6 000 tasks"
    );
    assert!(
        goals_read < 5 * width as i64,
        "{goals_read} entries of the goals' indexes read to run a {width}-wide fan-in and maps"
    );
    assert!(
        edges_read < 20 * width as i64,
        "{edges_read} rows of the edges read to run a {width}-wide fan-in beside 3 000 edges"
    );
}

/// Rows of `table` read so far, by its indexes or by scans of the whole table.
fn rows_read(client: &mut postgres::Client, table: &str) -> i64 {
    client
        .query_one(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
               FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
            &[&table],
        )
        .unwrap()
        .get(0)
}

#[test]
fn ending_a_goal_looks_at_its_own_unfinished_tasks_not_at_those_of_older_goals() {
    // Whether a goal has a task left is one probe of the unfinished tasks'
    // index for that goal. Planned as a merge with the whole index, every
    // goal's end read the unfinished tasks of every goal before it.
    let stack = Stack::start("unfinished-reads", &[]);
    let mut client = stack.pg();
    let waiting_steps = 3000;
    let mut steps = vec![json!({"id": "gate", "action": "wait", "params": {"signal": "go"}})];
    let mut edges = Vec::new();
    for i in 0..waiting_steps {
        steps.push(json!({"id": format!("s{i}"), "action": "noop"}));
        edges.push(json!({"from": "gate", "to": format!("s{i}")}));
    }
    let older = submit_plan(&mut client, &json!({"steps": steps, "edges": edges}));
    // Statistics as a database in use has them.
    client.batch_execute("ANALYZE synapse.tasks").unwrap();
    let mut worker = stack.start_worker("w", &[]);
    let goals: Vec<i64> = (0..20)
        .map(|_| {
            submit_plan(
                &mut client,
                &json!({"steps": [{"id": "t", "action": "noop"}]}),
            )
        })
        .collect();
    for goal in goals {
        let status = wait_for_goal(&stack, goal, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
    }
    // Each goal's task is claimed and recorded; the gate began to wait.
    let reads = index_reads_once_stopped(
        &mut client,
        &mut worker,
        "synapse.tasks",
        2 * 20 + 1,
        "tasks_unfinished",
    );
    assert!(
        reads < waiting_steps,
        "{reads} entries of tasks_unfinished read to end 20 goals beside goal {older}"
    );
}

#[test]
fn a_successor_starts_in_the_transaction_that_recorded_its_parent_on_a_queue_the_worker_serves() {
    let stack = Stack::start("continuation", &[]);
    let serves_default = stack.start_worker("default", &["--queues", "default"]);
    let serves_other = stack.start_worker("other", &["--queues", "other"]);
    let mut client = stack.pg();
    keep_written_events(&mut client);

    // b is claimed by the transaction that recorded a.
    let chain = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "a", "action": "noop"}, {"id": "b", "action": "noop"},
                          {"id": "c", "action": "noop", "queue": "other"}],
                "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "c"}]}),
    );
    let status = wait_for_goal(&stack, chain, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert!(same_transaction(&mut client, "a", "b"), "{status}");
    assert_eq!(task(&status, "b")["attempts"], 1);
    // c is on a queue this worker does not serve: the other worker runs it.
    assert!(!same_transaction(&mut client, "b", "c"), "{status}");
    let recorded_c = |worker: &synapse_e2e::WorkerProcess| {
        worker
            .log_text()
            .lines()
            .any(|line| line.contains("task recorded") && line.contains("step=c"))
    };
    assert!(recorded_c(&serves_other), "{}", serves_other.log_text());
    assert!(!recorded_c(&serves_default));

    // b's task.queued event reached the stream, but no message went to the
    // queue for it (it would only cost a claim that finds nothing): a's and
    // c's are the only ones pushed.
    let mut redis = stack.redis();
    let queued: Vec<Value> = stream_events(&mut redis)
        .into_iter()
        .filter(|event| event["event"] == "task.queued" && event["goal_id"] == chain)
        .collect();
    assert_eq!(queued.len(), 3, "{queued:?}");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis)
        .unwrap();
    let pushes = info
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_lpush:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse::<i64>().ok());
    assert_eq!(pushes, Some(2), "{info}");
    let status = wait_for_goal(&stack, chain, WAIT);
    assert_eq!(task(&status, "b")["attempts"], 1);
}

#[test]
fn a_worker_waiting_on_redis_with_every_free_slot_still_claims_the_successors_it_queues() {
    // One slot: while a runs, the consumer waits for it; once a's outcome is
    // handed over, the consumer takes it back at once to wait on Redis. Its
    // successor must still start in the transaction that recorded a, in that
    // slot, not go through the forwarder, Redis and a claim of its own.
    let stack = Stack::start("continuation-lent", &[]);
    let _worker = stack.start_worker("w", &["--concurrency", "1"]);
    let mut client = stack.pg();
    keep_written_events(&mut client);
    let goal = submit_plan(&mut client, &noop_chain(4));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    for i in 1..4 {
        let (parent, step) = (format!("s{}", i - 1), format!("s{i}"));
        assert!(
            same_transaction(&mut client, &parent, &step),
            "{step}: {status}"
        );
    }
}

#[test]
fn a_chain_continued_locally_leaves_its_connections_outside_any_transaction() {
    let stack = Stack::start("continuation-commit", &[]);
    let worker = stack.start_worker("w", &["--concurrency", "4"]);
    let mut client = stack.pg();
    keep_written_events(&mut client);
    let status = run_plan(&stack, noop_chain(30));
    assert_eq!(status["status"], "succeeded", "{status}");
    for i in 1..30 {
        let (parent, step) = (format!("s{}", i - 1), format!("s{i}"));
        assert!(
            same_transaction(&mut client, &parent, &step),
            "{step}: {status}"
        );
    }
    // Each successor was queued and claimed with its parent's COMMIT: the
    // connection it went out on is left with no transaction open, and the
    // next transaction on it begins without a warning.
    wait_until(
        "the worker's connections to leave their transactions",
        WAIT,
        || {
            let open: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                        AND state LIKE 'idle in transaction%'",
                    &[],
                )
                .unwrap()
                .get(0);
            (open == 0).then_some(())
        },
    );
    let log = stack.postgres_log();
    for warning in [
        "there is no transaction in progress",
        "there is already a transaction in progress",
    ] {
        assert!(
            !log.contains(warning),
            "{warning}:\n{log}\n{}",
            worker.log_text()
        );
    }
}

#[test]
fn a_chain_s_steps_are_recorded_in_the_transaction_the_previous_step_s_commit_left_open() {
    // Each step's batch ends with COMMIT AND CHAIN; the next step's batch,
    // a moment later, runs in that chained transaction instead of starting
    // its own: no START TRANSACTION (a round trip) for each step.
    let stack = Stack::start("continuation-chained", &["log_statement = 'all'"]);
    let _worker = stack.start_worker("w", &["--concurrency", "4"]);
    let started = |stack: &Stack| {
        stack
            .postgres_log()
            .matches("START TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .count()
    };
    let before = started(&stack);
    let status = run_plan(&stack, noop_chain(40));
    assert_eq!(status["status"], "succeeded", "{status}");
    // Forty batches; a step whose batch came after the kept transaction was
    // rolled back (a machine busy for 10 ms) starts one of its own.
    let starts = started(&stack) - before;
    assert!(starts <= 20, "{starts} transactions started for 40 steps");
    let log = stack.postgres_log();
    assert!(
        !log.contains("there is no transaction in progress"),
        "{log}"
    );
}

#[test]
fn a_step_continued_locally_is_queued_and_claimed_in_one_write() {
    // The successor a step's completion decides to run, claimed for the
    // worker's free slot, is written once (pending → running), not queued by
    // one statement and claimed by the next; observers still see it queued,
    // then running, and nothing is dispatched for it.
    let stack = Stack::start("continuation-one-write", &[]);
    let _worker = stack.start_worker("w", &["--concurrency", "4"]);
    let mut client = stack.pg();
    keep_written_events(&mut client);
    let status = run_plan(&stack, noop_chain(10));
    assert_eq!(status["status"], "succeeded", "{status}");
    let one_write = |client: &mut postgres::Client, step: &str| -> bool {
        client
            .query_one(
                "SELECT queued_at = started_at FROM synapse.tasks WHERE step = $1",
                &[&step],
            )
            .unwrap()
            .get(0)
    };
    let events = |client: &mut postgres::Client, step: &str| -> Vec<(String, Option<String>)> {
        client
            .query(
                "SELECT event, dispatch FROM written WHERE step = $1 ORDER BY id",
                &[&step],
            )
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    };
    // The root is queued by submit_plan and claimed through Redis.
    assert!(!one_write(&mut client, "s0"));
    for i in 1..10 {
        let step = format!("s{i}");
        assert!(one_write(&mut client, &step), "{step}: {status}");
        assert_eq!(
            events(&mut client, &step),
            [
                ("task.queued".to_string(), None),
                ("task.running".to_string(), None),
                ("task.succeeded".to_string(), None),
            ],
            "{step}"
        );
    }
}

#[test]
fn an_edge_that_alone_decides_its_step_resolves_in_the_transaction_that_recorded_its_parent() {
    // b, c, skipped and after each have one inbound edge: the engine decides
    // them from the record of their parent, and their edges' resolutions may
    // go out with the transaction's last round trip. j has two.
    let stack = Stack::start("sole-edges", &[]);
    let _worker = stack.start_worker("w", &["--concurrency", "4"]);
    let mut client = stack.pg();
    keep_written_events(&mut client);
    let blueprint = json!({
        "steps": [
            {"id": "a", "action": "noop", "input": "{}"},
            {"id": "b", "action": "noop", "input": "{}"},
            {"id": "c", "action": "noop", "input": "{}"},
            {"id": "skipped", "action": "noop", "input": "{}"},
            {"id": "after", "action": "noop", "input": "{}"},
            {"id": "j", "action": "noop", "input": "{}"}
        ],
        "edges": [
            {"from": "a", "to": "b"},
            {"from": "b", "to": "c"},
            {"from": "c", "to": "skipped", "when": "false"},
            {"from": "skipped", "to": "after"},
            {"from": "b", "to": "j"},
            {"from": "c", "to": "j"}
        ]
    });
    let status = run_plan(&stack, blueprint);
    assert_eq!(status["status"], "succeeded", "{status}");
    for (step, expected) in [
        ("b", "succeeded"),
        ("c", "succeeded"),
        ("skipped", "skipped"),
        ("after", "skipped"),
        ("j", "succeeded"),
    ] {
        assert_eq!(task(&status, step)["status"], expected, "{step}: {status}");
    }
    for (from, to, state) in [
        ("a", "b", "taken"),
        ("b", "c", "taken"),
        ("c", "skipped", "not_taken"),
        ("skipped", "after", "not_taken"),
        ("b", "j", "taken"),
        ("c", "j", "taken"),
    ] {
        assert_eq!(
            edge_state(&status, from, to),
            state,
            "{from} -> {to}: {status}"
        );
    }
    // Each edge out of a step that ended was resolved by the transaction
    // that recorded that step, and so was what it decided.
    let resolved_with_their_parent: Vec<(String, String, bool)> = client
        .query(
            "SELECT e.from_step, e.to_step, e.xmin::text = p.xid::xid::text
               FROM synapse.edges e
               JOIN synapse.tasks t ON t.goal_id = e.goal_id AND t.step = e.from_step
               JOIN written p ON p.step = e.from_step AND p.event = 'task.' || t.status
              WHERE e.goal_id = (SELECT max(id) FROM synapse.goals)
              ORDER BY e.position",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        resolved_with_their_parent.len(),
        6,
        "{resolved_with_their_parent:?}"
    );
    for (from, to, same) in &resolved_with_their_parent {
        assert!(same, "{from} -> {to}: {resolved_with_their_parent:?}");
    }
    for (parent, step) in [("a", "b"), ("b", "c")] {
        assert!(
            same_transaction(&mut client, parent, step),
            "{step}: {status}"
        );
    }
}

#[test]
fn a_message_popped_after_local_continuation_took_the_lent_slot_goes_back_and_runs() {
    // One slot: b takes it from the consumer's wait on Redis (local
    // continuation). x's message then arrives with no slot left: it goes
    // back to its list and runs once b is done. No sweep would send it again
    // within the test, so a message dropped here fails it.
    let stack = Stack::start("continuation-hand-back", &["synapse.sweep_interval = '1h'"]);
    let _worker = stack.start_worker("w", &["--concurrency", "1"]);
    let mut client = stack.pg();
    keep_written_events(&mut client);
    let steps = vec![
        json!({"id": "a", "action": "noop"}),
        json!({"id": "b", "action": "sleep", "params": {"ms": 1500}}),
    ];
    let goal = submit_plan(&mut client, &chain_of(steps));
    wait_for_step(&mut client, goal, "b", "running");
    let other = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "x", "action": "noop"}]}),
    );
    let status = wait_for_goal(&stack, other, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "x")["attempts"], 1, "{status}");
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert!(same_transaction(&mut client, "a", "b"), "{status}");
}

#[test]
fn a_successor_claimed_in_its_parent_s_transaction_sees_what_that_transaction_cancelled() {
    let stack = Stack::start("continuation-view", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    keep_written_events(&mut client);
    // When fast ends, one round of the engine queues winner and cancels
    // slow, its other parent. winner is claimed by that transaction (local
    // continuation), and what it reads of slow must be what the transaction
    // leaves: cancelled, not still queued. (slow is on a queue no worker
    // serves: its message wakes no one, so the slots stay free.)
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "start", "action": "noop"},
                          {"id": "fast", "action": "noop"},
                          {"id": "slow", "action": "noop", "queue": "elsewhere"},
                          {"id": "winner", "action": "transform", "params": {"expr": "steps.slow.status"},
                           "join": "first", "cancel_others": true}],
                "edges": [{"from": "start", "to": "fast"}, {"from": "start", "to": "slow"},
                          {"from": "fast", "to": "winner"}, {"from": "slow", "to": "winner"}]}),
    );
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "slow")["status"], "cancelled", "{status}");
    assert_eq!(task(&status, "winner")["result"], "cancelled", "{status}");
    assert!(same_transaction(&mut client, "fast", "winner"), "{status}");
}

/// Keeps a copy of each event with the transaction that wrote it: the
/// outbox's rows are gone once forwarded.
fn keep_written_events(client: &mut postgres::Client) {
    client
        .batch_execute(
            "CREATE TABLE written (id bigserial, event text, step text, xid xid8, dispatch text);
             CREATE FUNCTION keep_written() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
                 INSERT INTO public.written (event, step, xid, dispatch)
                 SELECT NEW.event, (NEW.payload::jsonb)->>'step', pg_current_xact_id(), NEW.dispatch;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER keep_written AFTER INSERT ON synapse.outbox
                 FOR EACH ROW EXECUTE FUNCTION keep_written();",
        )
        .unwrap();
}

/// Whether `started` began running in the transaction that recorded `ended`
/// (see [`keep_written_events`]).
fn same_transaction(client: &mut postgres::Client, ended: &str, started: &str) -> bool {
    client
        .query_one(
            "SELECT e.xid = s.xid FROM written e, written s
              WHERE e.event = 'task.succeeded' AND e.step = $1
                AND s.event = 'task.running' AND s.step = $2",
            &[&ended, &started],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_heartbeat_finds_its_task_by_id_not_among_every_running_task() {
    let stack = Stack::start("heartbeat-reads", &[]);
    let mut worker = stack.start_worker("w", &["--concurrency", "64", "--lease", "1s"]);
    let mut client = stack.pg();
    // 64 steps running at once for 2 s: about six heartbeats each.
    let steps: Vec<Value> = (0..64)
        .map(|i| json!({"id": format!("s{i}"), "action": "sleep", "params": {"ms": 2000}}))
        .collect();
    let goal = submit_plan(&mut client, &json!({ "steps": steps }));
    let status = wait_for_goal(&stack, goal, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let (heartbeats, _) = statement_counts(&mut client, "%SET lease_expires_at%");
    assert!(heartbeats >= 64, "{heartbeats} heartbeats");
    let reads = index_reads_once_stopped(
        &mut client,
        &mut worker,
        "synapse.tasks",
        heartbeats,
        "tasks_lease_due",
    );
    // Each heartbeat probes the primary key for its task: the partial index
    // of running tasks is not walked (64 entries a heartbeat).
    assert!(
        reads < heartbeats,
        "{heartbeats} heartbeats read {reads} entries of tasks_lease_due"
    );
}

#[test]
fn a_wide_join_is_decided_from_its_counts_and_reads_its_edges_only_for_its_input() {
    // A join of W parents, all of them ended: the engine's look at it reads
    // the counts kept on its row, and its W edges only when its default
    // input needs the parents' results (it read all W to decide).
    let stack = Stack::start("join-counts", &[]);
    let mut client = stack.pg();
    let width = 400;
    let mut with_own_input = fan_in(width);
    let steps = with_own_input["steps"].as_array_mut().unwrap();
    steps.last_mut().unwrap()["input"] = json!("{}");
    let goals = [
        (submit_plan(&mut client, &with_own_input), 0),
        (submit_plan(&mut client, &fan_in(width)), width as i64),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = synapse_worker::worker::pool(&stack.database_url(), 1).expect("a pool");
    for (goal, expected_reads) in goals {
        // As if every parent had ended and its edge into the join resolved.
        client
            .execute(
                "WITH taken AS (
                     UPDATE synapse.edges SET state = 'taken', resolved_at = now()
                      WHERE goal_id = $1 AND to_step = 'join' RETURNING 1)
                 UPDATE synapse.tasks SET pending_inbound = 0, taken_inbound = (SELECT count(*) FROM taken)
                  WHERE goal_id = $1 AND step = 'join'",
                &[&goal],
            )
            .unwrap();
        let (ready, reads) = rt.block_on(async {
            let mut session = pool.get().await.unwrap();
            let tx = synapse_worker::store::begin(&mut session).await.unwrap();
            let ready = synapse_worker::store::pending_steps(&tx, &[(goal, "join".to_owned())])
                .await
                .unwrap();
            let reads: i64 = tx
                .query_one(
                    "SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0)
                       FROM pg_stat_xact_user_tables WHERE relid = 'synapse.edges'::regclass",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (ready, reads)
        });
        assert_eq!(ready.len(), 1);
        let join = &ready[0];
        assert_eq!(
            (join.inbound.total, join.inbound.pending, join.inbound.taken),
            (width as u32, 0, width as u32)
        );
        assert_eq!(join.parent_results.results.len() as i64, expected_reads);
        assert_eq!(
            reads, expected_reads,
            "edges read to decide the join of goal {goal}"
        );
    }
}

/// Stops `worker` and returns the index entries its sessions read in the
/// indexes of `table` named like `indexes`: a session reports its reads when
/// it ends, so this waits until `table` counts `updates` updated rows.
fn index_reads_once_stopped(
    client: &mut postgres::Client,
    worker: &mut synapse_e2e::WorkerProcess,
    table: &str,
    updates: i64,
    indexes: &str,
) -> i64 {
    worker.signal("TERM");
    worker.wait(WAIT);
    index_reads_once_reported(client, table, updates, indexes).1
}

/// Once `table` shows `updates` row updates in the statistics: (its row
/// updates, the entries read from its indexes named like `indexes`).
fn index_reads_once_reported(
    client: &mut postgres::Client,
    table: &str,
    updates: i64,
    indexes: &str,
) -> (i64, i64) {
    wait_until("the sessions to report", WAIT, || {
        let row = client
            .query_one(
                "SELECT (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = $1::text::regclass),
                        (SELECT coalesce(sum(idx_tup_read), 0)::bigint FROM pg_stat_user_indexes
                          WHERE relid = $1::text::regclass AND indexrelname LIKE $2)",
                &[&table, &indexes],
            )
            .unwrap();
        let updated: i64 = row.get(0);
        (updated >= updates).then(|| (updated, row.get(1)))
    })
}

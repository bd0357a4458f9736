//! Safe to share (SPEC §7), as NOSUPERUSER roles on the real stack: nothing
//! is granted to PUBLIC; submitters see and act on only the goals of roles
//! they are members of; only the extension's own code writes the tables; a
//! worker that is not a superuser runs goals end to end.
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{postgres, submit_plan, task, wait_for_goal, wait_for_step, wait_until, Stack};

const WAIT: Duration = Duration::from_secs(60);

/// Creates login roles that are not superusers, and gives each its capability.
fn roles(admin: &mut postgres::Client, grants: &[(&str, Option<&str>)]) {
    for (role, capability) in grants {
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
            ))
            .unwrap();
        if let Some(capability) = capability {
            admin
                .execute(
                    &format!("SELECT synapse.grant_{capability}($1::text::regrole)"),
                    &[role],
                )
                .unwrap();
        }
    }
}

/// The SQLSTATE `sql` fails with (it must fail).
fn sqlstate(client: &mut postgres::Client, sql: &str) -> String {
    match client.batch_execute(sql) {
        Ok(()) => panic!("{sql} was accepted"),
        Err(error) => error
            .as_db_error()
            .map(|db| format!("{}: {}", db.code().code(), db.message()))
            .unwrap_or_else(|| panic!("{sql}: {error}")),
    }
}

fn one_i64(client: &mut postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get(0)
}

const WAITING: &str = r#"{"steps":[{"id":"hold","action":"wait","params":{"signal":"go"}},
                                   {"id":"after","action":"noop"}],
                          "edges":[{"from":"hold","to":"after"}]}"#;

#[test]
fn a_role_with_no_grant_can_do_nothing() {
    let stack = Stack::start("roles-none", &[]);
    let mut admin = stack.pg();
    roles(&mut admin, &[("nobody", None)]);
    let goal = submit_plan(&mut admin, WAITING);
    let mut nobody = stack.pg_as("nobody");
    for sql in [
        "SELECT synapse.submit_goal('x')".to_owned(),
        "SELECT synapse.submit_plan('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}')".to_owned(),
        "SELECT synapse.submit_plans('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}', ARRAY['{}'::jsonb])"
            .to_owned(),
        format!("SELECT synapse.goal_status({goal})"),
        format!("SELECT synapse.signal({goal}, 'go')"),
        format!("SELECT synapse.cancel_goal({goal})"),
        "SELECT * FROM synapse.goals".to_owned(),
        "SELECT synapse.forwarder_status()".to_owned(),
    ] {
        let refused = sqlstate(&mut nobody, &sql);
        assert!(refused.starts_with("42501"), "{sql}: {refused}");
    }
    // Not even with USAGE on the schema: no function is PUBLIC's.
    admin
        .batch_execute("GRANT USAGE ON SCHEMA synapse TO nobody")
        .unwrap();
    for sql in [
        "SELECT synapse.submit_goal('x')",
        "SELECT synapse._emit(NULL)",
        "SELECT synapse._wake_forwarder()",
        "SELECT synapse._run_timers(0)",
        "SELECT synapse.grant_admin('nobody')",
        "SELECT * FROM synapse.outbox",
    ] {
        let refused = sqlstate(&mut nobody, sql);
        assert!(refused.starts_with("42501"), "{sql}: {refused}");
    }
    let public: i64 = one_i64(
        &mut admin,
        "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
          WHERE p.pronamespace = 'synapse'::regnamespace AND a.grantee = 0",
    );
    assert_eq!(public, 0, "functions executable by PUBLIC");
}

#[test]
fn two_submitters_cannot_see_or_touch_each_others_goals() {
    let stack = Stack::start("roles-submitters", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[("alice", Some("submitter")), ("bob", Some("submitter"))],
    );
    let mut alice = stack.pg_as("alice");
    let mut bob = stack.pg_as("bob");
    let submit = |client: &mut postgres::Client, key: &str| -> i64 {
        client
            .query_one(
                "SELECT synapse.submit_plan($1::text::jsonb, '{}', $2)",
                &[&WAITING, &key],
            )
            .unwrap()
            .get(0)
    };
    let alices = submit(&mut alice, "order-1");
    // Idempotency keys are per owner: the same key is another goal for bob,
    // and the same goal again for alice.
    let bobs = submit(&mut bob, "order-1");
    assert_ne!(alices, bobs);
    assert_eq!(submit(&mut alice, "order-1"), alices);
    let goal_key: i64 = alice
        .query_one(
            "SELECT synapse.submit_goal('triage 1', '{}', 'template', 'order-1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(goal_key, alices, "one key, one goal per owner");

    // Bob sees only his own goal, in every table, and nothing of alice's
    // through the API: her goal "does not exist" for him.
    for (table, goal_column) in [("goals", "id"), ("tasks", "goal_id"), ("edges", "goal_id")] {
        let (all, his) = (
            one_i64(&mut bob, &format!("SELECT count(*) FROM synapse.{table}")),
            one_i64(
                &mut bob,
                &format!("SELECT count(*) FROM synapse.{table} WHERE {goal_column} = {bobs}"),
            ),
        );
        assert!(
            his > 0 && all == his,
            "bob sees {all} rows of {table}, {his} of them his"
        );
    }
    for sql in [
        format!("SELECT synapse.goal_status({alices})"),
        format!("SELECT synapse.goal_graph({alices})"),
        format!("SELECT synapse.signal({alices}, 'go')"),
        format!("SELECT synapse.cancel_goal({alices})"),
        format!("SELECT synapse.retry_goal({alices})"),
    ] {
        let refused = sqlstate(&mut bob, &sql);
        assert_eq!(
            refused,
            format!("P0002: goal {alices} does not exist"),
            "{sql}"
        );
    }
    // None of that touched alice's goal: it still waits, and takes her signal.
    assert_eq!(
        one_i64(&mut admin, "SELECT count(*) FROM synapse.signals"),
        0
    );
    let taken: bool = alice
        .query_one("SELECT synapse.signal($1, 'go')", &[&alices])
        .unwrap()
        .get(0);
    assert!(taken);
    let status: Value = serde_json::from_str(
        &alice
            .query_one("SELECT synapse.goal_status($1)::text", &[&alices])
            .unwrap()
            .get::<_, String>(0),
    )
    .unwrap();
    assert_eq!(status["owner"], "alice");
    assert_eq!(task(&status, "hold")["status"], "succeeded", "{status}");
    // Bob cancels his own.
    let cancelled: bool = bob
        .query_one("SELECT synapse.cancel_goal($1)", &[&bobs])
        .unwrap()
        .get(0);
    assert!(cancelled);
    // In bulk too: bob's known key is his goal, a new one a new goal of his,
    // and alice's is hers.
    let bulk: Vec<i64> = bob
        .query_one(
            "SELECT synapse.submit_plans($1::text::jsonb, ARRAY['{}', '{}']::jsonb[], ARRAY['order-1', 'order-2'])",
            &[&WAITING],
        )
        .unwrap()
        .get(0);
    assert_eq!(bulk[0], bobs);
    assert!(bulk[1] != alices && bulk[1] != bobs);
    let alice_bulk: Vec<i64> = alice
        .query_one(
            "SELECT synapse.submit_plans($1::text::jsonb, ARRAY['{}']::jsonb[], ARRAY['order-1'])",
            &[&WAITING],
        )
        .unwrap()
        .get(0);
    assert_eq!(alice_bulk, [alices]);
}

#[test]
fn members_of_an_owner_role_share_its_goals() {
    let stack = Stack::start("roles-team", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[
            ("payments", Some("submitter")),
            ("alice", None),
            ("carol", None),
            ("dave", Some("submitter")),
        ],
    );
    admin
        .batch_execute("GRANT payments TO alice, carol")
        .unwrap();
    let mut alice = stack.pg_as("alice");
    alice.batch_execute("SET ROLE payments").unwrap();
    let goal: i64 = alice
        .query_one("SELECT synapse.submit_plan($1::text::jsonb)", &[&WAITING])
        .unwrap()
        .get(0);
    let mut carol = stack.pg_as("carol");
    let owner: String = carol
        .query_one(
            "SELECT owner::text FROM synapse.goals WHERE id = $1",
            &[&goal],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, "payments");
    let taken: bool = carol
        .query_one("SELECT synapse.signal($1, 'go')", &[&goal])
        .unwrap()
        .get(0);
    assert!(taken, "a member of the owner acts on its goals");
    let mut dave = stack.pg_as("dave");
    assert_eq!(
        one_i64(&mut dave, "SELECT count(*) FROM synapse.goals"),
        0,
        "a submitter outside the team sees none of its goals"
    );
}

#[test]
fn only_the_extension_writes_the_tables() {
    let stack = Stack::start("roles-writes", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[
            ("alice", Some("submitter")),
            ("wk", Some("worker")),
            ("boss", Some("admin")),
        ],
    );
    let goal = submit_plan(&mut admin, WAITING);
    let hold = synapse_e2e::task_id(&mut admin, goal, "hold");
    wait_for_step(&mut admin, goal, "hold", "waiting");
    for role in ["alice", "wk", "boss"] {
        let mut client = stack.pg_as(role);
        for sql in [
            "INSERT INTO synapse.outbox (event, goal_id, dispatch, payload) VALUES ('x', 1, 'queue:default', '{}')"
                .to_owned(),
            format!("INSERT INTO synapse.tasks (goal_id, step, action, status) VALUES ({goal}, 'x', 'sql', 'queued')"),
            "INSERT INTO synapse.goals (goal, status) VALUES ('x', 'submitted')".to_owned(),
            "COPY synapse.tasks (goal_id, step, action, status) FROM stdin".to_owned(),
            format!("DELETE FROM synapse.tasks WHERE goal_id = {goal}"),
            "UPDATE synapse.templates SET priority = 1".to_owned(),
            format!("UPDATE synapse.goals SET owner = '{role}' WHERE id = {goal}"),
            "SELECT synapse._emit(NULL)".to_owned(),
            format!("SELECT synapse._take_signal({hold}, 1)"),
            "SELECT synapse._submit_goal('x', '{}', 'template', NULL, 'alice')".to_owned(),
            "SELECT synapse._apply_grants('alice')".to_owned(),
            "SELECT synapse._run_timers(0)".to_owned(),
        ] {
            let refused = sqlstate(&mut client, &sql);
            assert!(refused.starts_with("42501"), "{role}: {sql}: {refused}");
        }
    }
    // The worker changes tasks only along the state machine.
    let mut worker = stack.pg_as("wk");
    let skipped = sqlstate(
        &mut worker,
        &format!("UPDATE synapse.tasks SET status = 'succeeded' WHERE goal_id = {goal} AND step = 'after'"),
    );
    assert!(skipped.starts_with("55000"), "{skipped}");
    // A submitter never writes a table at all, even its own goal's rows.
    let mut alice = stack.pg_as("alice");
    let own = sqlstate(&mut alice, "UPDATE synapse.goals SET status = 'cancelled'");
    assert!(own.starts_with("42501"), "{own}");
}

#[test]
fn a_worker_that_is_not_a_superuser_runs_goals_of_every_owner() {
    let stack = Stack::start("roles-worker", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[
            ("alice", Some("submitter")),
            ("wk", Some("worker")),
            ("boss", Some("admin")),
        ],
    );
    let url = stack.database_url_as("wk");
    let _worker = stack.start_worker("wk", &["--database-url", &url]);
    let mut boss = stack.pg_as("boss");
    boss.execute(
        "SELECT synapse.add_template('twice', 'twice (?<n>\\d+)', $1::text::jsonb)",
        &[&json!({"steps": [{"id": "double", "action": "transform",
                             "params": {"expr": "int(goal.params.n) * 2"}}]})
        .to_string()],
    )
    .unwrap();
    let mut alice = stack.pg_as("alice");
    // Planning, a map, a child goal and a wait, all for alice, by a worker
    // that is not a superuser.
    let planned: i64 = alice
        .query_one("SELECT synapse.submit_goal('twice 21')", &[])
        .unwrap()
        .get(0);
    let grown: i64 = alice
        .query_one(
            "SELECT synapse.submit_plan($1::text::jsonb)",
            &[&json!({"steps": [
                {"id": "each", "action": "transform", "for_each": "[1, 2, 3]", "params": {"expr": "input * 10"}},
                {"id": "child", "action": "goal", "params": {"goal": "'twice ' + string(steps.each.result[2])"}},
                {"id": "hold", "action": "wait", "params": {"signal": "go"}}
            ], "edges": [{"from": "each", "to": "child"}, {"from": "child", "to": "hold"}]})
            .to_string()],
        )
        .unwrap()
        .get(0);
    let status = wait_for_goal(&stack, planned, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(task(&status, "double")["result"], json!(42));
    wait_until("the wait to wait", WAIT, || {
        let waiting: i64 = alice
            .query_one(
                "SELECT count(*) FROM synapse.tasks WHERE goal_id = $1 AND step = 'hold' AND status = 'waiting'",
                &[&grown],
            )
            .unwrap()
            .get(0);
        (waiting == 1).then_some(())
    });
    let taken: bool = alice
        .query_one("SELECT synapse.signal($1, 'go')", &[&grown])
        .unwrap()
        .get(0);
    assert!(taken);
    let status = wait_for_goal(&stack, grown, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    let child = task(&status, "child")["child_goal_id"].as_i64().unwrap();
    let owner: String = alice
        .query_one(
            "SELECT owner::text FROM synapse.goals WHERE id = $1",
            &[&child],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, "alice", "a child goal belongs to its parent's owner");
    // An admin reads the forwarder's state (a submitter does not).
    let running: bool = boss
        .query_one(
            "SELECT (synapse.forwarder_status() ->> 'running')::boolean",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(running);
    let refused = sqlstate(&mut alice, "SELECT synapse.forwarder_status()");
    assert!(refused.starts_with("42501"), "{refused}");
    // The admin's schedule submits goals the admin owns.
    boss.execute(
        "SELECT synapse.schedule('tick', '* * * * * *', 'twice 1')",
        &[],
    )
    .unwrap();
    let scheduled = wait_until("a scheduled goal", WAIT, || {
        boss.query_opt(
            "SELECT last_goal_id FROM synapse.schedules WHERE name = 'tick' AND last_goal_id IS NOT NULL",
            &[],
        )
        .unwrap()
        .map(|row| row.get::<_, i64>(0))
    });
    boss.execute("SELECT synapse.unschedule('tick')", &[])
        .unwrap();
    let status = wait_for_goal(&stack, scheduled, WAIT);
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["owner"], "boss");
    // Alice does not see the admin's goal; the admin sees hers.
    assert_eq!(
        one_i64(
            &mut alice,
            &format!("SELECT count(*) FROM synapse.goals WHERE id = {scheduled}")
        ),
        0
    );
    assert_eq!(
        one_i64(
            &mut boss,
            &format!("SELECT count(*) FROM synapse.goals WHERE id = {grown}")
        ),
        1
    );
}

#[test]
fn revoking_a_capability_takes_its_rights_away() {
    let stack = Stack::start("roles-revoke", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[("alice", Some("submitter")), ("boss", Some("admin"))],
    );
    let mut boss = stack.pg_as("boss");
    // An admin grants and revokes (as the extension's owner does).
    boss.execute("SELECT synapse.revoke_submitter('alice')", &[])
        .unwrap();
    let mut alice = stack.pg_as("alice");
    let refused = sqlstate(&mut alice, "SELECT synapse.submit_goal('x')");
    assert!(refused.starts_with("42501"), "{refused}");
    boss.execute("SELECT synapse.grant_submitter('alice')", &[])
        .unwrap();
    let mut alice = stack.pg_as("alice");
    alice
        .execute("SELECT synapse.submit_goal('x')", &[])
        .unwrap();
    let recorded = one_i64(
        &mut admin,
        "SELECT count(*) FROM synapse.role_grants WHERE role = 'alice'::regrole AND capability = 'submitter'",
    );
    assert_eq!(recorded, 1);
}

/// The Redis users of the README's least-privilege recipe: each may run only
/// the commands its side sends, on the keys under the prefix.
const REDIS_USERS: [&str; 2] = [
    "synapse-forwarder on >fwd-secret ~synapse:* resetchannels -@all +lpush +xadd +llen +ping +hello +auth +select",
    "synapse-worker on >wk-secret ~synapse:* resetchannels -@all +blmpop +rpush +ping +hello +auth +select +client|id +client|unblock",
];

#[test]
fn redis_users_with_only_the_commands_they_need_carry_the_work() {
    let mut stack = Stack::start("roles-redis", &[]);
    let mut redis = stack.redis();
    for user in REDIS_USERS {
        let mut command = synapse_e2e::redis::cmd("ACL");
        command.arg("SETUSER");
        for rule in user.split(' ') {
            command.arg(rule);
        }
        let _: () = command.query(&mut redis).unwrap();
    }
    // Each password in a file, as the README's recipe has it.
    let forwarder_password = stack.path("forwarder-password");
    std::fs::write(&forwarder_password, "fwd-secret\n").unwrap();
    let forwarder_url = format!(
        "synapse.redis_url = 'redis://synapse-forwarder@127.0.0.1:{}/0'",
        stack.redis_port
    );
    let forwarder_password_setting = format!(
        "synapse.redis_password_file = '{}'",
        forwarder_password.display()
    );
    stack.restart_postgres_with(&[
        "synapse.sweep_interval = '1s'",
        &forwarder_url,
        &forwarder_password_setting,
    ]);
    let worker_password = stack.path("worker-password");
    std::fs::write(&worker_password, "wk-secret\n").unwrap();
    let worker_url = format!("redis://synapse-worker@127.0.0.1:{}/0", stack.redis_port);
    let _worker = stack.start_worker(
        "w",
        &[
            "--redis-url",
            &worker_url,
            "--redis-password-file",
            &worker_password.display().to_string(),
        ],
    );
    let mut admin = stack.pg();
    let goal = submit_plan(
        &mut admin,
        &json!({"steps": [{"id": "a", "action": "noop"}]}),
    );
    assert_eq!(wait_for_goal(&stack, goal, WAIT)["status"], "succeeded");
    // Work for a queue nobody serves, whose message Redis lost: the sweep
    // (LLEN, then LPUSH) dispatches it again.
    submit_plan(
        &mut admin,
        &json!({"steps": [{"id": "a", "action": "noop", "queue": "elsewhere"}]}),
    );
    let list = "synapse:queue:elsewhere";
    wait_until("the dispatch", WAIT, || {
        let length: i64 = synapse_e2e::redis::cmd("LLEN")
            .arg(list)
            .query(&mut redis)
            .unwrap();
        (length == 1).then_some(())
    });
    let _: i64 = synapse_e2e::redis::cmd("DEL")
        .arg(list)
        .query(&mut redis)
        .unwrap();
    wait_until("the sweep to dispatch it again", WAIT, || {
        let length: i64 = synapse_e2e::redis::cmd("LLEN")
            .arg(list)
            .query(&mut redis)
            .unwrap();
        (length == 1).then_some(())
    });
    let refused: Vec<synapse_e2e::redis::Value> = synapse_e2e::redis::cmd("ACL")
        .arg("LOG")
        .query(&mut redis)
        .unwrap();
    assert!(refused.is_empty(), "Redis refused commands: {refused:?}");
}

#[test]
fn a_schema_on_the_databases_path_captures_neither_the_forwarder_nor_the_workers() {
    let mut stack = Stack::start("roles-search-path", &[]);
    let mut admin = stack.pg();
    roles(&mut admin, &[("mallory", Some("submitter"))]);
    // Mallory's functions shadow the catalog's, first on the database's path
    // (as a database owner who is not a superuser could set it): whoever
    // calls one leaves its name behind.
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA evil AUTHORIZATION mallory;
             CREATE TABLE evil.captured (by_role name, backend text);
             ALTER TABLE evil.captured OWNER TO mallory;
             GRANT INSERT ON evil.captured TO PUBLIC;
             GRANT USAGE ON SCHEMA evil TO PUBLIC;
             CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
                 INSERT INTO evil.captured
                 SELECT current_user, backend_type FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid();
                 SELECT pg_catalog.clock_timestamp() $$;
             CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
                 INSERT INTO evil.captured
                 SELECT current_user, backend_type FROM pg_catalog.pg_stat_activity WHERE pid = pg_catalog.pg_backend_pid();
                 SELECT pg_catalog.now() $$;
             ALTER FUNCTION evil.clock_timestamp() OWNER TO mallory;
             ALTER FUNCTION evil.now() OWNER TO mallory;
             ALTER DATABASE {} SET search_path = evil, pg_catalog, public;",
            synapse_e2e::DATABASE
        ))
        .unwrap();
    drop(admin);
    // Every session, the forwarder's included, takes the database's settings when it starts.
    stack.restart_postgres_with(&[]);
    let _worker = stack.start_worker("w", &[]);
    let mut mallory = stack.pg_as("mallory");
    // Events to forward, a timer to run, steps to claim, record and plan, and
    // a `sql` step (run as mallory, with the database's path) to record.
    let goal = submit_plan(
        &mut mallory,
        r#"{"steps":[{"id":"nap","action":"wait","params":{"for":"1s"}},
                     {"id":"after","action":"noop"},
                     {"id":"ask","action":"sql","params":{"query":"SELECT now() AS at"}}],
            "edges":[{"from":"nap","to":"after"},{"from":"after","to":"ask"}]}"#,
    );
    wait_until("the goal to succeed", WAIT, || {
        let status: String = mallory
            .query_one("SELECT status FROM synapse.goals WHERE id = $1", &[&goal])
            .unwrap()
            .get(0);
        (status == "succeeded").then_some(())
    });
    let captured: Vec<(String, String)> = mallory
        .query(
            "SELECT by_role::text, backend FROM evil.captured WHERE by_role <> 'mallory'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(captured, Vec::<(String, String)>::new());
}

#[test]
fn a_task_message_pushed_onto_another_queues_list_runs_nothing() {
    let stack = Stack::start("roles-queue", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut admin = stack.pg();
    let elsewhere = submit_plan(
        &mut admin,
        &json!({"steps": [{"id": "a", "action": "noop", "queue": "elsewhere"}]}),
    );
    let task_id: i64 = admin
        .query_one(
            "SELECT id FROM synapse.tasks WHERE goal_id = $1",
            &[&elsewhere],
        )
        .unwrap()
        .get(0);
    // Whoever may write to Redis pushes it onto the list of the queue the worker serves.
    let mut redis = stack.redis();
    let _: i64 = synapse_e2e::redis::cmd("LPUSH")
        .arg("synapse:queue:default")
        .arg(format!(
            r#"{{"v":1,"event":"task.queued","task_id":{task_id}}}"#
        ))
        .query(&mut redis)
        .unwrap();
    // Work of the default queue, dispatched after it: once it ran, the forged message was taken.
    let goal = submit_plan(
        &mut admin,
        &json!({"steps": [{"id": "a", "action": "noop"}]}),
    );
    assert_eq!(wait_for_goal(&stack, goal, WAIT)["status"], "succeeded");
    let left: i64 = synapse_e2e::redis::cmd("LLEN")
        .arg("synapse:queue:default")
        .query(&mut redis)
        .unwrap();
    assert_eq!(left, 0);
    let (status, attempts): (String, i32) = admin
        .query_one(
            "SELECT status, attempts FROM synapse.tasks WHERE id = $1",
            &[&task_id],
        )
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!((status.as_str(), attempts), ("queued", 0));
}

#[test]
fn row_security_calls_no_function_of_its_own_in_a_workers_statements() {
    let stack = Stack::start("roles-row-security", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[("alice", Some("submitter")), ("boss", Some("admin"))],
    );
    // A function in a policy runs in every statement that reads the table:
    // a SQL function is parsed and planned again each time. The policies
    // write their tests out, so the planner runs the role test once.
    let functions_in_policies = one_i64(
        &mut admin,
        "SELECT count(*) FROM pg_depend AS d JOIN pg_policy AS p ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
          WHERE d.refclassid = 'pg_proc'::regclass AND p.polrelid::regclass::text LIKE 'synapse.%'",
    );
    assert_eq!(functions_in_policies, 0);
    // Who sees what is unchanged: everything for admins and workers, only
    // the goals of her roles for a submitter.
    submit_plan(&mut admin, WAITING);
    let mut alice = stack.pg_as("alice");
    submit_plan(&mut alice, WAITING);
    for role in [synapse_e2e::WORKER_ROLE, "boss", "alice"] {
        let mut client = stack.pg_as(role);
        for table in ["goals", "tasks", "edges", "attempts", "signals"] {
            let seen = one_i64(
                &mut client,
                &format!("SELECT count(*) FROM synapse.{table}"),
            );
            let all = one_i64(&mut admin, &format!("SELECT count(*) FROM synapse.{table}"));
            let expected = match (role, table) {
                ("alice", "goals") => 1,
                ("alice", "tasks") => 2,
                ("alice", "edges") => all / 2,
                (_, _) => all,
            };
            assert_eq!(seen, expected, "{role} reading synapse.{table}");
        }
    }
}

/// Whether `client`'s plan for `sql` carries subplans (row security's tests).
fn plans_subplans(client: &mut postgres::Client, sql: &str) -> bool {
    client
        .query(&format!("EXPLAIN {sql}"), &[])
        .unwrap()
        .iter()
        .any(|row| {
            let line: String = row.get(0);
            line.contains("SubPlan") || line.contains("InitPlan")
        })
}

#[test]
fn the_roles_that_see_every_row_read_without_row_security_subplans() {
    let stack = Stack::start("roles-seeing-all", &[]);
    let mut admin = stack.pg();
    roles(
        &mut admin,
        &[
            ("alice", Some("submitter")),
            ("boss", Some("admin")),
            ("carol", Some("submitter")),
        ],
    );
    admin
        .execute("SELECT synapse.grant_worker('carol')", &[])
        .unwrap();
    submit_plan(&mut admin, WAITING);
    let tables = ["goals", "tasks", "edges", "attempts", "signals"];
    for role in [synapse_e2e::WORKER_ROLE, "boss", "carol"] {
        let mut client = stack.pg_as(role);
        for table in tables {
            let sql = format!("SELECT count(*) FROM synapse.{table}");
            assert!(!plans_subplans(&mut client, &sql), "{role}: {sql}");
        }
    }
    let mut alice = stack.pg_as("alice");
    for table in tables {
        let sql = format!("SELECT count(*) FROM synapse.{table}");
        assert!(plans_subplans(&mut alice, &sql), "alice: {sql}");
    }

    // A capability granted again, or one that does not see every row,
    // leaves the policies alone: re-creating one locks its table.
    let policy = "SELECT oid::bigint FROM pg_policy WHERE polname = 'seeing_all' AND polrelid = 'synapse.tasks'::regclass";
    let before = one_i64(&mut admin, policy);
    admin
        .batch_execute(
            "SELECT synapse.grant_worker('carol'); SELECT synapse.grant_submitter('boss')",
        )
        .unwrap();
    assert_eq!(one_i64(&mut admin, policy), before);

    // A plan made while carol saw every goal is made again once she no
    // longer does, as the workers' sessions keep theirs.
    let mut carol = stack.pg_as("carol");
    carol
        .batch_execute("SET plan_cache_mode = force_generic_plan")
        .unwrap();
    let goals = carol.prepare("SELECT count(*) FROM synapse.goals").unwrap();
    assert_eq!(carol.query_one(&goals, &[]).unwrap().get::<_, i64>(0), 1);
    admin
        .execute("SELECT synapse.revoke_worker('carol')", &[])
        .unwrap();
    assert_eq!(carol.query_one(&goals, &[]).unwrap().get::<_, i64>(0), 0);
    // With no role left that sees every row, no policy is left either.
    admin
        .batch_execute(&format!(
            "SELECT synapse.revoke_worker('{}'); SELECT synapse.revoke_admin('boss')",
            synapse_e2e::WORKER_ROLE
        ))
        .unwrap();
    assert_eq!(
        one_i64(
            &mut admin,
            "SELECT count(*) FROM pg_policy WHERE polname = 'seeing_all'"
        ),
        0
    );
}

//! Upgrades: a database created with an earlier release, with goals in
//! flight, is updated with `ALTER EXTENSION synapse UPDATE`; the goals finish,
//! and the schema is exactly what a fresh install of this release creates.
use std::collections::BTreeSet;
use std::time::Duration;

use synapse_e2e::{
    postgres, submit_plan, task, wait_for_goal, wait_until, worker_binary, Stack, DATABASE, TRIAGE,
};

const WAIT: Duration = Duration::from_secs(60);

/// Every earlier release, oldest first: each is installed, loaded with work
/// and updated to this release.
const RELEASES: &[&str] = &[
    "0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "0.9.0", "0.10.0",
    "0.11.0", "0.12.0", "0.13.0", "0.14.0", "0.15.0", "0.16.0", "0.17.0", "0.18.0", "0.19.0",
    "0.20.0", "0.21.0",
];

/// One line per object of the `synapse` schema and its extension: columns,
/// constraints, indexes, functions (with their bodies), triggers, comments,
/// storage options, what pg_dump keeps, and the built-in actions. Sorted, so
/// that the order objects were created in does not matter.
const DESCRIBE_SCHEMA: &str = r#"
SELECT line FROM (
    SELECT format('column %s.%s %s%s%s%s%s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                  CASE WHEN a.attcollation <> 0 THEN ' collate ' || a.attcollation::regcollation::text ELSE '' END,
                  CASE WHEN a.attnotnull THEN ' not null' ELSE '' END,
                  coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''),
                  CASE WHEN a.attidentity <> '' THEN ' identity ' || a.attidentity::text ELSE '' END) AS line
      FROM pg_attribute a
      JOIN pg_class c ON c.oid = a.attrelid
      LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'synapse'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
       AND c.relkind IN ('r', 'v', 'c', 'p')
    UNION ALL
    SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
      FROM pg_constraint WHERE connamespace = 'synapse'::regnamespace
    UNION ALL
    SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'synapse'
    UNION ALL
    SELECT format('function %s %s', p.oid::regprocedure, pg_get_functiondef(p.oid))
      FROM pg_proc p WHERE p.pronamespace = 'synapse'::regnamespace AND p.prokind IN ('f', 'p')
    UNION ALL
    SELECT 'trigger ' || pg_get_triggerdef(t.oid)
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
     WHERE c.relnamespace = 'synapse'::regnamespace AND NOT t.tgisinternal
    UNION ALL
    SELECT format('comment %s: %s', pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
      FROM pg_description d
     WHERE pg_describe_object(d.classoid, d.objoid, d.objsubid) ~ 'synapse\.'
    UNION ALL
    SELECT format('options %s %s', c.relname, c.reloptions)
      FROM pg_class c WHERE c.relnamespace = 'synapse'::regnamespace AND c.reloptions IS NOT NULL
    UNION ALL
    SELECT format('member %s', pg_describe_object(classid, objid, objsubid))
      FROM pg_depend
     WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
       AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'synapse')
    UNION ALL
    SELECT format('dumped %s %s', config::regclass, coalesce(condition, ''))
      FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(config, condition)
     WHERE e.extname = 'synapse'
    UNION ALL
    SELECT format('action %s %s %s', name, description, builtin) FROM synapse.actions WHERE builtin
) described ORDER BY line
"#;

fn describe(client: &mut postgres::Client) -> Vec<String> {
    client
        .query(DESCRIBE_SCHEMA, &[])
        .expect("describing the schema")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn every_release_updates_to_this_one_with_goals_in_flight() {
    let stack = Stack::start("upgrade", &["synapse.sweep_interval = '2s'"]);
    let mut admin = stack.pg_database("postgres");
    admin.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = stack.pg_database("fresh");
    fresh.batch_execute("CREATE EXTENSION synapse").unwrap();
    let this_release = describe(&mut fresh);

    for release in RELEASES {
        let mut client = stack.pg();
        client
            .batch_execute(&format!(
                "DROP EXTENSION synapse; CREATE EXTENSION synapse VERSION '{release}'"
            ))
            .unwrap();
        // Work at every stage: submitted (to be planned), queued, pending
        // behind a queued step, and a template to plan with.
        client
            .execute(
                "SELECT synapse.add_template('triage', '(?i)^triage incident (?<id>\\d+) severity (?<severity>\\d)$', $1::text::jsonb)",
                &[&TRIAGE],
            )
            .unwrap();
        let planned: i64 = client
            .query_one(
                "SELECT synapse.submit_goal('triage incident 9 severity 5')",
                &[],
            )
            .unwrap()
            .get(0);
        let chain = submit_plan(
            &mut client,
            r#"{"steps":[{"id":"a","action":"noop"},{"id":"b","action":"noop"}],"edges":[{"from":"a","to":"b"}]}"#,
        );
        // A join all decided after the update from counts the update made:
        // x's edge is not taken, so j is skipped.
        let join = submit_plan(
            &mut client,
            r#"{"steps":[{"id":"x","action":"noop"},{"id":"y","action":"noop"},{"id":"j","action":"noop","join":"all"}],
                "edges":[{"from":"x","to":"j","on":"failure"},{"from":"y","to":"j"}]}"#,
        );
        let in_flight = [planned, chain, join];

        client
            .batch_execute("ALTER EXTENSION synapse UPDATE")
            .unwrap();
        let version: String = client
            .query_one(
                "SELECT extversion FROM pg_extension WHERE extname = 'synapse'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(
            version,
            env!("CARGO_PKG_VERSION"),
            "updated to this release"
        );

        let updated = describe(&mut client);
        let fresh_only: BTreeSet<&String> = this_release
            .iter()
            .filter(|line| !updated.contains(line))
            .collect();
        let updated_only: BTreeSet<&String> = updated
            .iter()
            .filter(|line| !this_release.contains(line))
            .collect();
        assert!(
            fresh_only.is_empty() && updated_only.is_empty(),
            "{release} updated differs from a fresh install.\nonly in the fresh install:\n{fresh_only:#?}\nonly after the update:\n{updated_only:#?}"
        );

        // The extension was dropped and made again: its capabilities with it.
        client
            .execute(
                "SELECT synapse.grant_worker($1::text::regrole)",
                &[&synapse_e2e::WORKER_ROLE],
            )
            .unwrap();
        let worker = stack.start_worker(&format!("after-{release}"), &[]);
        for goal in in_flight {
            let status = wait_for_goal(&stack, goal, WAIT);
            assert_eq!(status["status"], "succeeded", "{status}");
        }
        let status = wait_for_goal(&stack, join, WAIT);
        assert_eq!(task(&status, "j")["status"], "skipped", "{status}");
        assert_eq!(
            task(&status, "j")["error"],
            "join all: edge from x not taken",
            "{status}"
        );
        wait_until("the outbox to drain", WAIT, || {
            (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
        });
        drop(worker);
    }
}

#[test]
fn a_worker_refuses_an_extension_older_than_its_statements_need() {
    // 0.21.0's `signal` locks a goal in a mode this release's engine runs
    // do not wait for: a signal could miss a wait step starting at that
    // moment. Such a worker says so and stops, having written nothing.
    // A database of its own: no forwarder works in it while its extension
    // is made.
    let stack = Stack::start("old-extension", &[]);
    let mut admin = stack.pg_database("postgres");
    admin.batch_execute("CREATE DATABASE old").unwrap();
    let mut client = stack.pg_database("old");
    client
        .batch_execute("CREATE EXTENSION synapse VERSION '0.21.0'")
        .unwrap();
    let url = stack
        .database_url()
        .replace(&format!("/{DATABASE}"), "/old");
    let mut worker = stack.spawn_worker_binary(
        "too-new",
        &worker_binary(),
        &["--log-format", "text", "--database-url", &url, "run"],
        "info",
    );
    let status = worker.wait(WAIT);
    assert!(!status.success(), "{}", worker.log_text());
    let log = worker.log_text();
    assert!(
        log.contains(
            "the synapse extension in this database is 0.21.0; this worker needs 0.22.0 or later"
        ) && log.contains("ALTER EXTENSION synapse UPDATE"),
        "{log}"
    );
    let registered: i64 = client
        .query_one(
            "SELECT count(*) FROM synapse.actions WHERE registered_by IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        registered, 0,
        "actions registered by a worker that refused to run"
    );
}

#[test]
fn a_running_worker_carries_on_when_a_column_its_statements_return_changes() {
    // An update may change the type or collation of a column a worker's
    // prepared statements return: Postgres then refuses to run them again
    // ("cached plan must not change result type") on every connection that
    // prepared them. No sweep here to hide a message lost to that.
    let stack = Stack::start("column-changed", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let worker = stack.start_worker("w", &["--concurrency", "1"]);
    let chain = r#"{"steps":[{"id":"a","action":"noop"},{"id":"b","action":"noop"},{"id":"c","action":"noop"}],
                    "edges":[{"from":"a","to":"b"},{"from":"b","to":"c"}]}"#;
    // Every connection the worker claims and records on prepares its statements.
    for _ in 0..4 {
        let goal = submit_plan(&mut client, chain);
        assert_eq!(wait_for_goal(&stack, goal, WAIT)["status"], "succeeded");
    }
    client
        .batch_execute(r#"ALTER TABLE synapse.tasks ALTER COLUMN action TYPE text COLLATE "C""#)
        .unwrap();
    for _ in 0..4 {
        let goal = submit_plan(&mut client, chain);
        let status = wait_for_goal(&stack, goal, Duration::from_secs(30));
        assert_eq!(
            status["status"],
            "succeeded",
            "{status}\n{}",
            worker.log_text()
        );
    }
    assert!(
        worker
            .log_text()
            .contains("the schema changed under prepared statements: preparing them again"),
        "the change did not reach a prepared statement: {}",
        worker.log_text()
    );
}

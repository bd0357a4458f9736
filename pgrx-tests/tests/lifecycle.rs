//! The extension's life in a server: without the preload, across restarts
//! that add or remove it, and how cancelling leaves a goal's graph.
use std::time::Duration;

use synapse_e2e::{
    brpop, edge_state, goal_status, postgres, submit_plan, task, Stack, ONE_STEP, WITHOUT_PRELOAD,
};

const WAIT: Duration = Duration::from_secs(30);

/// Every call of the SQL API a session makes, in one session.
fn use_the_api(client: &mut postgres::Client) -> i64 {
    client
        .batch_execute(
            "SELECT synapse.add_template('echo', '^echo (?<what>.+)$', '{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}')",
        )
        .expect("add_template");
    let problems: String = client
        .query_one(
            "SELECT synapse.validate_blueprint($1::text::jsonb)::text",
            &[&ONE_STEP],
        )
        .expect("validate_blueprint")
        .get(0);
    assert_eq!(problems, "[]");
    client
        .query_one("SELECT synapse.submit_goal('echo hello')", &[])
        .expect("submit_goal");
    let goal = submit_plan(client, ONE_STEP);
    client
        .query_one("SELECT synapse.goal_graph($1)", &[&goal])
        .expect("goal_graph");
    assert_eq!(goal_status(client, goal)["status"], "running");
    goal
}

#[test]
fn without_the_preload_the_api_works_and_events_wait_for_the_forwarder() {
    // CREATE EXTENSION itself runs in a session that loads the library late.
    let mut stack = Stack::start_without_preload("no-preload");
    assert!(!plpgsql_loaded_at_connect(&stack));
    let mut listener = stack.pg();
    listener.batch_execute("LISTEN synapse_events").unwrap();
    let mut client = stack.pg();
    let goal = use_the_api(&mut client);
    // Writers never NOTIFY themselves (the forwarder does): what they
    // committed has reached the listener's session by the end of its next
    // statement, and there is nothing.
    listener.batch_execute("SELECT 1").unwrap();
    assert_eq!(listener.notifications().len(), 0);
    let status = stack.forwarder_status(&mut client);
    assert_eq!(status["running"], false, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("shared_preload_libraries"),
        "{status}"
    );
    let pending = status["pending"].as_i64().unwrap();
    assert!(pending >= 3, "{status}");

    // With the preload, the waiting events go out, and sessions start with
    // plpgsql (which the API's functions run) already loaded.
    stack.restart_postgres_with(&[]);
    assert!(plpgsql_loaded_at_connect(&stack));
    let mut redis = stack.redis();
    let payload = brpop(&mut redis, "synapse:queue:default", WAIT).expect("the waiting dispatch");
    assert!(
        payload.contains(&format!("\"goal_id\":{goal}")),
        "{payload}"
    );

    // Taking the preload away again breaks no session.
    stack.restart_postgres_with(&[WITHOUT_PRELOAD]);
    let mut client = stack.pg();
    use_the_api(&mut client);
    assert_eq!(stack.forwarder_status(&mut client)["running"], false);
}

/// Whether a new session finds plpgsql loaded before it ran any (its
/// settings exist only once the library is loaded).
fn plpgsql_loaded_at_connect(stack: &Stack) -> bool {
    stack
        .pg()
        .query_one(
            "SELECT current_setting('plpgsql.variable_conflict', true) IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn cancelling_resolves_the_edges_of_every_cancelled_step() {
    let stack = Stack::start("cancel-edges", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        r#"{"steps":[{"id":"a","action":"noop"},{"id":"b","action":"noop"},{"id":"c","action":"noop"}],
            "edges":[{"from":"a","to":"b"},{"from":"b","to":"c","on":"always"}]}"#,
    );
    let cancelled: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap()
        .get(0);
    assert!(cancelled);
    let status = goal_status(&mut client, goal);
    assert_eq!(status["status"], "cancelled");
    for step in ["a", "b", "c"] {
        assert_eq!(task(&status, step)["status"], "cancelled", "{status}");
    }
    assert_eq!(edge_state(&status, "a", "b"), "not_taken");
    assert_eq!(edge_state(&status, "b", "c"), "not_taken");
    let again: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&goal])
        .unwrap()
        .get(0);
    assert!(!again, "a finished goal is not cancelled twice");
}

#[test]
fn an_extension_dropped_and_created_again_has_its_events_forwarded() {
    let stack = Stack::start("recreate", &[]);
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // Enough rounds for the forwarder's read floor to rise well above 1.
    for _ in 0..5 {
        client
            .batch_execute(
                "SELECT synapse.submit_goal('goal ' || i) FROM generate_series(1, 50) AS i",
            )
            .unwrap();
        for _ in 0..50 {
            brpop(&mut redis, "synapse:planner", WAIT).expect("forwarded");
        }
    }
    // This session keeps submit_plan's prepared statements across the drop.
    submit_plan(&mut client, ONE_STEP);
    brpop(&mut redis, "synapse:queue:default", WAIT).expect("forwarded");
    // In one transaction: the forwarder sees no error, only a new outbox
    // whose ids start at 1 again.
    client
        .batch_execute("BEGIN; DROP EXTENSION synapse; CREATE EXTENSION synapse; COMMIT")
        .unwrap();
    let goal = submit_plan(&mut client, ONE_STEP);
    let payload =
        brpop(&mut redis, "synapse:queue:default", WAIT).expect("forwarded from the new outbox");
    assert!(
        payload.contains(&format!("\"goal_id\":{goal}")),
        "{payload}"
    );
}

//! What the engine reads to carry a goal on grows with that goal, not with
//! the database: a wide goal's end reads its own steps and edges by key,
//! however many other goals' edges the table holds.
use std::time::Duration;

use serde_json::{json, Value};
use synapse_e2e::{fan_out_of, submit_plan, wait_for_goal, wait_until, Stack};
use synapse_worker::store;

/// 1 → `width` → 1, its join counting its parents, with `output` if given.
fn fan_out(width: usize, output: Option<&str>) -> Value {
    let mut blueprint = fan_out_of(
        width,
        json!({"id": "j", "action": "transform", "join": "all", "params": {"expr": "size(input)"}}),
    );
    if let Some(output) = output {
        blueprint["output"] = json!(output);
    }
    blueprint
}

#[test]
fn a_wide_goals_end_reads_its_own_edges_not_every_goals() {
    // With statistics showing wide goals, the planner made each step's "has
    // it an edge out?" probe a lookup in a hash of every edge in the table,
    // built by reading them all, twice: the end of one goal cost a read of
    // every goal's edges.
    let width = 1_000;
    let stack = Stack::start("engine-reads", &[]);
    let mut client = stack.pg();
    // Other goals' edges, 10 × 2 000, of goals that ran: a database with a
    // history of wide goals.
    client
        .execute(
            "SELECT synapse.submit_plans($1::text::jsonb, array_fill('{}'::jsonb, ARRAY[10]))",
            &[&fan_out(width, Some("{}")).to_string()],
        )
        .unwrap();
    let with_output = submit_plan(&mut client, &fan_out(width, Some("{'n': 1}")));
    let by_default = submit_plan(&mut client, &fan_out(width, None));
    let _worker = stack.start_worker("engine-reads", &[]);
    for goal in [with_output, by_default] {
        let status = wait_for_goal(&stack, goal, Duration::from_secs(120));
        assert_eq!(status["status"], "succeeded", "{status}");
    }
    wait_until("every goal to end", Duration::from_secs(120), || {
        let running: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.goals WHERE finished_at IS NULL",
                &[],
            )
            .unwrap()
            .get(0);
        (running == 0).then_some(())
    });
    client
        .batch_execute("ANALYZE synapse.tasks; ANALYZE synapse.edges")
        .unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = synapse_worker::worker::pool(&stack.database_url(), 1).expect("a pool");
    runtime.block_on(async {
        let mut connection = pool.get().await.expect("a pooled connection");
        let tx = store::begin(&mut connection).await.expect("BEGIN");
        let endings = store::goal_endings(&tx, &[with_output, by_default])
            .await
            .expect("goal_endings");
        assert_eq!(endings.len(), 2);
        assert_eq!(endings[0].output.as_deref(), Some("{'n': 1}"));
        assert!(endings[0].unhandled_failures.is_empty());
        assert_eq!(endings[1].output, None);
        assert_eq!(endings[1].leaf_results, json!({"j": width}));
        let edges_read: i64 = tx
            .query_one(
                "SELECT seq_tup_read + idx_tup_fetch FROM pg_stat_xact_user_tables
                  WHERE relid = 'synapse.edges'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        // Their own edges are 4 000; the other goals' 20 000.
        assert!(edges_read <= 4_000, "{edges_read} edges read");
    });
}

//! Submitting at scale: goals submitted by the thousand in one statement,
//! into a fresh database, cost the same each, however many came before.
use synapse_e2e::Stack;

#[test]
fn a_bulk_submit_into_a_fresh_database_checks_each_goal_by_probe_not_by_scanning_the_ones_before() {
    // Each task's foreign key is checked against synapse.goals with a plan
    // the session keeps. Made while the table was a page (a new install that
    // ran a few goals, which autovacuum analysed), that plan scanned the
    // table for every goal of the statement: N²/2 rows read for N goals
    // (3 000 goals: 4.5 million).
    let stack = Stack::start("bulk-submit", &[]);
    let mut client = stack.pg();
    client
        .batch_execute(
            "SELECT synapse.submit_plan('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}'::jsonb)
               FROM generate_series(1, 20)",
        )
        .unwrap();
    client
        .batch_execute("VACUUM ANALYZE synapse.goals")
        .unwrap();
    let mut client = stack.pg();
    let goals = 3_000;
    let mut tx = client.transaction().unwrap();
    let submitted: i64 = tx
        .query_one(
            "SELECT count(synapse.submit_plan('{\"steps\":[{\"id\":\"a\",\"action\":\"noop\"}]}'::jsonb))
               FROM generate_series(1, $1::int)",
            &[&goals],
        )
        .unwrap()
        .get(0);
    assert_eq!(submitted, i64::from(goals));
    let scanned: i64 = tx
        .query_one(
            "SELECT seq_tup_read FROM pg_stat_xact_user_tables WHERE relid = 'synapse.goals'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    // A scan is fine while the table is a few pages: a few hundred rows.
    assert!(
        scanned < 100 * i64::from(goals),
        "{scanned} rows of goals scanned to submit {goals} goals"
    );
}

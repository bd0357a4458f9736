//! The measuring side's view of sessions: a connection that stays out of the
//! measured database's statistics, and the commits those statistics count.
use std::time::Duration;

use synapse_e2e::{postgres, wait_until, Stack};

use crate::goals::one_i64;

/// A connection to the `postgres` database, for the measuring side of the
/// throughput runs: what it runs never counts in the measured database's
/// statistics.
pub fn meter(stack: &Stack) -> postgres::Client {
    stack.pg_database("postgres")
}

/// Committed transactions of `database` as the statistics know them: a
/// session reports its own when idle (at most once a second) and when it
/// exits; the forwarder (a background worker) only when it exits.
pub fn xact_commit(meter: &mut postgres::Client, database: &str) -> i64 {
    meter
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&database],
        )
        .expect("pg_stat_database")
        .get(0)
}

/// Makes `client`'s session report its statistics, this statement's included,
/// before the server says it is ready again (which `batch_execute` waits for).
pub fn flush_stats(client: &mut postgres::Client) {
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .expect("pg_stat_force_next_flush");
}

pub fn backend_pid(client: &mut postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("pg_backend_pid")
        .get(0)
}

/// Waits until the only client sessions of `database` are `keep`: a session
/// reports its pending statistics as it exits, before it leaves
/// pg_stat_activity.
pub fn wait_for_sessions_to_exit(meter: &mut postgres::Client, database: &str, keep: &[i32]) {
    wait_until("the sessions to exit", Duration::from_secs(30), || {
        let others = one_i64(
            meter,
            &format!(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = '{database}' AND backend_type = 'client backend'
                    AND pid <> ALL ('{{{}}}'::int[])",
                keep.iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        (others == 0).then_some(())
    });
}

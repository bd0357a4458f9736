//! WAL written during a measurement window, and its commit records.
use std::time::Duration;

use synapse_e2e::{postgres, wait_until};

/// WAL written during a measurement window.
pub struct WalUse {
    pub bytes: i64,
    /// Transaction commit records: the commits that wrote (and fsynced), in
    /// the whole cluster, the forwarder's included.
    pub commits: i64,
}

/// A measurement window over the WAL. A physical replication slot keeps the
/// window's WAL on disk even if a checkpoint runs meanwhile, so pg_walinspect
/// can count its commit records afterwards.
pub struct WalWindow {
    start: String,
}

const SLOT: &str = "synapse_bench";

impl WalWindow {
    /// `meter` is a connection to a database with pg_walinspect (see [`install`]).
    pub fn open(meter: &mut postgres::Client) -> WalWindow {
        meter
            .query_one(
                "SELECT pg_create_physical_replication_slot($1, true)::text",
                &[&SLOT],
            )
            .expect("creating the WAL slot");
        let start = meter
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .expect("pg_current_wal_lsn")
            .get(0);
        WalWindow { start }
    }

    pub fn close(self, meter: &mut postgres::Client) -> WalUse {
        let end: String = meter
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .expect("pg_current_wal_lsn")
            .get(0);
        // pg_walinspect reads only flushed WAL; the WAL writer flushes the rest soon.
        wait_until("the WAL to be flushed", Duration::from_secs(30), || {
            meter
                .query_one(
                    "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                    &[&end],
                )
                .expect("pg_current_wal_flush_lsn")
                .get::<_, bool>(0)
                .then_some(())
        });
        let usage = if end == self.start {
            // Nothing written (pg_walinspect refuses an empty range).
            WalUse {
                bytes: 0,
                commits: 0,
            }
        } else {
            let row = meter
                .query_one(
                    "SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)::bigint,
                            (SELECT coalesce(sum(count), 0)::bigint
                               FROM pg_get_wal_stats($1::text::pg_lsn, $2::text::pg_lsn, true)
                              WHERE \"resource_manager/record_type\" = 'Transaction/COMMIT')",
                    &[&self.start, &end],
                )
                .expect("pg_get_wal_stats");
            WalUse {
                bytes: row.get(0),
                commits: row.get(1),
            }
        };
        meter
            .execute("SELECT pg_drop_replication_slot($1)", &[&SLOT])
            .expect("dropping the WAL slot");
        usage
    }
}

/// Makes pg_walinspect available to `meter`'s database.
pub fn install(meter: &mut postgres::Client) {
    meter
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .expect("pg_walinspect");
}

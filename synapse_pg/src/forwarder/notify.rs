//! NOTIFY for listeners, sent by the forwarder from its own transactions.
//!
//! A transaction that NOTIFYs takes a database-wide lock at commit and holds
//! it until its commit is flushed: every writer that sent one waited for the
//! writers before it, and at a thousand goals a second that queue, not the
//! work, set the pace. So writers only mark their events (`outbox.notify`,
//! from their session's `synapse.notify`), and the forwarder sends the
//! NOTIFYs: in the transaction that deletes (or sets aside) the events it
//! forwarded, and while Redis is down, in passes of their own
//! ([`notify_waiting`]), so that listeners still hear of every change.
//! Either way the mark is gone in the transaction that sent the NOTIFY:
//! each event is NOTIFYed once.
use pgrx::prelude::*;
use std::cell::Cell;

use crate::events::payloads_of_row;
use crate::prepared::{oid, prepared};

/// Beyond this share of the NOTIFY queue in use (a listener idle in a
/// transaction holds its tail), NOTIFYs are left out: a full queue would fail
/// the forwarder's commits, and with them the dispatch of work.
const QUEUE_LIMIT: f64 = 0.5;

thread_local! {
    /// The queue was found too full and that was logged (once, until it drains).
    static TOO_FULL_LOGGED: Cell<bool> = const { Cell::new(false) };
}

/// Sends the payloads of outbox rows (`rows`, each one or more events) on
/// `synapse_events`, in order, at this transaction's commit; leaves them out
/// (with a warning) while the queue is too full.
pub fn send(rows: Vec<String>) -> Result<(), pgrx::spi::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let payloads: Vec<&str> = rows.iter().flat_map(|row| payloads_of_row(row)).collect();
    Spi::connect(|client| {
        let usage = prepared(client, "SELECT pg_notification_queue_usage()", &[])?;
        let usage = client
            .select(&*usage, None, &[])?
            .first()
            .get_one::<f64>()?
            .unwrap_or(0.0);
        if usage >= QUEUE_LIMIT {
            if !TOO_FULL_LOGGED.replace(true) {
                warning!(
                    "synapse forwarder: the NOTIFY queue is {:.0}% full (a listening session idle \
                     in a transaction?); events are not NOTIFYed until it drains",
                    usage * 100.0
                );
            }
            return Ok(());
        }
        TOO_FULL_LOGGED.set(false);
        let notify = prepared(
            client,
            "SELECT pg_notify('synapse_events', u.payload)
               FROM unnest($1::text[]) WITH ORDINALITY AS u(payload, n)
              ORDER BY u.n",
            &[oid(PgBuiltInOids::TEXTARRAYOID)],
        )?;
        client.select(&*notify, None, &[payloads.into()])?;
        Ok(())
    })
}

/// What a pass of [`notify_waiting`] read and marked.
pub struct Pass {
    /// The highest id NOTIFYed, and the id of the transaction that cleared
    /// the marks (None: nothing was owed).
    pub sent: Option<(i64, u64)>,
    /// Every event above the floor that owed a NOTIFY was read (not cut short
    /// by the limit).
    pub complete: bool,
    /// The xmin of the read's snapshot.
    pub snapshot_xmin: u64,
}

/// In the caller's transaction: NOTIFYs the events above `floor` still in the
/// outbox that owe one (at most `limit`, oldest first) and clears their mark.
/// What the forwarder runs while Redis is down, so that no drain deletes them.
pub fn notify_waiting(floor: i64, limit: i64) -> Result<Pass, String> {
    let (ids, payloads, snapshot_xmin) = Spi::connect(|client| {
        // One row at least: the snapshot's xmin comes with the events.
        let read = prepared(
            client,
            "SELECT o.id, o.payload, pg_snapshot_xmin(pg_current_snapshot())::text
               FROM (SELECT) AS one
               LEFT JOIN LATERAL (
                    SELECT id, payload FROM synapse.outbox
                     WHERE id > $2 AND notify
                     ORDER BY id LIMIT $1) AS o ON true
              ORDER BY o.id",
            &[oid(PgBuiltInOids::INT8OID), oid(PgBuiltInOids::INT8OID)],
        )?;
        let mut ids = Vec::new();
        let mut payloads = Vec::new();
        let mut snapshot_xmin = 0;
        for row in client.select(&*read, None, &[limit.into(), floor.into()])? {
            snapshot_xmin = row
                .get::<String>(3)?
                .and_then(|xmin| xmin.parse().ok())
                .unwrap_or(0);
            if let Some(id) = row.get::<i64>(1)? {
                ids.push(id);
                payloads.push(row.get::<String>(2)?.unwrap_or_default());
            }
        }
        Ok::<_, pgrx::spi::Error>((ids, payloads, snapshot_xmin))
    })
    .map_err(|error| error.to_string())?;
    let complete = (ids.len() as i64) < limit;
    let Some(&max) = ids.last() else {
        return Ok(Pass {
            sent: None,
            complete,
            snapshot_xmin,
        });
    };
    // The transaction gets its id here, after the read, as the floor requires.
    let xid = Spi::connect_mut(|client| {
        let clear = prepared(
            client,
            "WITH sent AS (UPDATE synapse.outbox SET notify = false WHERE id = ANY($1))
             SELECT pg_current_xact_id()::text",
            &[oid(PgBuiltInOids::INT8ARRAYOID)],
        )?;
        client
            .update(&*clear, None, &[ids.into()])?
            .first()
            .get_one::<String>()
    })
    .map_err(|error| error.to_string())?
    .and_then(|xid| xid.parse().ok())
    .ok_or("no transaction id")?;
    send(payloads).map_err(|error| error.to_string())?;
    Ok(Pass {
        sent: Some((max, xid)),
        complete,
        snapshot_xmin,
    })
}

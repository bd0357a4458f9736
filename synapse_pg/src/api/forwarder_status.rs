//! `synapse.forwarder_status()` and the forwarder wake-up.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::forwarder;

/// `{running, redis_connected, pending, parked, forwarded_total, last_error,
/// last_forward_at, database}`, for the database it is called in: the
/// forwarder serves one database (`synapse.database`), and in any other its
/// events wait, which this says.
#[pg_extern(volatile)]
fn forwarder_status() -> Result<JsonB, pgrx::spi::Error> {
    // Read-only SPI: works on a hot standby and assigns no transaction id.
    // Events, not rows: a row may carry several (0.17.0).
    let count = if crate::installed::has_column(c"outbox", c"events") {
        "coalesce(sum(events), 0)::bigint"
    } else {
        "count(*)"
    };
    let (pending, parked, here, running) = Spi::connect(|client| {
        let row = client
            .select(
                &format!(
                    "SELECT (SELECT {count} FROM synapse.outbox),
                            (SELECT {count} FROM synapse.outbox_parked),
                            current_database()::text,
                            EXISTS (SELECT FROM pg_stat_activity
                                     WHERE backend_type = $1 AND datname = current_database())"
                ),
                Some(1),
                &[forwarder::BACKEND_TYPE.into()],
            )?
            .first();
        Ok::<_, pgrx::spi::Error>((
            row.get::<i64>(1)?.unwrap_or(0),
            row.get::<i64>(2)?.unwrap_or(0),
            row.get::<String>(3)?.unwrap_or_default(),
            row.get::<bool>(4)?.unwrap_or(false),
        ))
    })?;
    let served = crate::gucs::database();
    let mut status = json!({
        "running": running,
        "redis_connected": false,
        "pending": pending,
        "parked": parked,
        "forwarded_total": 0,
        "last_error": Value::Null,
        "last_forward_at": Value::Null,
        "database": served,
    });
    let state = forwarder::state();
    match state {
        None => {
            status["last_error"] = json!(
                "the forwarder is not running: add synapse to shared_preload_libraries and restart"
            );
        }
        Some(_) if served != here => {
            status["last_error"] = json!(format!(
                "the forwarder serves database \"{served}\" (synapse.database), not \"{here}\": events here are not forwarded"
            ));
        }
        Some(state) => {
            status["redis_connected"] = json!(running && state.redis_connected);
            status["forwarded_total"] = json!(state.forwarded_total);
            status["last_error"] = json!(state.last_error());
            if !running && state.last_error().is_none() {
                status["last_error"] =
                    json!("the forwarder is not running (starting, or restarting after an error)");
            }
            if state.last_forward_at != 0 {
                let at = TimestampWithTimeZone::try_from(state.last_forward_at).ok();
                let at = Spi::connect(|client| {
                    client
                        .select(
                            "SELECT to_json($1::timestamptz) #>> '{}'",
                            Some(1),
                            &[at.into()],
                        )?
                        .first()
                        .get_one::<String>()
                })?;
                status["last_forward_at"] = json!(at);
            }
        }
    }
    Ok(JsonB(status))
}

/// Wakes the forwarder when the calling transaction commits (used by
/// CREATE EXTENSION; event triggers do the same on their own).
#[pg_extern(name = "_wake_forwarder")]
fn wake_forwarder() {
    crate::events::wake_at_commit();
}

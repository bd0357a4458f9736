//! `synapse.forwarder_status()` and the forwarder wake-up.
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::forwarder;

/// `{running, redis_connected, pending, forwarded_total, last_error, last_forward_at}`.
#[pg_extern(volatile)]
fn forwarder_status() -> Result<JsonB, pgrx::spi::Error> {
    let pending = Spi::get_one::<i64>("SELECT count(*) FROM synapse.outbox")?.unwrap_or(0);
    let running = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = $1)",
        &[forwarder::BACKEND_TYPE.into()],
    )?
    .unwrap_or(false);
    let mut status = json!({
        "running": running,
        "redis_connected": false,
        "pending": pending,
        "forwarded_total": 0,
        "last_error": Value::Null,
        "last_forward_at": Value::Null,
    });
    match forwarder::state() {
        None => {
            status["last_error"] = json!(
                "the forwarder is not running: add synapse to shared_preload_libraries and restart"
            );
        }
        Some(state) => {
            status["redis_connected"] = json!(running && state.redis_connected);
            status["forwarded_total"] = json!(state.forwarded_total);
            status["last_error"] = json!(state.last_error());
            if state.last_forward_at != 0 {
                let at = Spi::get_one_with_args::<String>(
                    "SELECT to_json($1::timestamptz) #>> '{}'",
                    &[TimestampWithTimeZone::try_from(state.last_forward_at)
                        .ok()
                        .into()],
                )?;
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

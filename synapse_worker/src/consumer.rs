//! Pops work from Redis: the planner list first, then the queues in priority
//! order, one BRPOP at a time, only while a concurrency slot is free.
//!
//! The BRPOP blocks with no timeout, so an idle worker sends nothing. At
//! shutdown a second connection unblocks it with `CLIENT UNBLOCK`, which makes
//! BRPOP return empty-handed instead of dropping a popped message on the floor.
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::worker::Shared;

/// A BRPOP connection and its Redis client id (for `CLIENT UNBLOCK`).
struct Popper {
    connection: MultiplexedConnection,
    client_id: i64,
}

async fn connect(client: &redis::Client) -> redis::RedisResult<Popper> {
    // No response timeout: BRPOP waits as long as there is no work.
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let client_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut connection)
        .await?;
    Ok(Popper {
        connection,
        client_id,
    })
}

/// Consumes until `shutdown`, running each message on `tasks`.
pub async fn consume(
    shared: Arc<Shared>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
    abort: CancellationToken,
) {
    let keys = shared.config.list_keys();
    let planner_key = keys[0].clone();
    let slots = Arc::new(Semaphore::new(shared.config.concurrency));
    let mut popper: Option<Popper> = None;
    let mut reconnect = crate::backoff::Backoff::default();
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        if shutdown.is_cancelled() {
            break;
        }
        // Postgres is unreachable: popping more would only hand messages back.
        if let Some(pause) = shared.paused_for() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        let current = match &mut popper {
            Some(current) => current,
            slot_for_connection => match connect(&shared.redis).await {
                Ok(connected) => {
                    if reconnect.is_backing_off() {
                        info!("redis reachable again");
                        crate::metrics::METRICS
                            .reconnects
                            .with_label_values(&["redis"])
                            .inc();
                    }
                    reconnect.reset();
                    slot_for_connection.insert(connected)
                }
                Err(error) => {
                    let pause = reconnect.next_pause();
                    warn!(%error, retry_in_ms = pause.as_millis() as u64, "cannot reach redis");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
            },
        };
        let popped = pop(&shared.redis, current, &keys, &shutdown).await;
        match popped {
            Ok(Some((key, payload))) => {
                let shared = shared.clone();
                let abort = abort.clone();
                if key == planner_key {
                    tasks.spawn(async move {
                        crate::planner::plan_goal(&shared, &key, &payload).await;
                        drop(slot);
                    });
                } else {
                    tasks.spawn(async move {
                        crate::executor::execute(&shared, &key, &payload, &abort).await;
                        drop(slot);
                    });
                }
            }
            Ok(None) => {}
            Err(error) => {
                warn!(%error, "redis connection lost");
                popper = None;
            }
        }
    }
}

/// One BRPOP over `keys`; if `shutdown` fires while it blocks, unblock it and
/// still take whatever it returns.
async fn pop(
    client: &redis::Client,
    popper: &mut Popper,
    keys: &[String],
    shutdown: &CancellationToken,
) -> redis::RedisResult<Option<(String, String)>> {
    let mut command = redis::cmd("BRPOP");
    command.arg(keys).arg(0);
    let connection = &mut popper.connection;
    let reply = command.query_async::<Option<(String, String)>>(connection);
    tokio::pin!(reply);
    tokio::select! {
        reply = &mut reply => return reply,
        () = shutdown.cancelled() => {}
    }
    // The UNBLOCK may overtake the BRPOP on its way to Redis: repeat until it lands.
    let mut control = client.get_multiplexed_async_connection().await?;
    loop {
        let _: i64 = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(popper.client_id)
            .query_async(&mut control)
            .await?;
        tokio::select! {
            reply = &mut reply => return reply,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

//! Pops work from Redis: the planner list first, then the queues in priority
//! order, only while a concurrency slot is free. One BLMPOP takes as many
//! messages as there are free slots, and their tasks are claimed in one
//! statement. While it blocks, those slots are lent to local continuation
//! ([`crate::slots`]); messages beyond the slots left when it returns go back
//! to the head of their list.
//!
//! The BLMPOP blocks with no timeout, so an idle worker sends nothing. At
//! shutdown a second connection unblocks it with `CLIENT UNBLOCK`, which makes
//! it return empty-handed instead of dropping popped messages on the floor.
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::slots::Slot;
use crate::worker::Shared;

/// A BLMPOP connection and its Redis client id (for `CLIENT UNBLOCK`).
struct Popper {
    connection: MultiplexedConnection,
    client_id: i64,
}

async fn connect(client: &redis::Client) -> redis::RedisResult<Popper> {
    // No response timeout: BLMPOP waits as long as there is no work.
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
    let slots = shared.slots.clone();
    let mut popper: Option<Popper> = None;
    let mut reconnect = crate::backoff::Backoff::default();
    loop {
        let free = tokio::select! {
            () = shutdown.cancelled() => break,
            free = slots.wait_for_free() => free,
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
            slot_for_connection => match tokio::select! {
                () = shutdown.cancelled() => break,
                connected = connect(&shared.redis) => connected,
            } {
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
        // Lent while the pop waits: local continuation may take some.
        let count = free.len();
        slots.lend(free);
        let popped = pop(&shared.redis, current, &keys, count, &shutdown).await;
        let free = slots.take_back();
        match popped {
            Ok(Some((list, mut payloads))) => {
                if payloads.len() > free.len() {
                    // More came than the slots left: the rest goes back to the
                    // head of its list, for whoever pops next.
                    let over = payloads.split_off(free.len());
                    if let Err(error) =
                        crate::worker::push_back(&mut current.connection, &list, &over).await
                    {
                        // The sweep dispatches them again.
                        warn!(%error, "could not hand messages back to redis");
                    }
                }
                if !payloads.is_empty() {
                    let planner = list == planner_key;
                    dispatch(&shared, tasks, &abort, planner, list, payloads, free);
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

/// Runs popped messages, each holding one of the `free` slots (the slots
/// left over go back at once).
fn dispatch(
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    abort: &CancellationToken,
    planner: bool,
    list: String,
    payloads: Vec<String>,
    mut free: Vec<Slot>,
) {
    free.truncate(payloads.len());
    if planner {
        for (payload, slot) in payloads.into_iter().zip(free) {
            let shared = shared.clone();
            let list = list.clone();
            tasks.spawn(async move {
                crate::planner::plan_goal(&shared, &list, &payload).await;
                drop(slot);
            });
        }
        return;
    }
    let shared = shared.clone();
    let abort = abort.clone();
    let runner = tasks.clone();
    tasks.spawn(async move {
        let claimed = crate::executor::claim(&shared, &list, &payloads).await;
        for (task, slot) in claimed.into_iter().zip(free) {
            crate::executor::spawn_execute(&runner, shared.clone(), task, abort.clone(), slot);
        }
    });
}

/// One BLMPOP of up to `count` messages from the first non-empty list of
/// `keys`, oldest first; if `shutdown` fires while it blocks, unblock it and
/// still take whatever it returns.
async fn pop(
    client: &redis::Client,
    popper: &mut Popper,
    keys: &[String],
    count: usize,
    shutdown: &CancellationToken,
) -> redis::RedisResult<Option<(String, Vec<String>)>> {
    let mut command = redis::cmd("BLMPOP");
    command
        .arg(0)
        .arg(keys.len())
        .arg(keys)
        .arg("RIGHT")
        .arg("COUNT")
        .arg(count);
    let connection = &mut popper.connection;
    let reply = command.query_async::<Option<(String, Vec<String>)>>(connection);
    tokio::pin!(reply);
    tokio::select! {
        reply = &mut reply => return reply,
        () = shutdown.cancelled() => {}
    }
    // The UNBLOCK may overtake the BLMPOP on its way to Redis: repeat until it lands.
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

//! Changes pushed to the browsers: one connection LISTENs to the events the
//! extension NOTIFYs (`synapse_events`), and each open page gets them as
//! server-sent events. A page only learns that a goal changed; it reads the
//! goal again with the console's role, so row security still decides.

use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::connection_error;

/// Changes a slow page may fall behind by before it is told to read everything again.
const BACKLOG: usize = 1024;

/// What a page is told: `{"goal_id": 7, "event": "task.succeeded"}`, or
/// `{"goal_id": null, "event": "resync"}` when it may have missed some.
pub type Change = String;

/// The sender side, cloned into every page's stream.
#[derive(Clone)]
pub struct Changes(broadcast::Sender<Change>);

impl Changes {
    /// A channel nobody listens to yet.
    pub fn new() -> Self {
        Self(broadcast::channel(BACKLOG).0)
    }

    /// A page's stream of changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.0.subscribe()
    }

    fn send(&self, change: Change) {
        // No page open: nobody to tell.
        let _ = self.0.send(change);
    }
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}

/// The change a NOTIFY payload (an event's JSON) tells, without its details.
pub fn change_of(payload: &str) -> Option<Change> {
    let event: Value = serde_json::from_str(payload).ok()?;
    Some(json!({"goal_id": event.get("goal_id"), "event": event.get("event")}).to_string())
}

/// The change that makes every page read everything again.
pub fn resync() -> Change {
    json!({"goal_id": null, "event": "resync"}).to_string()
}

/// LISTENs on `url` until `stop`, reconnecting with a capped backoff; each
/// reconnection tells the pages to read again (changes may have been missed).
pub async fn listen(url: String, changes: Changes, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    loop {
        let failure = tokio::select! {
            () = stop.cancelled() => return,
            failure = listen_once(&url, &changes, &mut backoff) => failure,
        };
        let pause = backoff.next_pause();
        warn!(
            error = %failure,
            database = %connection_error::mask(&url),
            retry_in_ms = pause.as_millis() as u64,
            "console: lost the connection that listens for changes"
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One connection's life: returns why it ended.
async fn listen_once(url: &str, changes: &Changes, backoff: &mut Backoff) -> String {
    let (config, tls) = match crate::worker::connection_config(url) {
        Ok(configured) => configured,
        Err(error) => return format!("{error:#}"),
    };
    let (client, mut connection) = match config.connect(tls).await {
        Ok(connected) => connected,
        Err(error) => return connection_error::describe(url, &error),
    };
    let (notes, mut received) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(note)) => {
                    if notes.send(note.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => return error.to_string(),
            }
        }
        "the server closed the connection".to_owned()
    });
    if let Err(error) = client.batch_execute("LISTEN synapse_events").await {
        driver.abort();
        return connection_error::describe(url, &error);
    }
    if backoff.is_backing_off() {
        info!("console: listening for changes again");
    }
    backoff.reset();
    changes.send(resync());
    while let Some(payload) = received.recv().await {
        if let Some(change) = change_of(&payload) {
            changes.send(change);
        }
    }
    drop(client);
    driver
        .await
        .unwrap_or_else(|error| format!("the connection's driver ended: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_keeps_only_the_goal_and_the_event() {
        assert_eq!(
            change_of(r#"{"v":1,"event":"task.succeeded","goal_id":7,"task_id":3,"step":"<b>"}"#),
            Some(r#"{"event":"task.succeeded","goal_id":7}"#.to_owned())
        );
        assert_eq!(change_of("not json"), None);
        assert_eq!(resync(), r#"{"event":"resync","goal_id":null}"#);
    }
}

//! One Redis round trip per batch of events.
use std::collections::BTreeMap;
use std::time::Duration;

/// Bound on connecting and on each round trip, so a hung Redis shows up as an
/// error in `forwarder_status()` instead of a stuck forwarder.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Approximate length the event stream is trimmed to.
const STREAM_MAXLEN: u64 = 100_000;

/// An outbox row on its way to Redis.
pub struct Event {
    /// Redis list (without prefix) that also gets the payload, if any.
    pub dispatch: Option<String>,
    /// The JSON payload.
    pub payload: String,
}

/// Where to connect: the URL, and the file with the password if there is one.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// `synapse.redis_url`.
    pub url: String,
    /// `synapse.redis_password_file`.
    pub password_file: Option<String>,
}

/// A lazily (re)connected Redis connection.
pub struct RedisSink {
    target: Target,
    connection: Option<redis::Connection>,
}

impl RedisSink {
    /// A sink for `target`; connects on first use.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            connection: None,
        }
    }

    /// Whether the sink points at `target`.
    pub fn targets(&self, target: &Target) -> bool {
        &self.target == target
    }

    /// A client for the target, with the password from the file if one is set
    /// (read at each connect, so a rotated password is picked up).
    fn client(&self) -> redis::RedisResult<redis::Client> {
        use redis::IntoConnectionInfo;
        let mut info = self.target.url.as_str().into_connection_info()?;
        if let Some(path) = &self.target.password_file {
            let password = std::fs::read_to_string(path).map_err(|error| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read synapse.redis_password_file",
                    error.to_string(),
                ))
            })?;
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.trim_end());
            info = info.set_redis_settings(settings);
        }
        redis::Client::open(info)
    }

    /// Sends the batch in one pipeline: one LPUSH per destination list, then one
    /// XADD per event. On any error the connection is dropped, so the next call
    /// reconnects.
    pub fn send(&mut self, prefix: &str, events: &[Event]) -> Result<(), String> {
        let result = self.try_send(prefix, events);
        if result.is_err() {
            self.connection = None;
        }
        result.map_err(|error| describe(&error))
    }

    fn try_send(&mut self, prefix: &str, events: &[Event]) -> redis::RedisResult<()> {
        if self.connection.is_none() {
            let connection = self.client()?.get_connection_with_timeout(IO_TIMEOUT)?;
            connection.set_read_timeout(Some(IO_TIMEOUT))?;
            connection.set_write_timeout(Some(IO_TIMEOUT))?;
            self.connection = Some(connection);
        }
        let connection = self.connection.as_mut().expect("connected above");
        let mut pipe = redis::pipe();
        // Lists keep the batch order: LPUSH a b c then BRPOP pops a first.
        let mut lists: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for event in events {
            if let Some(list) = &event.dispatch {
                lists.entry(list).or_default().push(&event.payload);
            }
        }
        for (list, payloads) in &lists {
            pipe.cmd("LPUSH")
                .arg(format!("{prefix}:{list}"))
                .arg(payloads)
                .ignore();
        }
        let stream = format!("{prefix}:events");
        for event in events {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAXLEN)
                .arg("*")
                .arg("payload")
                .arg(&event.payload)
                .ignore();
        }
        pipe.query::<()>(connection)
    }
}

/// A Redis error as users should see it: what failed, never the URL (it may
/// carry a password).
fn describe(error: &redis::RedisError) -> String {
    let text = error.to_string();
    if text.contains("://") {
        format!("redis error ({:?})", error.kind())
    } else {
        format!("redis: {text}")
    }
}

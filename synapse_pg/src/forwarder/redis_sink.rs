//! One Redis round trip per batch of events.
use std::collections::BTreeMap;
use std::time::Duration;

use crate::events::payloads_of_row;

/// Bound on connecting and on each round trip, so a hung Redis shows up as an
/// error in `forwarder_status()` instead of a stuck forwarder.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Approximate length the event stream is trimmed to.
const STREAM_MAXLEN: u64 = 100_000;

/// An outbox row on its way to Redis.
pub struct Event {
    /// Redis list (without prefix) that also gets the payload, if any.
    pub dispatch: Option<String>,
    /// The JSON payload: for a row of several events, theirs one a line.
    pub payload: String,
    /// Already in the event stream (an earlier round trip added it).
    pub streamed: bool,
}

impl Event {
    /// How many events the row carries.
    pub fn events(&self) -> u64 {
        payloads_of_row(&self.payload).count() as u64
    }
}

/// What Redis did with one event of a batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Its list got the payload (or it has none).
    pub dispatched: bool,
    /// The stream has it.
    pub streamed: bool,
    /// Why a part was refused.
    pub error: Option<String>,
}

impl Delivery {
    /// Nothing more is owed for this event.
    pub fn complete(&self) -> bool {
        self.dispatched && self.streamed
    }
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
    /// XADD per event, each command answered on its own. `Err` when Redis
    /// acknowledged nothing (unreachable, out of memory, ...): the connection is
    /// dropped, so the next call reconnects. Otherwise, what happened to each
    /// event: a command Redis refuses for some events (a key of the wrong type)
    /// never holds back the others.
    pub fn send(&mut self, prefix: &str, events: &[Event]) -> Result<Vec<Delivery>, String> {
        let _held = SignalsHeld::new();
        let result = self.try_send(prefix, events);
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    fn try_send(&mut self, prefix: &str, events: &[Event]) -> Result<Vec<Delivery>, String> {
        if self.connection.is_none() {
            let connect = || -> redis::RedisResult<redis::Connection> {
                let connection = self.client()?.get_connection_with_timeout(IO_TIMEOUT)?;
                connection.set_read_timeout(Some(IO_TIMEOUT))?;
                connection.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(connection)
            };
            self.connection = Some(connect().map_err(|error| describe(&error))?);
        }
        let connection = self.connection.as_mut().expect("connected above");
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Lists keep the batch order: LPUSH a b c then BRPOP pops a first.
        let mut lists: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, event) in events.iter().enumerate() {
            if let Some(list) = &event.dispatch {
                lists.entry(list).or_default().push(index);
            }
        }
        for (list, members) in &lists {
            // A row of several events pushes each as its own message.
            let payloads: Vec<&str> = members
                .iter()
                .flat_map(|&i| payloads_of_row(&events[i].payload))
                .collect();
            pipe.cmd("LPUSH")
                .arg(format!("{prefix}:{list}"))
                .arg(payloads);
        }
        let stream = format!("{prefix}:events");
        // The event each XADD is for: a row of several events has one each.
        let mut stream_commands: Vec<usize> = Vec::new();
        for (index, event) in events.iter().enumerate().filter(|(_, e)| !e.streamed) {
            for payload in payloads_of_row(&event.payload) {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAXLEN)
                    .arg("*")
                    .arg("payload")
                    .arg(payload);
                stream_commands.push(index);
            }
        }
        let replies: Vec<redis::RedisResult<redis::Value>> =
            pipe.query(connection).map_err(|error| describe(&error))?;
        if replies.len() != lists.len() + stream_commands.len() {
            return Err(format!(
                "redis answered {} of {} commands",
                replies.len(),
                lists.len() + stream_commands.len()
            ));
        }
        // A refusal that concerns the server, not a key, refuses everything:
        // report it as a failed round trip (and keep every event).
        if let Some(error) = replies
            .iter()
            .filter_map(|reply| reply.as_ref().err())
            .find(|error| !concerns_a_key(error))
        {
            return Err(describe(error));
        }
        let mut deliveries: Vec<Delivery> = events
            .iter()
            .map(|event| Delivery {
                dispatched: event.dispatch.is_none(),
                streamed: event.streamed,
                error: None,
            })
            .collect();
        let (list_replies, stream_replies) = replies.split_at(lists.len());
        for ((_, members), reply) in lists.iter().zip(list_replies) {
            for &index in members {
                match reply {
                    Ok(_) => deliveries[index].dispatched = true,
                    Err(error) => deliveries[index].error = Some(describe(error)),
                }
            }
        }
        // Streamed once every XADD of the row went in.
        for &index in &stream_commands {
            deliveries[index].streamed = true;
        }
        for (&index, reply) in stream_commands.iter().zip(stream_replies) {
            if let Err(error) = reply {
                deliveries[index].streamed = false;
                deliveries[index].error = Some(describe(error));
            }
        }
        Ok(deliveries)
    }
}

impl RedisSink {
    /// Which of `lists` (without prefix) hold no message, in one round trip.
    pub fn empty_lists(&mut self, prefix: &str, lists: &[String]) -> Result<Vec<bool>, String> {
        let _held = SignalsHeld::new();
        let Some(connection) = self.connection.as_mut() else {
            return Err("redis: not connected".to_owned());
        };
        let mut pipe = redis::pipe();
        for list in lists {
            pipe.cmd("LLEN").arg(format!("{prefix}:{list}"));
        }
        let lengths: Vec<i64> = match pipe.query(connection) {
            Ok(lengths) => lengths,
            Err(error) => {
                self.connection = None;
                return Err(describe(&error));
            }
        };
        Ok(lengths.into_iter().map(|length| length == 0).collect())
    }
}

/// Holds off the signals Postgres sends a backend in the ordinary course
/// (SIGHUP: a configuration reload; SIGUSR1: procsignals such as cache
/// catch-up; SIGINT: a cancel) while a Redis round trip is under way: a
/// socket with a timeout is not restarted after a signal handler ran, so a
/// reload failed the round trip with EINTR, often after Redis had taken the
/// batch, which then went out twice. Held, they are handled when the round
/// trip is over. SIGTERM and SIGQUIT are not held.
struct SignalsHeld(libc::sigset_t);

impl SignalsHeld {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data that sigemptyset initialises; the
        // forwarder is one thread, so its mask is the process's.
        unsafe {
            let mut held: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut held);
            for signal in [libc::SIGHUP, libc::SIGUSR1, libc::SIGINT] {
                libc::sigaddset(&mut held, signal);
            }
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_BLOCK, &held, &mut previous);
            SignalsHeld(previous)
        }
    }
}

impl Drop for SignalsHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask `new` found.
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}

/// Whether a refused command failed because of its key (e.g. WRONGTYPE), so
/// that other keys are fine, rather than because of the server's state
/// (out of memory, loading, read-only replica, not authenticated, ...).
fn concerns_a_key(error: &redis::RedisError) -> bool {
    match error.code() {
        Some(code) => !matches!(
            code,
            "OOM"
                | "NOAUTH"
                | "LOADING"
                | "READONLY"
                | "MASTERDOWN"
                | "BUSY"
                | "CLUSTERDOWN"
                | "TRYAGAIN"
                | "MISCONF"
                | "NOREPLICAS"
                | "EXECABORT"
        ),
        None => false,
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

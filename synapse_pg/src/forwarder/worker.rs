//! The forwarder's main loop.
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::redis_sink::{Event, RedisSink, Target};
use super::{update_state, LATCH_OWNER};
use crate::gucs;

/// Events per transaction and per Redis round trip.
const BATCH_SIZE: i64 = 5000;
/// First and longest pause after a Redis failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Entry point of the `synapse forwarder` background worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn synapse_forwarder_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: MyProc is this process's PGPROC, valid for its lifetime.
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    LATCH_OWNER.get().store(procno, Ordering::Release);
    log!("synapse forwarder started for database \"{database}\"");

    let mut forwarder = Forwarder::new();
    // Run once at start: events committed while no forwarder ran wait in the outbox.
    let mut timeout = Some(Duration::ZERO);
    // ShutdownRequestPending, set by the SIGTERM handler, is checked too: it is
    // never cleared, so no code path can swallow the request to stop.
    while !shutdown_requested() && BackgroundWorker::wait_latch(timeout) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: called from the main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // synapse.sweep_interval may have changed: recompute the deadlines.
            forwarder.timer_needed(Duration::ZERO);
        }
        timeout = forwarder.run();
    }
    LATCH_OWNER.get().store(-1, Ordering::Release);
    log!("synapse forwarder stopped");
}

fn target() -> Target {
    Target {
        url: gucs::redis_url(),
        password_file: gucs::redis_password_file(),
    }
}

fn shutdown_requested() -> bool {
    // SAFETY: a plain flag written by the signal handler.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

struct Forwarder {
    sink: RedisSink,
    installed: bool,
    /// While Redis is failing: when to try again, and the pause after that.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// When the timers must run next (None: nothing is scheduled). Every new
    /// deadline arrives with an event, so between deadlines no timer runs.
    timers_due: Option<Instant>,
}

enum Drain {
    /// Everything committed so far is in Redis.
    Done,
    /// A full batch went out; there may be more.
    More,
    /// Redis refused; the batch stays in the outbox.
    Failed(String),
}

impl Forwarder {
    fn new() -> Self {
        Self {
            sink: RedisSink::new(target()),
            installed: false,
            retry_at: None,
            backoff: BACKOFF_MIN,
            // At start: whatever was due while no forwarder ran.
            timers_due: Some(Instant::now()),
        }
    }

    /// An event brought a deadline `due_in` from now.
    fn timer_needed(&mut self, due_in: Duration) {
        let due = Instant::now() + due_in;
        self.timers_due = Some(self.timers_due.map_or(due, |current| current.min(due)));
    }

    /// Runs the timers if they are due; returns how long until they are next.
    fn run_timers_if_due(&mut self) -> Option<Duration> {
        let due = self.timers_due?;
        let now = Instant::now();
        if now < due {
            return Some(due - now);
        }
        let next = run_timers();
        self.timers_due = next.map(|next| Instant::now() + next);
        next
    }

    /// One wake-up: drain, then timers. Returns how long to sleep at most.
    fn run(&mut self) -> Option<Duration> {
        let target = target();
        if !self.sink.targets(&target) {
            self.sink = RedisSink::new(target);
            self.retry_at = None;
        }
        if let Some(retry_at) = self.retry_at {
            let now = Instant::now();
            if now < retry_at {
                // Commits keep waking us while Redis is down; keep the pace.
                return Some(retry_at - now);
            }
        }
        if !self.installed {
            self.installed = BackgroundWorker::transaction(|| {
                Spi::get_one::<bool>(
                    "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'synapse')",
                )
                .ok()
                .flatten()
                .unwrap_or(false)
            });
            if !self.installed {
                // CREATE EXTENSION wakes us when it is done.
                return None;
            }
        }
        let drained = loop {
            match self.drain_batch() {
                Drain::More => continue,
                done_or_failed => break done_or_failed,
            }
        };
        // After the drain, so that timers never delay a commit's events. The
        // events the timers write wake this loop again through the latch.
        let next_due = self.run_timers_if_due();
        match drained {
            Drain::Failed(error) => {
                if self.retry_at.is_none() {
                    warning!("synapse forwarder: {error}; events wait in synapse.outbox");
                }
                update_state(|state| {
                    state.redis_connected = false;
                    state.set_last_error(Some(&error));
                });
                let pause = self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.retry_at = Some(Instant::now() + pause);
                Some(next_due.map_or(pause, |due| due.min(pause)))
            }
            Drain::Done | Drain::More => {
                if self.retry_at.take().is_some() {
                    log!("synapse forwarder: redis reachable again");
                }
                self.backoff = BACKOFF_MIN;
                next_due
            }
        }
    }

    /// Forwards the oldest committed batch and deletes it once Redis
    /// acknowledged; notes the deadlines its events bring.
    fn drain_batch(&mut self) -> Drain {
        let sink = std::panic::AssertUnwindSafe(&mut self.sink);
        let (drain, due_in) = BackgroundWorker::transaction(move || {
            let sink = sink;
            // Losing this commit in a crash only re-sends the batch (delivery is
            // at-least-once), so it need not wait for its WAL flush.
            Spi::run("SET LOCAL synchronous_commit = off").expect("setting synchronous_commit");
            let batch = read_batch();
            if batch.ids.is_empty() {
                return (Drain::Done, None);
            }
            if let Err(error) = sink.0.send(&gucs::key_prefix(), &batch.events) {
                return (Drain::Failed(error), batch.due_in);
            }
            Spi::run_with_args(
                "DELETE FROM synapse.outbox WHERE id = ANY($1)",
                &[batch.ids.clone().into()],
            )
            .expect("deleting forwarded outbox rows");
            let now = unsafe { pg_sys::GetCurrentTimestamp() };
            update_state(|state| {
                state.redis_connected = true;
                state.forwarded_total += batch.ids.len() as u64;
                state.last_forward_at = now;
                state.set_last_error(None);
            });
            let drain = if batch.ids.len() as i64 == BATCH_SIZE {
                Drain::More
            } else {
                Drain::Done
            };
            (drain, batch.due_in)
        });
        if let Some(due_in) = due_in {
            self.timer_needed(due_in);
        }
        drain
    }
}

/// The oldest committed events.
struct Batch {
    ids: Vec<i64>,
    events: Vec<Event>,
    /// The earliest deadline the events bring, from now.
    due_in: Option<Duration>,
}

fn read_batch() -> Batch {
    let sweep = gucs::sweep_interval();
    Spi::connect(|client| {
        let rows = client
            .select(
                "SELECT id, dispatch, payload, extract(epoch FROM due_at - clock_timestamp())::float8
                   FROM synapse.outbox ORDER BY id LIMIT $1",
                None,
                &[BATCH_SIZE.into()],
            )
            .expect("reading synapse.outbox");
        let mut batch = Batch {
            ids: Vec::with_capacity(rows.len()),
            events: Vec::with_capacity(rows.len()),
            due_in: None,
        };
        for row in rows {
            let dispatch = row.get::<String>(2).ok().flatten();
            let due_in = match row.get::<f64>(4).ok().flatten() {
                Some(seconds) => Some(Duration::from_secs_f64(seconds.max(0.0))),
                // Dispatched work is due for the sweep if nobody claims it.
                None => dispatch.is_some().then_some(sweep),
            };
            if let Some(due_in) = due_in {
                batch.due_in = Some(batch.due_in.map_or(due_in, |earliest| earliest.min(due_in)));
            }
            batch
                .ids
                .push(row.get::<i64>(1).ok().flatten().unwrap_or_default());
            batch.events.push(Event {
                dispatch,
                payload: row.get::<String>(3).ok().flatten().unwrap_or_default(),
            });
        }
        batch
    })
}

/// Queues due retries, re-queues expired leases, re-dispatches stale queued
/// work; returns the time until the next of those deadlines, if any.
fn run_timers() -> Option<Duration> {
    let sweep_seconds = gucs::sweep_interval().as_secs() as i32;
    let millis = BackgroundWorker::transaction(move || {
        Spi::get_one_with_args::<f64>("SELECT synapse._run_timers($1)", &[sweep_seconds.into()])
            .expect("running synapse timers")
    })?;
    Some(Duration::from_secs_f64((millis / 1000.0).max(0.0)))
}

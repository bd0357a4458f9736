//! The forwarder's main loop.
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::floor::ReadFloor;
use super::notify;
use super::redis_sink::{Delivery, Event, RedisSink, Target};
use super::transaction;
use super::{
    set_timers_next, soon_requested, take_announced_deadline, take_soon_request, take_wake_request,
    update_state, LATCH_OWNER, OBSERVED_WITHIN,
};
use crate::gucs;
use crate::prepared::{oid, prepared};

/// Events per transaction and per Redis round trip.
const BATCH_SIZE: i64 = 5000;
/// Rows a timer statement changes at most per turn (the rest at the next).
const TIMER_BATCH: i32 = 1000;
/// First and longest pause after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Refusals after which Redis is taken at its word and an event is set aside.
const MAX_EVENT_FAILURES: i32 = 5;

/// Entry point of the `synapse forwarder` background worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn synapse_forwarder_main(_arg: pg_sys::Datum) {
    // Postgres's own handlers: they only set a flag and the latch (reloading
    // the configuration inside a signal handler would not be safe).
    // SAFETY: installing handlers before signals are unblocked.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGHUP as i32, Some(SignalHandlerForConfigReload));
        pg_sys::pqsignal(
            pg_sys::SIGTERM as i32,
            Some(SignalHandlerForShutdownRequest),
        );
        pg_sys::BackgroundWorkerUnblockSignals();
    }
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: MyProc is this process's PGPROC, valid for its lifetime.
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    LATCH_OWNER.get().store(procno, Ordering::Release);
    log!("synapse forwarder started for database \"{database}\"");

    let mut forwarder = Forwarder::new();
    // Run once at start: events committed while no forwarder ran wait in the outbox.
    let mut next_turn = Some(Instant::now());
    // The turn owed to commits whose events dispatch nothing (`wake_soon`).
    let mut observed_turn = None;
    while !shutdown_requested()
        && BackgroundWorker::wait_latch(latch_timeout(
            earliest(next_turn, observed_turn)
                .map(|at| at.saturating_duration_since(Instant::now())),
        ))
    {
        if shutdown_requested() {
            break;
        }
        let reloaded = take_reload_request();
        if reloaded {
            // SAFETY: called from the main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            // synapse.sweep_interval or retention may have changed: look again.
            forwarder.timers_due = Some(Instant::now());
            forwarder.sweep_due = Some(Instant::now());
        }
        // Taken after the latch was reset: a wake-up after this sets it again.
        let woken = take_wake_request();
        let now = Instant::now();
        observed_turn = observed_turn_at(observed_turn, soon_requested(), now);
        if !turn_is_due(woken || reloaded, earliest(next_turn, observed_turn), now) {
            // Postgres set the latch for a reason of its own, or the commits
            // waiting may wait a little longer: nothing is owed yet.
            continue;
        }
        // Before the turn reads the outbox: a commit after this asks again.
        take_soon_request();
        observed_turn = None;
        next_turn = forwarder.run().map(|sleep| Instant::now() + sleep);
    }
    LATCH_OWNER.get().store(-1, Ordering::Release);
    log!("synapse forwarder stopped");
    // A non-zero exit has the postmaster start it again after its restart
    // time (pg_terminate_backend is not a way to turn forwarding off for
    // good); at a server shutdown nothing is restarted anyway.
    unsafe { pg_sys::proc_exit(1) };
}

// The C handlers themselves (pgrx's bindings wrap them for calls from Rust).
unsafe extern "C-unwind" {
    fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
    fn SignalHandlerForShutdownRequest(signal: std::ffi::c_int);
}

fn target() -> Target {
    Target {
        url: gucs::redis_url(),
        password_file: gucs::redis_password_file(),
    }
}

fn shutdown_requested() -> bool {
    // SAFETY: a flag written by the SIGTERM handler, read in the main loop.
    unsafe { std::ptr::read_volatile(&raw const pg_sys::ShutdownRequestPending) != 0 }
}

fn take_reload_request() -> bool {
    // SAFETY: a flag written by the SIGHUP handler, cleared in the main loop.
    unsafe {
        let pending = std::ptr::read_volatile(&raw const pg_sys::ConfigReloadPending) != 0;
        if pending {
            std::ptr::write_volatile(&raw mut pg_sys::ConfigReloadPending, 0);
        }
        pending
    }
}

/// Why a turn of the loop stopped early.
enum Failure {
    /// Redis acknowledged nothing.
    Redis(String),
    /// Postgres refused a statement (the transaction was rolled back).
    Sql(String),
}

impl From<String> for Failure {
    fn from(error: String) -> Self {
        Failure::Sql(error)
    }
}

impl From<pgrx::spi::Error> for Failure {
    fn from(error: pgrx::spi::Error) -> Self {
        Failure::Sql(error.to_string())
    }
}

struct Forwarder {
    sink: RedisSink,
    installed: bool,
    /// Where reads of the outbox start, and which outbox that is.
    floor: ReadFloor,
    outbox: pg_sys::Oid,
    /// Where the NOTIFY passes run while Redis is down start (at the drain's
    /// floor when that is higher), and whether Redis is what fails now.
    notify_floor: ReadFloor,
    redis_failing: bool,
    /// The last error of a NOTIFY pass that was logged.
    logged_notify_error: Option<String>,
    /// After a failure: when to try again, the pause after that, and the
    /// error last logged (each new error is logged once).
    retry_at: Option<Instant>,
    backoff: Duration,
    logged_error: Option<String>,
    /// When the timers must run next (None: nothing is scheduled). Every new
    /// deadline arrives with an event, so between deadlines no timer runs.
    timers_due: Option<Instant>,
    /// When the sweep must look next.
    sweep_due: Option<Instant>,
    /// When events Redis refused may be sent again.
    redrain_due: Option<Instant>,
}

enum Drain {
    /// Everything committed so far is in Redis (or waits for a retry).
    Done,
    /// A full batch went out; there may be more.
    More,
}

/// When the commits whose events only observers read get their turn: a
/// first one waiting sets it [`OBSERVED_WITHIN`] from `now`; the ones after
/// it keep that turn.
fn observed_turn_at(scheduled: Option<Instant>, waiting: bool, now: Instant) -> Option<Instant> {
    scheduled.or(waiting.then(|| now + OBSERVED_WITHIN))
}

/// Whether a turn runs now: asked for at once (a commit whose events dispatch
/// work, a reload), or its time came.
fn turn_is_due(asked_now: bool, scheduled: Option<Instant>, now: Instant) -> bool {
    asked_now || scheduled.is_some_and(|at| at <= now)
}

/// The earlier of two optional deadlines (or durations).
fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When to look for refused events next: a deadline this drain looked at
/// (`looked`: it read when the next retries are due) is replaced by what it
/// found; one it did not look at stays, even if it passed meanwhile, or those
/// retries would wait for an unrelated wake-up.
fn next_redrain(
    previous: Option<Instant>,
    looked: bool,
    found: Option<Instant>,
) -> Option<Instant> {
    earliest(previous.filter(|_| !looked), found)
}

/// A latch wait of `sleep`, rounded up to whole milliseconds: the wait counts
/// in them, and waking a fraction early would find the deadline not yet due.
fn latch_timeout(sleep: Option<Duration>) -> Option<Duration> {
    sleep.map(|sleep| Duration::from_millis(sleep.as_nanos().div_ceil(1_000_000) as u64))
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.clamp(0.0, 86_400.0 * 365.0))
}

impl Forwarder {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            sink: RedisSink::new(target()),
            installed: false,
            floor: ReadFloor::default(),
            outbox: pg_sys::Oid::INVALID,
            notify_floor: ReadFloor::default(),
            redis_failing: false,
            logged_notify_error: None,
            retry_at: None,
            backoff: BACKOFF_MIN,
            logged_error: None,
            // At start: whatever fell due while no forwarder ran.
            timers_due: Some(now),
            sweep_due: Some(now),
            redrain_due: None,
        }
    }

    /// One wake-up: drain, then timers and sweep. Returns how long to sleep at
    /// most, having told writers when the timers run next.
    fn run(&mut self) -> Option<Duration> {
        self.take_announced_deadline();
        let sleep = self.work();
        let now = Instant::now();
        // SAFETY: reads the clock; no error path.
        let clock = unsafe { pg_sys::GetCurrentTimestamp() };
        set_timers_next(self.timers_due.map(|due| {
            let micros = due.saturating_duration_since(now).as_micros();
            clock.saturating_add(i64::try_from(micros).unwrap_or(i64::MAX))
        }));
        // A deadline announced before that was published did not wake us. (What
        // was published may now be later than the timers' next run: writers
        // then wake us more often than needed, never less.)
        if self.take_announced_deadline() {
            let until_due = self
                .timers_due
                .map(|due| due.saturating_duration_since(now));
            return earliest(sleep, until_due);
        }
        sleep
    }

    /// Merges a deadline a committed writer announced (see
    /// `announce_deadline`) into the timers' next run; whether there was one.
    fn take_announced_deadline(&mut self) -> bool {
        let Some(at) = take_announced_deadline() else {
            return false;
        };
        // SAFETY: reads the clock; no error path.
        let clock = unsafe { pg_sys::GetCurrentTimestamp() };
        let due = Instant::now() + seconds(at.saturating_sub(clock) as f64 / 1e6);
        self.timers_due = earliest(self.timers_due, Some(due));
        true
    }

    /// The turn itself; returns how long to sleep at most.
    fn work(&mut self) -> Option<Duration> {
        let target = target();
        if !self.sink.targets(&target) {
            self.sink = RedisSink::new(target);
            self.retry_at = None;
        }
        let now = Instant::now();
        if let Some(retry_at) = self.retry_at {
            if now < retry_at {
                // Commits keep waking us while something fails; keep the pace
                // (but listeners hear of what they committed).
                if self.redis_failing {
                    self.notify_waiting();
                }
                return Some(retry_at - now);
            }
        }
        match self.turn() {
            Ok(()) => {
                if self.retry_at.take().is_some() {
                    log!("synapse forwarder: working again");
                }
                self.redis_failing = false;
                self.backoff = BACKOFF_MIN;
                self.logged_error = None;
                let now = Instant::now();
                earliest(earliest(self.timers_due, self.sweep_due), self.redrain_due)
                    .map(|due| due.saturating_duration_since(now))
            }
            Err(failure) => {
                let (error, redis) = match failure {
                    Failure::Redis(error) => (error, true),
                    Failure::Sql(error) => {
                        // Maybe the extension was dropped: check again next time.
                        self.installed = false;
                        (error, false)
                    }
                };
                if self.logged_error.as_ref() != Some(&error) {
                    let waiting = if redis {
                        "events wait in synapse.outbox"
                    } else {
                        "retrying"
                    };
                    warning!("synapse forwarder: {error}; {waiting}");
                    self.logged_error = Some(error.clone());
                }
                update_state(|state| {
                    if redis {
                        state.redis_connected = false;
                    }
                    state.set_last_error(Some(&error));
                });
                self.redis_failing = redis;
                if redis {
                    self.notify_waiting();
                }
                let pause = self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                self.retry_at = Some(Instant::now() + pause);
                Some(pause)
            }
        }
    }

    fn turn(&mut self) -> Result<(), Failure> {
        if !self.installed {
            self.installed = transaction::run(|| {
                Spi::get_one::<bool>(
                    "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'synapse')",
                )
                .map(|installed| installed.unwrap_or(false))
                .map_err(Failure::from)
            })?;
            // The outbox may be a new one: read it from its start.
            self.floor.reset();
            self.notify_floor.reset();
            if !self.installed {
                // CREATE EXTENSION wakes us when it is done.
                self.timers_due = None;
                self.sweep_due = None;
                return Ok(());
            }
            self.timers_due = Some(Instant::now());
            self.sweep_due = Some(Instant::now());
        }
        let drained = loop {
            match self.drain_batch() {
                Ok(Drain::More) if !shutdown_requested() => continue,
                Ok(_) => break Ok(()),
                Err(failure) => break Err(failure),
            }
        };
        // After the drain, so that timers never delay a commit's events; and
        // even when Redis is down, so that retries and leases keep their
        // deadlines. The events the timers write wake this loop again.
        self.run_timers_if_due()?;
        drained?;
        self.sweep_if_due()
    }

    /// Forwards the oldest committed batch and deletes what Redis
    /// acknowledged; notes the deadlines its events bring.
    fn drain_batch(&mut self) -> Result<Drain, Failure> {
        let sink = std::panic::AssertUnwindSafe(&mut self.sink);
        let sweep = gucs::sweep_interval();
        let retention = gucs::retention_seconds();
        // Woken for refused events whose pause is over: learn when the next are due.
        let look_for_retries = self.redrain_due.is_some_and(|due| due <= Instant::now());
        let floor = self.floor.floor();
        let (drain, mut batch, refused, recorded_batch) = transaction::run(move || {
            let sink = sink;
            // Losing this commit in a crash only re-sends the batch (delivery is
            // at-least-once), so it need not wait for its WAL flush.
            transaction::set_local(c"synchronous_commit", c"off");
            // The outbox is a queue: its statistics are stale the moment they
            // are taken (empty at one ANALYZE, 100 000 rows a second later), and
            // the dead rows of forwarded events pile up between vacuums. A
            // plan that scans the table instead of walking the id index reads
            // all of them at every wake-up; every statement here goes by id.
            transaction::set_local(c"enable_seqscan", c"off");
            // The read comes first: this transaction gets its id only after
            // the read's snapshot, as the read floor requires.
            let mut batch = read_batch(floor, sweep, retention)?;
            let mut refused = None;
            if look_for_retries && (batch.ids.len() as i64) < BATCH_SIZE {
                let (next, lowest) = Spi::get_two::<f64, i64>(
                    "SELECT extract(epoch FROM min(retry_at) - clock_timestamp())::float8, min(id)
                       FROM synapse.outbox WHERE retry_at IS NOT NULL",
                )?;
                batch.due.redrain = next.map(seconds);
                refused = Some(lowest);
            }
            if batch.ids.is_empty() {
                return Ok::<_, Failure>((Drain::Done, batch, refused, None));
            }
            let deliveries = sink
                .0
                .send(&gucs::key_prefix(), &batch.events)
                .map_err(Failure::Redis)?;
            let recorded = record_deliveries(&batch.ids, &deliveries)?;
            // Every event of the batch was deleted, set aside or marked for a
            // retry (its NOTIFY mark cleared) by now.
            notify::send(std::mem::take(&mut batch.notify))?;
            batch.due.redrain = earliest(batch.due.redrain, recorded.retry);
            let acknowledged: u64 = batch
                .events
                .iter()
                .zip(&deliveries)
                .filter(|(_, delivery)| delivery.complete())
                .map(|(event, _)| event.events())
                .sum();
            let now = unsafe { pg_sys::GetCurrentTimestamp() };
            update_state(|state| {
                state.redis_connected = true;
                state.forwarded_total += acknowledged;
                state.last_forward_at = now;
                if deliveries.iter().all(|delivery| delivery.error.is_none()) {
                    state.set_last_error(None);
                } else if let Some(error) = deliveries.iter().find_map(|d| d.error.as_deref()) {
                    state.set_last_error(Some(error));
                }
            });
            let drain = if batch.ids.len() as i64 == BATCH_SIZE {
                Drain::More
            } else {
                Drain::Done
            };
            Ok((drain, batch, refused, Some(recorded)))
        })?;
        // Another outbox (the extension was dropped and created again): its
        // ids start anew, so read it from its start, now.
        let new_outbox = batch.outbox != self.outbox;
        self.outbox = batch.outbox;
        let reread = new_outbox && self.floor.floor() > 0;
        if reread {
            self.floor.reset();
            self.notify_floor.reset();
        }
        // Committed: the floor may rise (see floor.rs).
        if let Some(lowest) = refused {
            self.floor.refused_now(lowest);
        }
        let xid = recorded_batch.as_ref().map(|recorded| recorded.xid);
        if let Some(lowest) = recorded_batch.and_then(|recorded| recorded.lowest_refused) {
            self.floor.refused(lowest);
        }
        if matches!(drain, Drain::Done) && !reread {
            self.floor.read_everything(batch.snapshot_xmin);
        }
        if let (Some(xid), Some(&max), false) = (xid, batch.ids.last(), reread) {
            self.floor.forwarded(max, xid);
        }
        let due = std::mem::take(&mut batch.due);
        let now = Instant::now();
        self.timers_due = earliest(self.timers_due, due.timers.map(|d| now + d));
        self.sweep_due = earliest(self.sweep_due, due.sweep.map(|d| now + d));
        self.redrain_due = next_redrain(
            self.redrain_due,
            refused.is_some(),
            due.redrain.map(|d| now + d),
        );
        Ok(if reread { Drain::More } else { drain })
    }

    /// While Redis is down no drain deletes events, and so none sends their
    /// NOTIFYs: passes of their own do, from the floors up.
    fn notify_waiting(&mut self) {
        loop {
            let floor = self.floor.floor().max(self.notify_floor.floor());
            let pass = transaction::run(|| {
                // Losing this commit in a crash only NOTIFYs them again.
                transaction::set_local(c"synchronous_commit", c"off");
                transaction::set_local(c"enable_seqscan", c"off");
                notify::notify_waiting(floor, BATCH_SIZE)
            });
            match pass {
                Ok(pass) => {
                    self.logged_notify_error = None;
                    if let Some((max, xid)) = pass.sent {
                        self.notify_floor.forwarded(max, xid);
                    }
                    if pass.complete || shutdown_requested() {
                        self.notify_floor.read_everything(pass.snapshot_xmin);
                        return;
                    }
                }
                Err(error) => {
                    if self.logged_notify_error.as_ref() != Some(&error) {
                        warning!("synapse forwarder: NOTIFY while Redis is down: {error}");
                        self.logged_notify_error = Some(error);
                    }
                    return;
                }
            }
        }
    }

    /// Runs the timers if they are due.
    fn run_timers_if_due(&mut self) -> Result<(), Failure> {
        match self.timers_due {
            Some(due) if due <= Instant::now() => {}
            _ => return Ok(()),
        }
        let retention = gucs::retention_seconds();
        let (changed, next_in) = transaction::run(move || {
            let row = Spi::get_two_with_args::<i64, f64>(
                "SELECT changed, extract(epoch FROM next_due - clock_timestamp())::float8
                   FROM synapse._run_timers($1, $2)",
                &[retention.into(), TIMER_BATCH.into()],
            )?;
            Ok::<_, Failure>(row)
        })?;
        let now = Instant::now();
        self.timers_due = if changed.unwrap_or(0) >= i64::from(TIMER_BATCH) {
            // A batch was full: more is due now.
            Some(now)
        } else {
            next_in.map(|seconds_left| now + seconds(seconds_left))
        };
        Ok(())
    }

    /// Re-dispatches work whose Redis message was lost: only right after a
    /// complete drain (nothing owed by the outbox), and only for lists Redis
    /// says are empty (a message that still waits is not lost).
    fn sweep_if_due(&mut self) -> Result<(), Failure> {
        match self.sweep_due {
            Some(due) if due <= Instant::now() => {}
            _ => return Ok(()),
        }
        if self.redrain_due.is_some() {
            // Some events wait for a retry: their dispatch is still owed.
            self.sweep_due = self.redrain_due;
            return Ok(());
        }
        let sweep = gucs::sweep_interval();
        let sweep_seconds = sweep.as_secs() as i32;
        let candidates = transaction::run(move || {
            let mut lists = Vec::new();
            Spi::connect(|client| {
                for row in client.select(
                    "SELECT list FROM synapse._sweep_candidates($1)",
                    None,
                    &[sweep_seconds.into()],
                )? {
                    if let Some(list) = row.get::<String>(1)? {
                        lists.push(list);
                    }
                }
                Ok::<_, pgrx::spi::Error>(())
            })?;
            Ok::<_, Failure>(lists)
        })?;
        let mut swept = 0;
        if !candidates.is_empty() {
            let empty = self
                .sink
                .empty_lists(&gucs::key_prefix(), &candidates)
                .map_err(Failure::Redis)?;
            let lists: Vec<String> = candidates
                .iter()
                .zip(empty)
                .filter(|(_, empty)| *empty)
                .map(|(list, _)| list.clone())
                .collect();
            if !lists.is_empty() {
                swept = transaction::run(move || {
                    Ok::<_, Failure>(
                        Spi::get_one_with_args::<i64>(
                            "SELECT synapse._sweep($1, $2)",
                            &[lists.into(), sweep_seconds.into()],
                        )?
                        .unwrap_or(0),
                    )
                })?;
            }
        }
        if swept > 0 {
            log!(
                "synapse forwarder: dispatched {swept} unclaimed messages again (lost from Redis)"
            );
        }
        let next_in = transaction::run(move || {
            Ok::<_, Failure>(Spi::get_one_with_args::<f64>(
                "SELECT extract(epoch FROM synapse._sweep_due($1) - clock_timestamp())::float8",
                &[sweep_seconds.into()],
            )?)
        })?;
        let now = Instant::now();
        self.sweep_due = next_in.map(|seconds_left| {
            let due = now + seconds(seconds_left);
            if candidates.is_empty() {
                due
            } else {
                // Work still waiting in a list nobody pops: look again in an
                // interval, not at once.
                due.max(now + sweep)
            }
        });
        Ok(())
    }
}

/// Deadlines events bring, from now.
#[derive(Default)]
struct Due {
    /// A retry's run_at, a lease expiry, a finished goal's end of retention.
    timers: Option<Duration>,
    /// Dispatched work: the sweep looks after it if nobody claims it.
    sweep: Option<Duration>,
    /// Events Redis refused, when they may be sent again.
    redrain: Option<Duration>,
}

/// The oldest committed events above the floor.
struct Batch {
    ids: Vec<i64>,
    events: Vec<Event>,
    /// The payloads of the events that owe a NOTIFY, in order.
    notify: Vec<String>,
    due: Due,
    /// The xmin of the read's snapshot.
    snapshot_xmin: u64,
    /// The outbox table read (a recreated extension has a new one).
    outbox: pg_sys::Oid,
}

/// A `task.queued` event whose task is no longer queued dispatches nothing
/// (it still reaches the stream): its message would only cost a claim that
/// finds nothing (a task cancelled before its event went out, or claimed by
/// local continuation in the transaction that queued it). A row of several
/// events (no `task_id`) is dispatched whole: a message too many costs no
/// more than that claim.
fn read_batch(floor: i64, sweep: Duration, retention_seconds: i32) -> Result<Batch, Failure> {
    Spi::connect(|client| {
        // One row at least: the snapshot's xmin comes with the events.
        let read = prepared(
            client,
            "SELECT o.id, o.dispatch, o.payload, o.streamed, o.event, o.due_in,
                    pg_snapshot_xmin(pg_current_snapshot())::text, 'synapse.outbox'::regclass::oid, o.still_queued,
                    o.notify
               FROM (SELECT) AS one
               LEFT JOIN LATERAL (
                    SELECT id, dispatch, payload, streamed, event, notify,
                           extract(epoch FROM due_at - clock_timestamp())::float8 AS due_in,
                           -- The status is read, not filtered on, by primary key: a plan made
                           -- while the tasks were few would walk the partial index of queued
                           -- tasks, every one of them, at each batch.
                           CASE WHEN event = 'task.queued' AND dispatch IS NOT NULL AND task_id IS NOT NULL
                                THEN coalesce((SELECT t.status = 'queued' FROM synapse.tasks t
                                                WHERE t.id = outbox.task_id), false)
                           END AS still_queued
                      FROM synapse.outbox
                     WHERE id > $2 AND (retry_at IS NULL OR retry_at <= clock_timestamp())
                     ORDER BY id LIMIT $1) AS o ON true
              ORDER BY o.id",
            &[oid(PgBuiltInOids::INT8OID), oid(PgBuiltInOids::INT8OID)],
        )?;
        let rows = client.select(&*read, None, &[BATCH_SIZE.into(), floor.into()])?;
        let mut batch = Batch {
            ids: Vec::with_capacity(rows.len()),
            events: Vec::with_capacity(rows.len()),
            notify: Vec::new(),
            due: Due::default(),
            snapshot_xmin: 0,
            outbox: pg_sys::Oid::INVALID,
        };
        for row in rows {
            batch.snapshot_xmin = row
                .get::<String>(7)?
                .and_then(|xmin| xmin.parse().ok())
                .ok_or("no snapshot xmin")?;
            batch.outbox = row.get::<pg_sys::Oid>(8)?.ok_or("no outbox")?;
            let Some(id) = row.get::<i64>(1)? else {
                continue;
            };
            let dispatch = row.get::<String>(2)?;
            let event = row.get::<String>(5)?.unwrap_or_default();
            if let Some(seconds_left) = row.get::<f64>(6)? {
                batch.due.timers = earliest(batch.due.timers, Some(seconds(seconds_left)));
            }
            let finished_goal = matches!(
                event.as_str(),
                "goal.succeeded" | "goal.failed" | "goal.cancelled"
            );
            if finished_goal && retention_seconds > 0 {
                let retention = Duration::from_secs(retention_seconds as u64);
                batch.due.timers = earliest(batch.due.timers, Some(retention));
            }
            if dispatch.is_some() {
                batch.due.sweep = earliest(batch.due.sweep, Some(sweep));
            }
            let dispatch = match row.get::<bool>(9)? {
                Some(false) => None,
                _ => dispatch,
            };
            let payload = row.get::<String>(3)?.unwrap_or_default();
            if row.get::<bool>(10)?.unwrap_or(false) {
                batch.notify.push(payload.clone());
            }
            batch.ids.push(id);
            batch.events.push(Event {
                dispatch,
                payload,
                streamed: row.get::<bool>(4)?.unwrap_or(false),
            });
        }
        Ok(batch)
    })
}

impl From<&str> for Failure {
    fn from(error: &str) -> Self {
        Failure::Sql(error.to_owned())
    }
}

/// What became of a batch Redis answered.
struct Recorded {
    /// When the first event kept for a retry may be sent again.
    retry: Option<Duration>,
    /// The lowest id kept for a retry.
    lowest_refused: Option<i64>,
    /// The id of the transaction that read and recorded the batch.
    xid: u64,
}

/// Deletes the events Redis took in full; keeps the others with what is
/// still owed and a pause before the next try, and sets aside those Redis
/// refused too often.
fn record_deliveries(ids: &[i64], deliveries: &[Delivery]) -> Result<Recorded, Failure> {
    let (complete, partial): (Vec<_>, Vec<_>) = ids
        .iter()
        .zip(deliveries)
        .partition(|(_, delivery)| delivery.complete());
    let complete: Vec<i64> = complete.into_iter().map(|(id, _)| *id).collect();
    let xid = Spi::connect_mut(|client| {
        // `(SELECT $1)`: the array's length unknown to the planner, as in
        // the generic plan, which then wins. With `ANY($1)` a batch of fewer
        // than ten events (a chain's, a trickle's) looked cheaper planned
        // for its values, and was planned again on every call (0.1 ms).
        let delete = prepared(
            client,
            "WITH forwarded AS (DELETE FROM synapse.outbox WHERE id = ANY((SELECT $1)::bigint[]))
             SELECT pg_current_xact_id()::text",
            &[oid(PgBuiltInOids::INT8ARRAYOID)],
        )?;
        client
            .update(&*delete, None, &[complete.clone().into()])?
            .first()
            .get_one::<String>()
    })?
    .and_then(|xid| xid.parse().ok())
    .ok_or("no transaction id")?;
    let mut lowest_refused = None;
    let mut retry = None;
    if !partial.is_empty() {
        let partial_ids: Vec<i64> = partial.iter().map(|(id, _)| **id).collect();
        let dispatched: Vec<bool> = partial.iter().map(|(_, d)| d.dispatched).collect();
        let streamed: Vec<bool> = partial.iter().map(|(_, d)| d.streamed).collect();
        let errors: Vec<String> = partial
            .iter()
            .map(|(_, d)| d.error.clone().unwrap_or_default())
            .collect();
        let retry_in = Spi::get_one_with_args::<f64>(
            "WITH refused AS (
                 UPDATE synapse.outbox o
                    SET (failures, error, streamed, notify, dispatch, retry_at) = (
                        SELECT o.failures + 1, r.o ->> 2, (r.o ->> 1)::bool, false,
                               CASE WHEN (r.o ->> 0)::bool THEN NULL ELSE o.dispatch END,
                               clock_timestamp() + least(interval '200 ms' * power(2, o.failures), interval '30 s')
                          FROM (SELECT (SELECT jsonb_object_agg(id, jsonb_build_array(dispatched, streamed, error))
                                          FROM unnest($1::bigint[], $2::bool[], $3::bool[], $4::text[])
                                               AS r(id, dispatched, streamed, error)) -> o.id::text) AS r(o))
                  -- By id, joined to nothing: the outbox's statistics are
                  -- as stale as a table emptied as fast as it fills.
                  WHERE o.id = ANY($1::bigint[])
              RETURNING o.retry_at, o.failures)
             SELECT extract(epoch FROM min(retry_at) - clock_timestamp())::float8
               FROM refused WHERE failures < $5",
            &[
                partial_ids.clone().into(),
                dispatched.into(),
                streamed.into(),
                errors.into(),
                MAX_EVENT_FAILURES.into(),
            ],
        )?;
        Spi::run_with_args(
            "WITH parked AS (
                 DELETE FROM synapse.outbox WHERE id = ANY($1) AND failures >= $2
              RETURNING id, event, goal_id, task_id, dispatch, payload, streamed, created_at, failures, error, events)
             INSERT INTO synapse.outbox_parked
                    (id, event, goal_id, task_id, dispatch, payload, streamed, created_at, failures, error, events)
             SELECT * FROM parked",
            &[partial_ids.into(), MAX_EVENT_FAILURES.into()],
        )?;
        retry = retry_in.map(seconds);
        lowest_refused = partial.iter().map(|(id, _)| **id).min();
    }
    Ok(Recorded {
        retry,
        lowest_refused,
        xid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_deadline_the_drain_did_not_look_at_is_kept_even_once_past() {
        let past = Instant::now();
        let later = past + Duration::from_secs(1);
        // Woken a moment before the deadline: the drain did not look, and the
        // deadline passed while it ran. It must still be there.
        assert_eq!(next_redrain(Some(past), false, None), Some(past));
        assert_eq!(next_redrain(Some(past), false, Some(later)), Some(past));
        // The drain looked: what it found replaces the old deadline.
        assert_eq!(next_redrain(Some(past), true, Some(later)), Some(later));
        assert_eq!(next_redrain(Some(past), true, None), None);
    }

    #[test]
    fn latch_waits_never_end_before_the_deadline() {
        let wait = |micros| latch_timeout(Some(Duration::from_micros(micros)));
        assert_eq!(wait(199_700), Some(Duration::from_millis(200)));
        assert_eq!(wait(200_000), Some(Duration::from_millis(200)));
        assert_eq!(wait(1), Some(Duration::from_millis(1)));
        assert_eq!(wait(0), Some(Duration::ZERO));
        assert_eq!(latch_timeout(None), None);
    }

    #[test]
    fn commits_only_observers_read_share_a_turn_soon_after_the_first() {
        let now = Instant::now();
        let soon = now + OBSERVED_WITHIN;
        // The first such commit sets the turn; the next ones keep it.
        assert_eq!(observed_turn_at(None, true, now), Some(soon));
        assert_eq!(observed_turn_at(Some(soon), true, soon), Some(soon));
        assert_eq!(observed_turn_at(None, false, now), None);
        // Not before its time, unless a turn is asked for at once meanwhile.
        assert!(!turn_is_due(false, Some(soon), now));
        assert!(turn_is_due(false, Some(soon), soon));
        assert!(turn_is_due(true, Some(soon), now));
        assert!(!turn_is_due(false, None, now));
    }
}

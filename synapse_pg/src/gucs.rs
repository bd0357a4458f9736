//! Every `synapse.*` setting, defined in one place with typed getters.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;
use std::time::Duration;

/// Database the forwarder connects to (needs a restart to change).
static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Redis the forwarder pushes to; may hold a password, so it is never logged.
static REDIS_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"redis://127.0.0.1:6379/0"));
/// File holding the Redis password: keeps it out of postgresql.conf, whose
/// changed values Postgres itself logs on reload.
static REDIS_PASSWORD_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Prefix of every Redis key.
static KEY_PREFIX: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"synapse"));
/// Seconds a task may stay queued and unclaimed before it is dispatched again.
static SWEEP_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(30);
/// Whether events are also sent with `pg_notify`.
static NOTIFY: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Which state changes become events (outbox rows, stream entries, NOTIFYs).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Observe {
    /// Every goal and task state change.
    #[name = c"all"]
    All,
    /// Goal changes and the events that dispatch work.
    #[name = c"goals"]
    Goals,
    /// Only the events that dispatch work.
    #[name = c"dispatch"]
    Dispatch,
}
static OBSERVE: GucSetting<Observe> = GucSetting::<Observe>::new(Observe::All);
/// Seconds finished goals are kept; 0 keeps them forever.
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// Deepest chain of child goals.
static MAX_DEPTH: GucSetting<i32> = GucSetting::<i32>::new(10);

/// Defines the GUCs and reserves the `synapse` prefix. `preloading`: called
/// from `shared_preload_libraries`; a library loaded later by a session must
/// not define a postmaster-level setting (Postgres ends the session then).
pub fn init(preloading: bool) {
    GucRegistry::define_string_guc(
        c"synapse.database",
        c"Database the Synapse forwarder serves.",
        c"The forwarder background worker connects to this database at start.",
        &DATABASE,
        if preloading {
            GucContext::Postmaster
        } else {
            // Only the forwarder acts on it, and it exists only when preloaded.
            GucContext::Sighup
        },
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"synapse.redis_url",
        c"Redis URL the forwarder pushes events to.",
        c"redis:// or rediss://, with an optional password; never logged.",
        &REDIS_URL,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"synapse.redis_password_file",
        c"File with the Redis password (overrides a password in synapse.redis_url).",
        c"Read at each (re)connect; keeps the password out of postgresql.conf and the server log.",
        &REDIS_PASSWORD_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"synapse.key_prefix",
        c"Prefix of every Redis key Synapse uses.",
        c"Lists {prefix}:planner and {prefix}:queue:<name>, stream {prefix}:events.",
        &KEY_PREFIX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"synapse.sweep_interval",
        c"Re-dispatch tasks queued but unclaimed for this long.",
        c"A safety net for lost Redis messages (e.g. a flushed Redis).",
        &SWEEP_INTERVAL_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"synapse.notify",
        c"Also pg_notify('synapse_events', payload) for each event.",
        c"Off saves the commit-time NOTIFY lock when nobody LISTENs.",
        &NOTIFY,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"synapse.observe",
        c"Which state changes become events: all, goals or dispatch.",
        c"all: every goal and task change; goals: goal changes and dispatching events; dispatch: only task.queued, goal.submitted and the messages workers act on. Less means less outbox, stream and NOTIFY traffic.",
        &OBSERVE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"synapse.retention",
        c"Finished goals older than this are deleted (0 keeps them forever).",
        c"The forwarder deletes them with their tasks and edges, in small batches.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"synapse.max_depth",
        c"Deepest chain of child goals (a goal step's goal is one deeper than its own).",
        c"A goal step whose child would be deeper fails saying so: it stops a plan that recurses without end.",
        &MAX_DEPTH,
        1,
        1_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"synapse".as_ptr()) };
}

fn string(setting: &GucSetting<Option<CString>>, default: &str) -> String {
    setting
        .get()
        .and_then(|value| value.into_string().ok())
        .unwrap_or_else(|| default.to_owned())
}

/// `synapse.database`.
pub fn database() -> String {
    string(&DATABASE, "postgres")
}

/// `synapse.redis_url`.
pub fn redis_url() -> String {
    string(&REDIS_URL, "redis://127.0.0.1:6379/0")
}

/// `synapse.redis_password_file`, if set.
pub fn redis_password_file() -> Option<String> {
    REDIS_PASSWORD_FILE
        .get()
        .and_then(|value| value.into_string().ok())
        .filter(|path| !path.is_empty())
}

/// `synapse.key_prefix`.
pub fn key_prefix() -> String {
    string(&KEY_PREFIX, "synapse")
}

/// `synapse.sweep_interval`.
pub fn sweep_interval() -> Duration {
    Duration::from_secs(SWEEP_INTERVAL_S.get().max(1) as u64)
}

/// `synapse.max_depth`.
pub fn max_depth() -> i32 {
    MAX_DEPTH.get().max(1)
}

/// `synapse.retention` in seconds; 0 keeps finished goals forever.
pub fn retention_seconds() -> i32 {
    RETENTION_S.get().max(0)
}

/// `synapse.notify`.
pub fn notify() -> bool {
    NOTIFY.get()
}

/// `synapse.observe`.
pub fn observe() -> Observe {
    OBSERVE.get()
}

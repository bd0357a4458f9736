//! Schedules (SPEC §2) on the real stack: `synapse.schedule` upserts a cron
//! schedule and says its next run; the forwarder submits the goal at each run,
//! once, keyed `schedule:<name>:<time>`, makes up at most one run missed while
//! Postgres was down, and stops once the schedule is removed.
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use synapse_e2e::{postgres, refused, wait_for_goal, wait_until, Stack};

const WAIT: Duration = Duration::from_secs(60);

/// Every two seconds (6 fields: seconds first).
const EVERY_TWO_SECONDS: &str = "*/2 * * * * *";

/// `synapse.schedule(name, cron, goal, input)` (UTC, the template planner): the next run.
fn schedule(
    client: &mut postgres::Client,
    name: &str,
    cron: &str,
    goal: &str,
    input: &Value,
) -> SystemTime {
    client
        .query_one(
            "SELECT synapse.schedule($1, $2, $3, $4::text::jsonb)",
            &[&name, &cron, &goal, &input.to_string()],
        )
        .unwrap_or_else(|error| panic!("schedule {name} ({cron}): {error}"))
        .get(0)
}

/// A goal a schedule submitted.
#[derive(Debug)]
struct Run {
    id: i64,
    key: String,
    /// The run's time, read back from the key.
    at: SystemTime,
    created_at: SystemTime,
}

/// The goals schedule `name` submitted, by their time. Panics if a key's time
/// is not `YYYY-MM-DDTHH:MM:SSZ`.
fn runs(client: &mut postgres::Client, name: &str) -> Vec<Run> {
    let prefix = format!("schedule:{name}:");
    let runs: Vec<Run> = client
        .query(
            "SELECT id, idempotency_key, substr(idempotency_key, length($1) + 1)::timestamptz,
                    created_at
               FROM synapse.goals WHERE starts_with(idempotency_key, $1) ORDER BY 3, id",
            &[&prefix],
        )
        .unwrap()
        .iter()
        .map(|row| Run {
            id: row.get(0),
            key: row.get(1),
            at: row.get(2),
            created_at: row.get(3),
        })
        .collect();
    for run in &runs {
        let time = &run.key[prefix.len()..];
        let shape: String = time
            .chars()
            .map(|c| if c.is_ascii_digit() { 'D' } else { c })
            .collect();
        assert_eq!(shape, "DDDD-DD-DDTDD:DD:DDZ", "{run:?}");
    }
    runs
}

/// Waits until schedule `name` has submitted goals for which `enough` holds.
fn wait_for_runs(
    client: &mut postgres::Client,
    name: &str,
    what: &str,
    enough: impl Fn(&[Run]) -> bool,
) -> Vec<Run> {
    wait_until(what, WAIT, || {
        let runs = runs(client, name);
        enough(&runs).then_some(runs)
    })
}

fn seconds(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap()
}

/// Runs fall on even seconds, each 2 s after the one before.
fn assert_every_two_seconds(runs: &[Run]) {
    for run in runs {
        let since_epoch = seconds(run.at);
        assert!(
            since_epoch.subsec_nanos() == 0 && since_epoch.as_secs().is_multiple_of(2),
            "{run:?} is not a time of {EVERY_TWO_SECONDS}"
        );
    }
    for pair in runs.windows(2) {
        assert_eq!(
            pair[1].at.duration_since(pair[0].at).ok(),
            Some(Duration::from_secs(2)),
            "{pair:?}"
        );
    }
}

fn count_goals(client: &mut postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM synapse.goals", &[])
        .unwrap()
        .get(0)
}

#[test]
fn schedule_returns_the_next_run_and_updates_a_schedule_of_the_same_name() {
    let stack = Stack::start("schedule-upsert", &[]);
    let mut client = stack.pg();
    let next = schedule(
        &mut client,
        "nightly",
        "0 3 * * *",
        "nightly report",
        &json!({"depth": 2}),
    );
    // The next 03:00 UTC, within a day.
    let row = client
        .query_one(
            "SELECT $1::timestamptz > now() AND $1::timestamptz <= now() + interval '1 day',
                    to_char($1::timestamptz AT TIME ZONE 'UTC', 'HH24:MI:SS.US')",
            &[&next],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), "03:00:00.000000");

    let shown = |client: &mut postgres::Client| {
        let rows = client
            .query(
                "SELECT cron, time_zone, goal, input::text, planner, next_run_at,
                        last_run_at, last_goal_id
                   FROM synapse.schedules WHERE name = 'nightly'",
                &[],
            )
            .unwrap();
        assert_eq!(rows.len(), 1, "one row per name");
        let row = &rows[0];
        let input: Value = serde_json::from_str(row.get::<_, &str>(3)).unwrap();
        (
            [
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(4),
            ],
            input,
            row.get::<_, SystemTime>(5),
            row.get::<_, Option<SystemTime>>(6),
            row.get::<_, Option<i64>>(7),
        )
    };
    let (fields, input, next_run_at, last_run_at, last_goal_id) = shown(&mut client);
    assert_eq!(fields, ["0 3 * * *", "UTC", "nightly report", "template"]);
    assert_eq!(input, json!({"depth": 2}));
    assert_eq!(next_run_at, next);
    assert_eq!((last_run_at, last_goal_id), (None, None), "not run yet");

    let moved = schedule(
        &mut client,
        "nightly",
        "30 4 * * *",
        "nightly report",
        &json!({"depth": 3}),
    );
    let at: String = client
        .query_one(
            "SELECT to_char($1::timestamptz AT TIME ZONE 'UTC', 'HH24:MI:SS.US')",
            &[&moved],
        )
        .unwrap()
        .get(0);
    assert_eq!(at, "04:30:00.000000");
    let (fields, input, next_run_at, _, _) = shown(&mut client);
    assert_eq!(fields, ["30 4 * * *", "UTC", "nightly report", "template"]);
    assert_eq!(input, json!({"depth": 3}));
    assert_eq!(next_run_at, moved);
    assert_eq!(count_goals(&mut client), 0, "nothing runs before its time");
}

#[test]
fn a_schedule_every_two_seconds_submits_one_goal_per_run_keyed_by_its_time() {
    let stack = Stack::start("schedule-every", &[]);
    let _worker = stack.start_worker("w", &[]);
    let mut client = stack.pg();
    client
        .execute(
            "SELECT synapse.add_template('tick', '^tick$', $1::text::jsonb)",
            &[&json!({"steps": [{"id": "echo", "action": "transform",
                                 "params": {"expr": "{'n': goal.input.n}"}}]})
            .to_string()],
        )
        .unwrap();
    let first = schedule(
        &mut client,
        "ticker",
        EVERY_TWO_SECONDS,
        "tick",
        &json!({"n": 7}),
    );
    let runs = wait_for_runs(&mut client, "ticker", "three runs", |runs| runs.len() >= 3);
    assert_eq!(runs[0].at, first, "the first run is the one announced");
    assert_every_two_seconds(&runs);
    for run in &runs {
        // Submitted at its time, not before (and, generously, within a second).
        let late = run.created_at.duration_since(run.at);
        assert!(
            late.is_ok_and(|late| late < Duration::from_secs(1)),
            "{run:?}"
        );
    }
    for run in &runs[..3] {
        let status = wait_for_goal(&stack, run.id, WAIT);
        assert_eq!(status["status"], "succeeded", "{status}");
        assert_eq!(status["goal"], "tick");
        assert_eq!(status["planner"], "template");
        assert_eq!(status["input"], json!({"n": 7}));
        assert_eq!(status["result"], json!({"echo": {"n": 7}}));
    }

    // The schedule row follows its last run, read in one snapshot with the goals.
    let row = client
        .query_one(
            "WITH last AS (
                 SELECT id, substr(idempotency_key, length('schedule:ticker:') + 1)::timestamptz AS at
                   FROM synapse.goals WHERE starts_with(idempotency_key, 'schedule:ticker:')
                  ORDER BY id DESC LIMIT 1)
             SELECT s.last_goal_id = last.id,
                    s.last_run_at >= last.at AND s.last_run_at < last.at + interval '1 s',
                    s.next_run_at = last.at + interval '2 s'
               FROM synapse.schedules s, last WHERE s.name = 'ticker'",
            &[],
        )
        .unwrap();
    let checks: Vec<bool> = (0..3).map(|i| row.get(i)).collect();
    assert_eq!(
        checks, [true; 3],
        "[last_goal_id, last_run_at, next_run_at] follow the last run"
    );
}

#[test]
fn after_postgres_was_down_at_most_one_missed_run_is_made_up() {
    let stack = Stack::start("schedule-restart", &[]);
    let mut client = stack.pg();
    schedule(&mut client, "ticker", EVERY_TWO_SECONDS, "tick", &json!({}));
    wait_for_runs(&mut client, "ticker", "two runs", |runs| runs.len() >= 2);
    drop(client);

    stack.stop_postgres();
    let down_from = SystemTime::now();
    // Downtime itself is the test: long enough for at least three runs to be missed.
    std::thread::sleep(Duration::from_secs(7));
    let down_until = SystemTime::now();
    stack.start_postgres();
    let back = SystemTime::now();

    let mut client = stack.pg();
    let runs = wait_for_runs(
        &mut client,
        "ticker",
        "three runs after the restart",
        |runs| runs.iter().filter(|run| run.at > back).count() >= 3,
    );
    let times: BTreeSet<SystemTime> = runs.iter().map(|run| run.at).collect();
    assert_eq!(times.len(), runs.len(), "two goals for one time: {runs:?}");
    let missed: Vec<&Run> = runs
        .iter()
        .filter(|run| run.at >= down_from && run.at <= down_until)
        .collect();
    assert!(
        missed.len() <= 1,
        "{} runs of the downtime were made up: {missed:?}",
        missed.len()
    );
    for run in &runs {
        let since_epoch = seconds(run.at);
        assert!(
            since_epoch.subsec_nanos() == 0 && since_epoch.as_secs().is_multiple_of(2),
            "a made-up run keeps a time of the schedule: {run:?}"
        );
    }
    let resumed: Vec<Run> = runs.into_iter().filter(|run| run.at > back).collect();
    assert_every_two_seconds(&resumed);
}

#[test]
fn a_bad_cron_or_time_zone_is_refused_naming_it_and_writes_nothing() {
    let stack = Stack::start("schedule-bad", &[]);
    let mut client = stack.pg();
    let kept = schedule(&mut client, "keep", "0 3 * * *", "tick", &json!({}));
    let sql = "SELECT synapse.schedule($1, $2, 'tick', '{}', 'template', $3)";
    for (name, cron, time_zone, named) in [
        ("bad", "61 * * * *", "UTC", "61 * * * *"),
        ("bad", "not a cron", "UTC", "not a cron"),
        ("bad", "0 9 * * *", "Mars/Olympus", "Mars/Olympus"),
        // Replacing a schedule with a bad one leaves it as it was.
        ("keep", "not a cron", "UTC", "not a cron"),
        ("keep", "0 9 * * *", "Mars/Olympus", "Mars/Olympus"),
    ] {
        let (code, message) = refused(&mut client, sql, &[&name, &cron, &time_zone]);
        assert_eq!(code, "22023", "{cron} in {time_zone}: {message}");
        assert!(
            message.contains(named),
            "{message:?} does not name {named:?}"
        );
    }
    let rows: Vec<(String, String, String, SystemTime)> = client
        .query(
            "SELECT name, cron, time_zone, next_run_at FROM synapse.schedules",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(
        rows,
        [(
            "keep".to_owned(),
            "0 3 * * *".to_owned(),
            "UTC".to_owned(),
            kept
        )]
    );
}

#[test]
fn a_five_field_cron_is_read_in_its_time_zone() {
    let stack = Stack::start("schedule-zone", &[]);
    let mut client = stack.pg();
    // The first weekday 09:00 in Paris after now, computed by Postgres in the
    // same statement (same now()).
    let row = client
        .query_one(
            "SELECT synapse.schedule('paris', '0 9 * * 1-5', 'morning report', '{}',
                                     'template', 'Europe/Paris'),
                    (SELECT min(c) FROM (
                         SELECT ((((now() AT TIME ZONE 'Europe/Paris')::date + d) + time '09:00')
                                   AT TIME ZONE 'Europe/Paris') AS c
                           FROM generate_series(0, 7) AS d) AS candidates
                      WHERE c > now()
                        AND extract(isodow FROM c AT TIME ZONE 'Europe/Paris') BETWEEN 1 AND 5)",
            &[],
        )
        .unwrap();
    let (next, expected): (SystemTime, SystemTime) = (row.get(0), row.get(1));
    let row = client
        .query_one(
            "SELECT to_char($1::timestamptz AT TIME ZONE 'Europe/Paris', 'HH24:MI:SS.US'),
                    extract(isodow FROM $1::timestamptz AT TIME ZONE 'Europe/Paris')::int,
                    $1::timestamptz > now()",
            &[&next],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "09:00:00.000000");
    assert!(
        (1..=5).contains(&row.get::<_, i32>(1)),
        "a weekday in Paris"
    );
    assert!(row.get::<_, bool>(2), "in the future");
    assert_eq!(next, expected, "the first such time, not a later one");
    let row = client
        .query_one(
            "SELECT time_zone, next_run_at FROM synapse.schedules WHERE name = 'paris'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Europe/Paris");
    assert_eq!(row.get::<_, SystemTime>(1), next);
}

#[test]
fn unschedule_removes_a_schedule_and_no_run_follows() {
    let stack = Stack::start("schedule-remove", &[]);
    let mut client = stack.pg();
    schedule(&mut client, "ticker", EVERY_TWO_SECONDS, "tick", &json!({}));
    wait_for_runs(&mut client, "ticker", "a run", |runs| !runs.is_empty());
    let unschedule = |client: &mut postgres::Client, name: &str| -> bool {
        client
            .query_one("SELECT synapse.unschedule($1)", &[&name])
            .unwrap()
            .get(0)
    };
    assert!(unschedule(&mut client, "ticker"));
    assert!(!unschedule(&mut client, "ticker"), "already removed");
    assert!(!unschedule(&mut client, "never-made"));
    let left: i64 = client
        .query_one("SELECT count(*) FROM synapse.schedules", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let submitted = count_goals(&mut client);
    // Nothing announces a run that does not come: watch more than two periods.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        count_goals(&mut client),
        submitted,
        "a goal was submitted after unschedule"
    );
}

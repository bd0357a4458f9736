//! Operations (SPEC §9) against real servers: a `pg_dump` restored into a new
//! database keeps every goal, task, edge, template, registered action and
//! undelivered event; a streaming standby promoted after the primary is
//! killed resumes forwarding and loses nothing that was committed.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use synapse_e2e::{
    free_port, postgres, submit_plan, wait_for_goal, wait_until, worker_binary, workspace_root,
    Stack, TRIAGE,
};

const WAIT: Duration = Duration::from_secs(60);

const TWO_STEPS: &str = r#"{"steps":[{"id":"first","action":"noop"},{"id":"second","action":"noop"}],
  "edges":[{"from":"first","to":"second"}]}"#;

/// The private Postgres binaries (`scripts/env.sh` exports `PG_BIN`).
fn pg_bin(program: &str) -> PathBuf {
    std::env::var_os("PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".synapse/pg/usr/lib/postgresql/15/bin"))
        .join(program)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A server-side command (initdb, pg_ctl, pg_basebackup): run as `postgres`
/// when we are root, as `scripts/stack.sh` does.
fn as_pg(program: &str, args: &[&str]) -> Command {
    let program = pg_bin(program);
    if is_root() {
        let mut command = Command::new("sudo");
        command
            .args(["-u", "postgres", "env", "-u", "PGDATA", "RUST_BACKTRACE=0"])
            .arg(program)
            .args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args).env("RUST_BACKTRACE", "0");
        command
    }
}

fn run(mut command: Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn connect(port: u16, database: &str) -> postgres::Client {
    let url = format!("postgresql://postgres@127.0.0.1:{port}/{database}");
    postgres::Client::connect(&url, postgres::NoTls).expect("connecting to postgres")
}

fn submit_goal(client: &mut postgres::Client, goal: &str) -> i64 {
    client
        .query_one("SELECT synapse.submit_goal($1)", &[&goal])
        .expect("submit_goal")
        .get(0)
}

fn add_triage_template(client: &mut postgres::Client) {
    client
        .execute(
            "SELECT synapse.add_template('triage', 'triage incident (?P<id>\\d+) severity (?P<severity>\\d+)',
                                         $1::text::jsonb, 'page or file an incident', 3)",
            &[&TRIAGE],
        )
        .expect("add_template");
}

fn scalar(client: &mut postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .unwrap_or_else(|error| panic!("{sql}: {error}"))
        .get(0)
}

/// Everything a dump must keep, table by table, as JSON text (every column of
/// every row, timestamps included), plus what `goal_status()` says of each goal.
fn snapshot(client: &mut postgres::Client) -> Vec<(&'static str, String)> {
    let queries = [
        ("goals", "SELECT jsonb_agg(to_jsonb(t) ORDER BY t.id) FROM synapse.goals t"),
        ("tasks", "SELECT jsonb_agg(to_jsonb(t) ORDER BY t.id) FROM synapse.tasks t"),
        (
            "edges",
            "SELECT jsonb_agg(to_jsonb(t) ORDER BY t.goal_id, t.from_step, t.to_step) FROM synapse.edges t",
        ),
        ("templates", "SELECT jsonb_agg(to_jsonb(t) ORDER BY t.name) FROM synapse.templates t"),
        (
            "registered actions",
            "SELECT jsonb_agg(to_jsonb(t) ORDER BY t.name) FROM synapse.actions t WHERE NOT builtin",
        ),
        (
            "built-in actions",
            "SELECT jsonb_agg(name ORDER BY name) FROM synapse.actions WHERE builtin",
        ),
        ("outbox", "SELECT jsonb_agg(to_jsonb(t) ORDER BY t.id) FROM synapse.outbox t"),
        (
            "goal_status()",
            "SELECT jsonb_agg(synapse.goal_status(id) ORDER BY id) FROM synapse.goals",
        ),
        (
            "capabilities",
            "SELECT jsonb_agg(jsonb_build_array(role::text, capability) ORDER BY 1) FROM synapse.role_grants",
        ),
        (
            "row security policies",
            "SELECT jsonb_agg(jsonb_build_array(polrelid::regclass::text, polname,
                                                (SELECT array_agg(r::regrole::text ORDER BY 1) FROM unnest(polroles) AS r))
                              ORDER BY 1)
               FROM pg_policy WHERE polrelid::regclass::text LIKE 'synapse.%'",
        ),
    ];
    queries
        .into_iter()
        .map(|(name, sql)| {
            let json: String = client
                .query_one(&format!("SELECT coalesce(({sql}), '[]')::text"), &[])
                .unwrap_or_else(|error| panic!("{name}: {error}"))
                .get(0);
            (name, json)
        })
        .collect()
}

/// The restored database holds exactly what the source held, and works on.
fn assert_restored(
    stack: &Stack,
    database: &str,
    source: &[(&'static str, String)],
    outbox_rows: i64,
) {
    let mut client = stack.pg_database(database);
    let restored = snapshot(&mut client);
    for ((name, expected), (_, got)) in source.iter().zip(&restored) {
        assert_eq!(got, expected, "{database}: {name} differ from the source");
    }
    assert_eq!(
        scalar(&mut client, "SELECT count(*) FROM synapse.outbox"),
        outbox_rows,
        "{database}: restoring must neither lose nor emit events"
    );

    // Identities go on above every restored id.
    let (max_goal, max_task, max_event) = {
        let row = client
            .query_one(
                "SELECT (SELECT max(id) FROM synapse.goals), (SELECT max(id) FROM synapse.tasks),
                        (SELECT max(id) FROM synapse.outbox)",
                &[],
            )
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
        )
    };
    let fresh = submit_plan(&mut client, TWO_STEPS);
    assert!(
        fresh > max_goal,
        "{database}: new goal {fresh} not above {max_goal}"
    );
    let first_task = scalar(
        &mut client,
        &format!("SELECT min(id) FROM synapse.tasks WHERE goal_id = {fresh}"),
    );
    assert!(
        first_task > max_task,
        "{database}: new task {first_task} not above {max_task}"
    );
    // The triggers work again after the restore: the new goal's events are recorded.
    let events: Vec<(i64, String)> = client
        .query(
            "SELECT id, event FROM synapse.outbox WHERE goal_id = $1 ORDER BY id",
            &[&fresh],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let names: Vec<&str> = events.iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(names, ["goal.running", "task.queued"], "{database}");
    assert!(
        events.iter().all(|(id, _)| *id > max_event),
        "{database}: new events {events:?} not above {max_event}"
    );

    // A restored goal still follows the state machine.
    let waiting: i64 = scalar(
        &mut client,
        "SELECT min(id) FROM synapse.goals WHERE status = 'submitted'",
    );
    let cancelled: bool = client
        .query_one("SELECT synapse.cancel_goal($1)", &[&waiting])
        .unwrap()
        .get(0);
    assert!(
        cancelled,
        "{database}: cancel_goal on restored goal {waiting}"
    );
    let status: String = client
        .query_one("SELECT synapse.goal_status($1) ->> 'status'", &[&waiting])
        .unwrap()
        .get(0);
    assert_eq!(status, "cancelled");
    assert_eq!(
        scalar(
            &mut client,
            &format!(
                "SELECT count(*) FROM synapse.outbox WHERE goal_id = {waiting} AND event = 'goal.cancelled'"
            )
        ),
        1,
        "{database}"
    );
}

#[test]
fn dump_and_restore_keep_everything() {
    // No sweep during the test: the outbox changes only when we act.
    let stack = Stack::start("dump", &["synapse.sweep_interval = '1h'"]);
    let mut client = stack.pg();
    add_triage_template(&mut client);
    // A worker-registered action, with its params schema.
    client
        .execute(
            "INSERT INTO synapse.actions (name, description, params_schema, builtin, registered_by)
             VALUES ('acme.echo', 'Echoes params.text.',
                     '{\"type\":\"object\",\"properties\":{\"text\":{\"type\":\"string\"}}}', false, 'acme-worker')",
            &[],
        )
        .expect("registering an action");

    // Goals that ran to their end.
    let worker = stack.start_worker("w", &[]);
    let paged = submit_goal(&mut client, "triage incident 1 severity 5");
    let filed = submit_goal(&mut client, "triage incident 2 severity 1");
    let failed = submit_plan(
        &mut client,
        r#"{"steps":[{"id":"boom","action":"fail","params":{"message":"on purpose"}}]}"#,
    );
    assert_eq!(wait_for_goal(&stack, paged, WAIT)["status"], "succeeded");
    assert_eq!(wait_for_goal(&stack, filed, WAIT)["status"], "succeeded");
    assert_eq!(wait_for_goal(&stack, failed, WAIT)["status"], "failed");
    drop(worker);
    wait_until("the outbox to drain", WAIT, || {
        (scalar(&mut client, "SELECT count(*) FROM synapse.outbox") == 0).then_some(())
    });

    // Goals in flight whose events cannot leave: Redis is down.
    stack.stop_redis();
    let waiting = submit_goal(&mut client, "triage incident 3 severity 9");
    let chain = submit_plan(&mut client, TWO_STEPS);
    let custom = submit_plan(
        &mut client,
        r#"{"steps":[{"id":"echo","action":"acme.echo","params":{"text":"hello"}}]}"#,
    );
    let cancelled = submit_plan(&mut client, TWO_STEPS);
    assert!(client
        .query_one("SELECT synapse.cancel_goal($1)", &[&cancelled])
        .unwrap()
        .get::<_, bool>(0));

    let statuses: Vec<(i64, String)> = client
        .query("SELECT id, status FROM synapse.goals ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let expected = [
        (paged, "succeeded"),
        (filed, "succeeded"),
        (failed, "failed"),
        (waiting, "submitted"),
        (chain, "running"),
        (custom, "running"),
        (cancelled, "cancelled"),
    ];
    assert_eq!(
        statuses,
        expected
            .iter()
            .map(|(id, status)| (*id, (*status).to_owned()))
            .collect::<Vec<_>>()
    );
    let task_states: BTreeSet<String> = client
        .query("SELECT DISTINCT status FROM synapse.tasks", &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    for state in [
        "succeeded",
        "skipped",
        "failed",
        "queued",
        "pending",
        "cancelled",
    ] {
        assert!(
            task_states.contains(state),
            "no {state} task: {task_states:?}"
        );
    }
    assert!(
        scalar(
            &mut client,
            "SELECT count(*) FROM synapse.edges WHERE state = 'taken'"
        ) > 0
    );
    assert!(
        scalar(
            &mut client,
            "SELECT count(*) FROM synapse.edges WHERE state = 'pending'"
        ) > 0
    );
    let outbox_rows = scalar(&mut client, "SELECT count(*) FROM synapse.outbox");
    assert!(outbox_rows >= 6, "undelivered events: {outbox_rows}");
    // While Redis is down the forwarder still NOTIFYs what waits (the cancel's
    // events within a few milliseconds): once done, nothing changes the rows.
    wait_until("the waiting events to be NOTIFYed", WAIT, || {
        (scalar(
            &mut client,
            "SELECT count(*) FROM synapse.outbox WHERE notify",
        ) == 0)
            .then_some(())
    });

    let source = snapshot(&mut client);

    let port = stack.pg_port.to_string();
    let connection = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let plain = stack.path("dump.sql");
    let custom_archive = stack.path("dump.custom");
    let mut dump = Command::new(pg_bin("pg_dump"));
    dump.args(connection)
        .args(["-d", synapse_e2e::DATABASE, "-f"])
        .arg(&plain);
    run(dump);
    let mut dump = Command::new(pg_bin("pg_dump"));
    dump.args(connection)
        .args(["-d", synapse_e2e::DATABASE, "-Fc", "-f"])
        .arg(&custom_archive);
    run(dump);
    // Dumping changed nothing in the source.
    assert_eq!(snapshot(&mut client), source);

    let mut admin = stack.pg_database("postgres");
    admin
        .batch_execute("CREATE DATABASE restored_plain")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE restored_custom")
        .unwrap();

    let mut restore = Command::new(pg_bin("psql"));
    restore
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(connection)
        .args(["-d", "restored_plain", "-f"])
        .arg(&plain);
    let output = run(restore);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("ERROR"), "psql restore: {stderr}");
    assert_restored(&stack, "restored_plain", &source, outbox_rows);

    let mut restore = Command::new(pg_bin("pg_restore"));
    restore
        .arg("--exit-on-error")
        .args(connection)
        .args(["-d", "restored_custom"])
        .arg(&custom_archive);
    run(restore);
    assert_restored(&stack, "restored_custom", &source, outbox_rows);

    // The source itself is untouched by all this.
    assert_eq!(snapshot(&mut client), source);
}

/// A physical standby of a stack's primary; stopped (immediately) when dropped.
struct Standby {
    data: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Standby {
    /// `pg_basebackup -R` of the primary, with the primary's settings on a
    /// port of its own, started and streaming as `application_name`.
    fn create(stack: &Stack, application_name: &str) -> Standby {
        let data = stack.path("standby");
        let log = stack.path("standby.log");
        let primary = format!(
            "host=127.0.0.1 port={} user=postgres application_name={application_name}",
            stack.pg_port
        );
        let data_arg = data.to_str().expect("a UTF-8 path").to_owned();
        run(as_pg(
            "pg_basebackup",
            &[
                "-d",
                &primary,
                "-D",
                &data_arg,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
            ],
        ));
        let auto_conf = std::fs::read_to_string(data.join("postgresql.auto.conf"))
            .expect("postgresql.auto.conf");
        assert!(
            auto_conf.contains(&format!("application_name={application_name}")),
            "the standby names itself to the primary: {auto_conf}"
        );
        let settings =
            std::fs::read_to_string(stack.path("synapse.conf")).expect("the primary's settings");
        // A free port can be taken before the server binds it: retry with new ones.
        let mut failure = String::new();
        for _ in 0..3 {
            let port = free_port();
            let conf: String = settings
                .lines()
                .map(|line| {
                    if line.trim_start().starts_with("port =") {
                        format!("port = {port}\n")
                    } else {
                        format!("{line}\n")
                    }
                })
                .collect();
            let conf_path = data.join("synapse.conf");
            std::fs::write(&conf_path, conf).expect("writing the standby's settings");
            if is_root() {
                run({
                    let mut chown = Command::new("chown");
                    chown.arg("postgres").arg(&conf_path);
                    chown
                });
            }
            let log_arg = log.to_str().expect("a UTF-8 path").to_owned();
            let started = as_pg(
                "pg_ctl",
                &["-D", &data_arg, "-l", &log_arg, "-w", "-t", "60", "start"],
            )
            .output()
            .expect("pg_ctl start");
            if started.status.success() {
                return Standby { data, log, port };
            }
            failure = format!(
                "{}{}\n{}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("the standby did not start: {failure}");
    }

    fn pg(&self) -> postgres::Client {
        connect(self.port, synapse_e2e::DATABASE)
    }

    fn url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{}",
            self.port,
            synapse_e2e::DATABASE
        )
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pg_ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        let data = self.data.to_string_lossy().into_owned();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        as_pg("pg_ctl", &all).output()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        // Never panic here: the stack's own drop must still run.
        match self.pg_ctl(&["status"]) {
            Ok(status) if status.status.success() => {
                if let Err(error) = self.pg_ctl(&["-m", "immediate", "-w", "stop"]) {
                    eprintln!("stopping the standby: {error}");
                }
            }
            _ => {}
        }
    }
}

/// A `synapse-worker run` against any database; killed when dropped.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(stack: &Stack, database_url: &str, name: &str) -> Worker {
        let log = stack.path(&format!("worker-{name}.log"));
        let file = std::fs::File::create(&log).expect("worker log");
        let child = Command::new(worker_binary())
            .args(["--log-format", "text", "run"])
            .env("SYNAPSE_DATABASE_URL", database_url)
            .env("SYNAPSE_REDIS_URL", stack.redis_url())
            .env("SSL_CERT_FILE", "")
            .env("RUST_LOG", "synapse_worker=debug,info")
            .env("NO_COLOR", "1")
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("starting synapse-worker (build it first)");
        let worker = Worker { child, log };
        wait_until("the worker to start", WAIT, || {
            worker.log_text().contains("worker started").then_some(())
        });
        worker
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forwarders(client: &mut postgres::Client) -> i64 {
    scalar(
        client,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'synapse forwarder'",
    )
}

fn outbox(client: &mut postgres::Client) -> Vec<(i64, String)> {
    client
        .query("SELECT id, payload FROM synapse.outbox ORDER BY id", &[])
        .expect("outbox")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[test]
fn promoted_standby_resumes_forwarding() {
    const NAME: &str = "synapse_standby";
    let stack = Stack::start("standby", &["synapse.sweep_interval = '1h'"]);
    let mut primary = stack.pg();
    add_triage_template(&mut primary);

    // One goal runs to its end before anything goes wrong.
    let worker = stack.start_worker("primary", &[]);
    let early = submit_goal(&mut primary, "triage incident 1 severity 5");
    let early_status = wait_for_goal(&stack, early, WAIT);
    assert_eq!(early_status["status"], "succeeded");
    drop(worker);

    let standby = Standby::create(&stack, NAME);
    // Synchronous: a commit on the primary is on the standby's disk too.
    primary
        .batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{NAME}'"
        ))
        .unwrap();
    primary.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the standby to be synchronous", WAIT, || {
        let sync: i64 = primary
            .query_one(
                "SELECT count(*) FROM pg_stat_replication
                  WHERE application_name = $1 AND state = 'streaming' AND sync_state = 'sync'",
                &[&NAME],
            )
            .unwrap()
            .get(0);
        (sync == 1).then_some(())
    });

    // In recovery the forwarder waits quietly: not started, nothing logged.
    let mut replica = standby.pg();
    assert!(replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(forwarders(&mut primary), 1, "the primary's forwarder runs");
    assert_eq!(forwarders(&mut replica), 0, "no forwarder on a standby");
    let status = stack.forwarder_status(&mut replica);
    assert_eq!(status["running"], false, "{status}");
    // A standby answers status questions about what it replicated.
    let replicated: String = replica
        .query_one("SELECT synapse.goal_status($1)::text", &[&early])
        .expect("goal_status() on a standby")
        .get(0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&replicated).unwrap(),
        early_status
    );

    // Work committed while Redis is down: its events wait in the outbox.
    stack.stop_redis();
    let mut goals = vec![early];
    for i in 2..6 {
        goals.push(submit_goal(
            &mut primary,
            &format!("triage incident {i} severity {}", i * 2 - 3),
        ));
        goals.push(submit_plan(&mut primary, TWO_STEPS));
    }
    let pending = outbox(&mut primary);
    // 4 goal.submitted, then goal.running and task.queued for each plan.
    assert_eq!(pending.len(), 12, "{pending:?}");
    assert_eq!(
        forwarders(&mut replica),
        0,
        "still no forwarder on the standby"
    );
    let problems: Vec<String> = standby
        .log_text()
        .lines()
        .filter(|line| {
            line.contains("ERROR")
                || line.contains("PANIC")
                || (line.contains("FATAL") && line.to_lowercase().contains("synapse"))
        })
        .map(str::to_owned)
        .collect();
    assert!(problems.is_empty(), "the standby logged: {problems:#?}");

    // The primary dies hard.
    drop(primary);
    let pgdata = stack.path("pgdata").to_string_lossy().into_owned();
    run(as_pg(
        "pg_ctl",
        &["-D", &pgdata, "-m", "immediate", "-w", "stop"],
    ));

    // Promotion: the committed work is all there, and the forwarder starts.
    run(as_pg(
        "pg_ctl",
        &[
            "-D",
            &standby.data.to_string_lossy(),
            "-w",
            "-t",
            "60",
            "promote",
        ],
    ));
    wait_until("the promotion to finish", WAIT, || {
        let in_recovery: bool = replica
            .query_one("SELECT pg_is_in_recovery()", &[])
            .unwrap()
            .get(0);
        (!in_recovery).then_some(())
    });
    let mut promoted = standby.pg();
    assert_eq!(
        outbox(&mut promoted),
        pending,
        "every undelivered event survived"
    );
    let finished: serde_json::Value = serde_json::from_str(
        &promoted
            .query_one("SELECT synapse.goal_status($1)::text", &[&early])
            .unwrap()
            .get::<_, String>(0),
    )
    .unwrap();
    assert_eq!(finished, early_status);
    wait_until(
        "the forwarder to start on the promoted server",
        WAIT,
        || (forwarders(&mut promoted) == 1).then_some(()),
    );

    // Redis comes back (empty); a worker joins the new primary; everything ends.
    stack.start_redis();
    let worker = Worker::start(&stack, &standby.url(), "promoted");
    let done = wait_until("every goal to succeed on the promoted server", WAIT, || {
        let rows = promoted
            .query(
                "SELECT id, status FROM synapse.goals WHERE id = ANY($1) ORDER BY id",
                &[&goals],
            )
            .unwrap();
        let ended = rows
            .iter()
            .all(|row| matches!(row.get::<_, &str>(1), "succeeded" | "failed" | "cancelled"));
        (rows.len() == goals.len() && ended).then(|| {
            rows.iter()
                .map(|row| (row.get::<_, i64>(0), row.get::<_, String>(1)))
                .collect::<Vec<_>>()
        })
    });
    for (id, status) in &done {
        assert_eq!(status, "succeeded", "goal {id}:\n{}", worker.log_text());
    }
    wait_until("the outbox to drain", WAIT, || {
        outbox(&mut promoted).is_empty().then_some(())
    });

    // And the new primary goes on: a new goal is forwarded and run.
    let after = submit_plan(&mut promoted, TWO_STEPS);
    assert!(after > *goals.iter().max().unwrap());
    wait_until("the new goal to succeed", WAIT, || {
        let status: String = promoted
            .query_one("SELECT status FROM synapse.goals WHERE id = $1", &[&after])
            .unwrap()
            .get(0);
        (status == "succeeded").then_some(())
    });
    let status: String = promoted
        .query_one("SELECT synapse.forwarder_status()::text", &[])
        .unwrap()
        .get(0);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["redis_connected"], true, "{status}");
}

//! Ceilings of the same Postgres and Redis, measured with their own tools: a
//! pgbench minimal task lifecycle, the rows a drain writes written by pgbench
//! alone, redis-benchmark LPUSH/RPOP/BRPOP, a Redis PING round trip.
use std::time::{Duration, Instant};

use synapse_e2e::{redis, wait_until, Stack};

use crate::figure::{median, median_of, ms, Baseline, Figure};
use crate::goals::{forget_goals, one_i64, submit_plans, NOOP};
use crate::latency::llen;
use crate::options::Sizes;

/// Redis PING round trips, ms.
fn redis_pings(stack: &Stack, count: usize) -> Vec<f64> {
    let mut redis = stack.redis();
    (0..count)
        .map(|_| {
            let sent = Instant::now();
            let _: String = redis::cmd("PING").query(&mut redis).expect("PING");
            ms(sent.elapsed())
        })
        .collect()
}

/// The minimal task lifecycle, one task per script run: insert it queued,
/// claim the oldest queued job (SKIP LOCKED), complete it; three autocommit
/// transactions. The claim always yields one row (id 0 when it found nothing,
/// which a race can cause) so `\gset` never aborts the client.
const LIFECYCLE: &str = r"INSERT INTO bench_limit.jobs (status, payload) VALUES ('queued', '{}');
WITH claimed AS (
  UPDATE bench_limit.jobs SET status = 'running', claimed_at = now()
   WHERE id = (SELECT id FROM bench_limit.jobs WHERE status = 'queued'
                ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1)
  RETURNING id)
SELECT coalesce((SELECT id FROM claimed), 0) AS claimed \gset
UPDATE bench_limit.jobs SET status = 'done', finished_at = now() WHERE id = :claimed;
";

/// The rows a drained one-step goal writes, and nothing else: claim up to 64
/// queued tasks as the worker claims them (`FOR UPDATE SKIP LOCKED`, a new
/// attempt and lease), then, in a second transaction, lock their goals and
/// end the tasks and the goals. No engine, no worker, no Redis: how fast the
/// drain could go if Synapse's own work around its writes cost nothing.
const DRAIN_ROWS: &str = r"BEGIN;
WITH c AS (
  UPDATE synapse.tasks t SET status = 'running', attempts = t.attempts + 1,
         lease_expires_at = now() + interval '5 min', leased_by = 'pgbench', started_at = now()
   WHERE t.id IN (SELECT id FROM synapse.tasks WHERE status = 'queued'
                   ORDER BY queued_at LIMIT 64 FOR UPDATE SKIP LOCKED)
  RETURNING t.id, t.goal_id)
SELECT coalesce(array_agg(id), '{}')::text AS ids, coalesce(array_agg(goal_id), '{}')::text AS goals FROM c \gset
COMMIT;
BEGIN;
SELECT id FROM synapse.goals WHERE id = ANY(:goals::bigint[]) ORDER BY id FOR NO KEY UPDATE;
UPDATE synapse.tasks SET status = 'succeeded', result = '{}', finished_at = now()
 WHERE id = ANY(:ids::bigint[]) AND status = 'running';
UPDATE synapse.goals SET status = 'succeeded', result = '{}', finished_at = now()
 WHERE id = ANY(:goals::bigint[]) AND status = 'running';
COMMIT;
";

/// Clients of [`drain_rows`], as many as the drain's two workers' claimers.
const DRAIN_ROWS_CLIENTS: usize = 4;

/// [`DRAIN_ROWS`] over `goals` queued one-step goals, with the tables'
/// triggers (their checks and events) or without; tasks/s.
fn drain_rows(stack: &Stack, goals: usize, triggers: bool) -> f64 {
    let mut client = stack.pg();
    forget_goals(&mut client);
    submit_plans(&mut client, NOOP, goals);
    for statement in [
        "VACUUM ANALYZE synapse.tasks",
        "VACUUM ANALYZE synapse.goals",
        "CHECKPOINT",
    ] {
        client.batch_execute(statement).expect(statement);
    }
    let script = stack.path("drain_rows.sql");
    std::fs::write(&script, DRAIN_ROWS).expect("writing the pgbench script");
    // One more round than the tasks need: a claim near the end may find fewer.
    let rounds = goals.div_ceil(64 * DRAIN_ROWS_CLIENTS) + 1;
    let options = if triggers {
        ""
    } else {
        "-c session_replication_role=replica"
    };
    let started = Instant::now();
    pgbench(
        stack,
        &script,
        DRAIN_ROWS_CLIENTS,
        ["-t", &rounds.to_string()],
        options,
    );
    let elapsed = started.elapsed();
    let done = one_i64(
        &mut client,
        "SELECT count(*) FROM synapse.tasks WHERE status = 'succeeded'",
    );
    assert!(done > 0, "pgbench ended no task");
    // Leave nothing behind for the sections after: the tasks' messages,
    // once the forwarder has sent them, would wake the next workers.
    wait_until("the outbox to drain", Duration::from_secs(120), || {
        (one_i64(&mut client, "SELECT count(*) FROM synapse.outbox") == 0).then_some(())
    });
    let _: i64 = redis::cmd("DEL")
        .arg("synapse:queue:default")
        .query(&mut stack.redis())
        .expect("DEL");
    forget_goals(&mut client);
    done as f64 / elapsed.as_secs_f64()
}

fn pgbench_binary() -> std::path::PathBuf {
    // The private install's (scripts/env.sh exports PG_BIN), else PATH's.
    std::env::var_os("PG_BIN")
        .map(|dir| std::path::PathBuf::from(dir).join("pgbench"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "pgbench".into())
}

/// pgbench running `script` on Synapse's database with `clients` (prepared
/// statements, 2 threads) for `length` (`-T seconds` or `-t runs`), its
/// sessions started with `options` (PGOPTIONS); returns its output.
fn pgbench(
    stack: &Stack,
    script: &std::path::Path,
    clients: usize,
    length: [&str; 2],
    options: &str,
) -> String {
    let output = std::process::Command::new(pgbench_binary())
        .env("PGOPTIONS", options)
        .args([
            "-n",
            "-M",
            "prepared",
            "-j",
            "2",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .arg("-p")
        .arg(stack.pg_port.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .args(length)
        .arg("-f")
        .arg(script)
        .arg(synapse_e2e::DATABASE)
        .output()
        .expect("running pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// pgbench running the lifecycle script with `clients`; returns tasks/s
/// (pgbench's tps counts script runs).
fn pgbench_lifecycle(stack: &Stack, clients: usize, duration: Duration) -> f64 {
    let mut client = stack.pg();
    client
        .batch_execute("TRUNCATE bench_limit.jobs")
        .expect("TRUNCATE");
    let script = stack.path("lifecycle.sql");
    std::fs::write(&script, LIFECYCLE).expect("writing the pgbench script");
    let seconds = duration.as_secs().max(1).to_string();
    let stdout = pgbench(stack, &script, clients, ["-T", &seconds], "");
    let done = one_i64(
        &mut client,
        "SELECT count(*) FROM bench_limit.jobs WHERE status = 'done'",
    );
    assert!(done > 0, "pgbench completed no job: {stdout}");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {stdout}"))
}

/// redis-benchmark with `args` (CSV output); returns requests/s per test.
fn redis_benchmark(stack: &Stack, args: &[&str]) -> Vec<(String, f64)> {
    let output = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "--csv"])
        .arg("-p")
        .arg(stack.redis_port.to_string())
        .args(args)
        .output()
        .expect("running redis-benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "redis-benchmark failed: {stdout}");
    let rows: Vec<(String, f64)> = stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(|field| field.trim_matches('"'));
            let test = fields.next()?;
            let rps = fields.next()?.parse().ok()?;
            Some((test.to_owned(), rps))
        })
        .collect();
    assert!(
        !rows.is_empty(),
        "no result in redis-benchmark's output: {stdout}"
    );
    rows
}

pub fn section(stack: &Stack, sizes: &Sizes, runs: usize) -> Vec<Figure> {
    let mut figures = Vec::new();
    let mut client = stack.pg();
    client
        .batch_execute(
            "CREATE SCHEMA bench_limit;
             CREATE TABLE bench_limit.jobs (
                 id bigserial PRIMARY KEY, status text NOT NULL, payload jsonb,
                 claimed_at timestamptz, finished_at timestamptz);
             CREATE INDEX jobs_queued ON bench_limit.jobs (id) WHERE status = 'queued';",
        )
        .expect("creating bench_limit.jobs");
    let seconds = sizes.pgbench.as_secs().max(1);
    let mut best = 0.0_f64;
    for clients in [16, 64] {
        let rate = median(
            (0..runs)
                .map(|_| pgbench_lifecycle(stack, clients, sizes.pgbench))
                .collect(),
        );
        best = best.max(rate);
        figures.push(
            Figure::new(
                format!("limit: minimal task lifecycle, pgbench -c {clients} -j 2 -T {seconds}"),
                rate,
                "tasks/s",
            )
            .note("insert; claim (SKIP LOCKED); complete: 3 commits, synchronous_commit on"),
        );
    }
    figures.push(
        Figure::new(
            "limit: minimal task lifecycle in Postgres (3 commits/task)",
            best,
            "tasks/s",
        )
        .note("the better of the two pgbench runs")
        .is(Baseline::PgLifecycle),
    );
    client
        .batch_execute("DROP SCHEMA bench_limit CASCADE")
        .expect("dropping bench_limit");

    let goals = sizes.tasks;
    for triggers in [true, false] {
        let rate = median(
            (0..runs)
                .map(|_| drain_rows(stack, goals, triggers))
                .collect(),
        );
        let mut figure = Figure::new(
            format!(
                "limit: a drain's rows alone, {goals} one-step goals, pgbench -c {DRAIN_ROWS_CLIENTS}{}",
                if triggers { "" } else { ", triggers off" }
            ),
            rate,
            "tasks/s",
        )
        .note("claim 64 queued tasks; lock their goals, end tasks and goals: 2 commits a batch, no engine, worker or Redis");
        if triggers {
            figure = figure.is(Baseline::DrainRows);
        }
        figures.push(figure);
    }

    let n = sizes.redis_requests.to_string();
    for pipeline in ["1", "16"] {
        let results: Vec<Vec<(String, f64)>> = (0..runs)
            .map(|_| redis_benchmark(stack, &["-n", &n, "-P", pipeline, "-t", "lpush,rpop"]))
            .collect();
        for (i, (test, _)) in results[0].iter().enumerate() {
            figures.push(
                Figure::new(
                    format!("limit: Redis {test}, redis-benchmark -P {pipeline}"),
                    median_of(&results, |run| run[i].1),
                    "req/s",
                )
                .note(format!("{n} requests, 50 clients")),
            );
        }
    }
    // BRPOP that never blocks: the list is filled first with as many items.
    let brpops: Vec<f64> = (0..runs)
        .map(|_| {
            redis_benchmark(stack, &["-n", &n, "lpush", "bench:brpop", "x"]);
            let rate = redis_benchmark(stack, &["-n", &n, "brpop", "bench:brpop", "1"])[0].1;
            let left = llen(&mut stack.redis(), "bench:brpop");
            assert_eq!(left, 0, "BRPOP left items behind");
            rate
        })
        .collect();
    figures.push(
        Figure::new(
            "limit: Redis BRPOP, redis-benchmark",
            median(brpops),
            "req/s",
        )
        .note(format!("{n} requests, 50 clients, list pre-filled")),
    );

    let pings: Vec<Vec<f64>> = (0..runs).map(|_| redis_pings(stack, sizes.pings)).collect();
    figures.push(
        Figure::new(
            format!("limit: Redis PING round trip p50 ({} PINGs)", sizes.pings),
            median_of(&pings, |run| median(run.clone())),
            "ms",
        )
        .note("one connection, redis crate")
        .is(Baseline::RedisRoundTrip),
    );
    figures
}

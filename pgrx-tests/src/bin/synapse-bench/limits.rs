//! Ceilings of the same Postgres and Redis, measured with their own tools: a
//! pgbench minimal task lifecycle, redis-benchmark LPUSH/RPOP/BRPOP, a Redis
//! PING round trip.
use std::time::{Duration, Instant};

use synapse_e2e::{redis, Stack};

use crate::figure::{median, median_of, ms, Baseline, Figure};
use crate::goals::one_i64;
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

fn pgbench_binary() -> std::path::PathBuf {
    // The private install's (scripts/env.sh exports PG_BIN), else PATH's.
    std::env::var_os("PG_BIN")
        .map(|dir| std::path::PathBuf::from(dir).join("pgbench"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "pgbench".into())
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
    let output = std::process::Command::new(pgbench_binary())
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
        .arg("-T")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-f")
        .arg(&script)
        .arg(synapse_e2e::DATABASE)
        .output()
        .expect("running pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
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

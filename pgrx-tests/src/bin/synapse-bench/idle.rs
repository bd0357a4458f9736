//! Idle: the stack and two workers left alone, with plans left waiting (a
//! map of child goals whose steps retry hours later, ten thousand steps
//! waiting for a signal or a time hours away, and a daily schedule). What
//! each side does while nothing is submitted: SQL statements, Redis commands,
//! WAL bytes, CPU seconds per process.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use synapse_e2e::{postgres, redis, submit_plan, wait_until, Stack, WorkerProcess};

use crate::cpu::{cpu_seconds, redis_pid};
use crate::figure::Figure;
use crate::options::Sizes;
use crate::targets::Metric;
use crate::workers;

/// The workers' lease (`synapse-worker run`'s default).
const LEASE: Duration = Duration::from_secs(30);

pub fn section(stack: &Stack, sizes: &Sizes) -> Vec<Figure> {
    let workers = workers::start(stack, "idle", 2, 32);
    park_a_plan_that_grew(stack);
    park_waits(stack);
    idle(stack, &workers.iter().collect::<Vec<_>>(), sizes.idle)
}

/// Leaves a goal waiting: a map step over three goal steps, each child's
/// only step failed once and retries in 12 h or more. Waiting maps and
/// children must cost nothing while idle.
fn park_a_plan_that_grew(stack: &Stack) {
    let mut client = stack.pg();
    let goal = submit_plan(
        &mut client,
        &json!({"steps": [{"id": "each", "action": "goal", "for_each": "[1, 2, 3]",
                           "params": {"blueprint": {"steps": [{"id": "later", "action": "fail",
                                                                "params": {"message": "not yet"},
                                                                "retries": 1, "backoff": "24h"}]}}}]}),
    );
    wait_until(
        "three child goals to wait for their retry",
        Duration::from_secs(60),
        || {
            let retrying: i64 = client
                .query_one(
                    "SELECT count(*) FROM synapse.tasks t JOIN synapse.goals c ON c.id = t.goal_id
                      WHERE c.parent_goal_id = $1 AND t.status = 'retrying'",
                    &[&goal],
                )
                .unwrap()
                .get(0);
            (retrying == 3).then_some(())
        },
    );
}

/// Steps waiting for what is hours away: 10 000 signals (half with a
/// timeout in 12 h), 100 timers of 12 h, and a schedule that runs daily. Each
/// armed deadline is the forwarder's to keep, without looking before it.
fn park_waits(stack: &Stack) {
    let mut client = stack.pg();
    let plans = [
        (
            5_000,
            json!({"steps": [{"id": "hold", "action": "wait", "params": {"signal": "never"}}]}),
        ),
        (
            5_000,
            json!({"steps": [{"id": "hold", "action": "wait",
                              "params": {"signal": "never", "timeout": "12h"}}]}),
        ),
        (
            100,
            json!({"steps": [{"id": "hold", "action": "wait", "params": {"for": "12h"}}]}),
        ),
    ];
    for (count, plan) in &plans {
        client
            .execute(
                "SELECT synapse.submit_plan($1::text::jsonb) FROM generate_series(1, $2::int)",
                &[&plan.to_string(), count],
            )
            .expect("parking waits");
    }
    // Twelve hours from now, whatever the time of day.
    client
        .execute(
            "SELECT synapse.schedule('bench-daily', format('%s %s * * *', extract(minute FROM t)::int,
                                                            extract(hour FROM t)::int), 'bench daily run')
               FROM (SELECT now() AT TIME ZONE 'UTC' + interval '12 hours' AS t) later",
            &[],
        )
        .expect("scheduling");
    wait_until("the waits to wait", Duration::from_secs(120), || {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM synapse.tasks WHERE step = 'hold' AND status = 'waiting'",
                &[],
            )
            .unwrap()
            .get(0);
        (waiting == 10_100).then_some(())
    });
}

/// Calls so far of each statement pg_stat_statements tracks, but for the
/// bench's own reads of statistics and WAL positions.
fn calls(client: &mut postgres::Client) -> HashMap<String, i64> {
    client
        .query(
            "SELECT query, sum(calls)::bigint FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat%'
               AND query NOT LIKE '%pg_current_wal_lsn%' GROUP BY query",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Names the processes to watch while idle: each worker, Redis, and each
/// Postgres process by its backend type.
fn idle_processes(
    stack: &Stack,
    client: &mut postgres::Client,
    workers: &[&WorkerProcess],
) -> Vec<(String, u32)> {
    let types: HashMap<u32, String> = client
        .query(
            "SELECT pid, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .into_iter()
        .map(|row| (row.get::<_, i32>(0) as u32, row.get(1)))
        .collect();
    let pids = stack.postgres_pids();
    let postmaster = pids.first().copied();
    let postgres = pids.into_iter().filter_map(|pid| {
        let kind = if Some(pid) == postmaster {
            "postmaster".to_owned()
        } else {
            // Ours (the probe's backend) is left out.
            types.get(&pid)?.clone()
        };
        Some((format!("postgres {kind}"), pid))
    });
    workers
        .iter()
        .enumerate()
        .map(|(i, worker)| (format!("worker {}", i + 1), worker.pid()))
        .chain(postgres)
        .chain(redis_pid(stack).map(|pid| ("redis".to_owned(), pid)))
        .collect()
}

/// The stack and two workers left alone: what each side does while idle.
fn idle(stack: &Stack, workers: &[&WorkerProcess], window: Duration) -> Vec<Figure> {
    let mut client = stack.pg();
    let mut redis = stack.redis();
    // Let the last events drain first.
    wait_until("the outbox to drain", Duration::from_secs(60), || {
        (stack.forwarder_status(&mut client)["pending"] == 0).then_some(())
    });
    // Autovacuum work left by the earlier sections would otherwise land in the window.
    client.batch_execute("VACUUM (ANALYZE)").expect("VACUUM");
    let statements = |client: &mut postgres::Client| -> i64 { calls(client).values().sum() };
    let commands = |redis: &mut redis::Connection| -> i64 {
        let info: String = redis::cmd("INFO").arg("commandstats").query(redis).unwrap();
        info.lines()
            .filter(|line| line.starts_with("cmdstat_") && !line.starts_with("cmdstat_info"))
            .filter_map(|line| {
                line.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
            .sum()
    };
    let wal = |client: &mut postgres::Client| -> i64 {
        client
            .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
            .unwrap()
            .get(0)
    };
    // The forwarder wakes once at the lease expiry of the last task claimed
    // (it learnt that deadline from the claim; the task has ended since): wait
    // for a quiet lease period, so the window sees what idle costs from then on.
    if window >= Duration::from_secs(60) {
        let quiet_for = LEASE + Duration::from_secs(2);
        let mut last = (statements(&mut client), Instant::now());
        wait_until("a quiet lease period", Duration::from_secs(300), || {
            let now = statements(&mut client);
            if now != last.0 {
                last = (now, Instant::now());
            }
            std::thread::sleep(Duration::from_secs(1));
            (last.1.elapsed() >= quiet_for).then_some(())
        });
    }
    let processes = idle_processes(stack, &mut client, workers);
    let cpu_before: Vec<f64> = processes.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let (sql_before, redis_before, wal_before) =
        (calls(&mut client), commands(&mut redis), wal(&mut client));
    // Nothing announces "nothing happened": observe a quiet window.
    std::thread::sleep(window);
    let (sql_after, redis_after, wal_after) =
        (calls(&mut client), commands(&mut redis), wal(&mut client));
    let seconds = window.as_secs();
    // Statements that ran are named, so that one can be told where it came from.
    let ran: Vec<String> = sql_after
        .iter()
        .filter_map(|(query, &after)| {
            let times = after - sql_before.get(query).copied().unwrap_or(0);
            let text: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
            (times > 0).then(|| format!("{times}× `{}`", text.chars().take(80).collect::<String>()))
        })
        .collect();
    let mut figures = vec![
        Figure::new(
            format!("idle {seconds} s: SQL statements (all clients)"),
            (sql_after.values().sum::<i64>() - sql_before.values().sum::<i64>()) as f64,
            "",
        )
        .note(if ran.is_empty() {
            "pg_stat_statements; a map of three child goals, 10 100 wait steps and a schedule wait meanwhile"
                .to_owned()
        } else {
            format!("pg_stat_statements: {}", ran.join("; "))
        })
        .metric(Metric::IdleStatements),
        Figure::new(
            format!("idle {seconds} s: Redis commands"),
            (redis_after - redis_before) as f64,
            "",
        )
        .note("INFO commandstats; blocked BRPOPs count when they return")
        .metric(Metric::IdleRedisCommands),
        Figure::new(
            format!("idle {seconds} s: WAL bytes"),
            (wal_after - wal_before) as f64,
            "B",
        )
        .note("whole cluster, after a VACUUM"),
    ];
    // Postgres processes of one type are summed (e.g. the client backends).
    let mut by_name: Vec<(String, f64, usize)> = Vec::new();
    let mut postgres_total = 0.0;
    for ((name, pid), before) in processes.iter().zip(cpu_before) {
        let used = cpu_seconds(*pid) - before;
        if name.starts_with("postgres") {
            postgres_total += used;
        }
        match by_name.iter_mut().find(|(known, _, _)| known == name) {
            Some(entry) => {
                entry.1 += used;
                entry.2 += 1;
            }
            None => by_name.push((name.clone(), used, 1)),
        }
    }
    for (name, used, count) in by_name {
        let name = if count > 1 {
            format!("{name} ×{count}")
        } else {
            name
        };
        figures.push(Figure::new(
            format!("idle {seconds} s: CPU of {name}"),
            used,
            "s",
        ));
    }
    figures.push(
        Figure::new(
            format!("idle {seconds} s: CPU of all postgres processes"),
            postgres_total,
            "s",
        )
        .note("postmaster and children, forwarder included"),
    );
    figures
}

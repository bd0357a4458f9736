//! Where Postgres's time goes in a measurement window: the statements
//! pg_stat_statements counted in one database, by execution time, per task.
use synapse_e2e::Stack;

use crate::figure::Figure;

/// The statements a window reports, the costliest first.
const REPORTED: i64 = 6;

/// Below this share of a task, a statement is left out (a poll, a start-up query).
const NEGLIGIBLE_US_PER_TASK: f64 = 0.1;

/// One statement's share of a window.
pub struct StatementUse {
    /// The start of its text, whitespace folded.
    pub label: String,
    /// Execution time (its triggers' statements included), µs per task.
    pub us_per_task: f64,
    pub calls_per_thousand_tasks: f64,
    pub rows_per_call: f64,
}

/// A window over pg_stat_statements (preloaded on the bench's cluster).
pub struct StatementWindow;

impl StatementWindow {
    /// Forgets every statement counted so far, in every database.
    pub fn open(stack: &Stack) -> StatementWindow {
        stack
            .pg()
            .batch_execute("SELECT pg_stat_statements_reset()")
            .expect("pg_stat_statements_reset");
        StatementWindow
    }

    /// The costliest statements of `database` since [`StatementWindow::open`].
    pub fn close(self, stack: &Stack, database: &str, tasks: f64) -> Vec<StatementUse> {
        stack
            .pg()
            .query(
                "SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 60), s.total_exec_time,
                        s.calls::float8, s.rows::float8
                   FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
                  WHERE d.datname = $1 AND s.query NOT LIKE '%pg_stat_statements%'
                  ORDER BY s.total_exec_time DESC LIMIT $2",
                &[&database, &REPORTED],
            )
            .expect("reading pg_stat_statements")
            .iter()
            .map(|row| {
                let (total_ms, calls, rows): (f64, f64, f64) = (row.get(1), row.get(2), row.get(3));
                StatementUse {
                    label: row.get(0),
                    us_per_task: total_ms * 1000.0 / tasks,
                    calls_per_thousand_tasks: calls * 1000.0 / tasks,
                    rows_per_call: if calls > 0.0 { rows / calls } else { 0.0 },
                }
            })
            .filter(|statement| statement.us_per_task >= NEGLIGIBLE_US_PER_TASK)
            .collect()
    }
}

/// One figure per statement of a run's profile: where its Postgres time went.
pub fn statement_figures(name: &str, statements: &[StatementUse]) -> Vec<Figure> {
    statements
        .iter()
        .map(|statement| {
            Figure::new(
                format!("{name}: Postgres time/task in `{}`", statement.label),
                statement.us_per_task,
                "µs",
            )
            .note(format!(
                "{:.1} calls per 1 000 tasks, {:.1} rows a call; pg_stat_statements, last run \
                 (execution, its triggers' statements included; not planning)",
                statement.calls_per_thousand_tasks, statement.rows_per_call
            ))
        })
        .collect()
}

//! What the console shows, read with its own role: row security decides
//! which goals it sees, and a section its role may not read says so.
use serde::Deserialize;
use serde_json::{json, Value};

use super::dag::{self, Direction};
use super::{history, ApiError};

/// Goals on a page.
const PAGE: i64 = 50;
/// Every status a goal can have (`synapse.goals.status`).
const GOAL_STATUSES: [&str; 6] = [
    "submitted",
    "planning",
    "running",
    "succeeded",
    "failed",
    "cancelled",
];

/// The goal list's filters (`api/goals?…`): every one optional.
#[derive(Debug, Default, Deserialize)]
pub struct GoalFilter {
    status: Option<String>,
    q: Option<String>,
    template: Option<String>,
    owner: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// `ILIKE` pattern matching `text` anywhere, its own `%`, `_` and `\` taken literally.
fn contains_pattern(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// The goals matching `filter`, newest first, a page at a time, with the
/// count of each status among those the other filters keep.
pub async fn goals(
    client: &tokio_postgres::Client,
    filter: &GoalFilter,
) -> Result<Value, ApiError> {
    if let Some(status) = given(&filter.status) {
        if !GOAL_STATUSES.contains(&status) {
            return Err(ApiError::bad_request(format!(
                "status: no goal status {status:?}"
            )));
        }
    }
    let limit = filter.limit.unwrap_or(PAGE).clamp(1, 500);
    let q = given(&filter.q).map(contains_pattern);
    let row = client
        .query_one(
            "WITH matching AS (
                 SELECT g.id, g.goal, g.status, g.owner::text AS owner, g.template, g.created_at,
                        g.finished_at, g.error, g.parent_goal_id
                   FROM synapse.goals AS g
                  WHERE ($1::text IS NULL OR g.goal ILIKE $1)
                    AND ($2::text IS NULL OR g.template = $2)
                    AND ($3::text IS NULL OR g.owner::text = $3)
                    AND ($4::text IS NULL OR g.created_at >= $4::timestamptz)
                    AND ($5::text IS NULL OR g.created_at < $5::timestamptz)),
             page AS (
                 SELECT * FROM matching
                  WHERE ($6::text IS NULL OR status = $6) AND ($7::bigint IS NULL OR id < $7)
                  ORDER BY id DESC LIMIT $8::bigint + 1)
             SELECT (SELECT coalesce(jsonb_object_agg(status, n), '{}')
                       FROM (SELECT status, count(*) AS n FROM matching GROUP BY status) AS c)::text,
                    (SELECT coalesce(jsonb_agg(to_jsonb(p) || jsonb_build_object('steps', s.steps) ORDER BY p.id DESC), '[]')
                       FROM page AS p
                       CROSS JOIN LATERAL (
                            SELECT jsonb_build_object(
                                       'total', count(*),
                                       'succeeded', count(*) FILTER (WHERE t.status = 'succeeded'),
                                       'failed', count(*) FILTER (WHERE t.status = 'failed'),
                                       'running', count(*) FILTER (WHERE t.status IN ('running', 'waiting')),
                                       'other', count(*) FILTER (WHERE t.status NOT IN ('succeeded', 'failed', 'running', 'waiting')))
                                   AS steps
                              FROM synapse.tasks AS t WHERE t.goal_id = p.id AND t.map_index IS NULL) AS s)::text",
            &[
                &q,
                &given(&filter.template),
                &given(&filter.owner),
                &given(&filter.since),
                &given(&filter.until),
                &given(&filter.status),
                &filter.before,
                &limit,
            ],
        )
        .await?;
    let mut counts = match json_column(&row, 0)? {
        counts @ Value::Object(_) => counts,
        _ => json!({}),
    };
    for status in GOAL_STATUSES {
        if counts.get(status).is_none() {
            counts[status] = json!(0);
        }
    }
    let mut goals: Vec<Value> = match json_column(&row, 1)? {
        Value::Array(goals) => goals,
        _ => Vec::new(),
    };
    let next_before = if goals.len() as i64 > limit {
        goals.truncate(limit as usize);
        goals.last().and_then(|goal| goal["id"].as_i64())
    } else {
        None
    };
    Ok(json!({"counts": counts, "goals": goals, "next_before": next_before}))
}

/// A goal as `synapse.goal_status` tells it, its plan drawn, and its history.
pub async fn goal(
    client: &tokio_postgres::Client,
    id: i64,
    direction: Direction,
) -> Result<Value, ApiError> {
    let row = client
        .query_one("SELECT synapse.goal_status($1)::text", &[&id])
        .await?;
    let goal = json_column(&row, 0)?;
    let svg = dag::render(&goal, direction);
    let events = history::events(&goal);
    Ok(json!({"goal": goal, "svg": svg, "events": events}))
}

/// The state of the system, each part on its own: a part the console's role
/// may not read (templates and schedules need the admin capability) says so.
pub async fn system(client: &tokio_postgres::Client) -> Value {
    let forwarder = part(client, "SELECT synapse.forwarder_status()::text")
        .await
        .unwrap_or_else(|error| error);
    let mut system = json!({ "forwarder": forwarder });
    for (name, sql) in [
        (
            "queues",
            "SELECT coalesce(jsonb_agg(q ORDER BY q.queue), '[]')::text FROM (
                 SELECT queue, count(*) FILTER (WHERE status = 'queued') AS queued,
                        count(*) FILTER (WHERE status = 'running') AS running,
                        count(*) FILTER (WHERE status = 'waiting') AS waiting
                   FROM synapse.tasks WHERE status IN ('queued', 'running', 'waiting')
                  GROUP BY queue) AS q",
        ),
        (
            "actions",
            "SELECT coalesce(jsonb_agg(a ORDER BY a.name), '[]')::text FROM (
                 SELECT name, description, builtin, registered_by, updated_at FROM synapse.actions) AS a",
        ),
        (
            "templates",
            "SELECT coalesce(jsonb_agg(t ORDER BY t.priority DESC, t.name), '[]')::text FROM (
                 SELECT name, description, pattern, priority, updated_at FROM synapse.templates) AS t",
        ),
        (
            "schedules",
            "SELECT coalesce(jsonb_agg(s ORDER BY s.name), '[]')::text FROM (
                 SELECT name, cron, time_zone, goal, planner, next_run_at, last_run_at, last_goal_id,
                        owner::text AS owner FROM synapse.schedules) AS s",
        ),
        (
            "workers",
            "SELECT coalesce(jsonb_agg(w ORDER BY w.last_seen_at DESC), '[]')::text FROM (
                 SELECT w.identity, w.queues, w.started_at, w.last_seen_at, w.stopped_at, w.lost_at,
                        (SELECT coalesce(jsonb_agg(a.name ORDER BY a.name), '[]') FROM synapse.actions AS a
                          WHERE a.registered_by = w.identity) AS actions
                   FROM synapse.workers AS w ORDER BY w.last_seen_at DESC LIMIT 200) AS w",
        ),
    ] {
        system[name] = part(client, sql).await.unwrap_or_else(|error| error);
    }
    system
}

/// Column `index` of `row`, JSON sent as text (SQL NULL: JSON null).
fn json_column(row: &tokio_postgres::Row, index: usize) -> Result<Value, ApiError> {
    let text: Option<&str> = row.try_get(index)?;
    text.map_or(Ok(Value::Null), |text| {
        serde_json::from_str(text).map_err(|error| ApiError::internal(format!("not JSON: {error}")))
    })
}

/// One part of the system page: its JSON, or `{"error": …}`.
async fn part(client: &tokio_postgres::Client, sql: &str) -> Result<Value, Value> {
    match client.query_one(sql, &[]).await {
        Ok(row) => json_column(&row, 0).map_err(|error| json!({"error": error.message})),
        Err(error) => Err(json!({"error": ApiError::from(error).message})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_search_takes_wildcards_literally() {
        assert_eq!(contains_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
    }
}

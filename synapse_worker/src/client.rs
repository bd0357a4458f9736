//! The client commands of `synapse-worker`: submit, status, watch, graph,
//! validate. They talk to Postgres only; waiting is done on NOTIFY events.
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::sync::watch;

/// A failure of a client command, and the exit code it maps to.
pub enum Failure {
    /// The connection string or another setting is unusable (exit 64).
    Config(anyhow::Error),
    /// Anything else (exit 1).
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Other(error)
    }
}

/// Result of a client command: `Ok(true)` ok / goal succeeded, `Ok(false)`
/// goal failed or blueprint invalid.
pub type Outcome = Result<bool, Failure>;

/// How long connecting may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The events a waiting command wants: those of one goal (of the goal
/// itself only, or of its tasks too). Every event of the cluster arrives on
/// the LISTEN connection; the connection's driver keeps these and drops the rest.
struct Interest {
    /// The goal, once known (0 before: nothing is of interest).
    goal_id: AtomicI64,
    /// Only `goal.*` events.
    goal_events_only: bool,
}

impl Interest {
    fn new(goal_events_only: bool) -> Arc<Self> {
        Arc::new(Self {
            goal_id: AtomicI64::new(0),
            goal_events_only,
        })
    }

    fn set_goal(&self, id: i64) {
        self.goal_id.store(id, Ordering::Relaxed);
    }

    fn matches(&self, payload: &str) -> bool {
        let id = self.goal_id.load(Ordering::Relaxed);
        if id == 0 {
            return false;
        }
        let Ok(event) = serde_json::from_str::<Value>(payload) else {
            return false;
        };
        let name = event["event"].as_str().unwrap_or_default();
        event["goal_id"].as_i64() == Some(id)
            && (!self.goal_events_only || name.starts_with("goal."))
    }
}

/// Wake-ups of a waiting command: a count of the events of interest, not a
/// queue of them (a waiter re-reads the goal whatever the count moved by, so
/// nothing piles up however busy the cluster is). Closed with the connection.
type Wakeups = watch::Receiver<u64>;

/// Connects; a URL that does not parse is a configuration error. NOTIFY
/// events matching `interest` move the returned [`Wakeups`].
async fn connect(
    url: &str,
    interest: Option<Arc<Interest>>,
) -> Result<(tokio_postgres::Client, Wakeups), Failure> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|error| {
        Failure::Config(anyhow::anyhow!(
            "--database-url is not a valid Postgres URL: {error}"
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, mut connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .context("cannot connect to Postgres (check --database-url / SYNAPSE_DATABASE_URL)")?;
    let (wake, wakeups) = watch::channel(0u64);
    tokio::spawn(async move {
        // Drive the connection; count the events of interest. Dropping `wake`
        // at the end tells the waiter that the connection closed.
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let (Some(interest), Ok(tokio_postgres::AsyncMessage::Notification(note))) =
                (&interest, message)
            {
                if interest.matches(note.payload()) {
                    wake.send_modify(|count| *count = count.wrapping_add(1));
                }
            }
        }
    });
    Ok((client, wakeups))
}

/// Postgres errors as users should read them: the server's message.
fn db_error(error: tokio_postgres::Error) -> anyhow::Error {
    match error.as_db_error() {
        Some(db) => anyhow::anyhow!("{}", db.message()),
        None => anyhow::Error::new(error),
    }
}

fn has_ended(status: &Value) -> bool {
    matches!(
        status["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

async fn goal_status(client: &tokio_postgres::Client, id: i64) -> anyhow::Result<Value> {
    Ok(client
        .query_one("SELECT synapse.goal_status($1)", &[&id])
        .await
        .map_err(db_error)?
        .get(0))
}

/// Waits until an event of interest arrived since the last call (or since
/// `wakeups` was made), or `deadline` passes.
async fn next_event(
    wakeups: &mut Wakeups,
    id: i64,
    deadline: Option<tokio::time::Instant>,
) -> anyhow::Result<()> {
    let changed = wakeups.changed();
    let changed = match deadline {
        None => changed.await,
        Some(deadline) => match tokio::time::timeout_at(deadline, changed).await {
            Ok(changed) => changed,
            Err(_) => bail!("goal {id} did not end within the --timeout"),
        },
    };
    changed.map_err(|_| anyhow::anyhow!("the Postgres connection closed while waiting"))
}

/// `submit`: records a goal; with `wait`, waits on its events until it ends.
pub async fn submit(
    url: &str,
    goal: &str,
    input: &str,
    planner: &str,
    wait: bool,
    timeout: Option<Duration>,
) -> Outcome {
    let input: Value = serde_json::from_str(input).context("--input is not JSON")?;
    let interest = Interest::new(true);
    let (client, mut wakeups) = connect(url, wait.then(|| interest.clone())).await?;
    if wait {
        // Listen before submitting, so the end cannot slip by unseen.
        client
            .batch_execute("LISTEN synapse_events")
            .await
            .map_err(db_error)?;
    }
    let id: i64 = client
        .query_one(
            "SELECT synapse.submit_goal($1, $2, $3)",
            &[&goal, &input, &planner],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if !wait {
        println!("{id}");
        return Ok(true);
    }
    eprintln!("goal {id} submitted; waiting for it to end");
    interest.set_goal(id);
    let deadline = timeout.map(|limit| tokio::time::Instant::now() + limit);
    let status = loop {
        // Whatever arrived before this read is in it.
        wakeups.borrow_and_update();
        let status = goal_status(&client, id).await?;
        if has_ended(&status) {
            break status;
        }
        next_event(&mut wakeups, id, deadline).await?;
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&status).context("printing the status")?
    );
    Ok(status["status"] == "succeeded")
}

/// `status`: the goal as JSON.
pub async fn status(url: &str, id: i64) -> Outcome {
    let (client, _) = connect(url, None).await?;
    let status = goal_status(&client, id).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&status).context("printing the status")?
    );
    Ok(true)
}

/// `graph`: Mermaid or DOT on stdout, or an SVG file rendered by Graphviz.
pub async fn graph(url: &str, id: i64, format: &str, output: Option<&std::path::Path>) -> Outcome {
    let (client, _) = connect(url, None).await?;
    let format = if output.is_some() { "dot" } else { format };
    let text: String = client
        .query_one("SELECT synapse.goal_graph($1, $2)", &[&id, &format])
        .await
        .map_err(db_error)?
        .get(0);
    let Some(path) = output else {
        print!("{text}");
        return Ok(true);
    };
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(Failure::Config(anyhow::anyhow!(
            "--output must name an .svg file"
        )));
    }
    let mut dot = std::process::Command::new("dot")
        .arg("-Tsvg")
        .arg("-o")
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("rendering SVG needs Graphviz's `dot` (apt-get install graphviz)")?;
    dot.stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .context("writing to dot")?;
    let exit = dot.wait().context("waiting for dot")?;
    if !exit.success() {
        return Err(anyhow::anyhow!("dot failed ({exit})").into());
    }
    eprintln!("wrote {}", path.display());
    Ok(true)
}

/// `validate`: every problem of a blueprint file, with its JSON path.
pub async fn validate(url: &str, file: &std::path::Path) -> Outcome {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    // The extension knows the registered actions; the checks are the same code either way.
    let (client, _) = connect(url, None).await?;
    let problems: Value = client
        .query_one("SELECT synapse.validate_blueprint($1)", &[&doc])
        .await
        .map_err(db_error)?
        .get(0);
    let problems = problems.as_array().cloned().unwrap_or_default();
    for problem in &problems {
        println!(
            "{}: {}",
            problem["path"].as_str().unwrap_or("$"),
            problem["message"].as_str().unwrap_or("")
        );
    }
    if problems.is_empty() {
        println!("{}: ok", file.display());
    }
    Ok(problems.is_empty())
}

/// One line per step for `watch`.
const WATCH_QUERY: &str = "
    SELECT t.step, t.action, t.status, t.attempts,
           (extract(epoch FROM coalesce(t.finished_at, clock_timestamp()) - t.started_at) * 1000)::float8,
           t.error
      FROM synapse.tasks t WHERE t.goal_id = $1 ORDER BY t.id";

fn render(status: &Value, rows: &[tokio_postgres::Row]) -> String {
    let mut out = format!(
        "goal {} · {} · {}\n",
        status["id"],
        status["goal"].as_str().unwrap_or_default(),
        status["status"].as_str().unwrap_or_default()
    );
    if let Some(error) = status["error"].as_str() {
        out.push_str(&format!("  error: {error}\n"));
    }
    out.push_str(&format!(
        "  {:<20} {:<10} {:<10} {:>7} {:>10}\n",
        "STEP", "ACTION", "STATUS", "ATTEMPT", "DURATION"
    ));
    for row in rows {
        let duration: Option<f64> = row.get(4);
        let duration = duration.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0}ms"));
        out.push_str(&format!(
            "  {:<20} {:<10} {:<10} {:>7} {:>10}",
            row.get::<_, &str>(0),
            row.get::<_, &str>(1),
            row.get::<_, &str>(2),
            row.get::<_, i32>(3),
            duration
        ));
        if let Some(error) = row.get::<_, Option<&str>>(5) {
            out.push_str(&format!("  {error}"));
        }
        out.push('\n');
    }
    for edge in status["edges"].as_array().into_iter().flatten() {
        let when = edge["when"]
            .as_str()
            .map(|w| format!(" [{w}]"))
            .unwrap_or_default();
        let on = match edge["on"].as_str() {
            Some("success") | None => String::new(),
            Some(on) => format!(" (on {on})"),
        };
        out.push_str(&format!(
            "  {} → {}{when}{on}: {}\n",
            edge["from"].as_str().unwrap_or_default(),
            edge["to"].as_str().unwrap_or_default(),
            edge["state"].as_str().unwrap_or_default()
        ));
    }
    out
}

/// `watch`: a live view redrawn at each event of the goal; exits when it ends.
pub async fn watch(url: &str, id: i64) -> Outcome {
    let interest = Interest::new(false);
    interest.set_goal(id);
    let (client, mut wakeups) = connect(url, Some(interest)).await?;
    client
        .batch_execute("LISTEN synapse_events")
        .await
        .map_err(db_error)?;
    let terminal = std::io::stdout().is_terminal();
    let mut shown = String::new();
    loop {
        // Whatever arrived before these reads is in them.
        wakeups.borrow_and_update();
        let status = goal_status(&client, id).await?;
        let rows = client.query(WATCH_QUERY, &[&id]).await.map_err(db_error)?;
        let view = render(&status, &rows);
        if terminal {
            // Clear and redraw in place.
            print!("\x1b[2J\x1b[H{view}");
        } else if view != shown {
            println!("{view}");
        }
        std::io::stdout().flush().context("writing to stdout")?;
        shown = view;
        if has_ended(&status) {
            return Ok(status["status"] == "succeeded");
        }
        next_event(&mut wakeups, id, None).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_goal_s_events_are_of_interest() {
        let goal = Interest::new(true);
        let task_event = r#"{"v":1,"event":"task.queued","goal_id":7,"task_id":42}"#;
        let goal_event = r#"{"v":1,"event":"goal.succeeded","goal_id":7}"#;
        let other_goal = r#"{"v":1,"event":"goal.succeeded","goal_id":77}"#;
        assert!(!goal.matches(goal_event), "no goal yet");
        goal.set_goal(7);
        assert!(goal.matches(goal_event));
        assert!(!goal.matches(task_event));
        assert!(!goal.matches(other_goal));
        assert!(!goal.matches("not json"));
        let all = Interest::new(false);
        all.set_goal(7);
        assert!(all.matches(task_event));
        assert!(all.matches(goal_event));
        assert!(!all.matches(other_goal));
    }

    #[tokio::test]
    async fn waiting_ends_at_an_event_the_deadline_or_a_closed_connection() {
        let (wake, mut wakeups) = watch::channel(0u64);
        // Events that arrived while nobody waited are not lost, and count once.
        wake.send_modify(|n| *n += 1);
        wake.send_modify(|n| *n += 1);
        next_event(&mut wakeups, 1, None).await.unwrap();
        let soon = tokio::time::Instant::now() + Duration::from_millis(10);
        let late = next_event(&mut wakeups, 1, Some(soon)).await.unwrap_err();
        assert_eq!(late.to_string(), "goal 1 did not end within the --timeout");
        drop(wake);
        let closed = next_event(&mut wakeups, 1, None).await.unwrap_err();
        assert_eq!(
            closed.to_string(),
            "the Postgres connection closed while waiting"
        );
    }
}

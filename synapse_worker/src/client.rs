//! The client commands of `synapse-worker`: submit, status, watch, graph,
//! validate. They talk to Postgres only; waiting is done on NOTIFY events.
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::sync::watch;

use synapse_worker::blueprint;
use synapse_worker::connection_error;
use synapse_worker::postgres_tls;

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

/// A connection setting and where it came from (`--database-url`,
/// `SYNAPSE_DATABASE_URL`, `./.synapse/env` or the built-in default), named
/// in errors so a user knows which one to fix.
pub struct Setting {
    /// The value (a connection string: never printed unmasked).
    pub value: String,
    /// Where it came from.
    pub origin: &'static str,
}

impl Setting {
    /// Whether someone chose it (anything but the built-in default).
    fn is_configured(&self) -> bool {
        self.origin != "the built-in default"
    }

    /// Where the URL came from, and how to change it.
    fn hint(&self) -> String {
        if self.is_configured() {
            format!("the URL is from {}", self.origin)
        } else {
            "the URL is the built-in default; set --database-url or SYNAPSE_DATABASE_URL, or run `make up`"
                .to_owned()
        }
    }
}

/// Connects; a URL that does not parse is a configuration error. NOTIFY
/// events matching `interest` move the returned [`Wakeups`].
async fn connect(
    database: &Setting,
    interest: Option<Arc<Interest>>,
) -> Result<(tokio_postgres::Client, Wakeups), Failure> {
    let url = database.value.as_str();
    let (mut config, tls) = postgres_tls::configure(url).map_err(|error| {
        Failure::Config(anyhow::anyhow!(
            "the Postgres URL from {} is not valid: {error}",
            database.origin
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let (client, mut connection) = config.connect(tls).await.map_err(|error| {
        anyhow::anyhow!(
            "{} ({})",
            connection_error::cannot_connect(url, &error),
            database.hint()
        )
    })?;
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

/// What `submit` records.
pub enum Submission {
    /// A goal text, planned by `planner`.
    Goal {
        /// The goal text.
        text: String,
        /// Planner name.
        planner: String,
    },
    /// A blueprint file, submitted as it is (`synapse.submit_plan`).
    Plan(std::path::PathBuf),
}

/// How `submit --wait` waits and reports.
pub struct Wait {
    /// Print the whole status as JSON, not the one-line summary.
    pub json: bool,
    /// Give up after this long.
    pub timeout: Option<Duration>,
}

/// Reads a JSON file the user named: unreadable is a configuration error
/// (exit 64), not JSON an error about its content (exit 1).
fn read_json_file(file: &std::path::Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {}", file.display()))
        .map_err(Failure::Config)?;
    Ok(serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?)
}

/// `submit --plan FILE --inputs FILE`: one goal of the blueprint per line of
/// `inputs` (JSON Lines; blank lines are skipped), submitted together
/// (`synapse.submit_plans`); prints their ids, one per line, in order.
pub async fn submit_many(
    database: &Setting,
    plan: &std::path::Path,
    inputs: &std::path::Path,
) -> Outcome {
    // Read before connecting: a missing file needs no database to be reported.
    let blueprint = read_json_file(plan)?;
    let text = std::fs::read_to_string(inputs)
        .with_context(|| format!("cannot read {}", inputs.display()))
        .map_err(Failure::Config)?;
    let mut values = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {} is not JSON", inputs.display(), index + 1))?;
        values.push(value);
    }
    let (client, _) = connect(database, None).await?;
    let ids: Vec<i64> = client
        .query_one(
            "SELECT synapse.submit_plans($1, $2)",
            &[&blueprint, &values],
        )
        .await
        .map_err(db_error)?
        .get(0);
    let mut out = std::io::stdout().lock();
    for id in ids {
        writeln!(out, "{id}").context("writing the ids")?;
    }
    Ok(true)
}

/// `submit`: records a goal or a blueprint; with `wait`, waits on its events
/// until it ends, then prints a one-line summary (or the status as JSON).
pub async fn submit(
    database: &Setting,
    what: Submission,
    input: &str,
    wait: Option<Wait>,
) -> Outcome {
    let input: Value = serde_json::from_str(input).context("--input is not JSON")?;
    // Read before connecting: a missing file needs no database to be reported.
    let what = match what {
        Submission::Plan(file) => Ok(read_json_file(&file)?),
        Submission::Goal { text, planner } => Err((text, planner)),
    };
    let interest = Interest::new(true);
    let (client, mut wakeups) = connect(database, wait.is_some().then(|| interest.clone())).await?;
    if wait.is_some() {
        // Listen before submitting, so the end cannot slip by unseen.
        client
            .batch_execute("LISTEN synapse_events")
            .await
            .map_err(db_error)?;
    }
    let submitted = match &what {
        Ok(blueprint) => {
            client
                .query_one("SELECT synapse.submit_plan($1, $2)", &[blueprint, &input])
                .await
        }
        Err((text, planner)) => {
            client
                .query_one(
                    "SELECT synapse.submit_goal($1, $2, $3)",
                    &[text, &input, planner],
                )
                .await
        }
    };
    let id: i64 = submitted.map_err(db_error)?.get(0);
    let Some(wait) = wait else {
        println!("{id}");
        return Ok(true);
    };
    eprintln!("goal {id} submitted; waiting for it to end");
    interest.set_goal(id);
    let deadline = wait
        .timeout
        .map(|limit| tokio::time::Instant::now() + limit);
    let mut notes_shown = HashSet::new();
    let status = loop {
        // Whatever arrived before this read is in it.
        wakeups.borrow_and_update();
        let status = goal_status(&client, id).await?;
        if has_ended(&status) {
            break status;
        }
        // Work nothing will run, e.g. `queue gpu: no worker`: said once.
        for note in new_notes(&status, &mut notes_shown) {
            eprintln!("goal {id}: {note}");
        }
        next_event(&mut wakeups, id, deadline).await?;
    };
    if wait.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("printing the status")?
        );
    } else {
        // From submission to the end, as Postgres recorded them.
        let seconds: Option<f64> = client
            .query_one(
                "SELECT extract(epoch FROM ($1::jsonb->>'finished_at')::timestamptz
                                        - ($1::jsonb->>'created_at')::timestamptz)::float8",
                &[&status],
            )
            .await
            .map_err(db_error)?
            .get(0);
        println!("{}", summary(&status, seconds));
    }
    Ok(status["status"] == "succeeded")
}

/// `goal 42 succeeded in 1.2 s: {"result":…}`, `goal 42 failed: <error>`,
/// `goal 42 cancelled: <error>`.
fn summary(status: &Value, seconds: Option<f64>) -> String {
    let id = &status["id"];
    let state = status["status"].as_str().unwrap_or("ended");
    if state == "succeeded" {
        let took = seconds.map_or_else(String::new, |s| format!(" in {}", format_seconds(s)));
        format!("goal {id} succeeded{took}: {}", status["result"])
    } else {
        let error = status["error"].as_str().unwrap_or("no error recorded");
        format!("goal {id} {state}: {error}")
    }
}

/// `0.06 s`, `1.2 s`, `95 s`.
fn format_seconds(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{seconds:.2} s")
    } else if seconds < 10.0 {
        format!("{seconds:.1} s")
    } else {
        format!("{seconds:.0} s")
    }
}

/// The goal's notes (work no live worker serves) not in `shown` yet; adds them.
fn new_notes(status: &Value, shown: &mut HashSet<String>) -> Vec<String> {
    status["notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|note| shown.insert((*note).to_owned()))
        .map(str::to_owned)
        .collect()
}

/// The failed attempts of `step` in a goal status, each as one line:
/// `attempt 1 failed on w1 (01:02:03.456 → 01:02:03.789): boom`.
fn attempt_lines(status: &Value, step: &str) -> Vec<(i64, String)> {
    let history = status["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|task| task["step"] == step)
        .and_then(|task| task["attempts_history"].as_array());
    let time = |value: &Value| {
        // goal_status gives `2026-11-30T01:02:03.456789+00:00`: the time of day.
        value
            .as_str()
            .and_then(|text| text.split_once('T'))
            .map(|(_, time)| time.chars().take(12).collect::<String>())
            .unwrap_or_else(|| "?".to_owned())
    };
    history
        .into_iter()
        .flatten()
        .map(|attempt| {
            let number = attempt["attempt"].as_i64().unwrap_or_default();
            (
                number,
                format!(
                    "attempt {number} failed on {} ({} → {}): {}",
                    attempt["worker"].as_str().unwrap_or("an unknown worker"),
                    time(&attempt["started_at"]),
                    time(&attempt["finished_at"]),
                    attempt["error"].as_str().unwrap_or_default()
                ),
            )
        })
        .collect()
}

/// `status`: the goal as JSON.
pub async fn status(database: &Setting, id: i64) -> Outcome {
    let (client, _) = connect(database, None).await?;
    let status = goal_status(&client, id).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&status).context("printing the status")?
    );
    Ok(true)
}

/// `signal`: delivers a signal; says whether a waiting step took it or it
/// is kept for one.
pub async fn signal(database: &Setting, id: i64, name: &str, payload: &str) -> Outcome {
    let payload: Value = serde_json::from_str(payload).context("--payload is not JSON")?;
    let (client, _) = connect(database, None).await?;
    let taken: bool = client
        .query_one(
            "SELECT synapse.signal($1, $2, $3::text::jsonb)",
            &[&id, &name, &payload.to_string()],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if taken {
        println!("signal {name} taken by a waiting step of goal {id}");
    } else {
        println!("signal {name} kept until a step of goal {id} waits for it");
    }
    Ok(true)
}

/// `retry`: runs a finished goal again from `from` (default: its failed
/// and cancelled steps); false when it is still running.
pub async fn retry(database: &Setting, id: i64, from: &[String]) -> Outcome {
    let (client, _) = connect(database, None).await?;
    let steps = (!from.is_empty()).then_some(from);
    let retried: bool = client
        .query_one("SELECT synapse.retry_goal($1, $2)", &[&id, &steps])
        .await
        .map_err(db_error)?
        .get(0);
    if retried {
        println!("goal {id} runs again (follow it with: synapse-worker watch {id})");
    } else {
        eprintln!("goal {id} has not finished: nothing to run again");
    }
    Ok(retried)
}

/// `graph`: Mermaid or DOT on stdout, or an SVG file rendered by Graphviz.
pub async fn graph(
    database: &Setting,
    id: i64,
    format: &str,
    output: Option<&std::path::Path>,
) -> Outcome {
    let (client, _) = connect(database, None).await?;
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

/// One entry of an `--actions` catalogue. `description` is accepted (and not
/// used); `params_schema`, when given, must be a valid JSON Schema.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueEntry {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    params_schema: Option<Value>,
}

/// The actions of an `--actions` catalogue file, with their `params_schema`.
fn catalogue(file: &std::path::Path) -> Result<Vec<(String, Option<Value>)>, Failure> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the --actions catalogue {}", file.display()))
        .map_err(Failure::Config)?;
    let entries: Vec<CatalogueEntry> = serde_json::from_str(&text)
        .with_context(|| {
            format!(
                "the --actions catalogue {} is not a JSON list of {{\"name\", \"description\", \"params_schema\"}}",
                file.display()
            )
        })
        .map_err(Failure::Config)?;
    for entry in &entries {
        if let Some(schema) = &entry.params_schema {
            if let Err(error) = blueprint::ParamsSchema::new(schema) {
                return Err(Failure::Config(anyhow::anyhow!(
                    "the --actions catalogue {}: the params_schema of \"{}\" is not a valid JSON Schema: {error}",
                    file.display(),
                    entry.name
                )));
            }
        }
    }
    Ok(entries
        .into_iter()
        .map(|entry| (entry.name, entry.params_schema))
        .collect())
}

/// The actions registered in `synapse.actions`, with their `params_schema`.
async fn registered_actions(database: &Setting) -> Result<Vec<(String, Option<Value>)>, Failure> {
    let (client, _) = connect(database, None).await?;
    let rows = client
        .query("SELECT name, params_schema FROM synapse.actions", &[])
        .await
        .map_err(db_error)?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// `validate`: every problem of a blueprint file, with its JSON path, by the
/// same checks the extension runs. Known actions: the built-ins, those of
/// the `actions` catalogue and, when a database is configured, those
/// registered in it (the catalogue's entry wins for an action in both). Each
/// step's `params` are checked against its action's `params_schema`, if any.
/// No database is needed otherwise.
pub async fn validate(
    database: &Setting,
    file: &std::path::Path,
    actions: Option<&std::path::Path>,
) -> Outcome {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {}", file.display()))
        .map_err(Failure::Config)?;
    let listed = match actions {
        Some(catalogue_file) => catalogue(catalogue_file)?,
        None => Vec::new(),
    };
    let mut known: HashMap<String, Option<Value>> = HashMap::new();
    if database.is_configured() {
        match registered_actions(database).await {
            Ok(registered) => known.extend(registered),
            // The stack file is a convenience: without its stack, check offline.
            Err(Failure::Other(error)) if database.origin == "./.synapse/env" => {
                eprintln!("note: checking without the registered actions: {error:#}");
            }
            Err(failure) => return Err(failure),
        }
    }
    known.extend(listed);
    let problems = match serde_json::from_str::<Value>(&text) {
        Err(error) => vec![blueprint::Problem {
            path: "$".to_owned(),
            message: format!("not JSON: {error}"),
        }],
        Ok(doc) => match blueprint::validate_with_params_schemas(
            &doc,
            &|name| known.contains_key(name),
            &|name| known.get(name).cloned().flatten(),
            &|| {},
        ) {
            Ok(_) => Vec::new(),
            Err(problems) => problems,
        },
    };
    for problem in &problems {
        println!("{problem}");
    }
    if problems.is_empty() {
        println!("{}: ok", file.display());
    }
    Ok(problems.is_empty())
}

/// `plan`: how a goal text would be planned (`synapse.plan_preview`), told
/// readably; `Ok(false)` when no template matches or there are problems.
pub async fn plan(database: &Setting, goal: &str, input: &str, json: bool) -> Outcome {
    let input: Value = serde_json::from_str(input).context("--input is not JSON")?;
    let (client, _) = connect(database, None).await?;
    let preview: Value = client
        .query_one("SELECT synapse.plan_preview($1, $2)", &[&goal, &input])
        .await
        .map_err(db_error)?
        .get(0);
    let matched = preview["template"].is_string();
    let problems = preview["problems"].as_array().cloned().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&preview).context("printing the preview")?
        );
    } else {
        print!("{}", render_preview(&preview));
    }
    Ok(matched && problems.is_empty())
}

fn render_preview(preview: &Value) -> String {
    let mut out = String::new();
    match preview["template"].as_str() {
        Some(template) => out.push_str(&format!("template: {template}\n")),
        None => out.push_str("template: none matches\n"),
    }
    if let Some(params) = preview["params"].as_object().filter(|p| !p.is_empty()) {
        out.push_str("params:\n");
        for (name, value) in params {
            out.push_str(&format!("  {name} = {value}\n"));
        }
    }
    let blueprint = &preview["blueprint"];
    if let Some(steps) = blueprint["steps"].as_array() {
        out.push_str("steps:\n");
        for step in steps {
            out.push_str(&format!(
                "  {} ({})",
                step["id"].as_str().unwrap_or("?"),
                step["action"].as_str().unwrap_or("?")
            ));
            if let Some(params) = step.get("params").filter(|p| !p.is_null()) {
                out.push_str(&format!(" {params}"));
            }
            out.push('\n');
        }
    }
    if let Some(edges) = blueprint["edges"].as_array().filter(|e| !e.is_empty()) {
        out.push_str("edges:\n");
        for edge in edges {
            out.push_str(&format!(
                "  {} → {}",
                edge["from"].as_str().unwrap_or("?"),
                edge["to"].as_str().unwrap_or("?")
            ));
            if let Some(when) = edge["when"].as_str() {
                out.push_str(&format!(" when {when}"));
            }
            if let Some(on) = edge["on"].as_str().filter(|on| *on != "success") {
                out.push_str(&format!(" on {on}"));
            }
            out.push('\n');
        }
    }
    if let Some(output) = blueprint.get("output").filter(|o| !o.is_null()) {
        out.push_str(&format!("output: {output}\n"));
    }
    let problems = preview["problems"].as_array().cloned().unwrap_or_default();
    if !problems.is_empty() {
        out.push_str("problems:\n");
        for problem in &problems {
            match (problem["path"].as_str(), problem["message"].as_str()) {
                (Some(path), Some(message)) => {
                    out.push_str(&format!("  {path}: {message}\n"));
                }
                (None, Some(message)) => out.push_str(&format!("  {message}\n")),
                _ => out.push_str(&format!("  {problem}\n")),
            }
        }
    }
    out
}

/// One line per step for `watch` (a map step once, with its instances' counts).
const WATCH_QUERY: &str = "
    SELECT t.step, t.action, t.status, t.attempts,
           (extract(epoch FROM coalesce(t.finished_at, clock_timestamp()) - t.started_at) * 1000)::float8,
           t.error, t.map_size, coalesce(t.map_ended, 0), coalesce(t.map_failed, 0),
           CASE WHEN t.until_expr IS NOT NULL THEN t.iteration END, t.child_goal_id,
           CASE WHEN t.action = 'wait' THEN t.params END
      FROM synapse.tasks t WHERE t.goal_id = $1 AND t.map_index IS NULL ORDER BY t.id";

/// What a step's line adds: a map step's counts, a loop's iteration, a goal
/// step's child goal, what a wait step waits for.
fn detail(row: &tokio_postgres::Row) -> Option<String> {
    let map = row.get::<_, Option<i32>>(6).map(|size| {
        (
            size.into(),
            row.get::<_, i32>(7).into(),
            row.get::<_, i32>(8).into(),
        )
    });
    let wait: Option<Value> = row.get(11);
    synapse_worker::graph::detail(map, row.get(9), row.get(10), wait.as_ref())
}

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
    for note in status["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("  note: {}\n", note.as_str().unwrap_or_default()));
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
        if let Some(detail) = detail(row) {
            out.push_str(&format!("  {detail}"));
        }
        if let Some(error) = row.get::<_, Option<&str>>(5) {
            out.push_str(&format!("  {error}"));
        }
        out.push('\n');
        for (_, line) in attempt_lines(status, row.get::<_, &str>(0)) {
            out.push_str(&format!("      {line}\n"));
        }
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

/// A task as `watch` compares it between reads: a change of any of these is
/// a line.
#[derive(PartialEq)]
struct TaskState {
    status: String,
    attempts: i32,
    detail: Option<String>,
}

/// One line for a task that changed, e.g. `fetch: succeeded (sql, attempt 1, 12ms)`
/// or `load: retrying (fail, attempt 1, 4ms): connection reset`.
fn change_line(row: &tokio_postgres::Row) -> String {
    let step: &str = row.get(0);
    let action: &str = row.get(1);
    let status: &str = row.get(2);
    let attempts: i32 = row.get(3);
    let duration: Option<f64> = row.get(4);
    let mut line = format!("{step}: {status} ({action}, attempt {attempts}");
    if status != "running" {
        if let Some(ms) = duration {
            line.push_str(&format!(", {ms:.0}ms"));
        }
    }
    line.push(')');
    if let Some(detail) = detail(row) {
        line.push_str(&format!(" {detail}"));
    }
    if let Some(error) = row.get::<_, Option<&str>>(5) {
        line.push_str(&format!(": {error}"));
    }
    line
}

/// What a non-terminal `watch` has printed besides task states: failed
/// attempts (step, number, line) and notes.
#[derive(Default)]
struct Seen {
    attempts: HashSet<(String, i64, String)>,
    notes: HashSet<String>,
}

/// The lines a non-terminal `watch` prints for one read: the goal's first
/// and changed states, and each task that appeared or changed.
fn changes(
    status: &Value,
    rows: &[tokio_postgres::Row],
    goal_shown: &mut Option<String>,
    tasks_shown: &mut HashMap<String, TaskState>,
    seen: &mut Seen,
) -> Vec<String> {
    let mut lines = Vec::new();
    let goal_state = status["status"].as_str().unwrap_or_default().to_owned();
    if goal_shown.is_none() {
        // The first read: which goal this is, and where it stands.
        lines.push(format!(
            "goal {} · {} · {goal_state}",
            status["id"],
            status["goal"].as_str().unwrap_or_default()
        ));
    }
    for row in rows {
        let state = TaskState {
            status: row.get::<_, &str>(2).to_owned(),
            attempts: row.get(3),
            detail: detail(row),
        };
        let step: String = row.get(0);
        // Failed attempts first: they happened before the state now shown.
        for (number, line) in attempt_lines(status, &step) {
            if seen.attempts.insert((step.clone(), number, line.clone())) {
                lines.push(format!("{step}: {line}"));
            }
        }
        if tasks_shown.get(&step) != Some(&state) {
            lines.push(change_line(row));
            tasks_shown.insert(step, state);
        }
    }
    if !has_ended(status) {
        for note in new_notes(status, &mut seen.notes) {
            lines.push(format!("goal {}: {note}", status["id"]));
        }
    }
    let first = goal_shown.is_none();
    let moved = goal_shown.as_deref() != Some(goal_state.as_str());
    if (first && has_ended(status)) || (!first && moved) {
        let mut line = format!("goal {} {goal_state}", status["id"]);
        if has_ended(status) {
            match status["error"].as_str() {
                Some(error) => line.push_str(&format!(": {error}")),
                None if goal_state == "succeeded" => {
                    line.push_str(&format!(": {}", status["result"]));
                }
                None => {}
            }
        }
        lines.push(line);
    }
    *goal_shown = Some(goal_state);
    lines
}

/// `watch`: on a terminal, a live view redrawn at each event of the goal;
/// otherwise (a pipe, a file) one line per change. Exits when the goal ends.
pub async fn watch(database: &Setting, id: i64) -> Outcome {
    let interest = Interest::new(false);
    interest.set_goal(id);
    let (client, mut wakeups) = connect(database, Some(interest)).await?;
    client
        .batch_execute("LISTEN synapse_events")
        .await
        .map_err(db_error)?;
    let terminal = std::io::stdout().is_terminal();
    let mut goal_shown = None;
    let mut tasks_shown = HashMap::new();
    let mut seen = Seen::default();
    loop {
        // Whatever arrived before these reads is in them.
        wakeups.borrow_and_update();
        let status = goal_status(&client, id).await?;
        let rows = client.query(WATCH_QUERY, &[&id]).await.map_err(db_error)?;
        if terminal {
            // Clear and redraw in place.
            print!("\x1b[2J\x1b[H{}", render(&status, &rows));
        } else {
            for line in changes(&status, &rows, &mut goal_shown, &mut tasks_shown, &mut seen) {
                println!("{line}");
            }
        }
        std::io::stdout().flush().context("writing to stdout")?;
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

//! Pictures of a goal's DAG: Mermaid and Graphviz DOT, nodes coloured by task
//! status, edges labelled with their conditions and drawn by resolution.
//!
//! Shared with the extension, whose `synapse.goal_graph()` renders with it.
use std::fmt::Write;

/// A step as drawn.
pub struct Node<'a> {
    /// Step id.
    pub step: &'a str,
    /// Action name.
    pub action: &'a str,
    /// Task status.
    pub status: &'a str,
    /// Attempts started.
    pub attempts: i32,
    /// What else the node says: a map step's counts, a loop's iteration.
    pub detail: Option<String>,
}

/// What a step's node (or line) says besides its status: a map step's
/// counts (`map`: instances, ended, failed), a loop's iteration, a goal
/// step's child goal, or what a wait step waits for (`wait`: its params).
pub fn detail(
    map: Option<(i64, i64, i64)>,
    iteration: Option<i32>,
    child_goal_id: Option<i64>,
    wait: Option<&serde_json::Value>,
) -> Option<String> {
    match (map, iteration, child_goal_id) {
        (Some((size, ended, failed)), _, _) => Some(map_counts(size, ended, failed)),
        (None, Some(iteration), _) => Some(format!("iteration {iteration}")),
        (None, None, Some(child)) => Some(format!("child goal {child}")),
        (None, None, None) => wait.and_then(|params| waits_for(params).ok()),
    }
}

/// A wait step's `params` as drawn: `signal "approval" · timeout 2d`,
/// `for 10m`, `until goal.input.at`.
fn waits_for(params: &serde_json::Value) -> Result<String, (&'static str, String)> {
    use crate::blueprint::wait::Wait;
    Ok(match Wait::from_params(params)? {
        Wait::Signal {
            name, timeout_text, ..
        } => match timeout_text {
            Some(timeout) => format!("signal \"{name}\" · timeout {timeout}"),
            None => format!("signal \"{name}\""),
        },
        Wait::For(duration) => format!("for {}", crate::blueprint::format_duration(duration)),
        Wait::Until(source) => format!("until {source}"),
    })
}

/// A map step's counts as drawn: `×10 000 · 9 998 ok · 2 failed`, and how
/// many are left while instances run.
pub fn map_counts(size: i64, ended: i64, failed: i64) -> String {
    let mut counts = format!(
        "×{} · {} ok · {} failed",
        grouped(size),
        grouped(ended - failed),
        grouped(failed)
    );
    if ended < size {
        let _ = write!(counts, " · {} left", grouped(size - ended));
    }
    counts
}

/// `10000` as `10 000`.
fn grouped(number: i64) -> String {
    let digits = number.unsigned_abs().to_string();
    let mut out = String::new();
    for (position, digit) in digits.chars().enumerate() {
        if position > 0 && (digits.len() - position).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(digit);
    }
    if number < 0 {
        out.insert(0, '-');
    }
    out
}

/// An edge as drawn.
pub struct Link<'a> {
    /// From step id.
    pub from: &'a str,
    /// To step id.
    pub to: &'a str,
    /// CEL condition, if any.
    pub when: Option<&'a str>,
    /// `success`, `failure` or `always`.
    pub on: &'a str,
    /// `pending`, `taken`, `not_taken` or `error`.
    pub state: &'a str,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Mermaid flowchart.
    Mermaid,
    /// Graphviz DOT.
    Dot,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "mermaid" => Ok(Format::Mermaid),
            "dot" => Ok(Format::Dot),
            other => Err(format!(
                "unknown graph format \"{other}\" (use mermaid or dot)"
            )),
        }
    }
}

/// Fill and stroke colours of a task status.
fn colours(status: &str) -> (&'static str, &'static str) {
    match status {
        "succeeded" => ("#c8e6c9", "#2e7d32"),
        "failed" => ("#ffcdd2", "#c62828"),
        "running" | "waiting" => ("#bbdefb", "#1565c0"),
        "queued" | "retrying" => ("#fff9c4", "#f9a825"),
        "skipped" | "cancelled" => ("#eeeeee", "#9e9e9e"),
        _ => ("#ffffff", "#616161"),
    }
}

const STATUSES: [&str; 9] = [
    "pending",
    "queued",
    "running",
    "waiting",
    "retrying",
    "succeeded",
    "failed",
    "skipped",
    "cancelled",
];

fn label(link: &Link<'_>) -> String {
    let mut parts = Vec::new();
    if link.on != "success" {
        parts.push(format!("on {}", link.on));
    }
    if let Some(when) = link.when {
        parts.push(when.to_owned());
    }
    if link.state == "error" {
        parts.push("error".to_owned());
    }
    parts.join(" · ")
}

/// Renders the DAG.
pub fn render(format: Format, title: &str, nodes: &[Node<'_>], links: &[Link<'_>]) -> String {
    match format {
        Format::Mermaid => mermaid(title, nodes, links),
        Format::Dot => dot(title, nodes, links),
    }
}

fn mermaid_text(text: &str) -> String {
    text.replace('&', "#amp;")
        .replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}

fn mermaid(title: &str, nodes: &[Node<'_>], links: &[Link<'_>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "---\ntitle: {}\n---\nflowchart TD",
        mermaid_text(title)
    );
    for node in nodes {
        let attempts = if node.attempts > 1 {
            format!(" ×{}", node.attempts)
        } else {
            String::new()
        };
        let detail = node
            .detail
            .as_deref()
            .map(|detail| format!("<br/>{}", mermaid_text(detail)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    {}[\"<b>{}</b><br/>{} · {}{}{}\"]:::{}",
            node.step,
            node.step,
            mermaid_text(node.action),
            node.status,
            attempts,
            detail,
            node.status
        );
    }
    for link in links {
        let arrow = match link.state {
            "not_taken" => "-.->",
            "error" => "--x",
            "taken" => "==>",
            _ => "-->",
        };
        let text = label(link);
        if text.is_empty() {
            let _ = writeln!(out, "    {} {arrow} {}", link.from, link.to);
        } else {
            let _ = writeln!(
                out,
                "    {} {arrow}|\"{}\"| {}",
                link.from,
                mermaid_text(&text),
                link.to
            );
        }
    }
    for status in STATUSES {
        let (fill, stroke) = colours(status);
        let _ = writeln!(out, "    classDef {status} fill:{fill},stroke:{stroke}");
    }
    out
}

fn dot_text(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn dot(title: &str, nodes: &[Node<'_>], links: &[Link<'_>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph synapse {{");
    let _ = writeln!(
        out,
        "    label=\"{}\"; labelloc=t; rankdir=TB;",
        dot_text(title)
    );
    let _ = writeln!(
        out,
        "    node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];"
    );
    let _ = writeln!(out, "    edge [fontname=\"Helvetica\", fontsize=10];");
    for node in nodes {
        let (fill, stroke) = colours(node.status);
        let attempts = if node.attempts > 1 {
            format!(" ×{}", node.attempts)
        } else {
            String::new()
        };
        let detail = node
            .detail
            .as_deref()
            .map(|detail| format!("\\n{}", dot_text(detail)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    \"{}\" [label=\"{}\\n{} · {}{}{}\", fillcolor=\"{fill}\", color=\"{stroke}\"];",
            node.step,
            node.step,
            dot_text(node.action),
            node.status,
            attempts,
            detail
        );
    }
    for link in links {
        let style = match link.state {
            "taken" => "style=bold, color=\"#2e7d32\"",
            "not_taken" => "style=dashed, color=\"#9e9e9e\"",
            "error" => "style=bold, color=\"#c62828\"",
            _ => "color=\"#616161\"",
        };
        let _ = writeln!(
            out,
            "    \"{}\" -> \"{}\" [label=\"{}\", {style}];",
            link.from,
            link.to,
            dot_text(&label(link))
        );
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<Node<'static>>, Vec<Link<'static>>) {
        (
            vec![
                Node {
                    step: "classify",
                    action: "transform",
                    status: "succeeded",
                    attempts: 1,
                    detail: None,
                },
                Node {
                    step: "page",
                    action: "http",
                    status: "failed",
                    attempts: 3,
                    detail: None,
                },
                Node {
                    step: "resize",
                    action: "noop",
                    status: "waiting",
                    attempts: 0,
                    detail: Some(map_counts(10_000, 9_000, 2)),
                },
                Node {
                    step: "backlog",
                    action: "noop",
                    status: "skipped",
                    attempts: 0,
                    detail: None,
                },
            ],
            vec![
                Link {
                    from: "classify",
                    to: "page",
                    when: Some("result.severity == \"high\""),
                    on: "success",
                    state: "taken",
                },
                Link {
                    from: "classify",
                    to: "backlog",
                    when: Some("result.severity != 'high'"),
                    on: "success",
                    state: "not_taken",
                },
            ],
        )
    }

    #[test]
    fn map_counts_are_grouped_and_say_what_is_left() {
        assert_eq!(
            map_counts(10_000, 10_000, 2),
            "×10 000 · 9 998 ok · 2 failed"
        );
        assert_eq!(map_counts(3, 1, 0), "×3 · 1 ok · 0 failed · 2 left");
        assert_eq!(grouped(1_234_567), "1 234 567");
        assert_eq!(
            detail(None, Some(3), None, None).as_deref(),
            Some("iteration 3")
        );
        assert_eq!(
            detail(None, None, Some(9), None).as_deref(),
            Some("child goal 9")
        );
        assert_eq!(detail(None, None, None, None), None);
        assert_eq!(grouped(999), "999");
    }

    #[test]
    fn a_wait_step_says_what_it_waits_for() {
        let says = |params: serde_json::Value| detail(None, None, None, Some(&params));
        assert_eq!(
            says(serde_json::json!({"signal": "approval", "timeout": "2d"})).as_deref(),
            Some("signal \"approval\" · timeout 2d")
        );
        assert_eq!(
            says(serde_json::json!({"signal": "go"})).as_deref(),
            Some("signal \"go\"")
        );
        assert_eq!(
            says(serde_json::json!({"for": "600s"})).as_deref(),
            Some("for 10m")
        );
        assert_eq!(
            says(serde_json::json!({"until": "goal.input.at"})).as_deref(),
            Some("until goal.input.at")
        );
    }

    #[test]
    fn mermaid_colours_nodes_and_labels_edges() {
        let (nodes, links) = sample();
        let text = render(Format::Mermaid, "goal 7", &nodes, &links);
        assert!(text.contains("flowchart TD"));
        assert!(
            text.contains("page[\"<b>page</b><br/>http · failed ×3\"]:::failed"),
            "{text}"
        );
        assert!(
            text.contains(
                "resize[\"<b>resize</b><br/>noop · waiting<br/>×10 000 · 8 998 ok · 2 failed · 1 000 left\"]:::waiting"
            ),
            "{text}"
        );
        assert!(text.contains("classDef waiting"), "{text}");
        assert!(
            text.contains("classify ==>|\"result.severity == #quot;high#quot;\"| page"),
            "{text}"
        );
        assert!(
            text.contains("classify -.->|\"result.severity != 'high'\"| backlog"),
            "{text}"
        );
        assert!(text.contains("classDef failed fill:#ffcdd2"));
    }

    #[test]
    fn dot_escapes_and_styles_by_state() {
        let (nodes, links) = sample();
        let text = render(Format::Dot, "goal \"7\"", &nodes, &links);
        assert!(text.starts_with("digraph synapse {"));
        assert!(text.contains("label=\"goal \\\"7\\\"\""), "{text}");
        assert!(
            text.contains("\"backlog\" [label=\"backlog\\nnoop · skipped\", fillcolor=\"#eeeeee\""),
            "{text}"
        );
        assert!(
            text.contains(
                "[label=\"resize\\nnoop · waiting\\n×10 000 · 8 998 ok · 2 failed · 1 000 left\""
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\"classify\" -> \"backlog\" [label=\"result.severity != 'high'\", style=dashed"
            ),
            "{text}"
        );
        assert!(text.trim_end().ends_with('}'));
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("dot".parse::<Format>(), Ok(Format::Dot));
        assert!("svg"
            .parse::<Format>()
            .unwrap_err()
            .contains("mermaid or dot"));
    }
}

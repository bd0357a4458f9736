//! A goal's plan drawn as SVG: its steps laid out in layers (dagre's
//! Sugiyama layout, which also routes the edges and places their labels),
//! nodes classed by status, edges by how they resolved. Everything taken from
//! the goal is escaped: the picture is safe to put into a page as it is.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use dagre::graph::{Graph, GraphOptions};
use dagre::{layout, EdgeLabel, GraphLabel, LayoutOptions, NodeLabel, RankDir};
use serde_json::Value;

/// Which way the layers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Left to right (the default).
    LeftToRight,
    /// Top down.
    TopDown,
}

/// Longest condition shown on an edge; the whole one is in its tooltip.
const LABEL_CHARS: usize = 40;
/// Text metrics of the stylesheet's fonts, in pixels (a monospace-ish estimate
/// that keeps labels inside their boxes).
const STEP_CHAR: f64 = 8.0;
const DETAIL_CHAR: f64 = 6.6;
const LABEL_CHAR: f64 = 6.4;
const NODE_HEIGHT: f64 = 46.0;
const LABEL_HEIGHT: f64 = 16.0;
const MARGIN: f64 = 16.0;

/// One step as drawn.
struct Node<'a> {
    step: &'a str,
    status: &'a str,
    detail: String,
    map: bool,
    child_goal: Option<i64>,
    width: f64,
}

/// The SVG of `goal` (the JSON of `synapse.goal_status`).
pub fn render(goal: &Value, direction: Direction) -> String {
    let empty = Vec::new();
    let tasks = goal["tasks"].as_array().unwrap_or(&empty);
    let edges = goal["edges"].as_array().unwrap_or(&empty);
    let nodes: BTreeMap<&str, Node> = tasks
        .iter()
        .filter_map(|task| {
            let step = task["step"].as_str()?;
            Some((step, node(task, step)))
        })
        .collect();

    let mut graph: Graph<NodeLabel, EdgeLabel> = Graph::with_options(GraphOptions {
        directed: true,
        multigraph: true,
        compound: false,
    });
    for node in nodes.values() {
        graph.set_node(
            node.step,
            Some(NodeLabel {
                width: node.width,
                height: NODE_HEIGHT,
                ..Default::default()
            }),
        );
    }
    let drawn: Vec<(usize, &str, &str, String)> = edges
        .iter()
        .enumerate()
        .filter_map(|(index, edge)| {
            let from = edge["from"].as_str()?;
            let to = edge["to"].as_str()?;
            (nodes.contains_key(from) && nodes.contains_key(to))
                .then(|| (index, from, to, edge_label(edge)))
        })
        .collect();
    for (index, from, to, label) in &drawn {
        let label_width = if label.is_empty() {
            0.0
        } else {
            label.chars().count() as f64 * LABEL_CHAR + 8.0
        };
        graph.set_edge(
            *from,
            *to,
            Some(EdgeLabel {
                width: label_width,
                height: if label.is_empty() { 0.0 } else { LABEL_HEIGHT },
                ..Default::default()
            }),
            Some(&index.to_string()),
        );
    }
    layout(
        &mut graph,
        Some(LayoutOptions {
            rankdir: match direction {
                Direction::LeftToRight => RankDir::LR,
                Direction::TopDown => RankDir::TB,
            },
            nodesep: 24.0,
            ranksep: 56.0,
            edgesep: 12.0,
            marginx: MARGIN,
            marginy: MARGIN,
            ..Default::default()
        }),
    );
    let (width, height) = graph
        .graph_label::<GraphLabel>()
        .map(|label| (label.width.max(1.0), label.height.max(1.0)))
        .unwrap_or((1.0, 1.0));

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="dag" viewBox="0 0 {width:.0} {height:.0}" width="{width:.0}" height="{height:.0}" role="img" aria-label="plan of goal {}">"#,
        goal["id"].as_i64().unwrap_or_default()
    );
    svg.push_str(
        r#"<defs><marker id="dag-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0L10,5L0,10z"/></marker></defs>"#,
    );
    for (index, from, to, label) in &drawn {
        let Some(laid) = graph.edge(from, to, Some(&index.to_string())) else {
            continue;
        };
        let edge = &edges[*index];
        let state = edge["state"].as_str().unwrap_or("pending");
        let mut tooltip = format!("{from} → {to}: {state}");
        if let Some(condition) = edge["when"].as_str() {
            let _ = write!(tooltip, " (when {condition})");
        }
        if let Some(error) = edge["error"].as_str() {
            let _ = write!(tooltip, ": {error}");
        }
        let path: Vec<String> = laid
            .points
            .iter()
            .map(|point| format!("{:.1},{:.1}", point.x, point.y))
            .collect();
        let _ = write!(
            svg,
            r#"<g class="edge edge-{}" data-from="{}" data-to="{}"><title>{}</title><path d="M{}" marker-end="url(#dag-arrow)"/>"#,
            escape(state),
            escape(from),
            escape(to),
            escape(&tooltip),
            path.join("L")
        );
        if let (false, Some(x), Some(y)) = (label.is_empty(), laid.x, laid.y) {
            let _ = write!(
                svg,
                r#"<text class="edge-label" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                y + 4.0,
                escape(label)
            );
        }
        svg.push_str("</g>");
    }
    for node in nodes.values() {
        let Some((x, y)) = graph.node(node.step).and_then(|laid| laid.x.zip(laid.y)) else {
            continue;
        };
        let left = x - node.width / 2.0;
        let top = y - NODE_HEIGHT / 2.0;
        let _ = write!(
            svg,
            r#"<g class="node status-{}{}" data-step="{}""#,
            escape(node.status),
            if node.map { " map" } else { "" },
            escape(node.step)
        );
        if let Some(child) = node.child_goal {
            let _ = write!(svg, r#" data-child-goal="{child}""#);
        }
        let _ = write!(
            svg,
            r#"><title>{}: {}</title>"#,
            escape(node.step),
            escape(&node.detail)
        );
        if node.map {
            // A stack of cards behind the step: it runs once per item.
            let _ = write!(
                svg,
                r#"<rect class="map-shadow" x="{:.1}" y="{:.1}" width="{:.1}" height="{NODE_HEIGHT}" rx="7"/>"#,
                left + 4.0,
                top - 4.0,
                node.width
            );
        }
        let _ = write!(
            svg,
            r#"<rect x="{left:.1}" y="{top:.1}" width="{:.1}" height="{NODE_HEIGHT}" rx="7"/>"#,
            node.width
        );
        let _ = write!(
            svg,
            r#"<text class="step" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text><text class="detail" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text></g>"#,
            y - 3.0,
            escape(node.step),
            y + 13.0,
            escape(&node.detail)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// How `task` is drawn: its action and status, a map's counts, a loop's iteration.
fn node<'a>(task: &'a Value, step: &'a str) -> Node<'a> {
    let status = task["status"].as_str().unwrap_or("pending");
    let action = task["action"].as_str().unwrap_or("?");
    let map = task.get("instances").is_some();
    let detail = if map {
        let size = task["size"].as_i64();
        let ended = task["ended"].as_i64().unwrap_or(0);
        let failed = task["failed"].as_i64().unwrap_or(0);
        let mut text = match size {
            Some(size) => format!("map {action} {ended}/{size}"),
            None => format!("map {action} · {status}"),
        };
        if failed > 0 {
            let _ = write!(text, " · {failed} failed");
        }
        text
    } else if let Some(iteration) = task["iteration"].as_i64() {
        format!("{action} · {status} · round {iteration}")
    } else {
        format!("{action} · {status}")
    };
    let widest =
        (step.chars().count() as f64 * STEP_CHAR).max(detail.chars().count() as f64 * DETAIL_CHAR);
    Node {
        step,
        status,
        detail,
        map,
        child_goal: task["child_goal_id"].as_i64(),
        width: (widest + 24.0).max(72.0),
    }
}

/// What an edge says: its condition (shortened), and the outcome it follows
/// unless that is success.
fn edge_label(edge: &Value) -> String {
    let on = edge["on"].as_str().unwrap_or("success");
    let condition = edge["when"].as_str().map(|when| {
        let when = when.split_whitespace().collect::<Vec<_>>().join(" ");
        if when.chars().count() > LABEL_CHARS {
            let cut: String = when.chars().take(LABEL_CHARS - 1).collect();
            format!("{cut}…")
        } else {
            when
        }
    });
    match (on, condition) {
        ("success", Some(condition)) => condition,
        ("success", None) => String::new(),
        (on, Some(condition)) => format!("on {on}: {condition}"),
        (on, None) => format!("on {on}"),
    }
}

/// Text and attribute values with the characters that mean something in XML escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// (x, y, width, height) of each node's first rect.
    fn boxes(svg: &str) -> Vec<(f64, f64, f64, f64)> {
        svg.split(r#"<g class="node"#)
            .skip(1)
            .map(|node| {
                let rect = &node[node.find("<rect x").unwrap()..];
                let number = |name: &str| -> f64 {
                    let start = rect.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                    let end = start + rect[start..].find('"').unwrap();
                    rect[start..end].parse().unwrap()
                };
                (number("x"), number("y"), number("width"), number("height"))
            })
            .collect()
    }

    fn diamond() -> Value {
        json!({
            "id": 7,
            "tasks": [
                {"step": "fetch", "action": "http", "status": "succeeded"},
                {"step": "big", "action": "noop", "status": "skipped"},
                {"step": "small", "action": "noop", "status": "succeeded"},
                {"step": "resize", "action": "exec", "status": "running", "for_each": "input.items",
                 "size": 20, "ended": 12, "failed": 1, "instances": []},
                {"step": "child", "action": "goal", "status": "waiting", "child_goal_id": 12}
            ],
            "edges": [
                {"from": "fetch", "to": "big", "when": "result.size > 100", "on": "success", "state": "not_taken"},
                {"from": "fetch", "to": "small", "when": "result.size <= 100", "on": "success", "state": "taken"},
                {"from": "small", "to": "resize", "when": null, "on": "success", "state": "taken"},
                {"from": "big", "to": "resize", "when": null, "on": "always", "state": "error", "error": "no such field"},
                {"from": "resize", "to": "child", "when": null, "on": "success", "state": "pending"}
            ]
        })
    }

    #[test]
    fn every_step_and_condition_is_drawn_and_no_two_nodes_overlap() {
        for direction in [Direction::LeftToRight, Direction::TopDown] {
            let svg = render(&diamond(), direction);
            for step in ["fetch", "big", "small", "resize", "child"] {
                assert!(svg.contains(&format!(r#"data-step="{step}""#)), "{step}");
            }
            assert!(svg.contains("result.size &gt; 100"), "{svg}");
            assert!(svg.contains("result.size &lt;= 100"), "{svg}");
            assert!(svg.contains(">on always</text>"), "{svg}");
            assert!(svg.contains(r#"class="edge edge-not_taken" data-from="fetch" data-to="big""#));
            assert!(svg.contains(r#"class="edge edge-error""#));
            assert!(svg.contains(r#"class="node status-running map" data-step="resize""#));
            assert!(svg.contains("map exec 12/20 · 1 failed"));
            assert!(svg.contains(r#"data-child-goal="12""#));
            let boxes = boxes(&svg);
            assert_eq!(boxes.len(), 5);
            for (i, a) in boxes.iter().enumerate() {
                for b in &boxes[i + 1..] {
                    let apart = a.0 + a.2 <= b.0
                        || b.0 + b.2 <= a.0
                        || a.1 + a.3 <= b.1
                        || b.1 + b.3 <= a.1;
                    assert!(apart, "{a:?} overlaps {b:?} ({direction:?})");
                }
            }
        }
    }

    #[test]
    fn the_layers_follow_the_direction() {
        let chain = json!({"tasks": [{"step": "a", "status": "succeeded"}, {"step": "b", "status": "queued"}],
                           "edges": [{"from": "a", "to": "b", "state": "taken"}]});
        let across = boxes(&render(&chain, Direction::LeftToRight));
        assert!(across[0].0 + across[0].2 < across[1].0, "{across:?}");
        let down = boxes(&render(&chain, Direction::TopDown));
        assert!(down[0].1 + down[0].3 < down[1].1, "{down:?}");
    }

    #[test]
    fn hostile_names_and_conditions_are_escaped() {
        let hostile = "<img src=x onerror=alert(1)>\"'&";
        let goal = json!({
            "tasks": [{"step": hostile, "action": hostile, "status": "failed\"><script>"},
                      {"step": "b", "status": "pending"}],
            "edges": [{"from": hostile, "to": "b", "when": hostile, "on": "failure", "state": "taken", "error": hostile}]
        });
        let svg = render(&goal, Direction::LeftToRight);
        assert!(!svg.contains("<img"), "{svg}");
        assert!(!svg.contains("<script"), "{svg}");
        assert!(!svg.contains("\"'&\""), "{svg}");
        assert!(svg.contains("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;"));
    }

    #[test]
    fn long_conditions_are_shortened_and_an_empty_plan_is_an_empty_picture() {
        let long = "input.amount > 100 && input.currency == 'EUR' && input.customer.tier == 'gold'";
        let label = edge_label(&json!({"when": long, "on": "success"}));
        assert_eq!(label.chars().count(), LABEL_CHARS);
        assert!(label.ends_with('…'));
        let svg = render(
            &json!({"id": 1, "tasks": [], "edges": []}),
            Direction::LeftToRight,
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(!svg.contains("<g class=\"node"));
    }
}

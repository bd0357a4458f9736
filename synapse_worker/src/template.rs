//! Template patterns: how the template planner matches goal text.
//!
//! Shared with the extension, which checks patterns when templates are added
//! and previews plans (`synapse.plan_preview`), so the extension and the
//! worker choose the same template for the same goal.
//!
//! A pattern is a case-insensitive regular expression anchored at both ends:
//! it must match the whole goal text, never a part of it (a goal "do NOT
//! refund order 1001" is not a "refund order 1001").
use std::collections::BTreeSet;

use regex::{Regex, RegexBuilder};
use serde_json::{Map, Value};

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;

/// How many templates a "no template matches" message suggests at most.
pub const MAX_CLOSEST: usize = 3;

/// Least similarity (0 to 1) for a template to be suggested as close.
const MIN_SIMILARITY: f64 = 0.25;

fn build(source: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(source)
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
}

/// Compiles a template pattern: a case-insensitive regular expression that
/// matches only the whole goal text.
pub fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    if pattern.is_empty() {
        return Err("pattern must not be empty".into());
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "pattern is {} bytes; the limit is {MAX_PATTERN_LEN}",
            pattern.len()
        ));
    }
    // The pattern on its own first: a valid pattern is balanced, so wrapping it
    // in a group cannot change what it means (`a)(b` is refused here, not
    // turned into two groups by the wrapper).
    build(pattern).map_err(|error| {
        error
            .to_string()
            .lines()
            .last()
            .unwrap_or("invalid regex")
            .trim()
            .to_owned()
    })?;
    // A trailing `(?x)` comment would swallow the closing `)\z`; a newline
    // ends the comment (and, in that mode, means nothing).
    build(&format!(r"\A(?:{pattern})\z"))
        .or_else(|_| build(&format!("\\A(?:{pattern}\n)\\z")))
        .map_err(|_| "the pattern cannot be anchored at both ends".to_owned())
}

/// The named captures of `pattern` in `goal` (they become `goal.params`), or
/// `None` if it does not match the whole goal. Unmatched optional groups are
/// left out.
pub fn match_goal(pattern: &Regex, goal: &str) -> Option<Map<String, Value>> {
    let captures = pattern.captures(goal)?;
    Some(
        pattern
            .capture_names()
            .flatten()
            .filter_map(|name| {
                captures
                    .name(name)
                    .map(|m| (name.to_owned(), Value::String(m.as_str().to_owned())))
            })
            .collect(),
    )
}

/// A template as the planner sees it: its name and pattern, in the order
/// templates are tried (highest priority, then name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Template name.
    pub name: &'a str,
    /// Its pattern, as written.
    pub pattern: &'a str,
}

/// Why no template was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    /// A stored pattern does not compile (it was written around `add_template`).
    #[error("template \"{name}\" has an invalid pattern: {reason}")]
    InvalidPattern {
        /// Template name.
        name: String,
        /// What the regex parser said.
        reason: String,
    },
    /// No pattern matches the whole goal text; the message lists the closest.
    #[error("{0}")]
    NoMatch(String),
}

/// The first of `templates` (already in planner order) whose pattern matches
/// the whole `goal`: its index and `goal.params`. `compile` turns a pattern
/// into its regex (the worker caches them).
pub fn choose(
    templates: &[Candidate<'_>],
    goal: &str,
    mut compile: impl FnMut(&str) -> Result<Regex, String>,
) -> Result<(usize, Map<String, Value>), ChooseError> {
    for (index, template) in templates.iter().enumerate() {
        let regex = compile(template.pattern).map_err(|reason| ChooseError::InvalidPattern {
            name: template.name.to_owned(),
            reason,
        })?;
        if let Some(params) = match_goal(&regex, goal) {
            return Ok((index, params));
        }
    }
    Err(ChooseError::NoMatch(no_match_message(goal, templates)))
}

/// `no template matches goal "…"`, followed by the closest templates when
/// some are close: `; closest: "refund" (refund order (?P<id>\d+) …)`.
pub fn no_match_message(goal: &str, templates: &[Candidate<'_>]) -> String {
    let mut message = format!("no template matches goal {goal:?}");
    let closest = closest(goal, templates);
    if !closest.is_empty() {
        message.push_str("; closest: ");
        let listed: Vec<String> = closest
            .iter()
            .map(|t| format!("{:?} ({})", t.name, t.pattern))
            .collect();
        message.push_str(&listed.join(", "));
    }
    message
}

/// The templates whose fixed text is most like `goal`, most similar first
/// (ties keep planner order), at most [`MAX_CLOSEST`], none below a minimal
/// similarity. Deterministic: the same inputs give the same list.
pub fn closest<'a>(goal: &str, templates: &[Candidate<'a>]) -> Vec<Candidate<'a>> {
    let goal_bigrams = bigrams(&words(goal));
    let mut scored: Vec<(f64, usize)> = templates
        .iter()
        .enumerate()
        .map(|(index, t)| {
            (
                dice(&goal_bigrams, &bigrams(&literal_words(t.pattern))),
                index,
            )
        })
        .filter(|(score, _)| *score >= MIN_SIMILARITY)
        .collect();
    // Stable sort: equal scores stay in planner order.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored
        .into_iter()
        .take(MAX_CLOSEST)
        .map(|(_, index)| templates[index])
        .collect()
}

/// Similarity of two bigram sets: the Dice coefficient, 0 (nothing shared) to 1.
fn dice(a: &BTreeSet<(char, char)>, b: &BTreeSet<(char, char)>) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let shared = a.intersection(b).count();
    2.0 * shared as f64 / (a.len() + b.len()) as f64
}

/// The pairs of adjacent characters within each word (a typo keeps most of them).
fn bigrams(words: &[String]) -> BTreeSet<(char, char)> {
    words
        .iter()
        .flat_map(|word| {
            let chars: Vec<char> = word.chars().collect();
            chars
                .windows(2)
                .map(|pair| (pair[0], pair[1]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The lower-cased alphanumeric words of a text.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The words a pattern spells out literally: escapes (`\d`, `\w`), character
/// classes (`[a-z]`), repetitions (`{2,4}`), group headers (`(?P<id>`, `(?i)`)
/// and operators are left out.
fn literal_words(pattern: &str) -> Vec<String> {
    let mut text = String::with_capacity(pattern.len());
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                // An escape: `\d`, `\.` …; `\p{L}`/`\x{41}` carry braces.
                if let Some(escaped) = chars.next() {
                    if matches!(escaped, 'p' | 'P' | 'x' | 'u' | 'U') && chars.peek() == Some(&'{')
                    {
                        for inner in chars.by_ref() {
                            if inner == '}' {
                                break;
                            }
                        }
                    }
                }
                text.push(' ');
            }
            '[' => {
                // A class: skip to its closing bracket (a `]` first is literal).
                let mut first = true;
                while let Some(inner) = chars.next() {
                    match inner {
                        '\\' => {
                            chars.next();
                        }
                        ']' if !first => break,
                        _ => {}
                    }
                    first = inner == '^' && first;
                }
                text.push(' ');
            }
            '{' => {
                for inner in chars.by_ref() {
                    if inner == '}' {
                        break;
                    }
                }
                text.push(' ');
            }
            '(' if chars.peek() == Some(&'?') => {
                // `(?P<name>`, `(?<name>`, `(?:`, `(?i)`, `(?i:`: skip the header.
                chars.next();
                if chars.peek() == Some(&'P') {
                    chars.next();
                }
                if chars.peek() == Some(&'<') {
                    for inner in chars.by_ref() {
                        if inner == '>' {
                            break;
                        }
                    }
                } else {
                    while let Some(&inner) = chars.peek() {
                        if !(inner.is_ascii_alphabetic() || inner == '-') {
                            break;
                        }
                        chars.next();
                    }
                }
                text.push(' ');
            }
            c if c.is_alphanumeric() => text.push(c),
            _ => text.push(' '),
        }
    }
    words(&text)
}

/// What `add_template` warns about: a pattern that matches only because of a
/// leading or trailing `.*` (it then accepts any goal that merely contains its
/// text). `None` when the pattern has neither.
pub fn loose_ends_warning(pattern: &str) -> Option<String> {
    let mut core = pattern;
    // Inline flags and `^` may come first, `$` last; they do not change this.
    while let Some(rest) = core.strip_prefix("(?") {
        match rest.find(')') {
            Some(end)
                if rest[..end]
                    .chars()
                    .all(|c| c.is_ascii_alphabetic() || c == '-') =>
            {
                core = &rest[end + 1..];
            }
            _ => break,
        }
    }
    core = core.strip_prefix('^').unwrap_or(core);
    if core.ends_with('$') && !escaped_at(core, core.len() - 1) {
        core = &core[..core.len() - 1];
    }
    let mut leading = false;
    for prefix in [".*?", ".*"] {
        if let Some(rest) = core.strip_prefix(prefix) {
            core = rest;
            leading = true;
            break;
        }
    }
    let mut trailing = false;
    for suffix in [".*?", ".*"] {
        if let Some(rest) = core.strip_suffix(suffix) {
            if !escaped_at(core, rest.len()) {
                core = rest;
                trailing = true;
                break;
            }
        }
    }
    let which = match (leading, trailing) {
        (false, false) => return None,
        (true, true) => "leading and trailing",
        (true, false) => "leading",
        (false, true) => "trailing",
    };
    let core = core.trim();
    if core.is_empty() {
        return Some(format!(
            "pattern {pattern:?} matches every goal because of its {which} \".*\"; \
             patterns match the whole goal text, so write the goal's shape instead, \
             with named captures for the parts that vary, e.g. \"refund order (?P<id>\\d+)\""
        ));
    }
    let example = match (leading, trailing) {
        (true, true) => format!("(?P<before>.*){core}(?P<after>.*)"),
        (true, false) => format!("(?P<before>.*){core}"),
        _ => format!("{core}(?P<rest>.*)"),
    };
    Some(format!(
        "pattern {pattern:?} only matches because of its {which} \".*\": it accepts any goal \
         that merely contains {core:?}, such as \"do NOT {core} …\"; patterns match the whole \
         goal text, so write the goal as it is phrased, with a named capture for each part that \
         varies (e.g. \"refund order (?P<id>\\d+)\" rather than \".*refund.*\"), or, if any \
         text around it is really wanted, capture it by name: {example:?}"
    ))
}

/// Whether the byte at `at` in `text` is escaped by an odd run of backslashes.
fn escaped_at(text: &str, at: usize) -> bool {
    text.as_bytes()[..at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count()
        % 2
        == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates<'a>(list: &[(&'a str, &'a str)]) -> Vec<Candidate<'a>> {
        list.iter()
            .map(|&(name, pattern)| Candidate { name, pattern })
            .collect()
    }

    const REFUND: &str = r"refund order (?P<id>\d+) because (?P<reason>.+)";

    #[test]
    fn named_captures_become_params_case_insensitively() {
        let pattern =
            compile_pattern(r"triage incident (?P<id>\d+)(?: for (?P<team>\w+))?").unwrap();
        let params = match_goal(&pattern, "TRIAGE incident 42").unwrap();
        assert_eq!(params.get("id"), Some(&Value::String("42".into())));
        assert!(!params.contains_key("team"));
        let params = match_goal(&pattern, "triage incident 42 for ops").unwrap();
        assert_eq!(params.get("team"), Some(&Value::String("ops".into())));
        assert!(match_goal(&pattern, "deploy the app").is_none());
    }

    #[test]
    fn patterns_match_the_whole_goal_text() {
        let refund = compile_pattern(REFUND).unwrap();
        assert!(match_goal(&refund, "do NOT refund order 1001 because it is fraud").is_none());
        assert!(match_goal(&refund, "Please refund order 1001 because damaged").is_none());
        let params = match_goal(&refund, "Refund order 1001 because damaged").unwrap();
        assert_eq!(params["id"], "1001");
        assert_eq!(params["reason"], "damaged");

        let triage = compile_pattern(r"triage incident (?P<id>\d+)").unwrap();
        assert!(match_goal(&triage, "triage incident 42").is_some());
        assert!(match_goal(&triage, "triage incident 42 severity 5").is_none());
        assert!(match_goal(&triage, "triage incident 42\n").is_none());

        // An alternation is anchored as a whole, not just its first branch.
        let either = compile_pattern("a|ab").unwrap();
        assert!(match_goal(&either, "ab").is_some());
        assert!(match_goal(&either, "xab").is_none());

        // Anchors written by hand, flags and a trailing verbose comment still work.
        for pattern in [r"^greet (?P<name>\w+)$", r"(?i)^greet (?P<name>\w+)$"] {
            let regex = compile_pattern(pattern).unwrap();
            assert!(match_goal(&regex, "greet Ada").is_some(), "{pattern}");
            assert!(match_goal(&regex, "greet Ada now").is_none(), "{pattern}");
        }
        let verbose = compile_pattern(r"(?x) greet \s (?P<name>\w+)  # who to greet").unwrap();
        assert_eq!(match_goal(&verbose, "greet Ada").unwrap()["name"], "Ada");
        assert!(match_goal(&verbose, "greet Ada now").is_none());

        // A catch-all written on purpose still catches all.
        let all = compile_pattern(".*").unwrap();
        assert!(match_goal(&all, "anything at all").is_some());
    }

    #[test]
    fn invalid_patterns_say_why_and_are_not_rescued_by_the_anchors() {
        let error = compile_pattern("triage (unclosed").unwrap_err();
        assert!(error.contains("unclosed"), "{error}");
        assert_eq!(
            compile_pattern("").unwrap_err(),
            "pattern must not be empty"
        );
        assert!(compile_pattern(&"a".repeat(MAX_PATTERN_LEN + 1))
            .unwrap_err()
            .contains("limit"));
        // Balanced only once wrapped: still refused.
        assert!(compile_pattern("a)(b").is_err());
        assert!(compile_pattern(r"a\").is_err());
    }

    #[test]
    fn choose_takes_the_first_full_match_in_planner_order() {
        let templates = candidates(&[("refund", REFUND), ("any-refund", r"refund (?P<what>.+)")]);
        let (index, params) =
            choose(&templates, "refund order 7 because late", compile_pattern).unwrap();
        assert_eq!(index, 0);
        assert_eq!(params["id"], "7");
        let (index, params) = choose(&templates, "refund the lot", compile_pattern).unwrap();
        assert_eq!(index, 1);
        assert_eq!(params["what"], "the lot");

        let error = choose(
            &templates,
            "do NOT refund order 1001 because it is fraud",
            compile_pattern,
        )
        .unwrap_err();
        let ChooseError::NoMatch(message) = &error else {
            panic!("{error:?}");
        };
        assert!(
            message.starts_with(
                r#"no template matches goal "do NOT refund order 1001 because it is fraud"; closest: "refund" (refund order"#
            ),
            "{message}"
        );

        let broken = candidates(&[("bad", "(oops")]);
        assert!(matches!(
            choose(&broken, "x", compile_pattern),
            Err(ChooseError::InvalidPattern { name, .. }) if name == "bad"
        ));
    }

    #[test]
    fn the_closest_templates_are_ranked_by_their_literal_text() {
        let templates = candidates(&[
            (
                "triage",
                r"triage incident (?P<id>\d+) severity (?P<severity>\d+)",
            ),
            ("totals", r"compute totals for (?P<day>\d{4}-\d{2}-\d{2})"),
            ("refund", REFUND),
            ("greet", r"^greet (?P<name>\w+)$"),
        ]);
        let names = |goal: &str| -> Vec<&str> {
            closest(goal, &templates)
                .into_iter()
                .map(|t| t.name)
                .collect()
        };
        // A typo, extra words, a different case: the meant template comes first.
        assert_eq!(names("refund ordr 1003 because typo")[0], "refund");
        assert_eq!(
            names("do NOT refund order 1001 because it is fraud")[0],
            "refund"
        );
        assert_eq!(names("Triage incdent 7")[0], "triage");
        assert_eq!(names("compute the totals for yesterday")[0], "totals");
        // Nothing alike: nothing suggested, and the message is the plain one.
        assert!(names("deploy the moon").is_empty());
        assert_eq!(
            no_match_message("deploy the moon", &templates),
            r#"no template matches goal "deploy the moon""#
        );
        // At most MAX_CLOSEST, and the same answer every time.
        let many: Vec<(String, String)> = (0..10)
            .map(|i| (format!("t{i}"), format!("refund order {i}")))
            .collect();
        let many: Vec<Candidate<'_>> = many
            .iter()
            .map(|(name, pattern)| Candidate { name, pattern })
            .collect();
        let first = closest("refund order", &many);
        assert_eq!(first.len(), MAX_CLOSEST);
        assert_eq!(first, closest("refund order", &many));
        assert_eq!(first[0].name, "t0");
    }

    #[test]
    fn literal_words_leave_out_the_regex_syntax() {
        assert_eq!(literal_words(REFUND), ["refund", "order", "because"]);
        assert_eq!(
            literal_words(r"(?i)^compute [a-z]+ totals{1,2} for (?<day>\d{4}-\d{2})\.$"),
            ["compute", "totals", "for"]
        );
        assert_eq!(literal_words(r"\p{Greek}+ x"), ["x"]);
        assert!(literal_words("[").is_empty());
    }

    #[test]
    fn loose_ends_are_warned_about_with_what_to_write_instead() {
        let warning = loose_ends_warning(".*refund.*").unwrap();
        assert!(warning.contains("leading and trailing"), "{warning}");
        assert!(warning.contains(r#"contains "refund""#), "{warning}");
        assert!(warning.contains(r#"rather than ".*refund.*""#), "{warning}");
        assert!(
            warning.contains(r#""(?P<before>.*)refund(?P<after>.*)""#),
            "{warning}"
        );
        assert!(loose_ends_warning("^.*refund").unwrap().contains("leading"));
        assert!(loose_ends_warning("(?i)refund.*$")
            .unwrap()
            .contains("trailing"));
        assert!(loose_ends_warning(".*")
            .unwrap()
            .contains("matches every goal"));
        for fine in [
            REFUND,
            r"refund order (?P<rest>.*)",
            r"refund\.*",
            "^greet (?P<name>\\w+)$",
            "",
        ] {
            assert_eq!(loose_ends_warning(fine), None, "{fine}");
        }
    }
}

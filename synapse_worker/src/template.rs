//! Template patterns: how the template planner matches goal text.
//!
//! Shared with the extension, which checks patterns when templates are added,
//! so a pattern that is accepted is one the planner can use.
use regex::{Regex, RegexBuilder};
use serde_json::{Map, Value};

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 4096;

/// Compiles a template pattern: a case-insensitive regular expression.
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
    RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
        .map_err(|error| {
            error
                .to_string()
                .lines()
                .last()
                .unwrap_or("invalid regex")
                .trim()
                .to_owned()
        })
}

/// The named captures of `pattern` in `goal` (they become `goal.params`), or
/// `None` if it does not match. Unmatched optional groups are left out.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_captures_become_params_case_insensitively() {
        let pattern =
            compile_pattern(r"triage incident (?P<id>\d+)(?: for (?P<team>\w+))?").unwrap();
        let params = match_goal(&pattern, "Please TRIAGE incident 42").unwrap();
        assert_eq!(params.get("id"), Some(&Value::String("42".into())));
        assert!(!params.contains_key("team"));
        assert!(match_goal(&pattern, "deploy the app").is_none());
    }

    #[test]
    fn invalid_patterns_say_why() {
        let error = compile_pattern("triage (unclosed").unwrap_err();
        assert!(error.contains("unclosed"), "{error}");
        assert_eq!(
            compile_pattern("").unwrap_err(),
            "pattern must not be empty"
        );
        assert!(compile_pattern(&"a".repeat(MAX_PATTERN_LEN + 1))
            .unwrap_err()
            .contains("limit"));
    }
}

//! The built-in action `wait` (SPEC §4.9): what its `params` mean and the rules they
//! follow. Shared by validation (which reports a mistake with its JSON path) and by the
//! engine (which reads a validated step), so both read the params the same way.

use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use serde_json::{Map, Value};

use super::duration::parse_duration;
use super::json_kind;

/// The name of the action.
pub const ACTION: &str = "wait";

/// The rule a signal name follows; `synapse.signals` has the same CHECK, so a name a
/// blueprint accepts can always be sent.
pub const SIGNAL_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$";

/// Longest signal name, in characters.
const MAX_SIGNAL_NAME_CHARS: usize = 200;

/// The keys a wait step's `params` may have, in the order messages list them.
const WAIT_PARAMS: &[&str] = &["signal", "for", "until", "timeout"];

/// The keys that say what a step waits for: exactly one is given.
const WAIT_KINDS: &[&str] = &["signal", "for", "until"];

static SIGNAL_NAME_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(SIGNAL_NAME_PATTERN).expect("valid signal name pattern"));

/// Checks a signal name: 1 to 200 characters, matching
/// `^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$` (an ASCII letter or digit, then ASCII letters,
/// digits, `_`, `.`, `:`, `/` and `-`). The table `synapse.signals` has the same CHECK.
///
/// The error says what is wrong and shows the rule.
pub fn check_signal_name(name: &str) -> Result<(), String> {
    if SIGNAL_NAME_RE.is_match(name) {
        return Ok(());
    }
    let rule = format!("(a signal name must match {SIGNAL_NAME_PATTERN})");
    let chars = name.chars().count();
    let mut rest = name.chars();
    let what = match rest.next() {
        None => "the signal name is empty".to_owned(),
        // A long name is not quoted: the message would be mostly the name.
        Some(_) if chars > MAX_SIGNAL_NAME_CHARS => {
            format!("the signal name is {chars} characters; the limit is {MAX_SIGNAL_NAME_CHARS}")
        }
        Some(first) if !first.is_ascii_alphanumeric() => format!(
            "invalid signal name {name:?}: it must start with an ASCII letter or digit, \
             not {first:?}"
        ),
        Some(_) => match rest.find(|c| !(c.is_ascii_alphanumeric() || "_.:/-".contains(*c))) {
            Some(bad) => format!(
                "invalid signal name {name:?}: {bad:?} is not allowed (after the first \
                 character: ASCII letters, digits, _ . : / -)"
            ),
            None => format!("invalid signal name {name:?}"),
        },
    };
    Err(format!("{what} {rule}"))
}

/// What a wait step waits for (its `params`, read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A signal of this name delivered to the goal; with a timeout, the step fails when
    /// it has not come in time.
    Signal {
        /// The signal's name (see [`check_signal_name`]).
        name: String,
        /// `params.timeout`, if given.
        timeout: Option<Duration>,
        /// `params.timeout` exactly as written (e.g. `5m`), for the timeout message.
        timeout_text: Option<String>,
    },
    /// A time span from when the step starts waiting.
    For(Duration),
    /// The CEL source of `params.until`, an expression giving an RFC 3339 time; it is
    /// compiled by validation and evaluated by the engine.
    Until(String),
}

impl Wait {
    /// Reads a wait step's `params`, or says what is wrong with them as (the key of
    /// `params` at fault, message). The key is `""` when `params` as a whole is at fault:
    /// not an object, none of `signal`, `for`, `until`, or an unknown key (which the
    /// message names).
    pub fn from_params(params: &Value) -> Result<Wait, (&'static str, String)> {
        let Value::Object(params) = params else {
            return Err((
                "",
                format!(
                    "a wait step's params must be an object, got {}",
                    json_kind(params)
                ),
            ));
        };
        Wait::from_object(params).map_err(|(key, message)| {
            let key = WAIT_PARAMS.iter().find(|k| **k == key).copied();
            (key.unwrap_or(""), message)
        })
    }

    /// [`Wait::from_params`] over the params object; the key at fault may be an unknown
    /// one, borrowed from `params`, so that validation can point at it.
    pub(super) fn from_object(params: &Map<String, Value>) -> Result<Wait, (&str, String)> {
        if let Some(key) = params.keys().find(|k| !WAIT_PARAMS.contains(&k.as_str())) {
            return Err((
                key.as_str(),
                format!(
                    "unknown field \"{key}\" (expected one of: {})",
                    WAIT_PARAMS.join(", ")
                ),
            ));
        }
        // Presence is by key, so that `null` is reported as a wrong value rather than as
        // a missing one.
        let given: Vec<&str> = WAIT_KINDS
            .iter()
            .copied()
            .filter(|k| params.contains_key(*k))
            .collect();
        match given.as_slice() {
            [] => {
                return Err((
                    "",
                    "a wait step needs one of params.signal (a signal name), params.for (a \
                     duration such as \"10m\") or params.until (a CEL expression giving an \
                     RFC 3339 time)"
                        .to_owned(),
                ))
            }
            [_] => {}
            [.., last] => {
                let (init, _) = given.split_at(given.len() - 1);
                let names: Vec<String> = init.iter().map(|k| format!("params.{k}")).collect();
                return Err((
                    *last,
                    format!(
                        "{} and params.{last} do not combine: a wait step waits for one thing \
                         (a signal, a duration or a time)",
                        names.join(", ")
                    ),
                ));
            }
        }

        if let Some(value) = params.get("signal") {
            let Value::String(name) = value else {
                return Err((
                    "signal",
                    format!(
                        "expected a string (a signal name), got {}",
                        json_kind(value)
                    ),
                ));
            };
            check_signal_name(name).map_err(|e| ("signal", e))?;
            let (timeout, timeout_text) = match params.get("timeout") {
                None => (None, None),
                Some(value) => {
                    let (d, text) = positive_duration("timeout", value)?;
                    (Some(d), Some(text.to_owned()))
                }
            };
            return Ok(Wait::Signal {
                name: name.clone(),
                timeout,
                timeout_text,
            });
        }

        if params.contains_key("timeout") {
            return Err((
                "timeout",
                "params.timeout applies only with params.signal: a wait for a duration or \
                 a time ends when it comes"
                    .to_owned(),
            ));
        }

        if let Some(value) = params.get("for") {
            let (d, _) = positive_duration("for", value)?;
            return Ok(Wait::For(d));
        }

        let value = params.get("until").unwrap_or(&Value::Null);
        match value {
            Value::String(expr) if expr.trim().is_empty() => Err((
                "until",
                "params.until must not be empty: give a CEL expression giving an RFC 3339 \
                 time"
                    .to_owned(),
            )),
            Value::String(expr) => Ok(Wait::Until(expr.clone())),
            other => Err((
                "until",
                format!(
                    "expected a string (a CEL expression giving an RFC 3339 time), got {}",
                    json_kind(other)
                ),
            )),
        }
    }

    /// The error of a signal wait whose timeout passed, e.g.
    /// `timed out after 5m waiting for signal "approval"`; `None` for a wait with no
    /// timeout.
    pub fn timeout_message(&self) -> Option<String> {
        match self {
            Wait::Signal {
                name,
                timeout_text: Some(text),
                ..
            } => Some(format!(
                "timed out after {text} waiting for signal \"{name}\""
            )),
            _ => None,
        }
    }
}

/// A duration param (`for`, `timeout`) longer than zero, with its text as written.
fn positive_duration<'v>(
    key: &'static str,
    value: &'v Value,
) -> Result<(Duration, &'v str), (&'static str, String)> {
    let Value::String(text) = value else {
        return Err((
            key,
            format!(
                "expected a duration string such as \"30s\", got {}",
                json_kind(value)
            ),
        ));
    };
    match parse_duration(text) {
        Err(e) => Err((key, e)),
        Ok(d) if d.is_zero() => Err((
            key,
            format!("params.{key} must be longer than 0, got \"{text}\""),
        )),
        Ok(d) if d > MAX_WAIT => Err((
            key,
            format!("params.{key} is \"{text}\"; the longest wait is 3650d (about ten years)"),
        )),
        Ok(d) => Ok((d, text)),
    }
}

/// The longest `for` or `timeout`: far beyond any workflow, well inside
/// what a timestamp holds.
pub const MAX_WAIT: Duration = Duration::from_secs(3650 * 86_400);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fault(params: Value) -> (&'static str, String) {
        match Wait::from_params(&params) {
            Ok(wait) => panic!("expected an error, got {wait:?}"),
            Err(fault) => fault,
        }
    }

    /// Asserts the error is at `key` and its message contains `fragment`.
    fn assert_fault(params: Value, key: &str, fragment: &str) {
        let (at, message) = fault(params);
        assert_eq!(at, key, "{message}");
        assert!(
            message.contains(fragment),
            "message {message:?} lacks {fragment:?}"
        );
    }

    #[test]
    fn signal_names_follow_the_rule() {
        for name in [
            "a",
            "approval",
            "Order.42:approved/by-ops_team",
            "0",
            &"x".repeat(200),
        ] {
            assert_eq!(check_signal_name(name), Ok(()), "{name}");
        }
        let err = check_signal_name("").unwrap_err();
        assert_eq!(
            err,
            "the signal name is empty (a signal name must match \
             ^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$)"
        );
        let err = check_signal_name(&"x".repeat(201)).unwrap_err();
        assert!(
            err.starts_with("the signal name is 201 characters; the limit is 200 (a signal"),
            "{err}"
        );
        let err = check_signal_name("_approval").unwrap_err();
        assert!(
            err.starts_with(
                "invalid signal name \"_approval\": it must start with an ASCII letter or \
                 digit, not '_'"
            ),
            "{err}"
        );
        let err = check_signal_name("order approved").unwrap_err();
        assert_eq!(
            err,
            "invalid signal name \"order approved\": ' ' is not allowed (after the first \
             character: ASCII letters, digits, _ . : / -) (a signal name must match \
             ^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$)"
        );
        for name in ["é", "aé", "a\n", "a$", "a b"] {
            let err = check_signal_name(name).unwrap_err();
            assert!(err.contains(SIGNAL_NAME_PATTERN), "{name:?}: {err}");
        }
    }

    #[test]
    fn a_signal_wait_with_and_without_a_timeout() {
        assert_eq!(
            Wait::from_params(&json!({"signal": "approval"})),
            Ok(Wait::Signal {
                name: "approval".into(),
                timeout: None,
                timeout_text: None
            })
        );
        let wait = Wait::from_params(&json!({"signal": "approval", "timeout": "5m"})).unwrap();
        assert_eq!(
            wait,
            Wait::Signal {
                name: "approval".into(),
                timeout: Some(Duration::from_secs(300)),
                timeout_text: Some("5m".into())
            }
        );
        assert_eq!(
            wait.timeout_message().as_deref(),
            Some("timed out after 5m waiting for signal \"approval\"")
        );
        // The text is kept as written, not normalized.
        let wait = Wait::from_params(&json!({"signal": "a", "timeout": "120s"})).unwrap();
        assert_eq!(
            wait.timeout_message().as_deref(),
            Some("timed out after 120s waiting for signal \"a\"")
        );
        assert_eq!(
            Wait::from_params(&json!({"signal": "a"}))
                .unwrap()
                .timeout_message(),
            None
        );
    }

    #[test]
    fn a_wait_for_a_duration_or_until_a_time() {
        assert_eq!(
            Wait::from_params(&json!({"for": "250ms"})),
            Ok(Wait::For(Duration::from_millis(250)))
        );
        // Waits may be long: no upper bound beyond the parser's.
        assert_eq!(
            Wait::from_params(&json!({"for": "720h"})),
            Ok(Wait::For(Duration::from_secs(720 * 3600)))
        );
        assert_eq!(
            Wait::from_params(&json!({"until": "goal.input.deadline"})),
            Ok(Wait::Until("goal.input.deadline".into()))
        );
        // The CEL is compiled by validation, not here.
        assert_eq!(
            Wait::from_params(&json!({"until": "not cel +"})),
            Ok(Wait::Until("not cel +".into()))
        );
        assert_eq!(
            Wait::from_params(&json!({"for": "1h"}))
                .unwrap()
                .timeout_message(),
            None
        );
    }

    #[test]
    fn params_must_be_an_object() {
        assert_eq!(
            fault(json!(["signal"])),
            (
                "",
                "a wait step's params must be an object, got an array".to_owned()
            )
        );
    }

    #[test]
    fn unknown_keys_are_named_with_the_allowed_ones() {
        assert_eq!(
            fault(json!({"signal": "a", "payload": {}})),
            (
                "",
                "unknown field \"payload\" (expected one of: signal, for, until, timeout)"
                    .to_owned()
            )
        );
        let params = json!({"sginal": "a"});
        let Value::Object(map) = &params else {
            unreachable!()
        };
        assert_eq!(Wait::from_object(map).unwrap_err().0, "sginal");
    }

    #[test]
    fn exactly_one_of_signal_for_until() {
        let needs = "a wait step needs one of params.signal (a signal name), params.for (a \
                     duration such as \"10m\") or params.until (a CEL expression giving an RFC \
                     3339 time)";
        assert_eq!(fault(json!({})), ("", needs.to_owned()));
        assert_eq!(fault(json!({"timeout": "5m"})), ("", needs.to_owned()));
        assert_eq!(
            fault(json!({"signal": "a", "for": "5m"})),
            (
                "for",
                "params.signal and params.for do not combine: a wait step waits for one thing \
                 (a signal, a duration or a time)"
                    .to_owned()
            )
        );
        assert_fault(
            json!({"for": "5m", "until": "goal.input.at"}),
            "until",
            "params.for and params.until do not combine",
        );
        assert_fault(
            json!({"signal": "a", "for": "5m", "until": "x"}),
            "until",
            "params.signal, params.for and params.until do not combine",
        );
        // null counts as given: it is a wrong value, not a missing one.
        assert_fault(
            json!({"signal": null, "for": "1s"}),
            "for",
            "do not combine",
        );
    }

    #[test]
    fn timeout_only_with_signal() {
        for params in [
            json!({"for": "5m", "timeout": "1m"}),
            json!({"until": "goal.input.at", "timeout": "1m"}),
        ] {
            assert_eq!(
                fault(params),
                (
                    "timeout",
                    "params.timeout applies only with params.signal: a wait for a duration or \
                     a time ends when it comes"
                        .to_owned()
                )
            );
        }
    }

    #[test]
    fn signal_must_be_a_valid_name() {
        assert_eq!(
            fault(json!({"signal": 5})),
            (
                "signal",
                "expected a string (a signal name), got a number".to_owned()
            )
        );
        assert_fault(json!({"signal": null}), "signal", "got null");
        assert_fault(
            json!({"signal": "needs approval"}),
            "signal",
            "invalid signal name \"needs approval\": ' ' is not allowed",
        );
        assert_fault(json!({"signal": ""}), "signal", "the signal name is empty");
    }

    #[test]
    fn durations_use_the_blueprint_grammar_and_are_positive() {
        for key in ["for", "timeout"] {
            let with = |value: Value| {
                let mut params = json!({"signal": "a"});
                if key == "for" {
                    params = json!({});
                }
                params[key] = value;
                params
            };
            assert_eq!(
                fault(with(json!(300))),
                (
                    key,
                    "expected a duration string such as \"30s\", got a number".to_owned()
                )
            );
            assert_fault(
                with(json!("5 minutes")),
                key,
                "invalid duration \"5 minutes\"",
            );
            assert_fault(with(json!("1.5h")), key, "invalid duration");
            assert_fault(
                with(json!("99999999999999999999ms")),
                key,
                "the number is too large",
            );
            assert_eq!(
                fault(with(json!("0s"))),
                (
                    key,
                    format!("params.{key} must be longer than 0, got \"0s\"")
                )
            );
            assert_fault(with(json!("0ms")), key, "must be longer than 0");
            assert_fault(with(json!("3651d")), key, "the longest wait is 3650d");
        }
    }

    #[test]
    fn until_is_a_non_empty_string() {
        assert_eq!(
            fault(json!({"until": 1_700_000_000})),
            (
                "until",
                "expected a string (a CEL expression giving an RFC 3339 time), got a number"
                    .to_owned()
            )
        );
        assert_fault(json!({"until": null}), "until", "got null");
        for empty in ["", "  "] {
            assert_eq!(
                fault(json!({ "until": empty })),
                (
                    "until",
                    "params.until must not be empty: give a CEL expression giving an RFC \
                     3339 time"
                        .to_owned()
                )
            );
        }
    }
}

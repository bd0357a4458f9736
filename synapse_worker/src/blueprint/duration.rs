//! Durations as blueprints write them: one integer and one unit (`250ms`, `30s`, `5m`, `1h`, `7d`).
//!
//! The grammar is deliberately small: a single unit keeps what a user reads in
//! `goal_status` identical to what they wrote, and avoids the ambiguity of `1m30s`
//! versus `90s` when blueprints are compared or stored.

use std::time::Duration;

/// The units a duration may use, with their length in milliseconds, longest suffix first
/// so that `ms` is not read as `m` followed by garbage.
const UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
];

/// Parses `250ms`, `30s`, `5m`, `1h` or `7d` (one non-negative integer followed by one unit).
///
/// The error is a readable sentence that quotes the input, ready to become a
/// validation problem.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration \"{s}\": expected an integer followed by ms, s, m, h or d \
             (e.g. \"250ms\", \"30s\", \"5m\", \"1h\", \"7d\")"
        )
    };
    let (digits, millis_per_unit) = UNITS
        .iter()
        .find_map(|(unit, ms)| s.strip_suffix(unit).map(|d| (d, *ms)))
        .ok_or_else(invalid)?;
    // `u64::from_str` accepts a leading `+`; the grammar is digits only.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\": the number is too large"))?;
    let millis = value
        .checked_mul(millis_per_unit)
        .ok_or_else(|| format!("invalid duration \"{s}\": the number is too large"))?;
    Ok(Duration::from_millis(millis))
}

/// Formats a duration with the largest unit that represents it exactly (`90s`, `5m`, `1h`).
///
/// Blueprint durations have millisecond resolution, so anything finer is truncated;
/// the result always parses back with [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return "0ms".to_owned();
    }
    for (unit, ms) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if millis % ms == 0 {
            return format!("{}{unit}", millis / ms);
        }
    }
    format!("{millis}ms")
}

/// Serde adapter for `std::time::Duration` fields written as duration strings
/// (`#[serde(with = "duration::serde_str")]`).
pub mod serde_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes the duration as a string such as `"30s"`.
    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_duration(*d))
    }

    /// Reads a string such as `"30s"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(deserializer)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_is_not_one_integer_and_one_unit() {
        for bad in [
            "", "s", "ms", "5", "5x", "1.5s", "-1s", "+1s", " 1s", "1s ", "1m30s", "1S", "1 s",
            "5w",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("invalid duration"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn rejects_overflow_without_panicking() {
        let err = parse_duration("99999999999999999999ms").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        let err = parse_duration("18446744073709551615h").unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn formats_with_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::ZERO), "0ms");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1ms");
    }

    #[test]
    fn format_then_parse_round_trips() {
        for ms in [1, 999, 1000, 61_000, 60_000, 3_600_000, 86_400_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{ms}");
        }
    }
}

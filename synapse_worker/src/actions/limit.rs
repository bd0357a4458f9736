//! The bound on what an attempt may return (`--max-result-size`).
//!
//! A result is stored in the task row, copied into the input of the steps
//! after it and loaded with every `steps` map, so one oversized answer would
//! cost memory in the worker and in Postgres over and over. Actions that read
//! from outside (`http`, `exec`, `sql`) stop reading at the limit; every
//! action's JSON result is measured again before it is recorded.
use std::fmt;

use serde_json::Value;

use super::ActionError;
use crate::blueprint::limits;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: usize = 1024 * MIB;

/// The largest limit accepted: far past any sensible result, and below the
/// 255 MB a single `jsonb` value can hold.
const MAX_LIMIT: usize = 128 * MIB;

/// The most bytes of JSON an attempt's result may take (serialized compactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultLimit {
    bytes: usize,
}

impl Default for ResultLimit {
    /// 1 MiB.
    fn default() -> Self {
        Self { bytes: MIB }
    }
}

impl ResultLimit {
    /// A limit of `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        Self { bytes }
    }

    /// The limit in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Parses `1048576`, `64KiB`, `1MiB`, `1 GiB` (binary units; `B`, `KiB`,
    /// `MiB`, `GiB`, case-insensitive), between 1 byte and 128 MiB.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let digits = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(digits);
        let unit_size = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kib" => KIB,
            "mib" => MIB,
            "gib" => GIB,
            _ => {
                return Err(format!(
                    "invalid size \"{text}\": expected bytes or a number with KiB, MiB or GiB (e.g. 1048576, 64KiB, 1MiB)"
                ))
            }
        };
        let number: usize = number.parse().map_err(|_| {
            format!("invalid size \"{text}\": expected a whole number first (e.g. 64KiB)")
        })?;
        match number.checked_mul(unit_size) {
            Some(bytes) if (1..=MAX_LIMIT).contains(&bytes) => Ok(Self { bytes }),
            _ => Err(format!(
                "invalid size \"{text}\": must be between 1 byte and {}",
                Self::new(MAX_LIMIT)
            )),
        }
    }

    /// The permanent error of a result over the limit; `what` says whose
    /// (e.g. `GET http://host/x`), or is empty.
    pub fn exceeded(&self, what: &str) -> ActionError {
        let message = format!("result is larger than the {self} limit (--max-result-size)");
        ActionError::Permanent(if what.is_empty() {
            message
        } else {
            format!("{what}: {message}")
        })
    }

    /// `Ok` if `value`, serialized as compact JSON, fits, and nests no
    /// deeper than any document Synapse stores (a result nests one level
    /// deeper in the default input of each step after it).
    pub fn check(&self, value: &Value) -> Result<(), ActionError> {
        if limits::json_len_within(value, self.bytes).is_none() {
            return Err(self.exceeded(""));
        }
        limits::check_depth("result", value).map_err(ActionError::Permanent)
    }
}

impl fmt::Display for ResultLimit {
    /// `1 MiB`, `64 KiB`, or `1500 bytes`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.bytes;
        if bytes >= GIB && bytes.is_multiple_of(GIB) {
            write!(f, "{} GiB", bytes / GIB)
        } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
            write!(f, "{} MiB", bytes / MIB)
        } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
            write!(f, "{} KiB", bytes / KIB)
        } else if bytes == 1 {
            f.write_str("1 byte")
        } else {
            write!(f, "{bytes} bytes")
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sizes_parse_in_bytes_and_binary_units() {
        for (text, bytes) in [
            ("1048576", MIB),
            ("64KiB", 64 * KIB),
            ("64 kib", 64 * KIB),
            ("1MiB", MIB),
            ("2 MiB", 2 * MIB),
            ("100B", 100),
            ("1", 1),
            ("128MiB", 128 * MIB),
        ] {
            assert_eq!(
                ResultLimit::parse(text),
                Ok(ResultLimit::new(bytes)),
                "{text}"
            );
        }
        for text in [
            "", "MiB", "1.5MiB", "-1", "1 MB", "1k", "0", "129MiB", "1GiB",
        ] {
            assert!(ResultLimit::parse(text).is_err(), "{text}");
        }
        assert_eq!(
            ResultLimit::parse("1 MB").unwrap_err(),
            "invalid size \"1 MB\": expected bytes or a number with KiB, MiB or GiB (e.g. 1048576, 64KiB, 1MiB)"
        );
        assert_eq!(
            ResultLimit::parse("0").unwrap_err(),
            "invalid size \"0\": must be between 1 byte and 128 MiB"
        );
    }

    #[test]
    fn limits_show_in_the_largest_whole_unit() {
        assert_eq!(ResultLimit::default().to_string(), "1 MiB");
        assert_eq!(ResultLimit::new(64 * KIB).to_string(), "64 KiB");
        assert_eq!(ResultLimit::new(1536 * KIB).to_string(), "1536 KiB");
        assert_eq!(ResultLimit::new(1500).to_string(), "1500 bytes");
        assert_eq!(ResultLimit::new(1).to_string(), "1 byte");
    }

    #[test]
    fn results_are_measured_as_compact_json() {
        let limit = ResultLimit::new(10);
        assert_eq!(limit.check(&json!({"a": "12"})), Ok(()), "10 bytes exactly");
        assert_eq!(limit.check(&json!("12345678")), Ok(()));
        assert_eq!(
            limit.check(&json!("123456789")),
            Err(ActionError::Permanent(
                "result is larger than the 10 bytes limit (--max-result-size)".to_owned()
            ))
        );
        assert_eq!(
            ResultLimit::default().exceeded("GET http://x/"),
            ActionError::Permanent(
                "GET http://x/: result is larger than the 1 MiB limit (--max-result-size)"
                    .to_owned()
            )
        );
        let big = json!({"rows": vec!["x".repeat(1000); 2000]});
        assert!(ResultLimit::default().check(&big).is_err());
    }
}

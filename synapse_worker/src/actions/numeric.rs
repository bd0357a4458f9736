//! Exact decimals for `numeric` parameters: a JSON number (or a string holding
//! one) encoded in Postgres's binary `numeric` format digit for digit, with no
//! detour through `f64` and its scale kept (`1250.00` binds as `1250.00`).

use std::error::Error;

// `BytesMut` as the `ToSql` trait names it (what `to_sql_checked!` uses too).
use tokio_postgres::types::private::BytesMut;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// Most digits before the decimal point Postgres's `numeric` holds.
const MAX_INTEGER_DIGITS: i64 = 131_072;
/// Most digits after the decimal point Postgres's `numeric` holds.
const MAX_SCALE: i64 = 0x3FFF;
/// Decimal digits in one base-10000 digit of the binary format.
const DIGITS_PER_GROUP: i64 = 4;

const SIGN_POSITIVE: u16 = 0x0000;
const SIGN_NEGATIVE: u16 = 0x4000;
const SIGN_NAN: u16 = 0xC000;
const SIGN_INFINITY: u16 = 0xD000;
const SIGN_NEGATIVE_INFINITY: u16 = 0xF000;

/// A decimal in the shape of Postgres's binary `numeric`: base-10000 digits, the
/// weight of the first (its power of 10000), the sign, and the display scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Numeric {
    weight: i16,
    sign: u16,
    scale: u16,
    digits: Vec<i16>,
}

impl Numeric {
    /// Reads decimal text the way Postgres's `numeric` input does: an optional
    /// sign, digits with an optional decimal point, an optional exponent
    /// (`1.5e-3`), or `NaN`, `Infinity`, `-Infinity` (any case, `inf` too).
    /// Surrounding whitespace is ignored.
    ///
    /// `None` for anything else, and for a value beyond what `numeric` holds
    /// (131 072 digits before the point, 16 383 after).
    pub(crate) fn parse(text: &str) -> Option<Numeric> {
        let text = text.trim();
        let special = |sign| {
            Some(Numeric {
                weight: 0,
                sign,
                scale: 0,
                digits: Vec::new(),
            })
        };
        match text.to_ascii_lowercase().as_str() {
            "nan" => return special(SIGN_NAN),
            "infinity" | "+infinity" | "inf" | "+inf" => return special(SIGN_INFINITY),
            "-infinity" | "-inf" => return special(SIGN_NEGATIVE_INFINITY),
            _ => {}
        }
        let (negative, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], parse_exponent(&rest[at + 1..])?),
            None => (rest, 0),
        };
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && fraction.is_empty() || !all_digits(whole) || !all_digits(fraction) {
            return None;
        }
        // The lengths are bounded by the text's; the exponent by parse_exponent.
        let scale = (fraction.len() as i64 - exponent).max(0);
        if scale > MAX_SCALE {
            return None;
        }
        // The digits with the decimal point after the first `point` of them.
        let digits = whole.bytes().chain(fraction.bytes()).map(|b| b - b'0');
        let mut point = whole.len() as i64 + exponent;
        let mut significant: Vec<u8> = digits.skip_while(|&d| d == 0).collect();
        point -= (whole.len() + fraction.len() - significant.len()) as i64;
        while significant.last() == Some(&0) {
            significant.pop();
        }
        let scale = u16::try_from(scale).ok()?;
        if significant.is_empty() {
            // Zero, whatever its sign: Postgres has no negative zero.
            return Some(Numeric {
                weight: 0,
                sign: SIGN_POSITIVE,
                scale,
                digits: Vec::new(),
            });
        }
        if point > MAX_INTEGER_DIGITS {
            return None;
        }
        // Digit i stands for 10^(point - 1 - i); base-10000 digits start at
        // multiples of 4 of that power.
        let group_of = |power: i64| power.div_euclid(DIGITS_PER_GROUP);
        let first_power = point - 1;
        let last_power = point - significant.len() as i64;
        let weight = group_of(first_power);
        let mut groups = vec![0i16; (weight - group_of(last_power) + 1) as usize];
        for (i, digit) in significant.iter().enumerate() {
            let power = first_power - i as i64;
            let group = group_of(power);
            let within = power - group * DIGITS_PER_GROUP;
            groups[(weight - group) as usize] += i16::from(*digit) * 10i16.pow(within as u32);
        }
        i16::try_from(groups.len()).ok()?;
        Some(Numeric {
            weight: i16::try_from(weight).ok()?,
            sign: if negative {
                SIGN_NEGATIVE
            } else {
                SIGN_POSITIVE
            },
            scale,
            digits: groups,
        })
    }

    /// The value in Postgres's binary format: digit count, weight, sign,
    /// display scale, then the base-10000 digits, each big-endian.
    pub(crate) fn to_binary(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 2 * self.digits.len());
        // `parse` keeps the digit count within i16.
        let count = i16::try_from(self.digits.len()).unwrap_or(i16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&self.weight.to_be_bytes());
        out.extend_from_slice(&self.sign.to_be_bytes());
        out.extend_from_slice(&self.scale.to_be_bytes());
        for digit in &self.digits {
            out.extend_from_slice(&digit.to_be_bytes());
        }
        out
    }
}

/// An exponent's digits, with their sign; `None` beyond what any `numeric`
/// could use (which also keeps the arithmetic on it small).
fn parse_exponent(text: &str) -> Option<i64> {
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    if digits.len() > 9 {
        return None;
    }
    let value: i64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    Some(if negative { -value } else { value })
}

impl ToSql for Numeric {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.to_binary());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary form of `text`, as (digits, weight, sign, scale).
    fn parts(text: &str) -> (Vec<i16>, i16, u16, u16) {
        let n = Numeric::parse(text).unwrap_or_else(|| panic!("{text} should parse"));
        let binary = n.to_binary();
        assert_eq!(
            i16::from_be_bytes([binary[0], binary[1]]) as usize,
            n.digits.len()
        );
        assert_eq!(binary.len(), 8 + 2 * n.digits.len());
        (n.digits, n.weight, n.sign, n.scale)
    }

    #[test]
    fn zero_keeps_its_scale_and_loses_its_sign() {
        assert_eq!(parts("0"), (vec![], 0, SIGN_POSITIVE, 0));
        assert_eq!(parts("0.00"), (vec![], 0, SIGN_POSITIVE, 2));
        assert_eq!(parts("-0.0"), (vec![], 0, SIGN_POSITIVE, 1));
        assert_eq!(parts("000"), (vec![], 0, SIGN_POSITIVE, 0));
        assert_eq!(parts("0e5"), (vec![], 0, SIGN_POSITIVE, 0));
    }

    #[test]
    fn integers_and_negatives() {
        assert_eq!(parts("1"), (vec![1], 0, SIGN_POSITIVE, 0));
        assert_eq!(parts("10000"), (vec![1], 1, SIGN_POSITIVE, 0));
        assert_eq!(parts("-12345"), (vec![1, 2345], 1, SIGN_NEGATIVE, 0));
        assert_eq!(parts("+42"), (vec![42], 0, SIGN_POSITIVE, 0));
        assert_eq!(parts(" 7 "), (vec![7], 0, SIGN_POSITIVE, 0));
    }

    #[test]
    fn scale_is_kept() {
        assert_eq!(parts("1250.00"), (vec![1250], 0, SIGN_POSITIVE, 2));
        assert_eq!(parts("0.1"), (vec![1000], -1, SIGN_POSITIVE, 1));
        assert_eq!(parts("0.00012"), (vec![1, 2000], -1, SIGN_POSITIVE, 5));
        assert_eq!(parts(".5"), (vec![5000], -1, SIGN_POSITIVE, 1));
        assert_eq!(parts("5."), (vec![5], 0, SIGN_POSITIVE, 0));
        assert_eq!(
            parts("12345678901234567.89"),
            (vec![1, 2345, 6789, 123, 4567, 8900], 4, SIGN_POSITIVE, 2)
        );
        assert_eq!(parts("-49.9"), (vec![49, 9000], 0, SIGN_NEGATIVE, 1));
    }

    #[test]
    fn exponents() {
        assert_eq!(parts("1.5e-3"), (vec![15], -1, SIGN_POSITIVE, 4));
        assert_eq!(parts("1E4"), (vec![1], 1, SIGN_POSITIVE, 0));
        assert_eq!(parts("125e-2"), (vec![1, 2500], 0, SIGN_POSITIVE, 2));
        assert_eq!(parts("1e+2"), (vec![100], 0, SIGN_POSITIVE, 0));
        // 10^400 is 10000^100: one digit of weight 100.
        assert_eq!(parts("1e400"), (vec![1], 100, SIGN_POSITIVE, 0));
        assert_eq!(parts("1e-400").3, 400);
    }

    #[test]
    fn special_values() {
        assert_eq!(parts("NaN"), (vec![], 0, SIGN_NAN, 0));
        assert_eq!(parts("nan"), (vec![], 0, SIGN_NAN, 0));
        assert_eq!(parts("Infinity"), (vec![], 0, SIGN_INFINITY, 0));
        assert_eq!(parts("-inf"), (vec![], 0, SIGN_NEGATIVE_INFINITY, 0));
    }

    #[test]
    fn huge_values_fit_or_are_refused() {
        let many = "9".repeat(10_000);
        let (digits, weight, _, scale) = parts(&many);
        assert_eq!((digits.len(), weight, scale), (2500, 2499, 0));
        let fraction = format!("0.{}", "1".repeat(10_000));
        assert_eq!(parts(&fraction).3, 10_000);
        assert_eq!(parts(&format!("1e{}", MAX_INTEGER_DIGITS - 1)).1, 32767);
        for text in [
            format!("1e{MAX_INTEGER_DIGITS}"),
            format!("1e-{}", MAX_SCALE + 1),
            "1e99999999999999999999".to_owned(),
            "1e-99999999999999999999".to_owned(),
            format!("0.{}", "1".repeat(MAX_SCALE as usize + 1)),
        ] {
            assert_eq!(
                Numeric::parse(&text),
                None,
                "{}",
                &text[..20.min(text.len())]
            );
        }
    }

    #[test]
    fn not_numbers() {
        for text in [
            "", " ", "-", "+", ".", "e5", "1e", "1e+", "1.2.3", "1,5", "abc", "0x10", "1 2", "--1",
            "١",
        ] {
            assert_eq!(Numeric::parse(text), None, "{text:?}");
        }
    }
}

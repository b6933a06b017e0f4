//! Numbers as checks see them. Integers, `numeric` values and numbers written as text are kept
//! as exact decimals of any size and compared exactly (`9223372036854775807` is not
//! `9223372036854775806`); `real` and `double precision` values stay IEEE doubles. NaN never
//! compares: no expectation passes on it. The text `inf`, `nan` or `0x10` is not a number.
//! Pure: no I/O.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use bigdecimal::{BigDecimal, ToPrimitive};
use serde::{Serialize, Serializer};

/// Longest text read as a number. PostgreSQL's `numeric` prints at most 131072 digits before
/// the point and 16383 after it.
const MAX_TEXT_LEN: usize = 150_000;
/// Largest decimal exponent accepted in text (`1e400000` is refused, not expanded).
const MAX_EXPONENT: i64 = 200_000;

/// A number a check observed.
#[derive(Debug, Clone)]
pub enum Number {
    /// An integer, a `numeric` or a number written as text: exact, of any size.
    Exact(BigDecimal),
    /// A `real` / `double precision` value, or a `numeric` NaN or infinity.
    Float(f64),
}

impl Number {
    pub fn from_i64(value: i64) -> Number {
        Number::Exact(BigDecimal::from(value))
    }

    pub fn from_f64(value: f64) -> Number {
        Number::Float(value)
    }

    /// Reads decimal text: optional sign, digits with an optional fraction, an optional
    /// exponent (`-1`, `0.5`, `1e3`, `+.5`), surrounding whitespace allowed. Anything else —
    /// `inf`, `NaN`, `Infinity`, `0x10`, `1_000`, empty — is not a number.
    pub fn parse(text: &str) -> Option<Number> {
        parse_decimal(text).map(Number::Exact)
    }

    /// The nearest double, for metrics and the sample store: ±infinity beyond the double range,
    /// NaN for NaN.
    pub fn to_f64(&self) -> f64 {
        match self {
            Number::Exact(d) => d.to_f64().unwrap_or(f64::NAN),
            Number::Float(f) => *f,
        }
    }

    pub fn is_nan(&self) -> bool {
        matches!(self, Number::Float(f) if f.is_nan())
    }

    /// How this number compares with an expectation's literal: exactly for exact numbers, as
    /// doubles for floats (so a `double precision` 0.9 equals the literal 0.9). `None` for NaN.
    pub(crate) fn compare(&self, literal: &BigDecimal) -> Option<Ordering> {
        match self {
            Number::Exact(d) => Some(d.cmp(literal)),
            Number::Float(f) => f.partial_cmp(&literal.to_f64().unwrap_or(f64::NAN)),
        }
    }
}

/// Reads strict decimal text into an exact decimal (see [`Number::parse`]).
pub(crate) fn parse_decimal(text: &str) -> Option<BigDecimal> {
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_TEXT_LEN {
        return None;
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    if matches!(bytes.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i - int_start;
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        digits += i - frac_start;
    }
    if digits == 0 {
        return None;
    }
    if i < bytes.len() && matches!(bytes[i], b'e' | b'E') {
        i += 1;
        if i < bytes.len() && matches!(bytes[i], b'+' | b'-') {
            i += 1;
        }
        let exp_start = i;
        let mut exponent: i64 = 0;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            exponent = exponent
                .saturating_mul(10)
                .saturating_add(i64::from(bytes[i] - b'0'));
            i += 1;
        }
        if i == exp_start || exponent > MAX_EXPONENT {
            return None;
        }
    }
    if i != bytes.len() {
        return None;
    }
    BigDecimal::from_str(text).ok()
}

impl PartialEq for Number {
    fn eq(&self, other: &Number) -> bool {
        match (self, other) {
            (Number::Exact(a), Number::Exact(b)) => a == b,
            (Number::Float(a), Number::Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            _ => false,
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Exact(d) => write!(f, "{d}"),
            Number::Float(x) => f.write_str(&float_text(*x)),
        }
    }
}

/// A double as PostgreSQL spells it: `NaN`, `Infinity`, `-Infinity`, integers without `.0`.
pub(crate) fn float_text(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// JSON: a number when a JSON reader gets exactly this value back, else the exact text
/// (`"123456789012345678901234567890.5"`, `"1e+400"`, `"NaN"`).
impl Serialize for Number {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Number::Exact(d) => {
                if d.is_integer() {
                    if let Some(i) = d.to_i64() {
                        return serializer.serialize_i64(i);
                    }
                }
                let nearest = d.to_f64().unwrap_or(f64::NAN);
                let round_trips = nearest.is_finite()
                    && BigDecimal::from_str(&format!("{nearest:?}")).is_ok_and(|back| &back == d);
                if round_trips {
                    serializer.serialize_f64(nearest)
                } else {
                    serializer.serialize_str(&d.to_string())
                }
            }
            Number::Float(x) if x.is_finite() => serializer.serialize_f64(*x),
            Number::Float(x) => serializer.serialize_str(&float_text(*x)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(text: &str) -> Number {
        Number::parse(text).unwrap_or_else(|| panic!("{text} is a number"))
    }

    #[test]
    fn text_numbers_are_strict_decimals() {
        for good in [
            "0", "-1", " 42 ", "0.5", ".5", "1.", "+3", "1e3", "1E-3", "-2.5e+10",
        ] {
            assert!(Number::parse(good).is_some(), "{good}");
        }
        for bad in [
            "",
            " ",
            "inf",
            "-inf",
            "nan",
            "NaN",
            "Infinity",
            "0x10",
            "1_000",
            "1e",
            "e3",
            "-",
            ".",
            "1.2.3",
            "1e1000000",
            "٣",
        ] {
            assert!(Number::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn big_integers_compare_exactly() {
        let max = Number::from_i64(i64::MAX);
        let literal = parse_decimal("9223372036854775806").expect("literal");
        assert_eq!(max.compare(&literal), Some(Ordering::Greater));
        let same = parse_decimal("9223372036854775807").expect("literal");
        assert_eq!(max.compare(&same), Some(Ordering::Equal));
    }

    #[test]
    fn floats_compare_as_doubles_and_nan_never() {
        let literal = parse_decimal("0.9").expect("literal");
        assert_eq!(
            Number::from_f64(0.9).compare(&literal),
            Some(Ordering::Equal)
        );
        assert_eq!(Number::from_f64(f64::NAN).compare(&literal), None);
        assert_eq!(
            Number::from_f64(f64::INFINITY).compare(&literal),
            Some(Ordering::Greater)
        );
    }

    #[test]
    fn json_keeps_exact_text_when_a_double_would_not() {
        let json = |n: &Number| serde_json::to_string(n).unwrap_or_default();
        assert_eq!(json(&Number::from_i64(i64::MAX)), "9223372036854775807");
        assert_eq!(json(&exact("0.5")), "0.5");
        assert_eq!(json(&exact("1e400")), "\"1e+400\"");
        assert_eq!(
            json(&exact("123456789012345678901234567890.5")),
            "\"123456789012345678901234567890.5\""
        );
        assert_eq!(json(&Number::from_f64(f64::NAN)), "\"NaN\"");
        assert_eq!(json(&Number::from_f64(2.5)), "2.5");
    }

    #[test]
    fn display_is_exact() {
        assert_eq!(
            exact("9223372036854775807").to_string(),
            "9223372036854775807"
        );
        assert_eq!(exact("1e400").to_string(), "1e+400");
        assert_eq!(Number::from_f64(3.0).to_string(), "3");
        assert_eq!(Number::from_f64(f64::NEG_INFINITY).to_string(), "-Infinity");
    }
}

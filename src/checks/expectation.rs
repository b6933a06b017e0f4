//! The expectation grammar of a check and its evaluation.
//!
//! ```text
//! expectation := op value
//!              | "between" number "and" number
//!              | "not between" number "and" number
//! op          := == | != | < | <= | > | >=
//! value       := number | "double-quoted text" | $parameter
//! ```
//!
//! Parse errors name the column (1-based) and what was expected there. Pure: no I/O.

use std::cmp::Ordering;
use std::fmt;

use bigdecimal::BigDecimal;

use crate::checks::number::{parse_decimal, Number};

/// A literal in an expectation. Numbers are exact decimals.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(BigDecimal),
    Text(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(n) => write!(f, "{n}"),
            Value::Text(t) => write!(f, "\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CompareOp {
    fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "==",
            CompareOp::Ne => "!=",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expectation {
    Compare {
        op: CompareOp,
        value: Value,
    },
    Between {
        low: BigDecimal,
        high: BigDecimal,
        negated: bool,
    },
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expectation::Compare { op, value } => write!(f, "{} {value}", op.as_str()),
            Expectation::Between { low, high, negated } => write!(
                f,
                "{}between {} and {}",
                if *negated { "not " } else { "" },
                low,
                high
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpectationError {
    #[error("empty expectation: write e.g. \"== 0\", \">= 4\", \"== \\\"3.7.0\\\"\" or \"between 0 and 1\"")]
    Empty,
    #[error("expected an operator (==, !=, <, <=, >, >=) or \"between\" at column {column}, found {found:?}")]
    ExpectedOperator { column: usize, found: String },
    #[error(
        "expected a value (a number, \"text\" or $parameter) at column {column}, found {found:?}"
    )]
    ExpectedValue { column: usize, found: String },
    #[error("unterminated string starting at column {column}")]
    UnterminatedString { column: usize },
    #[error("unknown parameter ${name} at column {column}")]
    UnknownParameter { name: String, column: usize },
    #[error("\"between\" needs numbers: found {found:?} at column {column}")]
    BetweenNeedsNumbers { column: usize, found: String },
    #[error("expected \"and\" at column {column}, found {found:?}")]
    ExpectedAnd { column: usize, found: String },
    #[error("low bound {low} is greater than high bound {high}")]
    InvertedRange { low: String, high: String },
    #[error("{op} needs a number, found text {found:?} at column {column}")]
    OrderingNeedsNumber {
        op: &'static str,
        found: String,
        column: usize,
    },
    #[error("unexpected trailing input {found:?} at column {column}")]
    Trailing { column: usize, found: String },
}

/// What a check observed, as far as an expectation is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Number(Number),
    Text(String),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvaluationError {
    #[error("expected a number, found {found:?}")]
    NotNumeric { found: String },
}

/// A token and the 1-based column it starts at.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Op(CompareOp),
    Word(String),
    Number(BigDecimal),
    Text(String),
    Parameter(String),
    Other(String),
}

fn describe(token: &Token) -> String {
    match token {
        Token::Op(op) => op.as_str().to_string(),
        Token::Word(w) | Token::Other(w) => w.clone(),
        Token::Number(n) => n.to_string(),
        Token::Text(t) => format!("\"{t}\""),
        Token::Parameter(p) => format!("${p}"),
    }
}

fn tokenize(input: &str) -> Result<Vec<(Token, usize)>, ExpectationError> {
    let chars: Vec<char> = input.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let column = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '"' {
            let mut text = String::new();
            i += 1;
            let mut closed = false;
            while i < chars.len() {
                match chars[i] {
                    '\\' if i + 1 < chars.len() => {
                        text.push(chars[i + 1]);
                        i += 2;
                    }
                    '"' => {
                        closed = true;
                        i += 1;
                        break;
                    }
                    other => {
                        text.push(other);
                        i += 1;
                    }
                }
            }
            if !closed {
                return Err(ExpectationError::UnterminatedString { column });
            }
            tokens.push((Token::Text(text), column));
            continue;
        }
        if c == '$' {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect();
            tokens.push((Token::Parameter(name), column));
            i = end;
            continue;
        }
        if "=!<>".contains(c) {
            let mut end = i;
            while end < chars.len() && "=!<>".contains(chars[end]) {
                end += 1;
            }
            let text: String = chars[i..end].iter().collect();
            let token = match text.as_str() {
                "==" => Token::Op(CompareOp::Eq),
                "!=" => Token::Op(CompareOp::Ne),
                "<" => Token::Op(CompareOp::Lt),
                "<=" => Token::Op(CompareOp::Le),
                ">" => Token::Op(CompareOp::Gt),
                ">=" => Token::Op(CompareOp::Ge),
                _ => Token::Other(text),
            };
            tokens.push((token, column));
            i = end;
            continue;
        }
        let mut end = i;
        while end < chars.len() && !chars[end].is_whitespace() && !"\"$=!<>".contains(chars[end]) {
            end += 1;
        }
        if end == i {
            end = i + 1;
        }
        let text: String = chars[i..end].iter().collect();
        let token = if text.chars().all(|c| c.is_ascii_alphabetic()) {
            Token::Word(text.to_ascii_lowercase())
        } else {
            match parse_decimal(&text) {
                Some(n) => Token::Number(n),
                None => Token::Other(text),
            }
        };
        tokens.push((token, column));
        i = end;
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: Vec<(Token, usize)>,
    position: usize,
    end_column: usize,
    params: &'a dyn Fn(&str) -> Option<String>,
}

impl Parser<'_> {
    fn next(&mut self) -> Option<(Token, usize)> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    fn found(&self, token: &Option<(Token, usize)>) -> (usize, String) {
        match token {
            Some((t, column)) => (*column, describe(t)),
            None => (self.end_column, "end of input".to_string()),
        }
    }

    /// A value; `$name` resolves through the parameters (a numeric text becomes a number).
    fn value(&mut self) -> Result<(Value, usize), ExpectationError> {
        let token = self.next();
        match token {
            Some((Token::Number(n), column)) => Ok((Value::Number(n), column)),
            Some((Token::Text(t), column)) => Ok((Value::Text(t), column)),
            Some((Token::Parameter(name), column)) => match (self.params)(&name) {
                Some(text) => match parse_decimal(&text) {
                    Some(n) => Ok((Value::Number(n), column)),
                    None => Ok((Value::Text(text), column)),
                },
                None => Err(ExpectationError::UnknownParameter { name, column }),
            },
            other => {
                let (column, found) = self.found(&other);
                Err(ExpectationError::ExpectedValue { column, found })
            }
        }
    }

    fn number(&mut self) -> Result<BigDecimal, ExpectationError> {
        if let Some((token @ (Token::Word(_) | Token::Other(_) | Token::Op(_)), column)) =
            self.tokens.get(self.position).cloned()
        {
            return Err(ExpectationError::BetweenNeedsNumbers {
                column,
                found: describe(&token),
            });
        }
        match self.value()? {
            (Value::Number(n), _) => Ok(n),
            (Value::Text(t), column) => {
                Err(ExpectationError::BetweenNeedsNumbers { column, found: t })
            }
        }
    }

    fn between(&mut self, negated: bool) -> Result<Expectation, ExpectationError> {
        let low = self.number()?;
        match self.next() {
            Some((Token::Word(w), _)) if w == "and" => {}
            other => {
                let (column, found) = self.found(&other);
                return Err(ExpectationError::ExpectedAnd { column, found });
            }
        }
        let high = self.number()?;
        if low > high {
            return Err(ExpectationError::InvertedRange {
                low: low.to_string(),
                high: high.to_string(),
            });
        }
        Ok(Expectation::Between { low, high, negated })
    }

    fn expectation(&mut self) -> Result<Expectation, ExpectationError> {
        let first = self.next();
        let expectation = match first {
            None => return Err(ExpectationError::Empty),
            Some((Token::Op(op), _)) => {
                let (value, column) = self.value()?;
                if let (
                    Value::Text(text),
                    CompareOp::Lt | CompareOp::Le | CompareOp::Gt | CompareOp::Ge,
                ) = (&value, op)
                {
                    return Err(ExpectationError::OrderingNeedsNumber {
                        op: op.as_str(),
                        found: text.clone(),
                        column,
                    });
                }
                Expectation::Compare { op, value }
            }
            Some((Token::Word(w), _)) if w == "between" => self.between(false)?,
            Some((Token::Word(w), column)) if w == "not" => match self.next() {
                Some((Token::Word(b), _)) if b == "between" => self.between(true)?,
                other => {
                    let (column_found, found) = self.found(&other);
                    let _ = column;
                    return Err(ExpectationError::ExpectedOperator {
                        column: column_found,
                        found: format!("not {found}"),
                    });
                }
            },
            other => {
                let (column, found) = self.found(&other);
                return Err(ExpectationError::ExpectedOperator { column, found });
            }
        };
        if let Some((token, column)) = self.next() {
            return Err(ExpectationError::Trailing {
                column,
                found: describe(&token),
            });
        }
        Ok(expectation)
    }
}

/// Parses an expectation; `$name` is looked up through `params`.
pub fn parse(
    input: &str,
    params: &dyn Fn(&str) -> Option<String>,
) -> Result<Expectation, ExpectationError> {
    let tokens = tokenize(input)?;
    Parser {
        tokens,
        position: 0,
        end_column: input.chars().count() + 1,
        params,
    }
    .expectation()
}

/// Whether an observation that compares as `ordering` with the literal satisfies `op`. An
/// observation that does not compare at all (NaN) satisfies nothing, not even `!=`.
fn compare(op: CompareOp, ordering: Option<Ordering>) -> bool {
    let Some(ordering) = ordering else {
        return false;
    };
    match op {
        CompareOp::Eq => ordering == Ordering::Equal,
        CompareOp::Ne => ordering != Ordering::Equal,
        CompareOp::Lt => ordering == Ordering::Less,
        CompareOp::Le => ordering != Ordering::Greater,
        CompareOp::Gt => ordering == Ordering::Greater,
        CompareOp::Ge => ordering != Ordering::Less,
    }
}

impl Expectation {
    /// Whether the expectation compares numbers (a text observation must then parse as one).
    pub(crate) fn wants_number(&self) -> bool {
        !matches!(
            self,
            Expectation::Compare {
                value: Value::Text(_),
                ..
            }
        )
    }

    pub fn evaluate(&self, observed: &Observed) -> Result<bool, EvaluationError> {
        let as_number = |observed: &Observed| -> Result<Number, EvaluationError> {
            match observed {
                Observed::Number(n) => Ok(n.clone()),
                Observed::Bool(b) => Ok(Number::from_i64(i64::from(*b))),
                Observed::Text(t) => {
                    Number::parse(t).ok_or_else(|| EvaluationError::NotNumeric { found: t.clone() })
                }
            }
        };
        match self {
            Expectation::Compare {
                op,
                value: Value::Number(expected),
            } => Ok(compare(*op, as_number(observed)?.compare(expected))),
            Expectation::Compare {
                op,
                value: Value::Text(expected),
            } => {
                let text = match observed {
                    Observed::Text(t) => t.clone(),
                    Observed::Number(n) if n.is_nan() => return Ok(false),
                    Observed::Number(n) => n.to_string(),
                    Observed::Bool(b) => b.to_string(),
                };
                Ok(match op {
                    CompareOp::Ne => &text != expected,
                    _ => &text == expected,
                })
            }
            Expectation::Between { low, high, negated } => {
                let n = as_number(observed)?;
                match (n.compare(low), n.compare(high)) {
                    (Some(from_low), Some(from_high)) => Ok((from_low != Ordering::Less
                        && from_high != Ordering::Greater)
                        != *negated),
                    // NaN is neither inside nor outside a range.
                    _ => Ok(false),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(name: &str) -> Option<String> {
        match name {
            "expected_version" => Some("3.7.0".into()),
            "limit" => Some("4".into()),
            _ => None,
        }
    }

    fn check(input: &str, rendered: &str) {
        let parsed = parse(input, &params).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(parsed.to_string(), rendered, "{input}");
        // Rendering round-trips.
        assert_eq!(parse(rendered, &params).expect("round trip"), parsed);
    }

    fn check_error(input: &str, message: &str) {
        let error = parse(input, &params)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains(message),
            "{input:?}: {error:?} should contain {message:?}"
        );
    }

    #[test]
    fn parses_the_grammar() {
        check("== 0", "== 0");
        check(">=4", ">= 4");
        check("  <  0.9 ", "< 0.9");
        check("!= -1", "!= -1");
        check("<= 1e3", "<= 1000");
        check("== \"3.7.0\"", "== \"3.7.0\"");
        check("== \"say \\\"hi\\\"\"", "== \"say \\\"hi\\\"\"");
        check("== $expected_version", "== \"3.7.0\"");
        check(">= $limit", ">= 4");
        check("between 0 and 1", "between 0 and 1");
        check("BETWEEN 0 AND 1", "between 0 and 1");
        check("not between -1 and 1.5", "not between -1 and 1.5");
    }

    #[test]
    fn errors_point_at_the_problem() {
        check_error("", "empty expectation");
        check_error(
            "=> 0",
            "operator (==, !=, <, <=, >, >=) or \"between\" at column 1, found \"=>\"",
        );
        check_error("0", "at column 1, found \"0\"");
        check_error("== \"3.7", "unterminated string starting at column 4");
        check_error(
            "== $expected_versoin",
            "unknown parameter $expected_versoin at column 4",
        );
        check_error("between a and 1", "\"between\" needs numbers");
        check_error(
            "between 1 and 0",
            "low bound 1 is greater than high bound 0",
        );
        check_error(
            "between 0 or 1",
            "expected \"and\" at column 11, found \"or\"",
        );
        check_error("== 0 x", "unexpected trailing input \"x\" at column 6");
        check_error("< \"a\"", "< needs a number");
        check_error("==", "expected a value");
    }

    fn num(value: f64) -> Observed {
        Observed::Number(Number::from_f64(value))
    }

    fn exact(text: &str) -> Observed {
        Observed::Number(Number::parse(text).expect("a number"))
    }

    #[test]
    fn integers_and_numerics_compare_exactly() {
        let max = Observed::Number(Number::from_i64(i64::MAX));
        assert_eq!(eval("== 9223372036854775806", max.clone()), Ok(false));
        assert_eq!(eval("== 9223372036854775807", max.clone()), Ok(true));
        assert_eq!(eval("> 9223372036854775806", max), Ok(true));
        let big = exact("100000000000000000000000000000000000001");
        assert_eq!(
            eval("!= 100000000000000000000000000000000000000", big.clone()),
            Ok(true)
        );
        assert_eq!(
            eval("between 0 and 100000000000000000000000000000000000000", big),
            Ok(false)
        );
        assert_eq!(
            eval(
                "== 9223372036854775807",
                Observed::Text("9223372036854775806".into())
            ),
            Ok(false)
        );
        assert_eq!(eval("> 1e400", exact("1.5e400")), Ok(true));
    }

    #[test]
    fn nan_passes_nothing() {
        for expectation in [
            "== 0",
            "!= 0",
            "< 0",
            "<= 0",
            "> 0",
            ">= 0",
            "between 0 and 1",
            "not between 0 and 1",
            "!= \"x\"",
            "== \"NaN\"",
        ] {
            assert_eq!(eval(expectation, num(f64::NAN)), Ok(false), "{expectation}");
        }
    }

    #[test]
    fn text_inf_and_nan_are_not_numbers() {
        for text in ["inf", "-inf", "nan", "NaN", "Infinity", "0x10"] {
            assert_eq!(
                eval("!= 0", Observed::Text(text.into())),
                Err(EvaluationError::NotNumeric { found: text.into() }),
                "{text}"
            );
        }
    }

    fn eval(expectation: &str, observed: Observed) -> Result<bool, EvaluationError> {
        parse(expectation, &params)
            .expect("valid")
            .evaluate(&observed)
    }

    #[test]
    fn evaluates() {
        assert_eq!(eval("== 0", num(0.0)), Ok(true));
        assert_eq!(eval("== 0", num(3.0)), Ok(false));
        assert_eq!(eval(">= 4", num(9.0)), Ok(true));
        assert_eq!(eval("< 0.9", num(0.9)), Ok(false));
        assert_eq!(eval("between 0 and 1", num(1.0)), Ok(true));
        assert_eq!(eval("not between 0 and 1", num(1.5)), Ok(true));
        assert_eq!(
            eval("== $expected_version", Observed::Text("3.7.0".into())),
            Ok(true)
        );
        assert_eq!(
            eval("!= \"3.7.0\"", Observed::Text("3.6.0".into())),
            Ok(true)
        );
        assert_eq!(eval("== \"3\"", num(3.0)), Ok(true));
        assert_eq!(eval("== 1", Observed::Bool(true)), Ok(true));
        assert_eq!(eval(">= 4", Observed::Text("5".into())), Ok(true));
        assert_eq!(
            eval(">= 4", Observed::Text("many".into())),
            Err(EvaluationError::NotNumeric {
                found: "many".into()
            })
        );
    }

    #[test]
    fn text_comparisons_do_not_want_numbers() {
        assert!(!parse("== \"x\"", &params).expect("valid").wants_number());
        assert!(parse("== 0", &params).expect("valid").wants_number());
    }
}

//! STUB (temporary, replaced by the real module)
use std::fmt;
#[derive(Debug, Clone, PartialEq)]
pub enum Observed { Number(f64), Text(String), Bool(bool) }
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation;
impl fmt::Display for Expectation { fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str("x") } }
#[derive(Debug, thiserror::Error)]
pub enum ExpectationError { #[error("x")] X }
#[derive(Debug, thiserror::Error)]
pub enum EvaluationError { #[error("x")] NotNumeric { found: String } }
pub fn parse(_i: &str, _p: &dyn Fn(&str) -> Option<String>) -> Result<Expectation, ExpectationError> { Ok(Expectation) }
impl Expectation { pub fn evaluate(&self, _o: &Observed) -> Result<bool, EvaluationError> { Ok(true) } pub fn wants_number(&self) -> bool { true } }

//! What one run of a check produced, and the pure logic that turns a query's rows into it.
//!
//! The database edge ([`crate::postgres::runner`]) hands over a [`ResultTable`]; [`evaluate`] checks its
//! shape against the check's definition, applies the expectation and returns a [`CheckOutcome`].
//! Nothing here does I/O.

use crate::labels::label_enum;
use std::collections::HashSet;
use std::fmt;

use serde::Serialize;

use crate::checks::expectation::{EvaluationError, Observed};
use crate::checks::number::Number;
use crate::checks::spec::{CheckSpec, Shape};

/// One cell of a result row, decoded from whatever PostgreSQL type it had.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A `numeric`: exact, of any size, or NaN / ±Infinity.
    Numeric(Number),
    Text(String),
}

impl Cell {
    /// The cell as a number: integers and numerics exactly, text only when it is decimal
    /// notation (never `inf` or `nan`).
    fn as_number(&self) -> Option<Number> {
        match self {
            Cell::Int(i) => Some(Number::from_i64(*i)),
            Cell::Float(f) => Some(Number::from_f64(*f)),
            Cell::Numeric(n) => Some(n.clone()),
            Cell::Bool(b) => Some(Number::from_i64(i64::from(*b))),
            Cell::Text(t) => Number::parse(t),
            Cell::Null => None,
        }
    }

    /// The cell as a label value; `None` for NULL, which has no label value of its own.
    fn as_label(&self) -> Option<String> {
        match self {
            Cell::Null => None,
            Cell::Bool(b) => Some(b.to_string()),
            Cell::Int(i) => Some(i.to_string()),
            Cell::Float(f) => Some(crate::checks::number::float_text(*f)),
            Cell::Numeric(n) => Some(n.to_string()),
            Cell::Text(t) => Some(t.clone()),
        }
    }
}

/// The rows a check's query returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultTable {
    pub(crate) columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

label_enum! {
    pub enum Status {
        Pending,
        Pass,
        Fail,
        Error,
    }
}

label_enum! {
    /// Why a check could not produce a verdict. A closed set, used as a metric label.
    pub enum ErrorKind {
        /// statement_timeout, lock_timeout, or the server did not answer in time.
        Timeout,
        /// PostgreSQL rejected the query (syntax, missing table, permission ...).
        Sql,
        /// The query tried to write and the read-only transaction refused it.
        ReadOnly,
        /// No session could be opened or it broke.
        Connection,
        NoRows,
        NullValue,
        NotNumeric,
        TooManyRows,
        TooManySeries,
        /// A label column of a rows check is NULL (it would read as the empty label value).
        NullLabel,
        /// Two rows of a rows check have the same label values, so they would be one series twice.
        DuplicateSeries,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckError {
    pub kind: ErrorKind,
    pub message: String,
    /// PostgreSQL's SQLSTATE when the server reported the error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
}

impl CheckError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CheckError {
            kind,
            message: message.into(),
            sqlstate: None,
        }
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "{}: {} (SQLSTATE {code})", self.kind, self.message),
            None => write!(f, "{}: {}", self.kind, self.message),
        }
    }
}

/// One labelled series of a rows check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub labels: Vec<(String, String)>,
    pub column: String,
    /// The nearest double (what the metric carries).
    pub(crate) value: f64,
}

/// The value a check observed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Observation {
    /// Exact for integers and numerics; in JSON a number, or its exact text when a double
    /// would change it.
    Number(Number),
    Text(String),
    Rows(Vec<Series>),
}

impl Observation {
    /// The nearest double (metrics, the sample store).
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Observation::Number(n) => Some(n.to_f64()),
            _ => None,
        }
    }
}

impl fmt::Display for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observation::Number(n) => write!(f, "{n}"),
            Observation::Text(t) => write!(f, "{t:?}"),
            Observation::Rows(series) => write!(f, "{} series", series.len()),
        }
    }
}

/// The verdict of one run: pass, fail (with what was seen) or error (with why).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckOutcome {
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observation: Option<Observation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<CheckError>,
    /// For a failed rows check: which rows broke the expectation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl CheckOutcome {
    pub(crate) fn error(error: CheckError) -> Self {
        CheckOutcome {
            status: Status::Error,
            observation: None,
            error: Some(error),
            detail: None,
        }
    }
}

fn shape_error(kind: ErrorKind, message: impl Into<String>) -> CheckOutcome {
    CheckOutcome::error(CheckError::new(kind, message))
}

/// Judges a query's result against the check's shape and expectation.
pub(crate) fn evaluate(spec: &CheckSpec, table: &ResultTable) -> CheckOutcome {
    match &spec.shape {
        Shape::Scalar => evaluate_scalar(spec, table),
        Shape::Rows {
            labels,
            values,
            max_series,
            expect_column,
        } => evaluate_rows(
            spec,
            table,
            labels,
            values,
            *max_series,
            expect_column.as_deref(),
        ),
    }
}

fn evaluate_scalar(spec: &CheckSpec, table: &ResultTable) -> CheckOutcome {
    if table.rows.is_empty() {
        return shape_error(ErrorKind::NoRows, "the query returned no rows");
    }
    if table.columns.len() != 1 {
        return shape_error(
            ErrorKind::TooManyRows,
            format!(
                "a scalar check must return exactly one column, got {}",
                table.columns.len()
            ),
        );
    }
    let cell = match table.rows.as_slice() {
        [] => return shape_error(ErrorKind::NoRows, "the query returned no rows"),
        [row] => row.first().cloned().unwrap_or(Cell::Null),
        rows => {
            return shape_error(
                ErrorKind::TooManyRows,
                format!("a scalar check must return one row, got {}", rows.len()),
            )
        }
    };
    let observed = match &cell {
        Cell::Null => {
            return shape_error(
                ErrorKind::NullValue,
                format!("column {:?} is NULL", table.columns[0]),
            )
        }
        Cell::Bool(b) => Observed::Bool(*b),
        Cell::Text(t) => Observed::Text(t.clone()),
        number => Observed::Number(number.as_number().unwrap_or(Number::Float(f64::NAN))),
    };
    let wants_number = spec.expectation.as_ref().is_some_and(|e| e.wants_number());
    let observation = match &cell {
        Cell::Text(t) if wants_number => match Number::parse(t) {
            Some(n) => Observation::Number(n),
            None => {
                return shape_error(
                    ErrorKind::NotNumeric,
                    format!("expected a number, got text {t:?}"),
                )
            }
        },
        Cell::Text(t) => Observation::Text(t.clone()),
        other => Observation::Number(other.as_number().unwrap_or(Number::Float(f64::NAN))),
    };
    let Some(expectation) = &spec.expectation else {
        return CheckOutcome {
            status: Status::Pass,
            observation: Some(observation),
            error: None,
            detail: None,
        };
    };
    match expectation.evaluate(&observed) {
        Ok(passed) => CheckOutcome {
            status: if passed { Status::Pass } else { Status::Fail },
            observation: Some(observation),
            error: None,
            detail: (!passed).then(|| {
                format!(
                    "observed {cell_text}, expected {expectation}",
                    cell_text = describe_cell(&cell)
                )
            }),
        },
        Err(EvaluationError::NotNumeric { found }) => shape_error(
            ErrorKind::NotNumeric,
            format!("expected a number, got text {found:?}"),
        ),
    }
}

fn describe_cell(cell: &Cell) -> String {
    match cell {
        Cell::Text(t) => format!("{t:?}"),
        Cell::Null => "NULL".to_string(),
        other => other.as_label().unwrap_or_default(),
    }
}

fn evaluate_rows(
    spec: &CheckSpec,
    table: &ResultTable,
    labels: &[String],
    values: &[String],
    max_series: usize,
    expect_column: Option<&str>,
) -> CheckOutcome {
    // Without rows there is nothing to export, and no column names to check either
    // (PostgreSQL only describes the columns of rows it sends).
    if table.rows.is_empty() {
        return CheckOutcome {
            status: Status::Pass,
            observation: Some(Observation::Rows(Vec::new())),
            error: None,
            detail: None,
        };
    }
    let index_of = |name: &str| table.columns.iter().position(|c| c == name);
    let mut label_indexes = Vec::new();
    let mut value_indexes = Vec::new();
    let mut missing = Vec::new();
    for name in labels {
        match index_of(name) {
            Some(i) => label_indexes.push((name.clone(), i)),
            None => missing.push(name.clone()),
        }
    }
    for name in values {
        match index_of(name) {
            Some(i) => value_indexes.push((name.clone(), i)),
            None => missing.push(name.clone()),
        }
    }
    if !missing.is_empty() {
        return shape_error(
            ErrorKind::Sql,
            format!(
                "the query did not return the column(s) {}; it returned {}",
                missing.join(", "),
                table.columns.join(", ")
            ),
        );
    }
    let total = table.rows.len().saturating_mul(values.len());
    if total > max_series {
        return shape_error(
            ErrorKind::TooManySeries,
            format!(
                "{} rows x {} value columns = {total} series, more than max_series = {max_series}; \
                 narrow the query or raise max_series",
                table.rows.len(),
                values.len()
            ),
        );
    }
    let mut series = Vec::with_capacity(total);
    let mut failures = Vec::new();
    let mut seen = HashSet::with_capacity(table.rows.len());
    for (row_number, row) in table.rows.iter().enumerate() {
        let mut row_labels: Vec<(String, String)> = Vec::with_capacity(label_indexes.len());
        for (name, i) in &label_indexes {
            match row.get(*i).and_then(Cell::as_label) {
                Some(value) => row_labels.push((name.clone(), value)),
                None => {
                    return shape_error(
                        ErrorKind::NullLabel,
                        format!(
                            "label column {name:?} is NULL in row {}; a NULL has no label value \
                             of its own (it would read as \"\"): COALESCE it to a value, or \
                             filter the row out",
                            row_number + 1
                        ),
                    )
                }
            }
        }
        if !seen.insert(row_labels.clone()) {
            return shape_error(
                ErrorKind::DuplicateSeries,
                format!(
                    "two rows have the labels {{{}}}, so they would be the same series twice: \
                     GROUP BY the label columns or add a label that tells them apart",
                    render_labels(&row_labels)
                ),
            );
        }
        for (name, i) in &value_indexes {
            let cell = row.get(*i).cloned().unwrap_or(Cell::Null);
            let number = match (&cell, cell.as_number()) {
                (Cell::Null, _) => {
                    // A NULL statistic (e.g. an index never scanned on some versions) reads as
                    // absent, not as an error of the whole check.
                    continue;
                }
                (_, Some(n)) => n,
                (other, None) => {
                    return shape_error(
                        ErrorKind::NotNumeric,
                        format!("value column {name:?} holds {other:?}, not a number"),
                    )
                }
            };
            if let (Some(column), Some(expectation)) = (expect_column, &spec.expectation) {
                if column == name {
                    match expectation.evaluate(&Observed::Number(number.clone())) {
                        Ok(true) => {}
                        Ok(false) => failures
                            .push(format!("{} {name}={number}", render_labels(&row_labels),)),
                        Err(EvaluationError::NotNumeric { found }) => {
                            return shape_error(
                                ErrorKind::NotNumeric,
                                format!("expected a number, got {found:?}"),
                            )
                        }
                    }
                }
            }
            series.push(Series {
                labels: row_labels.clone(),
                column: name.clone(),
                value: number.to_f64(),
            });
        }
    }
    let failed = !failures.is_empty();
    CheckOutcome {
        status: if failed { Status::Fail } else { Status::Pass },
        observation: Some(Observation::Rows(series)),
        error: None,
        detail: failed.then(|| {
            let expectation = spec
                .expectation
                .as_ref()
                .map(|e| e.to_string())
                .unwrap_or_default();
            format!("rows not {expectation}: {}", failures.join("; "))
        }),
    }
}

fn render_labels(labels: &[(String, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::expectation;
    use crate::checks::spec::{Category, Severity};
    use std::time::Duration;

    fn spec(expect: Option<&str>, shape: Shape) -> CheckSpec {
        CheckSpec {
            name: "c".into(),
            pack: "p".into(),
            category: Category::Health,
            severity: Severity::Critical,
            description: String::new(),
            sql: "select".into(),
            bind: vec![],
            expectation: expect.map(|e| expectation::parse(e, &|_| None).expect("valid")),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(1),
            runbook: None,
            shape,
            incremental: None,
        }
    }

    fn scalar(cell: Cell) -> ResultTable {
        column_v(vec![vec![cell]])
    }

    /// A result of one column `v` with these rows.
    fn column_v(rows: Vec<Vec<Cell>>) -> ResultTable {
        ResultTable {
            columns: vec!["v".into()],
            rows,
        }
    }

    fn check(expect: Option<&str>, table: ResultTable, status: Status, kind: Option<ErrorKind>) {
        let outcome = evaluate(&spec(expect, Shape::Scalar), &table);
        assert_eq!(outcome.status, status, "{outcome:?}");
        assert_eq!(outcome.error.map(|e| e.kind), kind);
    }

    #[test]
    fn scalar_outcomes() {
        check(Some("== 0"), scalar(Cell::Int(0)), Status::Pass, None);
        check(Some("== 0"), scalar(Cell::Int(3)), Status::Fail, None);
        check(
            Some(">= 4"),
            scalar(Cell::Text("5".into())),
            Status::Pass,
            None,
        );
        check(
            Some("== \"3.7.0\""),
            scalar(Cell::Text("3.7.0".into())),
            Status::Pass,
            None,
        );
        check(
            Some("== \"3.7.0\""),
            scalar(Cell::Text("3.6.0".into())),
            Status::Fail,
            None,
        );
        check(
            Some("between 0 and 1"),
            scalar(Cell::Float(0.5)),
            Status::Pass,
            None,
        );
        check(
            None,
            scalar(Cell::Text("PostgreSQL 15".into())),
            Status::Pass,
            None,
        );
        check(
            Some("== 0"),
            scalar(Cell::Null),
            Status::Error,
            Some(ErrorKind::NullValue),
        );
        check(
            Some("== 0"),
            scalar(Cell::Text("abc".into())),
            Status::Error,
            Some(ErrorKind::NotNumeric),
        );
        check(
            Some("== 0"),
            column_v(vec![]),
            Status::Error,
            Some(ErrorKind::NoRows),
        );
        check(
            Some("== 0"),
            column_v(vec![vec![Cell::Int(0)], vec![Cell::Int(0)]]),
            Status::Error,
            Some(ErrorKind::TooManyRows),
        );
    }

    #[test]
    fn failed_scalar_says_what_was_seen() {
        let outcome = evaluate(&spec(Some("== 0"), Shape::Scalar), &scalar(Cell::Int(3)));
        assert_eq!(outcome.detail.as_deref(), Some("observed 3, expected == 0"));
        assert_eq!(
            outcome.observation,
            Some(Observation::Number(Number::from_i64(3)))
        );
    }

    fn rows_shape(max_series: usize, expect_column: Option<&str>) -> Shape {
        Shape::Rows {
            labels: vec!["indexname".into()],
            values: vec!["scans".into(), "size_bytes".into()],
            max_series,
            expect_column: expect_column.map(str::to_string),
        }
    }

    fn index_table(n: usize) -> ResultTable {
        ResultTable {
            columns: vec!["indexname".into(), "scans".into(), "size_bytes".into()],
            rows: (0..n)
                .map(|i| {
                    vec![
                        Cell::Text(format!("idx_{i}")),
                        Cell::Int(i as i64),
                        Cell::Int(8192),
                    ]
                })
                .collect(),
        }
    }

    #[test]
    fn rows_become_labelled_series() {
        let outcome = evaluate(&spec(None, rows_shape(10, None)), &index_table(2));
        assert_eq!(outcome.status, Status::Pass);
        let Some(Observation::Rows(series)) = outcome.observation else {
            panic!("rows expected")
        };
        assert_eq!(series.len(), 4);
        assert_eq!(series[2].labels, vec![("indexname".into(), "idx_1".into())]);
        assert_eq!(series[2].column, "scans");
        assert_eq!(series[2].value, 1.0);
    }

    #[test]
    fn rows_over_the_cap_are_an_error() {
        let outcome = evaluate(&spec(None, rows_shape(5, None)), &index_table(3));
        assert_eq!(
            outcome.error.map(|e| e.kind),
            Some(ErrorKind::TooManySeries)
        );
    }

    #[test]
    fn rows_expectation_names_the_failing_rows() {
        let outcome = evaluate(
            &spec(Some(">= 1"), rows_shape(10, Some("scans"))),
            &index_table(2),
        );
        assert_eq!(outcome.status, Status::Fail);
        let detail = outcome.detail.unwrap_or_default();
        assert!(detail.contains("indexname=idx_0 scans=0"), "{detail}");
        assert!(!detail.contains("idx_1"), "{detail}");
    }

    #[test]
    fn rows_without_rows_pass_with_no_series() {
        let table = ResultTable::default();
        let outcome = evaluate(&spec(None, rows_shape(10, None)), &table);
        assert_eq!(outcome.status, Status::Pass);
        assert_eq!(outcome.observation, Some(Observation::Rows(vec![])));
    }

    #[test]
    fn rows_missing_column_is_reported() {
        let table = ResultTable {
            columns: vec!["indexname".into(), "scans".into()],
            rows: vec![vec![Cell::Text("i".into()), Cell::Int(1)]],
        };
        let outcome = evaluate(&spec(None, rows_shape(10, None)), &table);
        assert!(outcome
            .error
            .map(|e| e.message.contains("size_bytes"))
            .unwrap_or(false));
    }
}

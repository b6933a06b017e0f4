//! A check as it runs on one target: its category, severity, SQL, bound parameters, parsed
//! expectation, timing and result shape. Packs ([`crate::config::packs`]) produce these.

use crate::checks::incremental::IncrementalDef;
use crate::labels::label_enum;
use std::time::Duration;

use crate::checks::expectation::Expectation;

/// Label names a rows check may not use: deploywatch sets them itself.
pub(crate) const RESERVED_LABELS: &[&str] = &[
    "target", "check", "category", "severity", "column", "status",
];

label_enum! {
    pub enum Category {
        Health,
        Integrity,
        IndexUsage,
        Performance,
        Activity,
    }
}

label_enum! {
    pub enum Severity {
        Critical,
        Warning,
        Info,
    }
}

/// The result shape a check's SQL returns.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Shape {
    /// Exactly one row with one column.
    Scalar,
    /// Any number of rows: `labels` columns become Prometheus labels and each `values` column
    /// becomes one series per row.
    Rows {
        labels: Vec<String>,
        values: Vec<String>,
        max_series: usize,
        /// The value column the expectation is applied to on every row.
        expect_column: Option<String>,
    },
}

/// A check ready to run on one target.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    pub name: String,
    pub(crate) pack: String,
    pub category: Category,
    pub severity: Severity,
    pub(crate) description: String,
    pub(crate) sql: String,
    /// Values bound to `$1`, `$2`, ... as text.
    pub(crate) bind: Vec<String>,
    pub expectation: Option<Expectation>,
    pub interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) runbook: Option<String>,
    pub(crate) shape: Shape,
    /// Set for an incremental check: its key, table and sweep budget. Its SQL takes the key
    /// range as `$1` and `$2`, and `bind` follows from `$3`.
    pub(crate) incremental: Option<IncrementalDef>,
}

/// Check, target and pack names: letters, digits, `_` and `-`.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(crate) fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

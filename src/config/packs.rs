//! Check packs: the TOML files under `config/checks/` that define what deploywatch runs.
//!
//! A pack is parsed into [`CheckDef`]s (what the file says) and, per target, resolved into
//! [`CheckSpec`]s: parameters bound, expectation parsed, interval and timeout filled from the
//! defaults. All problems are reported with the pack file and the check's key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::checks::expectation;
use crate::checks::incremental::{IncrementalDef, SweepBudget, SweepBy};
use crate::checks::spec::{valid_label, RESERVED_LABELS};
pub(crate) use crate::checks::spec::{valid_name, Category, CheckSpec, Severity, Shape};
use crate::config::{parameter_text, Defaults, Problems};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPack {
    pack: RawPackHeader,
    #[serde(default)]
    check: Vec<RawCheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackHeader {
    name: String,
    /// For the pack's readers: accepted, not used.
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
    #[serde(default)]
    parameters: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    name: Option<String>,
    category: Option<Category>,
    severity: Option<Severity>,
    #[serde(default)]
    description: String,
    sql: Option<String>,
    expect: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    runbook: Option<String>,
    #[serde(default)]
    params: Vec<String>,
    shape: Option<String>,
    labels: Option<Vec<String>>,
    values: Option<Vec<String>>,
    max_series: Option<i64>,
    expect_column: Option<String>,
    incremental_key: Option<String>,
    incremental_table: Option<String>,
    parent_tables: Option<Vec<String>>,
    early_sweep: Option<bool>,
    sweep_period: Option<String>,
    sweep_max_rows: Option<i64>,
    sweep_max_time: Option<String>,
    sweep_key: Option<String>,
    sweep_sql: Option<String>,
}

/// A loaded pack file.
#[derive(Debug, Clone)]
pub(crate) struct Pack {
    pub(crate) name: String,
    pub(crate) file: PathBuf,
    pub(crate) parameters: BTreeMap<String, String>,
    pub(crate) checks: Vec<CheckDef>,
}

/// A check as its pack defines it, before a target's parameters are bound.
#[derive(Debug, Clone)]
pub(crate) struct CheckDef {
    pub(crate) name: String,
    /// Where the check sits in its file, e.g. `check[3]`, for error messages.
    pub(crate) key: String,
    pub(crate) category: Category,
    pub(crate) severity: Severity,
    pub(crate) description: String,
    pub(crate) sql: String,
    pub(crate) expect: Option<String>,
    pub(crate) interval: Option<String>,
    pub(crate) timeout: Option<String>,
    pub(crate) runbook: Option<String>,
    pub(crate) params: Vec<String>,
    pub(crate) shape: Shape,
    pub(crate) incremental: Option<IncrementalDecl>,
}

/// An incremental check's settings as its pack writes them (budget defaults not yet applied).
#[derive(Debug, Clone)]
pub(crate) struct IncrementalDecl {
    pub(crate) table: String,
    pub(crate) key: String,
    pub(crate) parents: Vec<String>,
    pub(crate) early_sweep: bool,
    pub(crate) sweep_period: Option<String>,
    pub(crate) sweep_max_rows: Option<u64>,
    pub(crate) sweep_max_time: Option<String>,
    /// The sweep's own key and query, when it sweeps another column's range than the increments.
    pub(crate) sweep_by: Option<SweepBy>,
}

/// Reads one pack file. Problems go to `problems`; `None` when the file could not be read at all.
pub(crate) fn load(file: &Path, problems: &mut Problems) -> Option<Pack> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(error) => {
            problems.push(file, "", format!("cannot read check pack: {error}"));
            return None;
        }
    };
    parse(file, &text, problems)
}

pub(crate) fn parse(file: &Path, text: &str, problems: &mut Problems) -> Option<Pack> {
    let raw: RawPack = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(error) if error.message().starts_with("unknown field") => {
            // Report every unknown key, then go on to the pack's other problems.
            let value = toml::from_str::<toml::Value>(text)
                .ok()
                .and_then(|v| serde_json::to_value(v).ok())?;
            super::deserialize_all_unknown(file, value, problems)?
        }
        Err(error) => {
            // toml's message already carries the line, column and the offending key.
            problems.push(file, "", error.to_string().trim_end().to_string());
            return None;
        }
    };
    if !valid_name(&raw.pack.name.replace('.', "_")) {
        problems.push(
            file,
            "pack.name",
            format!("{:?} is not a valid pack name", raw.pack.name),
        );
    }
    let mut parameters = BTreeMap::new();
    for (name, value) in &raw.pack.parameters {
        if let Some(text) =
            parameter_text(problems, file, &format!("pack.parameters.{name}"), value)
        {
            parameters.insert(name.clone(), text);
        }
    }
    let mut checks = Vec::new();
    for (index, raw_check) in raw.check.into_iter().enumerate() {
        if let Some(def) = check_def(file, index, raw_check, problems) {
            checks.push(def);
        }
    }
    Some(Pack {
        name: raw.pack.name,
        file: file.to_path_buf(),
        parameters,
        checks,
    })
}

fn check_def(
    file: &Path,
    index: usize,
    raw: RawCheck,
    problems: &mut Problems,
) -> Option<CheckDef> {
    let key = match &raw.name {
        Some(name) => format!("check[{index}] ({name})"),
        None => format!("check[{index}]"),
    };
    let mut ok = true;
    let mut missing = |field: &str, problems: &mut Problems| {
        problems.push(
            file,
            format!("{key}.{field}"),
            format!("{field} is required"),
        );
        ok = false;
    };
    let name = raw.name.clone().unwrap_or_default();
    if raw.name.is_none() {
        missing("name", problems);
    }
    if raw.category.is_none() {
        missing("category", problems);
    }
    if raw.severity.is_none() {
        missing("severity", problems);
    }
    let sql = raw.sql.clone().unwrap_or_default();
    if sql.trim().is_empty() {
        missing("sql", problems);
    }
    if raw.name.is_some() && !valid_name(&name) {
        problems.push(
            file,
            format!("{key}.name"),
            format!("{name:?} is not a valid check name: use letters, digits, '_' and '-'"),
        );
        ok = false;
    }
    let shape = match raw.shape.as_deref().unwrap_or("scalar") {
        "scalar" => {
            let misplaced = [
                ("labels", raw.labels.is_some()),
                ("values", raw.values.is_some()),
                ("max_series", raw.max_series.is_some()),
                ("expect_column", raw.expect_column.is_some()),
            ];
            if !only_for(file, &key, &misplaced, "shape = \"rows\"", problems) {
                ok = false;
            }
            Shape::Scalar
        }
        "rows" => {
            let labels = raw.labels.clone().unwrap_or_default();
            let values = raw.values.clone().unwrap_or_default();
            if values.is_empty() {
                problems.push(
                    file,
                    format!("{key}.values"),
                    "a rows check needs at least one value column",
                );
                ok = false;
            }
            for label in &labels {
                if !valid_label(label) || RESERVED_LABELS.contains(&label.as_str()) {
                    problems.push(
                        file,
                        format!("{key}.labels"),
                        format!(
                            "{label:?} cannot be a label name (reserved: {})",
                            RESERVED_LABELS.join(", ")
                        ),
                    );
                    ok = false;
                }
            }
            if let Some(column) = &raw.expect_column {
                if !values.contains(column) {
                    problems.push(
                        file,
                        format!("{key}.expect_column"),
                        format!("{column:?} is not one of the value columns"),
                    );
                    ok = false;
                }
            }
            let max_series = match raw.max_series {
                None => 0, // filled from the defaults when resolved
                Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
                Some(n) => {
                    problems.push(
                        file,
                        format!("{key}.max_series"),
                        format!("must be at least 1, found {n}"),
                    );
                    ok = false;
                    0
                }
            };
            Shape::Rows {
                labels,
                values,
                max_series,
                expect_column: raw.expect_column.clone(),
            }
        }
        other => {
            problems.push(
                file,
                format!("{key}.shape"),
                format!("unknown shape {other:?}: use \"scalar\" or \"rows\""),
            );
            ok = false;
            Shape::Scalar
        }
    };
    let incremental = incremental_decl(file, &key, &raw, &shape, &sql, problems);
    if raw.incremental_key.is_some() && incremental.is_none() {
        ok = false;
    }
    if !ok {
        return None;
    }
    Some(CheckDef {
        name,
        key,
        category: raw.category?,
        severity: raw.severity?,
        description: raw.description,
        sql,
        expect: raw.expect,
        interval: raw.interval,
        timeout: raw.timeout,
        runbook: raw.runbook,
        params: raw.params,
        shape,
        incremental,
    })
}

/// A table name as PostgreSQL folds it: `table` or `schema.table`, lower case.
fn valid_table(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| valid_column(p))
}

fn valid_column(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Why `name` is not a column name, when it is not one.
fn column_problem(name: &str) -> Option<String> {
    (!valid_column(name))
        .then(|| format!("{name:?} is not a column name: use lower-case letters, digits and '_'"))
}

/// The incremental settings of a check, checked; `None` when it has none or they are wrong
/// (then with problems reported).
/// A problem for each `(field, present)` that is present although it only applies to `what`;
/// whether there was none.
fn only_for(
    file: &Path,
    key: &str,
    fields: &[(&str, bool)],
    what: &str,
    problems: &mut Problems,
) -> bool {
    let mut none = true;
    for (field, _) in fields.iter().filter(|(_, present)| *present) {
        problems.push(
            file,
            format!("{key}.{field}"),
            format!("{field} only applies to {what}"),
        );
        none = false;
    }
    none
}

fn incremental_decl(
    file: &Path,
    key: &str,
    raw: &RawCheck,
    shape: &Shape,
    sql: &str,
    problems: &mut Problems,
) -> Option<IncrementalDecl> {
    let Some(column) = &raw.incremental_key else {
        let misplaced = [
            ("incremental_table", raw.incremental_table.is_some()),
            ("parent_tables", raw.parent_tables.is_some()),
            ("early_sweep", raw.early_sweep.is_some()),
            ("sweep_period", raw.sweep_period.is_some()),
            ("sweep_max_rows", raw.sweep_max_rows.is_some()),
            ("sweep_max_time", raw.sweep_max_time.is_some()),
            ("sweep_key", raw.sweep_key.is_some()),
            ("sweep_sql", raw.sweep_sql.is_some()),
        ];
        only_for(
            file,
            key,
            &misplaced,
            "an incremental check (incremental_key)",
            problems,
        );
        return None;
    };
    let before = problems.len();
    if let Some(problem) = column_problem(column) {
        problems.push(file, format!("{key}.incremental_key"), problem);
    }
    let table = raw.incremental_table.clone().unwrap_or_default();
    if raw.incremental_table.is_none() {
        problems.push(
            file,
            format!("{key}.incremental_table"),
            "an incremental check names the table its key belongs to",
        );
    } else if !valid_table(&table) {
        problems.push(
            file,
            format!("{key}.incremental_table"),
            format!("{table:?} is not a table name: `table` or `schema.table`, lower case"),
        );
    }
    let parents = raw.parent_tables.clone().unwrap_or_default();
    for parent in &parents {
        if !valid_table(parent) {
            problems.push(
                file,
                format!("{key}.parent_tables"),
                format!("{parent:?} is not a table name: `table` or `schema.table`, lower case"),
            );
        }
    }
    if *shape != Shape::Scalar {
        problems.push(
            file,
            format!("{key}.shape"),
            "an incremental check is a scalar count",
        );
    }
    if !sql.contains("$1") || !sql.contains("$2") {
        problems.push(
            file,
            format!("{key}.sql"),
            "an incremental check's SQL restricts the rows to the key range: key > $1 AND key <= $2",
        );
    }
    let sweep_max_rows = match raw.sweep_max_rows {
        None => None,
        Some(n) if n >= 1 => u64::try_from(n).ok(),
        Some(n) => {
            problems.push(
                file,
                format!("{key}.sweep_max_rows"),
                format!("must be at least 1, found {n}"),
            );
            None
        }
    };
    let sweep_by = sweep_by(file, key, raw, column, problems);
    if problems.len() > before {
        return None;
    }
    Some(IncrementalDecl {
        table,
        key: column.clone(),
        parents,
        early_sweep: raw.early_sweep.unwrap_or(true),
        sweep_period: raw.sweep_period.clone(),
        sweep_max_rows,
        sweep_max_time: raw.sweep_max_time.clone(),
        sweep_by,
    })
}

/// `sweep_key` and `sweep_sql`, which come together: the sweep's own key (a NOT NULL column of
/// the checked table, other than `incremental_key`) and its query over `($1, $2]` of that key,
/// restricted to the incremental keys up to `$3`. Problems are reported; `None` when there are
/// none declared or they are wrong.
fn sweep_by(
    file: &Path,
    key: &str,
    raw: &RawCheck,
    incremental_key: &str,
    problems: &mut Problems,
) -> Option<SweepBy> {
    let (column, sql) = match (&raw.sweep_key, &raw.sweep_sql) {
        (None, None) => return None,
        (Some(column), Some(sql)) => (column, sql.trim()),
        (Some(_), None) => {
            problems.push(
                file,
                format!("{key}.sweep_sql"),
                "sweep_key needs sweep_sql: the query a sweep chunk runs over ($1, $2] of sweep_key, \
                 restricted to incremental keys up to $3",
            );
            return None;
        }
        (None, Some(_)) => {
            problems.push(
                file,
                format!("{key}.sweep_key"),
                "sweep_sql needs sweep_key: the column whose range ($1, $2] it sweeps",
            );
            return None;
        }
    };
    let before = problems.len();
    if let Some(problem) = column_problem(column) {
        problems.push(file, format!("{key}.sweep_key"), problem);
    } else if column == incremental_key {
        problems.push(
            file,
            format!("{key}.sweep_key"),
            format!(
                "{column:?} is the incremental_key: leave sweep_key and sweep_sql out to sweep \
                 over it with sql"
            ),
        );
    }
    if sql.is_empty() {
        problems.push(file, format!("{key}.sweep_sql"), "is empty");
    } else {
        let missing: Vec<&str> = ["$1", "$2", "$3"]
            .into_iter()
            .filter(|p| !mentions_parameter(sql, p))
            .collect();
        if !missing.is_empty() {
            problems.push(
                file,
                format!("{key}.sweep_sql"),
                format!(
                    "does not use {}: a sweep chunk counts the rows whose sweep_key is in \
                     ($1, $2] and whose incremental_key is at most $3, e.g. \
                     `{column} > $1 AND {column} <= $2 AND {incremental_key} <= $3`",
                    missing.join(", ")
                ),
            );
        }
    }
    if problems.len() > before {
        return None;
    }
    Some(SweepBy {
        key: column.clone(),
        sql: sql.to_string(),
    })
}

/// Whether `sql` uses the parameter `$N` itself, not as the start of a longer one (`$1` in `$12`).
fn mentions_parameter(sql: &str, parameter: &str) -> bool {
    sql.match_indices(parameter).any(|(at, _)| {
        !sql[at + parameter.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Check names are unique across every loaded pack.
pub(crate) fn reject_duplicates(packs: &[std::sync::Arc<Pack>], problems: &mut Problems) {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for pack in packs {
        for def in &pack.checks {
            if let Some(first) = seen.insert(&def.name, &pack.file) {
                problems.push(
                    &pack.file,
                    format!("{}.name", def.key),
                    format!(
                        "duplicate check name {:?} (already defined in {})",
                        def.name,
                        first.display()
                    ),
                );
            }
        }
    }
}

/// Binds a check to one target: parameters (pack defaults, then the main file's, then the
/// target's), expectation, interval and timeouts.
pub(crate) fn resolve(
    pack: &Pack,
    def: &CheckDef,
    overrides: &BTreeMap<String, String>,
    defaults: &Defaults,
    target: &str,
    problems: &mut Problems,
) -> Option<CheckSpec> {
    let file = pack.file.as_path();
    let mut parameters = pack.parameters.clone();
    parameters.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    let before = problems_len(problems);

    let expectation = match &def.expect {
        None => None,
        Some(text) => {
            let lookup = |name: &str| parameters.get(name).cloned();
            match expectation::parse(text, &lookup) {
                Ok(e) => Some(e),
                Err(error) => {
                    problems.push(
                        file,
                        format!("{}.expect", def.key),
                        format!("{error} in {text:?} (target {target})"),
                    );
                    None
                }
            }
        }
    };
    let mut bind = Vec::new();
    for name in &def.params {
        match parameters.get(name) {
            Some(value) => bind.push(value.clone()),
            None => problems.push(
                file,
                format!("{}.params", def.key),
                format!("unknown parameter {name:?} (target {target})"),
            ),
        }
    }
    let mut f = problems.in_file(file);
    let interval = f.duration(
        &format!("{}.interval", def.key),
        &def.interval,
        defaults.interval,
    );
    let interval = defaults.interval_override.unwrap_or(interval);
    let timeout = f.duration(
        &format!("{}.timeout", def.key),
        &def.timeout,
        defaults.timeout,
    );
    let shape = match &def.shape {
        Shape::Rows {
            labels,
            values,
            max_series,
            expect_column,
        } => Shape::Rows {
            labels: labels.clone(),
            values: values.clone(),
            max_series: if *max_series == 0 {
                defaults.max_series
            } else {
                *max_series
            },
            expect_column: expect_column.clone(),
        },
        Shape::Scalar => Shape::Scalar,
    };
    let incremental = def.incremental.as_ref().map(|decl| IncrementalDef {
        table: decl.table.clone(),
        key: decl.key.clone(),
        parents: decl.parents.clone(),
        early_sweep: decl.early_sweep,
        sweep: SweepBudget {
            period: f.duration(
                &format!("{}.sweep_period", def.key),
                &decl.sweep_period,
                defaults.sweep.period,
            ),
            max_rows: decl.sweep_max_rows.unwrap_or(defaults.sweep.max_rows),
            max_time: f.duration(
                &format!("{}.sweep_max_time", def.key),
                &decl.sweep_max_time,
                defaults.sweep.max_time,
            ),
        },
        sweep_by: decl.sweep_by.clone(),
    });
    if problems_len(problems) > before {
        return None;
    }
    Some(CheckSpec {
        name: def.name.clone(),
        pack: pack.name.clone(),
        category: def.category,
        severity: def.severity,
        description: def.description.clone(),
        sql: def.sql.clone(),
        bind,
        expectation,
        interval,
        timeout,
        lock_timeout: defaults.lock_timeout.min(timeout),
        runbook: def.runbook.clone(),
        shape,
        incremental,
    })
}

fn problems_len(problems: &Problems) -> usize {
    problems.len()
}

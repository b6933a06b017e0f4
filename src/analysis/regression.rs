//! The regression rules: one signal each, judged per window against the pre-deployment
//! baseline, every finding carrying its evidence (baseline and window figures, test statistic,
//! sample counts). Improvements are reported too, since the checklist expects "same or better".
//! Pure: summaries in (see [`crate::analysis::summary`]), findings out; [`judge`] takes samples
//! and summarises them first.

use serde_json::{Map, Value};

use crate::analysis::deployment::{Finding, Signal};
use crate::analysis::sample::Sample;
use crate::analysis::stats::{self, mann_whitney};
use crate::analysis::summary::{DatabaseSummary, StatementSummary, Summary};
use crate::analysis::window::Window;

/// How demanding the rules are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Relative increase of a query's median time per call that counts (0.2 = +20 %).
    pub latency_min_increase: f64,
    /// A sample counts for a query only with at least this many calls in it.
    pub latency_min_calls: u64,
    /// One-sided Mann–Whitney p-value below which a change is significant.
    pub latency_p_value: f64,
    /// Samples needed on each side of any comparison.
    pub min_samples: usize,
    /// Smallest change of the median time per call, in milliseconds, that counts: a
    /// microsecond query that gets "30 % slower" under a busy CPU is noise, not a regression.
    pub latency_min_delta_ms: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judgement {
    pub regressions: Vec<Finding>,
    pub improvements: Vec<Finding>,
}

/// First-hour latency rule: only sharp rises (at least double).
const SHARP_INCREASE: f64 = 1.0;
/// Sequential scans must at least double and rise by this many per second.
const SEQ_SCAN_MIN_RATE_INCREASE: f64 = 0.05;
/// ... and add at least this many scans over the window.
const SEQ_SCAN_MIN_EXTRA: f64 = 20.0;
const MIB: f64 = 1024.0 * 1024.0;

/// A finite number for the evidence (JSON has no NaN or infinity).
fn number(value: f64) -> Value {
    serde_json::Number::from_f64(if value.is_finite() { value } else { 0.0 })
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

fn rounded(value: f64, digits: i32) -> f64 {
    let factor = 10f64.powi(digits);
    (value * factor).round() / factor
}

fn evidence(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn finding(
    signal: Signal,
    subject: String,
    message: String,
    evidence: Map<String, Value>,
) -> Finding {
    Finding::new(signal, subject, message, evidence)
}

/// Judges `window_samples` against `baseline` (both summarised here, every statement
/// followed); `since_deployment` feeds the rule on indexes new since the deployment.
pub fn judge(
    window: Window,
    baseline: &[Sample],
    window_samples: &[Sample],
    since_deployment: &[Sample],
    closed: bool,
    t: &Thresholds,
) -> Judgement {
    judge_summaries(
        window,
        &Summary::of(baseline, t.latency_min_calls),
        &Summary::of(window_samples, t.latency_min_calls),
        &Summary::of(since_deployment, t.latency_min_calls),
        closed,
        t,
    )
}

/// Judges a window's summary against the baseline's. The summaries must have been made with
/// `t.latency_min_calls`.
pub fn judge_summaries(
    window: Window,
    baseline: &Summary,
    window_samples: &Summary,
    since_deployment: &Summary,
    closed: bool,
    t: &Thresholds,
) -> Judgement {
    let mut j = Judgement::default();
    if window == Window::Steady {
        return j;
    }
    // What breaks outright is judged in every window: a violation is flagged in the window
    // where it appears, and a window passes only if all of these are clean.
    check_failures(baseline, window_samples, &mut j);
    rollback_ratio(baseline, window_samples, &mut j);
    deadlocks(baseline, window_samples, &mut j);
    connections(baseline, window_samples, &mut j);
    integrity(baseline, window_samples, &mut j);
    match window {
        Window::FirstHour => {
            query_latency(baseline, window_samples, t, SHARP_INCREASE, false, &mut j);
        }
        Window::FirstDay => {
            // An open window is looked at again and again as samples arrive. Until it closes
            // the test must clear a ten times stricter level; at the close, the configured one.
            let strictness = if closed { 1.0 } else { 0.1 };
            let looking = Thresholds {
                latency_p_value: t.latency_p_value * strictness,
                ..*t
            };
            query_latency(
                baseline,
                window_samples,
                &looking,
                t.latency_min_increase,
                true,
                &mut j,
            );
            seq_scans(baseline, window_samples, t, &mut j);
            if closed {
                unused_indexes(baseline, since_deployment, &mut j);
            }
            db_growth(baseline, window_samples, t, &mut j);
        }
        Window::FirstWeek => {
            top_queries(baseline, window_samples, t, &mut j);
        }
        Window::Steady => {}
    }
    j
}

/// An integrity or health check that passed throughout the baseline fails after the deployment.
fn check_failures(baseline: &Summary, window: &Summary, j: &mut Judgement) {
    for (name, point) in &window.checks.latest_failure {
        let relevant = point.category == "integrity" || point.category == "health";
        if !relevant || baseline.checks.failed.contains(name) {
            continue;
        }
        let Some(passes) = baseline.checks.passes.get(name) else {
            continue;
        };
        let value = point
            .value
            .map(|v| format!(" (value {v})"))
            .unwrap_or_default();
        j.regressions.push(finding(
            Signal::CheckFailure,
            name.clone(),
            format!("{} check {name} passed in all {passes} baseline samples and fails since the deployment{value}", point.category),
            evidence(&[
                ("check", Value::String(name.clone())),
                ("category", Value::String(point.category.clone())),
                ("baseline_passes", number(*passes as f64)),
                ("window_value", point.value.map(number).unwrap_or(Value::Null)),
                ("n_window", number(window.samples as f64)),
            ]),
        ));
    }
}

/// Summed database counters over the samples that have them, with the seconds they cover.
fn database_totals(summary: &Summary) -> Option<(DatabaseSummary, f64, usize)> {
    summary
        .database
        .filter(|d| d.samples > 0)
        .map(|d| (d, d.seconds, d.samples))
}

fn rollback_ratio(baseline: &Summary, window: &Summary, j: &mut Judgement) {
    let (Some((b, _, nb)), Some((w, _, nw))) = (database_totals(baseline), database_totals(window))
    else {
        return;
    };
    let ratio = |d: &DatabaseSummary| {
        let all = d.xact_commit + d.xact_rollback;
        if all > 0.0 {
            d.xact_rollback / all
        } else {
            0.0
        }
    };
    let (rb, rw) = (ratio(&b), ratio(&w));
    if w.xact_rollback >= 10.0 && rw > (2.0 * rb).max(rb + 0.05) {
        j.regressions.push(finding(
            Signal::RollbackRatio,
            "transactions".into(),
            format!(
                "rollback ratio {:.1} % -> {:.1} % ({} rollbacks in the window)",
                rb * 100.0,
                rw * 100.0,
                w.xact_rollback
            ),
            evidence(&[
                ("baseline_ratio", number(rounded(rb, 5))),
                ("window_ratio", number(rounded(rw, 5))),
                ("window_rollbacks", number(w.xact_rollback)),
                ("n_baseline", number(nb as f64)),
                ("n_window", number(nw as f64)),
            ]),
        ));
    }
}

fn deadlocks(baseline: &Summary, window: &Summary, j: &mut Judgement) {
    let (Some((b, bs, nb)), Some((w, ws, nw))) =
        (database_totals(baseline), database_totals(window))
    else {
        return;
    };
    if bs <= 0.0 || ws <= 0.0 {
        return;
    }
    let (rb, rw) = (b.deadlocks / bs * 3600.0, w.deadlocks / ws * 3600.0);
    if w.deadlocks >= 2.0 && rw > (2.0 * rb).max(rb + 1.0) {
        j.regressions.push(finding(
            Signal::Deadlocks,
            "deadlocks".into(),
            format!(
                "deadlocks {rb:.1}/h -> {rw:.1}/h ({} in the window)",
                w.deadlocks
            ),
            evidence(&[
                ("baseline_per_hour", number(rounded(rb, 3))),
                ("window_per_hour", number(rounded(rw, 3))),
                ("window_deadlocks", number(w.deadlocks)),
                ("n_baseline", number(nb as f64)),
                ("n_window", number(nw as f64)),
            ]),
        ));
    }
}

fn connections(baseline: &Summary, window: &Summary, j: &mut Judgement) {
    let (Some(b), Some(w)) = (baseline.connection_peak, window.connection_peak) else {
        return;
    };
    if w >= 0.9 && b < 0.9 {
        j.regressions.push(finding(
            Signal::Connections,
            "connections".into(),
            format!(
                "backends reached {:.0} % of max_connections (baseline peak {:.0} %)",
                w * 100.0,
                b * 100.0
            ),
            evidence(&[
                ("baseline_peak_share", number(rounded(b, 4))),
                ("window_peak_share", number(rounded(w, 4))),
                ("n_baseline", number(baseline.samples as f64)),
                ("n_window", number(window.samples as f64)),
            ]),
        ));
    }
}

fn query_message(id: &str, query: &str) -> String {
    format!("query {id} ({query})")
}

/// Latency per query: a rise of at least `min_increase` in the median time per call that the
/// Mann–Whitney test finds significant; with `improvements`, falls too.
fn query_latency(
    baseline: &Summary,
    window: &Summary,
    t: &Thresholds,
    min_increase: f64,
    improvements: bool,
    j: &mut Judgement,
) {
    for (id, before) in &baseline.statements {
        let Some(after) = window.statements.get(id) else {
            continue;
        };
        let (b, query, w, calls) = (
            before.means.values(),
            &before.query,
            after.means.values(),
            &after.calls,
        );
        if b.len() < t.min_samples || w.len() < t.min_samples {
            continue;
        }
        let (Some(mb), Some(mw)) = (stats::median(b), stats::median(w)) else {
            continue;
        };
        let Some(change) = stats::relative_change(mb, mw) else {
            continue;
        };
        let (Some(slower), Some(faster)) = (mann_whitney(b, w), mann_whitney(w, b)) else {
            continue;
        };
        // The shift in ms per call with its 95 % confidence interval.
        let hl = stats::hodges_lehmann(b, w, 0.95);
        let make_evidence = |p: f64, z: f64, u: f64| {
            evidence(&[
                (
                    "hodges_lehmann_shift_ms",
                    hl.map(|h| number(rounded(h.shift, 4)))
                        .unwrap_or(Value::Null),
                ),
                (
                    "shift_ci95_low_ms",
                    hl.map(|h| number(rounded(h.low, 4))).unwrap_or(Value::Null),
                ),
                (
                    "shift_ci95_high_ms",
                    hl.map(|h| number(rounded(h.high, 4)))
                        .unwrap_or(Value::Null),
                ),
                ("query_id", Value::String(id.clone())),
                ("query", Value::String(query.clone())),
                ("baseline_median_ms", number(rounded(mb, 4))),
                ("window_median_ms", number(rounded(mw, 4))),
                ("change_percent", number(rounded(change * 100.0, 1))),
                ("mann_whitney_u", number(u)),
                ("z", number(rounded(z, 3))),
                ("p_value", number(p)),
                ("n_baseline", number(b.len() as f64)),
                ("n_window", number(w.len() as f64)),
                ("window_calls", number(*calls)),
            ])
        };
        let material = (mw - mb).abs() >= t.latency_min_delta_ms;
        if material && change >= min_increase && slower.p_greater < t.latency_p_value {
            j.regressions.push(finding(
                Signal::QueryLatency,
                format!("query {id}"),
                format!(
                    "{} mean {mb:.3} ms -> {mw:.3} ms per call (+{:.0} %), Mann–Whitney p={:.2e}, {} vs {} samples",
                    query_message(id, query),
                    change * 100.0,
                    slower.p_greater,
                    b.len(),
                    w.len()
                ),
                make_evidence(slower.p_greater, slower.z, slower.u),
            ));
        } else if improvements
            && change <= -t.latency_min_increase
            && faster.p_greater < t.latency_p_value
        {
            j.improvements.push(finding(
                Signal::QueryLatency,
                format!("query {id}"),
                format!(
                    "{} {:.0} % faster: {mb:.3} ms -> {mw:.3} ms per call, Mann–Whitney p={:.2e}",
                    query_message(id, query),
                    -change * 100.0,
                    faster.p_greater
                ),
                make_evidence(faster.p_greater, -faster.z, slower.u),
            ));
        }
    }
}

fn seq_scans(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    for (table, after) in &window.tables {
        let Some(before) = baseline.tables.get(table) else {
            continue;
        };
        let (ws, wr, wsec, wn) = (
            &after.seq_scan,
            &after.seq_tup_read,
            &after.seconds,
            &after.samples,
        );
        let (bs, br, bsec, bn) = (
            &before.seq_scan,
            &before.seq_tup_read,
            &before.seconds,
            &before.samples,
        );
        if *wn < t.min_samples || *bn < t.min_samples || *wsec <= 0.0 || *bsec <= 0.0 {
            continue;
        }
        let (scan_b, scan_w) = (bs / bsec, ws / wsec);
        let (rows_b, rows_w) = (br / bsec, wr / wsec);
        // Scans are counted events: at the baseline rate the window should have seen about
        // `expected` of them. A rise must be large against that Poisson noise (z >= 3) and
        // amount to a real number of extra scans, not a handful in a short window.
        let expected = scan_b * wsec;
        let extra = ws - expected;
        let z = extra / expected.max(1.0).sqrt();
        if scan_w >= 2.0 * scan_b
            && scan_w - scan_b >= SEQ_SCAN_MIN_RATE_INCREASE
            && extra >= SEQ_SCAN_MIN_EXTRA
            && z >= 3.0
            && rows_w > rows_b
        {
            j.regressions.push(finding(
                Signal::SeqScans,
                table.clone(),
                format!(
                    "sequential scans on {table}: {scan_b:.2}/s -> {scan_w:.2}/s, rows read {rows_b:.0}/s -> {rows_w:.0}/s (a lost or unused index?)"
                ),
                evidence(&[
                    ("table", Value::String(table.clone())),
                    ("baseline_seq_scans_per_second", number(rounded(scan_b, 4))),
                    ("window_seq_scans_per_second", number(rounded(scan_w, 4))),
                    ("baseline_rows_read_per_second", number(rounded(rows_b, 2))),
                    ("window_rows_read_per_second", number(rounded(rows_w, 2))),
                    ("extra_scans", number(rounded(extra, 1))),
                    ("poisson_z", number(rounded(z, 2))),
                    ("n_baseline", number(*bn as f64)),
                    ("n_window", number(*wn as f64)),
                ]),
            ));
        }
    }
}

/// Indexes that appeared after the deployment and were never scanned.
fn unused_indexes(baseline: &Summary, since: &Summary, j: &mut Judgement) {
    if baseline.samples == 0 || since.samples == 0 {
        return;
    }
    for (name, index) in &since.indexes {
        if baseline.indexes.contains_key(name) || index.scans != 0.0 {
            continue;
        }
        let (table, samples) = (&index.table, index.samples);
        let queries = queries_on(since, table);
        let listed = if queries.is_empty() {
            "no sampled query names the table".to_string()
        } else {
            format!("queries on the table: {}", queries.len())
        };
        // A notice, not a regression: the checklist asks to verify the new indexes are
        // used, and one not used yet is worth knowing, not an outage.
        j.regressions.push(
            finding(
                Signal::UnusedIndex,
                name.to_string(),
                format!("index {name} on {table}, new since the deployment, has not been scanned once in {samples} samples ({listed})"),
                evidence(&[
                    ("index", Value::String(name.to_string())),
                    ("table", Value::String(table.to_string())),
                    ("scans", number(0.0)),
                    ("n_window", number(samples as f64)),
                    (
                        "queries_on_table",
                        Value::Array(queries.into_iter().map(Value::String).collect()),
                    ),
                ]),
            )
            .notice(),
        );
    }
}

/// The followed statements (id: text) whose text names `table` (schema-qualified or not), the
/// busiest first, at most ten.
fn queries_on(summary: &Summary, table: &str) -> Vec<String> {
    let short = table.rsplit('.').next().unwrap_or(table).to_lowercase();
    let mut ranked: Vec<(&String, f64, &str)> = summary
        .statements
        .iter()
        .filter(|(_, s)| {
            s.query
                .to_lowercase()
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .any(|word| word == short)
        })
        .map(|(id, s)| (id, s.calls, s.query.as_str()))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
        .into_iter()
        .take(10)
        .map(|(id, _, text)| format!("{id}: {text}"))
        .collect()
}

/// Growth per hour from the first to the last sample that reported a size.
fn growth_per_hour(summary: &Summary) -> Option<f64> {
    let ((first_at, first), (last_at, last)) = (summary.first_sized?, summary.last_sized?);
    let hours = (last_at - first_at) / 3600.0;
    (summary.sized_samples >= 2 && hours > 0.0).then(|| (last - first) / hours)
}

fn db_growth(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    if baseline.samples < t.min_samples.max(2) || window.samples < t.min_samples.max(2) {
        return;
    }
    let (Some(b), Some(w)) = (growth_per_hour(baseline), growth_per_hour(window)) else {
        return;
    };
    // PostgreSQL grows in pages and segments: over a short span one extension looks like a
    // steep rate, so the window must also have grown by a material amount in absolute terms.
    let grown = window.last_size - window.first_size;
    if w > 3.0 * b.max(0.0) && w >= MIB && grown >= MIB {
        j.regressions.push(finding(
            Signal::DbGrowth,
            "database size".into(),
            format!(
                "database grows {:.1} MiB/h, {:.1} MiB/h before",
                w / MIB,
                b / MIB
            ),
            evidence(&[
                ("baseline_bytes_per_hour", number(rounded(b, 0))),
                ("window_bytes_per_hour", number(rounded(w, 0))),
                ("window_growth_bytes", number(grown)),
                ("n_baseline", number(baseline.samples as f64)),
                ("n_window", number(window.samples as f64)),
            ]),
        ));
    }
}

/// The baseline's top ten queries by total time, compared per call.
fn top_queries(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    let mut ranked: Vec<(&String, &StatementSummary)> = baseline.statements.iter().collect();
    ranked.sort_by(|a, b| b.1.total_ms.total_cmp(&a.1.total_ms));
    for (rank, (id, before)) in ranked.into_iter().take(10).enumerate() {
        let Some(after) = window.statements.get(id.as_str()) else {
            continue;
        };
        let (b, query, b_total, b_calls) = (
            before.means.values(),
            &before.query,
            &before.total_ms,
            &before.calls,
        );
        let (w, w_total, w_calls) = (after.means.values(), &after.total_ms, &after.calls);
        if b.len() < t.min_samples || w.len() < t.min_samples || *b_calls <= 0.0 || *w_calls <= 0.0
        {
            continue;
        }
        let (per_call_b, per_call_w) = (b_total / b_calls, w_total / w_calls);
        let Some(change) = stats::relative_change(per_call_b, per_call_w) else {
            continue;
        };
        let (Some(slower), Some(faster)) = (mann_whitney(b, w), mann_whitney(w, b)) else {
            continue;
        };
        let make_evidence = |p: f64| {
            evidence(&[
                ("rank", number((rank + 1) as f64)),
                ("query_id", Value::String(id.to_string())),
                ("query", Value::String(query.clone())),
                ("baseline_ms_per_call", number(rounded(per_call_b, 4))),
                ("window_ms_per_call", number(rounded(per_call_w, 4))),
                ("change_percent", number(rounded(change * 100.0, 1))),
                ("p_value", number(p)),
                ("n_baseline", number(b.len() as f64)),
                ("n_window", number(w.len() as f64)),
            ])
        };
        let material = (per_call_w - per_call_b).abs() >= t.latency_min_delta_ms;
        if material && change >= t.latency_min_increase && slower.p_greater < t.latency_p_value {
            j.regressions.push(finding(
                Signal::TopQueries,
                format!("query {id}"),
                format!(
                    "top query #{} {} {per_call_b:.3} -> {per_call_w:.3} ms per call (+{:.0} %)",
                    rank + 1,
                    query_message(id, query),
                    change * 100.0
                ),
                make_evidence(slower.p_greater),
            ));
        } else if material
            && change <= -t.latency_min_increase
            && faster.p_greater < t.latency_p_value
        {
            j.improvements.push(finding(
                Signal::TopQueries,
                format!("query {id}"),
                format!(
                    "top query #{} {} {:.0} % faster per call",
                    rank + 1,
                    query_message(id, query),
                    -change * 100.0
                ),
                make_evidence(faster.p_greater),
            ));
        }
    }
}

/// Integrity counts that crept back above zero by the end of the window.
/// An integrity count that was 0 (in the baseline or earlier in the window) and is above 0 at
/// the window's latest sample: it crept back. A count that was never seen at 0 is a standing
/// problem the check itself reports, not something this deployment did.
fn integrity(baseline: &Summary, window: &Summary, j: &mut Judgement) {
    if window.samples == 0 {
        return;
    }
    for (name, point) in &window.checks.last {
        if point.category != "integrity" {
            continue;
        }
        let Some(value) = point.value.filter(|v| *v > 0.0) else {
            continue;
        };
        let Some(clean_at) = window
            .checks
            .zero_before_last
            .get(name)
            .copied()
            .or_else(|| baseline.checks.latest_zero(name))
        else {
            continue;
        };
        let already = j
            .regressions
            .iter()
            .any(|f| f.signal == Signal::CheckFailure && f.subject == *name);
        if already {
            continue;
        }
        j.regressions.push(finding(
            Signal::Integrity,
            name.clone(),
            format!("integrity check {name} was 0 and counts {value} again (should be 0)"),
            evidence(&[
                ("check", Value::String(name.clone())),
                ("value", number(value)),
                ("last_zero_at", number(clean_at)),
                ("n_window", number(window.samples as f64)),
            ]),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::sample::{
        CheckPoint, DbCounters, IndexDelta, StatementDelta, TableCounters,
    };
    use std::collections::{BTreeMap, BTreeSet};

    fn t() -> Thresholds {
        Thresholds {
            latency_min_increase: 0.2,
            latency_min_calls: 5,
            latency_p_value: 0.01,
            min_samples: 3,
            latency_min_delta_ms: 0.05,
        }
    }

    /// A tiny deterministic generator for noisy but unchanged data.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A sample at `at` whose queries have the given mean times (ms per call, 20 calls each).
    fn sample(at: f64, queries: &[(&str, f64)]) -> Sample {
        let statements = queries
            .iter()
            .map(|(id, mean)| {
                (
                    id.to_string(),
                    StatementDelta {
                        calls: 20.0,
                        total_ms: mean * 20.0,
                        rows: 20.0,
                        query: format!("SELECT {id}"),
                    },
                )
            })
            .collect();
        Sample {
            at,
            seconds: 60.0,
            database: Some(DbCounters {
                xact_commit: 1000.0,
                xact_rollback: 5.0,
                ..DbCounters::default()
            }),
            statements: Some(statements),
            statements_available: true,
            size_bytes: 1e9,
            connections: 10.0,
            max_connections: 100.0,
            ..Sample::default()
        }
    }

    fn series(
        start: f64,
        n: usize,
        mut mean: impl FnMut(usize) -> Vec<(&'static str, f64)>,
    ) -> Vec<Sample> {
        (0..n)
            .map(|i| sample(start + 60.0 * i as f64, &mean(i)))
            .collect()
    }

    fn signals(j: &[Finding]) -> Vec<(Signal, String)> {
        j.iter().map(|f| (f.signal, f.subject.clone())).collect()
    }

    #[test]
    fn a_5x_slower_query_is_flagged_and_only_that_one() {
        let mut rng = Lcg(7);
        let mut noise = move || 1.0 + 0.1 * (rng.next() - 0.5);
        let baseline = series(0.0, 10, |_| {
            vec![
                ("1", 0.4 * noise()),
                ("2", 2.0 * noise()),
                ("3", 1.0 * noise()),
            ]
        });
        let window = series(1000.0, 8, |_| {
            vec![
                ("1", 2.0 * noise()),
                ("2", 2.0 * noise()),
                ("3", 1.0 * noise()),
            ]
        });
        let j = judge(Window::FirstHour, &baseline, &window, &window, false, &t());
        assert_eq!(
            signals(&j.regressions),
            vec![(Signal::QueryLatency, "query 1".to_string())]
        );
        let f = &j.regressions[0];
        assert!(f.message.contains("SELECT 1"), "{}", f.message);
        assert!(f.evidence["p_value"].as_f64().unwrap_or(1.0) < 0.01);
        // The Hodges–Lehmann shift (about 1.6 ms) with an interval around it.
        let shift = f.evidence["hodges_lehmann_shift_ms"]
            .as_f64()
            .expect("shift");
        let low = f.evidence["shift_ci95_low_ms"].as_f64().expect("low");
        let high = f.evidence["shift_ci95_high_ms"].as_f64().expect("high");
        assert!(
            low <= shift && shift <= high && low > 1.0 && high < 2.0,
            "{f:?}"
        );
        assert_eq!(f.evidence["n_baseline"].as_f64(), Some(10.0));
        assert_eq!(f.evidence["n_window"].as_f64(), Some(8.0));
    }

    #[test]
    fn a_50_percent_slowdown_is_a_first_day_regression_but_not_a_sharp_first_hour_one() {
        let mut rng = Lcg(11);
        let mut noise = move || 1.0 + 0.05 * (rng.next() - 0.5);
        let baseline = series(0.0, 10, |_| vec![("1", 1.0 * noise())]);
        let window = series(1000.0, 10, |_| vec![("1", 1.5 * noise())]);
        let hour = judge(Window::FirstHour, &baseline, &window, &window, false, &t());
        assert!(hour.regressions.is_empty(), "{:?}", hour.regressions);
        let day = judge(Window::FirstDay, &baseline, &window, &window, false, &t());
        assert_eq!(
            signals(&day.regressions),
            vec![(Signal::QueryLatency, "query 1".to_string())]
        );
    }

    #[test]
    fn a_faster_query_is_an_improvement() {
        let baseline = series(0.0, 8, |i| vec![("1", 1.0 + 0.01 * i as f64)]);
        let window = series(1000.0, 8, |i| vec![("1", 0.6 + 0.01 * i as f64)]);
        let j = judge(Window::FirstDay, &baseline, &window, &window, false, &t());
        assert!(j.regressions.is_empty());
        assert_eq!(
            signals(&j.improvements),
            vec![(Signal::QueryLatency, "query 1".to_string())]
        );
        assert!(
            j.improvements[0].message.contains("faster"),
            "{}",
            j.improvements[0].message
        );
    }

    #[test]
    fn unchanged_noisy_latencies_rarely_alarm() {
        let mut alarms = 0;
        for seed in 0..200 {
            let mut rng = Lcg(seed);
            let mut noise = move || 1.0 + 0.3 * (rng.next() - 0.5);
            let baseline = series(0.0, 12, |_| vec![("1", noise()), ("2", 3.0 * noise())]);
            let window = series(1000.0, 12, |_| vec![("1", noise()), ("2", 3.0 * noise())]);
            let j = judge(Window::FirstDay, &baseline, &window, &window, true, &t());
            if !j.regressions.is_empty() {
                alarms += 1;
            }
        }
        assert!(
            alarms <= 2,
            "{alarms} false alarms in 200 no-change comparisons"
        );
    }

    #[test]
    fn a_microsecond_change_is_not_material() {
        let baseline = series(0.0, 10, |i| vec![("1", 0.020 + 0.0001 * i as f64)]);
        let window = series(1000.0, 10, |i| vec![("1", 0.030 + 0.0001 * i as f64)]);
        let j = judge(Window::FirstDay, &baseline, &window, &window, false, &t());
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
    }

    #[test]
    fn too_few_samples_are_never_judged() {
        let baseline = series(0.0, 2, |_| vec![("1", 1.0)]);
        let window = series(1000.0, 8, |_| vec![("1", 10.0)]);
        assert!(
            judge(Window::FirstHour, &baseline, &window, &window, false, &t())
                .regressions
                .is_empty()
        );
    }

    #[test]
    fn reset_samples_are_ignored() {
        let baseline = series(0.0, 8, |_| vec![("1", 1.0)]);
        let mut window = series(1000.0, 8, |_| vec![("1", 1.0)]);
        for s in &mut window {
            s.statements = None;
            s.database = None;
        }
        let j = judge(Window::FirstHour, &baseline, &window, &window, false, &t());
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
    }

    fn with_check(mut s: Sample, name: &str, category: &str, status: &str, value: f64) -> Sample {
        s.checks.insert(
            name.into(),
            CheckPoint {
                category: category.into(),
                status: status.into(),
                value: Some(value),
            },
        );
        s
    }

    #[test]
    fn a_check_that_passed_before_and_fails_now_is_flagged() {
        let baseline: Vec<Sample> = series(0.0, 5, |_| vec![])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "pass", 0.0))
            .collect();
        let window: Vec<Sample> = series(1000.0, 3, |_| vec![])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "fail", 5.0))
            .collect();
        let j = judge(Window::FirstHour, &baseline, &window, &window, false, &t());
        assert_eq!(
            signals(&j.regressions),
            vec![(Signal::CheckFailure, "orphans".to_string())]
        );
        // A check that already failed before the deployment is not a regression of it.
        let failing: Vec<Sample> = series(0.0, 5, |_| vec![])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "fail", 5.0))
            .collect();
        assert!(
            judge(Window::FirstHour, &failing, &window, &window, false, &t())
                .regressions
                .is_empty()
        );
        // Info checks do not count.
        let info: Vec<Sample> = window
            .iter()
            .cloned()
            .map(|s| with_check(s, "orphans", "performance", "fail", 5.0))
            .collect();
        assert!(
            judge(Window::FirstHour, &baseline, &info, &info, false, &t())
                .regressions
                .is_empty()
        );
    }

    #[test]
    fn rollback_ratio_deadlocks_and_connections() {
        let baseline = series(0.0, 5, |_| vec![]);
        let mut window = series(1000.0, 5, |_| vec![]);
        for s in &mut window {
            s.database = Some(DbCounters {
                xact_commit: 1000.0,
                xact_rollback: 200.0,
                deadlocks: 1.0,
                ..DbCounters::default()
            });
            s.connections = 95.0;
        }
        let j = judge(Window::FirstHour, &baseline, &window, &window, false, &t());
        let found: BTreeSet<Signal> = j.regressions.iter().map(|f| f.signal).collect();
        assert_eq!(
            found,
            BTreeSet::from([
                Signal::RollbackRatio,
                Signal::Deadlocks,
                Signal::Connections
            ])
        );
        let same = judge(
            Window::FirstHour,
            &baseline,
            &baseline,
            &baseline,
            false,
            &t(),
        );
        assert!(same.regressions.is_empty());
    }

    fn with_table(mut s: Sample, seq_scan: f64, rows: f64) -> Sample {
        s.tables.insert(
            "public.submissions".into(),
            TableCounters {
                seq_scan,
                seq_tup_read: rows,
                idx_scan: 0.0,
            },
        );
        s
    }

    #[test]
    fn a_few_extra_scans_in_a_short_window_are_noise() {
        // 0.14/s -> 0.33/s over three seconds: one scan more than expected.
        let baseline: Vec<Sample> = (0..8)
            .map(|i| {
                with_table(
                    Sample {
                        at: i as f64,
                        seconds: 1.0,
                        ..Sample::default()
                    },
                    if i % 7 == 0 { 1.0 } else { 0.0 },
                    40.0,
                )
            })
            .collect();
        let window: Vec<Sample> = (0..3)
            .map(|i| {
                with_table(
                    Sample {
                        at: 10.0 + i as f64,
                        seconds: 1.0,
                        ..Sample::default()
                    },
                    if i == 0 { 1.0 } else { 0.0 },
                    100.0,
                )
            })
            .collect();
        assert!(
            judge(Window::FirstDay, &baseline, &window, &window, false, &t())
                .regressions
                .is_empty()
        );
    }

    #[test]
    fn more_sequential_scans_on_a_table_are_flagged() {
        let baseline: Vec<Sample> = series(0.0, 5, |_| vec![])
            .into_iter()
            .map(|s| with_table(s, 1.0, 100.0))
            .collect();
        let window: Vec<Sample> = series(1000.0, 5, |_| vec![])
            .into_iter()
            .map(|s| with_table(s, 600.0, 6e6))
            .collect();
        let j = judge(Window::FirstDay, &baseline, &window, &window, false, &t());
        assert_eq!(
            signals(&j.regressions),
            vec![(Signal::SeqScans, "public.submissions".to_string())]
        );
        assert!(judge(
            Window::FirstDay,
            &baseline,
            &baseline,
            &baseline,
            false,
            &t()
        )
        .regressions
        .is_empty());
    }

    fn with_index(mut s: Sample, name: &str, scans: f64) -> Sample {
        s.indexes.insert(
            name.into(),
            IndexDelta {
                table: "public.images".into(),
                scans,
            },
        );
        s
    }

    #[test]
    fn a_new_index_never_scanned_is_flagged_when_the_window_closes() {
        let baseline: Vec<Sample> = series(0.0, 5, |_| vec![])
            .into_iter()
            .map(|s| with_index(s, "public.old", 3.0))
            .collect();
        let since: Vec<Sample> = series(1000.0, 5, |_| vec![])
            .into_iter()
            .map(|s| {
                with_index(
                    with_index(with_index(s, "public.old", 3.0), "public.idx_new_true", 0.0),
                    "public.idx_used_paid",
                    2.0,
                )
            })
            .collect();
        let open = judge(Window::FirstDay, &baseline, &since, &since, false, &t());
        assert!(open.regressions.is_empty());
        let mut since = since;
        for s in &mut since {
            s.statements = Some(BTreeMap::from([(
                "42".to_string(),
                StatementDelta {
                    calls: 5.0,
                    total_ms: 5.0,
                    rows: 5.0,
                    query: "SELECT * FROM images WHERE ai_generated".into(),
                },
            )]));
        }
        let closed = judge(Window::FirstDay, &baseline, &since, &since, true, &t());
        assert_eq!(
            signals(&closed.regressions),
            vec![(Signal::UnusedIndex, "public.idx_new_true".to_string())]
        );
        // A notice with the queries on its table, never a regression.
        let notice = &closed.regressions[0];
        assert_eq!(notice.state, crate::analysis::deployment::FlagState::Notice);
        assert!(!notice.active());
        assert_eq!(
            notice.evidence["queries_on_table"],
            serde_json::json!(["42: SELECT * FROM images WHERE ai_generated"])
        );
    }

    #[test]
    fn a_single_page_extension_over_seconds_is_not_growth() {
        let baseline: Vec<Sample> = (0..5)
            .map(|i| Sample {
                at: i as f64,
                size_bytes: 1e7,
                ..Sample::default()
            })
            .collect();
        let window: Vec<Sample> = (0..3)
            .map(|i| Sample {
                at: 10.0 + i as f64,
                size_bytes: 1e7 + 8192.0 * i as f64,
                ..Sample::default()
            })
            .collect();
        assert!(
            judge(Window::FirstDay, &baseline, &window, &window, false, &t())
                .regressions
                .is_empty()
        );
    }

    #[test]
    fn faster_growth_is_flagged() {
        let baseline: Vec<Sample> = (0..5)
            .map(|i| Sample {
                at: 3600.0 * i as f64,
                size_bytes: 1e9 + 1e5 * i as f64,
                ..Sample::default()
            })
            .collect();
        let window: Vec<Sample> = (0..5)
            .map(|i| Sample {
                at: 1e5 + 3600.0 * i as f64,
                size_bytes: 2e9 + 1e8 * i as f64,
                ..Sample::default()
            })
            .collect();
        let j = judge(Window::FirstDay, &baseline, &window, &window, false, &t());
        assert_eq!(
            signals(&j.regressions),
            vec![(Signal::DbGrowth, "database size".to_string())]
        );
    }

    #[test]
    fn first_week_compares_top_queries_and_integrity() {
        let baseline: Vec<Sample> = series(0.0, 6, |i| vec![("1", 1.0 + 0.01 * i as f64)])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "pass", 0.0))
            .collect();
        let window: Vec<Sample> = series(1000.0, 6, |i| vec![("1", 1.5 + 0.01 * i as f64)])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "fail", 2.0))
            .collect();
        let j = judge(Window::FirstWeek, &baseline, &window, &window, false, &t());
        let found: BTreeSet<Signal> = j.regressions.iter().map(|f| f.signal).collect();
        // The integrity check passed throughout the baseline: a check failure, reported once.
        assert_eq!(
            found,
            BTreeSet::from([Signal::TopQueries, Signal::CheckFailure])
        );
    }

    #[test]
    fn integrity_counts_that_never_were_zero_are_not_this_deployments_doing() {
        let dirty = |start: f64, value: f64| -> Vec<Sample> {
            series(start, 6, |_| vec![("1", 1.0)])
                .into_iter()
                .map(|s| with_check(s, "orphans", "integrity", "fail", value))
                .collect()
        };
        let j = judge(
            Window::FirstWeek,
            &dirty(0.0, 3.0),
            &dirty(1000.0, 3.0),
            &[],
            true,
            &t(),
        );
        assert!(
            !j.regressions.iter().any(|f| f.signal == Signal::Integrity),
            "{:?}",
            j.regressions
        );
        // Repaired during the window, then back: that is a creep.
        let mut window = dirty(1000.0, 3.0);
        window[2] = with_check(window[2].clone(), "orphans", "integrity", "pass", 0.0);
        let j = judge(
            Window::FirstWeek,
            &dirty(0.0, 3.0),
            &window,
            &[],
            true,
            &t(),
        );
        assert!(
            j.regressions.iter().any(|f| f.signal == Signal::Integrity),
            "{:?}",
            j.regressions
        );
    }

    #[test]
    fn evidence_never_holds_nan() {
        assert_eq!(number(f64::NAN), number(0.0));
        assert_eq!(number(f64::INFINITY), number(0.0));
    }

    #[test]
    fn breakage_is_judged_in_every_window() {
        let baseline: Vec<Sample> = series(0.0, 6, |_| vec![])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "pass", 0.0))
            .collect();
        let broken: Vec<Sample> = series(1000.0, 6, |_| vec![])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "fail", 4.0))
            .collect();
        let mut failing_transactions = series(1000.0, 6, |_| vec![]);
        for s in &mut failing_transactions {
            s.database = Some(DbCounters {
                xact_commit: 860.0,
                xact_rollback: 140.0,
                ..DbCounters::default()
            });
        }
        for window in [Window::FirstHour, Window::FirstDay, Window::FirstWeek] {
            let j = judge(window, &baseline, &broken, &broken, false, &t());
            let found: Vec<(Signal, String)> = signals(&j.regressions);
            assert_eq!(
                found,
                vec![(Signal::CheckFailure, "orphans".to_string())],
                "{window:?}"
            );
            let j = judge(
                window,
                &baseline,
                &failing_transactions,
                &failing_transactions,
                false,
                &t(),
            );
            assert!(
                j.regressions
                    .iter()
                    .any(|f| f.signal == Signal::RollbackRatio),
                "{window:?}: {:?}",
                j.regressions
            );
        }
    }
}

//! The regression rules: one signal each, judged per window against the pre-deployment
//! baseline, every finding carrying its evidence (baseline and window figures, test statistic,
//! sample counts). Improvements are reported too, since the checklist expects "same or better".
//! Pure: summaries in (see [`crate::analysis::summary`]), findings out; [`judge`] takes samples
//! and summarises them first.

use serde_json::{Map, Value};

use crate::analysis::deployment::{Finding, Signal};
use crate::analysis::sample::Sample;
use crate::analysis::stats;
use crate::analysis::summary::{DatabaseSummary, Summary};
use crate::analysis::window::Window;

/// How demanding the rules are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Relative increase of a query's median time per call that counts (0.2 = +20 %).
    pub(crate) latency_min_increase: f64,
    /// A sample counts for a query only with at least this many calls in it.
    pub(crate) latency_min_calls: u64,
    /// The false-discovery level: a query (or table, or the failure share) is flagged when its
    /// always-valid sequential p-value, adjusted by Benjamini–Hochberg across everything tested
    /// at that look, is at most this.
    pub(crate) latency_p_value: f64,
    /// Samples needed on each side of any comparison.
    pub min_samples: usize,
    /// Window samples in which a query ran that it needs before any latency verdict on it (its
    /// calls pooled into at least `min_samples` means of `latency_min_calls` calls).
    pub(crate) latency_min_window_samples: usize,
    /// Smallest change of the median time per call, in milliseconds, that counts: a
    /// microsecond query that gets "30 % slower" under a busy CPU is noise, not a regression.
    pub(crate) latency_min_delta_ms: f64,
    /// When a statement the baseline never saw is a regression on its own.
    pub(crate) new_statement: NewStatementThresholds,
}

/// A statement absent from the whole baseline is flagged when, since it was first seen, it
/// takes at least `min_ms_per_second` of database time per second and `min_share` of all
/// statements' time, or at least `min_ms_per_call` per call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NewStatementThresholds {
    /// Database time per second (ms of statement time per second of wall time).
    pub(crate) min_ms_per_second: f64,
    /// Share of all statements' time in the same span (0.05 = 5 %).
    pub(crate) min_share: f64,
    /// Mean time per call (ms).
    pub(crate) min_ms_per_call: f64,
}

impl Default for NewStatementThresholds {
    /// The shipped defaults: 10 ms a second (36 s of database time an hour) and 5 % of all
    /// statements' time, or 500 ms per call.
    fn default() -> Self {
        NewStatementThresholds {
            min_ms_per_second: 10.0,
            min_share: 0.05,
            min_ms_per_call: 500.0,
        }
    }
}

impl Default for Thresholds {
    /// The shipped defaults (the configuration reference in README.md).
    fn default() -> Self {
        Thresholds {
            latency_min_increase: 0.2,
            latency_min_calls: 5,
            latency_p_value: 0.01,
            min_samples: 3,
            latency_min_window_samples: 6,
            latency_min_delta_ms: 0.05,
            new_statement: NewStatementThresholds::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judgement {
    pub regressions: Vec<Finding>,
    pub(crate) improvements: Vec<Finding>,
    /// Why some signals could not be judged in this window (a sharp change of traffic): a
    /// window without regressions then ends `inconclusive`, not `pass`.
    pub(crate) inconclusive: Vec<String>,
}

/// Sequential scans must add at least this many scans over the window.
const SEQ_SCAN_MIN_EXTRA: f64 = 20.0;
/// And they must read at least this many more rows a second than the baseline's rows per
/// transaction give (18 million rows an hour): a few hundred rows of a small lookup table read
/// by a sequential scan instead of its index cost the server nothing worth a page, whatever the
/// planner or an ANALYZE chose, while a lost index on a table of a few hundred rows under a hot
/// query (40 queries a second) reads 16,000 more rows a second.
const SEQ_SCAN_MIN_EXTRA_ROWS_PER_SECOND: f64 = 5000.0;
/// Mixture scale of the latency test, in natural-log units of time per call: effects around
/// ×1.35 carry the most weight, and ×1.2 to ×5 are all found quickly.
const LATENCY_MIXTURE_TAU: f64 = 0.3;
/// Floor on the spread of a query's per-sample log time per call (5 %): a baseline that hardly
/// varied must not make every wiggle significant.
const LATENCY_MIN_LOG_SD: f64 = 0.05;
/// A slower query must cost the database at least this much extra time per second (ms):
/// 0.36 s an hour.
const LATENCY_MIN_EXTRA_MS_PER_SECOND: f64 = 0.1;

/// Traffic (application transactions per second) in the window against the baseline's beyond
/// this factor either way is a sharp change: rates are then not comparable.
const TRAFFIC_SHARP_CHANGE: f64 = 3.0;
/// Counted events (scans, rollbacks) come in bursts: their variance is taken as this many
/// times the Poisson (or binomial) one.
const OVERDISPERSION: f64 = 2.0;
/// Mixture scale of the relative change of a rate (sequential scans per transaction).
const RATE_MIXTURE_TAU: f64 = 0.5;
/// Mixture scale of a change of the failure share (absolute: 5 points).
const SHARE_MIXTURE_TAU: f64 = 0.05;

/// Application transactions and the seconds they cover.
fn traffic(summary: &Summary) -> Option<(f64, f64)> {
    let d = summary.database?;
    let transactions = d.xact_commit + d.xact_rollback;
    (transactions > 0.0 && d.coverage.seconds > 0.0).then_some((transactions, d.coverage.seconds))
}

/// Window traffic per second over the baseline's.
pub(crate) fn traffic_ratio(baseline: &Summary, window: &Summary) -> Option<f64> {
    let (tb, sb) = traffic(baseline)?;
    let (tw, sw) = traffic(window)?;
    Some((tw / sw) / (tb / sb))
}

/// Whether the window's traffic differs so much from the baseline's that rates cannot be
/// compared; the reason when so.
fn sharp_traffic_change(baseline: &Summary, window: &Summary) -> Option<String> {
    let ratio = traffic_ratio(baseline, window)?;
    (!(1.0 / TRAFFIC_SHARP_CHANGE..=TRAFFIC_SHARP_CHANGE).contains(&ratio)).then(|| {
        format!(
            "traffic changed sharply at the deployment: {ratio:.2}x the baseline's transactions per second, so sequential scans and deadlocks are not judged in this window"
        )
    })
}

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
pub(crate) fn judge_summaries(
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
    // Every signal is judged in every window: a violation is flagged in the window where it
    // appears, and a window passes only if all of them are clean at its end. The tests are
    // sequential (valid at every look), so an open window is judged as strictly as a closed one.
    check_failures(baseline, window_samples, &mut j);
    rollback_ratio(baseline, window_samples, t, &mut j);
    connections(baseline, window_samples, &mut j);
    integrity(baseline, window_samples, &mut j);
    query_latency(baseline, window_samples, t, &mut j);
    new_statements(baseline, window_samples, t, &mut j);
    // Rates per second or per transaction are not comparable when the traffic changed sharply.
    match sharp_traffic_change(baseline, window_samples) {
        Some(reason) => j.inconclusive.push(reason),
        None => {
            deadlocks(baseline, window_samples, &mut j);
            seq_scans(baseline, window_samples, t, &mut j);
        }
    }
    if window == Window::FirstDay {
        if closed {
            unused_indexes(baseline, since_deployment, &mut j);
        }
        db_growth(baseline, window_samples, t, &mut j);
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
        .filter(|d| d.coverage.samples > 0)
        .map(|d| (d, d.coverage.seconds, d.coverage.samples))
}

/// The application's failure share: rolled-back transactions over all of them. deploywatch's
/// own read-only transactions end in COMMIT, so every rollback is the application's. The share
/// is tested with the mixture sequential test (binomial variance with overdispersion); a
/// regression needs the share at least doubled, at least one point higher, and 10 rollbacks.
/// PostgreSQL's statistics count neither failed statements nor SQLSTATEs; the evidence names
/// the statements that complete less often per transaction than before (a failing statement
/// is not counted by pg_stat_statements), when there are such.
fn rollback_ratio(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    let (Some((b, _, nb)), Some((w, _, nw))) = (database_totals(baseline), database_totals(window))
    else {
        return;
    };
    let (all_b, all_w) = (
        b.xact_commit + b.xact_rollback,
        w.xact_commit + w.xact_rollback,
    );
    if all_b <= 0.0 || all_w <= 0.0 {
        return;
    }
    let (rb, rw) = (b.xact_rollback / all_b, w.xact_rollback / all_w);
    // Under "no change" both shares estimate the same p; at least one failure in the baseline's
    // worth of transactions is assumed, so a spotless baseline does not make one failure loud.
    let p0 = rb.max(1.0 / all_b).min(0.5);
    let variance = OVERDISPERSION * p0 * (1.0 - p0) * (1.0 / all_w + 1.0 / all_b);
    let p_value = stats::mixture_test(rw - rb, variance, SHARE_MIXTURE_TAU)
        .map_or(1.0, |(_, p)| if rw > rb { p } else { 1.0 });
    if !(w.xact_rollback >= 10.0
        && rw >= 2.0 * rb
        && rw - rb >= 0.01
        && p_value <= t.latency_p_value)
    {
        return;
    }
    let failing = completing_less_often(baseline, window, all_b, all_w, rw - rb);
    let named = if failing.is_empty() {
        String::new()
    } else {
        format!(
            "; completing less often per transaction: {}",
            failing.join("; ")
        )
    };
    j.regressions.push(finding(
        Signal::RollbackRatio,
        "transactions".into(),
        format!(
            "application failure share {:.1} % -> {:.1} % of transactions ({} of {} rolled back in the window), sequential p={p_value:.2e}{named}",
            rb * 100.0,
            rw * 100.0,
            w.xact_rollback,
            all_w
        ),
        evidence(&[
            ("baseline_failure_share", number(rounded(rb, 5))),
            ("window_failure_share", number(rounded(rw, 5))),
            ("window_rollbacks", number(w.xact_rollback)),
            ("window_transactions", number(all_w)),
            ("sequential_p_value", number(p_value)),
            (
                "statements_completing_less_often",
                Value::Array(failing.into_iter().map(Value::String).collect()),
            ),
            (
                "sqlstates",
                Value::String(
                    "not in PostgreSQL's statistics views; the server log has them".into(),
                ),
            ),
            ("n_baseline", number(nb as f64)),
            ("n_window", number(nw as f64)),
        ]),
    ));
}

/// Statements whose completed calls per transaction fell by at least half the rise of the
/// failure share (and by 2 % at least), the biggest fall first, at most five: a statement that
/// fails is not counted by pg_stat_statements, so the failing ones (and those after them in
/// their transactions) complete less often.
fn completing_less_often(
    baseline: &Summary,
    window: &Summary,
    all_b: f64,
    all_w: f64,
    rise: f64,
) -> Vec<String> {
    let mut falls: Vec<(f64, String)> = Vec::new();
    for (id, before) in &baseline.statements {
        let Some(after) = window.statements.get(id) else {
            continue;
        };
        let (per_b, per_w) = (before.calls / all_b, after.calls / all_w);
        if per_b < 0.01 || before.calls < 20.0 {
            continue;
        }
        let fall = 1.0 - per_w / per_b;
        if fall >= (rise / 2.0).max(0.02) {
            falls.push((
                fall,
                format!(
                    "{} {:.0} % fewer",
                    query_message(id, &before.query),
                    fall * 100.0
                ),
            ));
        }
    }
    falls.sort_by(|a, b| b.0.total_cmp(&a.0));
    falls.into_iter().take(5).map(|(_, text)| text).collect()
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

/// Latency per query, in every window. Each statement followed in the baseline and the window
/// is tested with the mixture sequential test on the log of its per-sample mean time per call
/// (valid however often the window is looked at; the window's most extreme sample winsorized,
/// so one heavy sample is not a shift, and the window's variance scaled up when its means hold
/// fewer calls than the baseline's: [`stats::sequential_shift`]; one-sided, in the direction of
/// the change), for a change of more than half of `latency_min_increase` beyond the server-wide
/// one: the median change of all statements tested, counted up to that half either way (a
/// server made a few percent slower by more traffic slows every query, which is not one
/// query's regression; a deployment that slows every query by more still has each flagged on
/// what exceeds that half); the p-values of all statements tested at this
/// look go through Benjamini–Hochberg weighted by each statement's share of the baseline's
/// database time ([`time_weights`]), so testing hundreds of queries does not make one of them
/// come out by chance, and a slowdown of a statement that costs the database time is found
/// sooner than the same one of a statement that costs it nothing. A regression also needs: at least `latency_min_window_samples` window
/// samples in which it ran, pooled time per call (total time / calls) `latency_min_increase` higher and
/// `latency_min_delta_ms` more, and `LATENCY_MIN_EXTRA_MS_PER_SECOND` of extra database time
/// per second. The pooled time per call sees intermittent waits (lock contention) that a median
/// of per-sample means hides.
fn query_latency(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    struct Tested<'a> {
        id: &'a String,
        query: &'a str,
        test: stats::SequentialShift,
        /// The log shift beyond the server-wide one: what is tested.
        beyond: f64,
        pooled_b: f64,
        pooled_w: f64,
        calls_w: f64,
        /// The statement's database time in the baseline (ms).
        time_b: f64,
        b: &'a [f64],
        w: &'a [f64],
        n_b: u64,
        n_w: u64,
    }
    let mut tested: Vec<Tested<'_>> = Vec::new();
    for (id, before) in &baseline.statements {
        let Some(after) = window.statements.get(id) else {
            continue;
        };
        // Per-sample means of at least `latency_min_calls` calls (fewer are pooled with the
        // next samples), and the window samples in which the statement ran at all.
        let (n_b, n_w) = (before.log_means.n, after.log_means.n);
        let ran_w = after.rates.n;
        if n_b < t.min_samples as u64
            || n_w < t.min_samples as u64
            || ran_w < t.latency_min_window_samples.max(t.min_samples) as u64
            || before.calls <= 0.0
            || after.calls <= 0.0
        {
            continue;
        }
        // Calls behind each per-sample mean, the baseline's over the window's: a window of
        // fewer calls a mean (traffic fell) has noisier means under "no change".
        let calls_ratio = (before.calls / n_b as f64) / (after.calls / n_w as f64);
        let Some(test) = stats::sequential_shift(
            &before.log_means,
            &after.log_means,
            calls_ratio,
            LATENCY_MIXTURE_TAU,
            LATENCY_MIN_LOG_SD,
        ) else {
            continue;
        };
        tested.push(Tested {
            id,
            query: &before.query,
            test,
            beyond: test.shift,
            pooled_b: before.total_ms / before.calls,
            pooled_w: after.total_ms / after.calls,
            calls_w: after.calls,
            time_b: before.total_ms,
            b: before.means.values(),
            w: after.means.values(),
            n_b,
            n_w,
        });
    }
    // The evidence must be for a change beyond the server-wide one, not merely for some change:
    // a busier server makes every query a few percent slower, and with enough samples that is
    // "significant" without being any query's regression. The server-wide change is the median
    // of all statements' changes, counted up to half of `latency_min_increase`: with a few
    // statements tested it may be the regressed one's own, and a deployment that slows every
    // query by more than that is a regression of each.
    let margin = (1.0 + t.latency_min_increase / 2.0).ln();
    let shifts: Vec<f64> = tested.iter().map(|x| x.test.shift).collect();
    let server_wide = stats::median(&shifts).unwrap_or(0.0).clamp(-margin, margin);
    // Beyond the server-wide change, and by more than the same half of `latency_min_increase`:
    // per-sample times of few calls are heavy-tailed, and a change within that margin is not
    // what a regression is.
    for x in tested.iter_mut() {
        x.beyond = x.test.shift - server_wide;
        let excess = x.beyond.abs() - margin;
        // One-sided in the direction of the change: slower and faster are separate families
        // below, and each only ever flags its own direction.
        x.test.p_value = if excess > 0.0 {
            stats::one_sided_mixture_test(excess, x.test.variance, LATENCY_MIXTURE_TAU)
                .map_or(1.0, |r| r.1)
        } else {
            1.0
        };
    }
    let one_sided = |slower: bool| -> Vec<f64> {
        tested
            .iter()
            .map(|x| {
                if (x.beyond > 0.0) == slower && x.beyond != 0.0 {
                    x.test.p_value
                } else {
                    1.0
                }
            })
            .collect()
    };
    // Benjamini–Hochberg weighted by each statement's share of the baseline's database time
    // (weights averaging 1): a slowdown of a statement that costs the database time is what a
    // page is for, and spending more of the level there finds it sooner.
    let weights = time_weights(&tested.iter().map(|x| x.time_b).collect::<Vec<_>>());
    let q_slower = stats::weighted_benjamini_hochberg(&one_sided(true), &weights);
    let q_faster = stats::weighted_benjamini_hochberg(&one_sided(false), &weights);
    let m = tested.len();
    for (i, x) in tested.iter().enumerate() {
        let Some(change) = stats::relative_change(x.pooled_b, x.pooled_w) else {
            continue;
        };
        let material = (x.pooled_w - x.pooled_b).abs() >= t.latency_min_delta_ms;
        let extra_ms_per_second = if window.seconds > 0.0 {
            (x.pooled_w - x.pooled_b) * x.calls_w / window.seconds
        } else {
            0.0
        };
        // For the reader, not the decision: the fixed-sample rank test at this look (exact for
        // small samples). Low when the window's samples are slower across the board, high
        // when a few samples carry the change (intermittent waits such as lock contention,
        // which the pooled time sees and a rank test, like a median, hides).
        let ranks = |slower: bool| {
            if slower {
                stats::mann_whitney(x.b, x.w)
            } else {
                stats::mann_whitney(x.w, x.b)
            }
        };
        let make_evidence = |p: f64, q: f64, rank: Option<stats::MannWhitney>| {
            // Only for a finding: over the followed statements on every look it would cost
            // more than the rest of the pass.
            let hl = stats::hodges_lehmann(x.b, x.w, 0.95);
            evidence(&[
                ("query_id", Value::String(x.id.clone())),
                ("query", Value::String(x.query.to_string())),
                ("baseline_ms_per_call", number(rounded(x.pooled_b, 4))),
                ("window_ms_per_call", number(rounded(x.pooled_w, 4))),
                ("change_percent", number(rounded(change * 100.0, 1))),
                (
                    "extra_db_ms_per_second",
                    number(rounded(extra_ms_per_second, 3)),
                ),
                (
                    "geometric_mean_ratio",
                    number(rounded(x.test.shift.exp(), 4)),
                ),
                ("server_wide_ratio", number(rounded(server_wide.exp(), 4))),
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
                ("sequential_p_value", number(p)),
                ("q_value", number(q)),
                (
                    "mann_whitney_p_value",
                    rank.map(|r| number(r.p_greater)).unwrap_or(Value::Null),
                ),
                (
                    "mann_whitney_exact",
                    Value::Bool(rank.is_some_and(|r| r.exact)),
                ),
                ("queries_tested", number(m as f64)),
                (
                    "autocorrelation",
                    number(rounded(x.test.autocorrelation, 3)),
                ),
                ("n_baseline", number(x.n_b as f64)),
                ("n_window", number(x.n_w as f64)),
                ("window_calls", number(x.calls_w)),
            ])
        };
        let slower = q_slower[i] <= t.latency_p_value
            && change >= t.latency_min_increase
            && material
            && extra_ms_per_second >= LATENCY_MIN_EXTRA_MS_PER_SECOND;
        let faster = !slower
            && q_faster[i] <= t.latency_p_value
            && change <= -t.latency_min_increase
            && material;
        let rank = if slower || faster {
            ranks(slower)
        } else {
            None
        };
        if slower {
            j.regressions.push(finding(
                Signal::QueryLatency,
                format!("query {}", x.id),
                format!(
                    "{} {:.3} ms -> {:.3} ms per call (+{:.0} %, {:.1} ms more database time per second), sequential p={:.2e}, q={:.2e} over {m} queries, {} vs {} samples",
                    query_message(x.id, x.query),
                    x.pooled_b,
                    x.pooled_w,
                    change * 100.0,
                    extra_ms_per_second,
                    x.test.p_value,
                    q_slower[i],
                    x.n_b,
                    x.n_w
                ),
                make_evidence(x.test.p_value, q_slower[i], rank),
            ));
        } else if faster {
            j.improvements.push(finding(
                Signal::QueryLatency,
                format!("query {}", x.id),
                format!(
                    "{} {:.0} % faster: {:.3} ms -> {:.3} ms per call, sequential p={:.2e}",
                    query_message(x.id, x.query),
                    -change * 100.0,
                    x.pooled_b,
                    x.pooled_w,
                    x.test.p_value
                ),
                make_evidence(x.test.p_value, q_faster[i], rank),
            ));
        }
    }
}

/// Share of the false-discovery level spread evenly over the queries tested; the rest follows
/// each query's share of the baseline's database time.
const LATENCY_EVEN_WEIGHT: f64 = 0.5;

/// Weights for Benjamini–Hochberg across the queries tested, from each one's database time in
/// the baseline: `LATENCY_EVEN_WEIGHT + (1 - LATENCY_EVEN_WEIGHT) · m · share`, which average 1
/// (Genovese, Roeder & Wasserman 2006: weights averaging 1, fixed before the window is seen,
/// keep the false discovery rate at the level). A query that takes a tenth of the database time
/// among 200 gets weight 10.5; a query that takes almost none keeps half its level. No time at
/// all (nothing to go by) gives every query weight 1.
fn time_weights(times: &[f64]) -> Vec<f64> {
    let clean = |t: f64| if t.is_finite() && t > 0.0 { t } else { 0.0 };
    let total: f64 = times.iter().map(|t| clean(*t)).sum();
    let m = times.len() as f64;
    times
        .iter()
        .map(|t| {
            if total > 0.0 {
                LATENCY_EVEN_WEIGHT + (1.0 - LATENCY_EVEN_WEIGHT) * m * clean(*t) / total
            } else {
                1.0
            }
        })
        .collect()
}

/// One-sided always-valid p-value for "the mean of these per-sample values is above `floor`":
/// the mixture sequential test of `mean - floor` with the values' variance (at least `min_sd`
/// squared) inflated for their lag-1 autocorrelation `r`, over `n` values. 1 when the mean is
/// not above the floor.
fn above_floor(mean: f64, variance: f64, r: f64, n: f64, floor: f64, tau: f64, min_sd: f64) -> f64 {
    let r = r.clamp(0.0, 0.9);
    let v = variance.max(min_sd * min_sd) * (1.0 + r) / (1.0 - r) / n.max(1.0);
    let d = mean - floor;
    if d <= 0.0 {
        return 1.0;
    }
    stats::mixture_test(d, v, tau).map_or(1.0, |(_, p)| p)
}

/// Statements the baseline never saw (not among its followed statements, its others, nor the
/// statements the baseline's following listed), judged on their own: a new statement is a
/// regression when, since it was first seen, it takes a material share of database time —
/// `new_statement.min_ms_per_second` of statement time per second of the window and
/// `new_statement.min_share` of all statements' time — or `new_statement.min_ms_per_call` per
/// call. Materiality alone is not enough: the statement must have run in at least
/// `latency_min_window_samples` samples (a one-off statement, such as the migration's own DDL,
/// is not a load), and a sequential test must show its level above the floor it passes: its
/// per-sample database time per second (samples in which it did not run count as 0) above
/// `min_ms_per_second`, or its per-sample log time per call above `ln(min_ms_per_call)` (in
/// samples with `latency_min_calls` calls). The smaller of the two p-values, doubled, goes
/// through Benjamini–Hochberg across every new statement tested at that look, and q ≤
/// `latency_p_value` flags it. A cheap new statement (a lookup at a fraction of a percent of
/// database time) is never material, so never flagged. Only statements followed in detail
/// are judged (the baseline's top ones and the first new ones of the window).
fn new_statements(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    if !baseline.saw_statements() || baseline.samples == 0 || window.seconds <= 0.0 {
        return;
    }
    let floor = t.new_statement;
    let needed = t.latency_min_window_samples.max(t.min_samples) as u64;
    struct Tested<'a> {
        id: &'a String,
        s: &'a crate::analysis::summary::StatementSummary,
        p: f64,
        per_second: f64,
        share: f64,
        mean_ms: f64,
        seconds: f64,
        samples: usize,
        criterion: &'static str,
    }
    let mut tested = Vec::new();
    for (id, s) in &window.statements {
        if baseline.knows(id) || window.listed_as_known(id) || s.rates.n < needed {
            continue;
        }
        let seconds = s.seconds_since_seen(window);
        let all_ms = s.statement_ms_since_seen(window);
        if seconds <= 0.0 || s.calls <= 0.0 {
            continue;
        }
        let per_second = s.total_ms / seconds;
        let share = if all_ms > 0.0 {
            s.total_ms / all_ms
        } else {
            0.0
        };
        let mean_ms = s.total_ms / s.calls;
        let samples = s.samples_since_seen(window);
        // Database time per second, per sample since it was first seen (0 where it did not run).
        let p_time = if per_second >= floor.min_ms_per_second && share >= floor.min_share {
            let n = (samples as f64).max(s.rates.n as f64);
            let mean = s.rates.sum / n;
            let variance = if n >= 2.0 {
                ((s.rates.sum_sq - n * mean * mean) / (n - 1.0)).max(0.0)
            } else {
                0.0
            };
            let r = s.rates.lag1_autocorrelation().unwrap_or(0.0);
            above_floor(
                mean,
                variance,
                r,
                n,
                floor.min_ms_per_second,
                floor.min_ms_per_second,
                0.1 * floor.min_ms_per_second,
            )
        } else {
            1.0
        };
        // Time per call, per sample with enough calls.
        let p_call = match (s.log_means.mean(), s.log_means.variance()) {
            (Some(mean), Some(variance))
                if mean_ms >= floor.min_ms_per_call && s.log_means.n >= needed =>
            {
                above_floor(
                    mean,
                    variance,
                    s.log_means.lag1_autocorrelation().unwrap_or(0.0),
                    s.log_means.n as f64,
                    floor.min_ms_per_call.ln(),
                    LATENCY_MIXTURE_TAU,
                    LATENCY_MIN_LOG_SD,
                )
            }
            _ => 1.0,
        };
        let (p, criterion) = if p_time <= p_call {
            (p_time, "database time")
        } else {
            (p_call, "time per call")
        };
        tested.push(Tested {
            id,
            s,
            p: (2.0 * p).min(1.0),
            per_second,
            share,
            mean_ms,
            seconds,
            samples,
            criterion,
        });
    }
    let q = stats::benjamini_hochberg(&tested.iter().map(|x| x.p).collect::<Vec<_>>());
    let m = tested.len();
    for (x, q) in tested.iter().zip(q) {
        if q > t.latency_p_value || x.p >= 1.0 {
            continue;
        }
        j.regressions.push(finding(
            Signal::NewStatement,
            format!("query {}", x.id),
            format!(
                "{} is new since the deployment (not seen in the {} baseline samples) and takes {:.1} ms of database time per second, {:.1} % of all statements' time ({:.0} calls, {:.3} ms per call, {:.0} ms in all), judged on its {}: sequential p={:.2e}, q={q:.2e} over {m} new statements",
                query_message(x.id, &x.s.query),
                baseline.samples,
                x.per_second,
                x.share * 100.0,
                x.s.calls,
                x.mean_ms,
                x.s.total_ms,
                x.criterion,
                x.p,
            ),
            evidence(&[
                ("query_id", Value::String(x.id.clone())),
                ("query", Value::String(x.s.query.clone())),
                ("window_calls", number(x.s.calls)),
                ("window_ms_per_call", number(rounded(x.mean_ms, 4))),
                ("window_total_ms", number(rounded(x.s.total_ms, 3))),
                ("db_ms_per_second", number(rounded(x.per_second, 3))),
                ("share_of_statement_time", number(rounded(x.share, 5))),
                ("criterion", Value::String(x.criterion.into())),
                ("seconds_since_first_seen", number(rounded(x.seconds, 1))),
                ("samples_since_first_seen", number(x.samples as f64)),
                ("samples_run", number(x.s.rates.n as f64)),
                ("sequential_p_value", number(x.p)),
                ("q_value", number(q)),
                ("new_statements_tested", number(m as f64)),
                ("n_baseline", number(baseline.samples as f64)),
                ("n_window", number(window.samples as f64)),
            ]),
        ));
    }
}

/// Sequential scans per application transaction, so a table read by sequential scans on every
/// request (a small lookup table) scans twice as often when traffic doubles without that being
/// flagged. The count is tested with the mixture sequential test (relative change, variance of
/// counts with overdispersion), Benjamini–Hochberg across the tables tested; a regression also
/// needs twice the scans per transaction, `SEQ_SCAN_MIN_EXTRA` extra scans, and more rows read
/// per transaction, by at least `SEQ_SCAN_MIN_EXTRA_ROWS_PER_SECOND` at the window's traffic.
fn seq_scans(baseline: &Summary, window: &Summary, t: &Thresholds, j: &mut Judgement) {
    let (Some((tx_b, _)), Some((tx_w, seconds_w))) = (traffic(baseline), traffic(window)) else {
        return;
    };
    struct Tested<'a> {
        table: &'a String,
        p: f64,
        per_tx_b: f64,
        per_tx_w: f64,
        rows_b: f64,
        rows_w: f64,
        expected: f64,
        extra: f64,
        n_b: usize,
        n_w: usize,
    }
    let mut tested = Vec::new();
    for (table, after) in &window.tables {
        let Some(before) = baseline.tables.get(table) else {
            continue;
        };
        if after.coverage.samples < t.min_samples || before.coverage.samples < t.min_samples {
            continue;
        }
        let (per_tx_b, per_tx_w) = (before.seq_scan / tx_b, after.seq_scan / tx_w);
        let expected = per_tx_b * tx_w;
        let extra = after.seq_scan - expected;
        // The relative change of scans per transaction, and its variance under "no change":
        // the window's count and the baseline's are both counts (at least one scan each).
        let estimate = extra / expected.max(1.0);
        let variance = OVERDISPERSION * (1.0 / expected.max(1.0) + 1.0 / before.seq_scan.max(1.0));
        let p = stats::mixture_test(estimate, variance, RATE_MIXTURE_TAU).map_or(1.0, |(_, p)| {
            if estimate > 0.0 {
                p
            } else {
                1.0
            }
        });
        tested.push(Tested {
            table,
            p,
            per_tx_b,
            per_tx_w,
            rows_b: before.seq_tup_read / tx_b,
            rows_w: after.seq_tup_read / tx_w,
            expected,
            extra,
            n_b: before.coverage.samples,
            n_w: after.coverage.samples,
        });
    }
    let q = stats::benjamini_hochberg(&tested.iter().map(|x| x.p).collect::<Vec<_>>());
    let m = tested.len();
    for (x, q) in tested.iter().zip(q) {
        let extra_rows_per_second = (x.rows_w - x.rows_b) * tx_w / seconds_w;
        if q <= t.latency_p_value
            && x.per_tx_w >= 2.0 * x.per_tx_b
            && x.extra >= SEQ_SCAN_MIN_EXTRA
            && extra_rows_per_second >= SEQ_SCAN_MIN_EXTRA_ROWS_PER_SECOND
        {
            let table = x.table;
            j.regressions.push(finding(
                Signal::SeqScans,
                table.clone(),
                format!(
                    "sequential scans on {table}: {:.4} -> {:.4} per transaction ({:.0} more than the baseline's rate gives), rows read {:.1} -> {:.1} per transaction ({:.0} more rows a second), sequential p={:.2e}, q={q:.2e} over {m} tables (a lost or unused index?)",
                    x.per_tx_b, x.per_tx_w, x.extra, x.rows_b, x.rows_w, extra_rows_per_second, x.p
                ),
                evidence(&[
                    ("table", Value::String(table.clone())),
                    ("baseline_seq_scans_per_transaction", number(rounded(x.per_tx_b, 6))),
                    ("window_seq_scans_per_transaction", number(rounded(x.per_tx_w, 6))),
                    ("baseline_rows_read_per_transaction", number(rounded(x.rows_b, 3))),
                    ("window_rows_read_per_transaction", number(rounded(x.rows_w, 3))),
                    ("extra_rows_read_per_second", number(rounded(extra_rows_per_second, 1))),
                    ("expected_scans", number(rounded(x.expected, 1))),
                    ("extra_scans", number(rounded(x.extra, 1))),
                    ("traffic_ratio", number(rounded((tx_w / window.seconds.max(1e-9)) / (tx_b / baseline.seconds.max(1e-9)), 3))),
                    ("sequential_p_value", number(x.p)),
                    ("q_value", number(q)),
                    ("tables_tested", number(m as f64)),
                    ("n_baseline", number(x.n_b as f64)),
                    ("n_window", number(x.n_w as f64)),
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
    // Growth follows traffic: twice the transactions write about twice the rows. The
    // baseline's rate is scaled by the traffic ratio (when known) before comparing.
    let traffic = traffic_ratio(baseline, window).unwrap_or(1.0).max(1.0);
    if w > 3.0 * b.max(0.0) * traffic && w >= MIB && grown >= MIB {
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
                ("traffic_ratio", number(rounded(traffic, 3))),
                ("n_baseline", number(baseline.samples as f64)),
                ("n_window", number(window.samples as f64)),
            ]),
        ));
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
        Thresholds::default()
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
            database: Some(DbCounters {
                xact_commit: 1000.0,
                xact_rollback: 5.0,
                ..DbCounters::default()
            }),
            size_bytes: 1e9,
            connections: 10.0,
            max_connections: 100.0,
            ..Sample::of_statements(at, 60.0, statements)
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

    /// Samples without statements, each made by `with` from an empty one.
    fn series_with(start: f64, n: usize, with: impl Fn(Sample) -> Sample) -> Vec<Sample> {
        series(start, n, |_| vec![]).into_iter().map(with).collect()
    }

    /// The rules on an open window that holds every sample since the deployment.
    fn judged(window: Window, baseline: &[Sample], samples: &[Sample]) -> Judgement {
        judge(window, baseline, samples, samples, false, &t())
    }

    fn signals(j: &[Finding]) -> Vec<(Signal, String)> {
        j.iter().map(|f| (f.signal, f.subject.clone())).collect()
    }

    /// Asserts that `findings` are one: `signal` on `subject`.
    #[track_caller]
    fn assert_only(findings: &[Finding], signal: Signal, subject: &str) {
        assert_eq!(signals(findings), vec![(signal, subject.to_string())]);
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
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
        let f = &j.regressions[0];
        assert!(f.message.contains("SELECT 1"), "{}", f.message);
        assert!(f.evidence["q_value"].as_f64().unwrap_or(1.0) < 0.01);
        assert!(f.evidence["extra_db_ms_per_second"].as_f64().unwrap_or(0.0) > 0.4);
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
    fn a_50_percent_slowdown_is_flagged_in_every_window_once_there_are_enough_samples() {
        let mut rng = Lcg(11);
        let mut noise = move || 1.0 + 0.05 * (rng.next() - 0.5);
        let baseline = series(0.0, 10, |_| vec![("1", 1.0 * noise())]);
        let window = series(1000.0, 10, |_| vec![("1", 1.5 * noise())]);
        for w in [Window::FirstHour, Window::FirstDay, Window::FirstWeek] {
            let j = judged(w, &baseline, &window);
            assert_eq!(
                signals(&j.regressions),
                vec![(Signal::QueryLatency, "query 1".to_string())],
                "{w:?}"
            );
        }
        // Below `latency_min_window_samples` window samples there is no latency verdict at all.
        let few = &window[..5];
        let j = judged(Window::FirstHour, &baseline, few);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
    }

    /// A sample in which query "1" ran `calls` times at `ms` per call.
    fn sample_calls(at: f64, calls: f64, ms: f64) -> Sample {
        let mut s = sample(at, &[("1", ms)]);
        if let Some(statement) = s.statements.as_mut().and_then(|m| m.get_mut("1")) {
            statement.calls = calls;
            statement.total_ms = calls * ms;
        }
        s
    }

    /// One sample a minute from `start`, each of `calls` calls at the given time per call (ms).
    fn samples_of(start: f64, calls: f64, ms: &[f64]) -> Vec<Sample> {
        ms.iter()
            .enumerate()
            .map(|(i, ms)| sample_calls(start + 60.0 * i as f64, calls, *ms))
            .collect()
    }

    #[test]
    fn lock_waits_that_thin_out_the_calls_are_still_judged() {
        // An update runs 8 times a sample at 0.04 ms; once another session holds its rows it
        // waits (20 ms a call), so half the samples see only 4 calls complete. Those samples
        // are pooled with the next rather than dropped, and the window is judged.
        let mut rng = Lcg(3);
        let baseline: Vec<Sample> = (0..30)
            .map(|i| sample_calls(60.0 * i as f64, 8.0, 0.04 * (1.0 + 0.1 * rng.next())))
            .collect();
        let window: Vec<Sample> = (0..6)
            .map(|i| {
                let calls = if i % 2 == 0 { 4.0 } else { 8.0 };
                sample_calls(10_000.0 + 60.0 * i as f64, calls, 20.0 * (1.0 + rng.next()))
            })
            .collect();
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
        assert_eq!(j.regressions[0].evidence["n_window"], 3.0);
        // Calls that never add up to `latency_min_calls` in enough samples are not judged.
        let sparse: Vec<Sample> = (0..6)
            .map(|i| sample_calls(10_000.0 + 60.0 * i as f64, 1.0, 20.0))
            .collect();
        assert!(judged(Window::FirstHour, &baseline, &sparse)
            .regressions
            .is_empty());
    }

    /// A row-lock contention deployment of the end-to-end bench, its figures as sampled: eight baseline samples of an update at about 0.06 ms a call,
    /// one of which met a lock wait (10.4 ms a call); then a window in which five of six
    /// samples are x200 to x1300 (7 to 77 ms a call). The one slow baseline sample made the
    /// baseline's log variance 3.8 (about 0.02 without it), which the test takes for the
    /// window's too: the sequential p-value was 0.39 for a x80 shift, and the window passed.
    /// The baseline's mean and variance now have its most extreme value winsorized.
    #[test]
    fn one_slow_baseline_sample_does_not_hide_a_slowdown() {
        let baseline = contended_baseline();
        let window: Vec<Sample> = [
            (9.0, 37.1608),
            (7.0, 0.0470),
            (5.0, 76.5076),
            (8.0, 14.6119),
            (5.0, 57.6184),
            (11.0, 13.6877),
        ]
        .iter()
        .enumerate()
        .map(|(i, (calls, ms))| sample_calls(10_000.0 + 60.0 * i as f64, *calls, *ms))
        .collect();
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_eq!(
            signals(&j.regressions),
            vec![(Signal::QueryLatency, "query 1".to_string())],
            "{j:?}"
        );
    }

    /// The same baseline, then a window as quiet as its seven other samples: the one lock wait
    /// does not raise the baseline's level either, so the unchanged update is not "faster".
    #[test]
    fn one_slow_baseline_sample_does_not_make_an_unchanged_query_faster() {
        let baseline = contended_baseline();
        let window = samples_of(
            10_000.0,
            8.0,
            &[0.0612, 0.0571, 0.0655, 0.0598, 0.0633, 0.0560, 0.0621],
        );
        let j = judged(Window::FirstHour, &baseline, &window);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        assert!(j.improvements.is_empty(), "{:?}", j.improvements);
    }

    /// An insert judged against a baseline of four per-sample means, one of them 2.5 times
    /// the others (a commit that waited on a WAL flush), then a window between the three quick
    /// ones and the slow one. Winsorized, the slow mean left the spread of the three others
    /// (log variance 0.02, corrected, against 0.21), and a window within the baseline's range
    /// was a slowdown. The demo's inserts have baselines this short (four means each), and its
    /// first hour was once flagged on two of them (+109 % and +112 %, confirmed, then
    /// resolved). In four values one far out may as well be the statement's own spread: they
    /// are not winsorized.
    #[test]
    fn four_baseline_means_with_one_slow_do_not_confirm_a_window_within_their_range() {
        let baseline = samples_of(0.0, 200.0, &[0.100, 0.110, 0.092, 0.250]);
        let window = samples_of(
            10_000.0,
            200.0,
            &[0.210, 0.200, 0.230, 0.220, 0.205, 0.215, 0.225],
        );
        let j = judged(Window::FirstHour, &baseline, &window);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        // The same window against eight tight baseline means is a slowdown.
        let tight = samples_of(
            0.0,
            200.0,
            &[0.100, 0.110, 0.092, 0.104, 0.098, 0.107, 0.095, 0.101],
        );
        let j = judged(Window::FirstHour, &tight, &window);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
    }

    /// Eight baseline samples of an update at about 0.06 ms a call, the first of which met a
    /// lock wait (10.4 ms a call).
    fn contended_baseline() -> Vec<Sample> {
        [
            (9.0, 10.3888),
            (8.0, 0.0619),
            (3.0, 0.0707),
            (10.0, 0.0584),
            (5.0, 0.0602),
            (9.0, 0.0642),
            (8.0, 0.0537),
            (8.0, 0.0548),
        ]
        .iter()
        .enumerate()
        .map(|(i, (calls, ms))| sample_calls(60.0 * i as f64, *calls, *ms))
        .collect()
    }

    #[test]
    fn one_slow_sample_of_a_fast_statement_is_not_a_regression() {
        // A 0.03 ms update, tight in eight baseline samples; in the window one sample's calls
        // met a descheduled backend (x15). Its pooled time per call rises from 0.030 to
        // 0.100 ms and costs 0.12 ms a second, but only one sample moved: the rule before
        // gave a sequential p of 2e-18 from that one sample. A steady x3 in every sample is flagged.
        let mut rng = Lcg(5);
        let mut jitter = move || 1.0 + 0.04 * (rng.next() - 0.5);
        let baseline: Vec<Sample> = (0..8)
            .map(|i| sample_calls(60.0 * i as f64, 100.0, 0.03 * jitter()))
            .collect();
        let heavy: Vec<Sample> = (0..6)
            .map(|i| {
                let slow = if i == 2 { 15.0 } else { 1.0 };
                sample_calls(10_000.0 + 60.0 * i as f64, 100.0, 0.03 * slow * jitter())
            })
            .collect();
        let j = judged(Window::FirstWeek, &baseline, &heavy);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        let steady: Vec<Sample> = (0..6)
            .map(|i| sample_calls(10_000.0 + 60.0 * i as f64, 100.0, 0.09 * jitter()))
            .collect();
        let j = judged(Window::FirstWeek, &baseline, &steady);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
    }

    #[test]
    fn a_slowdown_is_measured_against_what_the_whole_server_did() {
        // 40 queries; with more traffic the whole server is 10 % slower. Query "1" is 25 %
        // slower, 14 % beyond the server: within the margin, not flagged (the rule before
        // measured it from the baseline and saw 25 %, 15 points beyond the margin). Query "0"
        // is 65 % slower, 50 % beyond the server: flagged.
        let ids: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let mut rng = Lcg(11);
        let mut make = |at: f64, server: f64, first: f64, second: f64| {
            let queries: Vec<(&str, f64)> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let factor = match i {
                        0 => first,
                        1 => second,
                        _ => server,
                    };
                    (
                        id.as_str(),
                        3.0 * factor * (1.0 + 0.04 * (rng.next() - 0.5)),
                    )
                })
                .collect();
            sample(at, &queries)
        };
        let baseline: Vec<Sample> = (0..40)
            .map(|i| make(60.0 * i as f64, 1.0, 1.0, 1.0))
            .collect();
        let busier: Vec<Sample> = (0..12)
            .map(|i| make(10_000.0 + 60.0 * i as f64, 1.1, 1.65, 1.25))
            .collect();
        let j = judged(Window::FirstHour, &baseline, &busier);
        assert_only(&j.regressions, Signal::QueryLatency, "query 0");
        let e = &j.regressions[0].evidence;
        let server = e["server_wide_ratio"].as_f64().unwrap_or(0.0);
        assert!((server - 1.1).abs() < 0.01, "{server}");
        // The rank test is in the evidence, exact for these few samples.
        assert_eq!(e["mann_whitney_exact"], true);
        assert!(
            e["mann_whitney_p_value"].as_f64().unwrap_or(1.0) < 0.01,
            "{e:?}"
        );
    }

    /// A sample whose queries have the given mean times (ms per call) and calls.
    fn sample_with_calls(at: f64, queries: &[(String, f64, f64)]) -> Sample {
        let mut s = sample(at, &[]);
        s.statements = Some(
            queries
                .iter()
                .map(|(id, mean, calls)| {
                    (
                        id.clone(),
                        StatementDelta {
                            calls: *calls,
                            total_ms: mean * calls,
                            rows: *calls,
                            query: format!("SELECT {id}"),
                        },
                    )
                })
                .collect(),
        );
        s
    }

    /// 200 queries: "0" takes half of the database time (2,000 calls of 2 ms a sample), the
    /// other 199 20 calls of 1 ms each; `slower` is made `factor` times slower in the window.
    fn busy_and_quiet(slower: &str, factor: f64) -> (Vec<Sample>, Vec<Sample>) {
        let make = |at: f64, after: bool| {
            let queries: Vec<(String, f64, f64)> = (0..200)
                .map(|i| {
                    let id = i.to_string();
                    let (mean, calls) = if i == 0 { (2.0, 2000.0) } else { (1.0, 20.0) };
                    let f = if after && id == slower { factor } else { 1.0 };
                    (id, mean * f, calls)
                })
                .collect();
            sample_with_calls(at, &queries)
        };
        let baseline = (0..60).map(|i| make(60.0 * i as f64, false)).collect();
        let window = (0..6)
            .map(|i| make(10_000.0 + 60.0 * i as f64, true))
            .collect();
        (baseline, window)
    }

    /// Benjamini–Hochberg weighted by the baseline's database time: among 200 queries, a query
    /// that takes half of the database time gets about 50 times the level of one that takes
    /// almost none, so the same +22 % over 6 samples (sequential p about 1.2e-4: a lone
    /// discovery among 200 equally weighted queries needs 5e-5) is flagged for the busy query
    /// and not for a quiet one.
    #[test]
    fn a_slowdown_of_a_query_that_costs_the_database_time_is_found_sooner() {
        let (baseline, window) = busy_and_quiet("0", 1.22);
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::QueryLatency, "query 0");
        let e = &j.regressions[0].evidence;
        let p = e["sequential_p_value"].as_f64().unwrap_or(1.0);
        let q = e["q_value"].as_f64().unwrap_or(1.0);
        assert!(p > 0.01 / 200.0 && p < 0.01 / 50.0, "{e:?}");
        assert!(q <= 0.01 && q < p * 200.0, "{e:?}");
        // The same slowdown of a query that takes a quarter of a percent of the time.
        let (baseline, window) = busy_and_quiet("7", 1.22);
        let j = judged(Window::FirstHour, &baseline, &window);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        assert!(time_weights(&[]).is_empty());
        let w = time_weights(&[4000.0, 20.0, 20.0, 0.0, f64::NAN]);
        assert!((w.iter().sum::<f64>() - 5.0).abs() < 1e-9, "{w:?}");
        assert!(w[0] > 2.9 && w[3] == 0.5 && w[4] == 0.5, "{w:?}");
        assert_eq!(time_weights(&[0.0, 0.0]), vec![1.0, 1.0]);
    }

    /// A statement called 40 times a sample, then a quiet hour with a quarter of the traffic:
    /// each per-sample mean now averages 10 calls, so single calls' spread moves it twice as
    /// much (`spread` 0.2 instead of 0.1 on the log), and the window wanders +30 % over 12
    /// samples. Against the baseline's variance alone that is p about 10⁻⁵; with the window's
    /// variance scaled for its calls it is noise. `factor` multiplies the window's times;
    /// eight steady statements keep the server-wide change at none.
    fn quiet_hour(calls_w: f64, spread_w: f64, factor: f64) -> Judgement {
        let mut rng = Lcg(17);
        let mut make = |at: f64, calls: f64, spread: f64, factor: f64| {
            let z = (rng.next() - 0.5) * 12f64.sqrt();
            let mut queries = vec![("1".to_string(), 10.0 * factor * (spread * z).exp(), calls)];
            queries.extend((2..10).map(|i| (i.to_string(), 1.0, calls)));
            sample_with_calls(at, &queries)
        };
        let baseline: Vec<Sample> = (0..60)
            .map(|i| make(60.0 * i as f64, 40.0, 0.1, 1.0))
            .collect();
        let window: Vec<Sample> = (0..12)
            .map(|i| make(10_000.0 + 60.0 * i as f64, calls_w, spread_w, factor))
            .collect();
        judged(Window::FirstHour, &baseline, &window)
    }

    #[test]
    fn a_quiet_hours_noisier_means_are_not_a_slowdown() {
        let j = quiet_hour(10.0, 0.2, 1.25);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        // The same values with the baseline's calls behind each mean are a slowdown: only the
        // calls tell the two apart.
        let j = quiet_hour(40.0, 0.2, 1.25);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
        // And a quiet hour still shows a statement twice as slow.
        let j = quiet_hour(10.0, 0.2, 2.0);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
    }

    /// Hundreds of unchanged queries looked at after every sample: without a sequential test
    /// and false-discovery control some of them come out by chance at some look.
    #[test]
    fn hundreds_of_unchanged_queries_looked_at_again_and_again_raise_nothing() {
        let ids: Vec<String> = (0..200).map(|i| i.to_string()).collect();
        let mut rng = Lcg(5);
        let mut drift = vec![0.0f64; ids.len()];
        let mut next = move |drift: &mut Vec<f64>| -> Vec<f64> {
            drift
                .iter_mut()
                .map(|d| {
                    *d = 0.6 * *d + 0.2 * (rng.next() - 0.5);
                    d.exp()
                })
                .collect()
        };
        let make = |at: f64, factors: Vec<f64>| {
            let queries: Vec<(&str, f64)> = ids
                .iter()
                .zip(factors)
                .map(|(id, f)| (id.as_str(), (1.0 + id.len() as f64) * f))
                .collect();
            sample(at, &queries)
        };
        nothing_at_any_look("", |at| make(at, next(&mut drift)));
    }

    /// Judges 40 first-day looks, one more sample each, against 60 baseline samples, all made
    /// by `make` from their time, and asserts that none raises a regression.
    fn nothing_at_any_look(context: &str, mut make: impl FnMut(f64) -> Sample) {
        let baseline: Vec<Sample> = (0..60).map(|i| make(60.0 * i as f64)).collect();
        let mut window = Vec::new();
        for i in 0..40 {
            window.push(make(10_000.0 + 60.0 * i as f64));
            let j = judged(Window::FirstDay, &baseline, &window);
            assert!(
                j.regressions.is_empty(),
                "{context}look {i}: {:?}",
                signals(&j.regressions)
            );
        }
    }

    /// The weights give a busy query more of the level, never more than the level in all: a
    /// query that takes half of the database time, unchanged but drifting like the other 199,
    /// is not flagged at any of 40 looks, whatever the noise.
    #[test]
    fn a_busy_unchanged_query_among_hundreds_raises_nothing() {
        for seed in [3, 5, 8, 13] {
            let mut rng = Lcg(seed);
            let mut drift = vec![0.0f64; 200];
            let make = |at: f64| {
                let queries: Vec<(String, f64, f64)> = drift
                    .iter_mut()
                    .enumerate()
                    .map(|(i, d)| {
                        *d = 0.6 * *d + 0.2 * (rng.next() - 0.5);
                        let (mean, calls) = if i == 0 { (2.0, 2000.0) } else { (1.0, 20.0) };
                        (i.to_string(), mean * d.exp(), calls)
                    })
                    .collect();
                sample_with_calls(at, &queries)
            };
            nothing_at_any_look(&format!("seed {seed}, "), make);
        }
    }

    /// Lock waits that hit a third of the samples leave the median per-sample mean where it
    /// was; the pooled time per call and the extra database time show them.
    #[test]
    fn intermittent_lock_waits_are_flagged_by_pooled_time() {
        let mut rng = Lcg(21);
        let baseline = series(0.0, 30, |_| vec![("1", 1.0 + 0.1 * (rng.next() - 0.5))]);
        let mut rng = Lcg(22);
        let window = series(10_000.0, 12, |i| {
            let wait = if i % 3 == 0 { 20.0 } else { 1.0 };
            vec![("1", wait * (1.0 + 0.1 * (rng.next() - 0.5)))]
        });
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::QueryLatency, "query 1");
        let e = &j.regressions[0].evidence;
        let pooled = e["window_ms_per_call"].as_f64().unwrap_or(0.0);
        assert!(pooled > 5.0, "{e:?}");
        assert!(
            e["extra_db_ms_per_second"].as_f64().unwrap_or(0.0) > 2.0,
            "{e:?}"
        );
    }

    /// A restart's cold cache makes every query slower for a while; those samples are left out.
    #[test]
    fn a_restart_cold_cache_is_not_the_deployments_doing() {
        let baseline = series(0.0, 30, |i| vec![("1", 1.0 + 0.01 * (i % 3) as f64)]);
        let mut window = series(10_000.0, 16, |i| {
            let cold = if i < 8 { 4.0 } else { 1.0 };
            vec![("1", cold * (1.0 + 0.01 * (i % 3) as f64))]
        });
        window[0]
            .resets
            .push(crate::analysis::sample::SERVER_RESTART.into());
        for n in 1..=window.len() {
            let j = judged(Window::FirstHour, &baseline, &window[..n]);
            assert!(j.regressions.is_empty(), "{n}: {:?}", j.regressions);
        }
        // Without the restart mark, the same times are a regression.
        window[0].resets.clear();
        let j = judged(Window::FirstHour, &baseline, &window);
        assert!(!j.regressions.is_empty());
    }

    fn with_traffic(s: Sample, transactions: f64, lookup_scans: f64) -> Sample {
        with_traffic_reading(s, transactions, lookup_scans, 31.0)
    }

    /// `transactions` in the sample and `scans` sequential scans of `rows_per_scan` rows each.
    fn with_traffic_reading(
        mut s: Sample,
        transactions: f64,
        scans: f64,
        rows_per_scan: f64,
    ) -> Sample {
        s.database = Some(DbCounters {
            xact_commit: transactions,
            xact_rollback: transactions * 0.002,
            ..DbCounters::default()
        });
        with_table(s, scans, scans * rows_per_scan)
    }

    #[test]
    fn sequential_scans_are_counted_per_transaction() {
        // A lookup table scanned once per transaction: twice the traffic, twice the scans.
        let baseline: Vec<Sample> = series_with(0.0, 30, |s| with_traffic(s, 1000.0, 1000.0));
        let doubled: Vec<Sample> = series_with(10_000.0, 10, |s| with_traffic(s, 2000.0, 2000.0));
        let j = judged(Window::FirstDay, &baseline, &doubled);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        assert!(j.inconclusive.is_empty());
        // A table of 4,000 rows scanned once per transaction, then twice at the same traffic:
        // a lost index, 33,000 more rows read a second.
        let baseline: Vec<Sample> =
            series_with(0.0, 30, |s| with_traffic_reading(s, 1000.0, 1000.0, 4000.0));
        let lost: Vec<Sample> = series_with(10_000.0, 10, |s| {
            with_traffic_reading(s, 1000.0, 2000.0, 4000.0)
        });
        let j = judged(Window::FirstHour, &baseline, &lost);
        assert_only(&j.regressions, Signal::SeqScans, "public.submissions");
        let e = &j.regressions[0].evidence;
        let per_transaction = e["window_seq_scans_per_transaction"]
            .as_f64()
            .unwrap_or(0.0);
        assert!((per_transaction - 2.0).abs() < 0.01, "{e:?}");
    }

    /// One-second samples of `transactions` and `scans` sequential scans of `rows` rows each.
    fn per_second(start: f64, n: usize, transactions: f64, scans: f64, rows: f64) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                let s = Sample {
                    at: start + i as f64,
                    seconds: 1.0,
                    ..Sample::default()
                };
                with_traffic_reading(s, transactions, scans, rows)
            })
            .collect()
    }

    #[test]
    fn a_small_table_scanned_twice_as_often_is_not_material() {
        // A 200-row table read 10 times a second by sequential scans, then 20 times at the same
        // traffic (the planner chose a sequential scan once an ANALYZE saw how small it is):
        // significant, but 2,000 more rows a second cost the server nothing worth a page.
        let baseline = per_second(0.0, 8, 150.0, 10.0, 200.0);
        let window = per_second(100.0, 12, 150.0, 20.0, 200.0);
        let j = judged(Window::FirstDay, &baseline, &window);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
    }

    #[test]
    fn a_lost_index_on_a_table_of_a_few_hundred_rows_under_a_hot_query_is_flagged() {
        // 40 queries a second that used the index now each read the table's 400 rows.
        let baseline = per_second(0.0, 8, 45.0, 0.5, 400.0);
        let window = per_second(100.0, 6, 45.0, 40.0, 400.0);
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::SeqScans, "public.submissions");
        let extra = j.regressions[0].evidence["extra_rows_read_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        assert!((extra - 15_800.0).abs() < 1.0, "{extra}");
    }

    #[test]
    fn a_sharp_traffic_change_leaves_rates_unjudged_and_says_why() {
        let baseline: Vec<Sample> = series_with(0.0, 30, |s| with_traffic(s, 1000.0, 1000.0));
        let quiet: Vec<Sample> = series_with(10_000.0, 10, |s| with_traffic(s, 250.0, 2000.0));
        let j = judged(Window::FirstDay, &baseline, &quiet);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
        assert_eq!(j.inconclusive.len(), 1);
        assert!(j.inconclusive[0].contains("0.25x"), "{:?}", j.inconclusive);
    }

    #[test]
    fn failures_state_the_applications_share_and_the_statements_that_stopped_completing() {
        let baseline = series(0.0, 30, |_| vec![("1", 1.0), ("2", 1.0)]);
        let mut window = series(10_000.0, 6, |_| vec![("1", 1.0), ("2", 1.0)]);
        for s in &mut window {
            s.database = Some(DbCounters {
                xact_commit: 860.0,
                xact_rollback: 145.0,
                ..DbCounters::default()
            });
            // Statement 2 fails in 14 % of the transactions: 14 % fewer completed calls.
            if let Some(statements) = s.statements.as_mut() {
                if let Some(two) = statements.get_mut("2") {
                    two.calls = 17.2;
                    two.total_ms = 17.2;
                }
            }
        }
        let j = judged(Window::FirstDay, &baseline, &window);
        let f = j
            .regressions
            .iter()
            .find(|f| f.signal == Signal::RollbackRatio)
            .expect("flagged");
        assert!(
            f.message
                .contains("application failure share 0.5 % -> 14.4 %"),
            "{}",
            f.message
        );
        let named = f.evidence["statements_completing_less_often"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(named.len(), 1, "{named:?}");
        assert!(
            named[0].as_str().unwrap_or("").contains("SELECT 2"),
            "{named:?}"
        );
    }

    #[test]
    fn a_faster_query_is_an_improvement() {
        let baseline = series(0.0, 8, |i| vec![("1", 1.0 + 0.01 * i as f64)]);
        let window = series(1000.0, 8, |i| vec![("1", 0.6 + 0.01 * i as f64)]);
        let j = judged(Window::FirstDay, &baseline, &window);
        assert!(j.regressions.is_empty());
        assert_only(&j.improvements, Signal::QueryLatency, "query 1");
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
        let j = judged(Window::FirstDay, &baseline, &window);
        assert!(j.regressions.is_empty(), "{:?}", j.regressions);
    }

    #[test]
    fn too_few_samples_are_never_judged() {
        let baseline = series(0.0, 2, |_| vec![("1", 1.0)]);
        let window = series(1000.0, 8, |_| vec![("1", 10.0)]);
        assert!(judged(Window::FirstHour, &baseline, &window)
            .regressions
            .is_empty());
    }

    #[test]
    fn reset_samples_are_ignored() {
        let baseline = series(0.0, 8, |_| vec![("1", 1.0)]);
        let mut window = series(1000.0, 8, |_| vec![("1", 1.0)]);
        for s in &mut window {
            s.statements = None;
            s.database = None;
        }
        let j = judged(Window::FirstHour, &baseline, &window);
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
        let baseline: Vec<Sample> = series_with(0.0, 5, |s| {
            with_check(s, "orphans", "integrity", "pass", 0.0)
        });
        let window: Vec<Sample> = series_with(1000.0, 3, |s| {
            with_check(s, "orphans", "integrity", "fail", 5.0)
        });
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::CheckFailure, "orphans");
        // A check that already failed before the deployment is not a regression of it.
        let failing: Vec<Sample> = series_with(0.0, 5, |s| {
            with_check(s, "orphans", "integrity", "fail", 5.0)
        });
        assert!(judged(Window::FirstHour, &failing, &window)
            .regressions
            .is_empty());
        // Info checks do not count.
        let info: Vec<Sample> = window
            .iter()
            .cloned()
            .map(|s| with_check(s, "orphans", "performance", "fail", 5.0))
            .collect();
        assert!(judged(Window::FirstHour, &baseline, &info)
            .regressions
            .is_empty());
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
        let j = judged(Window::FirstHour, &baseline, &window);
        let found: BTreeSet<Signal> = j.regressions.iter().map(|f| f.signal).collect();
        assert_eq!(
            found,
            BTreeSet::from([
                Signal::RollbackRatio,
                Signal::Deadlocks,
                Signal::Connections
            ])
        );
        let same = judged(Window::FirstHour, &baseline, &baseline);
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
        assert!(judged(Window::FirstDay, &baseline, &window)
            .regressions
            .is_empty());
    }

    #[test]
    fn more_sequential_scans_on_a_table_are_flagged() {
        let baseline: Vec<Sample> = series_with(0.0, 5, |s| with_table(s, 1.0, 100.0));
        let window: Vec<Sample> = series_with(1000.0, 5, |s| with_table(s, 600.0, 6e6));
        let j = judged(Window::FirstDay, &baseline, &window);
        assert_only(&j.regressions, Signal::SeqScans, "public.submissions");
        assert!(judged(Window::FirstDay, &baseline, &baseline)
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
        let baseline: Vec<Sample> = series_with(0.0, 5, |s| with_index(s, "public.old", 3.0));
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
        let open = judged(Window::FirstDay, &baseline, &since);
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
        assert_only(
            &closed.regressions,
            Signal::UnusedIndex,
            "public.idx_new_true",
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
        assert!(judged(Window::FirstDay, &baseline, &window)
            .regressions
            .is_empty());
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
        let j = judged(Window::FirstDay, &baseline, &window);
        assert_only(&j.regressions, Signal::DbGrowth, "database size");
    }

    #[test]
    fn first_week_judges_query_latency_and_integrity() {
        let baseline: Vec<Sample> = series(0.0, 6, |i| vec![("1", 1.0 + 0.01 * i as f64)])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "pass", 0.0))
            .collect();
        let window: Vec<Sample> = series(1000.0, 6, |i| vec![("1", 1.5 + 0.01 * i as f64)])
            .into_iter()
            .map(|s| with_check(s, "orphans", "integrity", "fail", 2.0))
            .collect();
        let j = judged(Window::FirstWeek, &baseline, &window);
        let found: BTreeSet<Signal> = j.regressions.iter().map(|f| f.signal).collect();
        // The integrity check passed throughout the baseline: a check failure, reported once.
        assert_eq!(
            found,
            BTreeSet::from([Signal::QueryLatency, Signal::CheckFailure])
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
        let baseline: Vec<Sample> = series_with(0.0, 6, |s| {
            with_check(s, "orphans", "integrity", "pass", 0.0)
        });
        let broken: Vec<Sample> = series_with(1000.0, 6, |s| {
            with_check(s, "orphans", "integrity", "fail", 4.0)
        });
        let mut failing_transactions = series(1000.0, 6, |_| vec![]);
        for s in &mut failing_transactions {
            s.database = Some(DbCounters {
                xact_commit: 860.0,
                xact_rollback: 140.0,
                ..DbCounters::default()
            });
        }
        for window in [Window::FirstHour, Window::FirstDay, Window::FirstWeek] {
            let j = judged(window, &baseline, &broken);
            let found: Vec<(Signal, String)> = signals(&j.regressions);
            assert_eq!(
                found,
                vec![(Signal::CheckFailure, "orphans".to_string())],
                "{window:?}"
            );
            let j = judged(window, &baseline, &failing_transactions);
            assert!(
                j.regressions
                    .iter()
                    .any(|f| f.signal == Signal::RollbackRatio),
                "{window:?}: {:?}",
                j.regressions
            );
        }
    }

    /// Samples where statement `id` runs `calls` times at `ms` per call beside the baseline's
    /// queries; `None` leaves it out of that sample.
    fn with_new(
        start: f64,
        n: usize,
        old: &[(&'static str, f64)],
        new: impl Fn(usize) -> Option<(&'static str, f64, f64)>,
    ) -> Vec<Sample> {
        let mut rng = Lcg(5);
        (0..n)
            .map(|i| {
                let mut s = sample(
                    start + 60.0 * i as f64,
                    &old.iter()
                        .map(|(id, ms)| (*id, ms * (1.0 + 0.1 * (rng.next() - 0.5))))
                        .collect::<Vec<_>>(),
                );
                if let (Some((id, calls, ms)), Some(statements)) = (new(i), s.statements.as_mut()) {
                    statements.insert(
                        id.to_string(),
                        StatementDelta {
                            calls,
                            total_ms: calls * ms * (1.0 + 0.1 * (rng.next() - 0.5)),
                            rows: calls,
                            query: format!("SELECT {id} FROM new_feature"),
                        },
                    );
                }
                s
            })
            .collect()
    }

    fn assert_no_new_statement_flagged(kind: Window, baseline: &[Sample], window: &[Sample]) {
        let j = judged(kind, baseline, window);
        assert!(new_statement_findings(&j).is_empty(), "{j:?}");
    }

    fn new_statement_findings(j: &Judgement) -> Vec<&Finding> {
        j.regressions
            .iter()
            .filter(|f| f.signal == Signal::NewStatement)
            .collect()
    }

    #[test]
    fn a_new_statement_taking_a_material_share_of_database_time_is_flagged_with_its_text() {
        let old = [("1", 1.0), ("2", 2.0)];
        let baseline = with_new(0.0, 10, &old, |_| None);
        // 20 calls of 50 ms a minute: 16.7 ms of database time a second, 94 % of it.
        let window = with_new(1000.0, 8, &old, |_| Some(("9", 20.0, 50.0)));
        let j = judged(Window::FirstHour, &baseline, &window);
        assert_only(&j.regressions, Signal::NewStatement, "query 9");
        let f = &j.regressions[0];
        assert!(
            f.message.contains("SELECT 9 FROM new_feature"),
            "{}",
            f.message
        );
        assert_eq!(f.evidence["query"], "SELECT 9 FROM new_feature");
        assert_eq!(f.evidence["criterion"], "database time");
        assert_eq!(f.evidence["window_calls"].as_f64(), Some(160.0));
        let per_second = f.evidence["db_ms_per_second"].as_f64().unwrap_or(0.0);
        assert!((15.0..18.5).contains(&per_second), "{f:?}");
        let share = f.evidence["share_of_statement_time"]
            .as_f64()
            .unwrap_or(0.0);
        assert!((0.9..0.97).contains(&share), "{f:?}");
        let mean = f.evidence["window_ms_per_call"].as_f64().unwrap_or(0.0);
        assert!((47.0..53.0).contains(&mean), "{f:?}");
        assert!(
            f.evidence["q_value"].as_f64().unwrap_or(1.0) <= 0.01,
            "{f:?}"
        );
        assert_eq!(f.evidence["new_statements_tested"].as_f64(), Some(1.0));
    }

    #[test]
    fn a_cheap_new_statement_is_not_flagged() {
        // A busy database: 20 calls of 50 ms and of 80 ms a minute (about 43 ms a second).
        let busy = [("1", 50.0), ("2", 80.0)];
        let baseline = with_new(0.0, 10, &busy, |_| None);
        // A new lookup: 20 calls of 0.13 ms a minute, 0.1 % of the database's time.
        let window = with_new(1000.0, 30, &busy, |_| Some(("9", 20.0, 0.13)));
        assert_no_new_statement_flagged(Window::FirstDay, &baseline, &window);
        // An idle database: the new statement is most of its time, but 0.3 ms a second is not
        // a load.
        let idle = [("1", 0.01)];
        let baseline = with_new(0.0, 10, &idle, |_| None);
        let window = with_new(1000.0, 30, &idle, |_| Some(("9", 20.0, 1.0)));
        assert_no_new_statement_flagged(Window::FirstDay, &baseline, &window);
        // 5 % of the database's time, but 2.3 ms a second: under the floor, not flagged.
        let baseline = with_new(0.0, 10, &busy, |_| None);
        let window = with_new(1000.0, 30, &busy, |_| Some(("9", 20.0, 7.0)));
        assert_no_new_statement_flagged(Window::FirstDay, &baseline, &window);
    }

    #[test]
    fn a_slow_new_statement_is_flagged_on_its_time_per_call() {
        // A database so busy that the new statement is a small share of its time.
        let busy = [("1", 20_000.0)];
        let baseline = with_new(0.0, 10, &busy, |_| None);
        let window = with_new(1000.0, 8, &busy, |_| Some(("9", 5.0, 900.0)));
        let j = judged(Window::FirstHour, &baseline, &window);
        let found = new_statement_findings(&j);
        assert_eq!(found.len(), 1, "{j:?}");
        assert_eq!(found[0].evidence["criterion"], "time per call");
        assert!(
            found[0].evidence["share_of_statement_time"]
                .as_f64()
                .unwrap_or(1.0)
                < 0.05
        );
        // Below the floor per call, the same statement is not flagged.
        let window = with_new(1000.0, 8, &busy, |_| Some(("9", 5.0, 300.0)));
        assert_no_new_statement_flagged(Window::FirstHour, &baseline, &window);
    }

    #[test]
    fn a_new_statement_is_judged_only_once_it_ran_in_enough_samples() {
        let old = [("1", 1.0)];
        let baseline = with_new(0.0, 10, &old, |_| None);
        // The migration's own statement: once, for seconds.
        let once = with_new(1000.0, 20, &old, |i| (i == 0).then_some(("9", 1.0, 8000.0)));
        assert_no_new_statement_flagged(Window::FirstHour, &baseline, &once);
        // An expensive new statement seen in fewer than `latency_min_window_samples` samples.
        let early = with_new(1000.0, 5, &old, |_| Some(("9", 20.0, 50.0)));
        assert_no_new_statement_flagged(Window::FirstHour, &baseline, &early);
        let later = with_new(1000.0, 6, &old, |_| Some(("9", 20.0, 50.0)));
        let j = judged(Window::FirstHour, &baseline, &later);
        assert_eq!(new_statement_findings(&j).len(), 1, "{j:?}");
    }

    #[test]
    fn a_statement_the_baseline_saw_is_not_new() {
        let old = [("1", 1.0)];
        // Statement 9 ran once in the baseline, cheaply.
        let baseline = with_new(0.0, 10, &old, |i| (i == 3).then_some(("9", 1.0, 0.5)));
        let window = with_new(1000.0, 8, &old, |_| Some(("9", 20.0, 50.0)));
        assert_no_new_statement_flagged(Window::FirstHour, &baseline, &window);
        // Known to the baseline but not followed (a window's following lists it as known).
        let known = BTreeSet::from(["1".to_string(), "9".to_string()]);
        let mut window_summary = Summary::new(
            5,
            crate::analysis::summary::Following::Chosen {
                followed: BTreeSet::from(["1".to_string()]),
                known,
                new_statements: 50,
            },
        );
        for s in &window {
            window_summary.add(s);
        }
        assert!(!window_summary.statements.contains_key("9"));
        // Without statement statistics in the baseline, nothing can be called new.
        let mut blind = baseline.clone();
        for s in &mut blind {
            s.statements = None;
        }
        let fresh = with_new(1000.0, 8, &old, |_| Some(("7", 20.0, 50.0)));
        assert_no_new_statement_flagged(Window::FirstHour, &blind, &fresh);
    }

    #[test]
    fn new_statements_are_adjusted_for_how_many_were_tested() {
        // One expensive new statement among forty: its p-value goes through Benjamini–Hochberg
        // across all forty tested, and its evidence says so.
        let old = [("1", 1.0)];
        let baseline = with_new(0.0, 10, &old, |_| None);
        let mut window = with_new(1000.0, 8, &old, |_| Some(("9", 20.0, 50.0)));
        for s in &mut window {
            if let Some(statements) = s.statements.as_mut() {
                for i in 0..39 {
                    statements.insert(
                        format!("n{i}"),
                        StatementDelta {
                            calls: 20.0,
                            total_ms: 1.0,
                            rows: 20.0,
                            query: format!("SELECT n{i}"),
                        },
                    );
                }
            }
        }
        let j = judged(Window::FirstHour, &baseline, &window);
        let found = new_statement_findings(&j);
        assert_eq!(found.len(), 1, "{j:?}");
        let e = &found[0].evidence;
        assert_eq!(e["new_statements_tested"].as_f64(), Some(40.0));
        let (p, q) = (
            e["sequential_p_value"].as_f64().unwrap_or(1.0),
            e["q_value"].as_f64().unwrap_or(0.0),
        );
        assert!(
            p > 0.0 && (q - 40.0 * p).abs() <= 1e-9 * q.max(1e-300),
            "p {p}, q {q}"
        );
    }
}

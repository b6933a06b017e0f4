//! The judging of one deployment, as a function: its record, the baseline's summary, the
//! windows' summaries, the verdicts already recorded and "now" in; the view readers see and
//! the verdicts of windows that have just closed out. Pure: the tracker feeds the summaries
//! one sample at a time and stores what comes out.

use std::collections::{BTreeMap, BTreeSet};

use crate::analysis::deployment::{
    latch, DeploymentRecord, DeploymentView, Finding, Signal, VerdictRecord, WindowView,
};
use crate::analysis::regression::{self, Thresholds};
use crate::analysis::sample::Sample;
use crate::analysis::summary::{Following, Summary};
use crate::analysis::window::{self, Verdict, Window, WindowDurations};
use crate::time::{rfc3339, Timestamp};

/// How many of the baseline's statements (by total time) are followed in detail.
pub(crate) const FOLLOWED_STATEMENTS: usize = 500;
/// How many statements the baseline never saw are followed in detail per window.
pub(crate) const NEW_STATEMENTS: usize = 50;

/// What judging needs from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub durations: WindowDurations,
    pub thresholds: Thresholds,
    pub min_baseline_samples: usize,
    pub min_window_samples: usize,
}

impl Default for Settings {
    /// The shipped defaults (the configuration reference in README.md).
    fn default() -> Self {
        let thresholds = Thresholds::default();
        Settings {
            durations: WindowDurations::default(),
            thresholds,
            min_baseline_samples: 5,
            min_window_samples: thresholds.min_samples,
        }
    }
}

/// The windows the rules judge, in order.
pub(crate) const JUDGED: [Window; 3] = [Window::FirstHour, Window::FirstDay, Window::FirstWeek];

/// The running summaries of one deployment: the baseline (made once) and each window's, fed
/// as samples arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct Summaries {
    pub(crate) deployment_id: i64,
    pub(crate) deployed_at: Timestamp,
    pub baseline: Summary,
    pub windows: BTreeMap<Window, Summary>,
    /// From the deployment to the end of the first day: new indexes and the statements on
    /// their tables (the unused-index notice).
    pub(crate) since: Summary,
    /// Samples up to this time have been added.
    pub(crate) through: Option<Timestamp>,
    /// The regressions each open window showed at the previous look, latched across looks
    /// (`deployment::latch`); the caller keeps them from one judging to the next.
    pub(crate) flags: BTreeMap<Window, Vec<Finding>>,
    /// The same span of the clock as `first_hour`, one day earlier, when the history holds it
    /// and no deployment came since (see [`same_time_yesterday`]): `first_hour` is judged
    /// against it as well, for the signals that follow the time of day.
    pub(crate) same_time_yesterday: Option<Summary>,
}

/// A day, in seconds: the period of the traffic cycle the time-of-day baseline follows.
pub(crate) const DAY_SECONDS: f64 = 86_400.0;

/// The span one day before `first_hour` (`[from, to)`), when the history allows it to serve as
/// a time-of-day baseline: it must end before the deployment and come after the previous
/// deployment (`previous`, its time), so the same version ran then as in the baseline.
pub(crate) fn same_time_yesterday(
    deployed_at: Timestamp,
    durations: &WindowDurations,
    previous: Option<Timestamp>,
) -> Option<(Timestamp, Timestamp)> {
    let from = deployed_at - DAY_SECONDS;
    let to = from + durations.first_hour.as_secs_f64();
    (to <= deployed_at && previous.is_none_or(|p| p < from)).then_some((from, to))
}

/// The signals whose level follows the time of day (traffic, latency under load): in
/// `first_hour` they are flagged only when the same hour of the day before agrees.
fn follows_time_of_day(signal: Signal) -> bool {
    matches!(
        signal,
        Signal::QueryLatency | Signal::SeqScans | Signal::RollbackRatio | Signal::Deadlocks
    )
}

/// Which baseline statements to follow: the `n` with the largest total time.
pub(crate) fn chosen_statements(totals: &BTreeMap<String, f64>, n: usize) -> BTreeSet<String> {
    let mut ranked: Vec<(&String, f64)> = totals.iter().map(|(id, t)| (id, *t)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    ranked
        .into_iter()
        .take(n)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Adds one sample's statement times to per-statement totals (the first look at a baseline).
pub fn add_totals(totals: &mut BTreeMap<String, f64>, sample: &Sample) {
    if let Some(statements) = &sample.statements {
        for (id, s) in statements {
            *totals.entry(id.clone()).or_insert(0.0) += s.total_ms;
        }
    }
}

/// The following of a baseline whose statements had `totals`.
pub fn baseline_following(totals: &BTreeMap<String, f64>) -> Following {
    Following::Chosen {
        followed: chosen_statements(totals, FOLLOWED_STATEMENTS),
        known: totals.keys().cloned().collect(),
        new_statements: 0,
    }
}

impl Summaries {
    /// Empty window summaries for a deployment whose baseline is summarised in `baseline`
    /// (made with `baseline_following(totals)`).
    pub fn new(
        record: &DeploymentRecord,
        baseline: Summary,
        totals: &BTreeMap<String, f64>,
        min_calls: u64,
    ) -> Summaries {
        let window_following = Following::Chosen {
            followed: chosen_statements(totals, FOLLOWED_STATEMENTS),
            known: totals.keys().cloned().collect(),
            new_statements: NEW_STATEMENTS,
        };
        Summaries {
            deployment_id: record.id,
            deployed_at: record.at,
            baseline,
            windows: JUDGED
                .into_iter()
                .map(|w| (w, Summary::new(min_calls, window_following.clone())))
                .collect(),
            since: Summary::new(min_calls, window_following.clone()),
            through: None,
            flags: BTreeMap::new(),
            same_time_yesterday: None,
        }
    }

    /// Adds a sample taken after the deployment to the window it falls in. A sample at or
    /// before `through` was added already and is ignored.
    pub fn add(&mut self, sample: &Sample, durations: &WindowDurations) {
        if sample.at < self.deployed_at || self.through.is_some_and(|t| sample.at <= t) {
            return;
        }
        self.through = Some(sample.at);
        for (window, summary) in self.windows.iter_mut() {
            let (start, end) = window::bounds(*window, self.deployed_at, durations);
            if sample.at >= start && end.is_none_or(|e| sample.at < e) {
                summary.add(sample);
            }
        }
        let (_, first_day_end) = window::bounds(Window::FirstDay, self.deployed_at, durations);
        if first_day_end.is_none_or(|e| sample.at < e) {
            self.since.add(sample);
        }
    }
}

/// Splits `regressions` (against the baseline) into those the judgement against the same
/// time of the day before (`yesterday`) agrees with, or that do not follow the time of day, and
/// those it does not. An agreed one carries `same_time_yesterday: true` in its evidence.
fn agree_with_same_time(
    regressions: Vec<Finding>,
    yesterday: &regression::Judgement,
) -> (Vec<Finding>, Vec<Finding>) {
    let mut agreed = Vec::new();
    let mut unexplained = Vec::new();
    for mut f in regressions {
        if !follows_time_of_day(f.signal) {
            agreed.push(f);
        } else if yesterday
            .regressions
            .iter()
            .any(|y| y.signal == f.signal && y.subject == f.subject)
        {
            f.evidence
                .insert("same_time_yesterday".into(), serde_json::Value::Bool(true));
            agreed.push(f);
        } else {
            unexplained.push(f);
        }
    }
    (agreed, unexplained)
}

/// The deployment as readers see it, and the verdicts of windows that closed by `now` and
/// are not recorded yet (the caller records them).
#[allow(clippy::too_many_arguments)]
pub fn judge(
    record: &DeploymentRecord,
    summaries: &Summaries,
    persisted: &[VerdictRecord],
    now: Timestamp,
    settings: &Settings,
    mut limitations: Vec<String>,
    rollbacks_seen: u64,
) -> (DeploymentView, Vec<VerdictRecord>) {
    let baseline = &summaries.baseline;
    let durations = settings.durations;
    let mut windows = Vec::new();
    let mut closed_now = Vec::new();
    for window in JUDGED {
        let (start, end) = window::bounds(window, record.at, &durations);
        if start > now {
            break;
        }
        if let Some(done) = persisted.iter().find(|v| v.window == window) {
            windows.push(WindowView {
                window,
                start: rfc3339(start),
                end: end.map(rfc3339),
                verdict: done.verdict,
                samples: done.samples,
                regressions: done.regressions.clone(),
                improvements: done.improvements.clone(),
            });
            continue;
        }
        let closed = end.is_some_and(|e| now >= e);
        let empty;
        let in_window = match summaries.windows.get(&window) {
            Some(summary) => summary,
            None => {
                empty = Summary::new(settings.thresholds.latency_min_calls, Following::None);
                &empty
            }
        };
        // Without enough baseline there is nothing to compare against: every signal is
        // inconclusive, and the window can only end so.
        let baseline_too_small = baseline.samples < settings.min_baseline_samples;
        let mut judgement = if baseline_too_small {
            regression::Judgement::default()
        } else {
            regression::judge_summaries(
                window,
                baseline,
                in_window,
                &summaries.since,
                closed,
                &settings.thresholds,
            )
        };
        // The first hour against the same hour of the day before as well: a rise that only
        // the time of day explains (the morning peak after a quiet baseline) is not flagged.
        let same_time = summaries
            .same_time_yesterday
            .as_ref()
            .filter(|s| s.samples >= settings.min_baseline_samples);
        if let (Window::FirstHour, Some(same_time), false) = (window, same_time, baseline_too_small)
        {
            let yesterday = regression::judge_summaries(
                window,
                same_time,
                in_window,
                &summaries.since,
                closed,
                &settings.thresholds,
            );
            let (agreed, unexplained) = agree_with_same_time(judgement.regressions, &yesterday);
            for f in &unexplained {
                limitations.push(format!(
                    "{}: {} {} is not flagged: no rise against the same hour of the day before",
                    window.as_str(),
                    f.signal.as_str(),
                    f.subject
                ));
            }
            judgement.regressions = agreed;
            // Traffic far from the recent baseline's but like that hour of the day before (a
            // deployment at the peak after a quiet night): the rates are judged against that
            // hour instead of being left unjudged.
            if !judgement.inconclusive.is_empty() && yesterday.inconclusive.is_empty() {
                judgement.inconclusive.clear();
                limitations.push(format!(
                    "{}: traffic changed sharply against the recent baseline but not against the same hour of the day before: sequential scans and deadlocks are judged against that hour",
                    window.as_str()
                ));
                for mut f in yesterday.regressions {
                    let rate = matches!(f.signal, Signal::SeqScans | Signal::Deadlocks);
                    if rate {
                        f.evidence
                            .insert("same_time_yesterday".into(), serde_json::Value::Bool(true));
                        judgement.regressions.push(f);
                    }
                }
            }
        }
        let judged_samples = if baseline_too_small {
            0
        } else {
            in_window.samples
        };
        // Flags are latched across looks: confirmed at the second consecutive look (or at
        // the close), resolved but kept when they go away.
        let previous_flags = summaries.flags.get(&window).cloned().unwrap_or_default();
        let regressions = latch(&previous_flags, judgement.regressions, now, closed);
        let confirmed = regressions.iter().filter(|f| f.was_confirmed()).count();
        let verdict = window::verdict(
            closed,
            confirmed,
            judged_samples,
            settings.min_window_samples,
        );
        // Signals that could not be judged (traffic changed sharply) leave a clean window
        // `inconclusive`, with the reason among the limitations.
        let verdict = if verdict == Verdict::Pass && !judgement.inconclusive.is_empty() {
            Verdict::Inconclusive
        } else {
            verdict
        };
        for reason in &judgement.inconclusive {
            limitations.push(format!("{}: {reason}", window.as_str()));
        }
        let view = WindowView {
            window,
            start: rfc3339(start),
            end: end.map(rfc3339),
            verdict,
            samples: in_window.samples,
            regressions,
            improvements: judgement.improvements,
        };
        if closed {
            closed_now.push(VerdictRecord {
                window,
                verdict,
                samples: view.samples,
                regressions: view.regressions.clone(),
                improvements: view.improvements.clone(),
                closed_at: now,
            });
        }
        windows.push(view);
    }
    if baseline.samples < settings.min_baseline_samples {
        limitations.push(format!(
            "only {} baseline sample(s) before the deployment (at least {} are needed to judge)",
            baseline.samples, settings.min_baseline_samples
        ));
    }
    let view = DeploymentView {
        id: record.id,
        target: record.target.clone(),
        kind: record.kind,
        from_version: record.from_version.clone(),
        to_version: record.to_version.clone(),
        detected_by: record.detection,
        at: record.at,
        at_text: rfc3339(record.at),
        note: record.note.clone(),
        current_window: window::window_at(record.at, now, &durations),
        baseline_samples: baseline.samples,
        windows,
        limitations,
        rollbacks_seen,
    };
    (view, closed_now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::deployment::Signal;
    use crate::analysis::sample::StatementDelta;
    use crate::analysis::window::Verdict;

    fn settings() -> Settings {
        Settings::default()
    }

    fn record() -> DeploymentRecord {
        DeploymentRecord::detected(1, Some("1"), "2", 100_000.0)
    }

    /// A minute sample in which statement "1" takes `ms` per call (plus a little wobble).
    fn sample(at: f64, ms: f64, i: usize) -> Sample {
        let mut statements = BTreeMap::new();
        statements.insert(
            "1".to_string(),
            StatementDelta {
                calls: 20.0,
                total_ms: 20.0 * ms * (1.0 + 0.01 * (i % 5) as f64),
                rows: 20.0,
                query: "SELECT * FROM submissions".into(),
            },
        );
        Sample::of_statements(at, 60.0, statements)
    }

    fn summaries(slower: f64, window_minutes: usize) -> Summaries {
        let d = record();
        let baseline: Vec<Sample> = (0..60)
            .map(|i| sample(d.at - 3600.0 + 60.0 * i as f64, 1.0, i))
            .collect();
        let mut totals = BTreeMap::new();
        for s in &baseline {
            add_totals(&mut totals, s);
        }
        let mut summary = Summary::new(5, baseline_following(&totals));
        for s in &baseline {
            summary.add(s);
        }
        let mut all = Summaries::new(&d, summary, &totals, 5);
        for i in 0..window_minutes {
            all.add(
                &sample(d.at + 30.0 + 60.0 * i as f64, slower, i),
                &settings().durations,
            );
        }
        all
    }

    #[test]
    fn a_slower_query_makes_the_open_first_hour_show_a_regression() {
        let d = record();
        let mut all = summaries(5.0, 20);
        let now = d.at + 20.0 * 60.0;
        let (first, _) = judge(&d, &all, &[], now - 60.0, &settings(), vec![], 0);
        assert_eq!(
            first.windows[0].verdict,
            Verdict::Watching,
            "a flag is confirmed at the second look"
        );
        all.flags = first
            .windows
            .iter()
            .map(|w| (w.window, w.regressions.clone()))
            .collect();
        let (view, closed) = judge(&d, &all, &[], now, &settings(), vec![], 0);
        assert!(closed.is_empty());
        assert_eq!(view.windows.len(), 1);
        assert_eq!(view.windows[0].verdict, Verdict::Regression);
        assert_eq!(view.windows[0].samples, 20);
        assert_eq!(view.baseline_samples, 60);
        let found = &view.windows[0].regressions;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].signal, Signal::QueryLatency);
        assert_eq!(found[0].evidence["query"], "SELECT * FROM submissions");
    }

    /// A summary of the hour one day before the deployment, statement "1" at `ms` per call.
    fn same_hour_yesterday(ms: f64) -> Summary {
        let d = record();
        let (from, to) = same_time_yesterday(d.at, &settings().durations, None)
            .unwrap_or((d.at - DAY_SECONDS, d.at - DAY_SECONDS + 3600.0));
        let mut summary = Summary::new(5, statement_one());
        let mut at = from;
        let mut i = 0;
        while at < to {
            summary.add(&sample(at, ms, i));
            at += 60.0;
            i += 1;
        }
        summary
    }

    /// The baseline's following: statement "1".
    fn statement_one() -> Following {
        let mut totals = BTreeMap::new();
        add_totals(&mut totals, &sample(0.0, 1.0, 0));
        baseline_following(&totals)
    }

    /// `all` judged at two consecutive looks 20 minutes into the first hour.
    fn first_hour_after_two_looks(mut all: Summaries) -> DeploymentView {
        let d = record();
        let now = d.at + 20.0 * 60.0;
        let (first, _) = judge(&d, &all, &[], now - 60.0, &settings(), vec![], 0);
        all.flags = first
            .windows
            .iter()
            .map(|w| (w.window, w.regressions.clone()))
            .collect();
        judge(&d, &all, &[], now, &settings(), vec![], 0).0
    }

    #[test]
    fn a_rise_the_same_hour_of_the_day_before_also_had_is_not_flagged() {
        // The baseline was a quiet hour at 1 ms; the deployment came at the daily peak, when
        // the query takes 1.6 ms, as it did at this hour the day before.
        let mut all = summaries(1.6, 20);
        let without = first_hour_after_two_looks(all.clone());
        assert_eq!(without.windows[0].verdict, Verdict::Regression);
        all.same_time_yesterday = Some(same_hour_yesterday(1.6));
        let with = first_hour_after_two_looks(all);
        assert_eq!(with.windows[0].verdict, Verdict::Watching, "{with:#?}");
        assert!(with.windows[0].regressions.is_empty(), "{with:#?}");
        assert!(
            with.limitations
                .iter()
                .any(|l| l.contains("query_latency query 1")
                    && l.contains("same hour of the day before")),
            "{:?}",
            with.limitations
        );
    }

    #[test]
    fn a_regression_against_both_baselines_is_flagged_and_says_so() {
        let mut all = summaries(5.0, 20);
        all.same_time_yesterday = Some(same_hour_yesterday(1.6));
        let view = first_hour_after_two_looks(all);
        assert_eq!(view.windows[0].verdict, Verdict::Regression);
        let found = &view.windows[0].regressions;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].evidence["same_time_yesterday"], true);
    }

    #[test]
    fn a_same_hour_with_too_few_samples_is_not_used() {
        let mut all = summaries(1.6, 20);
        let mut short = Summary::new(5, statement_one());
        short.add(&sample(record().at - DAY_SECONDS, 1.6, 0));
        all.same_time_yesterday = Some(short);
        let view = first_hour_after_two_looks(all);
        assert_eq!(view.windows[0].verdict, Verdict::Regression);
    }

    /// `s` with `transactions` application transactions.
    fn with_traffic(mut s: Sample, transactions: f64) -> Sample {
        s.database = Some(crate::analysis::sample::DbCounters {
            xact_commit: transactions,
            ..Default::default()
        });
        s
    }

    #[test]
    fn traffic_like_the_same_hour_of_the_day_before_is_judged_against_it() {
        // A quiet baseline (250 transactions a minute); the deployment at the daily peak
        // (1,000), as busy as that hour the day before: against the baseline the rates cannot
        // be compared, against the day before they can, and the window passes.
        let d = record();
        let quiet = |s: Sample| with_traffic(s, 250.0);
        let busy = |s: Sample| with_traffic(s, 1000.0);
        let baseline: Vec<Sample> = (0..60)
            .map(|i| quiet(sample(d.at - 3600.0 + 60.0 * i as f64, 1.0, i)))
            .collect();
        let mut summary = Summary::new(5, statement_one());
        for s in &baseline {
            summary.add(s);
        }
        let mut totals = BTreeMap::new();
        add_totals(&mut totals, &baseline[0]);
        let mut all = Summaries::new(&d, summary, &totals, 5);
        for i in 0..60 {
            all.add(
                &busy(sample(d.at + 30.0 + 60.0 * i as f64, 1.0, i)),
                &settings().durations,
            );
        }
        let closed_at = d.at + 3600.0 + 60.0;
        let (view, _) = judge(&d, &all, &[], closed_at, &settings(), vec![], 0);
        assert_eq!(view.windows[0].verdict, Verdict::Inconclusive);
        let mut yesterday = Summary::new(5, statement_one());
        for i in 0..60 {
            yesterday.add(&busy(sample(d.at - DAY_SECONDS + 60.0 * i as f64, 1.0, i)));
        }
        all.same_time_yesterday = Some(yesterday);
        let (view, _) = judge(&d, &all, &[], closed_at, &settings(), vec![], 0);
        assert_eq!(view.windows[0].verdict, Verdict::Pass, "{view:#?}");
        assert!(
            view.limitations
                .iter()
                .any(|l| l.contains("not against the same hour of the day before")),
            "{:?}",
            view.limitations
        );
    }

    #[test]
    fn the_same_hour_of_the_day_before_serves_only_without_a_deployment_since() {
        let d = record();
        let durations = settings().durations;
        let from = d.at - DAY_SECONDS;
        assert_eq!(
            same_time_yesterday(d.at, &durations, None),
            Some((from, from + 3600.0))
        );
        assert_eq!(
            same_time_yesterday(d.at, &durations, Some(from - 10.0)),
            Some((from, from + 3600.0))
        );
        // A deployment in the last day: the day before ran another version.
        assert_eq!(
            same_time_yesterday(d.at, &durations, Some(from + 10.0)),
            None
        );
        // A first_hour longer than a day leaves no span before the deployment.
        let long = WindowDurations {
            first_hour: std::time::Duration::from_secs(2 * 86_400),
            first_day: std::time::Duration::from_secs(3 * 86_400),
            first_week: std::time::Duration::from_secs(7 * 86_400),
        };
        assert_eq!(same_time_yesterday(d.at, &long, None), None);
    }

    #[test]
    fn a_window_closes_once_and_then_shows_what_was_recorded() {
        let d = record();
        let all = summaries(1.0, 70);
        let now = d.at + 3600.0 + 60.0 * 10.0;
        let (view, closed) = judge(&d, &all, &[], now, &settings(), vec![], 0);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].window, Window::FirstHour);
        assert_eq!(closed[0].verdict, Verdict::Pass);
        assert_eq!(closed[0].samples, 60);
        assert_eq!(view.windows.len(), 2);
        assert_eq!(view.windows[1].samples, 10);
        let (again, none) = judge(&d, &all, &closed, now + 60.0, &settings(), vec![], 0);
        assert!(none.is_empty());
        assert_eq!(again.windows[0].verdict, Verdict::Pass);
    }

    #[test]
    fn a_sample_is_counted_once_and_only_after_the_deployment() {
        let d = record();
        let mut all = summaries(1.0, 0);
        let s = sample(d.at + 60.0, 1.0, 0);
        all.add(&s, &settings().durations);
        all.add(&s, &settings().durations);
        all.add(&sample(d.at - 60.0, 1.0, 0), &settings().durations);
        assert_eq!(all.windows[&Window::FirstHour].samples, 1);
    }

    #[test]
    fn without_a_baseline_nothing_is_judged() {
        let d = record();
        let all = Summaries::new(&d, Summary::new(5, Following::All), &BTreeMap::new(), 5);
        let (view, _) = judge(&d, &all, &[], d.at + 7200.0, &settings(), vec![], 0);
        assert_eq!(view.windows[0].verdict, Verdict::Inconclusive);
        assert!(view.limitations[0].contains("only 0 baseline sample(s)"));
    }

    /// A statement the baseline never saw: 20 calls of 60 ms a sample.
    fn expensive_new_statement() -> StatementDelta {
        StatementDelta {
            calls: 20.0,
            total_ms: 20.0 * 60.0,
            rows: 20.0,
            query: "SELECT * FROM reports WHERE owner = $1".into(),
        }
    }

    #[test]
    fn a_new_expensive_statement_is_suspected_then_confirmed_with_its_text() {
        let d = record();
        let mut all = summaries(1.0, 0);
        for i in 0..8 {
            let mut s = sample(d.at + 30.0 + 60.0 * i as f64, 1.0, i);
            if let Some(statements) = s.statements.as_mut() {
                statements.insert("77".to_string(), expensive_new_statement());
            }
            all.add(&s, &settings().durations);
        }
        let now = d.at + 9.0 * 60.0;
        let (first, _) = judge(&d, &all, &[], now, &settings(), vec![], 0);
        assert_eq!(first.windows[0].verdict, Verdict::Watching);
        let found = &first.windows[0].regressions;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].signal, Signal::NewStatement);
        assert_eq!(
            found[0].state,
            crate::analysis::deployment::FlagState::Suspected
        );
        all.flags = first
            .windows
            .iter()
            .map(|w| (w.window, w.regressions.clone()))
            .collect();
        let (view, _) = judge(&d, &all, &[], now + 60.0, &settings(), vec![], 0);
        assert_eq!(view.windows[0].verdict, Verdict::Regression);
        let found = &view.windows[0].regressions[0];
        assert!(found.was_confirmed());
        assert_eq!(
            found.evidence["query"],
            "SELECT * FROM reports WHERE owner = $1"
        );
        assert_eq!(found.subject, "query 77");
    }

    #[test]
    fn an_expensive_new_statement_is_judged_behind_many_cheap_new_ones() {
        // The release brings more cheap new statements than are followed, and later an
        // expensive one: it takes the place of a cheap one and is flagged.
        let d = record();
        let mut all = summaries(1.0, 0);
        let cheap = NEW_STATEMENTS + 10;
        for i in 0..20 {
            let mut s = sample(d.at + 30.0 + 60.0 * i as f64, 1.0, i);
            if let Some(statements) = s.statements.as_mut() {
                for k in 0..cheap {
                    statements.insert(
                        format!("{}", 1000 + k),
                        StatementDelta {
                            calls: 20.0,
                            total_ms: 0.5,
                            rows: 20.0,
                            query: format!("SELECT {k} FROM lookups"),
                        },
                    );
                }
                if i >= 5 {
                    statements.insert("77".to_string(), expensive_new_statement());
                }
            }
            all.add(&s, &settings().durations);
        }
        let (view, _) = judge(&d, &all, &[], d.at + 21.0 * 60.0, &settings(), vec![], 0);
        let found: Vec<&Finding> = view.windows[0]
            .regressions
            .iter()
            .filter(|f| f.signal == Signal::NewStatement)
            .collect();
        assert_eq!(found.len(), 1, "{view:#?}");
        assert_eq!(found[0].subject, "query 77");
    }
}

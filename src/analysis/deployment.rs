//! Deployments as readers see them: which version a target moved to, how it was noticed, and
//! the windows after it with their verdicts and findings. Pure types and rendering; the
//! tracking itself lives in [`crate::watch::tracker`].

use crate::labels::label_enum;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::analysis::window::{Verdict, Window};

label_enum! {
    pub enum DeploymentKind {
        Deploy,
        Rollback,
    }
}

label_enum! {
    /// How a deployment became known.
    pub enum Detection {
        /// The version query's value changed.
        VersionChange,
        /// `POST /api/deployments` or `deploywatch deploy mark`.
        Announced,
        /// `[[deployments.declared]]` in the configuration.
        Declared,
    }
}

label_enum! {
    /// The regression signals. A closed set: it is a metric label.
    pub enum Signal {
        CheckFailure,
        RollbackRatio,
        Deadlocks,
        Connections,
        QueryLatency,
        SeqScans,
        UnusedIndex,
        DbGrowth,
        TopQueries,
        Integrity,
        /// A statement the baseline never saw takes a material share of database time.
        NewStatement,
    }
}

label_enum! {
    /// Where a published regression flag stands. Flags are latched: once shown, a flag stays
    /// until its window closes, `resolved` if the rule no longer finds it.
    #[derive(Default)]
    pub enum FlagState {
        /// Found at the latest look only: shown, never paged.
        Suspected,
        /// Found at two consecutive looks, or still there when the window closed: pages.
        #[default]
        Confirmed,
        /// Found before, gone at the latest look; kept with its evidence.
        Resolved,
        /// Worth knowing, not a regression: never changes the verdict, never pages (a new index
        /// not scanned yet).
        Notice,
    }
}

/// One regression or improvement, with the figures that justify it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub signal: Signal,
    /// What it is about: a check, a query (id and text), a table or an index.
    pub subject: String,
    pub message: String,
    /// Baseline and window figures, test statistics, sample counts, as at the latest look.
    pub evidence: serde_json::Map<String, serde_json::Value>,
    /// Latched state (regressions only).
    #[serde(default)]
    pub state: FlagState,
    /// Consecutive looks that found it (kept as it was once resolved).
    #[serde(default)]
    pub(crate) looks: u32,
    /// When it was first found (Unix seconds), and its message and evidence then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) first_seen_at: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) first_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) first_evidence: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Finding {
    pub(crate) fn new(
        signal: Signal,
        subject: String,
        message: String,
        evidence: serde_json::Map<String, serde_json::Value>,
    ) -> Finding {
        Finding {
            signal,
            subject,
            message,
            evidence,
            state: FlagState::Confirmed,
            looks: 1,
            first_seen_at: None,
            first_message: None,
            first_evidence: None,
        }
    }

    /// A notice rather than a regression.
    pub(crate) fn notice(mut self) -> Finding {
        self.state = FlagState::Notice;
        self
    }

    /// A regression (suspected, confirmed or resolved), not a notice.
    pub(crate) fn is_regression(&self) -> bool {
        self.state != FlagState::Notice
    }

    /// How many of `findings` are regressions, not notices.
    pub(crate) fn regressions_in(findings: &[Finding]) -> usize {
        findings.iter().filter(|f| f.is_regression()).count()
    }

    /// A regression shown and not resolved.
    pub fn active(&self) -> bool {
        matches!(self.state, FlagState::Suspected | FlagState::Confirmed)
    }

    /// What pages: confirmed and not resolved.
    pub fn confirmed(&self) -> bool {
        self.state == FlagState::Confirmed
    }

    /// Confirmed at some look, resolved since or not: its window stays `regression`.
    pub fn was_confirmed(&self) -> bool {
        self.state == FlagState::Confirmed || (self.state == FlagState::Resolved && self.looks >= 2)
    }
}

/// Latches a window's regression flags across looks. `previous` is what was published at the
/// last look, `current` what the rules find now. A flag found at two consecutive looks, or
/// still found when the window closes, is confirmed; one found once is suspected; one no longer
/// found is kept as resolved, with its first and latest evidence, never dropped. A flag keeps the
/// evidence as first seen beside the latest.
pub fn latch(previous: &[Finding], current: Vec<Finding>, now: f64, closed: bool) -> Vec<Finding> {
    let key = |f: &Finding| (f.signal, f.subject.clone());
    let mut out: Vec<Finding> = Vec::new();
    for mut finding in current {
        let before = previous.iter().find(|p| key(p) == key(&finding));
        match before {
            Some(before) => {
                finding.first_seen_at = before.first_seen_at.or(Some(now));
                finding.first_message = before
                    .first_message
                    .clone()
                    .or_else(|| Some(before.message.clone()));
                finding.first_evidence = before
                    .first_evidence
                    .clone()
                    .or_else(|| Some(before.evidence.clone()));
                finding.looks = if before.active() { before.looks + 1 } else { 1 };
            }
            None => {
                finding.first_seen_at = Some(now);
                finding.first_message = Some(finding.message.clone());
                finding.first_evidence = Some(finding.evidence.clone());
                finding.looks = 1;
            }
        }
        finding.state = if finding.state == FlagState::Notice {
            FlagState::Notice
        } else if closed || finding.looks >= 2 {
            FlagState::Confirmed
        } else {
            FlagState::Suspected
        };
        out.push(finding);
    }
    for before in previous {
        if before.state == FlagState::Notice || out.iter().any(|f| key(f) == key(before)) {
            continue;
        }
        let mut resolved = before.clone();
        resolved.state = FlagState::Resolved;
        out.push(resolved);
    }
    out.sort_by(|a, b| (a.signal, &a.subject).cmp(&(b.signal, &b.subject)));
    out
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowView {
    pub window: Window,
    pub(crate) start: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) end: Option<String>,
    pub verdict: Verdict,
    pub(crate) samples: usize,
    pub regressions: Vec<Finding>,
    pub(crate) improvements: Vec<Finding>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub id: i64,
    pub(crate) target: String,
    pub kind: DeploymentKind,
    pub from_version: Option<String>,
    pub to_version: String,
    pub detected_by: Detection,
    /// Unix seconds.
    pub at: f64,
    pub at_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub current_window: Option<Window>,
    pub baseline_samples: usize,
    pub windows: Vec<WindowView>,
    /// Why some signals could not be judged (e.g. pg_stat_statements is not installed).
    pub limitations: Vec<String>,
    pub rollbacks_seen: u64,
}

impl DeploymentView {
    pub(crate) fn has_regressions(&self) -> bool {
        self.windows
            .iter()
            .any(|w| w.regressions.iter().any(Finding::active))
    }
}

/// The deployment part of the plain-text status.
pub(crate) fn render_text(view: &DeploymentView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  deployment #{}: {} {} -> {} at {} ({}){}",
        view.id,
        view.kind.as_str(),
        view.from_version.as_deref().unwrap_or("?"),
        view.to_version,
        view.at_text,
        view.detected_by.as_str(),
        match view.current_window {
            Some(w) => format!(", now in {}", w.as_str()),
            None => String::new(),
        }
    );
    let _ = writeln!(out, "  baseline: {} samples", view.baseline_samples);
    for window in &view.windows {
        let (name, verdict) = (window.window.as_str(), window.verdict.as_str());
        let samples = window.samples;
        let regressions = Finding::regressions_in(&window.regressions);
        let improvements = window.improvements.len();
        let _ = writeln!(
            out,
            "    {name:<11} {verdict:<12} samples {samples:<5} regressions {regressions:<3} improvements {improvements}"
        );
        // Regressions and notices with their state, then improvements.
        let flagged = window.regressions.iter().map(|f| {
            let what = if f.is_regression() {
                "REGRESSION"
            } else {
                "notice"
            };
            (format!("{what} ({})", f.state.as_str()), f)
        });
        let improved = window
            .improvements
            .iter()
            .map(|f| ("improvement".to_string(), f));
        for (what, finding) in flagged.chain(improved) {
            let (signal, message) = (finding.signal.as_str(), &finding.message);
            let _ = writeln!(out, "      {what} {signal}: {message}");
        }
    }
    for limitation in &view.limitations {
        let _ = writeln!(out, "  note: {limitation}");
    }
    out
}

/// How versions are ordered, which tells a deployment from a rollback
/// (`deployments.version_order`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum VersionOrder {
    /// Semantic versioning where both versions parse (a leading `v` allowed), so
    /// `3.7.0-rc1` < `3.7.0`; otherwise numeric parts numerically and other parts as text.
    #[default]
    Semver,
    /// No order (git SHAs, build ids): a change is a deployment unless it returns to the
    /// version the current one replaced, or an announcement says it is a rollback.
    Unordered,
}

impl VersionOrder {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "semver" => Some(VersionOrder::Semver),
            "unordered" => Some(VersionOrder::Unordered),
            _ => None,
        }
    }
}

fn as_semver(text: &str) -> Option<semver::Version> {
    let text = text.trim();
    let text = text
        .strip_prefix('v')
        .or_else(|| text.strip_prefix('V'))
        .unwrap_or(text);
    semver::Version::parse(text).ok()
}

/// Orders two version strings: by semantic versioning when both parse ("3.7.0-rc1" <
/// "3.7.0" < "3.10.0"), otherwise numeric parts numerically ("3.10" > "3.9.1") and other parts
/// as text.
pub(crate) fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    if let (Some(x), Some(y)) = (as_semver(a), as_semver(b)) {
        // Build metadata does not order versions.
        return x.cmp_precedence(&y);
    }
    // Runs of digits and runs of letters, separators dropped: "v2.10-rc1" -> v, 2, 10, rc, 1.
    let parts = |s: &str| -> Vec<String> {
        let mut parts: Vec<String> = Vec::new();
        let mut last_digit: Option<bool> = None;
        for c in s.chars() {
            if !c.is_ascii_alphanumeric() {
                last_digit = None;
                continue;
            }
            let digit = c.is_ascii_digit();
            match (last_digit, parts.last_mut()) {
                (Some(previous), Some(part)) if previous == digit => part.push(c),
                _ => parts.push(c.to_string()),
            }
            last_digit = Some(digit);
        }
        parts
    };
    let (left, right) = (parts(a), parts(b));
    for (x, y) in left.iter().zip(right.iter()) {
        let ordering = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if ordering != std::cmp::Ordering::Equal {
            return ordering;
        }
    }
    left.len().cmp(&right.len())
}

/// Deploy or rollback. With an order, a move to a lower version is a rollback. Without one, a
/// move back to the version the latest deployment (`latest`) replaced is.
pub(crate) fn kind_of(
    from: Option<&str>,
    to: &str,
    order: VersionOrder,
    latest: Option<&DeploymentRecord>,
) -> DeploymentKind {
    let Some(from) = from else {
        return DeploymentKind::Deploy;
    };
    match order {
        VersionOrder::Semver if compare_versions(to, from) == std::cmp::Ordering::Less => {
            DeploymentKind::Rollback
        }
        VersionOrder::Semver => DeploymentKind::Deploy,
        VersionOrder::Unordered => match latest {
            Some(d) if d.to_version == from && d.from_version.as_deref() == Some(to) => {
                DeploymentKind::Rollback
            }
            _ => DeploymentKind::Deploy,
        },
    }
}

/// Where an announced deployment goes among the recorded ones.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Placement {
    /// A new deployment from `from`.
    New {
        from: Option<String>,
        kind: DeploymentKind,
    },
    /// The version is the latest deployment's already (detected by a version change, or
    /// announced before): that deployment starts at `at` now, and nothing new is recorded.
    Merge { id: i64, at: f64 },
}

/// Why an announcement cannot be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum PlacementError {
    #[error(
        "started_at {at_text} precedes the latest deployment ({version} at {latest_text}): announce a deployment when it starts"
    )]
    BeforeLatest {
        at_text: String,
        version: String,
        latest_text: String,
    },
}

/// Places an announcement of `version` starting at `at`, given the target's deployments
/// (newest first) and the version last read from the database. An announcement for the
/// version the latest deployment moved to merges into it, its start moved to the earlier of
/// the two (but never before the deployment before it); it never makes a deployment from a
/// version to itself, and never one that would end another deployment's baseline early.
pub(crate) fn place_announcement(
    version: &str,
    at: f64,
    announced_kind: Option<DeploymentKind>,
    deployments: &[DeploymentRecord],
    last_version: Option<&str>,
    order: VersionOrder,
) -> Result<Placement, PlacementError> {
    let latest = deployments.first();
    if let Some(latest) = latest {
        if latest.to_version == version {
            let floor = deployments.get(1).map(|d| d.at);
            let start = match floor {
                Some(floor) if at <= floor => latest.at,
                _ => at.min(latest.at),
            };
            return Ok(Placement::Merge {
                id: latest.id,
                at: start,
            });
        }
        if at < latest.at {
            return Err(PlacementError::BeforeLatest {
                at_text: crate::time::rfc3339(at),
                version: latest.to_version.clone(),
                latest_text: crate::time::rfc3339(latest.at),
            });
        }
    }
    let from = latest
        .map(|d| d.to_version.as_str())
        .or(last_version)
        .filter(|from| *from != version)
        .map(str::to_string);
    let kind = announced_kind.unwrap_or_else(|| kind_of(from.as_deref(), version, order, latest));
    Ok(Placement::New { from, kind })
}

/// A recorded deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentRecord {
    pub id: i64,
    pub target: String,
    pub from_version: Option<String>,
    pub to_version: String,
    pub kind: DeploymentKind,
    pub detection: Detection,
    pub at: f64,
    pub finished_at: Option<f64>,
    pub note: Option<String>,
}

#[cfg(test)]
impl DeploymentRecord {
    /// A deployment of target `cognit` from `from` to `to` found by a version change (tests).
    pub(crate) fn detected(id: i64, from: Option<&str>, to: &str, at: f64) -> DeploymentRecord {
        DeploymentRecord {
            id,
            target: "cognit".into(),
            from_version: from.map(str::to_string),
            to_version: to.into(),
            kind: DeploymentKind::Deploy,
            detection: Detection::VersionChange,
            at,
            finished_at: None,
            note: None,
        }
    }
}

/// A window's recorded verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct VerdictRecord {
    pub window: Window,
    pub verdict: Verdict,
    pub samples: usize,
    pub regressions: Vec<Finding>,
    pub improvements: Vec<Finding>,
    pub closed_at: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    /// `(a, b, how a compares to b)`.
    fn assert_orders(cases: &[(&str, &str, Ordering)]) {
        for &(a, b, expected) in cases {
            assert_eq!(compare_versions(a, b), expected, "{a} vs {b}")
        }
    }

    #[test]
    fn versions_compare_numerically() {
        use Ordering::{Equal, Greater, Less};
        assert_orders(&[
            ("3.7.0", "3.6.0", Greater),
            ("3.10.0", "3.9.9", Greater),
            ("3.6.0", "3.6.0", Equal),
            ("3.6", "3.6.1", Less),
            ("v2", "v10", Less),
            ("20261124_01", "20261123_07", Greater),
        ]);
    }

    #[test]
    fn semantic_versions_order_pre_releases_first() {
        use Ordering::{Equal, Greater, Less};
        assert_orders(&[
            ("3.7.0-rc1", "3.7.0", Less),
            ("3.7.0", "3.7.0-rc1", Greater),
            ("v3.7.0-rc.2", "v3.7.0-rc.10", Less),
            ("3.7.0-alpha", "3.7.0-beta", Less),
            ("3.7.0+build.5", "3.7.0+build.9", Equal),
            ("3.10.0-rc1", "3.9.0", Greater),
        ]);
        let order = VersionOrder::Semver;
        assert_eq!(
            kind_of(Some("3.7.0-rc1"), "3.7.0", order, None),
            DeploymentKind::Deploy
        );
        assert_eq!(
            kind_of(Some("3.7.0"), "3.7.0-rc1", order, None),
            DeploymentKind::Rollback
        );
    }

    #[test]
    fn going_back_is_a_rollback() {
        let order = VersionOrder::Semver;
        assert_eq!(
            kind_of(Some("3.7.0"), "3.6.0", order, None),
            DeploymentKind::Rollback
        );
        assert_eq!(
            kind_of(Some("3.6.0"), "3.7.0", order, None),
            DeploymentKind::Deploy
        );
        assert_eq!(kind_of(None, "3.7.0", order, None), DeploymentKind::Deploy);
    }

    #[test]
    fn unordered_versions_take_their_direction_from_history() {
        let order = VersionOrder::Unordered;
        let latest = DeploymentRecord::detected(1, Some("a1b2c3d"), "9f8e7d6", 100.0);
        // Back to the version the latest deployment replaced: a rollback.
        assert_eq!(
            kind_of(Some("9f8e7d6"), "a1b2c3d", order, Some(&latest)),
            DeploymentKind::Rollback
        );
        // Anything else is a deployment, whatever the text order says.
        assert_eq!(
            kind_of(Some("9f8e7d6"), "0000001", order, Some(&latest)),
            DeploymentKind::Deploy
        );
        // An announcement can say which it is.
        let placed = place_announcement(
            "0000001",
            200.0,
            Some(DeploymentKind::Rollback),
            &[latest],
            None,
            order,
        );
        assert_eq!(
            placed,
            Ok(Placement::New {
                from: Some("9f8e7d6".into()),
                kind: DeploymentKind::Rollback
            })
        );
    }

    #[test]
    fn an_announcement_for_the_detected_version_merges_into_it() {
        let order = VersionOrder::Semver;
        let detected = vec![
            DeploymentRecord::detected(2, Some("3.6.0"), "3.7.0", 1000.0),
            DeploymentRecord::detected(1, Some("3.5.0"), "3.6.0", 500.0),
        ];
        // Announced as starting before the detection: the deployment starts earlier.
        assert_eq!(
            place_announcement("3.7.0", 990.0, None, &detected, Some("3.7.0"), order),
            Ok(Placement::Merge { id: 2, at: 990.0 })
        );
        // Announced late: the detection already dates it.
        assert_eq!(
            place_announcement("3.7.0", 1010.0, None, &detected, Some("3.7.0"), order),
            Ok(Placement::Merge { id: 2, at: 1000.0 })
        );
        // Never moved before the deployment before it.
        assert_eq!(
            place_announcement("3.7.0", 400.0, None, &detected, Some("3.7.0"), order),
            Ok(Placement::Merge { id: 2, at: 1000.0 })
        );
    }

    #[test]
    fn an_announcement_never_goes_from_a_version_to_itself() {
        let order = VersionOrder::Semver;
        // The version was first seen already at 3.7.0, with no deployment recorded.
        assert_eq!(
            place_announcement("3.7.0", 100.0, None, &[], Some("3.7.0"), order),
            Ok(Placement::New {
                from: None,
                kind: DeploymentKind::Deploy
            })
        );
        assert_eq!(
            place_announcement("3.7.0", 100.0, None, &[], Some("3.6.0"), order),
            Ok(Placement::New {
                from: Some("3.6.0".into()),
                kind: DeploymentKind::Deploy
            })
        );
        // A new version dated before the latest deployment would cut its baseline: refused.
        let detected = vec![DeploymentRecord::detected(
            2,
            Some("3.6.0"),
            "3.7.0",
            1000.0,
        )];
        assert!(place_announcement("3.8.0", 900.0, None, &detected, None, order).is_err());
        assert_eq!(
            place_announcement("3.8.0", 1100.0, None, &detected, None, order),
            Ok(Placement::New {
                from: Some("3.7.0".into()),
                kind: DeploymentKind::Deploy
            })
        );
    }

    fn flag(subject: &str, value: f64) -> Finding {
        let mut evidence = serde_json::Map::new();
        evidence.insert("value".into(), serde_json::json!(value));
        Finding::new(
            Signal::QueryLatency,
            subject.into(),
            format!("{subject} at {value}"),
            evidence,
        )
    }

    #[test]
    fn flags_are_confirmed_at_the_second_look_and_resolved_never_dropped() {
        let first = latch(&[], vec![flag("q1", 2.0)], 10.0, false);
        assert_eq!(first[0].state, FlagState::Suspected);
        assert!(!first[0].confirmed() && first[0].active());
        let second = latch(&first, vec![flag("q1", 3.0)], 20.0, false);
        assert_eq!(second[0].state, FlagState::Confirmed);
        assert_eq!(second[0].looks, 2);
        // Evidence as first seen and as latest.
        assert_eq!(second[0].first_seen_at, Some(10.0));
        assert_eq!(
            second[0]
                .first_evidence
                .as_ref()
                .and_then(|e| e["value"].as_f64()),
            Some(2.0)
        );
        assert_eq!(second[0].evidence["value"].as_f64(), Some(3.0));
        // Gone at the next look: resolved, kept with its evidence.
        let third = latch(&second, vec![], 30.0, false);
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].state, FlagState::Resolved);
        assert_eq!(third[0].evidence["value"].as_f64(), Some(3.0));
        assert_eq!(third[0].first_seen_at, Some(10.0));
        // Still resolved at the close.
        let closed = latch(&third, vec![], 40.0, true);
        assert_eq!(closed[0].state, FlagState::Resolved);
    }

    #[test]
    fn a_one_look_flag_is_suspected_unless_the_window_closes_with_it() {
        let once = latch(&[], vec![flag("q1", 2.0)], 10.0, false);
        let gone = latch(&once, vec![flag("q2", 5.0)], 20.0, false);
        let states: Vec<(&str, FlagState)> =
            gone.iter().map(|f| (f.subject.as_str(), f.state)).collect();
        assert_eq!(
            states,
            vec![("q1", FlagState::Resolved), ("q2", FlagState::Suspected)]
        );
        let at_close = latch(&gone, vec![flag("q2", 5.0), flag("q3", 1.0)], 30.0, true);
        assert!(at_close
            .iter()
            .filter(|f| f.subject != "q1")
            .all(|f| f.state == FlagState::Confirmed));
    }

    #[test]
    fn a_notice_stays_a_notice_and_never_counts() {
        let notice = flag("public.idx_new", 0.0).notice();
        let latched = latch(&[], vec![notice], 10.0, true);
        assert_eq!(latched[0].state, FlagState::Notice);
        assert!(!latched[0].active() && !latched[0].confirmed() && !latched[0].was_confirmed());
    }
}

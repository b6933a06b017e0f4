//! Deployments as readers see them: which version a target moved to, how it was noticed, and
//! the windows after it with their verdicts and findings. Pure types and rendering; the
//! tracking itself lives in [`crate::watch::tracker`].

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::analysis::window::{Verdict, Window};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentKind {
    Deploy,
    Rollback,
}

impl DeploymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentKind::Deploy => "deploy",
            DeploymentKind::Rollback => "rollback",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "deploy" => Some(DeploymentKind::Deploy),
            "rollback" => Some(DeploymentKind::Rollback),
            _ => None,
        }
    }
}

/// How a deployment became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detection {
    /// The version query's value changed.
    VersionChange,
    /// `POST /api/deployments` or `deploywatch deploy mark`.
    Announced,
    /// `[[deployments.declared]]` in the configuration.
    Declared,
}

impl Detection {
    pub fn as_str(self) -> &'static str {
        match self {
            Detection::VersionChange => "version_change",
            Detection::Announced => "announced",
            Detection::Declared => "declared",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "version_change" => Some(Detection::VersionChange),
            "announced" => Some(Detection::Announced),
            "declared" => Some(Detection::Declared),
            _ => None,
        }
    }
}

/// The regression signals. A closed set: it is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
}

impl Signal {
    pub const ALL: [Signal; 10] = [
        Signal::CheckFailure,
        Signal::RollbackRatio,
        Signal::Deadlocks,
        Signal::Connections,
        Signal::QueryLatency,
        Signal::SeqScans,
        Signal::UnusedIndex,
        Signal::DbGrowth,
        Signal::TopQueries,
        Signal::Integrity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::CheckFailure => "check_failure",
            Signal::RollbackRatio => "rollback_ratio",
            Signal::Deadlocks => "deadlocks",
            Signal::Connections => "connections",
            Signal::QueryLatency => "query_latency",
            Signal::SeqScans => "seq_scans",
            Signal::UnusedIndex => "unused_index",
            Signal::DbGrowth => "db_growth",
            Signal::TopQueries => "top_queries",
            Signal::Integrity => "integrity",
        }
    }
}

/// One regression or improvement, with the figures that justify it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub signal: Signal,
    /// What it is about: a check, a query (id and text), a table or an index.
    pub subject: String,
    pub message: String,
    /// Baseline and window figures, test statistics, sample counts.
    pub evidence: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowView {
    pub window: Window,
    pub start: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    pub verdict: Verdict,
    pub samples: usize,
    pub regressions: Vec<Finding>,
    pub improvements: Vec<Finding>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub id: i64,
    pub target: String,
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
    pub fn has_regressions(&self) -> bool {
        self.windows.iter().any(|w| !w.regressions.is_empty())
    }
}

/// The deployment part of the plain-text status.
pub fn render_text(view: &DeploymentView) -> String {
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
        let _ = writeln!(
            out,
            "    {:<11} {:<12} samples {:<5} regressions {:<3} improvements {}",
            window.window.as_str(),
            window.verdict.as_str(),
            window.samples,
            window.regressions.len(),
            window.improvements.len()
        );
        for finding in &window.regressions {
            let _ = writeln!(
                out,
                "      REGRESSION {}: {}",
                finding.signal.as_str(),
                finding.message
            );
        }
        for finding in &window.improvements {
            let _ = writeln!(
                out,
                "      improvement {}: {}",
                finding.signal.as_str(),
                finding.message
            );
        }
    }
    for limitation in &view.limitations {
        let _ = writeln!(out, "  note: {limitation}");
    }
    out
}

/// Orders two version strings: numeric parts numerically ("3.10.0" > "3.9.1"), other parts as
/// text. Used to tell a deployment from a rollback.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
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

/// A move to a lower version is a rollback.
pub fn kind_of(from: Option<&str>, to: &str) -> DeploymentKind {
    match from {
        Some(from) if compare_versions(to, from) == std::cmp::Ordering::Less => {
            DeploymentKind::Rollback
        }
        _ => DeploymentKind::Deploy,
    }
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

    #[test]
    fn versions_compare_numerically() {
        let check = |a: &str, b: &str, expected: Ordering| {
            assert_eq!(compare_versions(a, b), expected, "{a} vs {b}")
        };
        check("3.7.0", "3.6.0", Ordering::Greater);
        check("3.10.0", "3.9.9", Ordering::Greater);
        check("3.6.0", "3.6.0", Ordering::Equal);
        check("3.6", "3.6.1", Ordering::Less);
        check("v2", "v10", Ordering::Less);
        check("20261124_01", "20261123_07", Ordering::Greater);
    }

    #[test]
    fn going_back_is_a_rollback() {
        assert_eq!(kind_of(Some("3.7.0"), "3.6.0"), DeploymentKind::Rollback);
        assert_eq!(kind_of(Some("3.6.0"), "3.7.0"), DeploymentKind::Deploy);
        assert_eq!(kind_of(None, "3.7.0"), DeploymentKind::Deploy);
    }
}

//! `deploywatch report`: the checklist's "Notes Section" filled in from what was recorded —
//! date and time, database size before and after, issues encountered, performance notes and
//! whether the success criteria hold. Pure rendering; the command reads the store.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::analysis::deployment::{DeploymentRecord, VerdictRecord};
use crate::analysis::deployment::{Finding, Signal};
use crate::analysis::sample::Sample;
use crate::analysis::window::Verdict;
use crate::time::rfc3339;

/// Everything the report is made from.
pub(crate) struct ReportInput<'a> {
    pub(crate) deployment: &'a DeploymentRecord,
    /// The last sample before the deployment.
    pub(crate) before: Option<&'a Sample>,
    /// Every sample since the deployment, oldest first; for a superseded deployment only
    /// those before the deployment that superseded it.
    pub(crate) after: &'a [Sample],
    pub(crate) verdicts: &'a [VerdictRecord],
    /// The version the database reports now; for a superseded deployment, the version it
    /// reported when it was superseded.
    pub(crate) current_version: Option<&'a str>,
    /// The later deployment (or rollback) that ended this one's watch, if any.
    pub(crate) superseded_by: Option<&'a DeploymentRecord>,
    /// Until when the deployment was watched: now, or when it was superseded.
    pub(crate) now: f64,
}

fn size(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {} ({} bytes)", UNITS[unit], bytes as i64)
}

fn tick(ok: bool) -> &'static str {
    if ok {
        "[x]"
    } else {
        "[ ]"
    }
}

pub(crate) fn render(input: &ReportInput<'_>) -> String {
    let d = input.deployment;
    let mut out = String::new();
    let _ = writeln!(out, "# Deployment notes: {} #{}", d.target, d.id);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "**Date/Time of Deployment**: {} ({} {} -> {}, {})",
        rfc3339(d.at),
        d.kind.as_str(),
        d.from_version.as_deref().unwrap_or("unknown"),
        d.to_version,
        d.detection.as_str()
    );
    if let Some(finished) = d.finished_at {
        let _ = writeln!(out, "**Migration Duration**: {:.0} s", finished - d.at);
    }
    if let Some(note) = &d.note {
        let _ = writeln!(out, "**Note**: {note}");
    }
    let _ = writeln!(
        out,
        "**Database Size Before**: {}",
        input
            .before
            .map(|s| size(s.size_bytes))
            .unwrap_or_else(|| "not sampled".into())
    );
    let _ = writeln!(
        out,
        "**Database Size After**: {}",
        input
            .after
            .last()
            .map(|s| size(s.size_bytes))
            .unwrap_or_else(|| "not sampled yet".into())
    );
    let _ = writeln!(
        out,
        "**Watched**: {} sample(s) since the deployment, until {}",
        input.after.len(),
        rfc3339(input.now)
    );
    if let Some(next) = input.superseded_by {
        let _ = writeln!(
            out,
            "**Superseded**: by #{} at {} ({} {} -> {}, {}); only the samples before it count here",
            next.id,
            rfc3339(next.at),
            next.kind.as_str(),
            next.from_version.as_deref().unwrap_or("unknown"),
            next.to_version,
            next.detection.as_str()
        );
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Windows");
    if input.verdicts.is_empty() {
        let _ = writeln!(out, "- no window has closed yet");
    }
    for v in input.verdicts {
        let _ = writeln!(
            out,
            "- {}: {} ({} samples, {} regression(s), {} improvement(s))",
            v.window.as_str(),
            v.verdict.as_str(),
            v.samples,
            Finding::regressions_in(&v.regressions),
            v.improvements.len()
        );
    }
    let _ = writeln!(out);

    // Checks that failed or errored after the deployment: first time and how often.
    let mut failed: BTreeMap<&str, (f64, usize, String, Option<f64>)> = BTreeMap::new();
    for sample in input.after {
        for (name, point) in &sample.checks {
            if point.status == "fail" || point.status == "error" {
                let entry = failed.entry(name.as_str()).or_insert((
                    sample.at,
                    0,
                    point.status.clone(),
                    point.value,
                ));
                entry.1 += 1;
                entry.3 = point.value;
            }
        }
    }
    let regressions: Vec<&Finding> = input
        .verdicts
        .iter()
        .flat_map(|v| v.regressions.iter())
        .filter(|f| f.is_regression())
        .collect();
    let notices: Vec<&Finding> = input
        .verdicts
        .iter()
        .flat_map(|v| v.regressions.iter())
        .filter(|f| !f.is_regression())
        .collect();
    let improvements: Vec<&Finding> = input
        .verdicts
        .iter()
        .flat_map(|v| v.improvements.iter())
        .collect();
    let _ = writeln!(out, "## Issues Encountered");
    if failed.is_empty() && regressions.is_empty() && notices.is_empty() {
        let _ = writeln!(out, "- none");
    }
    for (name, (first, count, status, value)) in &failed {
        let value = value
            .map(|v| format!(", last value {v}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "- check {name}: {status} in {count} sample(s), first at {}{value}",
            rfc3339(*first)
        );
    }
    for (kind, findings) in [("regression", &regressions), ("notice", &notices)] {
        for finding in findings {
            let _ = writeln!(
                out,
                "- {kind} ({}): {}",
                finding.signal.as_str(),
                finding.message
            );
        }
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Performance Notes");
    let performance = |f: &&&Finding| {
        matches!(
            f.signal,
            Signal::QueryLatency
                | Signal::TopQueries
                | Signal::NewStatement
                | Signal::SeqScans
                | Signal::DbGrowth
        )
    };
    let slow: Vec<_> = regressions.iter().filter(performance).collect();
    let fast: Vec<_> = improvements.iter().filter(performance).collect();
    if slow.is_empty() && fast.is_empty() {
        let _ = writeln!(out, "- no significant change in query performance");
    }
    for finding in slow {
        let _ = writeln!(out, "- slower: {}", finding.message);
    }
    for finding in fast {
        let _ = writeln!(out, "- faster: {}", finding.message);
    }
    let _ = writeln!(out);

    let latest_checks = input.after.last().map(|s| &s.checks);
    let validation_passes = latest_checks.is_some_and(|checks| {
        checks
            .values()
            .filter(|c| c.category == "health" || c.category == "integrity")
            .all(|c| c.status == "pass")
    });
    let integrity_kept = !input.after.iter().any(|s| {
        s.checks
            .values()
            .any(|c| c.category == "integrity" && c.status == "fail")
    });
    let performance_ok = !regressions.iter().any(|f| {
        matches!(
            f.signal,
            Signal::QueryLatency | Signal::TopQueries | Signal::NewStatement | Signal::SeqScans
        )
    });
    let version_ok = input.current_version == Some(d.to_version.as_str());
    let no_regression = input
        .verdicts
        .iter()
        .all(|v| v.verdict != Verdict::Regression);
    let _ = writeln!(out, "## Success Criteria");
    let _ = writeln!(
        out,
        "- {} Schema version is {} (database {} {})",
        tick(version_ok),
        d.to_version,
        if input.superseded_by.is_some() {
            "reported, until superseded,"
        } else {
            "reports"
        },
        input.current_version.unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "- {} All validation queries pass (latest sample)",
        tick(validation_passes)
    );
    let _ = writeln!(
        out,
        "- {} No regression flagged in a closed window",
        tick(no_regression)
    );
    let _ = writeln!(
        out,
        "- {} Query performance is same or better",
        tick(performance_ok)
    );
    let _ = writeln!(out, "- {} Data integrity maintained", tick(integrity_kept));
    let success =
        version_ok && validation_passes && no_regression && performance_ok && integrity_kept;
    let _ = writeln!(
        out,
        "\nMigration {}.",
        if success {
            "is successful"
        } else {
            "does NOT meet the success criteria yet"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::deployment::DeploymentKind;
    use crate::analysis::sample::CheckPoint;
    use crate::analysis::window::Window;

    /// The report of `d` while 3.7.0 is still the current version.
    fn render_current(
        d: &DeploymentRecord,
        before: Option<&Sample>,
        after: &[Sample],
        verdicts: &[VerdictRecord],
        now: f64,
    ) -> String {
        render(&ReportInput {
            deployment: d,
            before,
            after,
            verdicts,
            current_version: Some("3.7.0"),
            superseded_by: None,
            now,
        })
    }

    fn record() -> DeploymentRecord {
        DeploymentRecord::detected(7, Some("3.6.0"), "3.7.0", 1_800_000_000.0)
    }

    fn sample(at: f64, size: f64, integrity: &str) -> Sample {
        let mut s = Sample {
            at,
            size_bytes: size,
            ..Sample::default()
        };
        s.checks.insert(
            "orphaned_payments".into(),
            CheckPoint {
                category: "integrity".into(),
                status: integrity.into(),
                value: Some(if integrity == "pass" { 0.0 } else { 5.0 }),
            },
        );
        s
    }

    #[test]
    fn a_clean_deployment_meets_the_success_criteria() {
        let d = record();
        let before = sample(d.at - 60.0, 1024.0 * 1024.0, "pass");
        let after = vec![sample(d.at + 60.0, 2.0 * 1024.0 * 1024.0, "pass")];
        let verdicts = vec![VerdictRecord {
            window: Window::FirstHour,
            verdict: Verdict::Pass,
            samples: 1,
            regressions: vec![],
            improvements: vec![],
            closed_at: d.at + 3600.0,
        }];
        let text = render_current(&d, Some(&before), &after, &verdicts, d.at + 4000.0);
        assert!(text.contains("**Database Size Before**: 1.0 MiB"), "{text}");
        assert!(text.contains("**Database Size After**: 2.0 MiB"), "{text}");
        assert!(text.contains("- first_hour: pass"), "{text}");
        assert!(text.contains("Migration is successful."), "{text}");
    }

    #[test]
    fn an_expensive_new_statement_is_a_performance_note_and_breaks_the_criteria() {
        let d = record();
        let after = vec![sample(d.at + 60.0, 1.0, "pass")];
        let finding = Finding::new(
            crate::analysis::deployment::Signal::NewStatement,
            "query 77".into(),
            "query 77 (SELECT * FROM reports) is new since the deployment".into(),
            serde_json::Map::new(),
        );
        let verdicts = vec![VerdictRecord {
            window: Window::FirstHour,
            verdict: Verdict::Regression,
            samples: 1,
            regressions: vec![finding],
            improvements: vec![],
            closed_at: d.at + 3600.0,
        }];
        let text = render_current(&d, None, &after, &verdicts, d.at + 4000.0);
        assert!(
            text.contains("- slower: query 77 (SELECT * FROM reports) is new"),
            "{text}"
        );
        assert!(
            text.contains("[ ] Query performance is same or better"),
            "{text}"
        );
    }

    #[test]
    fn an_integrity_failure_is_an_issue_and_breaks_the_criteria() {
        let d = record();
        let after = vec![
            sample(d.at + 60.0, 1.0, "fail"),
            sample(d.at + 120.0, 1.0, "pass"),
        ];
        let text = render_current(&d, None, &after, &[], d.at + 200.0);
        assert!(
            text.contains("check orphaned_payments: fail in 1 sample(s)"),
            "{text}"
        );
        assert!(text.contains("[ ] Data integrity maintained"), "{text}");
        assert!(text.contains("does NOT meet"), "{text}");
    }

    #[test]
    fn a_superseded_deployment_says_so_and_keeps_its_own_version() {
        let d = record();
        let next = DeploymentRecord {
            id: d.id + 1,
            at: d.at + 600.0,
            from_version: Some("3.7.0".into()),
            to_version: "3.6.0".into(),
            kind: DeploymentKind::Rollback,
            ..d.clone()
        };
        let after = vec![sample(d.at + 60.0, 1.0, "pass")];
        let text = render(&ReportInput {
            deployment: &d,
            before: None,
            after: &after,
            verdicts: &[],
            current_version: next.from_version.as_deref(),
            superseded_by: Some(&next),
            now: next.at,
        });
        assert!(
            text.contains("**Superseded**: by #8") && text.contains("rollback 3.7.0 -> 3.6.0"),
            "{text}"
        );
        assert!(text.contains("[x] Schema version is 3.7.0"), "{text}");
        assert!(text.contains("1 sample(s) since the deployment"), "{text}");
    }
}

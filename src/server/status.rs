//! The SRE's view: overall state, each target and each check, as JSON (`/status`) or as a
//! plain-text table (`/status?format=text`, `deploywatch status`, `deploywatch check`).
//! Pure: it renders a [`Snapshot`] and never touches the database or the clock.

use crate::labels::label_enum;
use std::fmt::Write as _;

use serde::Serialize;

use crate::analysis::deployment::DeploymentView;
use crate::checks::outcome::{Observation, Status};
use crate::checks::spec::Severity;
use crate::time::{rfc3339, Timestamp};
use crate::watch::state::Snapshot;

label_enum! {
    /// A target's state and the overall one (the worst of the targets'), best first.
    pub(crate) enum Overall {
        Ok,
        /// Nothing is known yet: no check has given a result on the target since the daemon
        /// started (or since the target was added), so it cannot be called ok.
        Pending,
        Degraded,
        Failing,
    }
}

/// Which parts of the report to show.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub(crate) target: Option<String>,
    pub(crate) status: Option<Status>,
    pub(crate) check: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct StatusReport {
    /// The worst state of the targets asked about (all of them without `target`).
    pub(crate) status: Overall,
    /// RFC 3339.
    pub(crate) generated_at: String,
    /// Whether the latest reload of the configuration was applied.
    pub(crate) config_reload_successful: bool,
    /// The session budget of each server: limit, sessions open, checks waiting.
    pub(crate) servers: Vec<crate::postgres::pool::ServerView>,
    /// Which part of a split fleet this replica watches (`0` of `1`: all of it).
    pub(crate) shard: ShardReport,
    pub(crate) targets: Vec<TargetReport>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ShardReport {
    /// This replica's shard, from 0.
    pub(crate) index: u32,
    /// How many shards the fleet is split into.
    pub(crate) count: u32,
    /// The targets this replica owns and watches (all of them, whatever the filters).
    pub(crate) targets: usize,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TargetReport {
    pub(crate) name: String,
    /// Where it connects, without the password.
    pub(crate) connection: String,
    /// The worst of: unreachable (failing), its checks' states, its deployment's active
    /// regressions (degraded); `pending` before any result.
    pub(crate) status: Overall,
    /// `null` until the first attempt.
    pub(crate) reachable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) connection_error: Option<String>,
    /// What the target's `version_query` answered last.
    pub(crate) schema_version: Option<String>,
    /// Statistics samples stored since the daemon started.
    pub(crate) samples_recorded: u64,
    /// Whether this replica samples and judges the target, and who does (deployment
    /// tracking only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) leadership: Option<crate::watch::state::Leadership>,
    pub(crate) checks: Vec<CheckReport>,
    /// The latest deployment and its windows (deployment tracking only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) deployment: Option<DeploymentView>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CheckReport {
    pub(crate) name: String,
    /// The pack that defines it.
    pub(crate) pack: String,
    /// `health`, `integrity`, `index_usage`… as the pack says.
    pub(crate) category: String,
    /// `critical` (a failure makes the target failing) or `warning` (degraded).
    pub(crate) severity: String,
    pub(crate) description: String,
    pub(crate) status: Status,
    /// What the latest run returned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<Observation>,
    /// What it must return (`== 0`, `< 0.8`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) expectation: Option<String>,
    /// Why the latest result is what it is, when the check says more than its value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) detail: Option<String>,
    /// The latest error's class (`timeout`, `sql`, `connection`…).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error_kind: Option<String>,
    /// The latest error's message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// RFC 3339: the latest run, the latest that gave a result, the latest that passed.
    pub(crate) last_run: Option<String>,
    pub(crate) last_success: Option<String>,
    pub(crate) last_pass: Option<String>,
    /// How long the latest run took.
    pub(crate) duration_seconds: Option<f64>,
    pub(crate) interval_seconds: f64,
    /// Runs since the daemon started.
    pub(crate) runs: u64,
    /// Runs skipped because the previous one was still running.
    pub(crate) skipped: u64,
    /// Runs skipped because no session became free within the interval.
    pub(crate) skipped_no_session: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_skip: Option<String>,
    /// Why the latest run was skipped, when it was (no session within the interval).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_skip_reason: Option<String>,
    /// Due runs merged into a later run for lack of a session.
    pub(crate) delayed: u64,
    /// Why the latest run started late, while it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) late_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) runbook: Option<String>,
}

fn check_weight(status: Status, severity: Severity) -> Overall {
    match (status, severity) {
        (Status::Fail | Status::Error, Severity::Critical) => Overall::Failing,
        (Status::Fail | Status::Error, Severity::Warning) => Overall::Degraded,
        _ => Overall::Ok,
    }
}

/// Whether the target `name` is the one asked for: the same name, or a database discovered
/// under it (`tenants` selects `tenants/tenant_eu`).
pub(crate) fn target_matches(asked: &str, name: &str) -> bool {
    name == asked
        || name
            .strip_prefix(asked)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The target names of a snapshot, for "no target is named ..." messages.
pub(crate) fn known_targets(snapshot: &Snapshot) -> String {
    let names: Vec<&str> = snapshot.targets.keys().map(String::as_str).collect();
    if names.is_empty() {
        "none is configured".to_string()
    } else {
        format!("known targets: {}", names.join(", "))
    }
}

/// Builds the report. `now` is only used for `generated_at`.
pub(crate) fn build(snapshot: &Snapshot, filter: &Filter, now: Timestamp) -> StatusReport {
    let mut targets = Vec::new();
    let mut overall = Overall::Ok;
    for (name, target) in &snapshot.targets {
        // Before any check has given a result the target is not known to be ok: a daemon
        // that just started must not answer green for a database it has not reached yet. A
        // target without checks has nothing to wait for.
        let nothing_known = !target.checks.is_empty()
            && (target.reachable.is_none()
                || target.checks.values().all(|c| c.status == Status::Pending));
        let mut target_status = match target.reachable {
            Some(false) => Overall::Failing,
            _ if nothing_known => Overall::Pending,
            _ => Overall::Ok,
        };
        for check in target.checks.values() {
            target_status = target_status.max(check_weight(check.status, check.spec.severity));
        }
        let deployment = snapshot.deployments.get(name).cloned();
        if deployment.as_ref().is_some_and(|d| d.has_regressions()) {
            target_status = target_status.max(Overall::Degraded);
        }
        // The overall state is that of the targets asked about (all of them without a target
        // filter); the status and check filters only narrow what is listed.
        if filter
            .target
            .as_ref()
            .is_some_and(|t| !target_matches(t, name))
        {
            continue;
        }
        overall = overall.max(target_status);
        let checks = target
            .checks
            .values()
            .filter(|c| filter.status.is_none_or(|s| s == c.status))
            .filter(|c| filter.check.as_ref().is_none_or(|n| n == &c.spec.name))
            .map(|c| {
                let outcome = c.outcome.as_ref();
                CheckReport {
                    name: c.spec.name.clone(),
                    pack: c.spec.pack.clone(),
                    category: c.spec.category.as_str().to_string(),
                    severity: c.spec.severity.as_str().to_string(),
                    description: c.spec.description.clone(),
                    status: c.status,
                    value: outcome.and_then(|o| o.observation.clone()),
                    expectation: c.spec.expectation.as_ref().map(|e| e.to_string()),
                    detail: outcome.and_then(|o| o.detail.clone()),
                    error_kind: outcome
                        .and_then(|o| o.error.as_ref())
                        .map(|e| e.kind.as_str().to_string()),
                    error: outcome
                        .and_then(|o| o.error.as_ref())
                        .map(|e| e.to_string()),
                    last_run: c.last_run.map(rfc3339),
                    last_success: c.last_success.map(rfc3339),
                    last_pass: c.last_pass.map(rfc3339),
                    duration_seconds: c.duration_seconds,
                    interval_seconds: c.spec.interval.as_secs_f64(),
                    runs: c.runs,
                    skipped: c.skipped,
                    skipped_no_session: c.skipped_no_session,
                    delayed: c.delayed,
                    late_reason: c.last_delay.as_ref().map(|(_, reason)| reason.clone()),
                    last_skip: c.last_skip.as_ref().map(|(at, _)| rfc3339(*at)),
                    last_skip_reason: c
                        .last_skip
                        .as_ref()
                        .filter(|(at, _)| c.last_run.is_none_or(|run| *at >= run))
                        .map(|(_, reason)| reason.clone()),
                    runbook: c.spec.runbook.clone(),
                }
            })
            .collect();
        targets.push(TargetReport {
            name: name.clone(),
            connection: target.display.clone(),
            status: target_status,
            reachable: target.reachable,
            connection_error: target.last_connection_error.clone(),
            schema_version: target.schema_version.clone(),
            samples_recorded: target.samples_recorded,
            leadership: target.leadership.clone(),
            checks,
            deployment,
        });
    }
    StatusReport {
        status: overall,
        generated_at: rfc3339(now),
        config_reload_successful: snapshot.config_reload_ok,
        servers: snapshot.servers.clone(),
        shard: ShardReport {
            index: snapshot.shard.index,
            count: snapshot.shard.count,
            targets: snapshot.targets.len(),
        },
        targets,
    }
}

fn short_value(value: &Option<Observation>) -> String {
    match value {
        None => "-".to_string(),
        Some(Observation::Number(n)) => n.to_string(),
        Some(Observation::Text(t)) => {
            let t = t.replace('\n', " ");
            if t.chars().count() > 28 {
                format!("{}…", t.chars().take(27).collect::<String>())
            } else {
                t
            }
        }
        Some(Observation::Rows(series)) => format!("{} series", series.len()),
    }
}

/// The plain-text table.
pub(crate) fn render_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "deploywatch status: {}   (generated {}{})",
        report.status.as_str().to_uppercase(),
        report.generated_at,
        if report.config_reload_successful {
            ""
        } else {
            ", LAST CONFIG RELOAD FAILED"
        }
    );
    if report.shard.count > 1 {
        let _ = writeln!(
            out,
            "shard {}/{}: this replica watches {} target{} of the fleet",
            report.shard.index,
            report.shard.count,
            report.shard.targets,
            if report.shard.targets == 1 { "" } else { "s" }
        );
    }
    for server in &report.servers {
        let _ = write!(
            out,
            "server {}: {} of {} sessions open ({} in use; limit set by {})",
            server.server, server.open, server.limit, server.in_use, server.limited_by
        );
        match (&server.oldest_waiting, server.oldest_wait_seconds) {
            (Some(who), Some(waited)) if server.queue > 0 => {
                let _ = writeln!(
                    out,
                    ", {} waiting for a session, the oldest ({who}) for {waited:.1}s",
                    server.queue
                );
            }
            _ => {
                let _ = writeln!(out, ", none waiting");
            }
        }
    }
    for target in &report.targets {
        let reach = match target.reachable {
            None => "not tried yet",
            Some(true) => "reachable",
            Some(false) => "UNREACHABLE",
        };
        let _ = writeln!(
            out,
            "\ntarget {} ({}): {}, {}, schema version {}",
            target.name,
            target.connection,
            target.status.as_str(),
            reach,
            target.schema_version.as_deref().unwrap_or("unknown")
        );
        if let Some(error) = &target.connection_error {
            let _ = writeln!(out, "  connection error: {error}");
        }
        match &target.leadership {
            Some(l) if l.leading && l.leader.is_some() => {
                let _ = writeln!(out, "  leader: this replica samples and judges it");
            }
            Some(l) if !l.leading => {
                let _ = writeln!(
                    out,
                    "  follower: {} samples and judges it; this replica takes over if it stops",
                    l.leader.as_deref().unwrap_or(
                        "no replica (the store cannot be reached, or a takeover is due)"
                    )
                );
            }
            _ => {}
        }
        let rows: Vec<[String; 6]> = target
            .checks
            .iter()
            .map(|c| {
                let note = c
                    .last_skip_reason
                    .as_ref()
                    .map(|reason| format!("skipped: {reason}"))
                    .or_else(|| {
                        c.late_reason
                            .as_ref()
                            .map(|reason| format!("late: {reason}"))
                    })
                    .or_else(|| c.error.clone())
                    .or_else(|| c.detail.clone())
                    .unwrap_or_default();
                [
                    c.status.as_str().to_uppercase(),
                    c.name.clone(),
                    c.severity.clone(),
                    short_value(&c.value),
                    c.expectation.clone().unwrap_or_else(|| "(observe)".into()),
                    note,
                ]
            })
            .collect();
        let headers = ["STATUS", "CHECK", "SEVERITY", "VALUE", "EXPECT", "NOTE"];
        let mut widths = headers.map(str::len);
        for row in &rows {
            for (i, cell) in row.iter().enumerate().take(5) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut s = String::from("  ");
            for (i, cell) in cells.iter().enumerate() {
                if i < 5 {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    s.push_str(cell);
                    s.push_str(&" ".repeat(pad + 2));
                } else {
                    s.push_str(cell);
                }
            }
            s.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(headers));
        for row in &rows {
            let _ = writeln!(
                out,
                "{}",
                line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]])
            );
        }
        if let Some(deployment) = &target.deployment {
            out.push_str(&crate::analysis::deployment::render_text(deployment));
        }
    }
    out
}

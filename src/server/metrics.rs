//! Prometheus exposition. A [`prometheus::core::Collector`] renders the in-memory [`State`] at
//! scrape time into metric families, so a scrape never queries a database and always reflects
//! the latest results. Metric and label names are a contract documented in the README; labels
//! are bounded (target, check, category, severity, an error kind, a window, a signal).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};

use crate::analysis::deployment::Signal;
use crate::analysis::window::{Verdict, Window};
use crate::checks::outcome::{Observation, Status};
use crate::watch::state::{Snapshot, State};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot register the deploywatch collector: {0}")]
    Register(#[source] prometheus::Error),
    #[error("cannot encode metrics: {0}")]
    Encode(#[source] prometheus::Error),
}

/// Every family deploywatch exports: name, help, type.
const FAMILIES: &[(&str, &str, MetricType)] = &[
    ("deploywatch_build_info", "Build information; always 1.", MetricType::GAUGE),
    ("deploywatch_config_last_reload_successful", "1 if the last configuration (re)load succeeded.", MetricType::GAUGE),
    ("deploywatch_config_last_reload_success_timestamp_seconds", "Time of the last successful configuration load.", MetricType::GAUGE),
    ("deploywatch_up", "1 if the target database could be reached on the last attempt.", MetricType::GAUGE),
    ("deploywatch_check_success", "1 if the check's last run passed, 0 if it failed or errored.", MetricType::GAUGE),
    ("deploywatch_check_status", "1 for the check's current status (pending, pass, fail, error).", MetricType::GAUGE),
    ("deploywatch_check_value", "The value the check's query returned (scalar checks) or one series per row and value column (rows checks).", MetricType::GAUGE),
    ("deploywatch_check_duration_seconds", "Duration of the check's last run.", MetricType::GAUGE),
    ("deploywatch_check_last_run_timestamp_seconds", "Time of the check's last run.", MetricType::GAUGE),
    ("deploywatch_check_last_success_timestamp_seconds", "Time of the check's last run that completed without an error (pass or fail).", MetricType::GAUGE),
    ("deploywatch_check_interval_seconds", "The check's configured interval.", MetricType::GAUGE),
    ("deploywatch_check_runs_total", "Runs of the check.", MetricType::COUNTER),
    ("deploywatch_check_errors_total", "Runs of the check that ended in an error, by kind.", MetricType::COUNTER),
    ("deploywatch_check_delayed_total", "Due runs merged into a later run because no session to the server was free at their time: the check ran late, once, instead of being skipped.", MetricType::COUNTER),
    ("deploywatch_check_skipped_total", "Runs skipped, by reason: overlap (the previous run was still going) or no_session (no session to the server within ten intervals).", MetricType::COUNTER),
    ("deploywatch_check_rows_examined", "Incremental check: rows of its table the last run read (increment and sweep chunks).", MetricType::GAUGE),
    ("deploywatch_check_rows_examined_total", "Incremental check: rows of its table read, summed over runs.", MetricType::COUNTER),
    ("deploywatch_check_sweep_progress_ratio", "Incremental check: share of the current sweep done (1 between sweeps).", MetricType::GAUGE),
    ("deploywatch_check_sweep_last_complete_timestamp_seconds", "Incremental check: when its last complete sweep ended.", MetricType::GAUGE),
    ("deploywatch_check_sweep_period_seconds", "Incremental check: its sweep period (every sweep completes within it).", MetricType::GAUGE),
    ("deploywatch_server_sessions", "Sessions open to the server (in use, idle or closing), all its targets together.", MetricType::GAUGE),
    ("deploywatch_server_session_limit", "Sessions allowed to the server now: max_connections_per_server, or less when the server's share of max_connections is smaller.", MetricType::GAUGE),
    ("deploywatch_server_session_queue", "Checks and samplers waiting for a session to the server.", MetricType::GAUGE),
    ("deploywatch_server_session_oldest_wait_seconds", "How long the oldest waiting check has waited for a session (0 when none waits).", MetricType::GAUGE),
    ("deploywatch_schema_version_info", "The target's schema version, from its version query; always 1.", MetricType::GAUGE),
    ("deploywatch_pg_connections", "Backends in use on the target's server (sampled).", MetricType::GAUGE),
    ("deploywatch_pg_max_connections", "The target server's max_connections (sampled).", MetricType::GAUGE),
    ("deploywatch_sampling_errors_total", "Failed sampling steps of the target, by step (version, statistics).", MetricType::COUNTER),
    ("deploywatch_deployment_info", "The target's latest deployment; always 1.", MetricType::GAUGE),
    ("deploywatch_deployment_timestamp_seconds", "Time of the target's latest deployment.", MetricType::GAUGE),
    ("deploywatch_deployment_window", "1 for the window the latest deployment is in now, 0 for the others.", MetricType::GAUGE),
    ("deploywatch_window_verdict", "1 for each window's verdict (watching, pass, regression, inconclusive).", MetricType::GAUGE),
    ("deploywatch_regressions", "Regression flags shown in a window, by signal: suspected or confirmed, not resolved.", MetricType::GAUGE),
    ("deploywatch_confirmed_regressions", "Confirmed regressions in a window, by signal: found at two consecutive looks or when the window closed, not resolved. What pages.", MetricType::GAUGE),
    ("deploywatch_improvements", "Improvements found in a window, by signal.", MetricType::GAUGE),
    ("deploywatch_rollbacks_total", "Schema version rollbacks seen on the target.", MetricType::COUNTER),
    ("deploywatch_shard_info", "This replica's shard of the fleet (shard of shards); always 1.", MetricType::GAUGE),
    ("deploywatch_shards", "How many shards the fleet is split into (1: one replica watches every target).", MetricType::GAUGE),
    ("deploywatch_shard_targets", "Targets this replica owns and watches.", MetricType::GAUGE),
    ("deploywatch_store_bytes", "Bytes the state store takes (SQLite: database file and write-ahead log; PostgreSQL: its schema's tables and indexes).", MetricType::GAUGE),
    ("deploywatch_target_leader", "1 when this replica samples and judges the target's deployments (always, with a store of its own; with a shared store, while it holds the target's lock there), 0 when another replica does.", MetricType::GAUGE),
    ("deploywatch_store_errors_total", "Failed state store operations, by operation.", MetricType::COUNTER),
    ("deploywatch_sampling_duration_seconds", "Duration of the target's last deployment-tracking sampling pass.", MetricType::GAUGE),
    ("deploywatch_judging_duration_seconds", "Duration of the target's last judging pass over its deployment windows.", MetricType::GAUGE),
    ("deploywatch_log_lines_dropped_total", "Log lines dropped because standard error did not keep up.", MetricType::COUNTER),
];

/// The lossy log writer's count of dropped lines, when the process logs through one.
static LOG_DROPS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Exports the lossy log writer's dropped-line count (`main` calls this once).
pub fn count_dropped_log_lines(counter: tracing_appender::non_blocking::ErrorCounter) {
    let _ = LOG_DROPS.set(counter);
}

/// Log lines dropped so far (0 when logging is not lossy).
pub(crate) fn log_lines_dropped() -> u64 {
    LOG_DROPS
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}

/// Renders a [`State`] as metric families.
pub(crate) struct StateCollector {
    state: Arc<State>,
    version: String,
    descs: Vec<Desc>,
}

impl StateCollector {
    pub(crate) fn new(state: Arc<State>) -> Self {
        let descs = FAMILIES
            .iter()
            .filter_map(|(name, help, _)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    vec![],
                    Default::default(),
                )
                .ok()
            })
            .collect();
        StateCollector {
            state,
            version: env!("CARGO_PKG_VERSION").to_string(),
            descs,
        }
    }
}

/// Builds families in a fixed order; each sample names its family.
struct Families(BTreeMap<&'static str, MetricFamily>);

impl Families {
    fn new() -> Self {
        let mut map = BTreeMap::new();
        for (name, help, kind) in FAMILIES {
            let mut family = MetricFamily::default();
            family.set_name(name.to_string());
            family.set_help(help.to_string());
            family.set_field_type(*kind);
            map.insert(*name, family);
        }
        Families(map)
    }

    fn push(&mut self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        let Some(family) = self.0.get_mut(name) else {
            return;
        };
        let mut metric = Metric::default();
        metric.set_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut pair = LabelPair::default();
                    pair.set_name(k.to_string());
                    pair.set_value(v.to_string());
                    pair
                })
                .collect(),
        );
        if family.get_field_type() == MetricType::COUNTER {
            let mut counter = Counter::default();
            counter.set_value(value);
            metric.set_counter(counter);
        } else {
            let mut gauge = Gauge::default();
            gauge.set_value(value);
            metric.set_gauge(gauge);
        }
        family.mut_metric().push(metric);
    }

    fn into_vec(self) -> Vec<MetricFamily> {
        self.0
            .into_values()
            .filter(|f| !f.get_metric().is_empty())
            .collect()
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Pure rendering of a snapshot into families (tested without a registry).
pub(crate) fn families(
    snapshot: &Snapshot,
    version: &str,
    log_lines_dropped: u64,
) -> Vec<MetricFamily> {
    let mut f = Families::new();
    f.push("deploywatch_build_info", &[("version", version)], 1.0);
    f.push(
        "deploywatch_log_lines_dropped_total",
        &[],
        log_lines_dropped as f64,
    );
    f.push(
        "deploywatch_config_last_reload_successful",
        &[],
        flag(snapshot.config_reload_ok),
    );
    let (index, count) = (
        snapshot.shard.index.to_string(),
        snapshot.shard.count.to_string(),
    );
    f.push(
        "deploywatch_shard_info",
        &[("shard", index.as_str()), ("shards", count.as_str())],
        1.0,
    );
    f.push("deploywatch_shards", &[], f64::from(snapshot.shard.count));
    f.push(
        "deploywatch_shard_targets",
        &[],
        snapshot.targets.len() as f64,
    );
    if let Some(ts) = snapshot.config_last_reload_success {
        f.push(
            "deploywatch_config_last_reload_success_timestamp_seconds",
            &[],
            ts,
        );
    }
    for server in &snapshot.servers {
        let labels = [("server", server.server.as_str())];
        f.push("deploywatch_server_sessions", &labels, server.open as f64);
        f.push(
            "deploywatch_server_session_limit",
            &labels,
            server.limit as f64,
        );
        f.push(
            "deploywatch_server_session_queue",
            &labels,
            server.queue as f64,
        );
        f.push(
            "deploywatch_server_session_oldest_wait_seconds",
            &labels,
            server.oldest_wait_seconds.unwrap_or(0.0),
        );
    }
    if let Some(bytes) = snapshot.store.bytes {
        f.push("deploywatch_store_bytes", &[], bytes);
    }
    for (operation, count) in &snapshot.store.errors {
        f.push(
            "deploywatch_store_errors_total",
            &[("operation", operation)],
            *count as f64,
        );
    }
    for (target, t) in &snapshot.targets {
        let target = target.as_str();
        f.push(
            "deploywatch_up",
            &[("target", target)],
            flag(t.reachable == Some(true)),
        );
        if let Some(leadership) = &t.leadership {
            f.push(
                "deploywatch_target_leader",
                &[("target", target)],
                flag(leadership.leading),
            );
        }
        if let Some(seconds) = t.sampling_seconds {
            f.push(
                "deploywatch_sampling_duration_seconds",
                &[("target", target)],
                seconds,
            );
        }
        if let Some(seconds) = t.judging_seconds {
            f.push(
                "deploywatch_judging_duration_seconds",
                &[("target", target)],
                seconds,
            );
        }
        if let Some(version) = &t.schema_version {
            f.push(
                "deploywatch_schema_version_info",
                &[("target", target), ("version", version)],
                1.0,
            );
        }
        for (step, count) in &t.sampling_errors {
            f.push(
                "deploywatch_sampling_errors_total",
                &[("target", target), ("step", step)],
                *count as f64,
            );
        }
        if let Some((in_use, max)) = t.connections {
            f.push("deploywatch_pg_connections", &[("target", target)], in_use);
            f.push("deploywatch_pg_max_connections", &[("target", target)], max);
        }
        for (check, c) in &t.checks {
            let check = check.as_str();
            let category = c.spec.category.as_str();
            let severity = c.spec.severity.as_str();
            let ids = [("target", target), ("check", check)];
            let full = [
                ("target", target),
                ("check", check),
                ("category", category),
                ("severity", severity),
            ];
            f.push(
                "deploywatch_check_success",
                &full,
                flag(c.status == Status::Pass),
            );
            for &status in Status::ALL {
                let mut labels = full.to_vec();
                labels.push(("status", status.as_str()));
                f.push(
                    "deploywatch_check_status",
                    &labels,
                    flag(c.status == status),
                );
            }
            match c.outcome.as_ref().and_then(|o| o.observation.as_ref()) {
                Some(Observation::Number(n)) => {
                    f.push("deploywatch_check_value", &full, n.to_f64())
                }
                Some(Observation::Rows(series)) => {
                    for s in series {
                        let mut labels = full.to_vec();
                        labels.push(("column", s.column.as_str()));
                        labels.extend(s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                        f.push("deploywatch_check_value", &labels, s.value);
                    }
                }
                Some(Observation::Text(_)) | None => {}
            }
            if let Some(d) = c.duration_seconds {
                f.push("deploywatch_check_duration_seconds", &ids, d);
            }
            if let Some(ts) = c.last_run {
                f.push("deploywatch_check_last_run_timestamp_seconds", &ids, ts);
            }
            if let Some(ts) = c.last_success {
                f.push("deploywatch_check_last_success_timestamp_seconds", &ids, ts);
            }
            f.push(
                "deploywatch_check_interval_seconds",
                &ids,
                c.spec.interval.as_secs_f64(),
            );
            f.push("deploywatch_check_runs_total", &ids, c.runs as f64);
            f.push("deploywatch_check_delayed_total", &ids, c.delayed as f64);
            for (reason, count) in [("overlap", c.skipped), ("no_session", c.skipped_no_session)] {
                f.push(
                    "deploywatch_check_skipped_total",
                    &[("target", target), ("check", check), ("reason", reason)],
                    count as f64,
                );
            }
            if let Some(def) = &c.spec.incremental {
                f.push(
                    "deploywatch_check_sweep_period_seconds",
                    &ids,
                    def.sweep_period.as_secs_f64(),
                );
                f.push(
                    "deploywatch_check_rows_examined_total",
                    &ids,
                    c.rows_examined_total as f64,
                );
            }
            if let Some(report) = &c.incremental {
                f.push(
                    "deploywatch_check_rows_examined",
                    &ids,
                    report.rows_examined as f64,
                );
                f.push(
                    "deploywatch_check_sweep_progress_ratio",
                    &ids,
                    report.sweep_progress,
                );
                if let Some(ts) = report.last_complete_sweep {
                    f.push(
                        "deploywatch_check_sweep_last_complete_timestamp_seconds",
                        &ids,
                        ts,
                    );
                }
            }
            for (kind, count) in &c.errors {
                f.push(
                    "deploywatch_check_errors_total",
                    &[
                        ("target", target),
                        ("check", check),
                        ("kind", kind.as_str()),
                    ],
                    *count as f64,
                );
            }
        }
    }
    for (target, d) in &snapshot.deployments {
        let target = target.as_str();
        f.push(
            "deploywatch_deployment_info",
            &[
                ("target", target),
                ("version", &d.to_version),
                ("previous_version", d.from_version.as_deref().unwrap_or("")),
                ("kind", d.kind.as_str()),
            ],
            1.0,
        );
        f.push(
            "deploywatch_deployment_timestamp_seconds",
            &[("target", target)],
            d.at,
        );
        f.push(
            "deploywatch_rollbacks_total",
            &[("target", target)],
            d.rollbacks_seen as f64,
        );
        for &window in Window::ALL {
            f.push(
                "deploywatch_deployment_window",
                &[("target", target), ("window", window.as_str())],
                flag(d.current_window == Some(window)),
            );
        }
        for w in &d.windows {
            let window = w.window.as_str();
            for &verdict in Verdict::ALL {
                f.push(
                    "deploywatch_window_verdict",
                    &[
                        ("target", target),
                        ("window", window),
                        ("verdict", verdict.as_str()),
                    ],
                    flag(w.verdict == verdict),
                );
            }
            for &signal in Signal::ALL {
                let regressions = w
                    .regressions
                    .iter()
                    .filter(|r| r.signal == signal && r.active())
                    .count();
                let confirmed = w
                    .regressions
                    .iter()
                    .filter(|r| r.signal == signal && r.confirmed())
                    .count();
                let improvements = w.improvements.iter().filter(|r| r.signal == signal).count();
                let labels = [
                    ("target", target),
                    ("window", window),
                    ("signal", signal.as_str()),
                ];
                f.push("deploywatch_regressions", &labels, regressions as f64);
                f.push(
                    "deploywatch_confirmed_regressions",
                    &labels,
                    confirmed as f64,
                );
                f.push("deploywatch_improvements", &labels, improvements as f64);
            }
        }
    }
    f.into_vec()
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families(&self.state.snapshot(), &self.version, log_lines_dropped())
    }
}

/// A registry holding deploywatch's collector. Passed explicitly; there is no global one.
pub(crate) fn registry(state: Arc<State>) -> Result<Registry, MetricsError> {
    let registry = Registry::new();
    registry
        .register(Box::new(StateCollector::new(state)))
        .map_err(MetricsError::Register)?;
    Ok(registry)
}

/// The text exposition of everything in the registry.
pub(crate) fn render(registry: &Registry) -> Result<String, MetricsError> {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .map_err(MetricsError::Encode)?;
    Ok(String::from_utf8_lossy(&buffer).into_owned())
}

pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn value(families: &[MetricFamily], name: &str) -> Option<f64> {
        let family = families.iter().find(|f| f.get_name() == name)?;
        let metric = family.get_metric().first()?;
        Some(match family.get_field_type() {
            MetricType::COUNTER => metric.get_counter().get_value(),
            _ => metric.get_gauge().get_value(),
        })
    }

    #[test]
    fn dropped_log_lines_are_a_counter_even_when_none_were_dropped() {
        let snapshot = Snapshot::default();
        let none = families(&snapshot, "1.0.0", 0);
        assert_eq!(
            value(&none, "deploywatch_log_lines_dropped_total"),
            Some(0.0)
        );
        let some = families(&snapshot, "1.0.0", 7);
        assert_eq!(
            value(&some, "deploywatch_log_lines_dropped_total"),
            Some(7.0)
        );
        let family = some
            .iter()
            .find(|f| f.get_name() == "deploywatch_log_lines_dropped_total")
            .map(|f| f.get_field_type());
        assert_eq!(family, Some(MetricType::COUNTER));
    }
}

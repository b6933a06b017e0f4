//! Prometheus exposition. [`render`] writes the in-memory [`State`] at scrape time straight
//! into the text format 0.0.4, so a scrape never queries a database and always reflects the
//! latest results. It streams: the state is read family by family, a few targets at a time
//! under its lock, and the text is handed on in chunks of [`CHUNK_BYTES`], so a scrape holds
//! neither a copy of the state nor the whole text (tens of megabytes at hundreds of
//! databases). Metric and label names are a contract documented in the README; labels are
//! bounded (target, check, category, severity, an error kind, a window, a signal).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Bound;
use std::sync::OnceLock;

use crate::analysis::deployment::{DeploymentView, Signal};
use crate::analysis::window::{Verdict, Window};
use crate::checks::outcome::{Observation, Status};
use crate::watch::state::{Snapshot, State, TargetState};

/// A family's type, as the `# TYPE` line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricType {
    Gauge,
    Counter,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Gauge => "gauge",
            MetricType::Counter => "counter",
        }
    }
}

/// Every family deploywatch exports: name, help, type.
const FAMILIES: &[(&str, &str, MetricType)] = &[
    ("deploywatch_build_info", "Build information; always 1.", MetricType::Gauge),
    ("deploywatch_config_last_reload_successful", "1 if the last configuration (re)load succeeded.", MetricType::Gauge),
    ("deploywatch_config_last_reload_success_timestamp_seconds", "Time of the last successful configuration load.", MetricType::Gauge),
    ("deploywatch_up", "1 if the target database could be reached on the last attempt.", MetricType::Gauge),
    ("deploywatch_check_success", "1 if the check's last run passed, 0 if it failed or errored.", MetricType::Gauge),
    ("deploywatch_check_status", "1 for the check's current status (pending, pass, fail, error).", MetricType::Gauge),
    ("deploywatch_check_value", "The value the check's query returned (scalar checks) or one series per row and value column (rows checks).", MetricType::Gauge),
    ("deploywatch_check_duration_seconds", "Duration of the check's last run.", MetricType::Gauge),
    ("deploywatch_check_last_run_timestamp_seconds", "Time of the check's last run.", MetricType::Gauge),
    ("deploywatch_check_last_success_timestamp_seconds", "Time of the check's last run that completed without an error (pass or fail).", MetricType::Gauge),
    ("deploywatch_check_interval_seconds", "The check's configured interval.", MetricType::Gauge),
    ("deploywatch_check_runs_total", "Runs of the check.", MetricType::Counter),
    ("deploywatch_check_errors_total", "Runs of the check that ended in an error, by kind.", MetricType::Counter),
    ("deploywatch_check_delayed_total", "Due runs merged into a later run because no session to the server was free at their time: the check ran late, once, instead of being skipped.", MetricType::Counter),
    ("deploywatch_check_skipped_total", "Runs skipped, by reason: overlap (the previous run was still going) or no_session (no session to the server within ten intervals).", MetricType::Counter),
    ("deploywatch_check_rows_examined", "Incremental check: rows of its table the last run read (increment and sweep chunks).", MetricType::Gauge),
    ("deploywatch_check_rows_examined_total", "Incremental check: rows of its table read, summed over runs.", MetricType::Counter),
    ("deploywatch_check_sweep_progress_ratio", "Incremental check: share of the current sweep done (1 between sweeps).", MetricType::Gauge),
    ("deploywatch_check_sweep_last_complete_timestamp_seconds", "Incremental check: when its last complete sweep ended.", MetricType::Gauge),
    ("deploywatch_check_sweep_period_seconds", "Incremental check: its sweep period (every sweep completes within it).", MetricType::Gauge),
    ("deploywatch_server_sessions", "Sessions open to the server (in use, idle or closing), all its targets together.", MetricType::Gauge),
    ("deploywatch_server_session_limit", "Sessions allowed to the server now: max_connections_per_server, or less when the server's share of max_connections is smaller.", MetricType::Gauge),
    ("deploywatch_server_session_queue", "Checks and samplers waiting for a session to the server.", MetricType::Gauge),
    ("deploywatch_server_session_oldest_wait_seconds", "How long the oldest waiting check has waited for a session (0 when none waits).", MetricType::Gauge),
    ("deploywatch_schema_version_info", "The target's schema version, from its version query; always 1.", MetricType::Gauge),
    ("deploywatch_pg_connections", "Backends in use on the target's server (sampled).", MetricType::Gauge),
    ("deploywatch_pg_max_connections", "The target server's max_connections (sampled).", MetricType::Gauge),
    ("deploywatch_sampling_errors_total", "Failed sampling steps of the target, by step (version, statistics).", MetricType::Counter),
    ("deploywatch_deployment_info", "The target's latest deployment; always 1.", MetricType::Gauge),
    ("deploywatch_deployment_timestamp_seconds", "Time of the target's latest deployment.", MetricType::Gauge),
    ("deploywatch_deployment_window", "1 for the window the latest deployment is in now, 0 for the others.", MetricType::Gauge),
    ("deploywatch_window_verdict", "1 for each window's verdict (watching, pass, regression, inconclusive).", MetricType::Gauge),
    ("deploywatch_regressions", "Regression flags shown in a window, by signal: suspected or confirmed, not resolved.", MetricType::Gauge),
    ("deploywatch_confirmed_regressions", "Confirmed regressions in a window, by signal: found at two consecutive looks or when the window closed, not resolved. What pages.", MetricType::Gauge),
    ("deploywatch_improvements", "Improvements found in a window, by signal.", MetricType::Gauge),
    ("deploywatch_rollbacks_total", "Schema version rollbacks seen on the target.", MetricType::Counter),
    ("deploywatch_shard_info", "This replica's shard of the fleet (shard of shards); always 1.", MetricType::Gauge),
    ("deploywatch_shards", "How many shards the fleet is split into (1: one replica watches every target).", MetricType::Gauge),
    ("deploywatch_shard_targets", "Targets this replica owns and watches.", MetricType::Gauge),
    ("deploywatch_store_bytes", "Bytes the state store takes (SQLite: database file and write-ahead log; PostgreSQL: its schema's tables and indexes).", MetricType::Gauge),
    ("deploywatch_target_leader", "1 when this replica samples and judges the target's deployments (always, with a store of its own; with a shared store, while it holds the target's lock there), 0 when another replica does.", MetricType::Gauge),
    ("deploywatch_store_errors_total", "Failed state store operations, by operation.", MetricType::Counter),
    ("deploywatch_sampling_duration_seconds", "Duration of the target's last deployment-tracking sampling pass.", MetricType::Gauge),
    ("deploywatch_judging_duration_seconds", "Duration of the target's last judging pass over its deployment windows.", MetricType::Gauge),
    ("deploywatch_log_lines_dropped_total", "Log lines dropped because standard error did not keep up.", MetricType::Counter),
    ("deploywatch_scrapes_refused_total", "Requests for /metrics refused with 503 because server.max_concurrent_scrapes scrapes were already being written.", MetricType::Counter),
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

/// Text is handed on in chunks of about this size: a scrape holds one chunk, never the whole
/// exposition (tens of megabytes at a fleet of hundreds of databases).
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

/// Where the exposition reads the state from, one short look at a time.
pub(crate) trait Source {
    /// Runs `read` on the state (under its lock, for the live state).
    fn read(&self, read: &mut dyn FnMut(&Snapshot));
}

impl Source for Snapshot {
    fn read(&self, read: &mut dyn FnMut(&Snapshot)) {
        read(self);
    }
}

impl Source for State {
    fn read(&self, read: &mut dyn FnMut(&Snapshot)) {
        self.read_all(|snapshot| read(snapshot));
    }
}

/// Writes one family at a time: samples pushed for any other family are ignored, and the
/// family's `# HELP` and `# TYPE` lines go before its first sample (a family without samples
/// is left out). Full chunks go to `emit`, which answers false once nobody reads any more.
struct Writer<'e> {
    family: &'static str,
    help: &'static str,
    kind: MetricType,
    started: bool,
    out: String,
    emit: &'e mut dyn FnMut(String) -> bool,
    /// `emit` refused a chunk: the rest is not written.
    gone: bool,
}

impl<'e> Writer<'e> {
    fn new(emit: &'e mut dyn FnMut(String) -> bool) -> Self {
        Writer {
            family: "",
            help: "",
            kind: MetricType::Gauge,
            started: false,
            out: String::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4),
            emit,
            gone: false,
        }
    }

    /// Starts the next family.
    fn begin(&mut self, (family, help, kind): (&'static str, &'static str, MetricType)) {
        self.family = family;
        self.help = help;
        self.kind = kind;
        self.started = false;
    }

    /// Whether samples of `name` are written now.
    fn wants(&self, name: &str) -> bool {
        name == self.family
    }

    /// Whether the chunk is full (the caller lets go of the state and flushes).
    fn full(&self) -> bool {
        self.out.len() >= CHUNK_BYTES
    }

    /// Hands the text written so far on.
    fn flush(&mut self) {
        if self.out.is_empty() || self.gone {
            return;
        }
        let chunk = std::mem::replace(
            &mut self.out,
            String::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4),
        );
        if !(self.emit)(chunk) {
            self.gone = true;
        }
    }

    /// Appends `name{k="v",...} value` when `name` is the family being written.
    fn push(&mut self, name: &'static str, labels: &[(&str, &str)], value: f64) {
        if !self.wants(name) {
            return;
        }
        let out = &mut self.out;
        if !self.started {
            self.started = true;
            out.push_str("# HELP ");
            out.push_str(name);
            out.push(' ');
            escape_into(out, self.help, false);
            out.push_str("\n# TYPE ");
            out.push_str(name);
            out.push(' ');
            out.push_str(self.kind.as_str());
            out.push('\n');
        }
        out.push_str(name);
        let mut separator = '{';
        for (key, label_value) in labels {
            out.push(separator);
            out.push_str(key);
            out.push_str("=\"");
            escape_into(out, label_value, true);
            out.push('"');
            separator = ',';
        }
        if !labels.is_empty() {
            out.push('}');
        }
        out.push(' ');
        write_value(out, value);
        out.push('\n');
    }
}

/// The families in name order, as the text format groups them.
fn families_by_name() -> Vec<(&'static str, &'static str, MetricType)> {
    let mut families = FAMILIES.to_vec();
    families.sort_by_key(|f| f.0);
    families
}

/// Escapes as the text format requires: backslash and newline always, the double quote in
/// label values.
fn escape_into(out: &mut String, value: &str, quote: bool) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// A sample value: Rust's shortest round-trip form of the number, and `+Inf`, `-Inf`, `NaN`
/// for the values the text format spells so.
fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        // Writing into a String cannot fail.
        let _ = write!(out, "{value}");
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The samples that are not a target's: the build, the configuration, the shard, the servers' session budgets, the store.
fn global_samples(snapshot: &Snapshot, version: &str, log_lines_dropped: u64, f: &mut Writer<'_>) {
    f.push("deploywatch_build_info", &[("version", version)], 1.0);
    f.push(
        "deploywatch_log_lines_dropped_total",
        &[],
        log_lines_dropped as f64,
    );
    f.push(
        "deploywatch_scrapes_refused_total",
        &[],
        snapshot.scrapes_refused as f64,
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
}

/// One target's samples. `check_family`: whether the family being written is one of the
/// checks' families; if not, the checks are not looked at.
fn target_samples(target: &str, t: &TargetState, check_family: bool, f: &mut Writer<'_>) {
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
    if !check_family {
        return;
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
            let [l0, l1, l2, l3] = full;
            f.push(
                "deploywatch_check_status",
                &[l0, l1, l2, l3, ("status", status.as_str())],
                flag(c.status == status),
            );
        }
        match c.outcome.as_ref().and_then(|o| o.observation.as_ref()) {
            Some(Observation::Number(n)) => f.push("deploywatch_check_value", &full, n.to_f64()),
            Some(Observation::Rows(series)) if f.wants("deploywatch_check_value") => {
                for s in series {
                    let mut labels = full.to_vec();
                    labels.push(("column", s.column.as_str()));
                    labels.extend(s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    f.push("deploywatch_check_value", &labels, s.value);
                }
            }
            Some(Observation::Rows(_) | Observation::Text(_)) | None => {}
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
                def.sweep.period.as_secs_f64(),
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

/// The samples of a target's latest deployment and its windows.
fn deployment_samples(target: &str, d: &DeploymentView, f: &mut Writer<'_>) {
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
        let counts = f.wants("deploywatch_regressions")
            || f.wants("deploywatch_confirmed_regressions")
            || f.wants("deploywatch_improvements");
        if !counts {
            continue;
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

/// Writes the text exposition of `source` family by family, in chunks of about
/// [`CHUNK_BYTES`] handed to `emit` (which answers false to stop). The state is read a little
/// at a time — the samples of one family for as many targets as fill a chunk — so no copy of
/// it is made and its lock is never held for long: checks record their results and `/status`
/// reads between two looks. A family's samples of different targets may be read a moment
/// apart, as they would be by separate scrapes.
pub(crate) fn write(
    source: &dyn Source,
    version: &str,
    log_lines_dropped: u64,
    emit: &mut dyn FnMut(String) -> bool,
) {
    let mut w = Writer::new(emit);
    for family in families_by_name() {
        w.begin(family);
        source.read(&mut |s| global_samples(s, version, log_lines_dropped, &mut w));
        // deploywatch_check_*: the families of checks.
        let check_family = family.0.split('_').nth(1) == Some("check");
        write_each(
            source,
            &mut w,
            |s| &s.targets,
            |target, t, w| target_samples(target, t, check_family, w),
        );
        write_each(source, &mut w, |s| &s.deployments, deployment_samples);
        if w.gone {
            return;
        }
    }
    w.flush();
}

/// Writes the samples `samples` makes of every entry of the map of targets `map` picks from
/// the state, reading the state again, from the entry after the last one written, whenever a
/// chunk is full.
fn write_each<V>(
    source: &dyn Source,
    w: &mut Writer<'_>,
    map: fn(&Snapshot) -> &BTreeMap<String, V>,
    mut samples: impl FnMut(&str, &V, &mut Writer<'_>),
) {
    let mut after: Option<String> = None;
    loop {
        let mut more = false;
        source.read(&mut |s| {
            let mut last = None;
            let range = match &after {
                None => map(s).range::<str, _>(..),
                Some(a) => map(s).range::<str, _>((Bound::Excluded(a.as_str()), Bound::Unbounded)),
            };
            for (target, value) in range {
                samples(target, value, w);
                last = Some(target);
                if w.full() {
                    more = true;
                    break;
                }
            }
            if more {
                after = last.cloned();
            }
        });
        if w.full() {
            w.flush();
        }
        if !more || w.gone {
            break;
        }
    }
}

/// The whole text exposition of a snapshot, in one string.
#[cfg(test)]
pub(crate) fn exposition(snapshot: &Snapshot, version: &str, log_lines_dropped: u64) -> String {
    let mut text = String::new();
    write(snapshot, version, log_lines_dropped, &mut |chunk| {
        text.push_str(&chunk);
        true
    });
    text
}

/// Streams the text exposition of the live state to `emit`, chunk by chunk.
pub(crate) fn render(state: &State, emit: &mut dyn FnMut(String) -> bool) {
    write(state, env!("CARGO_PKG_VERSION"), log_lines_dropped(), emit);
}

pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A sample: family, labels, value.
    type Sample<'a> = (&'static str, Vec<(&'a str, &'a str)>, f64);

    fn scrape(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse")
    }

    fn value(scrape: &prometheus_parse::Scrape, name: &str) -> Option<prometheus_parse::Value> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| s.value.clone())
    }

    /// The same samples through the prometheus crate's protobuf families and `TextEncoder`,
    /// families in name order as its registry gathered them.
    fn encoded(samples: &[Sample<'_>]) -> String {
        use prometheus::proto;
        let mut by_name: BTreeMap<&str, proto::MetricFamily> = BTreeMap::new();
        for (name, labels, value) in samples {
            let (_, help, kind) = FAMILIES
                .iter()
                .find(|(n, _, _)| n == name)
                .expect("a family");
            let family = by_name.entry(name).or_insert_with(|| {
                let mut family = proto::MetricFamily::default();
                family.set_name(name.to_string());
                family.set_help(help.to_string());
                family.set_field_type(match kind {
                    MetricType::Counter => proto::MetricType::COUNTER,
                    MetricType::Gauge => proto::MetricType::GAUGE,
                });
                family
            });
            let mut metric = proto::Metric::default();
            metric.set_label(
                labels
                    .iter()
                    .map(|(k, v)| {
                        let mut pair = proto::LabelPair::default();
                        pair.set_name(k.to_string());
                        pair.set_value(v.to_string());
                        pair
                    })
                    .collect(),
            );
            if *kind == MetricType::Counter {
                let mut counter = proto::Counter::default();
                counter.set_value(*value);
                metric.set_counter(counter);
            } else {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(*value);
                metric.set_gauge(gauge);
            }
            family.mut_metric().push(metric);
        }
        let families: Vec<_> = by_name.into_values().collect();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .expect("encode")
    }

    fn written(samples: &[Sample<'_>]) -> String {
        let mut text = String::new();
        let mut emit = |chunk: String| {
            text.push_str(&chunk);
            true
        };
        let mut w = Writer::new(&mut emit);
        for family in families_by_name() {
            w.begin(family);
            for (name, labels, value) in samples {
                w.push(name, labels, *value);
            }
        }
        w.flush();
        drop(w);
        text
    }

    /// `targets` databases of `checks` checks each, every check run once (a few pass, the
    /// rest fail with a value), and a deployment per database.
    fn fleet(targets: usize, checks: usize) -> Snapshot {
        use crate::checks::number::Number;
        use crate::checks::outcome::CheckOutcome;
        use crate::checks::spec::{Category, CheckSpec, Severity, Shape};
        use crate::watch::state::CheckState;
        use std::sync::Arc;
        use std::time::Duration;
        let mut snapshot = Snapshot::default();
        for t in 0..targets {
            let mut target = TargetState {
                reachable: Some(true),
                ..TargetState::default()
            };
            for c in 0..checks {
                let spec = Arc::new(CheckSpec {
                    name: format!("check_{c}"),
                    pack: "p".into(),
                    category: Category::Health,
                    severity: Severity::Warning,
                    description: String::new(),
                    sql: "select 1".into(),
                    bind: vec![],
                    expectation: None,
                    interval: Duration::from_secs(60),
                    timeout: Duration::from_secs(5),
                    lock_timeout: Duration::from_secs(1),
                    runbook: None,
                    shape: Shape::Scalar,
                    incremental: None,
                });
                let mut check = CheckState::new(spec);
                check.status = if c % 3 == 0 {
                    Status::Pass
                } else {
                    Status::Fail
                };
                check.runs = (t * c) as u64;
                check.last_run = Some(1.7e9 + c as f64);
                check.duration_seconds = Some(0.002);
                check.outcome = Some(CheckOutcome {
                    status: check.status,
                    observation: Some(Observation::Number(Number::Float(c as f64))),
                    error: None,
                    detail: None,
                });
                target.checks.insert(format!("check_{c}"), check);
            }
            snapshot.targets.insert(format!("tenant_{t:04}"), target);
        }
        snapshot
    }

    #[test]
    fn a_fleet_is_written_in_chunks_of_bounded_size_that_make_the_whole_text() {
        let snapshot = fleet(120, 26);
        let whole = exposition(&snapshot, "1.0.0", 0);
        assert!(whole.len() > 20 * CHUNK_BYTES, "{} bytes", whole.len());
        let mut chunks = Vec::new();
        write(&snapshot, "1.0.0", 0, &mut |chunk| {
            chunks.push(chunk);
            true
        });
        // No chunk holds much more than a chunk's worth: one target's lines of one family
        // may go past the mark, never the whole text.
        let largest = chunks.iter().map(String::len).max().unwrap_or(0);
        assert!(
            largest <= CHUNK_BYTES + 16 * 1024,
            "largest chunk {largest} bytes of {}",
            whole.len()
        );
        assert!(chunks.len() > 20, "{} chunks", chunks.len());
        assert_eq!(chunks.concat(), whole);
        // The text is the one a family-by-family writer makes of the same samples: every
        // family once, its samples together, in name order.
        let parsed = scrape(&whole);
        assert_eq!(
            parsed
                .samples
                .iter()
                .filter(|s| s.metric == "deploywatch_check_status")
                .count(),
            120 * 26 * Status::ALL.len()
        );
        let mut seen = Vec::new();
        for line in whole.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap_or_default();
            assert!(!seen.contains(&name), "{name} twice");
            seen.push(name);
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(seen, sorted);
    }

    #[test]
    fn the_live_state_is_not_locked_while_a_chunk_is_handed_on_and_a_gone_reader_stops_it() {
        let state = State::from_snapshot(fleet(60, 26));
        let mut chunks = 0;
        // Each chunk is handed on with the lock free: a change made then goes through (a
        // held lock would deadlock here).
        render(&state, &mut |_| {
            chunks += 1;
            state.set_store_bytes(chunks);
            true
        });
        assert!(chunks > 5, "{chunks} chunks");
        // A reader that goes away after the first chunk is sent no more.
        let mut handed = 0;
        render(&state, &mut |_| {
            handed += 1;
            false
        });
        assert_eq!(handed, 1);
    }

    #[test]
    fn dropped_log_lines_are_a_counter_even_when_none_were_dropped() {
        let snapshot = Snapshot::default();
        let none = scrape(&exposition(&snapshot, "1.0.0", 0));
        assert_eq!(
            value(&none, "deploywatch_log_lines_dropped_total"),
            Some(prometheus_parse::Value::Counter(0.0))
        );
        let some = scrape(&exposition(&snapshot, "1.0.0", 7));
        assert_eq!(
            value(&some, "deploywatch_log_lines_dropped_total"),
            Some(prometheus_parse::Value::Counter(7.0))
        );
        assert_eq!(
            value(&some, "deploywatch_build_info"),
            Some(prometheus_parse::Value::Gauge(1.0))
        );
        // Families without samples are left out entirely.
        assert!(!exposition(&snapshot, "1.0.0", 0).contains("deploywatch_check_value"));
    }

    #[test]
    fn text_is_what_the_prometheus_text_encoder_wrote() {
        let samples: Vec<Sample<'_>> = vec![
            ("deploywatch_build_info", vec![("version", "1.2.3")], 1.0),
            ("deploywatch_log_lines_dropped_total", vec![], 0.0),
            ("deploywatch_up", vec![("target", "a")], 1.0),
            ("deploywatch_up", vec![("target", "b")], 0.0),
            (
                "deploywatch_check_value",
                vec![
                    ("target", "db\"1"),
                    ("check", "back\\slash"),
                    ("column", "new\nline"),
                    ("name", "ünïcode \\\" \n\n\\"),
                ],
                2.5,
            ),
            ("deploywatch_check_value", vec![("target", "x")], -0.0),
            ("deploywatch_check_value", vec![("target", "y")], 1e21),
            ("deploywatch_check_value", vec![("target", "z")], 1.5e-7),
            ("deploywatch_check_value", vec![("target", "nan")], f64::NAN),
            (
                "deploywatch_check_runs_total",
                vec![("target", "a"), ("check", "c")],
                u64::MAX as f64,
            ),
            ("deploywatch_store_bytes", vec![], 123456789.0),
        ];
        let text = written(&samples);
        assert_eq!(text, encoded(&samples));
        assert!(text.contains(
            "check_value{target=\"db\\\"1\",check=\"back\\\\slash\",column=\"new\\nline\",name=\"ünïcode \\\\\\\" \\n\\n\\\\\"} 2.5\n"
        ));
        assert!(text.contains("check_value{target=\"nan\"} NaN\n"));
        // Every family the text names is one of ours, with its type.
        let parsed = scrape(&text);
        assert_eq!(parsed.samples.len(), samples.len());
        assert_eq!(
            value(&parsed, "deploywatch_check_runs_total"),
            Some(prometheus_parse::Value::Counter(u64::MAX as f64))
        );
    }

    #[test]
    fn infinite_values_are_spelled_as_the_text_format_does() {
        let text = written(&[
            (
                "deploywatch_check_value",
                vec![("target", "a")],
                f64::INFINITY,
            ),
            (
                "deploywatch_check_value",
                vec![("target", "b")],
                f64::NEG_INFINITY,
            ),
        ]);
        assert!(text.contains("check_value{target=\"a\"} +Inf\n"), "{text}");
        assert!(text.contains("check_value{target=\"b\"} -Inf\n"), "{text}");
        let parsed = scrape(&text);
        let values: Vec<_> = parsed.samples.iter().map(|s| s.value.clone()).collect();
        assert_eq!(
            values,
            [
                prometheus_parse::Value::Gauge(f64::INFINITY),
                prometheus_parse::Value::Gauge(f64::NEG_INFINITY)
            ]
        );
    }
}

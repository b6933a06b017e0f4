//! The latest known results, held in memory: what `/metrics`, `/status` and `deploywatch check`
//! render. Writers are the scheduler and the deployment tracker; readers take a [`Snapshot`].
//!
//! A `std::sync::Mutex` guards it: no lock is ever held across an `.await`, and every critical
//! section is a few field updates, so scrapes never wait on the database.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::checks::outcome::{CheckOutcome, ErrorKind, Status};
use crate::checks::spec::CheckSpec;
use crate::config::Config;
use crate::postgres::runner::RunReport;

pub(crate) use crate::time::Timestamp;
use crate::time::{system_clock, SharedClock};

#[derive(Debug, Clone)]
pub struct CheckState {
    pub(crate) spec: Arc<CheckSpec>,
    pub status: Status,
    pub outcome: Option<CheckOutcome>,
    pub(crate) last_run: Option<Timestamp>,
    /// Last run that completed with a verdict (pass or fail), i.e. without an error.
    pub(crate) last_success: Option<Timestamp>,
    /// Last run that passed.
    pub(crate) last_pass: Option<Timestamp>,
    pub(crate) duration_seconds: Option<f64>,
    pub runs: u64,
    pub(crate) errors: BTreeMap<ErrorKind, u64>,
    pub(crate) skipped: u64,
    /// Runs skipped because no session to the server became free within the interval.
    pub(crate) skipped_no_session: u64,
    /// The latest skip for lack of a session: when, and why.
    pub(crate) last_skip: Option<(Timestamp, String)>,
    /// Due runs that were merged into a later one because no session was free at their time.
    pub(crate) delayed: u64,
    /// While the latest run started late for lack of a session: when, and why.
    pub(crate) last_delay: Option<(Timestamp, String)>,
    /// True while a run is in flight.
    pub(crate) running: bool,
    /// An incremental check's last report (kept through errored runs).
    pub(crate) incremental: Option<crate::checks::incremental::IncrementalReport>,
    /// Rows an incremental check has read, over all runs.
    pub(crate) rows_examined_total: u64,
}

impl CheckState {
    pub(crate) fn new(spec: Arc<CheckSpec>) -> Self {
        CheckState {
            spec,
            status: Status::Pending,
            outcome: None,
            last_run: None,
            last_success: None,
            last_pass: None,
            duration_seconds: None,
            runs: 0,
            errors: BTreeMap::new(),
            skipped: 0,
            skipped_no_session: 0,
            last_skip: None,
            delayed: 0,
            last_delay: None,
            running: false,
            incremental: None,
            rows_examined_total: 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TargetState {
    /// Connection description without secrets.
    pub(crate) display: String,
    /// `None` until the first attempt.
    pub reachable: Option<bool>,
    pub(crate) last_connection_error: Option<String>,
    pub schema_version: Option<String>,
    pub checks: BTreeMap<String, CheckState>,
    /// Backends in use and max_connections, as last sampled.
    pub connections: Option<(f64, f64)>,
    /// Failed sampling steps (`version`, `statistics`) since the start.
    pub(crate) sampling_errors: BTreeMap<&'static str, u64>,
    /// Statistics samples stored since the daemon started.
    pub samples_recorded: u64,
    /// Seconds the last deployment-tracking sampling pass took.
    pub(crate) sampling_seconds: Option<f64>,
    /// Seconds the last judging pass took.
    pub(crate) judging_seconds: Option<f64>,
    /// Whether this replica samples and judges the target, when its deployments are tracked.
    pub(crate) leadership: Option<Leadership>,
}

/// Who samples and judges a target: always this replica with a store of its own; with a
/// shared store, the replica holding the target's lock there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Leadership {
    /// This replica leads the target.
    pub(crate) leading: bool,
    /// The replica that leads it, as the shared store knows it (`None` when no replica does,
    /// or the store cannot be asked).
    pub(crate) leader: Option<String>,
}

/// The state store as last measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreHealth {
    /// Bytes on disk (database file and write-ahead log).
    pub(crate) bytes: Option<f64>,
    /// Failed store operations, by operation.
    pub(crate) errors: BTreeMap<String, u64>,
}

/// Deployment tracking as shown to readers; filled by the deployment tracker.
pub(crate) type DeploymentViews = BTreeMap<String, crate::analysis::deployment::DeploymentView>;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub targets: BTreeMap<String, TargetState>,
    pub(crate) config_reload_ok: bool,
    pub config_last_reload_success: Option<Timestamp>,
    pub(crate) config_source: String,
    pub deployments: DeploymentViews,
    /// The session budget of every server, as last published.
    pub servers: Vec<crate::postgres::pool::ServerView>,
    /// This replica's part of a split fleet; its targets are the ones above.
    pub(crate) shard: crate::shard::Shard,
    pub(crate) store: StoreHealth,
    /// `/metrics` requests refused with 503 because the concurrent scrapes were at their limit.
    pub(crate) scrapes_refused: u64,
}

#[derive(Debug)]
pub struct State {
    inner: Mutex<Snapshot>,
    /// The last logged state of each check and sampling step, so logs tell what changed.
    pub transitions: crate::watch::transitions::Transitions,
    /// Runs that started late for lack of a session, summed up per server for the log.
    pub(crate) late_runs: crate::watch::transitions::LateRuns,
    /// The daemon's one clock: every component that records or judges asks it for "now".
    clock: SharedClock,
}

impl Default for State {
    fn default() -> Self {
        State::with_clock(system_clock())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Claim {
    /// The run may start.
    Started,
    /// The previous run is still going; this one is skipped (and counted).
    Skipped,
}

impl State {
    pub fn new() -> Self {
        State::default()
    }

    /// A state whose "now" comes from `clock` (tests and simulations drive it).
    pub(crate) fn with_clock(clock: SharedClock) -> Self {
        State {
            inner: Mutex::new(Snapshot::default()),
            transitions: Default::default(),
            late_runs: Default::default(),
            clock,
        }
    }

    /// A state holding `snapshot` (tests).
    #[cfg(test)]
    pub(crate) fn from_snapshot(snapshot: Snapshot) -> Self {
        let state = State::new();
        *state.lock() = snapshot;
        state
    }

    /// Now, by the daemon's clock.
    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A panic while holding the lock cannot leave the data half-written in a way that
        // matters more than losing metrics, so a poisoned lock is simply taken over.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock, for a change.
    fn write(&self) -> MutexGuard<'_, Snapshot> {
        self.lock()
    }

    /// Makes the targets and checks match a (new) configuration. Results and counters of
    /// checks that still exist are kept; removed ones disappear from the output, and the log
    /// state of removed targets is forgotten.
    pub fn apply_config(&self, config: &Config, now: Timestamp) {
        let mut inner = self.write();
        let mut targets = BTreeMap::new();
        for target in &config.targets {
            let mut state = inner.targets.remove(&target.name).unwrap_or_default();
            state.display = target.connection.display.clone();
            let mut checks = BTreeMap::new();
            // A discovery template stands for databases not found yet: it runs no checks.
            let specs = if target.discover.is_some() {
                &[][..]
            } else {
                &target.checks[..]
            };
            for spec in specs {
                let check = match state.checks.remove(&spec.name) {
                    Some(mut existing) => {
                        existing.spec = spec.clone();
                        existing
                    }
                    None => CheckState::new(spec.clone()),
                };
                checks.insert(spec.name.clone(), check);
            }
            state.checks = checks;
            targets.insert(target.name.clone(), state);
        }
        inner.targets = targets;
        self.transitions
            .retain_targets(|name| config.target(name).is_some());
        inner
            .deployments
            .retain(|name, _| config.target(name).is_some());
        inner.shard = config.server.shard;
        inner.config_reload_ok = true;
        inner.config_last_reload_success = Some(now);
        inner.config_source = config.source.display().to_string();
    }

    pub(crate) fn set_reload_failed(&self) {
        self.write().config_reload_ok = false;
    }

    /// Counts a `/metrics` request refused because the concurrent scrapes were at their limit.
    pub(crate) fn count_refused_scrape(&self) {
        self.write().scrapes_refused += 1;
    }

    /// Changes the state of a check, if the target has it.
    fn change_check<R>(
        &self,
        target: &str,
        check: &str,
        change: impl FnOnce(&mut CheckState) -> R,
    ) -> Option<R> {
        let mut inner = self.write();
        inner
            .targets
            .get_mut(target)
            .and_then(|t| t.checks.get_mut(check))
            .map(change)
    }

    /// Marks a check as running unless it already is.
    pub(crate) fn claim(&self, target: &str, check: &str) -> Claim {
        self.change_check(target, check, |state| {
            if state.running {
                state.skipped += 1;
                Claim::Skipped
            } else {
                state.running = true;
                Claim::Started
            }
        })
        .unwrap_or(Claim::Skipped)
    }

    /// Releases a claim without a run (the run was cancelled while it waited for a session).
    pub(crate) fn release(&self, target: &str, check: &str) {
        self.change_check(target, check, |state| state.running = false);
    }

    /// A run that got no session within its interval: counted, its reason kept, the claim
    /// released. The previous result stays.
    pub(crate) fn record_no_session(
        &self,
        target: &str,
        check: &str,
        reason: String,
        now: Timestamp,
    ) {
        self.change_check(target, check, |state| {
            state.running = false;
            state.skipped_no_session += 1;
            state.last_skip = Some((now, reason));
        });
    }

    /// A run that started late for lack of a session: the `merged` due runs it spans are
    /// counted, and why it waited is kept until a run starts on time again (`reason` `None`).
    pub(crate) fn record_delay(
        &self,
        target: &str,
        check: &str,
        merged: u64,
        reason: Option<String>,
    ) {
        let now = self.now();
        let mut inner = self.write();
        if let Some(state) = inner
            .targets
            .get_mut(target)
            .and_then(|t| t.checks.get_mut(check))
        {
            state.delayed += merged;
            state.last_delay = reason.map(|reason| (now, reason));
        }
    }

    /// Publishes the servers' session budgets.
    pub(crate) fn set_servers(&self, servers: Vec<crate::postgres::pool::ServerView>) {
        if self.lock().servers == servers {
            return;
        }
        self.write().servers = servers;
    }

    pub(crate) fn record_skip(&self, target: &str, check: &str) {
        self.change_check(target, check, |state| state.skipped += 1);
    }

    /// Stores the result of a run and releases the claim.
    pub(crate) fn record(&self, target: &str, check: &str, report: &RunReport, now: Timestamp) {
        let mut inner = self.write();
        let Some(target_state) = inner.targets.get_mut(target) else {
            return;
        };
        target_state.reachable = Some(report.reachable);
        if report.reachable {
            target_state.last_connection_error = None;
        } else if let Some(error) = &report.outcome.error {
            target_state.last_connection_error = Some(error.message.clone());
        }
        let Some(state) = target_state.checks.get_mut(check) else {
            return;
        };
        state.running = false;
        state.runs += 1;
        state.last_run = Some(now);
        state.duration_seconds = Some(report.duration.as_secs_f64());
        state.status = report.outcome.status;
        match &report.outcome.error {
            Some(error) => *state.errors.entry(error.kind).or_insert(0) += 1,
            None => state.last_success = Some(now),
        }
        if report.outcome.status == Status::Pass {
            state.last_pass = Some(now);
        }
        state.outcome = Some(report.outcome.clone());
        if let Some(incremental) = &report.incremental {
            state.rows_examined_total += incremental.rows_examined;
            state.incremental = Some(incremental.clone());
        }
    }

    /// Marks a target unreachable without a check run (a discovery template whose server
    /// could not be asked).
    pub(crate) fn set_unreachable(&self, target: &str, message: String) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.reachable = Some(false);
            state.last_connection_error = Some(message);
        }
    }

    pub(crate) fn set_schema_version(&self, target: &str, version: Option<String>) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.schema_version = version;
        }
    }

    /// One more statistics sample stored for `target`.
    pub(crate) fn count_sample(&self, target: &str) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.samples_recorded += 1;
        }
    }

    /// Counts a failed sampling step (`version` or `statistics`) of a target.
    pub(crate) fn record_sampling_error(&self, target: &str, step: &'static str) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            *state.sampling_errors.entry(step).or_insert(0) += 1;
        }
    }

    pub(crate) fn set_connections(&self, target: &str, in_use: f64, max: f64) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.connections = Some((in_use, max));
        }
    }

    pub(crate) fn set_sampling_duration(&self, target: &str, seconds: f64) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.sampling_seconds = Some(seconds);
        }
    }

    pub(crate) fn set_judging_duration(&self, target: &str, seconds: f64) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.judging_seconds = Some(seconds);
        }
    }

    pub(crate) fn set_store_bytes(&self, bytes: u64) {
        self.write().store.bytes = Some(bytes as f64);
    }

    /// Counts a failed store operation (`deploywatch_store_errors_total{operation}`).
    pub(crate) fn count_store_error(&self, operation: &str) {
        *self
            .write()
            .store
            .errors
            .entry(operation.to_string())
            .or_insert(0) += 1;
    }

    pub(crate) fn set_deployment(
        &self,
        target: &str,
        view: crate::analysis::deployment::DeploymentView,
    ) {
        self.write().deployments.insert(target.to_string(), view);
    }

    /// Forgets the deployment view of a target this replica no longer judges: its windows and
    /// verdicts are shown by the replica that does.
    pub(crate) fn clear_deployment(&self, target: &str) {
        self.write().deployments.remove(target);
    }

    pub(crate) fn set_leadership(&self, target: &str, leadership: Leadership) {
        let mut inner = self.write();
        if let Some(state) = inner.targets.get_mut(target) {
            state.leadership = Some(leadership);
        }
    }

    /// Whether this replica judges `target` (true when leadership is not known yet).
    pub(crate) fn leads(&self, target: &str) -> bool {
        self.lock()
            .targets
            .get(target)
            .and_then(|t| t.leadership.as_ref())
            .is_none_or(|l| l.leading)
    }

    /// Every target has been tried at least once (readiness). A replica whose shard owns no
    /// target of the fleet has nothing to try, and is ready once its configuration is loaded.
    pub(crate) fn all_targets_tried(&self) -> bool {
        let inner = self.lock();
        let loaded = inner.config_last_reload_success.is_some();
        let shard_owns_none = inner.shard.is_split() && inner.targets.is_empty();
        (!inner.targets.is_empty() || (loaded && shard_owns_none))
            && inner.targets.values().all(|t| t.reachable.is_some())
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    /// What `read` makes of the whole state, read under the lock without copying it. Checks
    /// wait for the lock meanwhile: `read` must be short (a `/metrics` scrape reads a little
    /// at a time).
    pub(crate) fn read_all<R>(&self, read: impl FnOnce(&Snapshot) -> R) -> R {
        read(&self.lock())
    }

    /// What `read` makes of one target's state, read under the lock without copying the
    /// rest: a fleet's per-database readers must not each copy every database's state.
    pub(crate) fn read_target<R>(
        &self,
        target: &str,
        read: impl FnOnce(&TargetState) -> R,
    ) -> Option<R> {
        self.lock().targets.get(target).map(read)
    }
}

//! Deployment tracking, one task per target.
//!
//! On every sampling interval the task reads the schema version (a change is a deployment, a
//! move to a lower version a rollback), samples the cumulative statistics and stores the delta,
//! then judges the windows of the latest deployment against its baseline and publishes the
//! result to the in-memory state. Pipelines announce deployments through [`Announcer`]
//! (`POST /api/deployments`, `deploywatch deploy mark`); configuration can declare them.
//!
//! Everything that must survive a restart — samples, deployments, verdicts, the last seen
//! version — lives in the [`Store`]; window timing is derived from the deployment's recorded
//! time, so a restarted daemon resumes open windows where they are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::analysis::deployment::{
    kind_of, latch, place_announcement, DeploymentKind, DeploymentView, Detection, Placement,
    WindowView,
};
use crate::analysis::regression::{self, Thresholds};
use crate::analysis::sample::{self, CheckPoint, RawStats, Sample};
use crate::analysis::window::{self, Window};
use crate::checks::outcome::Observation;
use crate::config::{Config, DeploymentConfig, StoreConfig, TargetConfig};
use crate::postgres::pool::TargetPool;
use crate::postgres::sampler::{self, ServerStats, StatementsSupport};
use crate::storage::{DeploymentRecord, Store, StoreError, VerdictRecord};
use crate::time::rfc3339;
use crate::watch::scheduler::Pools;
use crate::watch::state::State;
use crate::watch::transitions::Transition;

/// At most this many baseline samples are compared, spread evenly over the baseline span.
const MAX_BASELINE_SAMPLES: usize = 2000;
/// How often pg_stat_statements support is looked up again (in sampling passes).
const SUPPORT_REFRESH_PASSES: u64 = 30;

/// A deployment announced by a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    /// Required when the daemon watches more than one target.
    pub target: Option<String>,
    pub version: String,
    /// RFC 3339; default now.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub note: Option<String>,
    /// `deploy` or `rollback`; needed only where versions have no order
    /// (`deployments.version_order = "unordered"`).
    pub kind: Option<DeploymentKind>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("{0}")]
    Invalid(String),
    #[error("no target is named {0:?}")]
    UnknownTarget(String),
    #[error("\"target\" is required: this daemon watches {0} targets")]
    TargetRequired(usize),
    #[error("the deployment tracker of {0} is not running")]
    NotRunning(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Request {
    announcement: Announcement,
    reply: oneshot::Sender<Result<DeploymentView, TrackerError>>,
}

/// Hands announcements to the tracker of their target.
#[derive(Clone, Default)]
pub struct Announcer {
    trackers: Arc<Mutex<HashMap<String, mpsc::Sender<Request>>>>,
}

impl Announcer {
    pub fn new() -> Self {
        Announcer::default()
    }

    pub async fn announce(
        &self,
        announcement: Announcement,
    ) -> Result<DeploymentView, TrackerError> {
        let sender = {
            let trackers = self.trackers.lock().unwrap_or_else(|e| e.into_inner());
            match &announcement.target {
                Some(name) => trackers
                    .get(name)
                    .cloned()
                    .ok_or_else(|| TrackerError::UnknownTarget(name.clone()))?,
                None if trackers.len() == 1 => trackers
                    .values()
                    .next()
                    .cloned()
                    .ok_or(TrackerError::TargetRequired(0))?,
                None => return Err(TrackerError::TargetRequired(trackers.len())),
            }
        };
        let target = announcement.target.clone().unwrap_or_default();
        let (reply, answer) = oneshot::channel();
        sender
            .send(Request {
                announcement,
                reply,
            })
            .await
            .map_err(|_| TrackerError::NotRunning(target.clone()))?;
        answer.await.map_err(|_| TrackerError::NotRunning(target))?
    }

    fn register(&self, target: &str, sender: mpsc::Sender<Request>) {
        let mut trackers = self.trackers.lock().unwrap_or_else(|e| e.into_inner());
        trackers.insert(target.to_string(), sender);
    }

    fn retain(&self, config: &Config) {
        let mut trackers = self.trackers.lock().unwrap_or_else(|e| e.into_inner());
        trackers.retain(|name, _| config.target(name).is_some());
    }
}

/// Counts a failed sampling step (`version`, `statistics`) and logs at `warn` when it starts
/// failing, with a new reason's line only on a change and an hourly reminder; at `info` when
/// it works again.
fn note_step(state: &State, target: &str, step: &'static str, result: Result<(), &str>) {
    let subject = format!("sampling:{step}");
    let now = std::time::Instant::now();
    match result {
        Ok(()) => {
            let transition = state.transitions.observe(target, &subject, "ok", now);
            if transition.worth_logging(true) {
                tracing::info!(db_target = %target, step, "sampling works again");
            }
        }
        Err(error) => {
            state.record_sampling_error(target, step);
            let transition = state.transitions.observe(target, &subject, "error", now);
            if transition.worth_logging(false) {
                let reminder = matches!(transition, Transition::Reminder { .. });
                tracing::warn!(db_target = %target, step, reminder, %error, "sampling failed");
            } else {
                tracing::debug!(db_target = %target, step, %error, "sampling failed");
            }
        }
    }
}

fn parse_time(field: &str, text: &str) -> Result<f64, TrackerError> {
    crate::time::parse_rfc3339(text).map_err(|_| {
        TrackerError::Invalid(format!(
            "{field} {text:?} is not a time like \"2026-11-24T10:00:00Z\""
        ))
    })
}

/// Starts one tracker per target of `config`.
pub fn start(
    config: &Config,
    pools: &Pools,
    state: &Arc<State>,
    store: &Store,
    announcer: &Announcer,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    announcer.retain(config);
    if !config.deployments.enabled {
        // Without deployment tracking the schema version is still shown in /status and
        // metrics: it is read on the sampling interval, nothing more.
        for target in &config.targets {
            if let Some(pool) = pools.get(&target.name) {
                tasks.spawn(watch_version(
                    target.name.clone(),
                    target.version_query.clone(),
                    pool.clone(),
                    state.clone(),
                    config.deployments.sample_interval,
                    pools.first_run_offset(&target.name, config.deployments.sample_interval),
                    cancel.clone(),
                ));
            }
        }
        return;
    }
    for target in &config.targets {
        let (Some(pool), Some(server_stats)) =
            (pools.get(&target.name), pools.server_stats(&target.name))
        else {
            continue;
        };
        let (sender, receiver) = mpsc::channel(8);
        announcer.register(&target.name, sender);
        let tracker = Tracker {
            target: target.clone(),
            settings: config.deployments.clone(),
            store_settings: config.store.clone(),
            pool: pool.clone(),
            server_stats,
            offset: pools.first_run_offset(&target.name, config.deployments.sample_interval),
            store: store.clone(),
            state: state.clone(),
            previous: None,
            support: None,
            passes: 0,
            last_pass_at: None,
            baseline_cache: None,
            last_judged: HashMap::new(),
            version_problem: None,
            published: HashMap::new(),
        };
        tasks.spawn(tracker.run(receiver, cancel.clone()));
    }
}

/// Keeps a target's schema version current when deployments are not tracked.
async fn watch_version(
    target: String,
    sql: String,
    pool: TargetPool,
    state: Arc<State>,
    every: Duration,
    offset: Duration,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut problem = None;
    loop {
        tokio::select! {
            // Cancellation wins over a tick that is also ready: no new run after it.
            biased;
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let read = sampler::read_version(&pool, &sql).await;
        version_query_news(&target, &sql, &read, &mut problem);
        match read {
            Ok(version) => state.set_schema_version(&target, version),
            Err(error) => {
                // Logged by version_query_news when the query itself is the problem.
                state.record_sampling_error(&target, "version");
                tracing::debug!(db_target = %target, error = %error.message, "schema version not readable")
            }
        }
    }
}

/// Logs a version query that does not work as a warning, once per distinct problem (the first
/// pass after start shows it), and when it works again.
fn version_query_news(
    target: &str,
    query: &str,
    read: &Result<Option<String>, crate::checks::outcome::CheckError>,
    last: &mut Option<String>,
) {
    let now = sampler::version_problem(target, query == crate::config::DEFAULT_VERSION_QUERY, read);
    match (&now, read) {
        (Some(problem), _) if last.as_ref() != Some(problem) => {
            tracing::warn!(db_target = %target, "{problem}");
        }
        (None, Ok(Some(_))) if last.is_some() => {
            tracing::info!(db_target = %target, "the version query works again");
        }
        _ => {}
    }
    // A connection failure neither reports nor clears a problem of the query itself.
    if now.is_some() || matches!(read, Ok(Some(_))) {
        *last = now;
    }
}

struct Tracker {
    target: TargetConfig,
    settings: DeploymentConfig,
    store_settings: StoreConfig,
    pool: TargetPool,
    /// The server-wide statistics, shared by the databases of the server.
    server_stats: Arc<ServerStats>,
    /// Where in the sampling interval this target's passes go (spread over a server's targets).
    offset: Duration,
    store: Store,
    state: Arc<State>,
    previous: Option<RawStats>,
    support: Option<StatementsSupport>,
    passes: u64,
    /// When the previous pass read the version: a change happened after it.
    last_pass_at: Option<f64>,
    /// Baseline samples of one deployment, loaded once.
    baseline_cache: Option<(i64, Vec<Sample>)>,
    /// When each open window of the current deployment was last judged.
    last_judged: HashMap<(i64, &'static str), f64>,
    /// What was last logged about the version query not working.
    version_problem: Option<String>,
    /// The last judgement of each open window, shown between judgements.
    published: HashMap<(i64, &'static str), WindowView>,
}

impl Tracker {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>, cancel: CancellationToken) {
        self.declare();
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + self.offset,
            self.settings.sample_interval,
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Cancellation wins over a tick that is also ready: no new run after it.
                biased;
                _ = cancel.cancelled() => return,
                Some(request) = requests.recv() => {
                    let result = self.announce(request.announcement, self.state.now());
                    let _ = request.reply.send(result);
                }
                _ = ticker.tick() => self.pass(self.state.now()).await,
            }
        }
    }

    fn name(&self) -> &str {
        &self.target.name
    }

    /// Records the deployments the configuration declares, once each.
    fn declare(&self) {
        for declared in self
            .settings
            .declared
            .iter()
            .filter(|d| d.target == self.target.name)
        {
            let known = self
                .store
                .deployments(Some(self.name()))
                .map(|all| {
                    all.iter().any(|d| {
                        d.to_version == declared.version && (d.at - declared.at).abs() < 1.0
                    })
                })
                .unwrap_or(true);
            if known {
                continue;
            }
            let before = self
                .store
                .deployments(Some(self.name()))
                .ok()
                .and_then(|all| all.into_iter().find(|d| d.at < declared.at));
            let from = before
                .as_ref()
                .map(|d| d.to_version.clone())
                .filter(|from| *from != declared.version);
            let kind = kind_of(
                from.as_deref(),
                &declared.version,
                self.settings.version_order,
                before.as_ref(),
            );
            if let Err(error) = self.store.add_deployment(
                self.name(),
                from.as_deref(),
                &declared.version,
                kind,
                Detection::Declared,
                declared.at,
                None,
                declared.note.as_deref(),
            ) {
                tracing::warn!(db_target = %self.name(), %error, "cannot record a declared deployment");
            }
        }
    }

    fn announce(&mut self, a: Announcement, now: f64) -> Result<DeploymentView, TrackerError> {
        let version = a.version.trim();
        if version.is_empty() || version.len() > 100 {
            return Err(TrackerError::Invalid(
                "\"version\" must be a non-empty string of at most 100 characters".to_string(),
            ));
        }
        let at = match &a.started_at {
            Some(text) => parse_time("started_at", text)?,
            None => now,
        };
        if at > now + 300.0 {
            return Err(TrackerError::Invalid(
                "started_at is in the future".to_string(),
            ));
        }
        let finished_at = a
            .finished_at
            .as_deref()
            .map(|t| parse_time("finished_at", t))
            .transpose()?;
        if finished_at.is_some_and(|f| f < at) {
            return Err(TrackerError::Invalid(
                "finished_at is before started_at".to_string(),
            ));
        }
        let deployments = self.store.deployments(Some(self.name()))?;
        let last_version = self.store.last_version(self.name())?;
        let placement = place_announcement(
            version,
            at,
            a.kind,
            &deployments,
            last_version.as_deref(),
            self.settings.version_order,
        )
        .map_err(|e| TrackerError::Invalid(e.to_string()))?;
        let record = match placement {
            Placement::Merge { id, at } => {
                let record = self
                    .store
                    .update_deployment(id, at, finished_at, a.note.as_deref())?
                    .ok_or_else(|| TrackerError::Invalid(format!("deployment {id} vanished")))?;
                // Its baseline and open windows are measured from the new start.
                self.forget(id);
                tracing::info!(
                    db_target = %self.name(), version, deployment = id, at = %rfc3339(at),
                    "announcement merged into the deployment already detected"
                );
                record
            }
            Placement::New { from, kind } => {
                let record = self.store.add_deployment(
                    self.name(),
                    from.as_deref(),
                    version,
                    kind,
                    Detection::Announced,
                    at,
                    finished_at,
                    a.note.as_deref(),
                )?;
                tracing::info!(
                    db_target = %self.name(), version, from = ?from, kind = kind.as_str(),
                    "deployment announced"
                );
                record
            }
        };
        let view = self.view(&record, now)?;
        self.state.set_deployment(self.name(), view.clone());
        Ok(view)
    }

    /// Notes the version the database reports; a change is a deployment unless an
    /// announcement already covers it.
    fn observe_version(&mut self, version: &str, now: f64) -> Result<(), StoreError> {
        // The change happened between the previous pass and this one. Dating it at the previous
        // pass keeps that pass's sample, which may already see the migration, out of the
        // baseline.
        let changed_at = self
            .last_pass_at
            .filter(|t| now - t <= 3.0 * self.settings.sample_interval.as_secs_f64())
            .unwrap_or(now);
        let last = self.store.last_version(self.name())?;
        match last.as_deref() {
            None => {
                tracing::info!(db_target = %self.name(), version, "schema version first seen");
            }
            Some(last) if last == version => return Ok(()),
            Some(last) => {
                let latest = self.store.latest_deployment(self.name())?;
                let announced = latest.as_ref().is_some_and(|d| {
                    d.to_version == version && d.detection != Detection::VersionChange
                });
                if !announced {
                    let kind = kind_of(
                        Some(last),
                        version,
                        self.settings.version_order,
                        latest.as_ref(),
                    );
                    self.store.add_deployment(
                        self.name(),
                        Some(last),
                        version,
                        kind,
                        Detection::VersionChange,
                        changed_at,
                        None,
                        None,
                    )?;
                    tracing::warn!(
                        db_target = %self.name(), from = last, to = version, kind = kind.as_str(),
                        "schema version changed: deployment detected"
                    );
                }
            }
        }
        self.store.set_last_version(self.name(), version, now)
    }

    async fn pass(&mut self, now: f64) {
        self.passes += 1;
        // One session for the whole pass, waited for at most one interval.
        let what = format!("{} statistics", self.name());
        let pool = match self
            .pool
            .acquire(&what, self.settings.sample_interval)
            .await
        {
            Ok(lease) => self.pool.pinned(lease),
            Err(error) => {
                tracing::debug!(target = %self.name(), %error, "no session for sampling; pass skipped");
                self.previous = None;
                return;
            }
        };
        let read = sampler::read_version(&pool, &self.target.version_query).await;
        version_query_news(
            &self.target.name,
            &self.target.version_query,
            &read,
            &mut self.version_problem,
        );
        match read {
            Ok(Some(version)) => {
                self.state
                    .set_schema_version(self.name(), Some(version.clone()));
                if let Err(error) = self.observe_version(&version, now) {
                    tracing::warn!(db_target = %self.name(), %error, "cannot record the schema version");
                }
                self.last_pass_at = Some(now);
            }
            Ok(None) => self.state.set_schema_version(self.name(), None),
            Err(_) => {
                // Logged by version_query_news when the query itself is the problem.
                self.state.record_sampling_error(self.name(), "version");
                self.state.set_schema_version(self.name(), None);
            }
        }
        if self.support.is_none() || self.passes % SUPPORT_REFRESH_PASSES == 0 {
            match sampler::statements_support(&pool).await {
                Ok(support) => self.support = Some(support),
                Err(error) => {
                    note_step(
                        &self.state,
                        self.name(),
                        "statistics",
                        Err(&error.to_string()),
                    );
                    self.previous = None;
                    return;
                }
            }
        }
        let support = self
            .support
            .clone()
            .unwrap_or(StatementsSupport::Unavailable(String::new()));
        let read = sampler::read_with(&pool, &support, &self.server_stats, now).await;
        drop(pool);
        match read {
            Ok((mut raw, unreadable)) => {
                note_step(&self.state, self.name(), "statistics", Ok(()));
                if let Some(reason) = unreadable {
                    // Looked up again after SUPPORT_REFRESH_PASSES passes.
                    self.support = Some(StatementsSupport::Unavailable(reason));
                }
                raw.checks = self.check_points();
                self.state
                    .set_connections(self.name(), raw.connections, raw.max_connections);
                if let Some(previous) = &self.previous {
                    let sample = sample::delta(previous, &raw);
                    if !sample.vanished.is_empty() {
                        tracing::info!(
                            db_target = %self.name(), vanished = ?sample.vanished,
                            "indexes or tables were dropped; their statistics end here"
                        );
                    }
                    if !sample.resets.is_empty() {
                        tracing::info!(
                            db_target = %self.name(), resets = ?sample.resets,
                            "statistics were reset; those counters are left out of this interval"
                        );
                    }
                    match self.store.add_sample(self.name(), &sample) {
                        Ok(()) => self.state.count_sample(self.name()),
                        Err(error) => {
                            tracing::warn!(db_target = %self.name(), %error, "cannot store a sample")
                        }
                    }
                }
                self.previous = Some(raw);
            }
            Err(error) => {
                // The next good pass starts a fresh delta: the gap is simply not sampled.
                note_step(
                    &self.state,
                    self.name(),
                    "statistics",
                    Err(&error.to_string()),
                );
                self.previous = None;
            }
        }
        if self.passes % 100 == 1 {
            let horizon = now - self.store_settings.retention.as_secs_f64();
            if let Err(error) = self.store.prune(horizon) {
                tracing::warn!(db_target = %self.name(), %error, "cannot prune old samples");
            }
        }
        match self.store.latest_deployment(self.name()) {
            Ok(Some(record)) => match self.view(&record, now) {
                Ok(view) => self.state.set_deployment(self.name(), view),
                Err(error) => {
                    tracing::warn!(db_target = %self.name(), %error, "cannot judge the deployment")
                }
            },
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(db_target = %self.name(), %error, "cannot read deployments")
            }
        }
    }

    /// Drops what was computed for a deployment whose start moved.
    fn forget(&mut self, id: i64) {
        if self
            .baseline_cache
            .as_ref()
            .is_some_and(|(cached, _)| *cached == id)
        {
            self.baseline_cache = None;
        }
        self.last_judged
            .retain(|(deployment, _), _| *deployment != id);
        self.published
            .retain(|(deployment, _), _| *deployment != id);
    }

    fn check_points(&self) -> std::collections::BTreeMap<String, CheckPoint> {
        let snapshot = self.state.snapshot();
        let Some(target) = snapshot.targets.get(self.name()) else {
            return Default::default();
        };
        target
            .checks
            .iter()
            .map(|(name, c)| {
                let value = c
                    .outcome
                    .as_ref()
                    .and_then(|o| o.observation.as_ref())
                    .and_then(Observation::as_number);
                (
                    name.clone(),
                    CheckPoint {
                        category: c.spec.category.as_str().to_string(),
                        status: c.status.as_str().to_string(),
                        value,
                    },
                )
            })
            .collect()
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            latency_min_increase: self.settings.latency_min_increase,
            latency_min_calls: self.settings.latency_min_calls,
            latency_p_value: self.settings.latency_p_value,
            min_samples: self.settings.min_window_samples,
            latency_min_delta_ms: self.settings.latency_min_delta_ms,
        }
    }

    fn baseline(&mut self, record: &DeploymentRecord) -> Result<Vec<Sample>, StoreError> {
        if let Some((id, samples)) = &self.baseline_cache {
            if *id == record.id {
                return Ok(samples.clone());
            }
        }
        let previous = self
            .store
            .previous_deployment_time(self.name(), record.at)?;
        let (from, to) = window::baseline_range(record.at, self.settings.baseline_span, previous);
        let samples = self
            .store
            .samples_spread(self.name(), from, to, MAX_BASELINE_SAMPLES)?;
        self.baseline_cache = Some((record.id, samples.clone()));
        Ok(samples)
    }

    /// How often an open window is judged: every pass for short windows, less often for long
    /// ones so a week-long window does not re-read a week of samples every minute.
    fn cadence(&self, window: Window) -> f64 {
        let d = &self.settings.windows;
        let length = match window {
            Window::FirstHour => d.first_hour,
            Window::FirstDay => d.first_day.saturating_sub(d.first_hour),
            Window::FirstWeek => d.first_week.saturating_sub(d.first_day),
            Window::Steady => Duration::from_secs(3600),
        };
        (length.as_secs_f64() / 60.0)
            .max(self.settings.sample_interval.as_secs_f64() * 0.9)
            .min(3600.0)
    }

    fn view(&mut self, record: &DeploymentRecord, now: f64) -> Result<DeploymentView, StoreError> {
        let baseline = self.baseline(record)?;
        let persisted = self.store.verdicts(record.id)?;
        let durations = self.settings.windows;
        let thresholds = self.thresholds();
        let mut windows = Vec::new();
        let mut since_deployment: Option<Vec<Sample>> = None;
        for window in [Window::FirstHour, Window::FirstDay, Window::FirstWeek] {
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
            let key = (record.id, window.as_str());
            let due = closed
                || self
                    .last_judged
                    .get(&key)
                    .is_none_or(|last| now - last >= self.cadence(window));
            if !due {
                if let Some(view) = self.published.get(&key) {
                    windows.push(view.clone());
                    continue;
                }
            }
            let end_time = end.unwrap_or(f64::MAX);
            let all = match &since_deployment {
                Some(all) => all,
                None => since_deployment.insert(self.store.samples(
                    self.name(),
                    record.at,
                    now + 1.0,
                )?),
            };
            let up_to_end: Vec<Sample> = all.iter().filter(|s| s.at < end_time).cloned().collect();
            let in_window: Vec<Sample> = up_to_end
                .iter()
                .filter(|s| s.at >= start)
                .cloned()
                .collect();
            // Without enough baseline there is nothing to compare against: every signal is
            // inconclusive, and the window can only end so.
            let baseline_too_small = baseline.len() < self.settings.min_baseline_samples;
            let judgement = if baseline_too_small {
                regression::Judgement::default()
            } else {
                regression::judge(
                    window,
                    &baseline,
                    &in_window,
                    &up_to_end,
                    closed,
                    &thresholds,
                )
            };
            let judged_samples = if baseline_too_small {
                0
            } else {
                in_window.len()
            };
            // Flags are latched across looks: confirmed at the second consecutive look (or
            // at the close), resolved but kept when they go away.
            let previous_flags = self
                .published
                .get(&key)
                .map(|v| v.regressions.clone())
                .unwrap_or_default();
            let regressions = latch(&previous_flags, judgement.regressions, now, closed);
            let confirmed = regressions.iter().filter(|f| f.was_confirmed()).count();
            let verdict = window::verdict(
                closed,
                confirmed,
                judged_samples,
                self.settings.min_window_samples,
            );
            let view = WindowView {
                window,
                start: rfc3339(start),
                end: end.map(rfc3339),
                verdict,
                samples: in_window.len(),
                regressions,
                improvements: judgement.improvements,
            };
            if closed {
                self.store.set_verdict(
                    record.id,
                    &VerdictRecord {
                        window,
                        verdict,
                        samples: view.samples,
                        regressions: view.regressions.clone(),
                        improvements: view.improvements.clone(),
                        closed_at: now,
                    },
                )?;
                tracing::info!(
                    db_target = %self.name(), deployment = record.id, window = window.as_str(),
                    verdict = verdict.as_str(), regressions = view.regressions.len(),
                    "window closed"
                );
                self.published.remove(&key);
            } else {
                self.last_judged.insert(key, now);
                self.published.insert(key, view.clone());
            }
            windows.push(view);
        }
        let mut limitations = Vec::new();
        if let Some(StatementsSupport::Unavailable(reason)) = &self.support {
            if !reason.is_empty() {
                limitations.push(reason.clone());
            }
        }
        if baseline.len() < self.settings.min_baseline_samples {
            limitations.push(format!(
                "only {} baseline sample(s) before the deployment (at least {} are needed to judge)",
                baseline.len(),
                self.settings.min_baseline_samples
            ));
        }
        Ok(DeploymentView {
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
            baseline_samples: baseline.len(),
            windows,
            limitations,
            rollbacks_seen: self.store.rollback_count(self.name())?,
        })
    }
}

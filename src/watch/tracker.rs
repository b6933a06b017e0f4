//! Deployment tracking, one task per target.
//!
//! On every sampling interval the task reads the schema version (a change is a deployment, a
//! move to a lower version a rollback), samples the cumulative statistics and stores the delta,
//! then judges the windows of the latest deployment against its baseline and publishes the
//! result to the in-memory state. Pipelines announce deployments through [`Announcer`]
//! (`POST /api/deployments`, `deploywatch deploy mark`); configuration can declare them.
//! An announcement is recorded at once, through the store's thread, with the time it gives or
//! the time it was received: it never waits for the sampling loop, which may be waiting on a
//! hung database. Announcing the same version again (a pipeline retrying) merges into the
//! deployment already recorded instead of adding a second.
//!
//! Everything that must survive a restart — samples, deployments, verdicts, the last seen
//! version — lives in the [`Store`]; window timing is derived from the deployment's recorded
//! time, so a restarted daemon resumes open windows where they are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::analysis::deployment::{
    kind_of, place_announcement, DeploymentKind, DeploymentView, Detection, Placement,
};
use crate::analysis::judging::{self, Summaries};
use crate::analysis::sample::{self, CheckPoint, RawStats};
use crate::analysis::summary::Summary;
use crate::analysis::window;
use crate::checks::outcome::Observation;
use crate::config::{Config, DeploymentConfig, StoreConfig, TargetConfig};
use crate::postgres::pool::TargetPool;
use crate::postgres::sampler::{self, ServerStats, StatementsSupport};
use crate::storage::actor::StoreActor;
use crate::storage::{DeploymentRecord, Lead, StoreError};
use crate::watch::scheduler::Pools;
use crate::watch::state::{Leadership, State};
use crate::watch::transitions::Transition;

/// How often pg_stat_statements support is looked up again (in sampling passes).
const SUPPORT_REFRESH_PASSES: u64 = 30;

/// A deployment announced by a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Announcement {
    /// Required when the daemon watches more than one target.
    pub(crate) target: Option<String>,
    pub(crate) version: String,
    /// RFC 3339; default now.
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) note: Option<String>,
    /// `deploy` or `rollback`; needed only where versions have no order
    /// (`deployments.version_order = "unordered"`).
    pub(crate) kind: Option<DeploymentKind>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TrackerError {
    #[error("{0}")]
    Invalid(String),
    #[error("no target is named {0:?}")]
    UnknownTarget(String),
    #[error("\"target\" is required: this daemon watches {0} targets")]
    TargetRequired(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What recording an announcement for one target needs; nothing of it touches the database.
#[derive(Clone)]
struct Recorder {
    target: String,
    settings: DeploymentConfig,
    store: StoreActor,
    state: Arc<State>,
}

/// Records announcements, for the targets whose deployments are tracked.
#[derive(Clone, Default)]
pub(crate) struct Announcer {
    recorders: Arc<Mutex<HashMap<String, Recorder>>>,
}

impl Announcer {
    pub(crate) fn new() -> Self {
        Announcer::default()
    }

    /// Records an announcement received now: validated, placed and stored through the store's
    /// thread, never through the target's sampling loop.
    pub(crate) async fn announce(
        &self,
        announcement: Announcement,
    ) -> Result<DeploymentView, TrackerError> {
        let recorder = {
            let recorders = self.recorders.lock().unwrap_or_else(|e| e.into_inner());
            match &announcement.target {
                Some(name) => recorders
                    .get(name)
                    .cloned()
                    .ok_or_else(|| TrackerError::UnknownTarget(name.clone()))?,
                None if recorders.len() == 1 => recorders
                    .values()
                    .next()
                    .cloned()
                    .ok_or(TrackerError::TargetRequired(0))?,
                None => return Err(TrackerError::TargetRequired(recorders.len())),
            }
        };
        let now = recorder.state.now();
        let result = record_announcement(&recorder, announcement, now).await;
        if let Err(TrackerError::Store(error)) = &result {
            recorder.state.count_store_error("announce");
            tracing::debug!(db_target = %recorder.target, %error, "cannot record an announcement");
        }
        result
    }

    fn register(&self, recorder: Recorder) {
        let mut recorders = self.recorders.lock().unwrap_or_else(|e| e.into_inner());
        recorders.insert(recorder.target.clone(), recorder);
    }

    fn retain(&self, config: &Config) {
        let mut recorders = self.recorders.lock().unwrap_or_else(|e| e.into_inner());
        recorders.retain(|name, _| config.deployments.enabled && config.target(name).is_some());
    }
}

/// Validates, places and stores one announcement received at `now`, and publishes the
/// deployment's view.
async fn record_announcement(
    recorder: &Recorder,
    a: Announcement,
    now: f64,
) -> Result<DeploymentView, TrackerError> {
    let name = recorder.target.as_str();
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
    let target = name.to_string();
    let owned_version = version.to_string();
    let note = a.note.clone();
    let order = recorder.settings.version_order;
    let announced_kind = a.kind;
    let placed = recorder
        .store
        .run(move |store| {
            store.serialized(&target.clone(), |store| {
                let deployments = store.deployments(Some(&target))?;
                let last_version = store.last_version(&target)?;
                let placement = match place_announcement(
                    &owned_version,
                    at,
                    announced_kind,
                    &deployments,
                    last_version.as_deref(),
                    order,
                ) {
                    Ok(placement) => placement,
                    Err(error) => return Ok(Err(error.to_string())),
                };
                Ok(Ok(match placement {
                    Placement::Merge { id, at } => {
                        match store.update_deployment(id, at, finished_at, note.as_deref())? {
                            Some(record) => (record, None, true),
                            None => return Ok(Err(format!("deployment {id} vanished"))),
                        }
                    }
                    Placement::New { from, kind } => {
                        let record = store.add_deployment(
                            &target,
                            from.as_deref(),
                            &owned_version,
                            kind,
                            Detection::Announced,
                            at,
                            finished_at,
                            note.as_deref(),
                        )?;
                        (record, from, false)
                    }
                }))
            })
        })
        .await?
        .map_err(TrackerError::Invalid)?;
    let (record, from, merged) = placed;
    if merged {
        // The tracker sees the new start and measures the baseline and windows from it.
        tracing::info!(
            db_target = %name, version, deployment = record.id, at = %crate::time::rfc3339(record.at),
            "announcement merged into the deployment already recorded"
        );
    } else {
        tracing::info!(
            db_target = %name, version, from = ?from, kind = record.kind.as_str(),
            "deployment announced"
        );
    }
    let view = announced_view(recorder, &record, now).await?;
    // A follower records the announcement in the shared store, where the leader reads it on
    // its next pass; only the leader shows the deployment's windows and verdicts.
    if recorder.state.leads(name) {
        recorder.state.set_deployment(name, view.clone());
    }
    Ok(view)
}

/// The view of a deployment just announced, judged from the store (the tracker judges it
/// again on its next pass, and records the verdicts of windows that closed).
async fn announced_view(
    recorder: &Recorder,
    record: &DeploymentRecord,
    now: f64,
) -> Result<DeploymentView, StoreError> {
    let settings = &recorder.settings;
    let summaries = load_summaries(&recorder.store, &recorder.target, record, settings).await?;
    let id = record.id;
    let target = recorder.target.clone();
    let (persisted, rollbacks) = recorder
        .store
        .run(move |store| Ok((store.verdicts(id)?, store.rollback_count(&target)?)))
        .await?;
    let (view, _closed) = judging::judge(
        record,
        &summaries,
        &persisted,
        now,
        &settings.judging,
        Vec::new(),
        rollbacks,
    );
    Ok(view)
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
pub(crate) fn start(
    config: &Config,
    pools: &Pools,
    state: &Arc<State>,
    store: &StoreActor,
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
        announcer.register(Recorder {
            target: target.name.clone(),
            settings: config.deployments.clone(),
            store: store.clone(),
            state: state.clone(),
        });
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
            server_taken: None,
            support: None,
            texts: None,
            passes: 0,
            last_pass_at: None,
            summaries: None,
            version_problem: None,
            leading: None,
        };
        tasks.spawn(tracker.run(cancel.clone()));
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
        let read = Box::pin(sampler::read_version(&pool, &sql)).await;
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
    /// The server-wide statistics, shared by the databases of the server read as the same role.
    server_stats: Arc<ServerStats>,
    /// Where in the sampling interval this target's passes go (spread over a server's targets).
    offset: Duration,
    store: StoreActor,
    state: Arc<State>,
    previous: Option<RawStats>,
    /// When the server-wide reading behind `previous` was made: the next pass never takes it
    /// again.
    server_taken: Option<std::time::Instant>,
    support: Option<StatementsSupport>,
    /// Query texts by query id, as stored: a text is fetched once, when its id is new.
    texts: Option<HashMap<String, String>>,
    passes: u64,
    /// When the previous pass read the version: a change happened after it.
    last_pass_at: Option<f64>,
    /// The running summaries of the latest deployment: its baseline, summarised once, and
    /// its windows, fed one sample at a time. Never more than one deployment's.
    summaries: Option<Summaries>,
    /// What was last logged about the version query not working.
    version_problem: Option<String>,
    /// Whether this replica led the target at its last pass (`None` before the first).
    leading: Option<bool>,
}

impl Tracker {
    async fn run(mut self, cancel: CancellationToken) {
        self.declare().await;
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
                // Boxed: a tracker keeps only its state between passes.
                _ = ticker.tick() => Box::pin(self.pass(self.state.now())).await,
            }
        }
    }

    fn name(&self) -> &str {
        &self.target.name
    }

    /// Records the deployments the configuration declares, once each.
    async fn declare(&self) {
        let target = self.target.name.clone();
        let declared: Vec<_> = self
            .settings
            .declared
            .iter()
            .filter(|d| d.target == self.target.name)
            .cloned()
            .collect();
        if declared.is_empty() {
            return;
        }
        let order = self.settings.version_order;
        let result = self
            .store
            .run(move |store| {
                store.serialized(&target.clone(), |store| {
                    for declared in declared {
                        let all = store.deployments(Some(&target))?;
                        let known = all.iter().any(|d| {
                            d.to_version == declared.version && (d.at - declared.at).abs() < 1.0
                        });
                        if known {
                            continue;
                        }
                        let before = all.into_iter().find(|d| d.at < declared.at);
                        let from = before
                            .as_ref()
                            .map(|d| d.to_version.clone())
                            .filter(|from| *from != declared.version);
                        let kind =
                            kind_of(from.as_deref(), &declared.version, order, before.as_ref());
                        store.add_deployment(
                            &target,
                            from.as_deref(),
                            &declared.version,
                            kind,
                            Detection::Declared,
                            declared.at,
                            None,
                            declared.note.as_deref(),
                        )?;
                    }
                    Ok(())
                })
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(db_target = %self.name(), %error, "cannot record a declared deployment");
        }
    }

    /// Notes the version the database reports; a change is a deployment unless an
    /// announcement already covers it.
    async fn observe_version(&mut self, version: &str, now: f64) -> Result<(), StoreError> {
        // The change happened between the previous pass and this one. Dating it at the previous
        // pass keeps that pass's sample, which may already see the migration, out of the
        // baseline.
        let changed_at = self
            .last_pass_at
            .filter(|t| now - t <= 3.0 * self.settings.sample_interval.as_secs_f64())
            .unwrap_or(now);
        let target = self.target.name.clone();
        let version = version.to_string();
        let order = self.settings.version_order;
        self.store
            .run(move |store| {
                store.fenced(&target.clone(), |store| {
                let last = store.last_version(&target)?;
                match last.as_deref() {
                    None => {
                        tracing::info!(db_target = %target, version, "schema version first seen");
                    }
                    Some(last) if last == version => return Ok(()),
                    Some(last) => {
                        let latest = store.latest_deployment(&target)?;
                        let announced = latest.as_ref().is_some_and(|d| {
                            d.to_version == version && d.detection != Detection::VersionChange
                        });
                        if !announced {
                            let kind = kind_of(Some(last), &version, order, latest.as_ref());
                            store.add_deployment(
                                &target,
                                Some(last),
                                &version,
                                kind,
                                Detection::VersionChange,
                                changed_at,
                                None,
                                None,
                            )?;
                            tracing::warn!(
                                db_target = %target, from = last, to = version, kind = kind.as_str(),
                                "schema version changed: deployment detected"
                            );
                        }
                    }
                }
                store.set_last_version(&target, &version, now)
                })
            })
            .await
    }

    /// The statistics could not be read: noted, and the next good pass starts a fresh delta
    /// (the gap is simply not sampled).
    fn statistics_failed(&mut self, error: &impl std::fmt::Display) {
        note_step(
            &self.state,
            self.name(),
            "statistics",
            Err(&error.to_string()),
        );
        self.previous = None;
    }

    /// Logs and counts a failed store operation.
    /// Counts a failed store operation. A failed write is logged by the store when writes
    /// start failing and when they work again; any other failure when it starts, and hourly
    /// while it lasts.
    fn store_failed(&self, operation: &str, error: &StoreError) {
        if matches!(error, StoreError::NotLeader(_)) {
            // The lead was lost since the pass began: the next pass finds out and says so.
            tracing::debug!(db_target = %self.name(), operation, %error, "write not made");
            return;
        }
        self.state.count_store_error(operation);
        let writes = [
            "write_sample",
            "write_query_texts",
            "record_version",
            "prune",
        ];
        let transition = self.state.transitions.observe(
            self.name(),
            &format!("store:{operation}"),
            "error",
            std::time::Instant::now(),
        );
        if !writes.contains(&operation) && transition.worth_logging(false) {
            tracing::warn!(db_target = %self.name(), operation, %error, "state store operation failed");
        } else {
            tracing::debug!(db_target = %self.name(), operation, %error, "state store operation failed");
        }
    }

    /// Whether this replica samples and judges the target this pass (see [`Lead`]); on a
    /// change, what it held of the target is dropped, so a takeover starts from the store
    /// (deployment, baseline, recorded verdicts) and a follower shows no windows.
    async fn lead(&mut self) -> bool {
        let target = self.target.name.clone();
        let result = self.store.run(move |store| store.lead(&target)).await;
        let shared = self.store_settings.url.is_some();
        let store_unreachable = result.is_err();
        let (leading, leader, took_over) = match result {
            Ok(Lead::Leading { took_over }) => {
                (true, shared.then(|| "this replica".to_string()), took_over)
            }
            Ok(Lead::Following { leader }) => (false, leader, false),
            Err(error) => {
                self.store_failed("lead", &error);
                (false, None, false)
            }
        };
        if leading && took_over {
            tracing::info!(
                db_target = %self.name(),
                "this replica leads the target now: it samples and judges it, from what the store holds"
            );
            self.previous = None;
            self.summaries = None;
            self.texts = None;
        }
        if !leading && self.leading != Some(false) {
            if self.leading == Some(true) {
                tracing::warn!(
                    db_target = %self.name(), leader = ?leader,
                    "this replica lost the lead of the target (store unreachable or its session lost): it no longer samples or judges it"
                );
            } else if store_unreachable {
                tracing::warn!(
                    db_target = %self.name(),
                    "the store cannot be reached: this replica does not sample or judge the target until it is back"
                );
            } else {
                tracing::info!(
                    db_target = %self.name(), leader = ?leader,
                    "another replica leads the target; this one takes over if it stops"
                );
            }
            self.previous = None;
            self.summaries = None;
            self.texts = None;
            self.state.clear_deployment(self.name());
        }
        self.leading = Some(leading);
        self.state
            .set_leadership(self.name(), Leadership { leading, leader });
        leading
    }

    async fn pass(&mut self, now: f64) {
        if !self.lead().await {
            return;
        }
        self.passes += 1;
        let started = std::time::Instant::now();
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
                if let Err(error) = self.observe_version(&version, now).await {
                    self.store_failed("record_version", &error);
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
                    self.statistics_failed(&error);
                    return;
                }
            }
        }
        let support = self
            .support
            .clone()
            .unwrap_or(StatementsSupport::Unavailable(String::new()));
        let read =
            sampler::read_with(&pool, &support, &self.server_stats, self.server_taken, now).await;
        match read {
            Ok((mut raw, unreadable, server_read_at)) => {
                self.server_taken = Some(server_read_at);
                // Stamped when its counters have been read, not when the pass began: a pass
                // that waited for a session or a slow version query reads activity after its
                // start, and a deployment announced meanwhile must not find that activity in
                // its baseline.
                raw.at = self.state.now();
                note_step(&self.state, self.name(), "statistics", Ok(()));
                if let Some(reason) = unreadable {
                    // Looked up again after SUPPORT_REFRESH_PASSES passes.
                    self.support = Some(StatementsSupport::Unavailable(reason));
                }
                raw.checks = self.check_points();
                self.attach_texts(&pool, &support, &mut raw, now).await;
                drop(pool);
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
                    if sample.restarted() {
                        tracing::info!(
                            db_target = %self.name(), resets = ?sample.resets,
                            "the server restarted; its counters are left out of this interval \
                             and the times of the next samples, taken on cold caches, are not judged"
                        );
                    } else if !sample.resets.is_empty() {
                        tracing::info!(
                            db_target = %self.name(), resets = ?sample.resets,
                            "statistics were reset; those counters are left out of this interval"
                        );
                    }
                    if let Some(summaries) = self.summaries.as_mut() {
                        summaries.add(&sample, &self.settings.judging.durations);
                    }
                    let target = self.target.name.clone();
                    let stored = self
                        .store
                        .run(move |store| {
                            store.fenced(&target, |store| store.add_sample(&target, &sample))
                        })
                        .await;
                    match stored {
                        Ok(()) => self.state.count_sample(self.name()),
                        Err(error) => self.store_failed("write_sample", &error),
                    }
                }
                self.previous = Some(raw);
            }
            Err(error) => {
                drop(pool);
                self.statistics_failed(&error);
            }
        }
        self.state
            .set_sampling_duration(self.name(), started.elapsed().as_secs_f64());
        if self.passes % 10 == 1 {
            let target = self.target.name.clone();
            let horizon = now - self.store_settings.retention.as_secs_f64();
            match self
                .store
                .run(move |store| {
                    let pruned = store.fenced(&target, |store| store.prune(horizon))?;
                    Ok((pruned, store.size_bytes()?))
                })
                .await
            {
                Ok((_, bytes)) => self.state.set_store_bytes(bytes),
                Err(error) => self.store_failed("prune", &error),
            }
        }
        let target = self.target.name.clone();
        let latest = self
            .store
            .run(move |store| store.latest_deployment(&target))
            .await;
        match latest {
            Ok(Some(record)) => match self.view(&record, now).await {
                Ok(view) => self.state.set_deployment(self.name(), view),
                Err(error) => self.store_failed("judge", &error),
            },
            Ok(None) => {}
            Err(error) => self.store_failed("read_deployments", &error),
        }
    }

    /// Gives every statement of `raw` its text: from the texts already stored, fetching only
    /// those of query ids never seen before.
    async fn attach_texts(
        &mut self,
        pool: &TargetPool,
        support: &StatementsSupport,
        raw: &mut RawStats,
        now: f64,
    ) {
        let Some(statements) = raw.statements.as_mut() else {
            return;
        };
        if self.texts.is_none() {
            let target = self.target.name.clone();
            match self
                .store
                .run(move |store| Ok(store.query_texts(&target)))
                .await
            {
                Ok(texts) => self.texts = Some(texts),
                Err(error) => {
                    tracing::warn!(db_target = %self.name(), %error, "cannot read stored query texts");
                    return;
                }
            }
        }
        let name = self.target.name.clone();
        let texts = self.texts.get_or_insert_with(HashMap::new);
        let unknown: Vec<String> = statements
            .keys()
            .filter(|id| !texts.contains_key(*id))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            match sampler::read_texts(pool, support, &unknown).await {
                Ok(found) => {
                    for id in &unknown {
                        texts.entry(id.clone()).or_default();
                    }
                    for (id, text) in &found {
                        texts.insert(id.clone(), text.clone());
                    }
                    let target = self.target.name.clone();
                    let stored = self
                        .store
                        .run(move |store| {
                            store.fenced(&target, |store| {
                                store.add_query_texts(&target, &found, now)
                            })
                        })
                        .await;
                    if let Err(error) = stored {
                        self.state.count_store_error("write_query_texts");
                        tracing::warn!(db_target = %name, %error, "cannot store query texts");
                    }
                }
                Err(error) => {
                    tracing::debug!(db_target = %name, error = %error, "query texts not readable")
                }
            }
        }
        for (id, counters) in statements.iter_mut() {
            if let Some(text) = texts.get(id) {
                counters.query.clone_from(text);
            }
        }
    }

    fn check_points(&self) -> std::collections::BTreeMap<String, CheckPoint> {
        // Only this target's checks: a copy of the whole state here, once per pass of every
        // database, cost a fleet's daemon time and memory growing with the square of its size.
        self.state
            .read_target(self.name(), |target| {
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
            })
            .unwrap_or_default()
    }

    /// The summaries of `record`: kept from earlier passes, or made from the store — the
    /// baseline read twice (statement totals to choose the followed statements, then the
    /// summary), and the samples since the deployment once, one sample at a time.
    async fn summaries(&mut self, record: &DeploymentRecord) -> Result<(), StoreError> {
        // An announcement may have moved the deployment's start since they were made.
        if self
            .summaries
            .as_ref()
            .is_some_and(|s| s.deployment_id == record.id && s.deployed_at == record.at)
        {
            return Ok(());
        }
        // The previous deployment's summaries go first: never two deployments' at once.
        self.summaries = None;
        let summaries =
            load_summaries(&self.store, &self.target.name, record, &self.settings).await?;
        self.summaries = Some(summaries);
        Ok(())
    }

    async fn view(
        &mut self,
        record: &DeploymentRecord,
        now: f64,
    ) -> Result<DeploymentView, StoreError> {
        self.summaries(record).await?;
        let id = record.id;
        let target = self.target.name.clone();
        let (persisted, rollbacks) = self
            .store
            .run(move |store| Ok((store.verdicts(id)?, store.rollback_count(&target)?)))
            .await?;
        let mut limitations = Vec::new();
        if let Some(StatementsSupport::Unavailable(reason)) = &self.support {
            if !reason.is_empty() {
                limitations.push(reason.clone());
            }
        }
        let settings = self.settings.judging;
        let Some(summaries) = self.summaries.as_ref() else {
            return Err(StoreError::Closed);
        };
        let started = std::time::Instant::now();
        let (view, closed) = judging::judge(
            record,
            summaries,
            &persisted,
            now,
            &settings,
            limitations,
            rollbacks,
        );
        if let Some(summaries) = self.summaries.as_mut() {
            // Open windows' flags, latched across looks by `judging::judge`.
            summaries.flags = view
                .windows
                .iter()
                .filter(|w| !closed.iter().any(|c| c.window == w.window))
                .map(|w| (w.window, w.regressions.clone()))
                .collect();
        }
        self.state
            .set_judging_duration(self.name(), started.elapsed().as_secs_f64());
        for verdict in closed {
            tracing::info!(
                db_target = %self.name(), deployment = record.id, window = verdict.window.as_str(),
                verdict = verdict.verdict.as_str(), regressions = verdict.regressions.len(),
                "window closed"
            );
            let target = self.target.name.clone();
            self.store
                .run(move |store| store.fenced(&target, |store| store.set_verdict(id, &verdict)))
                .await?;
        }
        Ok(view)
    }
}

/// The summaries of `record`, made from the store: the baseline read twice (statement totals
/// to choose the followed statements, then the summary), the same hour of the day before when
/// the history holds it, and the samples since the deployment once, one sample at a time.
async fn load_summaries(
    store: &StoreActor,
    target: &str,
    record: &DeploymentRecord,
    settings: &DeploymentConfig,
) -> Result<Summaries, StoreError> {
    let target = target.to_string();
    let record = record.clone();
    let span = settings.baseline_span;
    let durations = settings.judging.durations;
    let min_calls = settings.judging.thresholds.latency_min_calls;
    store
        .run(move |store| {
            let previous = store.previous_deployment_time(&target, record.at)?;
            let (from, to) = window::baseline_range(record.at, span, previous);
            let mut totals = std::collections::BTreeMap::new();
            store.each_sample(&target, from, to, |sample| {
                judging::add_totals(&mut totals, &sample)
            })?;
            let mut baseline = Summary::new(min_calls, judging::baseline_following(&totals));
            store.each_sample(&target, from, to, |sample| baseline.add(&sample))?;
            let mut summaries = Summaries::new(&record, baseline, &totals, min_calls);
            // The first hour is judged against the same hour of the day before as well, when
            // the store still holds it and the same version ran then.
            if let Some((from, to)) = judging::same_time_yesterday(record.at, &durations, previous)
            {
                let mut same = Summary::new(min_calls, judging::baseline_following(&totals));
                store.each_sample(&target, from, to, |sample| same.add(&sample))?;
                if same.samples > 0 {
                    summaries.same_time_yesterday = Some(same);
                }
            }
            let next = store.next_deployment(&target, record.at, record.id)?;
            let until = next.map_or(f64::MAX, |n| n.at);
            store.each_sample(&target, record.at, until, |sample| {
                summaries.add(&sample, &durations)
            })?;
            Ok(summaries)
        })
        .await
}

//! Runs every check on its own interval against every target.
//!
//! One task per (target, check). Each waits a small random jitter first so checks with the same
//! interval do not fire together, then ticks on its interval. A check never runs twice at once
//! on one target: ticks that arrive while a run is in flight are skipped and counted. Runs
//! queue for one of the target's capped sessions ([`TargetPool`]); a slow or down target only
//! delays its own tasks.
//!
//! Cancellation stops scheduling new runs; a run already in flight is allowed to finish (the
//! daemon bounds that with its grace period).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::checks::spec::CheckSpec;
use crate::config::{Config, TargetConfig};
use crate::postgres::pool::TargetPool;
use crate::postgres::runner::RunReport;
use crate::storage::incremental::ProgressStore;
use crate::watch::incremental::run_check;
use crate::watch::state::{Claim, State};
use crate::watch::transitions::Transition;

/// The pools of the running configuration, keyed by target name. A reload keeps a target's
/// pool when its connection settings did not change, so the connection cap holds across it.
#[derive(Default, Clone)]
pub struct Pools {
    pools: HashMap<String, (String, usize, TargetPool)>,
}

impl Pools {
    pub fn for_config(previous: &Pools, config: &Config) -> Pools {
        let mut pools = HashMap::new();
        // A discovery template that could not be expanded has no pool: nothing runs on it.
        for target in config.targets.iter().filter(|t| t.discover.is_none()) {
            let key = format!("{:?}", target.connection);
            let pool = match previous.pools.get(&target.name) {
                Some((old_key, old_max, pool))
                    if *old_key == key && *old_max == target.max_connections =>
                {
                    pool.clone()
                }
                _ => new_pool(target, config),
            };
            pools.insert(target.name.clone(), (key, target.max_connections, pool));
        }
        for (name, (_, _, pool)) in &previous.pools {
            if !pools.contains_key(name) {
                pool.close();
            }
        }
        Pools { pools }
    }

    pub fn get(&self, target: &str) -> Option<&TargetPool> {
        self.pools.get(target).map(|(_, _, pool)| pool)
    }

    pub fn close_all(&self) {
        for (_, _, pool) in self.pools.values() {
            pool.close();
        }
    }
}

fn new_pool(target: &TargetConfig, config: &Config) -> TargetPool {
    // A check waits in line at most as long as the longest check could take plus its
    // connect time; beyond that the target is effectively stuck and the run reports a timeout.
    let longest = target
        .checks
        .iter()
        .map(|c| c.timeout)
        .max()
        .unwrap_or(config.defaults.timeout);
    let wait = (longest + config.defaults.connect_timeout) * 2 + Duration::from_secs(5);
    TargetPool::new(
        &target.name,
        target.connection.clone(),
        target.max_connections,
        wait,
        config.defaults.connect_timeout,
    )
}

/// Starts one task per (target, check) of `config`, stopping when `cancel` fires. Incremental
/// checks keep their progress in `progress`.
pub fn start(
    config: &Config,
    pools: &Pools,
    state: &Arc<State>,
    progress: &ProgressStore,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    for target in &config.targets {
        let Some(pool) = pools.get(&target.name) else {
            continue;
        };
        for spec in &target.checks {
            tracker.spawn(check_loop(
                target.name.clone(),
                spec.clone(),
                pool.clone(),
                state.clone(),
                progress.clone(),
                cancel.clone(),
            ));
        }
    }
}

async fn check_loop(
    target: String,
    spec: Arc<CheckSpec>,
    pool: TargetPool,
    state: Arc<State>,
    progress: ProgressStore,
    cancel: CancellationToken,
) {
    let spread = spec.interval.min(Duration::from_secs(10)).as_secs_f64() * 0.2;
    let jitter = Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..=spread.max(0.001)));
    let mut ticker = tokio::time::interval_at(Instant::now() + jitter, spec.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // Cancellation wins over a tick that is also ready: no new run after it.
            biased;
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if state.claim(&target, &spec.name) == Claim::Skipped {
            tracing::warn!(db_target = %target, check = %spec.name, "previous run still going; skipped");
            continue;
        }
        let run = run_check(&pool, &spec, &progress, &target);
        tokio::pin!(run);
        let mut skipped = 0u64;
        let report: RunReport = loop {
            tokio::select! {
                report = &mut run => break report,
                _ = ticker.tick(), if !cancel.is_cancelled() => {
                    state.record_skip(&target, &spec.name);
                    skipped += 1;
                    // One line per slow run, however many ticks it spans (all are counted).
                    if skipped == 1 {
                        tracing::warn!(
                            db_target = %target,
                            check = %spec.name,
                            interval = ?spec.interval,
                            "check is slower than its interval; its next runs are skipped until it ends"
                        );
                    }
                }
            }
        };
        log_report(&state, &target, &spec, &report);
        state.record(&target, &spec.name, &report, state.now());
    }
}

/// The one place a run's result is logged.
pub fn log_report(state: &State, target: &str, spec: &CheckSpec, report: &RunReport) {
    let status = report.outcome.status.as_str();
    let duration_ms = report.duration.as_secs_f64() * 1000.0;
    // Logged when the state changes (pass -> fail, fail -> pass, a new error kind) and, while it
    // stays bad, once an hour; every run is counted in the metrics anyway.
    let key = match &report.outcome.error {
        Some(error) => format!("error:{}", error.kind.as_str()),
        None => status.to_string(),
    };
    let passed = report.outcome.status == crate::checks::outcome::Status::Pass;
    let transition = state
        .transitions
        .observe(target, &spec.name, &key, std::time::Instant::now());
    if !transition.worth_logging(passed) {
        tracing::debug!(db_target = %target, check = %spec.name, status, duration_ms, "check ran");
        return;
    }
    let previous = match &transition {
        Transition::Changed { previous } => previous.as_str(),
        _ => "",
    };
    let reminder = matches!(transition, Transition::Reminder { .. });
    match (&report.outcome.error, &report.outcome.detail) {
        (Some(error), _) => tracing::warn!(
            db_target = %target, check = %spec.name, status, previous, reminder, duration_ms,
            kind = error.kind.as_str(), error = %error.message,
            "{}", if reminder { "check still errors" } else { "check errored" }
        ),
        (None, Some(detail)) => tracing::warn!(
            db_target = %target, check = %spec.name, status, previous, reminder, duration_ms, %detail,
            "{}", if reminder { "check still fails" } else { "check failed" }
        ),
        (None, None) => tracing::info!(
            db_target = %target, check = %spec.name, status, previous, duration_ms,
            "check passes again"
        ),
    }
}

/// Runs every check of every target once, concurrently (bounded per target by its pool), and
/// records the results. Used by `deploywatch check`: incremental checks keep no progress here,
/// so each counts its whole table (a first run).
pub async fn run_once(config: &Config, pools: &Pools, state: &Arc<State>) {
    let progress = match ProgressStore::in_memory() {
        Ok(progress) => progress,
        Err(error) => {
            tracing::error!(%error, "cannot open an in-memory store for incremental checks");
            return;
        }
    };
    let mut runs = tokio::task::JoinSet::new();
    for target in &config.targets {
        let Some(pool) = pools.get(&target.name) else {
            continue;
        };
        for spec in &target.checks {
            let (target, spec, pool, state, progress) = (
                target.name.clone(),
                spec.clone(),
                pool.clone(),
                state.clone(),
                progress.clone(),
            );
            runs.spawn(async move {
                if state.claim(&target, &spec.name) == Claim::Started {
                    let report = run_check(&pool, &spec, &progress, &target).await;
                    log_report(&state, &target, &spec, &report);
                    state.record(&target, &spec.name, &report, state.now());
                }
            });
        }
    }
    while runs.join_next().await.is_some() {}
}

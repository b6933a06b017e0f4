//! Runs every check on its own interval against every target.
//!
//! One task per (target, check). The first runs of a server's targets are spread evenly over
//! the shortest interval, each database at its own phase of it for all its intervals (its checks
//! and samples that fall due together run together, so they share a session), and a longer
//! interval's runs over the multiples of the shortest it holds; then each ticks on its interval.
//! A check never runs twice at once on one target: ticks that arrive while a run is in flight
//! are skipped and counted. Runs queue for a session of their server's budget ([`TargetPool`])
//! in arrival order; a run still waiting when its next ones fall due keeps its place, and those
//! due times are merged into it (it runs once, late; counted and reported with the reason): a
//! budget too small for its checks stretches their intervals evenly instead of dropping runs.
//! Only a run that got no session within ten intervals is skipped and counted. A slow or down target only delays its
//! own tasks and its server's queue.
//!
//! Cancellation stops scheduling new runs; a run already in flight is allowed to finish (the
//! daemon bounds that with its grace period).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::checks::outcome::{CheckError, CheckOutcome, ErrorKind};
use crate::checks::spec::CheckSpec;
use crate::config::{Config, TargetConfig};
use crate::postgres::pool::{Connector, PoolError, ServerPool, Servers, TargetPool};
use crate::postgres::runner::RunReport;
use crate::postgres::sampler::ServerStats;
use crate::storage::incremental::ProgressStore;
use crate::watch::incremental::{run_check, watch_statistics, Watched};
use crate::watch::state::{Claim, State};
use crate::watch::transitions::{LateLine, Punctuality, Transition};

/// The pools of the running configuration, keyed by target name, on the per-server budgets
/// ([`Servers`]) that outlive every configuration. A reload keeps a target's pool when its
/// connection settings and cap did not change; either way the server's budget is the same
/// object, so the sessions of the previous configuration count until they are closed.
#[derive(Default, Clone)]
pub struct Pools {
    servers: Servers,
    /// Server-wide readings by who reads them (`user@host:port`, see
    /// [`crate::postgres::target::ConnectionSettings::statistics_reader`]).
    stats: Arc<std::sync::Mutex<HashMap<String, Arc<ServerStats>>>>,
    /// Each target's reader of the server-wide statistics.
    readers: HashMap<String, String>,
    pools: HashMap<String, (String, usize, TargetPool)>,
    /// Each target's position among the targets of its server, their number, and the target's
    /// shortest interval (checks and sampling).
    phases: HashMap<String, (usize, usize, Duration)>,
}

impl Pools {
    /// Empty pools on these server budgets (which discovery uses too).
    pub(crate) fn with_servers(servers: Servers) -> Pools {
        Pools {
            servers,
            ..Pools::default()
        }
    }

    pub fn for_config(previous: &Pools, config: &Config) -> Pools {
        let servers = previous.servers.clone();
        let (budget, share) = (
            config.defaults.max_connections_per_server,
            config.defaults.server_connection_share,
        );
        let mut pools = HashMap::new();
        let mut used = std::collections::HashSet::new();
        let mut per_server: HashMap<String, usize> = HashMap::new();
        let mut phases = HashMap::new();
        let mut readers = HashMap::new();
        for target in &config.targets {
            let key = target.connection.server();
            used.insert(key.clone());
            // A discovery template that could not be expanded has no pool: nothing runs on it.
            if target.discover.is_some() {
                continue;
            }
            readers.insert(target.name.clone(), target.connection.statistics_reader());
            let index = per_server.entry(key.clone()).or_insert(0);
            let shortest = target
                .checks
                .iter()
                .map(|c| c.interval)
                .chain(
                    config
                        .deployments
                        .enabled
                        .then_some(config.deployments.sample_interval),
                )
                .min()
                .unwrap_or(config.deployments.sample_interval);
            phases.insert(target.name.clone(), (*index, 0, shortest));
            *index += 1;
            let server = servers.get(&key, budget, share);
            let settings = format!("{:?}", target.connection);
            let pool = match previous.pools.get(&target.name) {
                Some((old_settings, old_max, pool))
                    if *old_settings == settings
                        && *old_max == target.max_connections
                        && Arc::ptr_eq(pool.server(), &server) =>
                {
                    pool.clone()
                }
                // Same settings: the reconnect backoff carries over.
                Some((old_settings, _, pool)) if *old_settings == settings => {
                    new_pool(target, config, server, pool.connector().clone())
                }
                _ => {
                    let connector =
                        Arc::new(Connector::new(&target.name, target.connection.clone()));
                    new_pool(target, config, server, connector)
                }
            };
            pools.insert(
                target.name.clone(),
                (settings, target.max_connections, pool),
            );
        }
        for (name, phase) in phases.iter_mut() {
            if let Some(target) = config.target(name) {
                phase.1 = per_server
                    .get(&target.connection.server())
                    .copied()
                    .unwrap_or(1);
            }
        }
        servers.retain(&used);
        let stats = previous.stats.clone();
        {
            let mut all = stats.lock().unwrap_or_else(|e| e.into_inner());
            let read_by: std::collections::HashSet<&String> = readers.values().collect();
            all.retain(|reader, _| read_by.contains(reader));
            for reader in read_by {
                all.entry(reader.clone())
                    .or_insert_with(|| Arc::new(ServerStats::new()))
                    .set_interval(config.deployments.sample_interval);
            }
        }
        Pools {
            servers,
            stats,
            readers,
            pools,
            phases,
        }
    }

    pub fn get(&self, target: &str) -> Option<&TargetPool> {
        self.pools.get(target).map(|(_, _, pool)| pool)
    }

    /// The server-wide statistics of the server `target` is on, as its role reads them.
    pub(crate) fn server_stats(&self, target: &str) -> Option<Arc<ServerStats>> {
        self.get(target)?;
        let reader = self.readers.get(target)?;
        let all = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        all.get(reader).cloned()
    }

    /// Where in `every` the target's first run goes (see [`first_run_offset`]), plus a little
    /// jitter, the same for all of the target's checks and samples: what falls due together
    /// asks together, and the session the first one opens goes to the next (no reconnect).
    pub(crate) fn first_run_offset(&self, target: &str, every: Duration) -> Duration {
        match self.phases.get(target) {
            Some((index, count, shortest)) => {
                let spread = shortest.mul_f64(0.05).min(Duration::from_millis(500));
                first_run_offset(*index, *count, *shortest, every)
                    + spread.mul_f64(target_jitter(target))
            }
            None => Duration::ZERO,
        }
    }

    /// The target's shortest interval (checks and sampling); zero for an unknown target.
    pub(crate) fn shortest(&self, target: &str) -> Duration {
        self.phases
            .get(target)
            .map_or(Duration::ZERO, |(_, _, shortest)| *shortest)
    }

    /// Asks the server to cancel every query still in flight for these targets (their
    /// sessions are the servers' own, shared by every target of a server); returns how many.
    pub(crate) async fn cancel_in_flight(&self) -> usize {
        let mut cancelled = 0;
        for (_, _, pool) in self.pools.values() {
            cancelled += pool.cancel_in_flight().await;
        }
        cancelled
    }

    pub fn close_all(&self) {
        self.servers.close_idle();
    }
}

/// Where the first run of an interval `every` goes for target `index` of the `count` targets of
/// a server, whose shortest interval is `shortest`. The targets are spread evenly over
/// `shortest`, and every interval of a target starts at its phase of it: a database's checks
/// and samples that fall due together run together, on one session, instead of each opening
/// one. A longer interval's runs are also spread over the multiples of `shortest` it holds, so
/// that, say, the 5-minute checks of a fleet do not all fall in the same 30 seconds.
pub(crate) fn first_run_offset(
    index: usize,
    count: usize,
    shortest: Duration,
    every: Duration,
) -> Duration {
    if count <= 1 || shortest.is_zero() {
        return Duration::ZERO;
    }
    let base = shortest.min(every);
    let slots = (every.as_secs_f64() / base.as_secs_f64()).floor().max(1.0) as u32;
    base.mul_f64(index as f64 / count as f64) + base * (index as u32 % slots)
}

fn new_pool(
    target: &TargetConfig,
    config: &Config,
    server: Arc<ServerPool>,
    connector: Arc<Connector>,
) -> TargetPool {
    // A query waits in line at most as long as the longest check could take plus its
    // connect time; beyond that the server is effectively stuck and the query reports a
    // timeout. Scheduled checks wait at most their interval (see `check_loop`).
    let longest = target
        .checks
        .iter()
        .map(|c| c.timeout)
        .max()
        .unwrap_or(config.defaults.timeout);
    let wait = (longest + config.defaults.connect_timeout) * 2 + Duration::from_secs(5);
    TargetPool::on_server(
        server,
        connector,
        target.max_connections,
        wait,
        config.defaults.connect_timeout,
    )
}

/// Starts one task per (target, check) of `config`, stopping when `cancel` fires. Incremental
/// checks keep their progress in `progress`.
pub(crate) fn start(
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
        let visits = Arc::new(tokio::sync::Notify::new());
        let shortest = pools.shortest(&target.name);
        let mut watched = Vec::new();
        for spec in &target.checks {
            // An incremental check that may sweep early can be woken by the statistics watch.
            let wake = match (&config.defaults.early_sweep_watch, &spec.incremental) {
                (Some(_), Some(def)) if def.early_sweep => {
                    let (wake, woken) = tokio::sync::mpsc::channel(1);
                    watched.push(Watched {
                        spec: spec.clone(),
                        wake,
                    });
                    Some(woken)
                }
                _ => None,
            };
            tracker.spawn(check_loop(
                target.name.clone(),
                spec.clone(),
                pool.clone(),
                state.clone(),
                progress.clone(),
                cancel.clone(),
                Timing {
                    offset: pools.first_run_offset(&target.name, spec.interval),
                    horizon: join_horizon(spec.interval, shortest),
                    visits: visits.clone(),
                    wake,
                },
            ));
        }
        if let (Some(every), false) = (config.defaults.early_sweep_watch, watched.is_empty()) {
            tracker.spawn(watch_statistics(
                target.name.clone(),
                pool.clone(),
                watched,
                every,
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
    timing: Timing,
) {
    let Timing {
        offset,
        horizon,
        visits,
        mut wake,
    } = timing;
    let mut next_due = Instant::now() + offset;
    let mut ticker = tokio::time::interval_at(next_due, spec.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let what = format!("{target} {}", spec.name);
    let mut no_session_skips = 0u64;
    let mut late = false;
    // Woken by the statistics watch since the last due time: at most one such extra run
    // between two due times, however often the statistics change.
    let mut woken = false;
    loop {
        // Due now, or early: another check of the database got a session while this one is
        // due within its horizon, and it goes along (the session is handed to the waiting
        // checks of its own database first), instead of a session of its own soon after. Or
        // woken by the statistics watch: an extra run, the due times unchanged.
        let why = tokio::select! {
            // Cancellation wins over a tick that is also ready: no new run after it.
            biased;
            _ = cancel.cancelled() => return,
            due = ticker.tick() => {
                next_due = due + spec.interval;
                Why::Due
            }
            _ = visits.notified() => {
                if next_due.saturating_duration_since(Instant::now()) > horizon {
                    continue;
                }
                Why::Along
            }
            Some(()) = next_wake(&mut wake), if !woken => Why::Woken,
        };
        woken = why == Why::Woken;
        if let (false, Some(wake)) = (woken, wake.as_mut()) {
            // This run reads the statistics itself.
            while wake.try_recv().is_ok() {}
        }
        let early = why == Why::Along;
        if early {
            // Its next run one interval after this one.
            ticker.reset();
            next_due = Instant::now() + spec.interval;
        }
        if state.claim(&target, &spec.name) == Claim::Skipped {
            tracing::warn!(db_target = %target, check = %spec.name, "previous run still going; skipped");
            continue;
        }
        // A run waits for its turn in the server's queue, however many of its due times pass
        // meanwhile: they are merged into it (one late run, counted), where giving up at the
        // next due time would lose the wait and queue again at the back. Only a wait of
        // `LATE_LIMIT` intervals ends in a skip.
        let queued = std::time::Instant::now();
        let acquired = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                state.release(&target, &spec.name);
                return;
            }
            // Boxed, as the run below: a task keeps only what it needs between runs, which
            // matters with thousands of checks.
            lease = Box::pin(pool.acquire(&what, spec.interval * LATE_LIMIT)) => lease,
        };
        let session = match acquired {
            Ok(lease) => {
                let waited = queued.elapsed();
                let merged = (waited.as_secs_f64() / spec.interval.as_secs_f64()) as u64;
                let server = pool.server().server();
                let punctuality = if merged > 0 {
                    Punctuality::Late {
                        what: &what,
                        waited,
                        merged,
                    }
                } else {
                    Punctuality::OnTime
                };
                // Summed up per server in the log; every late run is counted and shown.
                if let Some(line) =
                    state
                        .late_runs
                        .observe(server, punctuality, std::time::Instant::now())
                {
                    log_late_runs(server, line);
                }
                if merged > 0 {
                    let reason = format!(
                        "waited {:.1}s for a session to {server} (interval {:?}): the server's session budget is busy",
                        waited.as_secs_f64(),
                        spec.interval
                    );
                    late = true;
                    state.record_delay(&target, &spec.name, merged, Some(reason));
                    // The next run one interval after this one, not at once.
                    ticker.reset();
                    next_due = Instant::now() + spec.interval;
                } else if late {
                    late = false;
                    state.record_delay(&target, &spec.name, 0, None);
                }
                if !early {
                    // The database's checks due soon come along on this session.
                    visits.notify_waiters();
                }
                if no_session_skips > 0 {
                    tracing::info!(
                        db_target = %target, check = %spec.name, skipped = no_session_skips,
                        "got a session again"
                    );
                    no_session_skips = 0;
                }
                pool.pinned(lease)
            }
            Err(error @ PoolError::Exhausted { .. }) => {
                let reason = error.to_string();
                // One line when a check starts going without sessions, one when it gets them
                // again; every skipped run is counted in the metrics and /status.
                if no_session_skips == 0 {
                    tracing::warn!(
                        db_target = %target, check = %spec.name, %reason,
                        "no session within the check's interval; this run was skipped, and so will be the next ones until a session is free"
                    );
                }
                no_session_skips += 1;
                state.record_no_session(&target, &spec.name, reason, state.now());
                continue;
            }
            Err(error) => {
                let report = RunReport {
                    outcome: CheckOutcome::error(CheckError::new(
                        ErrorKind::Connection,
                        error.to_string(),
                    )),
                    duration: queued.elapsed(),
                    reachable: false,
                    incremental: None,
                };
                log_report(&state, &target, &spec, &report);
                state.record(&target, &spec.name, &report, state.now());
                continue;
            }
        };
        let report: RunReport = {
            let mut run = Box::pin(run_check(&session, &spec, &progress, &target));
            let mut skipped = 0u64;
            loop {
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
            }
        };
        drop(session);
        log_report(&state, &target, &spec, &report);
        state.record(&target, &spec.name, &report, state.now());
    }
}

/// The log line about a server's late runs.
fn log_late_runs(server: &str, line: LateLine) {
    match line {
        LateLine::Started {
            what,
            waited,
            merged,
        } => tracing::warn!(
            server, run = %what, waited_seconds = waited.as_secs_f64(), merged,
            "checks run late: no session to the server was free when they were due; their due runs are merged into late ones (summed up here once a minute)"
        ),
        LateLine::Summary {
            runs,
            merged,
            on_time,
            worst_wait,
            worst,
            over,
        } => tracing::warn!(
            server, late_runs = runs, merged, on_time, worst_wait_seconds = worst_wait.as_secs_f64(),
            worst = %worst, over_seconds = over.as_secs_f64().round(),
            "checks ran late for lack of a session"
        ),
        LateLine::OnTimeAgain { runs } => tracing::info!(server, runs, "checks run on time again"),
    }
}

/// When a check task runs: its first run's offset, and how early it joins a session another
/// check of its database got (see [`join_horizon`]).
struct Timing {
    offset: Duration,
    horizon: Duration,
    visits: Arc<tokio::sync::Notify>,
    /// Wake-ups from the statistics watch, for an incremental check it watches.
    wake: Option<tokio::sync::mpsc::Receiver<()>>,
}

/// How long before its due time a check runs along with another check of its database that
/// got a session: a quarter of its interval, and less than half the database's shortest
/// interval, so that checks on the grid of the shortest interval are never pulled a whole
/// step early, while checks that drifted apart (late runs restart their interval) come
/// together again and share a session instead of each moving one to their database.
pub(crate) fn join_horizon(interval: Duration, shortest: Duration) -> Duration {
    (interval / 4).min(shortest / 2)
}

/// The statistics watch's next wake-up; never, for a check it does not watch.
async fn next_wake(wake: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match wake {
        Some(wake) => wake.recv().await,
        None => std::future::pending().await,
    }
}

/// Why a check task runs now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    /// Its due time.
    Due,
    /// Along with another check of its database that got a session.
    Along,
    /// The statistics watch saw a change that calls for its early sweep.
    Woken,
}

/// How many intervals a run waits for a session before it is skipped.
const LATE_LIMIT: u32 = 10;

/// A fraction in [0, 1) fixed per target name.
fn target_jitter(target: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    target.hash(&mut hasher);
    (hasher.finish() % 1_000_000) as f64 / 1_000_000.0
}

/// The one place a run's result is logged.
pub(crate) fn log_report(state: &State, target: &str, spec: &CheckSpec, report: &RunReport) {
    let status = report.outcome.status.as_str();
    let duration_ms = report.duration.as_secs_f64() * 1000.0;
    // Logged when the state changes (pass -> fail, fail -> pass, a new error kind) and, while it
    // stays bad, once an hour; every run is counted in the metrics anyway.
    let key: std::borrow::Cow<'_, str> = match &report.outcome.error {
        Some(error) => format!("error:{}", error.kind.as_str()).into(),
        None => status.into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Two targets on one server that connect as different roles never share a reading of the
    /// server-wide statistics: what pg_stat_statements shows depends on the role, and each
    /// reading leaves out its reader's own statements, so another role's checks would be
    /// counted as the application's. Databases read by the same role share one.
    #[test]
    fn server_wide_readings_are_shared_only_by_targets_of_one_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("deploywatch.toml");
        let target = |name: &str, user: &str, db: &str| {
            format!(
                "[[targets]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = 5432\n\
                 user = \"{user}\"\ndbname = \"{db}\"\n\n"
            )
        };
        std::fs::create_dir(dir.path().join("checks")).expect("checks dir");
        std::fs::write(
            dir.path().join("checks/one.toml"),
            "[pack]\nname = \"one\"\n\n[[check]]\nname = \"up\"\ncategory = \"health\"\n\
             severity = \"info\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
        )
        .expect("pack");
        let text = [
            "[deployments]\nenabled = true\n\n".to_string(),
            target("a", "team_a", "orders"),
            target("a2", "team_a", "billing"),
            target("b", "team_b", "catalog"),
        ]
        .concat();
        std::fs::write(&path, text).expect("config");
        let config = Config::load(&path).expect("valid config");
        let pools = Pools::for_config(&Pools::default(), &config);
        let stats = |name: &str| pools.server_stats(name).expect("a reading per target");
        assert!(
            Arc::ptr_eq(&stats("a"), &stats("a2")),
            "one role, one reading"
        );
        assert!(
            !Arc::ptr_eq(&stats("a"), &stats("b")),
            "another role on the same server reads for itself"
        );
        assert_eq!(
            pools.get("a").map(|p| p.server().server().to_string()),
            pools.get("b").map(|p| p.server().server().to_string()),
            "while the session budget stays the server's"
        );
        pools.close_all();
    }

    #[test]
    fn a_databases_intervals_start_at_one_phase_of_the_shortest() {
        for index in 0..40 {
            let phase = first_run_offset(index, 40, S(30), S(30));
            assert!(phase < S(30));
            for every in [S(60), S(300)] {
                let offset = first_run_offset(index, 40, S(30), every);
                assert!(offset < every, "{offset:?} within {every:?}");
                let apart = (offset - phase).as_secs_f64();
                assert!(
                    (apart / 30.0 - (apart / 30.0).round()).abs() < 1e-9,
                    "{apart}"
                );
            }
            // Every run of the 1-minute interval falls on a run of the 5-minute one or between
            // two, never off the 30-second grid of its database.
            let (one, five) = (
                first_run_offset(index, 40, S(30), S(60)),
                first_run_offset(index, 40, S(30), S(300)),
            );
            let apart = (five.as_secs_f64() - one.as_secs_f64()).rem_euclid(60.0);
            assert!(apart < 1e-9 || (apart - 60.0).abs() < 1e-9, "{apart}");
        }
    }

    #[test]
    fn checks_join_a_session_early_only_within_less_than_half_the_shortest_interval() {
        // The shipped packs: 30 s, 1 minute and 5 minutes, on a 30-second grid.
        assert_eq!(join_horizon(S(30), S(30)), S(30).mul_f64(0.25));
        assert_eq!(join_horizon(S(60), S(30)), S(15));
        assert_eq!(join_horizon(S(300), S(30)), S(15));
        // A check on the grid is a whole step (30 s) from the next visit: never pulled early.
        for every in [S(30), S(60), S(300)] {
            assert!(join_horizon(every, S(30)) < S(30));
        }
        assert_eq!(join_horizon(S(60), Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn targets_are_spread_over_the_shortest_interval_and_long_intervals_over_their_slots() {
        let phases: Vec<f64> = (0..10)
            .map(|i| first_run_offset(i, 10, S(30), S(30)).as_secs_f64())
            .collect();
        assert_eq!(
            phases,
            vec![0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0, 24.0, 27.0]
        );
        let slots: std::collections::BTreeSet<u64> = (0..10)
            .map(|i| first_run_offset(i, 10, S(30), S(300)).as_secs() / 30)
            .collect();
        assert_eq!(
            slots.len(),
            10,
            "the 5-minute runs fill all ten 30-second slots"
        );
        assert_eq!(first_run_offset(0, 1, S(30), S(300)), Duration::ZERO);
        assert_eq!(first_run_offset(3, 4, S(60), S(30)), S(30).mul_f64(0.75));
    }
}

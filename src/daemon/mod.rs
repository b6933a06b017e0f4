//! `deploywatch run`: wires configuration, scheduler, deployment tracker and HTTP server
//! together, and owns the lifecycle.
//!
//! The daemon is driven by a closed set of [`Event`]s. `main` turns signals into events
//! (SIGHUP → reload, SIGTERM/SIGINT → shutdown); tests send them directly. The caller binds the
//! listener, so tests can use port 0.
//!
//! Shutdown: stop scheduling, let in-flight checks finish within the grace period, ask the
//! servers to cancel the queries still running after it, close the sessions, stop the HTTP
//! server. Reload: a bad new configuration is rejected and the old one
//! keeps running.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Overrides};
use crate::postgres::pool::Servers;
use crate::server::http::{self, AppContext, HttpSettings};
use crate::storage::actor::StoreActor;
use crate::storage::incremental::ProgressStore;
use crate::storage::Store;
use crate::watch::discovery::{self, Expanded, Known};
use crate::watch::scheduler::{self, Pools};
use crate::watch::state::State;
use crate::watch::tracker::{self, Announcer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Re-read the configuration file.
    Reload,
    /// Stop gracefully.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Store(#[from] crate::storage::StoreError),
    #[error("the daemon task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    WebConfig(#[from] crate::config::web::WebConfigError),
}

/// A running daemon, for callers that drive it (tests, `main`, the demo).
pub struct DaemonHandle {
    pub events: mpsc::Sender<Event>,
    pub state: Arc<State>,
    pub local_addr: std::net::SocketAddr,
    task: JoinHandle<Result<(), DaemonError>>,
}

impl DaemonHandle {
    /// Asks for a graceful shutdown and waits for it.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        let _ = self.events.send(Event::Shutdown).await;
        self.task.await?
    }

    /// Waits for the daemon to end (after a shutdown event sent elsewhere).
    pub async fn wait(self) -> Result<(), DaemonError> {
        self.task.await?
    }
}

/// Everything the running configuration owns; replaced as a whole on reload, or when database
/// discovery finds a different set of databases.
struct Generation {
    /// The configuration as loaded, discovery templates unexpanded.
    base: Arc<Config>,
    /// The targets that run, with their settings.
    shape: Vec<String>,
    /// Every template's databases as last listed.
    known: Known,
    pools: Pools,
    cancel: CancellationToken,
}

/// Starts the daemon on an already-bound listener.
pub fn start(config: Config, listener: TcpListener) -> Result<DaemonHandle, DaemonError> {
    start_with_clock(config, listener, crate::time::system_clock())
}

/// As [`start`], with command-line settings that win over the file's on every reload
/// (`run --shard`). `config` has them applied already.
pub fn start_with_overrides(
    config: Config,
    listener: TcpListener,
    overrides: Overrides,
) -> Result<DaemonHandle, DaemonError> {
    start_with(
        config,
        listener,
        crate::time::system_clock(),
        overrides,
        http::SCRAPE_STALL_TIMEOUT,
    )
}

/// As [`start`], with a `/metrics` client cut off once it has read nothing for
/// `stall_timeout` instead of [`http::SCRAPE_STALL_TIMEOUT`].
pub fn start_with_scrape_stall_timeout(
    config: Config,
    listener: TcpListener,
    stall_timeout: std::time::Duration,
) -> Result<DaemonHandle, DaemonError> {
    start_with(
        config,
        listener,
        crate::time::system_clock(),
        Overrides::default(),
        stall_timeout,
    )
}

/// As [`start`], with "now" taken from `clock` by every component.
pub fn start_with_clock(
    config: Config,
    listener: TcpListener,
    clock: crate::time::SharedClock,
) -> Result<DaemonHandle, DaemonError> {
    start_with(
        config,
        listener,
        clock,
        Overrides::default(),
        http::SCRAPE_STALL_TIMEOUT,
    )
}

/// As [`start_with_clock`] and [`start_with_overrides`] together.
pub(crate) fn start_with(
    config: Config,
    listener: TcpListener,
    clock: crate::time::SharedClock,
    overrides: Overrides,
    scrape_stall_timeout: std::time::Duration,
) -> Result<DaemonHandle, DaemonError> {
    let state = Arc::new(State::with_clock(clock));
    // Readers see every configured target of this replica's shard and its checks (as pending)
    // from the first moment.
    let mut shown = config.clone();
    shown.retain_owned();
    state.apply_config(&shown, state.now());
    let store = open_store(&config.store)?;
    let store = StoreActor::start(store)?;
    // Incremental checks keep their progress in a table of their own in the same store.
    let progress = ProgressStore::new(&store);
    let local_addr = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let (events_tx, events_rx) = mpsc::channel(8);
    let announcer = Announcer::new();
    let web = match &config.server.web_config_file {
        Some(path) => Some(crate::config::web::LiveWebConfig::load(path)?),
        None => None,
    };
    let ctx = Arc::new(AppContext {
        state: state.clone(),
        announcer: announcer.clone(),
        settings: std::sync::RwLock::new(HttpSettings::from_config(&config)),
        web,
        scrapes: http::Scrapes::new(config.server.max_concurrent_scrapes, scrape_stall_timeout),
    });
    let task = tokio::spawn(main_loop(
        config,
        overrides,
        listener,
        ctx,
        state.clone(),
        store,
        progress,
        announcer,
        events_rx,
    ));
    Ok(DaemonHandle {
        events: events_tx,
        state,
        local_addr,
        task,
    })
}

/// The store the configuration names: a PostgreSQL database (opened by its first operation,
/// on the store's thread), an SQLite file, or memory.
pub(crate) fn open_store(settings: &crate::config::StoreConfig) -> Result<Store, DaemonError> {
    if let Some(url) = &settings.url {
        let password = settings.password.clone().map(|source| {
            let read: crate::storage::PasswordReader =
                Arc::new(move || source.read().map(Some).map_err(|e| e.to_string()));
            read
        });
        let mut pg = crate::config::store_settings(url, password)
            .map_err(|reason| DaemonError::Store(crate::storage::StoreError::Postgres(reason)))?;
        // What the other replicas show as a target's leader: the pod's (host's) name.
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("pid {}", std::process::id()));
        pg.replica = format!("deploywatch {host}").chars().take(63).collect();
        return Ok(Store::postgres(pg));
    }
    Ok(match &settings.path {
        Some(path) => Store::open_or_reset(path, settings.reset_invalid)?,
        None => Store::in_memory()?,
    })
}

/// What a generation starts with and shares.
struct Runtime<'a> {
    state: &'a Arc<State>,
    store: &'a StoreActor,
    progress: &'a ProgressStore,
    announcer: &'a Announcer,
    tasks: &'a TaskTracker,
    root: &'a CancellationToken,
}

fn start_generation(
    base: Arc<Config>,
    expanded: Expanded,
    previous: &Pools,
    rt: &Runtime<'_>,
) -> Generation {
    let shape = expanded.shape();
    let pools = Pools::for_config(previous, &expanded.config);
    show(&expanded, rt.state);
    let (config, known) = (expanded.config, expanded.known);
    let cancel = rt.root.child_token();
    scheduler::start(&config, &pools, rt.state, rt.progress, rt.tasks, &cancel);
    tracker::start(
        &config,
        &pools,
        rt.state,
        rt.store,
        rt.announcer,
        rt.tasks,
        &cancel,
    );
    Generation {
        base,
        shape,
        known,
        pools,
        cancel,
    }
}

/// Makes the state show an expansion: its targets, the templates that could not be asked, and
/// the databases kept from their last good list, as unreachable until a check says otherwise.
fn show(expanded: &Expanded, state: &State) {
    state.apply_config(&expanded.config, state.now());
    for (name, message) in &expanded.failures {
        state.set_unreachable(name, message.clone());
        let prefix = format!("{name}/");
        for target in &expanded.config.targets {
            if target.name.starts_with(&prefix) {
                state.set_unreachable(&target.name, message.clone());
            }
        }
    }
}

/// Replaces the running generation with one for `base` as discovery expanded it.
fn restart(generation: &mut Generation, base: Arc<Config>, expanded: Expanded, rt: &Runtime<'_>) {
    generation.cancel.cancel();
    // Queued before the new generation's trackers ask for their leads: a target this replica
    // no longer tracks is handed to the other replicas now, not when this process stops.
    let tracked: HashSet<String> = if expanded.config.deployments.enabled {
        expanded
            .config
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect()
    } else {
        HashSet::new()
    };
    rt.store
        .submit("release the leads of untracked targets", move |store| {
            store.keep_leads(tracked)
        });
    let previous = generation.pools.clone();
    *generation = start_generation(base, expanded, &previous, rt);
}

fn discovery_timer(config: &Config) -> tokio::time::Interval {
    let every = config.defaults.discovery_interval;
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer
}

#[allow(clippy::too_many_arguments)]
async fn main_loop(
    config: Config,
    overrides: Overrides,
    listener: TcpListener,
    ctx: Arc<AppContext>,
    state: Arc<State>,
    store: StoreActor,
    progress: ProgressStore,
    announcer: Announcer,
    mut events: mpsc::Receiver<Event>,
) -> Result<(), DaemonError> {
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    let http_cancel = CancellationToken::new();
    let grace = config.server.shutdown_grace;
    let http_task = tokio::spawn(http::serve(listener, ctx.clone(), http_cancel.clone()));
    let rt = Runtime {
        state: &state,
        store: &store,
        progress: &progress,
        announcer: &announcer,
        tasks: &tasks,
        root: &root,
    };
    let base = Arc::new(config);
    // The session budgets of the servers, kept for the life of the process.
    let servers = Servers::default();
    tasks.spawn(publish_servers(
        servers.clone(),
        state.clone(),
        root.clone(),
    ));
    let nothing_known = Known::default();
    let expanded = tokio::select! {
        expanded = discovery::expand_on(&base, &servers, &nothing_known) => expanded,
        // A shutdown asked for while the servers are still being asked for their databases.
        _ = wait_for_shutdown(&mut events) => {
            http_cancel.cancel();
            let _ = http_task.await;
            return Ok(());
        }
    };
    tracing::info!(
        config = %base.source.display(),
        shard = %base.server.shard,
        targets = expanded.config.targets.len(),
        checks = expanded.config.targets.iter().map(|t| t.checks.len()).sum::<usize>(),
        "deploywatch started"
    );
    let mut generation =
        start_generation(base, expanded, &Pools::with_servers(servers.clone()), &rt);

    // Discovery passes run beside the loop; `epoch` tells a pass started before a reload
    // from a current one.
    let (found_tx, mut found_rx) = mpsc::channel::<(u64, Expanded)>(1);
    let mut epoch = 0u64;
    let mut discovering = false;
    let mut rediscover = discovery_timer(&generation.base);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                None | Some(Event::Shutdown) => break,
                Some(Event::Reload) => match Config::load(&generation.base.source).and_then(|mut config| {
                    config.apply_overrides(&overrides)?;
                    Ok(config)
                }) {
                    Ok(new_config) => {
                        if new_config.server.listen != generation.base.server.listen {
                            tracing::warn!("server.listen changed; the new address takes effect after a restart");
                        }
                        let expanded = discovery::expand_on(&new_config, &servers, &generation.known).await;
                        tracing::info!(config = %new_config.source.display(), "configuration reloaded");
                        rediscover = discovery_timer(&new_config);
                        epoch += 1;
                        ctx.apply(&new_config);
                        restart(&mut generation, Arc::new(new_config), expanded, &rt);
                    }
                    Err(error) => {
                        state.set_reload_failed();
                        tracing::error!(%error, "configuration reload rejected; the previous configuration keeps running");
                    }
                },
            },
            _ = rediscover.tick(), if !discovering && discovery::has_templates(&generation.base) => {
                discovering = true;
                let (base, found, cancel, pass) = (generation.base.clone(), found_tx.clone(), root.clone(), epoch);
                let (servers, known) = (servers.clone(), generation.known.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        expanded = discovery::expand_on(&base, &servers, &known) => { let _ = found.send((pass, expanded)).await; }
                        _ = cancel.cancelled() => {}
                    }
                });
            }
            Some((pass, expanded)) = found_rx.recv() => {
                discovering = false;
                if pass != epoch {
                    continue;
                }
                if expanded.shape() != generation.shape {
                    tracing::info!(
                        targets = expanded.config.targets.iter().filter(|t| t.discover.is_none()).count(),
                        "discovered databases changed"
                    );
                    let base = generation.base.clone();
                    restart(&mut generation, base, expanded, &rt);
                } else {
                    // The same targets: they keep running; only what is shown changes (a
                    // template whose server could not be asked, or could again).
                    show(&expanded, &state);
                    generation.known = expanded.known;
                }
            }
        }
    }

    tracing::info!(grace = ?grace, "shutting down: waiting for checks in flight");
    root.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        // Abandoned queries would go on running on the server: PostgreSQL is asked to cancel
        // them, as psql does on Ctrl-C.
        let cancelled = generation.pools.cancel_in_flight().await;
        tracing::warn!(
            grace = ?grace, cancelled,
            "grace period expired with checks still running; their queries were cancelled"
        );
    }
    generation.pools.close_all();
    http_cancel.cancel();
    let _ = http_task.await;
    tracing::info!("deploywatch stopped");
    Ok(())
}

/// Copies the servers' session budgets into the state every second, for `/status` and the
/// metrics.
async fn publish_servers(servers: Servers, state: Arc<State>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tick.tick() => state.set_servers(servers.views(std::time::Instant::now())),
        }
    }
}

/// Resolves when a shutdown is asked for (or nobody can ask any more); reloads are dropped, as
/// the configuration they would re-read has not started yet.
async fn wait_for_shutdown(events: &mut mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        if event == Event::Shutdown {
            return;
        }
    }
}

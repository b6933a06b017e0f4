//! `deploywatch run`: wires configuration, scheduler, deployment tracker and HTTP server
//! together, and owns the lifecycle.
//!
//! The daemon is driven by a closed set of [`Event`]s. `main` turns signals into events
//! (SIGHUP → reload, SIGTERM/SIGINT → shutdown); tests send them directly. The caller binds the
//! listener, so tests can use port 0.
//!
//! Shutdown: stop scheduling, let in-flight checks finish within the grace period, close the
//! sessions, stop the HTTP server. Reload: a bad new configuration is rejected and the old one
//! keeps running.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::http::{self, AppContext};
use crate::metrics::{self, MetricsError};
use crate::scheduler::{self, unix_now, Pools};
use crate::state::State;
use crate::store::Store;
use crate::tracker::{self, Announcer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Re-read the configuration file.
    Reload,
    /// Stop gracefully.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot open the state store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the daemon task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    WebConfig(#[from] crate::web_config::WebConfigError),
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

/// Everything the running configuration owns; replaced as a whole on reload.
struct Generation {
    config: Arc<Config>,
    pools: Pools,
    cancel: CancellationToken,
}

/// Starts the daemon on an already-bound listener.
pub fn start(config: Config, listener: TcpListener) -> Result<DaemonHandle, DaemonError> {
    let state = Arc::new(State::new());
    // Readers see every configured target and check (as pending) from the first moment.
    state.apply_config(&config, unix_now());
    let registry = metrics::registry(state.clone())?;
    let store = match &config.store.path {
        Some(path) => Store::open(path)?,
        None => Store::in_memory()?,
    };
    let local_addr = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let (events_tx, events_rx) = mpsc::channel(8);
    let announcer = Announcer::new();
    let web = match &config.server.web_config_file {
        Some(path) => Some(crate::web_config::WebConfig::load(path)?),
        None => None,
    };
    let ctx = Arc::new(AppContext {
        state: state.clone(),
        registry,
        announcer: config.deployments.enabled.then(|| announcer.clone()),
        api_token: config.server.api_token.clone(),
        web,
        metrics_cache: std::sync::Mutex::new(None),
    });
    let task = tokio::spawn(main_loop(
        config,
        listener,
        ctx,
        state.clone(),
        store,
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

fn start_generation(
    config: Config,
    previous: &Pools,
    state: &Arc<State>,
    store: &Store,
    announcer: &Announcer,
    tasks: &TaskTracker,
    root: &CancellationToken,
) -> Generation {
    let config = Arc::new(config);
    let pools = Pools::for_config(previous, &config);
    state.apply_config(&config, unix_now());
    let cancel = root.child_token();
    scheduler::start(&config, &pools, state, tasks, &cancel);
    tracker::start(&config, &pools, state, store, announcer, tasks, &cancel);
    Generation {
        config,
        pools,
        cancel,
    }
}

async fn main_loop(
    config: Config,
    listener: TcpListener,
    ctx: Arc<AppContext>,
    state: Arc<State>,
    store: Store,
    announcer: Announcer,
    mut events: mpsc::Receiver<Event>,
) -> Result<(), DaemonError> {
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    let http_cancel = CancellationToken::new();
    let grace = config.server.shutdown_grace;
    let http_task = tokio::spawn(http::serve(listener, ctx, http_cancel.clone()));
    tracing::info!(
        config = %config.source.display(),
        targets = config.targets.len(),
        checks = config.targets.iter().map(|t| t.checks.len()).sum::<usize>(),
        "deploywatch started"
    );
    let mut generation = start_generation(
        config,
        &Pools::default(),
        &state,
        &store,
        &announcer,
        &tasks,
        &root,
    );

    while let Some(event) = events.recv().await {
        match event {
            Event::Shutdown => break,
            Event::Reload => {
                match Config::load(&generation.config.source) {
                    Ok(new_config) => {
                        if new_config.server.listen != generation.config.server.listen {
                            tracing::warn!("server.listen changed; the new address takes effect after a restart");
                        }
                        tracing::info!(config = %new_config.source.display(), "configuration reloaded");
                        generation.cancel.cancel();
                        let previous = generation.pools.clone();
                        generation = start_generation(
                            new_config, &previous, &state, &store, &announcer, &tasks, &root,
                        );
                    }
                    Err(error) => {
                        state.set_reload_failed();
                        tracing::error!(%error, "configuration reload rejected; the previous configuration keeps running");
                    }
                }
            }
        }
    }

    tracing::info!(grace = ?grace, "shutting down: waiting for checks in flight");
    root.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::warn!(grace = ?grace, "grace period expired with checks still running; abandoning them");
    }
    generation.pools.close_all();
    http_cancel.cancel();
    let _ = http_task.await;
    tracing::info!("deploywatch stopped");
    Ok(())
}

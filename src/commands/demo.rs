//! `deploywatch demo`: the checklist's story on a throwaway PostgreSQL, on a compressed clock.
//!
//! It starts a cluster with the test harness ([`deploywatch_testkit::pgcluster`]), loads the cognit
//! application at 3.6.0, runs a light workload, starts the daemon with `config/demo.toml` and
//! then plays: baseline → the 001 migration is detected as a deployment → the first-hour window
//! passes → an integrity violation is injected and flagged, then repaired → the index a hot
//! query needs is dropped and the regression is flagged with its evidence. Each step is
//! announced with what changed in `/status`. Ctrl-C stops everything and removes the cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::analysis::deployment::{DeploymentView, Signal};
use crate::analysis::window::{Verdict, Window};
use crate::checks::outcome::Status;
use crate::config::Config;
use crate::daemon::{self, DaemonHandle};
use crate::watch::state::State;
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};
use deploywatch_testkit::workload::{self, fixtures, Application, WorkloadError};

const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");
const COGNIT_PACK: &str = include_str!("../../config/checks/cognit-3.7.0.toml");
const POSTGRES_PACK: &str = include_str!("../../config/checks/postgres.toml");
const DATABASE: &str = "cognit";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Cluster(#[from] deploywatch_testkit::pgcluster::PgClusterError),
    #[error("cannot prepare the demo database: {0}")]
    Application(#[from] WorkloadError),
    #[error("cannot write the demo configuration: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Daemon(#[from] daemon::DaemonError),
    #[error("invalid --step {0:?}: write e.g. \"20s\"")]
    Step(String),
    #[error("the story stalled: {0}")]
    Stalled(String),
}

pub struct DemoOptions {
    pub step: String,
    pub listen: SocketAddr,
    pub story: bool,
    pub exit_after_story: bool,
    /// The file the daemon's log goes to (None: standard error), named to the reader.
    pub log_file: Option<std::path::PathBuf>,
}

fn say(text: &str) {
    println!("{text}");
}

/// Runs the demo until the story ends (with `exit_after_story`) or Ctrl-C.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let step = humantime::parse_duration(&options.step)
        .ok()
        .filter(|d| *d >= Duration::from_secs(2))
        .ok_or_else(|| DemoError::Step(options.step.clone()))?;
    let stop = stop_on_signal()?;
    say("deploywatch demo: starting a throwaway PostgreSQL ...");
    if let Some(log) = &options.log_file {
        say(&format!(
            "  the daemon's log goes to {} (tail -f it to watch the daemon at work)",
            log.display()
        ));
    }
    let cluster = PgCluster::start(ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".to_string()],
        ..ClusterOptions::default()
    })?;
    // From here on the cluster is removed when `cluster` is dropped, on every path out.
    let interrupted = |cluster: PgCluster| {
        say(&format!("\ninterrupted; {}", remove(cluster)));
        Ok(())
    };
    say(&format!(
        "  PostgreSQL on 127.0.0.1:{} (cluster directory {})",
        cluster.port(),
        cluster.base_dir().display()
    ));
    cluster.create_database(DATABASE)?;
    // The daemon connects as a monitoring role, as in production, never as the superuser.
    cluster.create_monitoring_role("deploywatch")?;
    let connection_string = cluster.connection_string(DATABASE);
    let admin = Application::connect(&connection_string).await?;
    let load = async {
        admin.run(fixtures::SCHEMA_3_6_0).await?;
        admin.run(fixtures::GENERATE).await?;
        admin.run("SELECT cognit_generate(10)").await?;
        if cluster.pg_stat_statements_available() {
            admin
                .run("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
        } else {
            say(&format!(
                "  pg_stat_statements is not installed with the PostgreSQL in {}: \
                 no query-latency signals (install the contrib modules for them)",
                cluster.bindir().display()
            ));
        }
        Ok::<_, DemoError>(())
    };
    tokio::select! {
        loaded = load => loaded?,
        _ = stop.cancelled() => {
            drop(admin);
            return interrupted(cluster);
        }
    }
    if stop.is_cancelled() {
        drop(admin);
        return interrupted(cluster);
    }
    say("  loaded the cognit application at schema version 3.6.0");

    let cancel = CancellationToken::new();
    let (workload_task, _) = workload::spawn(
        &connection_string,
        40,
        Duration::from_millis(100),
        cancel.clone(),
    )
    .await?;
    say("  a light application workload is running (registrations, consents, submissions, payments)");

    let dir = tempdir_for_config()?;
    let config = write_config(dir.path(), &cluster, step)?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| DemoError::Listen {
            address: options.listen,
            source,
        })?;
    let handle = daemon::start(config, listener)?;
    let base = format!("http://{}", handle.local_addr);
    say(&format!(
        "\ndeploywatch is watching the demo database:\n  {base}/status?format=text   what an SRE reads\n  {base}/status               the same as JSON\n  {base}/metrics              what Prometheus scrapes\n"
    ));

    let outcome = if options.story {
        tokio::select! {
            result = story(&handle, &admin, step) => result,
            _ = stop.cancelled() => Ok(()),
        }
    } else {
        Ok(())
    };
    let keep_running = !options.story || !options.exit_after_story;
    if outcome.is_ok() && !keep_running && !stop.is_cancelled() {
        // Leave the final state up for one more step, for whoever is watching /status.
        say(&format!(
            "{base}/status?format=text shows it for {step:?} more, then the demo ends (without \
             --exit-after-story it stays up until Ctrl-C)."
        ));
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = stop.cancelled() => {}
        }
    }
    if outcome.is_ok() && keep_running && !stop.is_cancelled() {
        say(&format!("Try: curl -s {base}/status?format=text"));
        say("\nPress Ctrl-C to stop the demo and remove the cluster.");
        stop.cancelled().await;
    }
    say("\nstopping: daemon, workload, PostgreSQL ...");
    cancel.cancel();
    let _ = workload_task.await;
    let _ = handle.shutdown().await;
    drop(admin);
    drop(dir);
    say(&format!("done; {}", remove(cluster)));
    if let Some(log) = &options.log_file {
        say(&format!("the daemon's log stays in {}", log.display()));
    }
    outcome
}

/// Stops and removes the throwaway cluster, and says whether its directory is gone.
fn remove(cluster: PgCluster) -> String {
    let base_dir = cluster.base_dir().to_path_buf();
    drop(cluster);
    let what = if base_dir.exists() {
        "could not be removed"
    } else {
        "is removed"
    };
    format!("{} {what}", base_dir.display())
}

fn tempdir_for_config() -> Result<tempfile::TempDir, std::io::Error> {
    let dir = tempfile::Builder::new()
        .prefix("deploywatch-demo-config")
        .tempdir()?;
    std::fs::create_dir_all(dir.path().join("checks"))?;
    Ok(dir)
}

/// Cancelled on the first SIGINT (Ctrl-C) or SIGTERM. Installed before anything is started,
/// so a signal at any moment is handled here and the cleanup runs instead of the process
/// dying with a cluster directory left behind.
fn stop_on_signal() -> Result<CancellationToken, std::io::Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        token.cancel();
    });
    Ok(stop)
}

fn seconds(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// `config/demo.toml` with the clock scaled to `step` and the throwaway cluster as target.
fn write_config(dir: &Path, cluster: &PgCluster, step: Duration) -> Result<Config, DemoError> {
    let tick = (step / 10).max(Duration::from_secs(1));
    let text = DEMO_CONFIG
        .replace("{TICK}", &seconds(tick))
        .replace("{FIRST_HOUR}", &seconds(step * 3))
        .replace("{FIRST_DAY}", &seconds(step * 6))
        .replace("{FIRST_WEEK}", &seconds(step * 9))
        .replace("{PORT}", &cluster.port().to_string())
        .replace("{DBNAME}", DATABASE);
    std::fs::write(dir.join("deploywatch.toml"), text)?;
    std::fs::write(dir.join("checks/cognit-3.7.0.toml"), COGNIT_PACK)?;
    std::fs::write(dir.join("checks/postgres.toml"), POSTGRES_PACK)?;
    Ok(Config::load(&dir.join("deploywatch.toml"))?)
}

async fn wait_for<T>(
    state: &Arc<State>,
    what: &str,
    limit: Duration,
    probe: impl Fn(&crate::watch::state::Snapshot) -> Option<T>,
) -> Result<T, DemoError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe(&state.snapshot()) {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Stalled(format!(
                "{what} did not happen within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn deployment(snapshot: &crate::watch::state::Snapshot) -> Option<&DeploymentView> {
    snapshot.deployments.get(DATABASE)
}

fn check_status(snapshot: &crate::watch::state::Snapshot, check: &str) -> Option<Status> {
    snapshot
        .targets
        .get(DATABASE)
        .and_then(|t| t.checks.get(check))
        .map(|c| c.status)
}

/// A check as `/status` shows it: `NAME STATUS (value, expected EXPECTATION)`.
fn shown(snapshot: &crate::watch::state::Snapshot, check: &str) -> String {
    let Some(state) = snapshot
        .targets
        .get(DATABASE)
        .and_then(|t| t.checks.get(check))
    else {
        return format!("{check} not found");
    };
    let value = state
        .outcome
        .as_ref()
        .and_then(|o| o.observation.as_ref())
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".to_string());
    let expectation = state
        .spec
        .expectation
        .as_ref()
        .map(|e| format!(", expected {e}"))
        .unwrap_or_default();
    format!(
        "{check} {} ({value}{expectation})",
        state.status.as_str().to_uppercase()
    )
}

async fn story(
    handle: &DaemonHandle,
    admin: &Application,
    step: Duration,
) -> Result<(), DemoError> {
    let state = &handle.state;
    let limit = step * 12;
    say(&format!(
        "[1/5] baseline: recording {:?} of normal traffic before the deployment",
        step * 2
    ));
    let before = wait_for(state, "first check results", limit, |s| {
        check_status(s, "schema_version")
            .filter(|s| *s != Status::Pending)
            .map(|_| shown(s, "schema_version"))
    })
    .await?;
    say(&format!(
        "      /status: {before}: the checklist's checks for 3.7.0 fail before the migration"
    ));
    tokio::time::sleep(step * 2).await;

    say("[2/5] applying 001_pragmatic_schema_fixes.sql (3.6.0 -> 3.7.0)");
    admin.run(fixtures::MIGRATION_001).await?;
    let view = wait_for(state, "the deployment to be detected", limit, |s| {
        deployment(s).cloned()
    })
    .await?;
    say(&format!(
        "      /status: deployment #{} detected by {}: {} -> {} with {} baseline samples; window first_hour is watching",
        view.id,
        view.detected_by.as_str(),
        view.from_version.as_deref().unwrap_or("?"),
        view.to_version,
        view.baseline_samples
    ));
    let after = [
        "schema_version",
        "score_check_constraints",
        "partial_indexes",
    ];
    let passing = wait_for(state, "the 3.7.0 health checks to pass", limit, |s| {
        after
            .iter()
            .all(|c| check_status(s, c) == Some(Status::Pass))
            .then(|| after.map(|c| shown(s, c)).join(", "))
    })
    .await?;
    say(&format!("      /status: {passing}"));

    say("[3/5] watching the first hour ...");
    let verdict = wait_for(state, "the first_hour verdict", limit, |s| {
        deployment(s)?
            .windows
            .iter()
            .find(|w| w.window == Window::FirstHour && w.verdict != Verdict::Watching)
            .map(|w| w.verdict)
    })
    .await?;
    if verdict == Verdict::Pass {
        say("      /status: first_hour verdict pass: nothing got worse than the baseline");
    } else {
        say(&format!(
            "      /status: first_hour verdict {} (see /status for why)",
            verdict.as_str()
        ));
    }

    say("[4/5] injecting an integrity violation: payments of participants that do not exist");
    admin.run(fixtures::CORRUPT_ORPHANED_PAYMENTS).await?;
    let failing = wait_for(state, "orphaned_payments to fail", limit, |s| {
        (check_status(s, "orphaned_payments") == Some(Status::Fail))
            .then(|| shown(s, "orphaned_payments"))
    })
    .await?;
    say(&format!(
        "      /status: {failing}; deploywatch_check_success{{check=\"orphaned_payments\"}} 0 pages via Alertmanager"
    ));
    admin.run(fixtures::REPAIR_ORPHANED_PAYMENTS).await?;
    let repaired = wait_for(state, "orphaned_payments to pass again", limit, |s| {
        (check_status(s, "orphaned_payments") == Some(Status::Pass))
            .then(|| shown(s, "orphaned_payments"))
    })
    .await?;
    say(&format!("      repaired: {repaired}"));

    say("[5/5] introducing a regression: DROP INDEX idx_submissions_participant, which a hot query needs");
    admin
        .run("DROP INDEX IF EXISTS idx_submissions_participant")
        .await?;
    // Each finding is told as it appears; the story waits for both signals a lost index gives.
    let wanted = [Signal::QueryLatency, Signal::SeqScans];
    let mut told: Vec<String> = Vec::new();
    let mut signals: Vec<Signal> = Vec::new();
    let deadline = tokio::time::Instant::now() + step * 9;
    loop {
        let snapshot = state.snapshot();
        for (window, finding) in deployment(&snapshot)
            .into_iter()
            .flat_map(|view| view.windows.iter())
            .flat_map(|w| w.regressions.iter().map(move |f| (w.window, f)))
            .filter(|(_, f)| wanted.contains(&f.signal))
        {
            // Once per window, signal and subject: the figures of a finding are updated as
            // samples come in, the finding is the same.
            let key = format!(
                "{} {} {}",
                window.as_str(),
                finding.signal.as_str(),
                finding.subject
            );
            if !told.contains(&key) {
                say(&format!(
                    "      /status: REGRESSION {} {}: {}",
                    window.as_str(),
                    finding.signal.as_str(),
                    finding.message
                ));
                told.push(key);
                if !signals.contains(&finding.signal) {
                    signals.push(finding.signal);
                }
            }
        }
        if wanted.iter().all(|w| signals.contains(w)) || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if signals.is_empty() {
        return Err(DemoError::Stalled(format!(
            "the regression was not flagged within {:?}",
            step * 9
        )));
    }
    for missing in wanted.iter().filter(|w| !signals.contains(w)) {
        say(&format!(
            "      ({} was not flagged within {:?}: its test needs more samples than the story waits for)",
            missing.as_str(),
            step * 9
        ));
    }
    say("\nThe story is over: deploywatch caught the integrity violation and the regression with its evidence.");
    Ok(())
}

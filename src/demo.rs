//! `deploywatch demo`: the checklist's story on a throwaway PostgreSQL, on a compressed clock.
//!
//! It starts a cluster with the test harness ([`crate::pgcluster`]), loads the cognit
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

use crate::config::Config;
use crate::daemon::{self, DaemonHandle};
use crate::deployment::DeploymentView;
use crate::outcome::Status;
use crate::pgcluster::{ClusterOptions, PgCluster};
use crate::state::State;
use crate::window::{Verdict, Window};
use crate::workload::{self, fixtures};

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
const COGNIT_PACK: &str = include_str!("../config/checks/cognit-3.7.0.toml");
const POSTGRES_PACK: &str = include_str!("../config/checks/postgres.toml");
const DATABASE: &str = "cognit";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Cluster(#[from] crate::pgcluster::PgClusterError),
    #[error("cannot prepare the demo database: {0}")]
    Database(#[from] tokio_postgres::Error),
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
    #[error("{0}")]
    Workload(#[from] workload::WorkloadError),
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
    say("deploywatch demo: starting a throwaway PostgreSQL ...");
    let cluster = PgCluster::start(ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".to_string()],
        ..ClusterOptions::default()
    })?;
    say(&format!(
        "  PostgreSQL on 127.0.0.1:{} (cluster directory {})",
        cluster.port(),
        cluster.base_dir().display()
    ));
    cluster.create_database(DATABASE)?;
    let connection_string = cluster.connection_string(DATABASE);
    let (admin, connection) =
        tokio_postgres::connect(&connection_string, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    admin.batch_execute(fixtures::SCHEMA_3_6_0).await?;
    admin.batch_execute(fixtures::GENERATE).await?;
    admin.batch_execute("SELECT cognit_generate(10)").await?;
    if cluster.pg_stat_statements_available() {
        admin
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await?;
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
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    } else {
        Ok(())
    };
    let keep_running = !options.story || !options.exit_after_story;
    if outcome.is_ok() && !keep_running {
        // Leave the final state up for one more step, for whoever is watching /status.
        tokio::time::sleep(step).await;
    }
    if outcome.is_ok() && keep_running {
        say("\nPress Ctrl-C to stop the demo and remove the cluster.");
        let _ = tokio::signal::ctrl_c().await;
    }
    say("\nstopping: daemon, workload, PostgreSQL ...");
    cancel.cancel();
    let _ = workload_task.await;
    let _ = handle.shutdown().await;
    drop(admin);
    driver.abort();
    let base_dir = cluster.base_dir().to_path_buf();
    drop(cluster);
    drop(dir);
    say(&format!(
        "done; {} {}",
        base_dir.display(),
        if base_dir.exists() {
            "could not be removed"
        } else {
            "is removed"
        }
    ));
    outcome
}

fn tempdir_for_config() -> Result<tempfile_dir::TempDir, std::io::Error> {
    tempfile_dir::TempDir::new("deploywatch-demo-config")
}

/// A directory removed on drop (the demo's configuration lives there).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<TempDir> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path =
                std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(path.join("checks"))?;
            Ok(TempDir(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
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
    probe: impl Fn(&crate::state::Snapshot) -> Option<T>,
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

fn deployment(snapshot: &crate::state::Snapshot) -> Option<&DeploymentView> {
    snapshot.deployments.get(DATABASE)
}

fn check_status(snapshot: &crate::state::Snapshot, check: &str) -> Option<Status> {
    snapshot
        .targets
        .get(DATABASE)
        .and_then(|t| t.checks.get(check))
        .map(|c| c.status)
}

async fn story(
    handle: &DaemonHandle,
    admin: &tokio_postgres::Client,
    step: Duration,
) -> Result<(), DemoError> {
    let state = &handle.state;
    let limit = step * 12;
    say(&format!(
        "[1/5] baseline: recording {:?} of normal traffic before the deployment",
        step * 2
    ));
    wait_for(state, "first check results", limit, |s| {
        check_status(s, "schema_version").filter(|s| *s != Status::Pending)
    })
    .await?;
    say("      /status: schema_version FAIL (3.6.0, expected 3.7.0), the checklist's health checks fail before the migration");
    tokio::time::sleep(step * 2).await;

    say("[2/5] applying 001_pragmatic_schema_fixes.sql (3.6.0 -> 3.7.0)");
    admin.batch_execute(fixtures::MIGRATION_001).await?;
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
    wait_for(state, "schema_version to pass", limit, |s| {
        (check_status(s, "schema_version") == Some(Status::Pass)).then_some(())
    })
    .await?;
    say("      /status: schema_version PASS, score constraints and partial indexes in place");

    say("[3/5] watching the first hour ...");
    let verdict = wait_for(state, "the first_hour verdict", limit, |s| {
        deployment(s)?
            .windows
            .iter()
            .find(|w| w.window == Window::FirstHour && w.verdict != Verdict::Watching)
            .map(|w| w.verdict)
    })
    .await?;
    say(&format!(
        "      /status: first_hour verdict {}",
        verdict.as_str()
    ));

    say("[4/5] injecting an integrity violation: payments of participants that do not exist");
    admin
        .batch_execute(fixtures::CORRUPT_ORPHANED_PAYMENTS)
        .await?;
    let value = wait_for(state, "orphaned_payments to fail", limit, |s| {
        let check = s.targets.get(DATABASE)?.checks.get("orphaned_payments")?;
        (check.status == Status::Fail)
            .then(|| check.outcome.as_ref()?.observation.as_ref()?.as_number())
            .flatten()
    })
    .await?;
    say(&format!(
        "      /status: orphaned_payments FAIL ({value} rows, expected == 0); deploywatch_check_success{{check=\"orphaned_payments\"}} 0 pages via Alertmanager"
    ));
    admin
        .batch_execute(fixtures::REPAIR_ORPHANED_PAYMENTS)
        .await?;
    wait_for(state, "orphaned_payments to pass again", limit, |s| {
        (check_status(s, "orphaned_payments") == Some(Status::Pass)).then_some(())
    })
    .await?;
    say("      repaired: orphaned_payments PASS again");

    say("[5/5] introducing a regression: DROP INDEX idx_submissions_participant, which a hot query needs");
    admin
        .batch_execute("DROP INDEX IF EXISTS idx_submissions_participant")
        .await?;
    let findings = wait_for(state, "the regression to be flagged", step * 9, |s| {
        let view = deployment(s)?;
        let found: Vec<String> = view
            .windows
            .iter()
            .flat_map(|w| w.regressions.iter().map(move |f| (w.window, f)))
            .filter(|(_, f)| {
                matches!(
                    f.signal,
                    crate::deployment::Signal::QueryLatency | crate::deployment::Signal::SeqScans
                )
            })
            .map(|(w, f)| format!("{} {}: {}", w.as_str(), f.signal.as_str(), f.message))
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await?;
    for finding in findings {
        say(&format!("      /status: REGRESSION {finding}"));
    }
    say("\nThe story is over: deploywatch caught the integrity violation and the regression with its evidence.");
    say(&format!(
        "Try: curl -s http://{}/status?format=text",
        handle.local_addr
    ));
    Ok(())
}

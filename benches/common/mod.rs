//! What the end-to-end benchmarks share: a daemon on compressed windows, watching one database
//! of a benchmark's PostgreSQL, taking announcements with a known token.

pub mod random;
pub mod scenario;

use std::path::PathBuf;
use std::str::FromStr;

use deploywatch::config::Config;
use deploywatch::daemon::DaemonHandle;
use deploywatch_testkit::config::compressed_clock;
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};

pub const TOKEN: &str = "bench-token";

/// A running daemon and its configuration directory.
pub struct BenchDaemon {
    pub handle: DaemonHandle,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    dir: PathBuf,
}

impl BenchDaemon {
    /// Shuts the daemon down and removes its configuration directory.
    pub async fn stop(self) {
        self.handle.shutdown().await.expect("shutdown");
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The end of a run: the workload is cancelled and awaited, the daemon stopped (see
    /// [`BenchDaemon::stop`]), the connection's `driver` task ended and the cluster removed.
    pub async fn stop_all<T, U>(
        self,
        cancel: &tokio_util::sync::CancellationToken,
        workload: tokio::task::JoinHandle<T>,
        driver: tokio::task::JoinHandle<U>,
        cluster: PgCluster,
    ) {
        cancel.cancel();
        let _ = workload.await;
        self.stop().await;
        driver.abort();
        drop(cluster);
    }
}

/// Starts the daemon on target `db` with one check pack (`pack_file`, `pack_text`), sampling
/// and checking every second, `first_hour` of `hour` seconds, `first_day` twice that.
pub async fn start(
    cluster: &PgCluster,
    db: &str,
    pack_file: &str,
    pack_text: &str,
    hour: u64,
) -> BenchDaemon {
    let dir = std::env::temp_dir().join(format!("deploywatch-bench-{db}-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("checks")).expect("dir");
    std::fs::write(dir.join("checks").join(pack_file), pack_text).expect("pack");
    std::fs::write(dir.join("token"), TOKEN).expect("token");
    std::fs::write(
        dir.join("deploywatch.toml"),
        compressed_clock(db, cluster.port(), None, 1, hour),
    )
    .expect("config");
    let config = Config::load(&dir.join("deploywatch.toml")).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = deploywatch::daemon::start(config, listener).expect("daemon");
    let base = format!("http://{}", handle.local_addr);
    BenchDaemon { handle, base, dir }
}

/// Announces deployment `version` (with `note`) and expects it taken.
pub async fn announce(daemon: &BenchDaemon, version: &str, note: &str) {
    let announcement = deploywatch::commands::client::Announcement {
        version,
        note: Some(note),
        ..Default::default()
    };
    let (code, answer) =
        deploywatch::commands::client::announce(&daemon.base, TOKEN, &announcement)
            .await
            .expect("announce");
    assert_eq!(code.as_u16(), 201, "{answer}");
}

/// Statistics samples the daemon has stored of its one target since it started.
async fn samples_recorded(daemon: &BenchDaemon) -> Option<u64> {
    let url = format!("{}/status?format=json", daemon.base);
    let (code, body) = deploywatch::commands::client::get(&url, "application/json")
        .await
        .ok()?;
    if !code.is_success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["targets"][0]["samples_recorded"].as_u64()
}

/// Waits until the daemon has stored `more` samples after this call (polling `/status`);
/// panics after `deadline`.
pub async fn wait_for_samples(daemon: &BenchDaemon, more: u64, deadline: std::time::Duration) {
    let from = samples_recorded(daemon).await.unwrap_or(0);
    deploywatch_testkit::wait::wait_until(
        &format!("{more} more samples stored by the daemon"),
        deadline,
        || async {
            let now = samples_recorded(daemon).await.unwrap_or(0);
            (now >= from + more).then_some(())
        },
    )
    .await;
}

/// A benchmark setting from the environment, or its default.
pub fn setting<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A throwaway PostgreSQL with pg_stat_statements loaded and database `db` created.
pub fn cluster_with_statements(db: &str) -> PgCluster {
    cluster_with(ClusterOptions::default(), db)
}

/// [`cluster_with_statements`] with more `options`.
pub fn cluster_with(options: ClusterOptions, db: &str) -> PgCluster {
    let cluster = PgCluster::start(ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".into()],
        ..options
    })
    .expect("PostgreSQL");
    cluster
        .create_monitoring_role("deploywatch")
        .expect("monitoring role");
    cluster.create_database(db).expect("db");
    cluster
}

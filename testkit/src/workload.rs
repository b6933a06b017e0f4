//! A light application workload against the cognit fixture — participants registering,
//! consents, submissions, payments and the read paths the partial indexes serve — so that the
//! statistics deploywatch samples move. Used by `deploywatch demo` and by the tests; it is the
//! application, not the monitor, so it writes and does not go through the read-only runner.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The fixture files, compiled in so the demo runs from anywhere.
pub mod fixtures {
    pub const SCHEMA_3_6_0: &str = include_str!("../fixtures/cognit/schema_3.6.0.sql");
    pub const GENERATE: &str = include_str!("../fixtures/cognit/generate.sql");
    pub const MIGRATION_001: &str =
        include_str!("../fixtures/cognit/001_pragmatic_schema_fixes.sql");
    pub const ROLLBACK_TO_3_6_0: &str = include_str!("../fixtures/cognit/rollback_to_3.6.0.sql");
    pub const WORKLOAD: &str = include_str!("../fixtures/cognit/workload.sql");
    pub const CORRUPT_ORPHANED_PAYMENTS: &str =
        include_str!("../fixtures/cognit/corrupt/orphaned_payments.sql");
    pub const REPAIR_ORPHANED_PAYMENTS: &str =
        include_str!("../fixtures/cognit/repair/orphaned_payments.sql");
}

/// The hot read path a regression test or the demo can break by dropping
/// `idx_submissions_participant`.
pub const HOT_QUERY: &str = "SELECT count(*) FROM submissions WHERE participant_id = $1";

/// `(name, statement)` pairs of `workload.sql`: blocks of a `-- name: x` line and one statement.
pub fn statements(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("-- name:") {
            name = Some(rest.trim().to_string());
        } else if !line.is_empty() && !line.starts_with("--") {
            if let Some(n) = name.take() {
                out.push((n, line.to_string()));
            }
        }
    }
    out
}

#[derive(Debug, Default)]
pub struct WorkloadCounters {
    pub executed: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot connect the workload: {0}")]
    Connect(#[from] tokio_postgres::Error),
    #[error("the application's statement failed: {0}")]
    Statement(tokio_postgres::Error),
}

/// The application's own session, for what the application (or its operator) does to its
/// database: load the schema, migrate, corrupt and repair data, drop an index. Dropping it
/// closes the session.
pub struct Application {
    client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

impl Application {
    pub async fn connect(connection_string: &str) -> Result<Application, WorkloadError> {
        let (client, connection) =
            tokio_postgres::connect(connection_string, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Application { client, driver })
    }

    /// Runs one or more statements as a script.
    pub async fn run(&self, sql: &str) -> Result<(), WorkloadError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(WorkloadError::Statement)
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Waits for the next tick of `tick`: `true`, or `false` once `cancel` fires, so that
/// `while next_tick(&mut tick, &cancel).await { … }` does something periodically until then.
pub async fn next_tick(tick: &mut tokio::time::Interval, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tick.tick() => true,
    }
}

/// Runs the workload until `cancel` fires: the hot query `hot_per_second` times a second and
/// one statement of `workload.sql` every `mix_every`.
pub async fn spawn(
    connection_string: &str,
    hot_per_second: u32,
    mix_every: Duration,
    cancel: CancellationToken,
) -> Result<(JoinHandle<()>, Arc<WorkloadCounters>), WorkloadError> {
    let (client, connection) =
        tokio_postgres::connect(connection_string, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let counters = Arc::new(WorkloadCounters::default());
    let mix = statements(fixtures::WORKLOAD);
    let max_participant: i64 = client
        .query_one(
            "SELECT coalesce(max(participant_id), 1) FROM participants",
            &[],
        )
        .await
        .ok()
        .and_then(|row| row.try_get::<_, i64>(0).ok())
        .unwrap_or(100);
    let task_counters = counters.clone();
    let handle = tokio::spawn(async move {
        let hot_interval = Duration::from_secs_f64(1.0 / f64::from(hot_per_second.max(1)));
        let mut hot = tokio::time::interval(hot_interval);
        hot.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut other = tokio::time::interval(mix_every);
        other.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next = 0usize;
        loop {
            let result = tokio::select! {
                // Cancellation wins over a tick that is also ready: no new run after it.
                biased;
                _ = cancel.cancelled() => break,
                _ = hot.tick() => {
                    let id: i64 = rand::thread_rng().gen_range(1..=max_participant.max(1));
                    client.query(HOT_QUERY, &[&id]).await.map(|_| ())
                }
                _ = other.tick(), if !mix.is_empty() => {
                    let (_, sql) = &mix[next % mix.len()];
                    next += 1;
                    client.batch_execute(sql).await
                }
            };
            match result {
                Ok(()) => task_counters.executed.fetch_add(1, Ordering::Relaxed),
                Err(_) => task_counters.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        drop(client);
        driver.abort();
    });
    Ok((handle, counters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_file_parses_into_named_statements() {
        let all = statements(fixtures::WORKLOAD);
        assert!(all.len() >= 10, "{all:?}");
        assert!(all.iter().any(|(name, _)| name == "register_participant"));
        assert!(all.iter().all(|(_, sql)| !sql.starts_with("--")));
    }
}

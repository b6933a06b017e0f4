//! The embedded store (SQLite via rusqlite): samples, deployments, window verdicts and each
//! target's last known schema version. It is what lets a restarted daemon — even one killed
//! with `kill -9` — keep its baseline and resume open windows at the right time.
//!
//! SQLite runs in WAL mode, so `deploywatch report` can read while the daemon writes. Every
//! operation is a short statement on a local file; callers run them inline.

pub mod incremental;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use crate::analysis::deployment::{DeploymentKind, Detection, Finding};
pub use crate::analysis::deployment::{DeploymentRecord, VerdictRecord};
use crate::analysis::sample::Sample;
use crate::analysis::window::{Verdict, Window};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state store holds data it cannot read: {0}")]
    Corrupt(String),
}

#[derive(Clone)]
pub struct Store {
    connection: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS samples (
    target TEXT NOT NULL,
    at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_target_time ON samples (target, at);
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    from_version TEXT,
    to_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    detection TEXT NOT NULL,
    at REAL NOT NULL,
    finished_at REAL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS deployments_by_target_time ON deployments (target, at);
CREATE TABLE IF NOT EXISTS verdicts (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    window TEXT NOT NULL,
    verdict TEXT NOT NULL,
    samples INTEGER NOT NULL,
    regressions TEXT NOT NULL,
    improvements TEXT NOT NULL,
    closed_at REAL NOT NULL,
    PRIMARY KEY (deployment_id, window)
);
CREATE TABLE IF NOT EXISTS versions (
    target TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    seen_at REAL NOT NULL
);
";

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                let _ = std::fs::create_dir_all(parent);
            }
        }
        let connection = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(connection).map_err(|source| match source {
            StoreError::Sqlite(source) => StoreError::Open {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// A store that lives only as long as the process.
    pub fn in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(connection: Connection) -> Result<Store, StoreError> {
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        // journal_mode returns a row, so it is read rather than executed.
        let _mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        connection.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
        connection.execute_batch(SCHEMA)?;
        Ok(Store {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` on the connection, for the modules that keep tables of their own in this
    /// file (each creates its tables when missing).
    pub fn with_connection<R>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        Ok(work(&self.lock())?)
    }

    pub fn add_sample(&self, target: &str, sample: &Sample) -> Result<(), StoreError> {
        let data = serde_json::to_string(sample).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.lock().execute(
            "INSERT INTO samples (target, at, data) VALUES (?1, ?2, ?3)",
            params![target, sample.at, data],
        )?;
        Ok(())
    }

    /// Samples of `target` with `from <= at < to`, oldest first.
    pub fn samples(&self, target: &str, from: f64, to: f64) -> Result<Vec<Sample>, StoreError> {
        self.samples_spread(target, from, to, usize::MAX)
    }

    /// As [`Store::samples`], but at most `max` of them, spread evenly over the range and
    /// always including the latest: a week of minute samples becomes a baseline that still
    /// covers the whole week (daily and weekly cycles) at a bounded cost in memory.
    pub fn samples_spread(
        &self,
        target: &str,
        from: f64,
        to: f64,
        max: usize,
    ) -> Result<Vec<Sample>, StoreError> {
        let connection = self.lock();
        let count: i64 = connection
            .prepare_cached(
                "SELECT count(*) FROM samples WHERE target = ?1 AND at >= ?2 AND at < ?3",
            )?
            .query_row(params![target, from, to], |r| r.get(0))?;
        let stride = spread_stride(usize::try_from(count).unwrap_or(0), max);
        let mut statement = connection.prepare_cached(
            "SELECT data FROM ( \
                 SELECT data, at, row_number() OVER (ORDER BY at DESC) - 1 AS back \
                 FROM samples WHERE target = ?1 AND at >= ?2 AND at < ?3) \
             WHERE back % ?4 = 0 ORDER BY at",
        )?;
        let rows = statement.query_map(
            params![target, from, to, i64::try_from(stride).unwrap_or(i64::MAX)],
            |r| r.get::<_, String>(0),
        )?;
        let mut samples = Vec::new();
        for row in rows {
            let text = row?;
            match serde_json::from_str::<Sample>(&text) {
                Ok(sample) => samples.push(sample),
                Err(error) => {
                    tracing::warn!(db_target = %target, %error, "skipping an unreadable sample");
                }
            }
        }
        Ok(samples)
    }

    /// Deletes samples older than `before`. Deployments and verdicts are kept: they are small
    /// and they are the history `report` reads.
    pub fn prune(&self, before: f64) -> Result<usize, StoreError> {
        Ok(self
            .lock()
            .execute("DELETE FROM samples WHERE at < ?1", params![before])?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_deployment(
        &self,
        target: &str,
        from_version: Option<&str>,
        to_version: &str,
        kind: DeploymentKind,
        detection: Detection,
        at: f64,
        finished_at: Option<f64>,
        note: Option<&str>,
    ) -> Result<DeploymentRecord, StoreError> {
        let connection = self.lock();
        connection.execute(
            "INSERT INTO deployments (target, from_version, to_version, kind, detection, at, finished_at, note)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                target,
                from_version,
                to_version,
                kind.as_str(),
                detection.as_str(),
                at,
                finished_at,
                note
            ],
        )?;
        Ok(DeploymentRecord {
            id: connection.last_insert_rowid(),
            target: target.to_string(),
            from_version: from_version.map(str::to_string),
            to_version: to_version.to_string(),
            kind,
            detection,
            at,
            finished_at,
            note: note.map(str::to_string),
        })
    }

    /// Moves a deployment's start (an announcement for a version already detected), and
    /// records the announcement's end and note where given.
    pub fn update_deployment(
        &self,
        id: i64,
        at: f64,
        finished_at: Option<f64>,
        note: Option<&str>,
    ) -> Result<Option<DeploymentRecord>, StoreError> {
        self.lock().execute(
            "UPDATE deployments SET at = ?2, finished_at = coalesce(?3, finished_at),
                 note = coalesce(?4, note) WHERE id = ?1",
            params![id, at, finished_at, note],
        )?;
        self.deployment(id)
    }

    fn read_deployment(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeploymentRecord> {
        let kind: String = row.get(4)?;
        let detection: String = row.get(5)?;
        Ok(DeploymentRecord {
            id: row.get(0)?,
            target: row.get(1)?,
            from_version: row.get(2)?,
            to_version: row.get(3)?,
            kind: DeploymentKind::parse(&kind).unwrap_or(DeploymentKind::Deploy),
            detection: Detection::parse(&detection).unwrap_or(Detection::Announced),
            at: row.get(6)?,
            finished_at: row.get(7)?,
            note: row.get(8)?,
        })
    }

    const DEPLOYMENT_COLUMNS: &'static str =
        "id, target, from_version, to_version, kind, detection, at, finished_at, note";

    /// The deployments of a target (or all), newest first.
    pub fn deployments(&self, target: Option<&str>) -> Result<Vec<DeploymentRecord>, StoreError> {
        let connection = self.lock();
        let sql = format!(
            "SELECT {} FROM deployments WHERE (?1 IS NULL OR target = ?1) ORDER BY at DESC, id DESC",
            Self::DEPLOYMENT_COLUMNS
        );
        let mut statement = connection.prepare(&sql)?;
        let rows = statement.query_map(params![target], Self::read_deployment)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    pub fn latest_deployment(&self, target: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        Ok(self.deployments(Some(target))?.into_iter().next())
    }

    pub fn deployment(&self, id: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        let connection = self.lock();
        let sql = format!(
            "SELECT {} FROM deployments WHERE id = ?1",
            Self::DEPLOYMENT_COLUMNS
        );
        Ok(connection
            .query_row(&sql, params![id], Self::read_deployment)
            .optional()?)
    }

    /// Time of the deployment before `at` on `target`, which bounds the next one's baseline.
    pub fn previous_deployment_time(
        &self,
        target: &str,
        at: f64,
    ) -> Result<Option<f64>, StoreError> {
        Ok(self.lock().query_row(
            "SELECT max(at) FROM deployments WHERE target = ?1 AND at < ?2",
            params![target, at],
            |r| r.get::<_, Option<f64>>(0),
        )?)
    }

    pub fn rollback_count(&self, target: &str) -> Result<u64, StoreError> {
        let n: i64 = self.lock().query_row(
            "SELECT count(*) FROM deployments WHERE target = ?1 AND kind = 'rollback'",
            params![target],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub fn set_verdict(
        &self,
        deployment_id: i64,
        record: &VerdictRecord,
    ) -> Result<(), StoreError> {
        let encode = |f: &Vec<Finding>| {
            serde_json::to_string(f).map_err(|e| StoreError::Corrupt(e.to_string()))
        };
        self.lock().execute(
            "INSERT OR REPLACE INTO verdicts (deployment_id, window, verdict, samples, regressions, improvements, closed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                deployment_id,
                record.window.as_str(),
                record.verdict.as_str(),
                i64::try_from(record.samples).unwrap_or(i64::MAX),
                encode(&record.regressions)?,
                encode(&record.improvements)?,
                record.closed_at
            ],
        )?;
        Ok(())
    }

    pub fn verdicts(&self, deployment_id: i64) -> Result<Vec<VerdictRecord>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT window, verdict, samples, regressions, improvements, closed_at FROM verdicts WHERE deployment_id = ?1",
        )?;
        let rows = statement.query_map(params![deployment_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, f64>(5)?,
            ))
        })?;
        let mut records = Vec::new();
        for row in rows {
            let (window, verdict, samples, regressions, improvements, closed_at) = row?;
            let window = window
                .parse::<Window>()
                .map_err(|_| StoreError::Corrupt(format!("unknown window {window}")))?;
            let verdict = verdict
                .parse::<Verdict>()
                .map_err(|_| StoreError::Corrupt(format!("unknown verdict {verdict}")))?;
            let decode = |text: &str| -> Result<Vec<Finding>, StoreError> {
                serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
            };
            records.push(VerdictRecord {
                window,
                verdict,
                samples: usize::try_from(samples).unwrap_or(0),
                regressions: decode(&regressions)?,
                improvements: decode(&improvements)?,
                closed_at,
            });
        }
        records.sort_by_key(|r| Window::ALL.iter().position(|w| *w == r.window));
        Ok(records)
    }

    pub fn last_version(&self, target: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT version FROM versions WHERE target = ?1",
                params![target],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn set_last_version(&self, target: &str, version: &str, at: f64) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO versions (target, version, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (target) DO UPDATE SET version = excluded.version, seen_at = excluded.seen_at",
            params![target, version, at],
        )?;
        Ok(())
    }
}

/// Every how many samples one is kept so that at most `max` of `count` remain.
pub fn spread_stride(count: usize, max: usize) -> usize {
    if max == 0 || count <= max {
        1
    } else {
        count.div_ceil(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_keeps_at_most_max() {
        assert_eq!(spread_stride(10, 2000), 1);
        assert_eq!(spread_stride(2000, 2000), 1);
        assert_eq!(spread_stride(2001, 2000), 2);
        assert_eq!(spread_stride(10_080, 2000), 6);
        for count in [1usize, 5, 1999, 4001, 10_080, 20_160] {
            let kept = count.div_ceil(spread_stride(count, 2000));
            assert!(kept <= 2000, "{count} -> {kept}");
        }
    }

    #[test]
    fn spread_samples_cover_the_whole_range_and_keep_the_latest() {
        let store = Store::in_memory().expect("store");
        for i in 0..100 {
            store
                .add_sample(
                    "t",
                    &Sample {
                        at: f64::from(i),
                        ..Sample::default()
                    },
                )
                .expect("sample");
        }
        let all = store.samples("t", 0.0, 1000.0).expect("all");
        assert_eq!(all.len(), 100);
        let spread = store.samples_spread("t", 0.0, 1000.0, 10).expect("spread");
        let at: Vec<f64> = spread.iter().map(|s| s.at).collect();
        assert_eq!(at.len(), 10);
        assert_eq!(at.last(), Some(&99.0), "the latest sample is kept");
        assert!(at[0] < 10.0, "the oldest part is covered: {at:?}");
        assert!(at.windows(2).all(|w| w[1] - w[0] == 10.0), "{at:?}");
    }

    #[test]
    fn deployments_samples_and_verdicts_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.sqlite");
        let id = {
            let store = Store::open(&path).expect("open");
            store
                .add_sample(
                    "t",
                    &Sample {
                        at: 10.0,
                        ..Sample::default()
                    },
                )
                .expect("sample");
            store.set_last_version("t", "3.6.0", 5.0).expect("version");
            let record = store
                .add_deployment(
                    "t",
                    Some("3.6.0"),
                    "3.7.0",
                    DeploymentKind::Deploy,
                    Detection::VersionChange,
                    20.0,
                    None,
                    None,
                )
                .expect("deployment");
            store
                .set_verdict(
                    record.id,
                    &VerdictRecord {
                        window: Window::FirstHour,
                        verdict: Verdict::Pass,
                        samples: 3,
                        regressions: vec![],
                        improvements: vec![],
                        closed_at: 30.0,
                    },
                )
                .expect("verdict");
            record.id
        };
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.samples("t", 0.0, 100.0).expect("samples").len(), 1);
        assert_eq!(
            store.last_version("t").expect("version").as_deref(),
            Some("3.6.0")
        );
        let latest = store.latest_deployment("t").expect("query").expect("one");
        assert_eq!(latest.id, id);
        assert_eq!(latest.to_version, "3.7.0");
        assert_eq!(
            store.verdicts(id).expect("verdicts")[0].verdict,
            Verdict::Pass
        );
        assert_eq!(
            store.previous_deployment_time("t", 25.0).expect("prev"),
            Some(20.0)
        );
        assert_eq!(store.prune(100.0).expect("prune"), 1);
    }
}

//! The embedded store (SQLite via rusqlite): samples, deployments, window verdicts and each
//! target's last known schema version. It is what lets a restarted daemon — even one killed
//! with `kill -9` — keep its baseline and resume open windows at the right time.
//!
//! Layout (schema version 2, `PRAGMA user_version`):
//! - `series`: one row per target and named series — a statement (`kind` 0: its query id and
//!   its text, stored once), an index (1: with its table), a table (2) or a check (3: with its
//!   category). Samples refer to series by this row's id.
//! - `samples`: one row per target and sampling interval, its body a compact binary record
//!   (postcard: variable-length integers) of numbers: the database counters, and only the
//!   statements whose counters moved in the interval as `(series id step, calls, total
//!   microseconds, rows)`; indexes, tables and check states as `(series, numbers…)`. No text
//!   is repeated per sample.
//! - `deployments`, `verdicts`, `versions`: as before.
//!
//! A store written by the previous layout (one JSON document per sample) is migrated when it
//! is opened, in one transaction: every readable sample is re-encoded, deployments and
//! verdicts are kept as they are. If the migration fails the file is left as it was and the
//! open fails; it is never emptied.
//!
//! SQLite runs in WAL mode, so `deploywatch report` can read while the daemon writes. Each
//! write is one transaction, so `kill -9` leaves either the whole sample or none of it. The
//! daemon reaches the store only through [`actor::StoreActor`], a thread of its own, so no
//! tokio worker waits on the disk.
//!
//! A file that exists but is not a valid store (truncated to 0 bytes, not SQLite, SQLite
//! holding other tables and none of deploywatch's) is refused: starting over silently would throw away the
//! baseline and the deployment history. [`Store::open_or_reset`] moves such a file aside
//! instead, on explicit request. Failed writes (a full disk) are logged once when writes
//! start failing and once when they work again; the callers count them.

pub mod actor;
pub mod incremental;
pub(crate) mod sql;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::analysis::deployment::{DeploymentKind, Detection, Finding};
pub use crate::analysis::deployment::{DeploymentRecord, VerdictRecord};
use crate::analysis::sample::{
    CheckPoint, DbCounters, IndexDelta, Sample, StatementDelta, TableCounters,
};
use crate::analysis::window::{Verdict, Window};
use sql::{Db, PgSession, Value};
pub use sql::{PasswordReader, PgSettings, TlsMaker};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state store (PostgreSQL): {0}")]
    Postgres(String),
    #[error("the state store cannot be reached: {0}")]
    Unreachable(String),
    #[error("state store holds data it cannot read: {0}")]
    Corrupt(String),
    #[error(
        "cannot migrate the state store {path} from the previous layout (the file is unchanged): {reason}"
    )]
    Migration { path: String, reason: String },
    #[error("the state store is closed")]
    Closed,
    #[error(
        "{path} is not a valid deploywatch state store: {reason}. Nothing was started. Restore \
         it from a backup, or run `deploywatch run --reset-store` to move it aside and start \
         with an empty store (the baseline and deployment history start over)"
    )]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot move the invalid state store {path} aside: {source}")]
    Reset {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this replica does not lead {0} (another replica does, or the store was lost)")]
    NotLeader(String),
}

impl StoreError {
    /// Whether the store could not be reached (as opposed to refusing or failing a statement).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::Unreachable(_) | StoreError::Closed)
    }
}

/// Whether writes are failing now.
#[derive(Default)]
struct WriteHealth {
    failing: bool,
}

/// The layout this code writes.
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// How many rows one pruning step deletes: small enough that a step never holds the write
/// lock for long, so sampling and `report` are never kept waiting.
pub const PRUNE_BATCH: usize = 2000;

/// Free pages returned to the file system after each pruning step.
const VACUUM_PAGES: i64 = 500;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    kind INTEGER NOT NULL,
    name TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    first_seen REAL NOT NULL,
    UNIQUE (target, kind, name)
);
CREATE TABLE IF NOT EXISTS samples (
    target TEXT NOT NULL,
    at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_target_time ON samples (target, at);
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (at);
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

/// What a `series` row names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Statement = 0,
    Index = 1,
    Table = 2,
    Check = 3,
}

const STATUSES: [&str; 4] = ["pass", "fail", "error", "pending"];

/// A sample as stored: numbers only, names replaced by `series` ids.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Packed {
    seconds: f32,
    database: Option<[u64; 8]>,
    /// `(series id minus the previous one, calls, total microseconds, rows)`, by series id.
    statements: Option<Vec<(u64, u64, u64, u64)>>,
    indexes: Vec<(u64, u64)>,
    tables: Vec<(u64, u64, u64, u64)>,
    size_bytes: u64,
    connections: u32,
    max_connections: u32,
    checks: Vec<(u64, u8, Option<f64>)>,
    resets: Vec<String>,
    statements_available: bool,
    vanished: Vec<String>,
}

/// A count kept as a float in memory, as an integer on disk.
fn whole(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

#[derive(Debug, Clone)]
struct Named {
    name: String,
    detail: String,
}

/// The database and the `series` rows, cached both ways (bounded by what the targets hold:
/// pg_stat_statements.max statements, their indexes, tables and checks).
struct Inner {
    db: Db,
    ids: Ids,
    names: HashMap<i64, Named>,
    /// The targets whose lock this replica holds in a shared store, with the generation of
    /// the session that took it: a lock does not outlive its session.
    leading: HashMap<String, u64>,
    /// The targets this replica tracks since the last reload (`None`: every target): the
    /// lock of any other target is neither taken nor kept.
    tracked: Option<HashSet<String>>,
}

/// Whether this replica may sample and judge a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// It does; `took_over` the first time after another replica did (or none did).
    Leading { took_over: bool },
    /// Another replica does (`leader`: its name, when the store knows it).
    Following { leader: Option<String> },
}

/// The advisory lock key of a target's leadership, and of the transaction lock that
/// serialises the recording of its deployments (both from the target's name).
const LEADER_KEY: &str = "hashtextextended('deploywatch leader ' || $1, 0)";
const DEPLOYMENTS_KEY: &str = "hashtextextended('deploywatch deployments ' || $1, 0)";

/// `series` ids by target, kind and name.
type Ids = HashMap<String, [HashMap<String, i64>; 4]>;

/// The store: an SQLite file (or memory), or a schema in a PostgreSQL database shared by
/// replicas. Every operation is the same on both.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    path: Option<PathBuf>,
    health: Arc<Mutex<WriteHealth>>,
}

const DEPLOYMENT_COLUMNS: &str =
    "id, target, from_version, to_version, kind, detection, at, finished_at, note";

impl Store {
    /// Opens the store at `path`, creating it when there is no file; refuses a file that is
    /// not a valid store.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_or_reset(path, false)
    }

    /// As [`Store::open`]; with `reset`, a file that is not a valid store is renamed to
    /// `<path>.invalid-<unix time>` and an empty store is started in its place.
    pub(crate) fn open_or_reset(path: &Path, reset: bool) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                let _ = std::fs::create_dir_all(parent);
            }
        }
        if path.exists() {
            if let Err(reason) = Self::validate(path) {
                if !reset {
                    return Err(StoreError::Invalid {
                        path: path.to_path_buf(),
                        reason,
                    });
                }
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".invalid-{stamp}"));
                let aside = PathBuf::from(aside);
                std::fs::rename(path, &aside).map_err(|source| StoreError::Reset {
                    path: path.to_path_buf(),
                    source,
                })?;
                for suffix in ["-wal", "-shm"] {
                    let mut side = path.as_os_str().to_owned();
                    side.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(side));
                }
                tracing::warn!(
                    path = %path.display(), moved_to = %aside.display(), %reason,
                    "the state store was not valid; it was moved aside and an empty store started (--reset-store)"
                );
            }
        }
        let open_error = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let connection = Connection::open(path).map_err(open_error)?;
        Self::init(connection, Some(path.to_path_buf())).map_err(|error| match error {
            StoreError::Sqlite(source) => open_error(source),
            other => other,
        })
    }

    /// A store in a PostgreSQL database (`store.url`). Nothing is opened yet: the session is
    /// opened — and the schema created or migrated — by the first operation, and opened again
    /// by the first operation after it was lost, so a store that cannot be reached makes
    /// operations fail rather than the daemon stop. Its calls block: make them on the store's
    /// thread ([`actor::StoreActor`]), never on the async runtime.
    pub fn postgres(settings: PgSettings) -> Store {
        Store {
            inner: Arc::new(Mutex::new(Inner {
                db: Db::Postgres(Box::new(PgSession::new(settings))),
                ids: HashMap::new(),
                names: HashMap::new(),
                leading: HashMap::new(),
                tracked: None,
            })),
            path: None,
            health: Arc::default(),
        }
    }

    /// Opens the session now if there is none (a PostgreSQL store), creating or migrating
    /// the schema: `Ok` when the store can be used.
    pub fn connect(&self) -> Result<(), StoreError> {
        self.lock().db.value("SELECT 1", &[]).map(|_| ())
    }

    /// Whether this replica leads `target`: always with a store of its own; with a shared
    /// store, while it holds the target's advisory lock on its session there. A lock held
    /// before is checked to be still held by a live session (the one this store writes on);
    /// one not held is tried (`pg_try_advisory_lock`, never waited for).
    pub fn lead(&self, target: &str) -> Result<Lead, StoreError> {
        let mut inner = self.lock();
        let Inner {
            db,
            leading,
            tracked,
            ..
        } = &mut *inner;
        if !db.is_postgres() {
            return Ok(Lead::Leading { took_over: false });
        }
        if tracked.as_ref().is_some_and(|t| !t.contains(target)) {
            // A tracker of a generation a reload replaced, still finishing its pass.
            return Ok(Lead::Following { leader: None });
        }
        if let Some(held) = leading.get(target).copied() {
            let alive = db.value("SELECT 1", &[]);
            let generation = db.postgres().map(|s| s.generation());
            match alive {
                Ok(_) if generation == Some(held) => return Ok(Lead::Leading { took_over: false }),
                Ok(_) => {
                    leading.remove(target);
                }
                Err(error) => {
                    leading.remove(target);
                    return Err(error);
                }
            }
        }
        let got = db.value(
            &format!("SELECT pg_try_advisory_lock({LEADER_KEY})"),
            &[target.into()],
        )?;
        if got == Value::Int(1) {
            if let Some(generation) = db.postgres().map(|s| s.generation()) {
                leading.insert(target.to_string(), generation);
            }
            return Ok(Lead::Leading { took_over: true });
        }
        let key = db
            .value(&format!("SELECT {LEADER_KEY}"), &[target.into()])?
            .int()?;
        let leader = db
            .value(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid                  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())                  AND l.classid::text::bigint = ($1::bigint >> 32) & 4294967295                  AND l.objid::text::bigint = $1::bigint & 4294967295 LIMIT 1",
                &[key.into()],
            )?
            .opt_text()?;
        Ok(Lead::Following { leader })
    }

    /// Keeps the lead of the targets in `tracked` only (after a reload, the targets whose
    /// deployments this replica now tracks): the lock of every other target it held is
    /// released at once, so another replica takes the target over at its next pass instead
    /// of when this one stops, and is not taken again until a reload tracks the target again.
    pub(crate) fn keep_leads(&self, tracked: HashSet<String>) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Inner {
            db,
            leading,
            tracked: kept,
            ..
        } = &mut *inner;
        let released: Vec<(String, u64)> = leading
            .iter()
            .filter(|(target, _)| !tracked.contains(*target))
            .map(|(target, generation)| (target.clone(), *generation))
            .collect();
        *kept = Some(tracked);
        let mut result = Ok(());
        for (target, held) in released {
            leading.remove(&target);
            // A lock taken on an earlier session went with it.
            if db.postgres().map(|s| s.generation()) == Some(held) {
                if let Err(error) = db.value(
                    &format!("SELECT pg_advisory_unlock({LEADER_KEY})::int"),
                    &[target.as_str().into()],
                ) {
                    result = Err(error);
                }
            }
        }
        result
    }

    /// Runs the writes of a leader for `target` as one batch: with a shared store, only
    /// while this replica holds the target's lock, on the session that holds it, in one
    /// transaction (a session that was lost, even one replaced since, makes it fail with
    /// [`StoreError::NotLeader`] and write nothing), serialised with the target's
    /// announcements on every replica. With a store of its own, `work` simply runs.
    pub fn fenced<R>(
        &self,
        target: &str,
        work: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.batch(target, true, work)
    }

    /// Runs `work` (an announcement's or a declared deployment's recording) as one batch,
    /// serialised with the other replicas' recordings and their leaders' detection of
    /// deployments of `target` (a transaction lock in a shared store), so a deployment is
    /// recorded once whichever replica hears of it.
    pub fn serialized<R>(
        &self,
        target: &str,
        work: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.batch(target, false, work)
    }

    fn batch<R>(
        &self,
        target: &str,
        fenced: bool,
        work: impl FnOnce(&Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        {
            let mut inner = self.lock();
            let Inner { db, leading, .. } = &mut *inner;
            if !db.is_postgres() || db.in_transaction() {
                drop(inner);
                return work(self);
            }
            let held = leading.get(target).copied();
            if fenced && held.is_none() {
                return Err(StoreError::NotLeader(target.to_string()));
            }
            db.begin()?;
            let generation = db.postgres().map(|s| s.generation());
            if fenced && generation != held {
                leading.remove(target);
                return db.end(Err(StoreError::NotLeader(target.to_string())));
            }
            let locked = db.execute(
                &format!("SELECT pg_advisory_xact_lock({DEPLOYMENTS_KEY})"),
                &[target.into()],
            );
            if let Err(error) = locked {
                return db.end(Err(error));
            }
        }
        let result = work(self);
        self.lock().db.end(result)
    }

    /// Why an existing file is not a store deploywatch wrote, if it is not. Reads only.
    fn validate(path: &Path) -> Result<(), String> {
        let length = std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| e.to_string())?;
        if length == 0 {
            return Err("the file is empty (0 bytes): it was truncated or never written".into());
        }
        let connection =
            Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(|e| format!("not an SQLite database ({e})"))?;
        let (tables, ours): (i64, i64) = connection
            .query_row(
                "SELECT count(*), count(*) FILTER (WHERE name IN \
                     ('samples', 'deployments', 'verdicts', 'versions')) \
                 FROM sqlite_master WHERE type = 'table'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| format!("not an SQLite database ({e})"))?;
        // No table at all: a store whose first start stopped before its tables were written,
        // or one another process is creating this instant. Nothing in it can be lost.
        if tables > 0 && ours == 0 {
            return Err("an SQLite database without deploywatch's tables".into());
        }
        Ok(())
    }

    /// Logs the outcome of a write when it changes: one warning when writes start failing,
    /// one line when they work again. (Callers count each failure.)
    fn wrote<T>(
        &self,
        operation: &'static str,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) if health.failing => {
                health.failing = false;
                tracing::info!(operation, "state store writes work again");
            }
            Err(StoreError::NotLeader(_)) => {}
            Err(error) if !health.failing => {
                health.failing = true;
                tracing::warn!(
                    operation, %error,
                    "state store writes are failing (disk full, unwritable or unreachable?): samples, deployments and verdicts are not kept until they work again"
                );
            }
            _ => {}
        }
        result
    }

    /// A store that lives only as long as the process.
    pub(crate) fn in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?, None)
    }

    fn init(connection: Connection, path: Option<PathBuf>) -> Result<Store, StoreError> {
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        let fresh: i64 = connection.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )?;
        if fresh == 0 {
            // Only takes effect before the first table exists: freed pages can then be handed
            // back to the file system a few at a time (see `prune`).
            connection.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")?;
        }
        // journal_mode returns a row, so it is read rather than executed.
        let _mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        connection.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
        let version: i64 = connection.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let previous_layout: i64 = connection.query_row(
            "SELECT count(*) FROM pragma_table_info('samples') WHERE name = 'data'",
            [],
            |r| r.get(0),
        )?;
        let shown = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ":memory:".to_string());
        if version > SCHEMA_VERSION {
            return Err(StoreError::Migration {
                path: shown,
                reason: format!(
                    "it was written by a newer deploywatch (layout {version}, this one knows {SCHEMA_VERSION})"
                ),
            });
        }
        let mut db = Db::Sqlite(connection);
        let mut migrated = None;
        if previous_layout > 0 {
            migrated = Some(
                migrate_from_json(&mut db).map_err(|e| StoreError::Migration {
                    path: shown.clone(),
                    reason: e.to_string(),
                })?,
            );
        } else {
            db.batch(SCHEMA)?;
            db.batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))?;
        }
        db.batch(incremental::SQLITE_SCHEMA)?;
        if let Some((kept, skipped)) = migrated {
            tracing::warn!(
                store = %shown, samples = kept, unreadable = skipped,
                "state store migrated to the compact layout; deployments and verdicts kept"
            );
            // Hands the space of the old documents back and turns on incremental vacuum.
            db.batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")?;
        }
        let mut inner = Inner {
            db,
            ids: HashMap::new(),
            names: HashMap::new(),
            leading: HashMap::new(),
            tracked: None,
        };
        inner.load_series()?;
        Ok(Store {
            inner: Arc::new(Mutex::new(inner)),
            path,
            health: Arc::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` on the database, for the modules that keep tables of their own in the
    /// store (created with the store's schema).
    pub(crate) fn with_db<R>(
        &self,
        work: impl FnOnce(&mut Db) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        work(&mut self.lock().db)
    }

    pub fn add_sample(&self, target: &str, sample: &Sample) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Inner { db, ids, names, .. } = inner;
        let result = db.transaction(|db| {
            let body = encode(sample, &mut |kind, name, detail| {
                intern(db, ids, names, target, kind, name, detail, sample.at)
            })?;
            db.execute(
                "INSERT INTO samples (target, at, body) VALUES ($1, $2, $3)",
                &[target.into(), sample.at.into(), body.into()],
            )?;
            Ok(())
        });
        if result.is_err() {
            // Names interned by the rolled-back transaction do not exist: start over from
            // what the store holds.
            inner.ids.clear();
            inner.names.clear();
            let _ = inner.load_series();
        }
        self.wrote("add_sample", result)
    }

    /// Samples of `target` with `from <= at < to`, oldest first.
    pub fn samples(&self, target: &str, from: f64, to: f64) -> Result<Vec<Sample>, StoreError> {
        let mut samples = Vec::new();
        self.each_sample(target, from, to, |s| samples.push(s))?;
        Ok(samples)
    }

    /// Calls `each` with every sample of `target` with `from <= at < to`, oldest first, one at
    /// a time: a week of samples is summarised without ever being in memory at once.
    pub fn each_sample(
        &self,
        target: &str,
        from: f64,
        to: f64,
        mut each: impl FnMut(Sample),
    ) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if inner.db.is_postgres() {
            // Another replica may have named series since they were cached.
            inner.load_series()?;
        }
        let Inner { db, names, .. } = inner;
        let mut count = 0;
        db.each(
            "SELECT at, body FROM samples WHERE target = $1 AND at >= $2 AND at < $3 ORDER BY at",
            &[target.into(), from.into(), to.into()],
            |row| {
                match decode(names, row[0].real()?, row[1].blob()?) {
                    Ok(sample) => {
                        count += 1;
                        each(sample)
                    }
                    Err(error) => {
                        tracing::warn!(db_target = %target, %error, "skipping an unreadable sample");
                    }
                }
                Ok(())
            },
        )?;
        Ok(count)
    }

    /// The latest sample of `target` before `before`.
    pub fn last_sample_before(
        &self,
        target: &str,
        before: f64,
    ) -> Result<Option<Sample>, StoreError> {
        let mut inner = self.lock();
        if inner.db.is_postgres() {
            inner.load_series()?;
        }
        let row = inner.db.row(
            "SELECT at, body FROM samples WHERE target = $1 AND at < $2 ORDER BY at DESC LIMIT 1",
            &[target.into(), before.into()],
        )?;
        row.map(|row| decode(&inner.names, row[0].real()?, row[1].blob()?))
            .transpose()
    }

    /// How many samples of `target` lie in `from <= at < to`.
    pub fn sample_count(&self, target: &str, from: f64, to: f64) -> Result<usize, StoreError> {
        let n = self
            .lock()
            .db
            .value(
                "SELECT count(*) FROM samples WHERE target = $1 AND at >= $2 AND at < $3",
                &[target.into(), from.into(), to.into()],
            )?
            .int()?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The query texts known for `target`, by query id.
    pub fn query_texts(&self, target: &str) -> HashMap<String, String> {
        let mut inner = self.lock();
        if inner.db.is_postgres() {
            // Another replica may have stored texts since they were cached.
            let _ = inner.load_series();
        }
        let Some(by_kind) = inner.ids.get(target) else {
            return HashMap::new();
        };
        by_kind[Kind::Statement as usize]
            .iter()
            .filter_map(|(query_id, id)| {
                inner
                    .names
                    .get(id)
                    .map(|n| (query_id.clone(), n.detail.clone()))
            })
            .collect()
    }

    /// Records the text of statements seen for the first time (or whose text was missing).
    pub fn add_query_texts(
        &self,
        target: &str,
        texts: &[(String, String)],
        at: f64,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let Inner { db, ids, names, .. } = &mut *inner;
        let result = db.transaction(|db| {
            for (query_id, text) in texts {
                let id = intern(db, ids, names, target, Kind::Statement, query_id, text, at)?;
                let known = names.get(&id).is_some_and(|n| n.detail == *text);
                if !known && !text.is_empty() {
                    db.execute(
                        "UPDATE series SET detail = $2 WHERE id = $1",
                        &[id.into(), text.as_str().into()],
                    )?;
                    if let Some(named) = names.get_mut(&id) {
                        named.detail = text.clone();
                    }
                }
            }
            Ok(())
        });
        drop(inner);
        self.wrote("add_query_texts", result)
    }

    /// Deletes at most [`PRUNE_BATCH`] samples older than `before` and hands up to a few
    /// hundred free pages back to the file system (SQLite; PostgreSQL's autovacuum does that
    /// there). Returns how many samples went; the caller calls again on its next pass while
    /// that is a full batch. Deployments and verdicts are kept: they are small and they are
    /// the history `report` reads.
    pub fn prune(&self, before: f64) -> Result<usize, StoreError> {
        let result = (|| -> Result<usize, StoreError> {
            let mut inner = self.lock();
            let db = &mut inner.db;
            let batch = Value::Int(i64::try_from(PRUNE_BATCH).unwrap_or(i64::MAX));
            let deleted = if db.is_postgres() {
                db.execute(
                    "DELETE FROM samples WHERE id IN (SELECT id FROM samples WHERE at < $1 LIMIT $2)",
                    &[before.into(), batch],
                )?
            } else {
                db.execute(
                    "DELETE FROM samples WHERE rowid IN (SELECT rowid FROM samples WHERE at < $1 LIMIT $2)",
                    &[before.into(), batch],
                )?
            };
            if deleted > 0 && !db.is_postgres() {
                db.each(
                    &format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"),
                    &[],
                    |_| Ok(()),
                )?;
            }
            Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
        })();
        self.wrote("prune", result)
    }

    /// Bytes the store takes: the database file and its write-ahead log (SQLite), or the
    /// tables and indexes of its schema (PostgreSQL).
    pub fn size_bytes(&self) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let db = &mut inner.db;
        if db.is_postgres() {
            let bytes = db
                .value(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relkind = 'r'",
                    &[sql::PG_SCHEMA.into()],
                )?
                .int()?;
            return Ok(u64::try_from(bytes).unwrap_or(0));
        }
        let pages = db.value("PRAGMA page_count", &[])?.int()?;
        let page_size = db.value("PRAGMA page_size", &[])?.int()?;
        let wal = self
            .path
            .as_ref()
            .and_then(|p| {
                let mut name = p.as_os_str().to_owned();
                name.push("-wal");
                std::fs::metadata(PathBuf::from(name)).ok()
            })
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(u64::try_from(pages.saturating_mul(page_size)).unwrap_or(0) + wal)
    }

    /// `PRAGMA integrity_check`: `Ok(())` when SQLite finds the file sound. (A PostgreSQL
    /// store is the server's to keep sound.)
    pub fn check_integrity(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.db.is_postgres() {
            return Ok(());
        }
        let result = inner.db.value("PRAGMA integrity_check", &[])?.text()?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(result))
        }
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
        let result = (|| -> Result<DeploymentRecord, StoreError> {
            let id = self
                .lock()
                .db
                .value(
                    "INSERT INTO deployments (target, from_version, to_version, kind, detection, at, finished_at, note)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                    &[
                        target.into(),
                        from_version.into(),
                        to_version.into(),
                        kind.as_str().into(),
                        detection.as_str().into(),
                        at.into(),
                        finished_at.into(),
                        note.into(),
                    ],
                )?
                .int()?;
            Ok(DeploymentRecord {
                id,
                target: target.to_string(),
                from_version: from_version.map(str::to_string),
                to_version: to_version.to_string(),
                kind,
                detection,
                at,
                finished_at,
                note: note.map(str::to_string),
            })
        })();
        self.wrote("add_deployment", result)
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
        let result = (|| -> Result<Option<DeploymentRecord>, StoreError> {
            self.lock().db.execute(
                "UPDATE deployments SET at = $2, finished_at = coalesce($3, finished_at),
                     note = coalesce($4, note) WHERE id = $1",
                &[id.into(), at.into(), finished_at.into(), note.into()],
            )?;
            self.deployment(id)
        })();
        self.wrote("update_deployment", result)
    }

    fn read_deployment(row: &[Value]) -> Result<DeploymentRecord, StoreError> {
        let kind = row[4].text()?;
        let detection = row[5].text()?;
        Ok(DeploymentRecord {
            id: row[0].int()?,
            target: row[1].text()?,
            from_version: row[2].opt_text()?,
            to_version: row[3].text()?,
            kind: DeploymentKind::parse(&kind).unwrap_or(DeploymentKind::Deploy),
            detection: Detection::parse(&detection).unwrap_or(Detection::Announced),
            at: row[6].real()?,
            finished_at: row[7].opt_real()?,
            note: row[8].opt_text()?,
        })
    }

    fn read_deployments(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        self.lock()
            .db
            .rows(sql, params)?
            .iter()
            .map(|row| Self::read_deployment(row))
            .collect()
    }

    /// The deployments of a target (or all), newest first.
    pub fn deployments(&self, target: Option<&str>) -> Result<Vec<DeploymentRecord>, StoreError> {
        match target {
            Some(target) => self.read_deployments(
                &format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE target = $1 ORDER BY at DESC, id DESC"
                ),
                &[target.into()],
            ),
            None => self.read_deployments(
                &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments ORDER BY at DESC, id DESC"),
                &[],
            ),
        }
    }

    pub fn latest_deployment(&self, target: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        Ok(self.deployments(Some(target))?.into_iter().next())
    }

    pub(crate) fn deployment(&self, id: i64) -> Result<Option<DeploymentRecord>, StoreError> {
        Ok(self
            .read_deployments(
                &format!("SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = $1"),
                &[id.into()],
            )?
            .into_iter()
            .next())
    }

    /// Time of the deployment before `at` on `target`, which bounds the next one's baseline.
    pub fn previous_deployment_time(
        &self,
        target: &str,
        at: f64,
    ) -> Result<Option<f64>, StoreError> {
        self.lock()
            .db
            .value(
                "SELECT max(at) FROM deployments WHERE target = $1 AND at < $2",
                &[target.into(), at.into()],
            )?
            .opt_real()
    }

    pub fn rollback_count(&self, target: &str) -> Result<u64, StoreError> {
        let n = self
            .lock()
            .db
            .value(
                "SELECT count(*) FROM deployments WHERE target = $1 AND kind = 'rollback'",
                &[target.into()],
            )?
            .int()?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub fn set_verdict(
        &self,
        deployment_id: i64,
        record: &VerdictRecord,
    ) -> Result<(), StoreError> {
        let result = (|| -> Result<(), StoreError> {
            let encode = |f: &Vec<Finding>| {
                serde_json::to_string(f).map_err(|e| StoreError::Corrupt(e.to_string()))
            };
            self.lock().db.execute(
                "INSERT INTO verdicts (deployment_id, \"window\", verdict, samples, regressions, improvements, closed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (deployment_id, \"window\") DO UPDATE SET verdict = excluded.verdict,
                     samples = excluded.samples, regressions = excluded.regressions,
                     improvements = excluded.improvements, closed_at = excluded.closed_at",
                &[
                    deployment_id.into(),
                    record.window.as_str().into(),
                    record.verdict.as_str().into(),
                    i64::try_from(record.samples).unwrap_or(i64::MAX).into(),
                    encode(&record.regressions)?.into(),
                    encode(&record.improvements)?.into(),
                    record.closed_at.into(),
                ],
            )?;
            Ok(())
        })();
        self.wrote("set_verdict", result)
    }

    pub fn verdicts(&self, deployment_id: i64) -> Result<Vec<VerdictRecord>, StoreError> {
        let rows = self.lock().db.rows(
            "SELECT \"window\", verdict, samples, regressions, improvements, closed_at FROM verdicts WHERE deployment_id = $1",
            &[deployment_id.into()],
        )?;
        let mut records = Vec::new();
        for row in rows {
            let window = row[0].text()?;
            let verdict = row[1].text()?;
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
                samples: usize::try_from(row[2].int()?).unwrap_or(0),
                regressions: decode(&row[3].text()?)?,
                improvements: decode(&row[4].text()?)?,
                closed_at: row[5].real()?,
            });
        }
        records.sort_by_key(|r| Window::ALL.iter().position(|w| *w == r.window));
        Ok(records)
    }

    pub fn last_version(&self, target: &str) -> Result<Option<String>, StoreError> {
        self.lock()
            .db
            .value(
                "SELECT version FROM versions WHERE target = $1",
                &[target.into()],
            )?
            .opt_text()
    }

    pub fn set_last_version(&self, target: &str, version: &str, at: f64) -> Result<(), StoreError> {
        let result = (|| -> Result<(), StoreError> {
            self.lock().db.execute(
                "INSERT INTO versions (target, version, seen_at) VALUES ($1, $2, $3)
                 ON CONFLICT (target) DO UPDATE SET version = excluded.version, seen_at = excluded.seen_at",
                &[target.into(), version.into(), at.into()],
            )?;
            Ok(())
        })();
        self.wrote("set_last_version", result)
    }

    /// The first deployment of `target` after the one at `at` (id `id`): the one that
    /// superseded it, if any.
    pub fn next_deployment(
        &self,
        target: &str,
        at: f64,
        id: i64,
    ) -> Result<Option<DeploymentRecord>, StoreError> {
        Ok(self
            .read_deployments(
                &format!(
                    "SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE target = $1 \
                     AND (at > $2 OR (at = $2 AND id > $3)) ORDER BY at, id LIMIT 1"
                ),
                &[target.into(), at.into(), id.into()],
            )?
            .into_iter()
            .next())
    }
}

impl Inner {
    fn load_series(&mut self) -> Result<(), StoreError> {
        let Inner { db, ids, names, .. } = self;
        db.each(
            "SELECT id, target, kind, name, detail FROM series",
            &[],
            |row| {
                let id = row[0].int()?;
                let kind = match row[2].int()? {
                    0 => Kind::Statement,
                    1 => Kind::Index,
                    2 => Kind::Table,
                    _ => Kind::Check,
                };
                let name = row[3].text()?;
                ids.entry(row[1].text()?).or_default()[kind as usize].insert(name.clone(), id);
                names.insert(
                    id,
                    Named {
                        name,
                        detail: row[4].text()?,
                    },
                );
                Ok(())
            },
        )
    }
}

/// A sample from its stored record, the series' names from `names`.
fn decode(names: &HashMap<i64, Named>, at: f64, body: &[u8]) -> Result<Sample, StoreError> {
    let packed: Packed =
        postcard::from_bytes(body).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let name = |id: u64| {
        i64::try_from(id)
            .ok()
            .and_then(|id| names.get(&id))
            .ok_or_else(|| StoreError::Corrupt(format!("a sample names unknown series {id}")))
    };
    let statements = match packed.statements {
        Some(list) => {
            let mut map = std::collections::BTreeMap::new();
            let mut id = 0u64;
            for (step, calls, total_us, rows) in list {
                id += step;
                let total_ms = total_us as f64 / 1000.0;
                let named = name(id)?;
                map.insert(
                    named.name.clone(),
                    StatementDelta {
                        calls: calls as f64,
                        total_ms,
                        rows: rows as f64,
                        query: named.detail.clone(),
                    },
                );
            }
            Some(map)
        }
        None => None,
    };
    let mut sample = Sample {
        at,
        seconds: f64::from(packed.seconds),
        database: packed.database.map(|d| DbCounters {
            xact_commit: d[0] as f64,
            xact_rollback: d[1] as f64,
            deadlocks: d[2] as f64,
            conflicts: d[3] as f64,
            temp_files: d[4] as f64,
            temp_bytes: d[5] as f64,
            blks_read: d[6] as f64,
            blks_hit: d[7] as f64,
        }),
        statements,
        size_bytes: packed.size_bytes as f64,
        connections: f64::from(packed.connections),
        max_connections: f64::from(packed.max_connections),
        resets: packed.resets,
        statements_available: packed.statements_available,
        vanished: packed.vanished,
        ..Sample::default()
    };
    for (id, scans) in packed.indexes {
        let named = name(id)?;
        sample.indexes.insert(
            named.name.clone(),
            IndexDelta {
                table: named.detail.clone(),
                scans: scans as f64,
            },
        );
    }
    for (id, seq_scan, seq_tup_read, idx_scan) in packed.tables {
        sample.tables.insert(
            name(id)?.name.clone(),
            TableCounters {
                seq_scan: seq_scan as f64,
                seq_tup_read: seq_tup_read as f64,
                idx_scan: idx_scan as f64,
            },
        );
    }
    for (id, status, value) in packed.checks {
        let named = name(id)?;
        sample.checks.insert(
            named.name.clone(),
            CheckPoint {
                category: named.detail.clone(),
                status: STATUSES
                    .get(usize::from(status))
                    .copied()
                    .unwrap_or("pending")
                    .to_string(),
                value,
            },
        );
    }
    Ok(sample)
}

/// The `series` id of a name, created on first sight (by this store or another replica's).
/// A check's category or an index's table (`detail`) follows the latest value.
#[allow(clippy::too_many_arguments)]
fn intern(
    db: &mut Db,
    ids: &mut Ids,
    names: &mut HashMap<i64, Named>,
    target: &str,
    kind: Kind,
    name: &str,
    detail: &str,
    at: f64,
) -> Result<i64, StoreError> {
    let known = ids
        .get(target)
        .and_then(|k| k[kind as usize].get(name))
        .copied();
    let (id, stored) = match known {
        Some(id) => (id, names.get(&id).map(|n| n.detail.clone())),
        None => {
            let row = db
                .row(
                    "INSERT INTO series (target, kind, name, detail, first_seen) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (target, kind, name) DO UPDATE SET first_seen = series.first_seen
                     RETURNING id, detail",
                    &[target.into(), (kind as i64).into(), name.into(), detail.into(), at.into()],
                )?
                .ok_or_else(|| StoreError::Corrupt(format!("no series row for {name}")))?;
            let id = row[0].int()?;
            let stored = row[1].text()?;
            ids.entry(target.to_string()).or_default()[kind as usize].insert(name.to_string(), id);
            names.insert(
                id,
                Named {
                    name: name.to_string(),
                    detail: stored.clone(),
                },
            );
            (id, Some(stored))
        }
    };
    if kind != Kind::Statement && stored.as_deref() != Some(detail) {
        db.execute(
            "UPDATE series SET detail = $2 WHERE id = $1",
            &[id.into(), detail.into()],
        )?;
        if let Some(named) = names.get_mut(&id) {
            named.detail = detail.to_string();
        }
    }
    Ok(id)
}

/// The stored record of a sample: numbers only, each name replaced by its `series` id as
/// `intern` gives it (kind, name, detail). The same on every backend.
fn encode(
    sample: &Sample,
    intern: &mut dyn FnMut(Kind, &str, &str) -> Result<i64, StoreError>,
) -> Result<Vec<u8>, StoreError> {
    let mut packed = Packed {
        seconds: sample.seconds as f32,
        database: sample.database.map(|d| {
            [
                whole(d.xact_commit),
                whole(d.xact_rollback),
                whole(d.deadlocks),
                whole(d.conflicts),
                whole(d.temp_files),
                whole(d.temp_bytes),
                whole(d.blks_read),
                whole(d.blks_hit),
            ]
        }),
        size_bytes: whole(sample.size_bytes),
        connections: u32::try_from(whole(sample.connections)).unwrap_or(u32::MAX),
        max_connections: u32::try_from(whole(sample.max_connections)).unwrap_or(u32::MAX),
        resets: sample.resets.clone(),
        statements_available: sample.statements_available,
        vanished: sample.vanished.clone(),
        ..Packed::default()
    };
    if let Some(statements) = &sample.statements {
        let mut list = Vec::with_capacity(statements.len());
        for (query_id, s) in statements {
            let id = intern(Kind::Statement, query_id, &s.query)?;
            list.push((
                u64::try_from(id).unwrap_or(0),
                whole(s.calls),
                whole(s.total_ms * 1000.0),
                whole(s.rows),
            ));
        }
        list.sort_unstable_by_key(|entry| entry.0);
        let mut previous = 0;
        for entry in &mut list {
            let id = entry.0;
            entry.0 = id - previous;
            previous = id;
        }
        packed.statements = Some(list);
    }
    for (name, index) in &sample.indexes {
        let id = intern(Kind::Index, name, &index.table)?;
        packed
            .indexes
            .push((u64::try_from(id).unwrap_or(0), whole(index.scans)));
    }
    for (name, table) in &sample.tables {
        let id = intern(Kind::Table, name, "")?;
        packed.tables.push((
            u64::try_from(id).unwrap_or(0),
            whole(table.seq_scan),
            whole(table.seq_tup_read),
            whole(table.idx_scan),
        ));
    }
    for (name, point) in &sample.checks {
        let id = intern(Kind::Check, name, &point.category)?;
        let status = STATUSES
            .iter()
            .position(|s| *s == point.status)
            .unwrap_or(3);
        packed.checks.push((
            u64::try_from(id).unwrap_or(0),
            u8::try_from(status).unwrap_or(3),
            point.value,
        ));
    }
    postcard::to_allocvec(&packed).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Re-encodes a store of the previous layout (`samples.data`, one JSON document per sample)
/// in one transaction. Returns how many samples were kept and how many were unreadable.
fn migrate_from_json(db: &mut Db) -> Result<(usize, usize), StoreError> {
    db.transaction(|db| {
        db.batch(
            "DROP INDEX IF EXISTS samples_by_target_time;
             ALTER TABLE samples RENAME TO samples_previous_layout;",
        )?;
        db.batch(SCHEMA)?;
        let mut documents = Vec::new();
        db.each(
            "SELECT target, data FROM samples_previous_layout ORDER BY at, rowid",
            &[],
            |row| {
                documents.push((row[0].text()?, row[1].text().ok()));
                Ok(())
            },
        )?;
        let mut ids = HashMap::new();
        let mut names = HashMap::new();
        let (mut kept, mut skipped) = (0, 0);
        for (target, data) in documents {
            match data.and_then(|d| serde_json::from_str::<Sample>(&d).ok()) {
                Some(sample) => {
                    let body = encode(&sample, &mut |kind, name, detail| {
                        intern(
                            db, &mut ids, &mut names, &target, kind, name, detail, sample.at,
                        )
                    })?;
                    db.execute(
                        "INSERT INTO samples (target, at, body) VALUES ($1, $2, $3)",
                        &[target.as_str().into(), sample.at.into(), body.into()],
                    )?;
                    kept += 1;
                }
                None => skipped += 1,
            }
        }
        db.batch(&format!(
            "DROP TABLE samples_previous_layout; PRAGMA user_version = {SCHEMA_VERSION};"
        ))?;
        Ok((kept, skipped))
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_sqlite_file_with_no_table_yet_opens_one_with_foreign_tables_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        // What a first start leaves when it stops (or another process is) between creating
        // the file and writing its tables: SQLite's header and nothing else.
        let empty = dir.path().join("empty.sqlite");
        {
            let connection = Connection::open(&empty).expect("create");
            let _: String = connection
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .expect("wal");
        }
        assert!(std::fs::metadata(&empty).expect("file").len() > 0);
        let store = Store::open(&empty).expect("an empty SQLite database is an empty store");
        store.set_last_version("db", "1.0", 1.0).expect("write");
        drop(store);
        Store::open(&empty).expect("reopened with its tables");
        let foreign = dir.path().join("foreign.sqlite");
        Connection::open(&foreign)
            .and_then(|c| c.execute_batch("CREATE TABLE orders (id INTEGER)"))
            .expect("foreign database");
        match Store::open(&foreign) {
            Err(StoreError::Invalid { reason, .. }) => {
                assert!(reason.contains("without deploywatch's tables"), "{reason}")
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a database of something else was taken for a store"),
        }
    }

    // What every backend must do (samples, texts learned later, pruning) is tested on SQLite
    // and PostgreSQL alike in tests/store.rs; here, what is particular to the SQLite file.

    #[test]
    fn query_text_is_stored_once_and_samples_hold_numbers_only() {
        let store = Store::in_memory().expect("store");
        for i in 0..50 {
            let statements = [
                ("-9123456789012", "SELECT * FROM t WHERE id = $1"),
                ("17", "SELECT 1"),
            ]
            .into_iter()
            .map(|(id, query)| {
                let delta = StatementDelta {
                    calls: 3.0,
                    total_ms: 0.75,
                    rows: 3.0,
                    query: query.to_string(),
                };
                (id.to_string(), delta)
            })
            .collect();
            let sample = Sample {
                at: f64::from(i) * 60.0,
                seconds: 60.0,
                statements: Some(statements),
                statements_available: true,
                ..Sample::default()
            };
            store.add_sample("t", &sample).expect("add");
        }
        let mut inner = store.lock();
        let texts = inner
            .db
            .value("SELECT count(*) FROM series WHERE kind = 0", &[])
            .and_then(|v| v.int())
            .expect("count");
        assert_eq!(texts, 2, "one row per statement, not per sample");
        let body = match inner
            .db
            .value("SELECT body FROM samples LIMIT 1", &[])
            .expect("body")
        {
            Value::Blob(body) => body,
            other => panic!("not a body: {other:?}"),
        };
        assert!(
            body.len() < 120,
            "a sample of two statements takes {} bytes",
            body.len()
        );
        assert!(
            !body.windows(6).any(|w| w == b"SELECT"),
            "no text in a sample"
        );
        drop(inner);
        assert_eq!(
            store.query_texts("t").get("17").map(String::as_str),
            Some("SELECT 1")
        );
    }

    /// A copy of a store written by the previous release (layout 1): 40 JSON samples, one
    /// unreadable row, two deployments, two verdicts (one with a finding) and the last seen
    /// version. The file lives as long as the directory.
    fn previous_layout() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.sqlite");
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/store_v1.sqlite"
            ),
            &path,
        )
        .expect("copy");
        (dir, path)
    }

    #[test]
    fn a_store_of_the_previous_layout_is_migrated_keeping_deployments_and_verdicts() {
        let (_dir, path) = previous_layout();
        let store = Store::open(&path).expect("migrated");
        let deployments = store.deployments(Some("cognit")).expect("deployments");
        let versions: Vec<&str> = deployments.iter().map(|d| d.to_version.as_str()).collect();
        assert_eq!(versions, vec!["3.7.0", "3.6.0"]);
        assert_eq!(deployments[0].note.as_deref(), Some("payments index"));
        let verdicts = store.verdicts(deployments[0].id).expect("verdicts");
        assert_eq!(verdicts.len(), 1);
        assert_eq!(verdicts[0].verdict, Verdict::Regression);
        assert_eq!(verdicts[0].regressions[0].subject, "query 777");
        assert_eq!(
            store.verdicts(deployments[1].id).expect("verdicts")[0].verdict,
            Verdict::Pass
        );
        assert_eq!(
            store.last_version("cognit").expect("version").as_deref(),
            Some("3.7.0")
        );
        let samples = store.samples("cognit", 0.0, f64::MAX).expect("samples");
        assert_eq!(samples.len(), 40, "every readable sample is kept");
        let last = samples.last().expect("last");
        let statements = last.statements.as_ref().expect("statements");
        assert_eq!(
            statements["777"].query,
            "UPDATE payments SET paid = $1 WHERE id = $2"
        );
        assert_eq!(last.checks["orphaned_payments"].category, "integrity");
        assert_eq!(last.indexes["public.submissions_pkey"].scans, 20.0);
        store.check_integrity().expect("sound");
        drop(store);
        // Opening again is a no-op, and the store is now the compact layout.
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store
                .samples("cognit", 0.0, f64::MAX)
                .expect("samples")
                .len(),
            40
        );
        let version = store
            .lock()
            .db
            .value("PRAGMA user_version", &[])
            .and_then(|v| v.int())
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_failed_migration_leaves_the_file_as_it_was() {
        let (_dir, path) = previous_layout();
        {
            // A table in the way of the new layout makes the migration fail half-way.
            let connection = Connection::open(&path).expect("open");
            connection
                .execute_batch("CREATE TABLE series (unexpected TEXT);")
                .expect("obstacle");
        }
        let error = Store::open(&path).err().expect("refused");
        assert!(matches!(error, StoreError::Migration { .. }), "{error}");
        let connection = Connection::open(&path).expect("open");
        let samples: i64 = connection
            .query_row("SELECT count(*) FROM samples", [], |r| r.get(0))
            .expect("old samples still there");
        assert_eq!(samples, 41);
        let deployments: i64 = connection
            .query_row("SELECT count(*) FROM deployments", [], |r| r.get(0))
            .expect("deployments");
        assert_eq!(deployments, 2);
    }

    /// Records a deployment of target `t` from `from` to `to` at `at`, found by `detection`.
    fn deploy(
        store: &Store,
        from: Option<&str>,
        to: &str,
        detection: Detection,
        at: f64,
    ) -> DeploymentRecord {
        store
            .add_deployment(
                "t",
                from,
                to,
                DeploymentKind::Deploy,
                detection,
                at,
                None,
                None,
            )
            .expect("deployment")
    }

    #[test]
    fn the_deployment_that_superseded_another_is_found() {
        let store = Store::in_memory().expect("store");
        let first = deploy(&store, None, "1", Detection::Announced, 100.0);
        let second = deploy(&store, None, "2", Detection::Announced, 200.0);
        let next = store
            .next_deployment("t", first.at, first.id)
            .expect("query")
            .expect("superseded");
        assert_eq!(next.id, second.id);
        assert!(store
            .next_deployment("t", second.at, second.id)
            .expect("query")
            .is_none());
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
            let record = deploy(
                &store,
                Some("3.6.0"),
                "3.7.0",
                Detection::VersionChange,
                20.0,
            );
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
        store.check_integrity().expect("sound");
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

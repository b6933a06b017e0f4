//! Where incremental checks keep their progress (watermarks, running counts, the sweep's
//! position): a table of its own in the state store, created when missing, one row per
//! (target, check) holding the progress as JSON and the fingerprint of the definition it was
//! computed with. Written after every step of a run, so `kill -9` loses at most one chunk.

use crate::checks::incremental::Progress;
use crate::storage::actor::StoreActor;
use crate::storage::{Store, StoreError};

/// The table in an SQLite store (created with the store; PostgreSQL's is part of its schema).
pub(crate) const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS incremental_progress (
    target TEXT NOT NULL,
    check_name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    progress TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (target, check_name)
);
";

/// The progress of every incremental check, in the state store, through the store's thread.
#[derive(Clone)]
pub struct ProgressStore {
    store: StoreActor,
}

impl ProgressStore {
    pub fn new(store: &StoreActor) -> ProgressStore {
        ProgressStore {
            store: store.clone(),
        }
    }

    /// A store that lives only as long as the process (`deploywatch check`: every run is a
    /// first run, a full count).
    pub(crate) fn in_memory() -> Result<ProgressStore, StoreError> {
        Ok(ProgressStore::new(&StoreActor::start(Store::in_memory()?)?))
    }

    /// The stored fingerprint and progress of a check on a target.
    pub(crate) async fn load(
        &self,
        key: &ProgressKey,
    ) -> Result<Option<(String, Progress)>, StoreError> {
        let key = key.clone();
        self.store
            .run(move |store| load(store, &key.target, &key.check))
            .await
    }

    /// Stores a check's progress and the fingerprint of the definition it was computed with.
    pub(crate) async fn save(&self, key: &ProgressKey, saved: Saved) -> Result<(), StoreError> {
        let key = key.clone();
        self.store
            .run(move |store| {
                let Saved {
                    fingerprint,
                    progress,
                    at,
                } = &saved;
                save(store, &key.target, &key.check, fingerprint, progress, *at)
            })
            .await
    }
}

/// Whose progress: a check on a target.
#[derive(Debug, Clone)]
pub(crate) struct ProgressKey {
    pub(crate) target: String,
    pub(crate) check: String,
}

/// A check's progress, the fingerprint of the definition it was computed with, and when.
pub(crate) struct Saved {
    pub(crate) fingerprint: String,
    pub(crate) progress: Progress,
    /// Unix seconds.
    pub(crate) at: f64,
}

/// The stored fingerprint and progress of `check` on `target`, read on the caller's thread.
pub fn load(
    store: &Store,
    target: &str,
    check: &str,
) -> Result<Option<(String, Progress)>, StoreError> {
    let row = store.with_db(|db| {
        db.row(
            "SELECT fingerprint, progress FROM incremental_progress \
             WHERE target = $1 AND check_name = $2",
            &[target.into(), check.into()],
        )?
        .map(|row| Ok((row[0].text()?, row[1].text()?)))
        .transpose()
    })?;
    match row {
        None => Ok(None),
        Some((fingerprint, text)) => {
            let progress = serde_json::from_str(&text).map_err(|error| {
                StoreError::Corrupt(format!("progress of {target}/{check}: {error}"))
            })?;
            Ok(Some((fingerprint, progress)))
        }
    }
}

/// Stores the progress of `check` on `target`, on the caller's thread.
pub fn save(
    store: &Store,
    target: &str,
    check: &str,
    fingerprint: &str,
    progress: &Progress,
    now: f64,
) -> Result<(), StoreError> {
    let text = serde_json::to_string(progress).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.with_db(|db| {
        db.execute(
            "INSERT INTO incremental_progress \
                 (target, check_name, fingerprint, progress, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (target, check_name) DO UPDATE SET \
                 fingerprint = excluded.fingerprint, progress = excluded.progress, \
                 updated_at = excluded.updated_at",
            &[
                target.into(),
                check.into(),
                fingerprint.into(),
                text.into(),
                now.into(),
            ],
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::incremental::{SweepReason, TableIdentity};

    #[tokio::test]
    async fn progress_is_kept_per_target_and_check_across_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.sqlite");
        let mut progress = Progress::default();
        progress.reset(
            TableIdentity {
                oid: 7,
                relfilenode: 8,
            },
            Some("42".into()),
            SweepReason::Initial,
            Default::default(),
            42,
            1.0,
        );
        {
            let store = ProgressStore::new(
                &StoreActor::start(Store::open(&path).expect("open")).expect("actor"),
            );
            assert_eq!(store.load(&key("a", "c")).await.expect("load"), None);
            store
                .save(&key("a", "c"), saved("f1", &progress, 1.0))
                .await
                .expect("save");
            progress.settle(1, Some("50".into()), 2);
            store
                .save(&key("a", "c"), saved("f2", &progress, 2.0))
                .await
                .expect("save again");
        }
        let store = ProgressStore::new(
            &StoreActor::start(Store::open(&path).expect("reopen")).expect("actor"),
        );
        assert_eq!(
            store.load(&key("a", "c")).await.expect("load"),
            Some(("f2".to_string(), progress))
        );
        assert_eq!(store.load(&key("b", "c")).await.expect("load"), None);
    }

    fn key(target: &str, check: &str) -> ProgressKey {
        ProgressKey {
            target: target.to_string(),
            check: check.to_string(),
        }
    }

    fn saved(fingerprint: &str, progress: &Progress, at: f64) -> Saved {
        Saved {
            fingerprint: fingerprint.to_string(),
            progress: progress.clone(),
            at,
        }
    }
}

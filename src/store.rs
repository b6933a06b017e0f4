//! Placeholder store.
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
}

#[derive(Clone)]
pub struct Store {}

impl Store {
    pub fn open(_path: &Path) -> Result<Store, StoreError> {
        Ok(Store {})
    }
    pub fn in_memory() -> Result<Store, StoreError> {
        Ok(Store {})
    }
}

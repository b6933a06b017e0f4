//! Deployment tracking (placeholder until the tracker lands).

use serde::Deserialize;

use crate::deployment::DeploymentView;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    pub target: Option<String>,
    pub version: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("{0}")]
    Rejected(String),
}

#[derive(Clone)]
pub struct Announcer {}

impl Announcer {
    pub async fn announce(&self, _a: Announcement) -> Result<DeploymentView, TrackerError> {
        Err(TrackerError::Rejected("not implemented".into()))
    }
}

impl Announcer {
    pub fn new() -> Self {
        Announcer {}
    }
}

pub fn start(
    _config: &crate::config::Config,
    _pools: &crate::scheduler::Pools,
    _state: &std::sync::Arc<crate::state::State>,
    _store: &crate::store::Store,
    _announcer: &Announcer,
    _tasks: &tokio_util::task::TaskTracker,
    _cancel: &tokio_util::sync::CancellationToken,
) {
}

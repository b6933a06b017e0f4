//! The daemon's work: the check scheduler ([`scheduler`]), incremental checks with their
//! stored progress ([`incremental`]), the deployment tracker
//! ([`tracker`]), the expansion of discovered databases into targets ([`discovery`]) and the
//! in-memory results everything else reads ([`state`]), and which of them are worth a log line
//! ([`transitions`]).

pub(crate) mod discovery;
pub mod incremental;
pub mod scheduler;
pub mod state;
pub(crate) mod tracker;
pub mod transitions;

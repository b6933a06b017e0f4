//! Deployment analysis, pure: statistics deltas ([`sample`]), window arithmetic and verdicts
//! ([`window`]), statistics ([`stats`]), the regression rules ([`regression`]), running
//! summaries of samples that the rules read ([`summary`]), the judging of a deployment's windows
//! ([`judging`]), the deployment
//! vocabulary ([`deployment`]) and the checklist's notes ([`report`]). Everything here takes
//! values, "now" included, and returns values.

pub mod deployment;
pub mod judging;
pub mod regression;
pub(crate) mod report;
pub mod sample;
pub mod stats;
pub mod summary;
pub mod window;

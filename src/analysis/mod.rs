//! Deployment analysis, pure: statistics deltas ([`sample`]), window arithmetic and verdicts
//! ([`window`]), statistics ([`stats`]), the regression rules ([`regression`]), the deployment
//! vocabulary ([`deployment`]) and the checklist's notes ([`report`]). Everything here takes
//! values, "now" included, and returns values.

pub mod deployment;
pub mod regression;
pub mod report;
pub mod sample;
pub mod stats;
pub mod window;

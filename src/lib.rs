//! deploywatch: watches PostgreSQL after a schema migration.
//!
//! The layers, from the bottom up (each depends only on those below it; ARCHITECTURE.md has the
//! map and `tests/architecture.rs` enforces it):
//!
//! - `labels`: closed sets of snake_case labels (metric labels, serde names, stored text).
//! - [`time`]: the one time type, the injectable clock, durations and RFC 3339.
//! - [`shard`]: which replica of a split fleet watches which target (`--shard N/M`). Pure.
//! - [`checks`]: check specifications, the expectation grammar, outcome evaluation. Pure.
//! - [`analysis`]: samples, windows, statistics, regression rules, deployments, reports. Pure.
//! - [`storage`]: the embedded store.
//! - [`postgres`]: the database edge, the only layer that sends SQL.
//! - [`config`]: the configuration files and check packs, validated.
//! - [`watch`]: the work: scheduler, deployment tracker, discovery, in-memory state.
//! - [`server`]: HTTP, metrics, status rendering.
//! - [`daemon`]: the lifecycle that wires them together.
//! - [`commands`]: the CLI.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod analysis;
pub mod checks;
pub mod commands;
pub mod config;
pub mod daemon;
pub(crate) mod labels;
pub mod postgres;
pub mod server;
pub mod shard;
pub mod storage;
pub mod time;
pub mod watch;

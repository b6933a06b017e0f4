//! deploywatch: watches PostgreSQL after a schema migration.
//!
//! Data flows config → scheduler → checks on a target → results in [`state`] → [`metrics`],
//! [`status`] and the deployment [`tracker`]. See ARCHITECTURE.md for the map.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod check_pack;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod deployment;
pub mod discovery;
pub mod expectation;
pub mod http;
pub mod metrics;
pub mod outcome;
pub mod pgcluster;
pub mod pool;
pub mod privileges;
pub mod regression;
pub mod report;
pub mod runner;
pub mod sample;
pub mod sampler;
pub mod scheduler;
pub mod state;
pub mod stats;
pub mod status;
pub mod store;
pub mod target;
pub mod tls;
pub mod tracker;
pub mod web_config;
pub mod window;
pub mod workload;

//! Test support for deploywatch: a throwaway local PostgreSQL ([`pgcluster`]), the cognit
//! application the checklist describes ([`workload::fixtures`]), a light workload of it
//! ([`workload`]), configuration files for a daemon on a compressed clock ([`config`]), what
//! benchmarks read of a process ([`process`]) and waiting on a condition ([`wait`]). The integration tests,
//! the benchmarks and `deploywatch demo` use it; the daemon itself never does.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod config;
pub mod pgcluster;
pub mod process;
pub mod wait;
pub mod workload;

//! `deploywatch check --privileges`: which checks the monitoring role cannot run, found before
//! 3 a.m. Each check's SQL is planned with `EXPLAIN` (never executed) in a read-only
//! transaction: PostgreSQL checks table and function privileges while planning, so a missing
//! `SELECT` grant shows up as SQLSTATE 42501 without running anything. Membership in
//! `pg_monitor` is checked too: without it the activity views hide other sessions' queries.

use std::fmt::Write as _;

use crate::config::Config;
use crate::postgres::privileges::{plan, role_membership};
use crate::watch::scheduler::Pools;

/// What one check needs that the role does not have.
#[derive(Debug, Clone, PartialEq)]
pub struct Denied {
    pub target: String,
    pub check: String,
    pub reason: String,
    pub sqlstate: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrivilegeReport {
    pub denied: Vec<Denied>,
    /// Per target: the role and whether it is a member of pg_monitor.
    pub roles: Vec<(String, String, bool)>,
    pub checked: usize,
    /// Targets that could not be asked at all, with why.
    pub unreachable: Vec<(String, String)>,
}

impl PrivilegeReport {
    pub fn all_runnable(&self) -> bool {
        self.unreachable.is_empty()
            && self.denied.is_empty()
            && self.roles.iter().all(|(_, _, monitor)| *monitor)
    }

    /// 0 everything can run, 1 something cannot, 2 a target cannot be reached (like `check`).
    pub fn exit_code(&self) -> u8 {
        if !self.unreachable.is_empty() {
            crate::commands::EXIT_UNREACHABLE
        } else if self.all_runnable() {
            crate::commands::EXIT_OK
        } else {
            crate::commands::EXIT_FAILED
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (target, message) in &self.unreachable {
            let _ = writeln!(
                out,
                "target {target}: cannot connect, privileges not checked: {message}"
            );
        }
        for (target, role, monitor) in &self.roles {
            let _ = writeln!(
                out,
                "target {target}: role {role} {}",
                if *monitor {
                    "is a member of pg_monitor"
                } else {
                    "is NOT a member of pg_monitor: activity checks only see its own sessions (GRANT pg_monitor TO ...)"
                }
            );
        }
        if self.denied.is_empty() && self.checked == 0 && !self.unreachable.is_empty() {
            // Nothing could be asked: no "all 0 checks can run".
        } else if self.denied.is_empty() {
            let _ = writeln!(
                out,
                "all {} checks can run with these privileges",
                self.checked
            );
        } else {
            let _ = writeln!(
                out,
                "{} of {} checks cannot run:",
                self.denied.len(),
                self.checked
            );
            for d in &self.denied {
                let code = d
                    .sqlstate
                    .as_deref()
                    .map(|c| format!(" (SQLSTATE {c})"))
                    .unwrap_or_default();
                let _ = writeln!(out, "  {} / {}: {}{code}", d.target, d.check, d.reason);
            }
        }
        out
    }
}

/// Plans every check of every target and collects what is denied.
pub async fn report(config: &Config) -> PrivilegeReport {
    let expanded = crate::watch::discovery::expand(config).await;
    let config = &expanded.config;
    let pools = Pools::for_config(&Pools::default(), config);
    let mut report = PrivilegeReport::default();
    for (target, message) in &expanded.failures {
        report
            .unreachable
            .push((target.clone(), format!("cannot connect: {message}")));
    }
    for target in &config.targets {
        let Some(pool) = pools.get(&target.name) else {
            continue;
        };
        let role =
            role_membership(pool, config.defaults.timeout, config.defaults.lock_timeout).await;
        match role {
            Ok((name, monitor)) => report.roles.push((target.name.clone(), name, monitor)),
            Err(error) if error.kind == crate::checks::outcome::ErrorKind::Connection => {
                report
                    .unreachable
                    .push((target.name.clone(), error.message));
                continue;
            }
            Err(error) => {
                report.denied.push(Denied {
                    target: target.name.clone(),
                    check: "(role)".to_string(),
                    reason: error.message,
                    sqlstate: error.sqlstate,
                });
                continue;
            }
        }
        for check in &target.checks {
            report.checked += 1;
            if let Err(error) = plan(pool, check).await {
                report.denied.push(Denied {
                    target: target.name.clone(),
                    check: check.name.clone(),
                    reason: error.message,
                    sqlstate: error.sqlstate,
                });
            }
        }
    }
    pools.close_all();
    report
}

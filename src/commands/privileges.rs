//! `deploywatch check --privileges`: which checks the monitoring role cannot run, found before
//! 3 a.m. Each check's SQL is planned with `EXPLAIN` (never executed) in a read-only
//! transaction: PostgreSQL checks table and function privileges while planning, so a missing
//! `SELECT` grant shows up as SQLSTATE 42501 without running anything. Membership in
//! `pg_monitor` is checked too: without it the activity views hide other sessions' queries.
//! And what the role can do beyond reading, which a `READ ONLY` transaction does not stop, is
//! flagged: being a superuser, or a member of `pg_execute_server_program`,
//! `pg_write_server_files` or `pg_signal_backend`.

use std::fmt::Write as _;

use crate::config::Config;
use crate::postgres::privileges::{plan, role_membership};
use crate::watch::scheduler::Pools;

/// What one check needs that the role does not have.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Denied {
    pub(crate) target: String,
    pub(crate) check: String,
    pub(crate) reason: String,
    pub(crate) sqlstate: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrivilegeReport {
    pub(crate) denied: Vec<Denied>,
    /// Per target: the role and whether it is a member of pg_monitor.
    pub(crate) roles: Vec<(String, String, bool)>,
    /// Per target: what the role can do beyond reading (superuser, risky memberships).
    pub(crate) excess: Vec<(String, String)>,
    pub(crate) checked: usize,
    /// Targets that could not be asked at all, with why.
    pub(crate) unreachable: Vec<(String, String)>,
}

/// Roles whose members can act outside the database despite `READ ONLY`, and what they allow.
const RISKY_ROLE_POWERS: [(&str, &str); 3] = [
    (
        "pg_execute_server_program",
        "can run programs on the database server (COPY ... TO PROGRAM)",
    ),
    (
        "pg_write_server_files",
        "can write files on the database server (COPY ... TO 'file')",
    ),
    (
        "pg_signal_backend",
        "can cancel and terminate other sessions (pg_terminate_backend)",
    ),
];

impl PrivilegeReport {
    pub(crate) fn all_runnable(&self) -> bool {
        self.unreachable.is_empty()
            && self.denied.is_empty()
            && self.excess.is_empty()
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
        for (target, excess) in &self.excess {
            let _ = writeln!(out, "target {target}: {excess}");
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
            Ok(role) => {
                let name = &role.name;
                if role.superuser {
                    report.excess.push((
                        target.name.clone(),
                        format!(
                            "role {name} is a superuser: READ ONLY does not stop it from writing \
                             files, running programs or terminating sessions on the server; \
                             use a role with pg_monitor and SELECT grants"
                        ),
                    ));
                } else {
                    for risky in &role.risky {
                        let what = RISKY_ROLE_POWERS
                            .iter()
                            .find(|(r, _)| r == risky)
                            .map(|(_, what)| *what)
                            .unwrap_or("can act outside the database");
                        report.excess.push((
                            target.name.clone(),
                            format!(
                                "role {name} is a member of {risky}: it {what}, \
                                 which READ ONLY does not prevent (REVOKE {risky} FROM {name})"
                            ),
                        ));
                    }
                }
                report
                    .roles
                    .push((target.name.clone(), role.name.clone(), role.monitor));
            }
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

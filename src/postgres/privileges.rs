//! The privilege probe behind `deploywatch check --privileges`: a check's SQL is planned with
//! `EXPLAIN` (never executed) in a read-only transaction. PostgreSQL checks table and function
//! privileges while planning, so a missing grant shows up as SQLSTATE 42501 without running
//! anything.

use std::time::Duration;

use crate::checks::outcome::{Cell, CheckError};
use crate::checks::spec::CheckSpec;
use crate::postgres::pool::TargetPool;
use crate::postgres::runner::{query_read_only, query_read_only_opt};

/// Roles whose members can act outside the database despite `READ ONLY`.
pub(crate) const RISKY_ROLES: [&str; 3] = [
    "pg_execute_server_program",
    "pg_write_server_files",
    "pg_signal_backend",
];

/// The session's role as `check --privileges` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Role {
    pub(crate) name: String,
    /// Member of `pg_monitor`.
    pub(crate) monitor: bool,
    pub(crate) superuser: bool,
    /// The [`RISKY_ROLES`] it is a member of.
    pub(crate) risky: Vec<&'static str>,
}

/// The session's role, whether it is a member of `pg_monitor`, a superuser, and which of
/// the [`RISKY_ROLES`] it is a member of.
pub(crate) async fn role_membership(
    pool: &TargetPool,
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<Role, CheckError> {
    let mut sql = String::from(
        "SELECT current_user::text, pg_has_role(current_user, 'pg_monitor', 'member'), \
         current_setting('is_superuser') = 'on'",
    );
    for risky in RISKY_ROLES {
        sql.push_str(&format!(", pg_has_role(current_user, '{risky}', 'member')"));
    }
    let table = query_read_only(pool, &sql, &[], timeout, lock_timeout).await?;
    let row = table.rows.first();
    let name = match row.and_then(|r| r.first()) {
        Some(Cell::Text(t)) => t.clone(),
        _ => "?".to_string(),
    };
    let flag = |i: usize| matches!(row.and_then(|r| r.get(i)), Some(Cell::Bool(true)));
    Ok(Role {
        name,
        monitor: flag(1),
        superuser: flag(2),
        risky: RISKY_ROLES
            .iter()
            .enumerate()
            .filter(|(i, _)| flag(3 + i))
            .map(|(_, r)| *r)
            .collect(),
    })
}

/// Plans the check's SQL with its parameters bound, without running it, and an incremental
/// check's `sweep_sql` too. An incremental check's key range (`$1`, `$2`, and a sweep's bound
/// `$3`) is planned as NULL, which every key type accepts.
pub(crate) async fn plan(pool: &TargetPool, check: &CheckSpec) -> Result<(), CheckError> {
    let mut queries = vec![(
        check.sql.as_str(),
        if check.incremental.is_some() { 2 } else { 0 },
    )];
    if let Some(by) = check.incremental.as_ref().and_then(|d| d.sweep_by.as_ref()) {
        queries.push((by.sql.as_str(), 3));
    }
    for (sql, nulls) in queries {
        let explain = format!("EXPLAIN {sql}");
        let mut bind: Vec<Option<&str>> = vec![None; nulls];
        bind.extend(check.bind.iter().map(|b| Some(b.as_str())));
        query_read_only_opt(pool, &explain, &bind, check.timeout, check.lock_timeout).await?;
    }
    Ok(())
}

//! The privilege probe behind `deploywatch check --privileges`: a check's SQL is planned with
//! `EXPLAIN` (never executed) in a read-only transaction. PostgreSQL checks table and function
//! privileges while planning, so a missing grant shows up as SQLSTATE 42501 without running
//! anything.

use std::time::Duration;

use crate::checks::outcome::{Cell, CheckError};
use crate::checks::spec::CheckSpec;
use crate::postgres::pool::TargetPool;
use crate::postgres::runner::{query_read_only, query_read_only_opt};

/// The session's role and whether it is a member of `pg_monitor`.
pub async fn role_membership(
    pool: &TargetPool,
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<(String, bool), CheckError> {
    let table = query_read_only(
        pool,
        "SELECT current_user::text, pg_has_role(current_user, 'pg_monitor', 'member')",
        &[],
        timeout,
        lock_timeout,
    )
    .await?;
    let row = table.rows.first();
    let name = match row.and_then(|r| r.first()) {
        Some(Cell::Text(t)) => t.clone(),
        _ => "?".to_string(),
    };
    let monitor = matches!(row.and_then(|r| r.get(1)), Some(Cell::Bool(true)));
    Ok((name, monitor))
}

/// Plans the check's SQL with its parameters bound, without running it. An incremental
/// check's key range (`$1`, `$2`) is planned as NULL, which every key type accepts.
pub async fn plan(pool: &TargetPool, check: &CheckSpec) -> Result<(), CheckError> {
    let explain = format!("EXPLAIN {}", check.sql);
    let mut bind: Vec<Option<&str>> = Vec::new();
    if check.incremental.is_some() {
        bind.extend([None, None]);
    }
    bind.extend(check.bind.iter().map(|b| Some(b.as_str())));
    query_read_only_opt(pool, &explain, &bind, check.timeout, check.lock_timeout)
        .await
        .map(|_| ())
}

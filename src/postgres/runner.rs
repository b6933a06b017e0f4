//! Runs SQL on a target without hurting it: every query goes through a capped pool, inside a
//! `READ ONLY` transaction (committed when the query succeeds, so the database never counts the
//! monitor's reads as rollbacks), with its own `statement_timeout` and
//! `lock_timeout`, and under a client-side deadline so a hung server cannot hold a check
//! forever. Errors are classified into [`ErrorKind`]s here, at the database edge.

use std::time::{Duration, Instant};

use tokio_postgres::types::{FromSql, Type};

use crate::checks::incremental::IncrementalReport;
use crate::checks::number::Number;
use crate::checks::outcome::{self, Cell, CheckError, CheckOutcome, ErrorKind, ResultTable};
use crate::checks::spec::CheckSpec;
use crate::postgres::pool::{describe_connect_error, PoolError, TargetPool};

/// Extra time the client waits beyond `statement_timeout` before it gives up on the server.
const CLIENT_GRACE: Duration = Duration::from_secs(3);

/// The result of one run of one check.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: CheckOutcome,
    pub duration: Duration,
    /// Whether a session to the target could be used (false: the target looks down).
    pub reachable: bool,
    /// What an incremental check's run examined and where its sweep stands.
    pub incremental: Option<IncrementalReport>,
}

/// Runs one plain check once (an incremental check goes through `watch::incremental`, which
/// keeps its progress).
pub async fn run_check(pool: &TargetPool, spec: &CheckSpec) -> RunReport {
    let started = Instant::now();
    let result =
        query_read_only(pool, &spec.sql, &spec.bind, spec.timeout, spec.lock_timeout).await;
    let duration = started.elapsed();
    match result {
        Ok(table) => RunReport {
            outcome: outcome::evaluate(spec, &table),
            duration,
            reachable: true,
            incremental: None,
        },
        Err(error) => RunReport {
            reachable: error.kind != ErrorKind::Connection,
            outcome: CheckOutcome::error(error),
            duration,
            incremental: None,
        },
    }
}

/// Runs one read-only query with the given text parameters and returns its rows.
pub async fn query_read_only(
    pool: &TargetPool,
    sql: &str,
    bind: &[String],
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<ResultTable, CheckError> {
    let bind: Vec<Option<&str>> = bind.iter().map(|b| Some(b.as_str())).collect();
    query_read_only_opt(pool, sql, &bind, timeout, lock_timeout).await
}

/// As [`query_read_only`], with text parameters that may be NULL.
pub async fn query_read_only_opt(
    pool: &TargetPool,
    sql: &str,
    bind: &[Option<&str>],
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<ResultTable, CheckError> {
    let session = pool.get().await.map_err(|error| match error {
        PoolError::Exhausted { .. } => CheckError::new(ErrorKind::Timeout, error.to_string()),
        other => CheckError::new(ErrorKind::Connection, other.to_string()),
    })?;
    let deadline = timeout + CLIENT_GRACE;
    let work = async {
        let setup = format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = {}",
            millis(timeout),
            millis(lock_timeout),
            millis(deadline + CLIENT_GRACE),
        );
        session
            .client
            .batch_execute(&setup)
            .await
            .map_err(classify)?;
        let params: Vec<(&(dyn tokio_postgres::types::ToSql + Sync), Type)> = bind
            .iter()
            .map(|value| {
                (
                    value as &(dyn tokio_postgres::types::ToSql + Sync),
                    Type::TEXT,
                )
            })
            .collect();
        let result = session.client.query_typed(sql, &params).await;
        // A read-only transaction has nothing to keep, so it ends in COMMIT when the query
        // succeeded: the database then counts the monitor's work as commits, and its rollback
        // ratio stays the application's own. A failed query's transaction is aborted and must
        // be rolled back before the session is reused.
        let end = session
            .client
            .batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .await;
        let rows = result.map_err(classify)?;
        end.map_err(classify)?;
        decode(&rows)
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(table)) => Ok(table),
        Ok(Err(error)) => {
            if error.kind == ErrorKind::Connection {
                TargetPool::discard(session);
            }
            Err(error)
        }
        Err(_) => {
            // The server did not answer at all; the session is in an unknown state.
            TargetPool::discard(session);
            Err(CheckError::new(
                ErrorKind::Timeout,
                format!(
                    "no answer from the server within {:.1}s (statement_timeout {:.1}s)",
                    deadline.as_secs_f64(),
                    timeout.as_secs_f64()
                ),
            ))
        }
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis().max(1)
}

/// Maps a tokio-postgres error to a check error kind, keeping PostgreSQL's message and SQLSTATE.
fn classify(error: tokio_postgres::Error) -> CheckError {
    match error.as_db_error() {
        Some(db) => {
            let code = db.code().code().to_string();
            let kind = match code.as_str() {
                // query_canceled (statement_timeout) and lock_not_available (lock_timeout)
                "57014" | "55P03" => ErrorKind::Timeout,
                "25006" => ErrorKind::ReadOnly,
                // admin_shutdown, crash_shutdown, cannot_connect_now
                "57P01" | "57P02" | "57P03" => ErrorKind::Connection,
                _ => ErrorKind::Sql,
            };
            let mut message = db.message().to_string();
            if let Some(detail) = db.detail() {
                message.push_str(": ");
                message.push_str(detail);
            }
            CheckError {
                kind,
                message,
                sqlstate: Some(code),
            }
        }
        None => CheckError::new(ErrorKind::Connection, describe_connect_error(&error)),
    }
}

fn decode(rows: &[tokio_postgres::Row]) -> Result<ResultTable, CheckError> {
    let columns = match rows.first() {
        Some(row) => row.columns().iter().map(|c| c.name().to_string()).collect(),
        None => Vec::new(),
    };
    let mut table = ResultTable {
        columns,
        rows: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        let mut cells = Vec::with_capacity(row.len());
        for (index, column) in row.columns().iter().enumerate() {
            let cell: AnyCell = row.try_get(index).map_err(|error| {
                CheckError::new(
                    ErrorKind::NotNumeric,
                    format!(
                        "column {:?} has type {} which deploywatch cannot read ({error}); \
                         cast it to text or a number",
                        column.name(),
                        column.type_()
                    ),
                )
            })?;
            cells.push(cell.0);
        }
        table.rows.push(cells);
    }
    Ok(table)
}

/// Decodes PostgreSQL's binary `numeric` exactly, whatever its size: a header of four 16-bit
/// words (digit count, weight of the first digit in powers of 10000, sign, display scale) and
/// base-10000 digits. The sign word also spells NaN and ±Infinity (PostgreSQL 14+).
pub fn decode_numeric(raw: &[u8]) -> Result<Number, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
        match raw.get(i * 2..i * 2 + 2) {
            Some(&[high, low]) => Ok(u16::from_be_bytes([high, low])),
            _ => Err("truncated numeric value".into()),
        }
    };
    let count = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let scale = word(3)?;
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Ok(Number::Float(f64::NAN)),
        0xD000 => return Ok(Number::Float(f64::INFINITY)),
        0xF000 => return Ok(Number::Float(f64::NEG_INFINITY)),
        other => return Err(format!("unknown numeric sign 0x{other:04x}").into()),
    }
    if raw.len() != 8 + 2 * count {
        return Err("numeric value of the wrong length".into());
    }
    if count == 0 {
        return Ok(Number::Exact(
            bigdecimal::BigDecimal::from(0).with_scale(i64::from(scale)),
        ));
    }
    let mut text = String::with_capacity(count * 4 + 16);
    if sign == 0x4000 {
        text.push('-');
    }
    for i in 0..count {
        let digit = word(4 + i)?;
        if digit > 9999 {
            return Err("numeric digit out of range".into());
        }
        text.push_str(&format!("{digit:04}"));
    }
    // The digits read as one integer; the last one is worth 10000^(weight - count + 1).
    let exponent = 4 * (weight - count as i64 + 1);
    text.push_str(&format!("e{exponent}"));
    let value = text
        .parse::<bigdecimal::BigDecimal>()
        .map_err(|e| format!("numeric value: {e}"))?;
    Ok(Number::Exact(value.with_scale(i64::from(scale))))
}

/// Decodes any column type deploywatch understands into a [`Cell`].
struct AnyCell(Cell);

impl<'a> FromSql<'a> for AnyCell {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let cell = match *ty {
            Type::BOOL => Cell::Bool(bool::from_sql(ty, raw)?),
            Type::INT2 => Cell::Int(i16::from_sql(ty, raw)?.into()),
            Type::INT4 => Cell::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT8 => Cell::Int(i64::from_sql(ty, raw)?),
            Type::OID => Cell::Int(u32::from_sql(ty, raw)?.into()),
            Type::FLOAT4 => Cell::Float(f32::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Cell::Float(f64::from_sql(ty, raw)?),
            Type::NUMERIC => Cell::Numeric(decode_numeric(raw)?),
            _ if <String as FromSql>::accepts(ty) => Cell::Text(String::from_sql(ty, raw)?),
            _ => return Err(format!("unsupported type {ty}").into()),
        };
        Ok(AnyCell(cell))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(AnyCell(Cell::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

//! Runs SQL on a target without hurting it: every query goes through a capped pool, inside a
//! `READ ONLY` transaction (committed when the query succeeds, so the database never counts the
//! monitor's reads as rollbacks), with its own `statement_timeout` and `lock_timeout`, and
//! under a client-side deadline so a hung server cannot hold a check
//! forever. Rows are fetched through a portal in bounded batches, and reading stops as soon as
//! the result is bigger than the check can use (one row for a scalar check, `max_series` for a
//! rows check) or than a byte cap: a runaway query cannot take the daemon's memory. After every
//! query the session is reset (`DISCARD ALL`: advisory locks, settings, prepared statements)
//! before it is reused. Errors are classified into [`ErrorKind`]s here, at the database edge.

use std::time::{Duration, Instant};

use tokio_postgres::types::{FromSql, ToSql, Type};

use crate::checks::incremental::IncrementalReport;
use crate::checks::number::Number;
use crate::checks::outcome::{self, Cell, CheckError, CheckOutcome, ErrorKind, ResultTable};
use crate::checks::spec::{CheckSpec, Shape};
use crate::postgres::pool::{describe_connect_error, PoolError, TargetPool};

/// How much of a result one query may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Rows beyond this end the query (one more is read to know there are more).
    pub(crate) max_rows: usize,
    /// Bytes of column data beyond this end the query.
    pub(crate) max_bytes: usize,
}

impl Limits {
    /// For deploywatch's own queries (statistics sampling, discovery, version): generous, but
    /// bounded all the same.
    pub(crate) const INTERNAL: Limits = Limits {
        max_rows: 1_000_000,
        max_bytes: 64 << 20,
    };

    /// Column data a check's result may hold: far beyond anything `max_series` series need.
    pub(crate) const CHECK_MAX_BYTES: usize = 4 << 20;

    /// What a check can use: one row for a scalar check, `max_series` series for a rows check.
    pub(crate) fn for_check(spec: &CheckSpec) -> Limits {
        let max_rows = match &spec.shape {
            Shape::Scalar => 1,
            Shape::Rows {
                values, max_series, ..
            } => max_series / values.len().max(1),
        };
        Limits {
            max_rows,
            max_bytes: Self::CHECK_MAX_BYTES,
        }
    }
}

/// A query that failed, and whether the failure says the server cannot be used.
struct Failure {
    error: CheckError,
    unreachable: bool,
}

impl From<CheckError> for Failure {
    fn from(error: CheckError) -> Self {
        Failure {
            unreachable: error.kind == ErrorKind::Connection,
            error,
        }
    }
}

/// The result of one run of one check.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: CheckOutcome,
    pub(crate) duration: Duration,
    /// Whether a session to the target could be used (false: the target looks down).
    pub(crate) reachable: bool,
    /// What an incremental check's run examined and where its sweep stands.
    pub incremental: Option<IncrementalReport>,
}

/// Runs one plain check once (an incremental check goes through `watch::incremental`, which
/// keeps its progress).
pub(crate) async fn run_check(pool: &TargetPool, spec: &CheckSpec) -> RunReport {
    let started = Instant::now();
    let limits = Limits::for_check(spec);
    let bind: Vec<Option<&str>> = spec.bind.iter().map(|b| Some(b.as_str())).collect();
    let result = query_bounded(
        pool,
        &spec.sql,
        &bind,
        spec.timeout,
        spec.lock_timeout,
        limits,
    )
    .await;
    let duration = started.elapsed();
    match result {
        Ok(Fetched::Complete(table)) => RunReport {
            outcome: outcome::evaluate(spec, &table),
            duration,
            reachable: true,
            incremental: None,
        },
        Ok(Fetched::MoreRows(read)) => {
            let error = match &spec.shape {
                Shape::Scalar => CheckError::new(
                    ErrorKind::TooManyRows,
                    "a scalar check must return one row, got more; the rest was not read",
                ),
                Shape::Rows {
                    values, max_series, ..
                } => CheckError::new(
                    ErrorKind::TooManySeries,
                    format!(
                        "more than {} rows x {} value columns, more than max_series = {max_series}; \
                         the rest was not read; narrow the query or raise max_series",
                        read - 1,
                        values.len()
                    ),
                ),
            };
            RunReport {
                outcome: CheckOutcome::error(error),
                duration,
                reachable: true,
                incremental: None,
            }
        }
        Err(failure) => RunReport {
            reachable: !failure.unreachable,
            outcome: CheckOutcome::error(failure.error),
            duration,
            incremental: None,
        },
    }
}

/// Runs one read-only query with the given text parameters and returns its rows, within
/// [`Limits::INTERNAL`].
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
pub(crate) async fn query_read_only_opt(
    pool: &TargetPool,
    sql: &str,
    bind: &[Option<&str>],
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<ResultTable, CheckError> {
    let limits = Limits::INTERNAL;
    match query_bounded(pool, sql, bind, timeout, lock_timeout, limits).await {
        Ok(Fetched::Complete(table)) => Ok(table),
        Ok(Fetched::MoreRows(_)) => Err(CheckError::new(
            ErrorKind::TooManyRows,
            format!("more than {} rows; the rest was not read", limits.max_rows),
        )),
        Err(failure) => Err(failure.error),
    }
}

/// Runs several read-only queries in one transaction, their requests pipelined (five round
/// trips in all instead of five each), and returns their rows in order, each within
/// [`Limits::INTERNAL`]. The queries must not depend on each other's results. One failure fails
/// them all.
pub(crate) async fn query_read_only_many(
    pool: &TargetPool,
    queries: &[(&str, &[Option<&str>])],
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<Vec<ResultTable>, CheckError> {
    let limits = Limits::INTERNAL;
    let fetched = query_bounded_many(pool, queries, timeout, lock_timeout, limits)
        .await
        .map_err(|failure| failure.error)?;
    fetched
        .into_iter()
        .map(|f| match f {
            Fetched::Complete(table) => Ok(table),
            Fetched::MoreRows(_) => Err(CheckError::new(
                ErrorKind::TooManyRows,
                format!("more than {} rows; the rest was not read", limits.max_rows),
            )),
        })
        .collect()
}

/// What a bounded query read.
enum Fetched {
    /// The whole result.
    Complete(ResultTable),
    /// More rows than `max_rows`: reading stopped after this many.
    MoreRows(usize),
}

/// Rows fetched per round trip at first; later batches are sized from the rows seen so far.
const FIRST_BATCH: usize = 16;
const MAX_BATCH: usize = 1024;

async fn query_bounded(
    pool: &TargetPool,
    sql: &str,
    bind: &[Option<&str>],
    timeout: Duration,
    lock_timeout: Duration,
    limits: Limits,
) -> Result<Fetched, Failure> {
    let mut fetched =
        query_bounded_many(pool, &[(sql, bind)], timeout, lock_timeout, limits).await?;
    Ok(fetched
        .pop()
        .unwrap_or(Fetched::Complete(ResultTable::default())))
}

async fn query_bounded_many(
    pool: &TargetPool,
    queries: &[(&str, &[Option<&str>])],
    timeout: Duration,
    lock_timeout: Duration,
    limits: Limits,
) -> Result<Vec<Fetched>, Failure> {
    let mut session = pool.get().await.map_err(|error| match error {
        PoolError::Exhausted { .. } => Failure {
            error: CheckError::new(ErrorKind::Timeout, error.to_string()),
            unreachable: false,
        },
        other => Failure {
            error: CheckError::new(ErrorKind::Connection, other.to_string()),
            unreachable: true,
        },
    })?;
    // The server cancels the statement at statement_timeout; an answer later than that by
    // more than the connect timeout means the server is not answering at all.
    let deadline = timeout + pool.connect_timeout();
    let _in_flight = pool.in_flight(&session.client);
    // Round trips are what a session is held for, on a busy server most of all: what need not
    // wait for an answer goes together (tokio-postgres pipelines requests sent before their
    // answers are read). Five round trips: BEGIN; the settings and the statement's Parse;
    // Bind; the first batch of rows; COMMIT (or ROLLBACK) and DISCARD ALL.
    let work = async {
        let client = &mut session.client;
        let transaction = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(classify)?;
        let settings = format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = {}",
            millis(timeout),
            millis(lock_timeout),
            millis(deadline * 2),
        );
        let (set, prepared) = tokio::join!(
            transaction.batch_execute(&settings),
            futures_util::future::join_all(queries.iter().map(|(sql, bind)| {
                let types = vec![Type::TEXT; bind.len()];
                let transaction = &transaction;
                async move { transaction.prepare_typed(sql, &types).await }
            }))
        );
        let fetched = match set {
            Err(error) => Err(classify(error)),
            Ok(()) => match prepared
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(classify)
            {
                Err(error) => Err(error),
                Ok(statements) => futures_util::future::join_all(
                    statements
                        .iter()
                        .zip(queries)
                        .map(|(statement, (_, bind))| fetch(&transaction, statement, bind, limits)),
                )
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>(),
            },
        };
        // A read-only transaction has nothing to keep, so it ends in COMMIT when the query
        // succeeded: the database then counts the monitor's work as commits, and its rollback
        // ratio stays the application's own. A failed (or cut short) query's transaction is
        // rolled back. The reset goes with the end of the transaction.
        let end = match &fetched {
            Ok(all) if all.iter().all(|f| matches!(f, Fetched::Complete(_))) => "COMMIT",
            _ => "ROLLBACK",
        };
        let (ended, reset) = {
            let client = transaction.client();
            tokio::join!(
                client.batch_execute(end),
                client.batch_execute("DISCARD ALL")
            )
        };
        // Ended above, with the reset pipelined behind it (the transaction's own commit would
        // hold the session until it is answered); its drop would send another ROLLBACK. It
        // holds nothing but the borrow of the client.
        std::mem::forget(transaction);
        client.clear_type_cache();
        let fetched = fetched?;
        ended.map_err(classify)?;
        reset.map_err(classify)?;
        Ok::<_, CheckError>(fetched)
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(fetched)) => Ok(fetched),
        Ok(Err(error)) => {
            if error.kind == ErrorKind::Connection {
                pool.mark_down(&error.message);
                TargetPool::discard(session);
            } else if !session.client.is_closed() {
                // A failed statement leaves the transaction rolled back (the Transaction's
                // drop sends ROLLBACK); session state is reset all the same.
                if let Ok(Err(_)) | Err(_) =
                    tokio::time::timeout(pool.connect_timeout(), reset(&session.client)).await
                {
                    TargetPool::discard(session);
                }
            }
            Err(error.into())
        }
        Err(_) => {
            // The server did not answer at all; the session is in an unknown state.
            TargetPool::discard(session);
            let message = format!(
                "no answer from the server within {:.1}s (statement_timeout {:.1}s)",
                deadline.as_secs_f64(),
                timeout.as_secs_f64()
            );
            pool.mark_down(&message);
            Err(Failure {
                error: CheckError::new(ErrorKind::Timeout, message),
                unreachable: true,
            })
        }
    }
}

/// Clears what a session can keep beyond its transaction — session advisory locks,
/// `PREPARE`d statements, `LISTEN`, temporary tables, settings — so the next check starts
/// from a clean session. The driver's own cache of type statements goes with them.
async fn reset(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("DISCARD ALL").await?;
    client.clear_type_cache();
    Ok(())
}

/// Executes `statement` through a portal, a batch of rows at a time, stopping at the limits.
async fn fetch(
    transaction: &tokio_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    bind: &[Option<&str>],
    limits: Limits,
) -> Result<Fetched, CheckError> {
    let params: Vec<&(dyn ToSql + Sync)> = bind
        .iter()
        .map(|value| value as &(dyn ToSql + Sync))
        .collect();
    let portal = transaction
        .bind(statement, &params)
        .await
        .map_err(classify)?;
    let mut table = ResultTable {
        columns: statement
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect(),
        rows: Vec::new(),
    };
    let mut bytes = 0usize;
    let mut batch = FIRST_BATCH.min(limits.max_rows + 1);
    loop {
        let rows = transaction
            .query_portal(&portal, i32::try_from(batch).unwrap_or(i32::MAX))
            .await
            .map_err(classify)?;
        let complete = rows.len() < batch;
        for row in &rows {
            bytes = bytes.saturating_add(row_bytes(row));
            if bytes > limits.max_bytes {
                return Err(CheckError::new(
                    ErrorKind::TooManyRows,
                    format!(
                        "the result is larger than {} MiB after {} rows; the rest was not read",
                        limits.max_bytes >> 20,
                        table.rows.len()
                    ),
                ));
            }
            if table.rows.len() == limits.max_rows {
                return Ok(Fetched::MoreRows(table.rows.len() + 1));
            }
            table.rows.push(decode_row(row)?);
        }
        if complete {
            return Ok(Fetched::Complete(table));
        }
        // Size the next batch so that it holds about an eighth of the byte cap.
        let average = (bytes / table.rows.len().max(1)).max(1);
        batch = (limits.max_bytes / 8 / average)
            .clamp(1, MAX_BATCH)
            .min(limits.max_rows + 1 - table.rows.len());
    }
}

/// Bytes of column data in a row, as received.
fn row_bytes(row: &tokio_postgres::Row) -> usize {
    (0..row.len())
        .map(|i| row.try_get::<_, RawLen>(i).map(|l| l.0).unwrap_or(0))
        .sum()
}

struct RawLen(usize);

impl<'a> FromSql<'a> for RawLen {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawLen(raw.len()))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawLen(0))
    }

    fn accepts(_: &Type) -> bool {
        true
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

fn decode_row(row: &tokio_postgres::Row) -> Result<Vec<Cell>, CheckError> {
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
    Ok(cells)
}

/// Decodes PostgreSQL's binary `numeric` exactly, whatever its size: a header of four 16-bit
/// words (digit count, weight of the first digit in powers of 10000, sign, display scale) and
/// base-10000 digits. The sign word also spells NaN and ±Infinity (PostgreSQL 14+).
pub(crate) fn decode_numeric(
    raw: &[u8],
) -> Result<Number, Box<dyn std::error::Error + Sync + Send>> {
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

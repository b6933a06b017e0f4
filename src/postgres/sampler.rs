//! Reads a target's cumulative statistics for the deployment tracker: `pg_stat_database`,
//! `pg_stat_statements` (when installed), `pg_stat_user_indexes`, `pg_stat_user_tables`,
//! database size and backends in use. Every query is read-only and goes through the server's
//! session budget like a check.
//!
//! `pg_stat_statements`, `pg_stat_activity` and `max_connections` are server-wide: they are read
//! once per server and role per sampling interval ([`ServerStats`]), by whichever database of
//! the server connecting as that role samples first, and split by database; the per-database
//! views are read per database.
//!
//! The catalog is asked what the server offers rather than assuming a version: the
//! pg_stat_statements schema, whether it has `total_exec_time` (1.8+) or `total_time`, and
//! whether `pg_stat_statements_info` exists (1.9+).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::analysis::sample::{
    DbCounters, IndexCounters, RawStats, StatementCounters, TableCounters,
};
use crate::checks::outcome::{Cell, CheckError, ErrorKind, ResultTable};
use crate::postgres::pool::{ServerLimits, TargetPool};
use crate::postgres::runner::query_read_only;

const TIMEOUT: Duration = Duration::from_secs(10);
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// What the server offers for statement statistics.
#[derive(Debug, Clone, PartialEq)]
pub enum StatementsSupport {
    Available {
        /// `schema.pg_stat_statements`, quoted.
        relation: String,
        total_column: &'static str,
        /// `schema.pg_stat_statements_info`, when present.
        info_relation: Option<String>,
    },
    Unavailable(String),
}

async fn query(pool: &TargetPool, sql: &str) -> Result<ResultTable, CheckError> {
    query_read_only(pool, sql, &[], TIMEOUT, LOCK_TIMEOUT).await
}

/// The scan counters of every user index and table, read in one statement: one catalog
/// snapshot and, within its transaction, one reading of each relation's statistics
/// (PostgreSQL 14 and older take the statistics once per transaction; 15 and newer cache each
/// relation's on first access under the default `stats_fetch_consistency = cache`, and
/// `snapshot` takes them all at once; a server set to `none` reads them anew each time, which
/// loses this). So an index dropped while the pass runs is either in both lists or in neither,
/// and a table's `idx_scan`, which every version sums over its indexes, adds up the very index
/// counts the pass read. Read in two statements, a DROP INDEX committing between them made the
/// table's sum lose scans the index list still had, which looked like a statistics reset. The
/// two lists share the internal row and byte caps of one query.
async fn relation_counters(
    pool: &TargetPool,
) -> Result<
    (
        BTreeMap<String, IndexCounters>,
        BTreeMap<String, TableCounters>,
    ),
    CheckError,
> {
    let table = query(
        pool,
        "SELECT true, schemaname || '.' || indexrelname, schemaname || '.' || relname, idx_scan, \
                0::bigint, 0::bigint \
         FROM pg_stat_user_indexes \
         UNION ALL \
         SELECT false, schemaname || '.' || relname, NULL, seq_scan, seq_tup_read, coalesce(idx_scan, 0) \
         FROM pg_stat_user_tables",
    )
    .await?;
    let (mut indexes, mut tables) = (BTreeMap::new(), BTreeMap::new());
    for row in &table.rows {
        let Some(name) = text(row.get(1)) else {
            continue;
        };
        if matches!(row.first(), Some(Cell::Bool(true))) {
            indexes.insert(
                name,
                IndexCounters {
                    table: text(row.get(2)).unwrap_or_default(),
                    scans: number(row.get(3)),
                },
            );
        } else {
            tables.insert(
                name,
                TableCounters {
                    seq_scan: number(row.get(3)),
                    seq_tup_read: number(row.get(4)),
                    idx_scan: number(row.get(5)),
                },
            );
        }
    }
    Ok((indexes, tables))
}

fn number(cell: Option<&Cell>) -> f64 {
    match cell {
        Some(Cell::Int(i)) => *i as f64,
        Some(Cell::Float(f)) => *f,
        Some(Cell::Text(t)) => t.parse().unwrap_or(0.0),
        Some(Cell::Bool(b)) => f64::from(u8::from(*b)),
        _ => 0.0,
    }
}

fn text(cell: Option<&Cell>) -> Option<String> {
    match cell {
        Some(Cell::Text(t)) => Some(t.clone()),
        Some(Cell::Int(i)) => Some(i.to_string()),
        _ => None,
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Finds out whether and how pg_stat_statements can be read in this database.
pub async fn statements_support(pool: &TargetPool) -> Result<StatementsSupport, CheckError> {
    let table = query(
        pool,
        "SELECT n.nspname::text, e.extversion::text FROM pg_extension e \
         JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_stat_statements'",
    )
    .await?;
    let Some(row) = table.rows.first() else {
        return Ok(StatementsSupport::Unavailable(
            "pg_stat_statements is not installed in this database (CREATE EXTENSION pg_stat_statements; \
             it also needs shared_preload_libraries); query latency and top-query signals are not judged"
                .to_string(),
        ));
    };
    let schema = text(row.first()).unwrap_or_else(|| "public".to_string());
    let relation = format!("{}.pg_stat_statements", quote_ident(&schema));
    let columns = query(
        pool,
        &format!(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped",
            relation.replace('\'', "''")
        ),
    )
    .await?;
    let names: Vec<String> = columns
        .rows
        .iter()
        .filter_map(|r| text(r.first()))
        .collect();
    let total_column = if names.iter().any(|n| n == "total_exec_time") {
        "total_exec_time"
    } else if names.iter().any(|n| n == "total_time") {
        "total_time"
    } else {
        return Ok(StatementsSupport::Unavailable(
            "pg_stat_statements has neither total_exec_time nor total_time".to_string(),
        ));
    };
    let info = query(
        pool,
        &format!(
            "SELECT to_regclass('{}.pg_stat_statements_info')::text",
            quote_ident(&schema).replace('\'', "''")
        ),
    )
    .await?;
    let info_relation = info.rows.first().and_then(|r| text(r.first()));
    Ok(StatementsSupport::Available {
        relation,
        total_column,
        info_relation,
    })
}

/// Statement counters of one database, by query id.
pub(crate) type Statements = BTreeMap<String, StatementCounters>;

/// What the server-wide views said at one moment.
#[derive(Debug, Clone)]
pub(crate) struct ServerWide {
    pub(crate) read_at: Instant,
    /// Client backends on the whole server.
    pub(crate) connections: f64,
    pub(crate) max_connections: f64,
    /// By database name; `None` when the reader had no pg_stat_statements, `Err` when it could
    /// not be read.
    pub(crate) statements: Option<Result<HashMap<String, Statements>, String>>,
    pub(crate) statements_reset: Option<String>,
}

/// The server-wide statistics of one server as one role reads them, read at most once per
/// sampling interval.
pub(crate) struct ServerStats {
    every: Mutex<Duration>,
    latest: tokio::sync::Mutex<Option<Arc<ServerWide>>>,
}

impl Default for ServerStats {
    fn default() -> Self {
        ServerStats::new()
    }
}

impl ServerStats {
    pub(crate) fn new() -> ServerStats {
        ServerStats {
            every: Mutex::new(Duration::from_secs(60)),
            latest: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) fn set_interval(&self, every: Duration) {
        *self.every.lock().unwrap_or_else(|e| e.into_inner()) = every;
    }

    /// The server-wide figures of this interval, read through `pool` when nobody has yet. A
    /// reading younger than 90 % of the interval is reused, so the databases of a server,
    /// sampled at different moments of the interval, share one reading; but never one the
    /// caller already took (`taken`, the `read_at` of its previous reading): a database whose
    /// passes came closer than that (one late, the next on time) would get the same counters
    /// twice, an interval in which no statement seemed to run and the next one with two
    /// intervals' worth.
    pub(crate) async fn current(
        &self,
        pool: &TargetPool,
        support: &StatementsSupport,
        taken: Option<Instant>,
    ) -> Result<Arc<ServerWide>, CheckError> {
        let every = *self.every.lock().unwrap_or_else(|e| e.into_inner());
        let mut latest = self.latest.lock().await;
        let wants_statements = matches!(support, StatementsSupport::Available { .. });
        if let Some(reading) = latest.as_ref() {
            if reusable(reading, every, wants_statements, taken) {
                return Ok(reading.clone());
            }
        }
        let reading = Arc::new(read_server_wide(pool, support).await?);
        *latest = Some(reading.clone());
        Ok(reading)
    }
}

/// Whether `reading` may serve a database again: younger than 90 % of the interval `every`,
/// holding the statements when they are wanted, and not the reading that database took last
/// (`taken`).
fn reusable(
    reading: &ServerWide,
    every: Duration,
    wants_statements: bool,
    taken: Option<Instant>,
) -> bool {
    let fresh = reading.read_at.elapsed() < every.mul_f64(0.9);
    let complete = reading.statements.is_some() || !wants_statements;
    let not_taken = taken.is_none_or(|t| reading.read_at > t);
    fresh && complete && not_taken
}

async fn read_server_wide(
    pool: &TargetPool,
    support: &StatementsSupport,
) -> Result<ServerWide, CheckError> {
    let activity = query(
        pool,
        "SELECT count(*) FILTER (WHERE datname IS NOT NULL AND backend_type = 'client backend'), \
                current_setting('max_connections')::int, \
                current_setting('superuser_reserved_connections')::int \
                  + coalesce(current_setting('reserved_connections', true), '0')::int \
         FROM pg_stat_activity",
    )
    .await?;
    let row = activity.rows.first();
    let mut wide = ServerWide {
        read_at: Instant::now(),
        connections: number(row.and_then(|r| r.first())),
        max_connections: number(row.and_then(|r| r.get(1))),
        statements: None,
        statements_reset: None,
    };
    if wide.max_connections >= 1.0 {
        pool.server().set_limits(ServerLimits {
            max_connections: wide.max_connections as u32,
            reserved: number(row.and_then(|r| r.get(2))) as u32,
        });
    }
    if let StatementsSupport::Available {
        relation,
        total_column,
        info_relation,
    } = support
    {
        // Without the text: reading every statement's text means reading the whole query text
        // file on each sample. Texts are fetched once per new query id (`read_texts`).
        // Statements run by deploywatch's own role (its checks, these reads) are not the
        // application's and are left out: the role is a dedicated one (README, "The role
        // deploywatch needs").
        let statements = query(
            pool,
            &format!(
                "SELECT d.datname::text, s.queryid::text, sum(s.calls)::float8, sum(s.{total_column})::float8, \
                        sum(s.rows)::float8 \
                 FROM {relation}(showtext := false) s JOIN pg_database d ON d.oid = s.dbid \
                 WHERE s.queryid IS NOT NULL \
                   AND s.userid IS DISTINCT FROM (SELECT oid FROM pg_roles WHERE rolname = session_user) \
                 GROUP BY 1, 2"
            ),
        )
        .await;
        wide.statements = Some(match statements {
            Ok(table) => {
                let mut by_database: HashMap<String, Statements> = HashMap::new();
                for row in &table.rows {
                    if let (Some(database), Some(id)) = (text(row.first()), text(row.get(1))) {
                        by_database.entry(database).or_default().insert(
                            id,
                            StatementCounters {
                                calls: number(row.get(2)),
                                total_ms: number(row.get(3)),
                                rows: number(row.get(4)),
                                query: String::new(),
                            },
                        );
                    }
                }
                Ok(by_database)
            }
            // Typically the library is not preloaded.
            Err(error) => Err(error.message),
        });
        if let Some(info) = info_relation {
            let reset = query(pool, &format!("SELECT stats_reset::text FROM {info}")).await?;
            wide.statements_reset = reset.rows.first().and_then(|r| text(r.first()));
        }
    }
    Ok(wide)
}

/// Reads everything but the checks (which the tracker takes from the in-memory state), with a
/// server-wide reading of its own. The daemon uses [`read_with`] and shares one per server.
pub async fn read(
    pool: &TargetPool,
    support: &StatementsSupport,
    at: f64,
) -> Result<RawStats, CheckError> {
    read_with(pool, support, &ServerStats::new(), None, at)
        .await
        .map(|(raw, _, _)| raw)
}

/// Reads this database's views, and its share of the server-wide ones from `server` (never
/// the reading it took last, `taken`). The second value says why pg_stat_statements could not
/// be read, when it could not; the third is when the server-wide reading was made, to pass as
/// `taken` next time.
pub(crate) async fn read_with(
    pool: &TargetPool,
    support: &StatementsSupport,
    server: &ServerStats,
    taken: Option<Instant>,
    at: f64,
) -> Result<(RawStats, Option<String>, Instant), CheckError> {
    let mut raw = RawStats {
        at,
        ..RawStats::default()
    };
    let db = query(
        pool,
        "SELECT xact_commit, xact_rollback, deadlocks, conflicts, temp_files, temp_bytes, blks_read, blks_hit, \
                stats_reset::text, pg_database_size(current_database()), current_database()::text, \
                extract(epoch FROM pg_postmaster_start_time())::float8 \
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .await?;
    let mut database = pool.dbname().map(str::to_string);
    if let Some(row) = db.rows.first() {
        let n = |i: usize| number(row.get(i));
        raw.database = Some(DbCounters {
            xact_commit: n(0),
            xact_rollback: n(1),
            deadlocks: n(2),
            conflicts: n(3),
            temp_files: n(4),
            temp_bytes: n(5),
            blks_read: n(6),
            blks_hit: n(7),
        });
        raw.database_reset = text(row.get(8));
        raw.size_bytes = n(9);
        database = text(row.get(10)).or(database);
        raw.postmaster_start = row.get(11).map(|_| n(11)).filter(|t| *t > 0.0);
    }
    (raw.indexes, raw.tables) = relation_counters(pool).await?;
    let wide = server.current(pool, support, taken).await?;
    raw.connections = wide.connections;
    raw.max_connections = wide.max_connections;
    let mut unreadable = None;
    if matches!(support, StatementsSupport::Available { .. }) {
        match &wide.statements {
            Some(Ok(by_database)) => {
                raw.statements = Some(
                    database
                        .as_ref()
                        .and_then(|d| by_database.get(d))
                        .cloned()
                        .unwrap_or_default(),
                );
                raw.statements_reset = wide.statements_reset.clone();
            }
            Some(Err(message)) => {
                unreadable = Some(format!("pg_stat_statements cannot be read: {message}"));
            }
            None => {}
        }
    }
    Ok((raw, unreadable, wide.read_at))
}

/// What is wrong with a target's version query, from what reading it gave, as one sentence for
/// a person: `None` when it returned a version, or when the database could not be reached at
/// all (that is reported as the target being down). Without a working version query a
/// deployment is only seen when it is announced, so this is worth a warning. Pure.
/// `default_query` says whether the target uses the default version query (the checklist's).
pub(crate) fn version_problem(
    target: &str,
    default_query: bool,
    read: &Result<Option<String>, CheckError>,
) -> Option<String> {
    const CONSEQUENCE: &str = "deployments are only seen when announced";
    const WHERE: &str = "set deployments.version_query or targets[].version_query for your \
                         migration tool (docs/getting-started.md, \"Version queries\")";
    match read {
        Ok(Some(_)) => None,
        Err(error) if error.kind == ErrorKind::Connection => None,
        Err(error) if default_query && error.sqlstate.as_deref() == Some(UNDEFINED_TABLE) => {
            Some(format!(
                "target {target}: the default version query reads the database_metadata table \
                 of the checklist's application, which this database does not have ({}): \
                 {CONSEQUENCE}; {WHERE}",
                error.message
            ))
        }
        Err(error) => Some(format!(
            "target {target}: the version query fails ({}: {}): {CONSEQUENCE}; {WHERE}",
            error.kind.as_str(),
            error.message
        )),
        Ok(None) => Some(format!(
            "target {target}: the version query returns no version (no row, or NULL or empty): \
             {CONSEQUENCE}; {WHERE}"
        )),
    }
}

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// At most this many query ids are asked for their text in one query.
const TEXT_BATCH: usize = 500;

/// The texts of the given query ids (those the tracker has not seen before), shortened to
/// what is kept. Ids that are not numbers are skipped; ids gone from the view get no text.
pub(crate) async fn read_texts(
    pool: &TargetPool,
    support: &StatementsSupport,
    ids: &[String],
) -> Result<Vec<(String, String)>, CheckError> {
    let StatementsSupport::Available { relation, .. } = support else {
        return Ok(Vec::new());
    };
    let numbers: Vec<i64> = ids.iter().filter_map(|id| id.parse().ok()).collect();
    let mut texts = Vec::new();
    for chunk in numbers.chunks(TEXT_BATCH) {
        let list = chunk
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // One array constant rather than an IN list: an IN list's query id changes with its
        // length (before PostgreSQL 18), so every fetch would itself be a new statement whose
        // text is fetched on the next pass.
        let table = query(
            pool,
            &format!(
                "SELECT queryid::text, left(min(query), 2000) FROM {relation}(showtext := true) \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND queryid = ANY('{{{list}}}'::bigint[]) GROUP BY queryid"
            ),
        )
        .await?;
        for row in &table.rows {
            if let (Some(id), Some(query)) = (text(row.first()), text(row.get(1))) {
                texts.push((id, crate::analysis::sample::shorten(&query)));
            }
        }
    }
    Ok(texts)
}

/// Reads the schema version with the target's version query. `Ok(None)` when the query runs
/// but returns nothing usable.
pub(crate) async fn read_version(
    pool: &TargetPool,
    sql: &str,
) -> Result<Option<String>, CheckError> {
    let table = query(pool, sql).await?;
    Ok(table
        .rows
        .first()
        .and_then(|row| match row.first() {
            Some(Cell::Text(t)) => Some(t.trim().to_string()),
            Some(Cell::Int(i)) => Some(i.to_string()),
            Some(Cell::Float(f)) => Some(f.to_string()),
            _ => None,
        })
        .filter(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The target uses the default version query.
    const DEFAULT_VERSION_QUERY: bool = true;

    fn sql_error(sqlstate: &str, message: &str) -> Result<Option<String>, CheckError> {
        let mut error = CheckError::new(ErrorKind::Sql, message);
        error.sqlstate = Some(sqlstate.to_string());
        Err(error)
    }

    fn reading(age: Duration) -> ServerWide {
        ServerWide {
            read_at: Instant::now() - age,
            connections: 3.0,
            max_connections: 100.0,
            statements: Some(Ok(HashMap::new())),
            statements_reset: None,
        }
    }

    #[test]
    fn a_fresh_reading_serves_the_other_databases_but_never_the_one_that_took_it() {
        let every = Duration::from_secs(1);
        let wide = reading(Duration::from_millis(300));
        assert!(reusable(&wide, every, true, None));
        let earlier = wide.read_at - Duration::from_secs(1);
        assert!(reusable(&wide, every, true, Some(earlier)));
        // The database whose late pass made it and whose next pass came 0.3 s later.
        assert!(!reusable(&wide, every, true, Some(wide.read_at)));
    }

    #[test]
    fn a_stale_or_incomplete_reading_is_read_again() {
        let every = Duration::from_secs(1);
        assert!(!reusable(
            &reading(Duration::from_millis(950)),
            every,
            true,
            None
        ));
        let mut without = reading(Duration::from_millis(100));
        without.statements = None;
        assert!(!reusable(&without, every, true, None));
        assert!(reusable(&without, every, false, None));
    }

    #[test]
    fn a_version_is_no_problem() {
        assert_eq!(
            version_problem("t", DEFAULT_VERSION_QUERY, &Ok(Some("3.7.0".into()))),
            None
        );
    }

    #[test]
    fn an_unreachable_database_is_reported_elsewhere() {
        let down = Err(CheckError::new(ErrorKind::Connection, "refused"));
        assert_eq!(version_problem("t", DEFAULT_VERSION_QUERY, &down), None);
    }

    #[test]
    fn the_default_query_on_a_foreign_schema_says_what_to_set() {
        let missing = sql_error("42P01", "relation \"database_metadata\" does not exist");
        let text = version_problem("shop", DEFAULT_VERSION_QUERY, &missing).expect("a problem");
        assert!(
            text.starts_with(
                "target shop: the default version query reads the database_metadata table"
            ),
            "{text}"
        );
        assert!(
            text.contains("relation \"database_metadata\" does not exist"),
            "{text}"
        );
        assert!(
            text.contains("deployments are only seen when announced"),
            "{text}"
        );
        assert!(text.contains("targets[].version_query"), "{text}");
    }

    #[test]
    fn a_configured_query_that_fails_is_named_as_such() {
        let denied = sql_error("42501", "permission denied for table flyway_schema_history");
        let text = version_problem("shop", false, &denied).expect("a problem");
        assert!(
            text.starts_with("target shop: the version query fails (sql: permission denied"),
            "{text}"
        );
    }

    #[test]
    fn no_version_is_a_problem() {
        let text = version_problem("shop", false, &Ok(None)).expect("a problem");
        assert!(text.contains("returns no version"), "{text}");
    }
}

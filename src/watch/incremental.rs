//! Runs an incremental check: the queries and the stored progress behind
//! [`crate::checks::incremental`]. Every query goes
//! through [`query_read_only_opt`] (read-only transaction, rolled back, `statement_timeout`,
//! `lock_timeout`, client deadline), each chunk in a transaction of its own, and the progress
//! is written to the store after every step, so a daemon killed mid-sweep resumes where it was.
//!
//! One run:
//! 1. reads the table's identity (oid, relfilenode), the key's type and the planner's estimate;
//! 2. reads the largest key and whether it is below the stored watermark (the key went
//!    backwards: a restore);
//! 3. on a new table identity or a backwards key forgets every count and starts a full sweep;
//! 4. otherwise counts the new keys (and recounts the previous run's range), then starts an
//!    early sweep when `pg_stat_user_tables` shows deletes on a parent or updates on the table;
//! 5. sweeps: chunk after chunk for an urgent sweep (first run, reset, early), one paced chunk
//!    per run for the periodic one (counted in the increment's transaction when its bounds need
//!    no query); a run ends early, once per sweep, when the sweep raised the value, so that what
//!    it found is exported at once. With a sweep key the chunks are ranges of that key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checks::incremental::{
    early_sweep_reason, integer_chunk, paced_rows, IncrementalDef, IncrementalReport, Progress,
    SweepReason, TableCounters, TableIdentity, MIN_CHUNK_ROWS,
};
use crate::checks::outcome::{self, Cell, CheckError, CheckOutcome, ErrorKind, ResultTable};
use crate::checks::spec::CheckSpec;
use crate::postgres::pool::TargetPool;
use crate::postgres::runner::{query_read_only_many, query_read_only_opt, RunReport};
use crate::storage::incremental::{ProgressKey, ProgressStore, Saved};
use crate::time::SharedClock;

/// What the run needs besides the check: where progress is kept and whose it is.
pub(crate) struct Context<'a> {
    pub(crate) pool: &'a TargetPool,
    pub(crate) store: &'a ProgressStore,
    pub(crate) target: &'a str,
    pub(crate) clock: &'a SharedClock,
}

/// Runs one check once: a plain check through the runner, an incremental one with its
/// progress kept in `progress` under `target`, "now" read from the system clock.
pub async fn run_check(
    pool: &TargetPool,
    spec: &CheckSpec,
    progress: &ProgressStore,
    target: &str,
) -> RunReport {
    let Some(def) = &spec.incremental else {
        return crate::postgres::runner::run_check(pool, spec).await;
    };
    let clock = crate::time::system_clock();
    let context = Context {
        pool,
        store: progress,
        target,
        clock: &clock,
    };
    run(&context, spec, def).await
}

/// Runs one incremental check once.
pub(crate) async fn run(
    context: &Context<'_>,
    spec: &CheckSpec,
    def: &IncrementalDef,
) -> RunReport {
    let started = Instant::now();
    let mut runner = Runner {
        context,
        spec,
        def,
        rows_examined: 0,
    };
    let result = runner.run().await;
    let duration = started.elapsed();
    match result {
        Ok((value, report)) => {
            let table = ResultTable {
                columns: vec!["count".to_string()],
                rows: vec![vec![Cell::Int(value)]],
            };
            RunReport {
                outcome: outcome::evaluate(spec, &table),
                duration,
                reachable: true,
                incremental: Some(report),
            }
        }
        Err(error) => RunReport {
            reachable: error.kind != ErrorKind::Connection,
            outcome: CheckOutcome::error(error),
            duration,
            incremental: None,
        },
    }
}

/// The key's type, as the catalog spells it, and how to step below its smallest value.
struct KeyType {
    name: String,
    /// `N` (numeric) or `D` (date/time), `pg_type.typcategory`.
    category: char,
}

impl KeyType {
    /// smallint, integer or bigint: a sweep chunk's bound is then computed, not read.
    fn integer(&self) -> bool {
        matches!(self.name.as_str(), "smallint" | "integer" | "bigint")
    }
}

struct TableFacts {
    identity: TableIdentity,
    estimated_rows: u64,
    key_type: KeyType,
    /// The sweep key's type, when the check declares one.
    sweep_key_type: Option<KeyType>,
}

struct Runner<'c, 'a> {
    context: &'c Context<'a>,
    spec: &'c CheckSpec,
    def: &'c IncrementalDef,
    rows_examined: u64,
}

impl<'c> Runner<'c, '_> {
    async fn run(&mut self) -> Result<(i64, IncrementalReport), CheckError> {
        let now = self.context.clock.now();
        let fingerprint = fingerprint(self.spec, self.def);
        let mut progress = match self.context.store.load(&self.progress_key()).await {
            Ok(Some((stored_fingerprint, progress))) if stored_fingerprint == fingerprint => {
                progress
            }
            Ok(_) => Progress::default(),
            Err(error) => {
                tracing::warn!(
                    db_target = %self.context.target, check = %self.spec.name, %error,
                    "cannot read the check's progress; starting a full sweep"
                );
                Progress::default()
            }
        };
        let (facts, counters, (max_key, backwards)) = self.look(&progress).await?;
        progress.key_type = Some(facts.key_type.name.clone());
        let replaced = progress
            .identity
            .as_ref()
            .is_some_and(|identity| *identity != facts.identity);
        let mut reset = false;
        let mut swept = false;
        if replaced || backwards {
            reset = true;
            tracing::warn!(
                db_target = %self.context.target, check = %self.spec.name,
                table = %self.def.table,
                cause = if replaced { "table truncated, rewritten or replaced" } else { "key went backwards" },
                "reset detected: counts discarded, full sweep started"
            );
            progress.reset(
                facts.identity.clone(),
                max_key.clone(),
                SweepReason::Reset,
                counters.clone(),
                facts.estimated_rows,
                now,
            );
        } else if progress.base_count.is_none() && progress.sweep.is_none() {
            progress.reset(
                facts.identity.clone(),
                max_key.clone(),
                SweepReason::Initial,
                counters.clone(),
                facts.estimated_rows,
                now,
            );
        } else {
            progress.identity = Some(facts.identity.clone());
            // The periodic sweep's next chunk goes with the increment, in its transaction,
            // when its bounds need no query; it counts unless the statistics start an early
            // sweep instead.
            let planned = self.planned_chunk(&progress, &facts, now);
            let prefetched = self
                .increment(&mut progress, &facts, max_key.clone(), planned)
                .await?;
            if let Some(why) =
                progress.plan_sweep(self.def, counters.clone(), facts.estimated_rows, now)
            {
                tracing::info!(
                    db_target = %self.context.target, check = %self.spec.name, %why,
                    "early sweep started"
                );
            }
            if let Some((chunk, count, elapsed)) = prefetched {
                swept = self.take_prefetched(&mut progress, chunk, count, elapsed);
            }
        }
        self.save(&fingerprint, &progress).await;
        if !swept {
            self.sweep(&mut progress, &facts, &fingerprint).await?;
        }
        let report = IncrementalReport {
            rows_examined: self.rows_examined,
            sweep_progress: progress.sweep_progress(),
            sweep_reason: progress.sweep.as_ref().map(|s| s.reason),
            last_complete_sweep: progress.last_complete_at,
            sweep_period: self.def.sweep.period,
            reset,
        };
        match progress.value() {
            Some(value) => Ok((value, report)),
            None => Err(CheckError::new(
                ErrorKind::Timeout,
                format!(
                    "the first full sweep of {} is {:.0}% done; it goes on in the next run",
                    self.def.table,
                    progress.sweep_progress() * 100.0
                ),
            )),
        }
    }

    /// Whose progress this run reads and writes.
    fn progress_key(&self) -> ProgressKey {
        ProgressKey {
            target: self.context.target.to_string(),
            check: self.spec.name.clone(),
        }
    }

    async fn save(&self, fingerprint: &str, progress: &Progress) {
        let saved = Saved {
            fingerprint: fingerprint.to_string(),
            progress: progress.clone(),
            at: self.context.clock.now(),
        };
        if let Err(error) = self.context.store.save(&self.progress_key(), saved).await {
            tracing::warn!(
                db_target = %self.context.target, check = %self.spec.name, %error,
                "cannot store the check's progress; a restart repeats the work"
            );
        }
    }

    async fn query(&self, sql: &str, bind: &[Option<&str>]) -> Result<ResultTable, CheckError> {
        query_read_only_opt(
            self.context.pool,
            sql,
            bind,
            self.spec.timeout,
            self.spec.lock_timeout,
        )
        .await
    }

    /// What a run needs to know first, in one transaction: the table's facts, the write
    /// counters of it and its parents, and its largest key (asked together with the others
    /// when the key's type is known from the last run, else after them).
    async fn look(
        &self,
        progress: &Progress,
    ) -> Result<
        (
            TableFacts,
            BTreeMap<String, TableCounters>,
            (Option<String>, bool),
        ),
        CheckError,
    > {
        let watermark = progress.pending_hi.as_deref();
        let mut tables = vec![self.def.table.clone()];
        tables.extend(self.def.parents.iter().cloned());
        let list = format!("{{{}}}", tables.join(","));
        let facts_bind = [
            Some(self.def.table.as_str()),
            Some(self.def.key.as_str()),
            self.def.sweep_by.as_ref().map(|by| by.key.as_str()),
        ];
        let counters_bind = [Some(list.as_str())];
        let max_bind = [watermark];
        let max_sql = progress.key_type.as_deref().map(|ty| self.max_key_sql(ty));
        let mut queries: Vec<(&str, &[Option<&str>])> =
            vec![(FACTS_SQL, &facts_bind), (COUNTERS_SQL, &counters_bind)];
        if let Some(sql) = &max_sql {
            queries.push((sql, &max_bind));
        }
        let results = match query_read_only_many(
            self.context.pool,
            &queries,
            self.spec.timeout,
            self.spec.lock_timeout,
        )
        .await
        {
            Ok(results) => results,
            // The key's type may have changed since: ask again without it.
            Err(error) if max_sql.is_some() && error.kind != ErrorKind::Connection => {
                tracing::debug!(
                    db_target = %self.context.target, check = %self.spec.name, %error,
                    "reading the largest key with last run's key type failed"
                );
                query_read_only_many(
                    self.context.pool,
                    &queries[..2],
                    self.spec.timeout,
                    self.spec.lock_timeout,
                )
                .await?
            }
            Err(error) => return Err(error),
        };
        let mut results = results.into_iter();
        let (Some(facts), Some(counters)) = (results.next(), results.next()) else {
            return Err(CheckError::new(ErrorKind::Sql, "missing query results"));
        };
        let facts = self.table_facts(&facts)?;
        let counters = parse_counters(&counters);
        let max = match results.next() {
            Some(max) if progress.key_type.as_deref() == Some(facts.key_type.name.as_str()) => {
                parse_max_key(&max)
            }
            _ => self.max_key(&facts.key_type, watermark).await?,
        };
        Ok((facts, counters, max))
    }

    fn table_facts(&self, table: &ResultTable) -> Result<TableFacts, CheckError> {
        let row = table.rows.first().ok_or_else(|| {
            CheckError::new(
                ErrorKind::NoRows,
                format!("table {} not found", self.def.table),
            )
        })?;
        let (Some(Cell::Int(oid)), Some(Cell::Int(relfilenode)), Some(estimate)) =
            (row.first(), row.get(1), row.get(2))
        else {
            return Err(CheckError::new(ErrorKind::Sql, "unexpected catalog row"));
        };
        let estimated_rows = match estimate {
            Cell::Float(f) => *f as u64,
            Cell::Int(i) => u64::try_from(*i).unwrap_or(0),
            _ => 0,
        };
        let (Some(Cell::Text(name)), Some(Cell::Text(category))) = (row.get(3), row.get(4)) else {
            return Err(CheckError::new(
                ErrorKind::Sql,
                format!(
                    "incremental_key {:?} is not a column of {}",
                    self.def.key, self.def.table
                ),
            ));
        };
        let category = category.chars().next().unwrap_or('X');
        if category != 'N' && category != 'D' {
            return Err(CheckError::new(
                ErrorKind::Sql,
                format!(
                    "incremental_key {:?} of {} has type {name}: use a number, date or timestamp column",
                    self.def.key, self.def.table
                ),
            ));
        }
        let sweep_key_type = match &self.def.sweep_by {
            None => None,
            Some(by) => Some(self.sweep_key_type(&by.key, row)?),
        };
        Ok(TableFacts {
            identity: TableIdentity {
                oid: *oid,
                relfilenode: *relfilenode,
            },
            estimated_rows,
            key_type: KeyType {
                name: name.clone(),
                category,
            },
            sweep_key_type,
        })
    }

    /// The sweep key's type from the catalog row (columns 5 to 7): a number, date or timestamp
    /// column that cannot be NULL (a row with a NULL key would be in no chunk's range).
    fn sweep_key_type(&self, column: &str, row: &[Cell]) -> Result<KeyType, CheckError> {
        let table = &self.def.table;
        let (Some(Cell::Text(name)), Some(Cell::Text(category)), Some(Cell::Bool(not_null))) =
            (row.get(5), row.get(6), row.get(7))
        else {
            return Err(CheckError::new(
                ErrorKind::Sql,
                format!("sweep_key {column:?} is not a column of {table}"),
            ));
        };
        let category = category.chars().next().unwrap_or('X');
        if category != 'N' && category != 'D' {
            return Err(CheckError::new(
                ErrorKind::Sql,
                format!(
                    "sweep_key {column:?} of {table} has type {name}: use a number, date or timestamp column"
                ),
            ));
        }
        if !not_null {
            return Err(CheckError::new(
                ErrorKind::Sql,
                format!(
                    "sweep_key {column:?} of {table} may be NULL, and a sweep over its range \
                     would never see those rows: use a NOT NULL column"
                ),
            ));
        }
        Ok(KeyType {
            name: name.clone(),
            category,
        })
    }

    /// The largest key and whether it is below `$1`, the watermark, for a key of type `ty`.
    fn max_key_sql(&self, ty: &str) -> String {
        let (key, table) = (self.key(), self.table());
        format!(
            "SELECT m::text, coalesce(m < $1::text::{ty}, false) \
             FROM (SELECT max({key}) AS m FROM {table}) s"
        )
    }

    /// The largest key now, and whether it is below `watermark`.
    async fn max_key(
        &self,
        key_type: &KeyType,
        watermark: Option<&str>,
    ) -> Result<(Option<String>, bool), CheckError> {
        let result = self
            .query(&self.max_key_sql(&key_type.name), &[watermark])
            .await?;
        Ok(parse_max_key(&result))
    }

    /// Counts the keys past the watermark, recounting the previous run's range.
    /// With `planned`, the periodic sweep's next chunk is counted in the same transaction when
    /// the increment is the usual small one: then that chunk, its count and how long the
    /// transaction took.
    async fn increment(
        &mut self,
        progress: &mut Progress,
        facts: &TableFacts,
        max_key: Option<String>,
        planned: Option<PlannedChunk>,
    ) -> Result<Option<(PlannedChunk, i64, Duration)>, CheckError> {
        let key_type = &facts.key_type;
        if let Some(small) = self
            .small_increment(progress, facts, &max_key, planned)
            .await?
        {
            progress.settle(small.settle, small.new_hi, small.new_count);
            return Ok(small.chunk);
        }
        let settle = match (&progress.settled_hi, &progress.pending_hi) {
            (settled, Some(pending)) if settled.as_ref() != Some(pending) => {
                self.scan_range(key_type, settled.as_deref(), pending)
                    .await?
            }
            _ => 0,
        };
        let (new_hi, new_count) = match &max_key {
            Some(max) if progress.pending_hi.as_ref() != Some(max) => {
                let count = self
                    .scan_range(key_type, progress.pending_hi.as_deref(), max)
                    .await?;
                (Some(max.clone()), count)
            }
            _ => (None, 0),
        };
        progress.settle(settle, new_hi, new_count);
        Ok(None)
    }

    /// The usual increment on an integer key, both ranges (the previous run's, to recount, and
    /// the new keys) spanning at most `sweep_max_rows` keys: both counted in one transaction,
    /// with no query for their bounds, and `planned`, the periodic sweep's next chunk, after
    /// them. `None` when it does not apply (then range by range).
    async fn small_increment(
        &mut self,
        progress: &Progress,
        facts: &TableFacts,
        max_key: &Option<String>,
        planned: Option<PlannedChunk>,
    ) -> Result<Option<SmallIncrement>, CheckError> {
        let key_type = &facts.key_type;
        if !key_type.integer() {
            return Ok(None);
        }
        let parse = |key: &Option<String>| key.as_deref().map(str::parse::<i64>);
        let (Some(Ok(settled)), Some(Ok(pending))) =
            (parse(&progress.settled_hi), parse(&progress.pending_hi))
        else {
            return Ok(None);
        };
        let max = match parse(max_key) {
            Some(Ok(max)) => max,
            None => pending,
            Some(Err(_)) => return Ok(None),
        };
        let span = |lo: i64, hi: i64| u64::try_from(i128::from(hi) - i128::from(lo)).unwrap_or(0);
        let (recount, new) = (span(settled, pending), span(pending, max));
        if recount > self.def.sweep.max_rows || new > self.def.sweep.max_rows {
            return Ok(None);
        }
        let ranges: Vec<(String, String)> = [(settled, pending), (pending, max)]
            .into_iter()
            .filter(|(lo, hi)| hi > lo)
            .map(|(lo, hi)| (lo.to_string(), hi.to_string()))
            .collect();
        let binds: Vec<Vec<Option<&str>>> = ranges
            .iter()
            .map(|(lo, hi)| {
                let mut bind = vec![Some(lo.as_str()), Some(hi.as_str())];
                bind.extend(self.spec.bind.iter().map(|b| Some(b.as_str())));
                bind
            })
            .collect();
        let mut queries: Vec<(&str, &[Option<&str>])> = binds
            .iter()
            .map(|bind| (self.spec.sql.as_str(), bind.as_slice()))
            .collect();
        let chunk_query = match (
            &planned,
            progress.sweep.as_ref().and_then(|s| s.hi.as_deref()),
        ) {
            (Some(chunk), Some(hi)) => Some((self.sweep_query(facts, hi).0, chunk)),
            _ => None,
        };
        let chunk_bind = chunk_query
            .as_ref()
            .map(|(query, chunk)| self.range_bind(query, &chunk.lower, &chunk.upper));
        if let (Some((query, _)), Some(bind)) = (&chunk_query, &chunk_bind) {
            queries.push((query.sql, bind.as_slice()));
        }
        let started = Instant::now();
        let counts = if queries.is_empty() {
            Vec::new()
        } else {
            query_read_only_many(
                self.context.pool,
                &queries,
                self.spec.timeout,
                self.spec.lock_timeout,
            )
            .await?
            .iter()
            .map(scalar_count)
            .collect::<Result<Vec<_>, _>>()?
        };
        let elapsed = started.elapsed();
        let chunk_count = if chunk_bind.is_some() {
            counts.last().copied()
        } else {
            None
        };
        let mut counts = counts.into_iter();
        let settle = if pending > settled {
            counts.next().unwrap_or(0)
        } else {
            0
        };
        let (new_hi, new_count) = if max > pending {
            (Some(max.to_string()), counts.next().unwrap_or(0))
        } else {
            (None, 0)
        };
        // Rows examined: the keys' span, which bounds the rows of a unique key.
        self.rows_examined += recount + new;
        Ok(Some(SmallIncrement {
            settle,
            new_hi,
            new_count,
            chunk: planned
                .zip(chunk_count)
                .map(|(chunk, count)| (chunk, count, elapsed)),
        }))
    }

    /// The periodic sweep's next chunk when its bounds need no query (an integer key, the
    /// sweep under way), as the sweep would take it now.
    fn planned_chunk(
        &self,
        progress: &Progress,
        facts: &TableFacts,
        now: f64,
    ) -> Option<PlannedChunk> {
        let sweep = progress.sweep.as_ref()?;
        if sweep.reason != SweepReason::Periodic {
            return None;
        }
        let hi = sweep.hi.as_deref()?;
        let lower = sweep.pos.as_ref()?;
        let (_, key_type) = self.sweep_query(facts, hi);
        let end = match &self.def.sweep_by {
            Some(_) => sweep.end.as_ref()?,
            None => sweep.hi.as_ref()?,
        };
        if !key_type.integer() {
            return None;
        }
        let limit = paced_rows(
            self.def,
            sweep,
            self.spec.interval,
            progress.rows_per_second,
            now,
        );
        let (upper, rows) = integer_chunk(
            lower.parse().ok()?,
            end.parse().ok()?,
            sweep.estimated_rows.saturating_sub(sweep.rows),
            limit,
        )?;
        let upper = upper.to_string();
        Some(PlannedChunk {
            started_at: sweep.started_at,
            finished: &upper == end,
            lower: lower.clone(),
            upper,
            rows,
        })
    }

    /// Records a chunk counted with the increment, if the sweep it belongs to is still the one
    /// under way (an early sweep started by the statistics replaces it); whether it did.
    fn take_prefetched(
        &mut self,
        progress: &mut Progress,
        chunk: PlannedChunk,
        count: i64,
        elapsed: Duration,
    ) -> bool {
        let current = progress.sweep.as_ref().is_some_and(|s| {
            s.reason == SweepReason::Periodic
                && s.started_at == chunk.started_at
                && s.pos.as_deref() == Some(chunk.lower.as_str())
        });
        if !current {
            return false;
        }
        self.rows_examined += chunk.rows;
        let completed = progress.chunk_done(
            Some(chunk.upper),
            chunk.rows,
            count,
            chunk.finished,
            elapsed,
            self.context.clock.now(),
        );
        if completed {
            tracing::debug!(
                db_target = %self.context.target, check = %self.spec.name,
                reason = SweepReason::Periodic.as_str(), "sweep complete"
            );
        }
        true
    }

    /// Violations among the keys in `(lo, hi]`, chunk by chunk.
    async fn scan_range(
        &mut self,
        key_type: &KeyType,
        lo: Option<&str>,
        hi: &str,
    ) -> Result<i64, CheckError> {
        let query = self.increment_query();
        let mut lower = match lo {
            Some(lo) => lo.to_string(),
            None => match self.key_range(&query, key_type).await? {
                Some((lower, _)) => lower,
                None => return Ok(0),
            },
        };
        let mut total = 0;
        loop {
            let chunk = self
                .chunk(&query, key_type, &lower, hi, self.def.sweep.max_rows)
                .await?;
            total += chunk.count;
            match chunk.upper {
                Some(upper) if !chunk.finished => lower = upper,
                _ => return Ok(total),
            }
        }
    }

    /// The query of a sweep chunk and its key's type: over the sweep key with the sweep's
    /// bound `hi` when the check declares one, else the check's own.
    fn sweep_query<'q>(&self, facts: &'q TableFacts, hi: &'q str) -> (RangeQuery<'q>, &'q KeyType)
    where
        'c: 'q,
    {
        let def: &'c IncrementalDef = self.def;
        match (&def.sweep_by, &facts.sweep_key_type) {
            (Some(by), Some(ty)) => (
                RangeQuery {
                    column: &by.key,
                    sql: &by.sql,
                    bound: Some(hi),
                },
                ty,
            ),
            _ => (self.increment_query(), &facts.key_type),
        }
    }

    /// The parameters of `query` over `(lower, upper]`: the range, the sweep's bound if any,
    /// then the check's parameters.
    fn range_bind<'q>(
        &'q self,
        query: &RangeQuery<'q>,
        lower: &'q str,
        upper: &'q str,
    ) -> Vec<Option<&'q str>> {
        let mut bind: Vec<Option<&str>> = vec![Some(lower), Some(upper)];
        if let Some(bound) = query.bound {
            bind.push(Some(bound));
        }
        bind.extend(self.spec.bind.iter().map(|b| Some(b.as_str())));
        bind
    }

    /// The check's own query over its incremental key.
    fn increment_query(&self) -> RangeQuery<'c> {
        RangeQuery {
            column: &self.def.key,
            sql: &self.spec.sql,
            bound: None,
        }
    }

    /// A value just below the smallest key of `query`'s column (the exclusive lower bound of a
    /// full range) and the largest, or `None` for an empty table.
    async fn key_range(
        &self,
        query: &RangeQuery<'_>,
        key_type: &KeyType,
    ) -> Result<Option<(String, String)>, CheckError> {
        let step = if key_type.category == 'N' {
            "- 1"
        } else {
            "- interval '1 microsecond'"
        };
        let key = quote_identifier(query.column);
        let sql = format!(
            "SELECT (min({key}) {step})::text, max({key})::text FROM {}",
            self.table()
        );
        let result = self.query(&sql, &[]).await?;
        let row = result.rows.first();
        Ok(
            match (row.and_then(|r| r.first()), row.and_then(|r| r.get(1))) {
                (Some(Cell::Text(lower)), Some(Cell::Text(upper))) => {
                    Some((lower.clone(), upper.clone()))
                }
                _ => None,
            },
        )
    }

    /// One keyset chunk `(lower, upper]` of `query`'s column, of at most `limit` rows, `upper
    /// <= hi`: its bound, its row count and the check's count over it.
    async fn chunk(
        &mut self,
        query: &RangeQuery<'_>,
        key_type: &KeyType,
        lower: &str,
        hi: &str,
        limit: u64,
    ) -> Result<Chunk, CheckError> {
        let (key, table, ty) = (quote_identifier(query.column), self.table(), &key_type.name);
        let sql = format!(
            "SELECT max(k)::text, count(*)::bigint FROM ( \
                 SELECT {key} AS k FROM {table} \
                 WHERE {key} > $1::text::{ty} AND {key} <= $2::text::{ty} \
                 ORDER BY {key} LIMIT $3::text::bigint) c"
        );
        let limit_text = limit.to_string();
        let bounds = self
            .query(&sql, &[Some(lower), Some(hi), Some(&limit_text)])
            .await?;
        let row = bounds.rows.first();
        let upper = match row.and_then(|r| r.first()) {
            Some(Cell::Text(t)) => t.clone(),
            _ => {
                return Ok(Chunk {
                    upper: None,
                    rows: 0,
                    count: 0,
                    finished: true,
                })
            }
        };
        let rows = match row.and_then(|r| r.get(1)) {
            Some(Cell::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        let finished = rows < limit || upper == hi;
        self.counted_chunk(query, lower, &upper, rows, finished)
            .await
    }

    /// A chunk `(lower, upper]` of `query`'s column whose bound is known: the check's count
    /// over it, `rows` as read or estimated.
    async fn counted_chunk(
        &mut self,
        query: &RangeQuery<'_>,
        lower: &str,
        upper: &str,
        rows: u64,
        finished: bool,
    ) -> Result<Chunk, CheckError> {
        let bind = self.range_bind(query, lower, upper);
        let result = self.query(query.sql, &bind).await?;
        let count = scalar_count(&result)?;
        self.rows_examined += rows;
        Ok(Chunk {
            upper: Some(upper.to_string()),
            rows,
            count,
            finished,
        })
    }

    /// Works on the current sweep: every chunk up to the bound for an urgent sweep (within
    /// about one interval), one paced chunk for a periodic one. With a sweep key
    /// ([`SweepBy`](crate::checks::incremental::SweepBy)) the chunks are ranges of that key,
    /// from its smallest to its largest value when the sweep began, and its query counts in each
    /// only the rows whose incremental key is at most the sweep's bound.
    async fn sweep(
        &mut self,
        progress: &mut Progress,
        facts: &TableFacts,
        fingerprint: &str,
    ) -> Result<(), CheckError> {
        let started = Instant::now();
        let urgent_budget = self.spec.interval.max(self.def.sweep.max_time);
        let before = progress.value();
        loop {
            let Some(sweep) = progress.sweep.clone() else {
                return Ok(());
            };
            let urgent = sweep.reason.urgent();
            let now = self.context.clock.now();
            let Some(hi) = sweep.hi.clone() else {
                progress.chunk_done(None, 0, 0, true, Duration::ZERO, now);
                self.save(fingerprint, progress).await;
                return Ok(());
            };
            let (query, key_type) = self.sweep_query(facts, &hi);
            // The range left: `(lower, end]`.
            let range = if self.def.sweep_by.is_some() {
                match (&sweep.pos, &sweep.end) {
                    (Some(pos), Some(end)) => Some((pos.clone(), end.clone())),
                    (pos, _) => {
                        let range = self.key_range(&query, key_type).await?;
                        if let (Some((_, end)), Some(current)) = (&range, progress.sweep.as_mut()) {
                            current.end = Some(end.clone());
                        }
                        range.map(|(lower, end)| (pos.clone().unwrap_or(lower), end))
                    }
                }
            } else {
                match &sweep.pos {
                    Some(pos) => Some((pos.clone(), hi.clone())),
                    None => self
                        .key_range(&query, key_type)
                        .await?
                        .map(|(lower, _)| (lower, hi.clone())),
                }
            };
            let Some((lower, end)) = range else {
                progress.chunk_done(None, 0, 0, true, Duration::ZERO, now);
                self.save(fingerprint, progress).await;
                return Ok(());
            };
            let limit = if urgent {
                // As many rows as the budget allows, but a chunk stays well within the
                // statement timeout, or it would fail at every run.
                let by_time = match progress.rows_per_second {
                    Some(speed) if speed > 0.0 => {
                        (speed * self.spec.timeout.as_secs_f64() / 2.0) as u64
                    }
                    _ => u64::MAX,
                };
                self.def
                    .sweep
                    .max_rows
                    .min(by_time)
                    .max(MIN_CHUNK_ROWS.min(self.def.sweep.max_rows))
            } else {
                paced_rows(
                    self.def,
                    &sweep,
                    self.spec.interval,
                    progress.rows_per_second,
                    now,
                )
            };
            let chunk_started = Instant::now();
            let computed = match (lower.parse::<i64>(), end.parse::<i64>()) {
                (Ok(from), Ok(to)) if key_type.integer() => integer_chunk(
                    from,
                    to,
                    sweep.estimated_rows.saturating_sub(sweep.rows),
                    limit,
                ),
                _ => None,
            };
            let chunk = match computed {
                Some((upper, rows)) => {
                    let upper = upper.to_string();
                    let finished = upper == end;
                    self.counted_chunk(&query, &lower, &upper, rows, finished)
                        .await?
                }
                None => self.chunk(&query, key_type, &lower, &end, limit).await?,
            };
            let completed = progress.chunk_done(
                chunk.upper,
                chunk.rows,
                chunk.count,
                chunk.finished,
                chunk_started.elapsed(),
                self.context.clock.now(),
            );
            self.save(fingerprint, progress).await;
            if completed {
                tracing::debug!(
                    db_target = %self.context.target, check = %self.spec.name,
                    reason = sweep.reason.as_str(), rows = sweep.rows + chunk.rows,
                    "sweep complete"
                );
                return Ok(());
            }
            if !urgent || started.elapsed() >= urgent_budget {
                return Ok(());
            }
            // The sweep raised the value (a deleted parent's orphans): export it now, not
            // after the rest of the table; the next run goes on from here.
            if progress.end_run_to_report(before) {
                self.save(fingerprint, progress).await;
                tracing::info!(
                    db_target = %self.context.target, check = %self.spec.name,
                    reason = sweep.reason.as_str(), value = ?progress.value(),
                    "sweep found more violations; reporting them before the sweep completes"
                );
                return Ok(());
            }
        }
    }

    fn key(&self) -> String {
        quote_identifier(&self.def.key)
    }

    fn table(&self) -> String {
        quote_qualified(&self.def.table)
    }
}

/// The table's identity, the planner's row estimate, the key's type and the sweep key's type
/// and whether it is NOT NULL: `$1` the table, `$2` the key column, `$3` the sweep key (NULL
/// for none).
const FACTS_SQL: &str =
    "SELECT c.oid::bigint, c.relfilenode::bigint, greatest(c.reltuples, 0)::float8, \
            format_type(a.atttypid, a.atttypmod), t.typcategory::text, \
            format_type(b.atttypid, b.atttypmod), u.typcategory::text, b.attnotnull \
     FROM pg_class c \
     LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $2 \
          AND a.attnum > 0 AND NOT a.attisdropped \
     LEFT JOIN pg_type t ON t.oid = a.atttypid \
     LEFT JOIN pg_attribute b ON b.attrelid = c.oid AND b.attname = $3 \
          AND b.attnum > 0 AND NOT b.attisdropped \
     LEFT JOIN pg_type u ON u.oid = b.atttypid \
     WHERE c.oid = $1::regclass";

/// `n_tup_upd` and `n_tup_del` of the tables in `$1`, an array literal of names.
const COUNTERS_SQL: &str =
    "SELECT r.name, coalesce(s.n_tup_upd, 0)::bigint, coalesce(s.n_tup_del, 0)::bigint \
     FROM unnest($1::text::text[]) AS r(name) \
     JOIN pg_stat_user_tables s ON s.relid = r.name::regclass";

/// The largest key (as text) and whether it is below the watermark.
fn parse_max_key(result: &ResultTable) -> (Option<String>, bool) {
    let row = result.rows.first();
    let max = match row.and_then(|r| r.first()) {
        Some(Cell::Text(t)) => Some(t.clone()),
        _ => None,
    };
    let backwards = matches!(row.and_then(|r| r.get(1)), Some(Cell::Bool(true)));
    (max, backwards)
}

/// `n_tup_upd` and `n_tup_del` of `tables` (names as the pack spells them).
async fn read_counters(
    pool: &TargetPool,
    tables: &[String],
    timeout: Duration,
    lock_timeout: Duration,
) -> Result<BTreeMap<String, TableCounters>, CheckError> {
    let list = format!("{{{}}}", tables.join(","));
    let result =
        query_read_only_opt(pool, COUNTERS_SQL, &[Some(&list)], timeout, lock_timeout).await?;
    Ok(parse_counters(&result))
}

fn parse_counters(result: &ResultTable) -> BTreeMap<String, TableCounters> {
    let mut counters = BTreeMap::new();
    for row in &result.rows {
        if let (Some(Cell::Text(name)), Some(Cell::Int(upd)), Some(Cell::Int(del))) =
            (row.first(), row.get(1), row.get(2))
        {
            counters.insert(
                name.clone(),
                TableCounters {
                    n_tup_upd: *upd,
                    n_tup_del: *del,
                },
            );
        }
    }
    counters
}

/// An incremental check whose tables' statistics are watched between its runs, and where to
/// ask it to run at once.
pub(crate) struct Watched {
    pub(crate) spec: Arc<CheckSpec>,
    pub(crate) wake: mpsc::Sender<()>,
}

/// Reads the write counters (`pg_stat_user_tables`) of the watched checks' tables every
/// `every`, one short query on the target's pool, and asks a check to run at once when they
/// changed the way that starts its early sweep (deletes on a parent, updates of its table,
/// counters reset; a repair, deletes on its own table, waits for the next run): a parent's delete is then found within `every` plus the
/// sweep up to its orphans, instead of waiting for the next interval. The run itself reads the
/// counters again and decides; the watch only decides when it runs. Stops when `cancel` fires.
pub(crate) async fn watch_statistics(
    target: String,
    pool: TargetPool,
    checks: Vec<Watched>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tables: Vec<String> = Vec::new();
    for check in &checks {
        if let Some(def) = &check.spec.incremental {
            for table in std::iter::once(&def.table).chain(&def.parents) {
                if !tables.contains(table) {
                    tables.push(table.clone());
                }
            }
        }
    }
    let timeout = every.clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<BTreeMap<String, TableCounters>> = None;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let now = match read_counters(&pool, &tables, timeout, timeout).await {
            Ok(now) => now,
            Err(error) => {
                // The checks' own runs report what is wrong with the target.
                tracing::debug!(db_target = %target, %error, "cannot read table statistics");
                continue;
            }
        };
        if let Some(before) = &last {
            for check in &checks {
                let Some(def) = &check.spec.incremental else {
                    continue;
                };
                if let Some(why) = early_sweep_reason(def, before, &now, false) {
                    tracing::debug!(
                        db_target = %target, check = %check.spec.name, %why,
                        "table statistics changed; running the check now"
                    );
                    // Full: a wake-up is already waiting.
                    let _ = check.wake.try_send(());
                }
            }
        }
        last = Some(now);
    }
}

/// The periodic sweep's next chunk `(lower, upper]`, planned before the run's increment and
/// counted in its transaction.
struct PlannedChunk {
    /// Which sweep it belongs to.
    started_at: f64,
    lower: String,
    upper: String,
    rows: u64,
    finished: bool,
}

/// What the usual small increment found, and the sweep chunk counted with it.
struct SmallIncrement {
    settle: i64,
    new_hi: Option<String>,
    new_count: i64,
    chunk: Option<(PlannedChunk, i64, Duration)>,
}

/// A query over a range `($1, $2]` of a column: the check's own over its incremental key, or a
/// sweep's over its sweep key with the sweep's bound on the incremental key as `$3`.
struct RangeQuery<'q> {
    column: &'q str,
    sql: &'q str,
    bound: Option<&'q str>,
}

struct Chunk {
    upper: Option<String>,
    rows: u64,
    count: i64,
    finished: bool,
}

/// A chunk's result: one row, one integral number.
fn scalar_count(table: &ResultTable) -> Result<i64, CheckError> {
    if table.rows.is_empty() {
        return Err(CheckError::new(
            ErrorKind::NoRows,
            "the query returned no rows",
        ));
    }
    if table.rows.len() > 1 || table.columns.len() != 1 {
        return Err(CheckError::new(
            ErrorKind::TooManyRows,
            "an incremental check returns one row with one count",
        ));
    }
    match table.rows[0].first() {
        Some(Cell::Int(n)) => Ok(*n),
        Some(Cell::Float(f)) if f.fract() == 0.0 => Ok(*f as i64),
        Some(Cell::Numeric(n)) if n.to_f64().fract() == 0.0 => Ok(n.to_f64() as i64),
        Some(Cell::Null) => Err(CheckError::new(ErrorKind::NullValue, "the count is NULL")),
        _ => Err(CheckError::new(
            ErrorKind::NotNumeric,
            "an incremental check returns a whole number (a count)",
        )),
    }
}

/// What the stored progress was computed with: a changed query, key or parameter starts over.
fn fingerprint(spec: &CheckSpec, def: &IncrementalDef) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [spec.sql.as_str(), def.table.as_str(), def.key.as_str()] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    for value in &spec.bind {
        hash.update(value.as_bytes());
        hash.update([0]);
    }
    // Only when declared, so that the progress of a check without one stays valid.
    if let Some(by) = &def.sweep_by {
        for part in ["sweep_by", by.key.as_str(), by.sql.as_str()] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table` or `table`, each part quoted.
fn quote_qualified(name: &str) -> String {
    name.split('.')
        .map(quote_identifier)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_part_by_part() {
        assert_eq!(
            quote_qualified("public.submissions"),
            "\"public\".\"submissions\""
        );
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn a_chunk_count_is_one_whole_number() {
        let table = |cells: Vec<Vec<Cell>>| ResultTable {
            columns: vec!["count".into()],
            rows: cells,
        };
        assert_eq!(scalar_count(&table(vec![vec![Cell::Int(4)]])).ok(), Some(4));
        assert_eq!(
            scalar_count(&table(vec![])).map_err(|e| e.kind).err(),
            Some(ErrorKind::NoRows)
        );
        assert_eq!(
            scalar_count(&table(vec![vec![Cell::Float(0.5)]]))
                .map_err(|e| e.kind)
                .err(),
            Some(ErrorKind::NotNumeric)
        );
    }
}

//! Incremental checks: the bookkeeping that makes an integrity check's cost follow what changed
//! instead of the table's size. Pure: values in (what the database said, "now"), values out;
//! the queries live in the incremental runner and the persistence in the store.
//!
//! A check names a monotonic key of the table it reads (`submission_id`, a `created_at`) and
//! takes a key range as `$1` (exclusive lower bound) and `$2` (inclusive upper bound). Its
//! running count is made of three parts:
//!
//! - `base`: the count of the last complete sweep, which covered every key up to its `hi`;
//! - `settled`: what the increments found past the base, up to `settled_hi`;
//! - `pending`: the newest range `(settled_hi, pending_hi]`, counted once and counted again on the
//!   next run (then settled), so a row whose transaction commits after a later key was already
//!   seen is still found by the next increment.
//!
//! The exported value is `base + settled + pending`. A sweep re-reads every key up to a bound
//! fixed when it started, chunk by chunk, and on completion replaces the base: violations that
//! an increment cannot see (a deleted parent, an UPDATE of an old row) are found by it. While a
//! sweep is under way and has already found more than the base, its count is reported at once.

use crate::labels::label_enum;
use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Defaults for a check that does not set its own sweep budget.
pub(crate) const DEFAULT_SWEEP_PERIOD: Duration = Duration::from_secs(86_400);
/// Large: the measured speed and `sweep_max_time` (a periodic sweep) or half the check's timeout
/// (an urgent one) size most chunks; a few large chunks of a first or early sweep let the
/// planner hash-join them, where small ones each pay for building the hash again.
pub(crate) const DEFAULT_SWEEP_MAX_ROWS: u64 = 10_000_000;
pub(crate) const DEFAULT_SWEEP_MAX_TIME: Duration = Duration::from_secs(5);
/// A paced chunk never drops below this many rows, so a sweep always moves.
pub(crate) const MIN_CHUNK_ROWS: u64 = 1_000;
/// A periodic sweep aims to finish within this share of its period, leaving the rest as margin
/// before the "sweep overdue" alert (a sweep starts when the previous one ends, so the last
/// complete sweep is at most about this share of the period, plus one interval, old). On an
/// integer key a chunk covers its share of the key range left, so the sweep ends on schedule
/// however the rows spread over the keys; a sweep that fell behind (runs skipped, the daemon
/// down) catches up by larger chunks, and the margin covers what the row and time caps leave
/// of that catch-up.
const PACE_SHARE: f64 = 0.9;

/// What a pack declares for an incremental check.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IncrementalDef {
    /// The table holding the key (`submissions` or `public.submissions`).
    pub(crate) table: String,
    /// The monotonic key column: an integer, numeric, date or timestamp column with a btree
    /// index (the primary key, a `created_at` index).
    pub(crate) key: String,
    /// Tables whose deleted rows can turn rows of `table` into violations (an orphan check's
    /// parent): deletes there start an early sweep.
    pub(crate) parents: Vec<String>,
    /// Whether statistics may start a sweep early.
    pub(crate) early_sweep: bool,
    /// The check's sweep period, row cap and time budget.
    pub(crate) sweep: SweepBudget,
    /// Sweep over another column's range than `key`, with a query of its own (an orphan check
    /// sweeping its parent key, so a chunk is a merge of two ordered index ranges instead of an
    /// index probe per row); `None`: sweep over `key` with the check's query.
    pub(crate) sweep_by: Option<SweepBy>,
}

/// A sweep's own key and query: `sql` counts the violating rows whose `key` is in `($1, $2]`
/// and whose incremental key is at most `$3` (the rows the sweep re-counts; later ones are the
/// increments'), the check's parameters from `$4` on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SweepBy {
    /// A NOT NULL column of the checked table with a btree index.
    pub(crate) key: String,
    pub(crate) sql: String,
}

/// How fast an incremental check sweeps its table: the defaults' (`[defaults]`) and each
/// check's own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SweepBudget {
    /// Every sweep completes within this period.
    pub(crate) period: Duration,
    /// At most this many rows per chunk (one query), and per run for a periodic sweep.
    pub(crate) max_rows: u64,
    /// A periodic sweep's chunk is sized to take at most about this long.
    pub(crate) max_time: Duration,
}

impl Default for SweepBudget {
    fn default() -> SweepBudget {
        SweepBudget {
            period: DEFAULT_SWEEP_PERIOD,
            max_rows: DEFAULT_SWEEP_MAX_ROWS,
            max_time: DEFAULT_SWEEP_MAX_TIME,
        }
    }
}

label_enum! {
    /// Why a sweep runs.
    pub enum SweepReason {
        /// No count yet: the first run.
        Initial,
        /// The table was truncated, restored or replaced, or its key went backwards.
        Reset,
        /// The statistics showed deletes on a parent or updates on the checked table.
        Early,
        /// The regular sweep, paced over its period.
        Periodic,
    }
}

impl SweepReason {
    /// Urgent sweeps run chunk after chunk within a run instead of at the period's pace: the
    /// count is unknown (initial, reset) or likely wrong (early) until they finish.
    pub(crate) fn urgent(self) -> bool {
        !matches!(self, SweepReason::Periodic)
    }
}

/// Which physical table the counts belong to: a TRUNCATE, `VACUUM FULL` or a restore changes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableIdentity {
    pub(crate) oid: i64,
    pub(crate) relfilenode: i64,
}

/// Cumulative write counters of one table (`pg_stat_user_tables`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCounters {
    pub(crate) n_tup_upd: i64,
    pub(crate) n_tup_del: i64,
}

/// A sweep under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    pub reason: SweepReason,
    /// Every key up to and including this one is swept; `None`: the table was empty.
    pub(crate) hi: Option<String>,
    /// Exclusive lower bound of the next chunk; `None`: from the smallest key. In the sweep
    /// key when the check declares one ([`SweepBy`]).
    pub(crate) pos: Option<String>,
    /// With a sweep key: its largest value when the sweep began, the last chunk's upper bound
    /// (`None` until the first chunk reads it).
    #[serde(default)]
    pub(crate) end: Option<String>,
    pub(crate) count: i64,
    pub rows: u64,
    pub started_at: f64,
    /// `settled_count` when the sweep started: the part of it the sweep re-counts.
    pub(crate) settled_at_start: i64,
    /// The planner's row estimate of the table when the sweep started (for progress and pace).
    pub(crate) estimated_rows: u64,
    /// A run already ended early to export what this (urgent) sweep found (at most once per
    /// sweep, so that the sweep still completes within a few runs).
    #[serde(default)]
    pub(crate) reported_early: bool,
}

/// Everything kept per (target, check) between runs and across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub identity: Option<TableIdentity>,
    /// Count of the last complete sweep; `None` until the first one completes.
    pub base_count: Option<i64>,
    pub settled_hi: Option<String>,
    pub settled_count: i64,
    pub pending_hi: Option<String>,
    pub pending_count: i64,
    pub sweep: Option<Sweep>,
    /// Counters of the checked table and its parents when the current (or last) sweep started.
    pub counters: BTreeMap<String, TableCounters>,
    pub last_complete_at: Option<f64>,
    /// Rows per second of the last sweep chunk, to size the next one to the time budget.
    pub rows_per_second: Option<f64>,
    /// The key's type as the catalog spelled it last time, so the next run can ask for the
    /// largest key together with the table's facts instead of after them.
    #[serde(default)]
    pub key_type: Option<String>,
}

/// What a run did, for metrics and `/status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IncrementalReport {
    /// Rows of the checked table this run's queries covered (increments and sweep chunks).
    pub rows_examined: u64,
    /// Share of the current sweep done (1 when none is running).
    pub sweep_progress: f64,
    /// Why the current sweep runs, if one does.
    pub sweep_reason: Option<SweepReason>,
    pub last_complete_sweep: Option<f64>,
    pub(crate) sweep_period: Duration,
    /// A reset was detected in this run.
    pub reset: bool,
}

impl Progress {
    /// The running total, `None` before the first complete sweep.
    pub fn value(&self) -> Option<i64> {
        let base = self.base_count?;
        let known = base + self.settled_count + self.pending_count;
        Some(match &self.sweep {
            Some(sweep) => {
                let seen = sweep.count
                    + (self.settled_count - sweep.settled_at_start)
                    + self.pending_count;
                known.max(seen)
            }
            None => known,
        })
    }

    /// Forgets every count (a reset) and starts a full sweep up to `hi`.
    pub(crate) fn reset(
        &mut self,
        identity: TableIdentity,
        hi: Option<String>,
        reason: SweepReason,
        counters: BTreeMap<String, TableCounters>,
        estimated_rows: u64,
        now: f64,
    ) {
        let last_complete_at = self.last_complete_at;
        let key_type = self.key_type.take();
        *self = Progress {
            identity: Some(identity),
            settled_hi: hi.clone(),
            pending_hi: hi,
            last_complete_at,
            key_type,
            ..Progress::default()
        };
        self.start_sweep(reason, counters, estimated_rows, now);
    }

    /// Starts (or restarts) a sweep of every key up to `settled_hi`. Keys past it are pending
    /// and the next increment settles them.
    pub(crate) fn start_sweep(
        &mut self,
        reason: SweepReason,
        counters: BTreeMap<String, TableCounters>,
        estimated_rows: u64,
        now: f64,
    ) {
        self.counters = counters;
        self.sweep = Some(Sweep {
            reason,
            hi: self.settled_hi.clone(),
            pos: None,
            end: None,
            count: 0,
            rows: 0,
            started_at: now,
            settled_at_start: self.settled_count,
            estimated_rows,
            reported_early: false,
        });
    }

    /// Starts the sweep this run calls for, after the increment: an early one when the
    /// statistics show a change since the current (or last) sweep started ([`early_sweep_reason`]),
    /// else a periodic one when none is under way. An urgent sweep under way (first, reset,
    /// early) is never restarted: it runs to its end, and changes made meanwhile start the next
    /// one then, so sweeps complete even while a parent sees deletes at every run. Returns why
    /// an early sweep started.
    pub(crate) fn plan_sweep(
        &mut self,
        def: &IncrementalDef,
        counters: BTreeMap<String, TableCounters>,
        estimated_rows: u64,
        now: f64,
    ) -> Option<String> {
        if self.sweep.as_ref().is_some_and(|s| s.reason.urgent()) {
            return None;
        }
        let above_zero = self.value().unwrap_or(0) > 0;
        let early = if def.early_sweep {
            early_sweep_reason(def, &self.counters, &counters, above_zero)
        } else {
            None
        };
        if early.is_some() {
            self.start_sweep(SweepReason::Early, counters, estimated_rows, now);
        } else if self.sweep.is_none() {
            self.start_sweep(SweepReason::Periodic, counters, estimated_rows, now);
        }
        early
    }

    /// Records an increment: `settle_count` violations in `(settled_hi, pending_hi]` (the range
    /// counted last time, now counted for good) and `new_count` in `(pending_hi, new_hi]`.
    pub(crate) fn settle(&mut self, settle_count: i64, new_hi: Option<String>, new_count: i64) {
        self.settled_count += settle_count;
        self.settled_hi = self.pending_hi.take();
        self.pending_hi = new_hi.or_else(|| self.settled_hi.clone());
        self.pending_count = new_count;
    }

    /// Records one swept chunk `(pos, chunk_hi]` with `rows` rows and `count` violations;
    /// `finished` when it reached the sweep's bound. Returns true when the sweep completed.
    pub(crate) fn chunk_done(
        &mut self,
        chunk_hi: Option<String>,
        rows: u64,
        count: i64,
        finished: bool,
        elapsed: Duration,
        now: f64,
    ) -> bool {
        let Some(sweep) = self.sweep.as_mut() else {
            return false;
        };
        sweep.count += count;
        sweep.rows += rows;
        if chunk_hi.is_some() {
            sweep.pos = chunk_hi;
        }
        if rows >= MIN_CHUNK_ROWS && elapsed > Duration::ZERO {
            self.rows_per_second = Some(rows as f64 / elapsed.as_secs_f64());
        }
        if !finished {
            return false;
        }
        let sweep = self.sweep.take().expect("checked above");
        self.base_count = Some(sweep.count);
        self.settled_count -= sweep.settled_at_start;
        self.last_complete_at = Some(now);
        true
    }

    /// After a chunk of an urgent sweep: whether the run should end now, before the sweep
    /// completes, to export the value the sweep has raised above `before` (the value when the
    /// run began its sweep work). Once per sweep: the rest of the sweep runs chunk after chunk
    /// in the next runs. Never before the first complete sweep (no value to raise yet), never
    /// for a periodic sweep (one chunk per run anyway). The value exported early counts only
    /// rows found violating, so it is below or at the complete sweep's count, never above.
    pub(crate) fn end_run_to_report(&mut self, before: Option<i64>) -> bool {
        let value = self.value();
        let Some(sweep) = self.sweep.as_mut() else {
            return false;
        };
        if sweep.reported_early || !sweep.reason.urgent() {
            return false;
        }
        match (before, value) {
            (Some(before), Some(value)) if value > before => {
                sweep.reported_early = true;
                true
            }
            _ => false,
        }
    }

    /// Share of the current sweep done, by rows against the planner's estimate.
    pub(crate) fn sweep_progress(&self) -> f64 {
        match &self.sweep {
            None => 1.0,
            Some(sweep) if sweep.estimated_rows == 0 => 0.0,
            Some(sweep) => (sweep.rows as f64 / sweep.estimated_rows as f64).min(0.99),
        }
    }
}

/// Why the statistics call for an early sweep, comparing the counters at the last sweep's start
/// (`before`) with now. `None` when nothing that could create (or clear) a violation happened.
///
/// - deletes on a parent table can orphan old rows of the checked table;
/// - updates on the checked table can break an old row;
/// - deletes on the checked table only matter while the count is above 0 (a repair);
/// - counters that went backwards (statistics reset, failover) hide what happened, so they
///   count as a change.
pub(crate) fn early_sweep_reason(
    def: &IncrementalDef,
    before: &BTreeMap<String, TableCounters>,
    now: &BTreeMap<String, TableCounters>,
    count_above_zero: bool,
) -> Option<String> {
    let changed = |table: &str| -> Option<(i64, i64)> {
        let old = before.get(table)?;
        let new = now.get(table)?;
        Some((new.n_tup_upd - old.n_tup_upd, new.n_tup_del - old.n_tup_del))
    };
    for parent in &def.parents {
        match changed(parent) {
            Some((_, deleted)) if deleted > 0 => {
                return Some(format!("{deleted} rows deleted from {parent}"))
            }
            Some((updated, deleted)) if updated < 0 || deleted < 0 => {
                return Some(format!("statistics of {parent} were reset"))
            }
            _ => {}
        }
    }
    match changed(&def.table) {
        Some((updated, _)) if updated > 0 => {
            Some(format!("{updated} rows updated in {}", def.table))
        }
        Some((_, deleted)) if deleted > 0 && count_above_zero => {
            Some(format!("{deleted} rows deleted from {}", def.table))
        }
        Some((updated, deleted)) if updated < 0 || deleted < 0 => {
            Some(format!("statistics of {} were reset", def.table))
        }
        _ => None,
    }
}

/// Rows the next chunk of a periodic sweep takes: the steady pace that finishes within
/// `PACE_SHARE` of the period at this check's interval, more when the sweep is behind that
/// schedule (runs were skipped, the daemon was down), never more than `sweep_max_rows`, and no
/// more than the measured speed allows within `sweep_max_time`.
pub(crate) fn paced_rows(
    def: &IncrementalDef,
    sweep: &Sweep,
    interval: Duration,
    rows_per_second: Option<f64>,
    now: f64,
) -> u64 {
    let span = (def.sweep.period.as_secs_f64() * PACE_SHARE).max(0.001);
    let estimate = sweep.estimated_rows as f64;
    let steady = (estimate * interval.as_secs_f64() / span).ceil() as u64;
    let due = (estimate * ((now - sweep.started_at) / span).clamp(0.0, 1.0)) as u64;
    let behind = due.saturating_sub(sweep.rows);
    let by_time = match rows_per_second {
        Some(speed) if speed > 0.0 => (speed * def.sweep.max_time.as_secs_f64()) as u64,
        _ => u64::MAX,
    };
    steady
        .max(behind)
        .min(def.sweep.max_rows)
        .min(by_time)
        .max(MIN_CHUNK_ROWS.min(def.sweep.max_rows))
}

/// The upper bound of a sweep chunk of about `rows` rows over an integer key, from the key
/// range left, `(lower, hi]`, and the rows the planner's estimate leaves in it: `Some((upper,
/// rows))` with `upper <= hi`, so that the chunk needs no query to find its bound (reading the
/// keys of a chunk through the index costs more than most checks themselves). `None` when the
/// estimate says nothing (no statistics yet, or it is used up): the bound is then read.
///
/// The count stays exact (the check counts every key of `(lower, upper]`); only the chunk's
/// size is estimated, and the time it took feeds the next chunk's size.
pub(crate) fn integer_chunk(lower: i64, hi: i64, rows_left: u64, rows: u64) -> Option<(i64, u64)> {
    if hi <= lower || rows_left == 0 || rows == 0 {
        return None;
    }
    if rows >= rows_left {
        return Some((hi, rows_left));
    }
    let span = (i128::from(hi) - i128::from(lower)) as f64;
    let step = (span * rows as f64 / rows_left as f64).ceil().max(1.0) as i128;
    let upper = (i128::from(lower) + step).min(i128::from(hi)) as i64;
    Some((upper, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> IncrementalDef {
        IncrementalDef {
            table: "submissions".into(),
            key: "submission_id".into(),
            parents: vec!["participants".into()],
            early_sweep: true,
            sweep: SweepBudget::default(),
            sweep_by: None,
        }
    }

    fn identity() -> TableIdentity {
        TableIdentity {
            oid: 1,
            relfilenode: 1,
        }
    }

    fn counters(pairs: &[(&str, i64, i64)]) -> BTreeMap<String, TableCounters> {
        pairs
            .iter()
            .map(|(t, upd, del)| {
                (
                    t.to_string(),
                    TableCounters {
                        n_tup_upd: *upd,
                        n_tup_del: *del,
                    },
                )
            })
            .collect()
    }

    fn key(k: i64) -> Option<String> {
        Some(k.to_string())
    }

    /// Progress whose initial sweep of about 100 rows, up to key 100, has just started.
    fn started() -> Progress {
        let mut p = Progress::default();
        p.reset(
            identity(),
            key(100),
            SweepReason::Initial,
            BTreeMap::new(),
            100,
            0.0,
        );
        p
    }

    #[test]
    fn no_value_until_the_first_sweep_completes() {
        let mut p = started();
        assert_eq!(p.value(), None);
        assert!(!p.chunk_done(key(50), 50, 2, false, Duration::ZERO, 1.0));
        assert_eq!(p.value(), None);
        assert!(p.chunk_done(key(100), 50, 1, true, Duration::ZERO, 2.0));
        assert_eq!(p.value(), Some(3));
        assert_eq!(p.last_complete_at, Some(2.0));
        assert_eq!(p.sweep_progress(), 1.0);
    }

    #[test]
    fn increments_add_and_the_pending_range_is_recounted_not_added_twice() {
        let mut p = started();
        p.chunk_done(key(100), 100, 1, true, Duration::ZERO, 1.0);
        // (100, 120]: 2 new violations.
        p.settle(0, key(120), 2);
        assert_eq!(p.value(), Some(3));
        // (100, 120] counted again (a late row there: now 3), (120, 130] has 1.
        p.settle(3, key(130), 1);
        assert_eq!(p.value(), Some(1 + 3 + 1));
        assert_eq!(p.settled_hi, key(120));
        assert_eq!(p.pending_hi, key(130));
        // Nothing new: (120, 130] settles with its recount, the pending range is empty.
        p.settle(1, None, 0);
        assert_eq!(p.value(), Some(5));
        assert_eq!(p.settled_hi, key(130));
        assert_eq!(p.pending_hi, key(130));
    }

    #[test]
    fn a_completed_sweep_replaces_what_it_recounted_and_keeps_later_increments() {
        let mut p = started();
        p.chunk_done(key(100), 100, 4, true, Duration::ZERO, 1.0);
        p.settle(0, key(110), 1);
        p.settle(1, None, 0); // settled (100, 110] = 1
        assert_eq!(p.value(), Some(5));
        p.start_sweep(SweepReason::Periodic, BTreeMap::new(), 110, 2.0);
        assert_eq!(p.sweep.as_ref().and_then(|s| s.hi.clone()), key(110));
        // Past the sweep's bound: (110, 115] has 2.
        p.settle(0, key(115), 2);
        assert_eq!(p.value(), Some(7));
        // The four old violations were repaired: the sweep finds only 1 up to 110.
        p.chunk_done(key(60), 60, 0, false, Duration::ZERO, 3.0);
        assert_eq!(p.value(), Some(7), "a partial sweep never lowers the count");
        p.chunk_done(key(110), 50, 1, true, Duration::ZERO, 4.0);
        assert_eq!(p.value(), Some(1 + 2));
    }

    #[test]
    fn a_sweep_that_already_found_more_reports_it_before_completing() {
        let mut p = started();
        p.chunk_done(key(100), 100, 0, true, Duration::ZERO, 1.0);
        p.start_sweep(SweepReason::Early, BTreeMap::new(), 100, 2.0);
        p.chunk_done(key(10), 10, 3, false, Duration::ZERO, 3.0);
        assert_eq!(p.value(), Some(3));
    }

    #[test]
    fn an_early_sweep_ends_its_run_once_when_it_raised_the_value() {
        let mut p = started();
        // No value before the first sweep completes: nothing to report early.
        p.chunk_done(key(50), 50, 1, false, Duration::ZERO, 1.0);
        assert!(!p.end_run_to_report(p.value()));
        p.chunk_done(key(100), 50, 0, true, Duration::ZERO, 1.5);
        assert_eq!(p.value(), Some(1));
        // A periodic sweep takes one chunk per run anyway.
        p.start_sweep(SweepReason::Periodic, BTreeMap::new(), 100, 2.0);
        p.chunk_done(key(10), 10, 2, false, Duration::ZERO, 2.5);
        assert!(!p.end_run_to_report(Some(1)));
        p.start_sweep(SweepReason::Early, BTreeMap::new(), 100, 3.0);
        let before = p.value();
        // A chunk that found no more than the base: go on.
        p.chunk_done(key(20), 20, 1, false, Duration::ZERO, 3.1);
        assert!(!p.end_run_to_report(before));
        // One that did: end the run and export it.
        p.chunk_done(key(40), 20, 2, false, Duration::ZERO, 3.2);
        assert!(p.end_run_to_report(before));
        assert_eq!(p.value(), Some(3));
        // Only once per sweep: the next run goes on to the end.
        let before = p.value();
        p.chunk_done(key(60), 20, 1, false, Duration::ZERO, 4.0);
        assert!(!p.end_run_to_report(before));
        assert!(p.chunk_done(key(100), 40, 0, true, Duration::ZERO, 4.1));
        assert_eq!(p.value(), Some(4));
    }

    #[test]
    fn a_reset_forgets_every_count_but_keeps_the_last_complete_time() {
        let mut p = started();
        p.chunk_done(key(100), 100, 7, true, Duration::ZERO, 1.0);
        p.settle(0, key(150), 2);
        let new_identity = TableIdentity {
            oid: 1,
            relfilenode: 2,
        };
        p.reset(
            new_identity.clone(),
            key(5),
            SweepReason::Reset,
            BTreeMap::new(),
            5,
            9.0,
        );
        assert_eq!(p.value(), None);
        assert_eq!(p.identity, Some(new_identity));
        assert_eq!(p.last_complete_at, Some(1.0));
        p.chunk_done(key(5), 5, 0, true, Duration::ZERO, 10.0);
        assert_eq!(p.value(), Some(0));
    }

    #[test]
    fn an_empty_table_sweeps_to_nothing_and_counts_new_rows() {
        let mut p = Progress::default();
        p.reset(
            identity(),
            None,
            SweepReason::Initial,
            BTreeMap::new(),
            0,
            0.0,
        );
        p.chunk_done(None, 0, 0, true, Duration::ZERO, 1.0);
        assert_eq!(p.value(), Some(0));
        p.settle(0, key(3), 1);
        assert_eq!(p.value(), Some(1));
        assert_eq!(p.settled_hi, None);
    }

    #[test]
    fn statistics_that_call_for_an_early_sweep() {
        let d = def();
        let before = counters(&[("submissions", 10, 0), ("participants", 0, 5)]);
        let check = |now: &[(&str, i64, i64)], above_zero: bool| {
            early_sweep_reason(&d, &before, &counters(now), above_zero)
        };
        assert_eq!(
            check(&[("submissions", 10, 0), ("participants", 0, 5)], true),
            None
        );
        assert_eq!(
            check(&[("submissions", 10, 0), ("participants", 0, 6)], false).as_deref(),
            Some("1 rows deleted from participants")
        );
        assert_eq!(
            check(&[("submissions", 12, 0), ("participants", 0, 5)], false).as_deref(),
            Some("2 rows updated in submissions")
        );
        // Deletes on the checked table cannot create a violation, only clear one.
        assert_eq!(
            check(&[("submissions", 10, 3), ("participants", 0, 5)], false),
            None
        );
        assert!(check(&[("submissions", 10, 3), ("participants", 0, 5)], true).is_some());
        // Statistics reset: whatever happened is unknown.
        assert!(check(&[("submissions", 0, 0), ("participants", 0, 0)], false).is_some());
        // A table the statistics do not know yet is no reason.
        assert_eq!(check(&[("submissions", 10, 0)], false), None);
        // Updates on a parent do not orphan anything.
        assert_eq!(
            check(&[("submissions", 10, 0), ("participants", 9, 5)], false),
            None
        );
    }

    #[test]
    fn an_early_sweep_runs_to_its_end_and_changes_meanwhile_start_the_next() {
        let d = def();
        let mut p = started();
        p.counters = counters(&[("submissions", 0, 0), ("participants", 0, 0)]);
        p.chunk_done(key(100), 100, 0, true, Duration::ZERO, 1.0);
        let quiet = counters(&[("submissions", 0, 0), ("participants", 0, 0)]);
        assert_eq!(p.plan_sweep(&d, quiet.clone(), 100, 2.0), None);
        assert_eq!(
            p.sweep.as_ref().map(|s| s.reason),
            Some(SweepReason::Periodic)
        );
        // A parent row deleted: the periodic sweep gives way to an early one.
        let one = counters(&[("submissions", 0, 0), ("participants", 0, 1)]);
        assert!(p.plan_sweep(&d, one.clone(), 100, 3.0).is_some());
        p.chunk_done(key(40), 40, 1, false, Duration::ZERO, 3.5);
        // More deletes while it runs: it goes on from where it is, not from the start.
        let two = counters(&[("submissions", 0, 0), ("participants", 0, 2)]);
        assert_eq!(p.plan_sweep(&d, two.clone(), 100, 4.0), None);
        let sweep = p.sweep.clone().expect("the early sweep");
        assert_eq!(
            (sweep.reason, sweep.started_at, sweep.pos),
            (SweepReason::Early, 3.0, key(40))
        );
        assert!(p.chunk_done(key(100), 60, 0, true, Duration::ZERO, 5.0));
        assert_eq!(p.value(), Some(1));
        // Completed: the deletes made while it ran start the next early sweep.
        assert!(p.plan_sweep(&d, two.clone(), 100, 6.0).is_some());
        assert_eq!(
            p.sweep.as_ref().map(|s| (s.reason, s.started_at)),
            Some((SweepReason::Early, 6.0))
        );
        p.chunk_done(key(100), 100, 2, true, Duration::ZERO, 7.0);
        assert_eq!(p.value(), Some(2));
        // Nothing new: back to the periodic pace.
        assert_eq!(p.plan_sweep(&d, two, 100, 8.0), None);
        assert_eq!(
            p.sweep.as_ref().map(|s| s.reason),
            Some(SweepReason::Periodic)
        );
    }

    #[test]
    fn an_integer_chunk_is_sized_from_the_keys_and_rows_left() {
        // 1000 keys, 100 rows left: a chunk of 10 rows spans 100 keys.
        assert_eq!(integer_chunk(0, 1000, 100, 10), Some((100, 10)));
        // The last chunk ends at the bound, whatever the estimate.
        assert_eq!(integer_chunk(900, 1000, 10, 10), Some((1000, 10)));
        assert_eq!(integer_chunk(900, 1000, 5, 10), Some((1000, 5)));
        // Never an empty step, never past the bound, no overflow at the ends of bigint.
        assert_eq!(integer_chunk(0, 10, 1_000_000, 1), Some((1, 1)));
        assert_eq!(
            integer_chunk(i64::MIN, i64::MAX, 4, 2),
            Some((i64::MIN + (u64::MAX / 2) as i64 + 1, 2))
        );
        // Nothing to go on: read the bound.
        assert_eq!(integer_chunk(0, 1000, 0, 10), None);
        assert_eq!(integer_chunk(1000, 1000, 10, 10), None);
    }

    #[test]
    fn pace_spreads_the_sweep_over_the_period_within_the_budget() {
        let mut d = def();
        let sweep = Sweep {
            reason: SweepReason::Periodic,
            hi: key(1),
            pos: None,
            end: None,
            count: 0,
            rows: 0,
            started_at: 0.0,
            settled_at_start: 0,
            estimated_rows: 10_000_000,
            reported_early: false,
        };
        let five_minutes = Duration::from_secs(300);
        // 259.2 runs in nine tenths of a day: 10M / 259.2 rows each.
        assert_eq!(paced_rows(&d, &sweep, five_minutes, None, 0.0), 38_581);
        // On schedule: the same.
        let on_time = Sweep {
            rows: 38_581 * 10,
            ..sweep.clone()
        };
        assert_eq!(paced_rows(&d, &on_time, five_minutes, None, 3000.0), 38_581);
        // Behind schedule (the daemon was down), up to the row cap.
        d.sweep.max_rows = 1_000_000;
        assert_eq!(
            paced_rows(&d, &sweep, five_minutes, None, 43_000.0),
            1_000_000
        );
        // The time budget: 5 s at 5k rows/s.
        assert_eq!(
            paced_rows(&d, &sweep, five_minutes, Some(5_000.0), 0.0),
            25_000
        );
        // Never below the minimum chunk, never above the cap.
        d.sweep.max_rows = 500;
        assert_eq!(paced_rows(&d, &sweep, five_minutes, Some(1.0), 0.0), 500);
        d.sweep.max_rows = 1_000_000;
        assert_eq!(
            paced_rows(&d, &sweep, five_minutes, Some(1.0), 0.0),
            MIN_CHUNK_ROWS
        );
    }

    #[test]
    fn progress_survives_serialization() {
        let mut p = Progress::default();
        p.reset(
            identity(),
            key(100),
            SweepReason::Initial,
            counters(&[("submissions", 1, 2)]),
            100,
            0.0,
        );
        p.chunk_done(key(40), 40, 1, false, Duration::from_millis(5), 1.0);
        let text = serde_json::to_string(&p).expect("serialize");
        let back: Progress = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, p);
    }
}

//! Running summaries of samples: what the regression rules need from a span of samples (the
//! baseline, a window), kept up to date one sample at a time in memory that does not grow with
//! the number of samples.
//!
//! Per series: counts and sums (calls, time, scans, seconds, commits, rollbacks, deadlocks),
//! extremes (connection peak, first and last size) and, for the distribution tests, a
//! [`Spread`] of per-sample values: every value until it holds `capacity`, then every second
//! one, every fourth… so it always covers the whole span evenly with at most `capacity`
//! values — as the old baseline did by reading every n-th sample. Statements are followed in
//! detail only when a [`Following`] says so; the rest are added up in [`Summary::others`].
//! Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use crate::analysis::sample::{CheckPoint, Sample};
use crate::analysis::stats::RunningMoments;
use crate::time::Timestamp;

/// How many per-sample values a series keeps for the distribution tests.
pub(crate) const SPREAD_CAPACITY: usize = 512;
/// After a server restart, the times of this many samples (the restart's interval included)
/// are left out: caches are cold, and what the queries cost then is not the deployment's doing.
pub(crate) const RESTART_WARMUP_SAMPLES: usize = 10;

/// Per-sample values spread evenly over everything seen, at most `capacity` of them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spread {
    values: Vec<f64>,
    /// Every `stride`-th value offered is kept.
    stride: u64,
    offered: u64,
    capacity: usize,
}

impl Spread {
    pub(crate) fn new(capacity: usize) -> Spread {
        Spread {
            values: Vec::new(),
            stride: 1,
            offered: 0,
            capacity: capacity.max(2),
        }
    }

    pub(crate) fn push(&mut self, value: f64) {
        if self.offered % self.stride == 0 {
            self.values.push(value);
            if self.values.len() >= self.capacity {
                let mut index = 0;
                self.values.retain(|_| {
                    index += 1;
                    index % 2 == 1
                });
                self.stride *= 2;
            }
        }
        self.offered += 1;
    }

    pub(crate) fn values(&self) -> &[f64] {
        &self.values
    }
}

/// One statement followed in detail.
#[derive(Debug, Clone, PartialEq)]
pub struct StatementSummary {
    /// The query text (shortened), as first known.
    pub(crate) query: String,
    pub(crate) total_ms: f64,
    pub(crate) calls: f64,
    /// Mean time per call of each sample with at least `min_calls` calls; a sample with fewer
    /// is pooled with the next ones until their calls reach `min_calls` (a statement slowed by
    /// lock waits runs less often per sample, and its slowest samples must not drop out).
    pub(crate) means: Spread,
    /// Running moments of the natural log of those means, for the sequential test.
    pub(crate) log_means: RunningMoments,
    /// Calls and time (ms) of samples with too few calls, not yet pooled into a mean.
    pending_calls: f64,
    pending_ms: f64,
    /// Database time per second (ms) of each sample in which it ran, whatever its calls.
    pub(crate) rates: RunningMoments,
    /// The summary's sample count when it was first seen (1 = the first sample).
    pub(crate) first_sample: usize,
    /// The summary's seconds and all statements' time (ms) before that sample.
    pub(crate) seconds_before: f64,
    pub(crate) statement_ms_before: f64,
}

impl StatementSummary {
    /// Samples of the summary since this statement was first seen, that one included.
    pub(crate) fn samples_since_seen(&self, summary: &Summary) -> usize {
        summary.samples.saturating_sub(self.first_sample) + 1
    }

    /// Seconds the summary covers since this statement was first seen.
    pub(crate) fn seconds_since_seen(&self, summary: &Summary) -> f64 {
        summary.seconds - self.seconds_before
    }

    /// All statements' time (ms) in the summary since this statement was first seen, its own
    /// included.
    pub(crate) fn statement_ms_since_seen(&self, summary: &Summary) -> f64 {
        summary.statement_ms - self.statement_ms_before
    }
}

/// Which statements a summary follows in detail.
#[derive(Debug, Clone, PartialEq)]
pub enum Following {
    /// Every statement (small inputs, tests, and the first pass over a baseline).
    All,
    /// None: the summary is about the rest (indexes since the deployment).
    None,
    /// These (the baseline's top statements by total time), plus up to `new_statements`
    /// statements that the baseline never saw.
    Chosen {
        followed: BTreeSet<String>,
        known: BTreeSet<String>,
        new_statements: usize,
    },
}

/// The samples that carried a series' counters and the seconds they cover: what the series'
/// sums are over.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Coverage {
    /// Seconds the samples cover.
    pub(crate) seconds: f64,
    /// How many samples.
    pub(crate) samples: usize,
}

impl Coverage {
    /// One more sample, of `seconds`.
    fn add(&mut self, seconds: f64) {
        self.seconds += seconds;
        self.samples += 1;
    }
}

/// Sequential scans of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct TableSummary {
    /// Sequential scans started in the covered samples (sum of their deltas).
    pub(crate) seq_scan: f64,
    /// Rows those scans read.
    pub(crate) seq_tup_read: f64,
    /// The samples that carried the table's counters.
    pub(crate) coverage: Coverage,
}

/// Scans of one index.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct IndexSummary {
    /// The table, as first seen.
    pub(crate) table: String,
    /// Index scans started in the samples that carried the index (sum of their deltas).
    pub(crate) scans: f64,
    /// Samples that carried the index.
    pub(crate) samples: usize,
}

/// Database-wide counters over the samples that have them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct DatabaseSummary {
    /// Transactions committed in the covered samples (sum of their deltas).
    pub(crate) xact_commit: f64,
    /// Transactions rolled back (deploywatch's own end in COMMIT: these are the application's).
    pub(crate) xact_rollback: f64,
    /// Deadlocks detected.
    pub(crate) deadlocks: f64,
    /// The samples that carried `pg_stat_database`.
    pub(crate) coverage: Coverage,
}

/// Statements not followed in detail, added up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Others {
    /// How many statements were added up here (0 when the summary follows no statement).
    pub(crate) statements: usize,
    /// Their calls.
    pub(crate) calls: f64,
    /// Their execution time (ms).
    pub(crate) total_ms: f64,
}

/// `(at, bytes)` of a sample that reported a size.
pub(crate) type SizePoint = (Timestamp, f64);

/// Check states over a span.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ChecksSummary {
    /// Samples in which each check passed.
    pub(crate) passes: BTreeMap<String, usize>,
    /// Checks that failed at least once.
    pub(crate) failed: BTreeSet<String>,
    /// The latest failing state of each check that failed.
    pub(crate) latest_failure: BTreeMap<String, CheckPoint>,
    /// The latest sample's check states.
    pub(crate) last: BTreeMap<String, CheckPoint>,
    /// When each check was last seen at value 0 before the latest sample.
    pub(crate) zero_before_last: BTreeMap<String, Timestamp>,
    last_at: Timestamp,
}

impl ChecksSummary {
    fn add(&mut self, sample: &Sample) {
        for (name, point) in &self.last {
            if point.value == Some(0.0) {
                self.zero_before_last.insert(name.clone(), self.last_at);
            }
        }
        for (name, point) in &sample.checks {
            match point.status.as_str() {
                "pass" => *self.passes.entry(name.clone()).or_insert(0) += 1,
                "fail" => {
                    self.failed.insert(name.clone());
                    self.latest_failure.insert(name.clone(), point.clone());
                }
                _ => {}
            }
        }
        self.last.clone_from(&sample.checks);
        self.last_at = sample.at;
    }

    /// When `check` was last seen at 0 in the whole span.
    pub(crate) fn latest_zero(&self, check: &str) -> Option<Timestamp> {
        if self.last.get(check).and_then(|p| p.value) == Some(0.0) {
            return Some(self.last_at);
        }
        self.zero_before_last.get(check).copied()
    }
}

/// Everything the rules read from a span of samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Samples added.
    pub(crate) samples: usize,
    /// Seconds the samples cover.
    pub(crate) seconds: f64,
    /// Server restarts seen.
    pub(crate) restarts: usize,
    /// Samples still to leave out of the statement times after a restart.
    warmup_left: usize,
    /// Database-wide counters; `None` when no sample carried them.
    pub(crate) database: Option<DatabaseSummary>,
    /// Highest share of max_connections in use.
    pub(crate) connection_peak: Option<f64>,
    /// The statements followed in detail, by query id.
    pub statements: BTreeMap<String, StatementSummary>,
    /// The statements not followed, added up.
    pub(crate) others: Others,
    /// Time (ms) of every statement added, followed or not.
    pub(crate) statement_ms: f64,
    /// Statements of the baseline that are not followed, seen here (a bounded set: ids only).
    other_ids: BTreeSet<String>,
    /// Sequential scans by table (`schema.table`).
    pub(crate) tables: BTreeMap<String, TableSummary>,
    /// Scans by index (`schema.index`).
    pub(crate) indexes: BTreeMap<String, IndexSummary>,
    /// Size of the first and the latest sample (0 when not sampled).
    pub(crate) first_size: f64,
    pub(crate) last_size: f64,
    /// The first and latest samples that reported a size, and how many did.
    pub(crate) first_sized: Option<SizePoint>,
    pub(crate) last_sized: Option<SizePoint>,
    pub(crate) sized_samples: usize,
    /// The checks' outcomes: passes per check, which failed and how last, the latest states.
    pub(crate) checks: ChecksSummary,
    /// Calls a statement's per-sample mean needs (fewer are pooled with the next samples).
    min_calls: u64,
    /// Which statements are followed in detail.
    following: Following,
    /// Per-sample values kept of each series at most (see [`Spread`]).
    capacity: usize,
    /// Statements followed because the baseline never saw them.
    new_followed: usize,
    /// New statements no longer followed: a costlier new statement took their place.
    displaced: BTreeSet<String>,
}

impl Summary {
    pub fn new(min_calls: u64, following: Following) -> Summary {
        Summary::with_capacity(min_calls, following, SPREAD_CAPACITY)
    }

    pub(crate) fn with_capacity(min_calls: u64, following: Following, capacity: usize) -> Summary {
        Summary {
            samples: 0,
            seconds: 0.0,
            restarts: 0,
            warmup_left: 0,
            database: None,
            connection_peak: None,
            statements: BTreeMap::new(),
            others: Others::default(),
            statement_ms: 0.0,
            other_ids: BTreeSet::new(),
            tables: BTreeMap::new(),
            indexes: BTreeMap::new(),
            first_size: 0.0,
            last_size: 0.0,
            first_sized: None,
            last_sized: None,
            sized_samples: 0,
            checks: ChecksSummary::default(),
            min_calls,
            following,
            capacity,
            new_followed: 0,
            displaced: BTreeSet::new(),
        }
    }

    /// A summary of `samples`, following every statement.
    pub(crate) fn of(samples: &[Sample], min_calls: u64) -> Summary {
        let mut summary = Summary::new(min_calls, Following::All);
        for sample in samples {
            summary.add(sample);
        }
        summary
    }

    fn follows(&self, id: &str) -> bool {
        match &self.following {
            Following::All => true,
            Following::None => false,
            Following::Chosen {
                followed,
                known,
                new_statements,
            } => {
                followed.contains(id)
                    || self.statements.contains_key(id)
                    || (!known.contains(id)
                        && self.new_followed < *new_statements
                        && !self.displaced.contains(id))
            }
        }
    }

    /// When every place for new statements is taken, a new statement whose time in this
    /// sample exceeds the whole time of the cheapest followed new statement takes its place
    /// (that one is added up among the others from then on, and never followed again), so the
    /// costliest new statements are the ones followed, whichever came first. Whether `id` got
    /// a place.
    fn make_room_for(&mut self, id: &str, total_ms: f64) -> bool {
        let Following::Chosen {
            followed,
            known,
            new_statements,
        } = &self.following
        else {
            return false;
        };
        if *new_statements == 0 || known.contains(id) || self.displaced.contains(id) {
            return false;
        }
        let cheapest = self
            .statements
            .iter()
            .filter(|(k, _)| !followed.contains(*k))
            .min_by(|a, b| {
                a.1.total_ms
                    .total_cmp(&b.1.total_ms)
                    .then_with(|| a.0.cmp(b.0))
            })
            .map(|(k, s)| (k.clone(), s.total_ms));
        let Some((victim, _)) = cheapest.filter(|(_, ms)| total_ms > *ms) else {
            return false;
        };
        if let Some(gone) = self.statements.remove(&victim) {
            self.others.calls += gone.calls;
            self.others.total_ms += gone.total_ms;
            if self.other_ids.insert(victim.clone()) {
                self.others.statements += 1;
            }
        }
        self.displaced.insert(victim);
        self.new_followed = self.new_followed.saturating_sub(1);
        true
    }

    pub fn add(&mut self, sample: &Sample) {
        if self.samples == 0 {
            self.first_size = sample.size_bytes;
        }
        self.samples += 1;
        self.seconds += sample.seconds.max(0.0);
        if sample.restarted() {
            self.restarts += 1;
            self.warmup_left = RESTART_WARMUP_SAMPLES;
        }
        let warming_up = self.warmup_left > 0;
        self.warmup_left = self.warmup_left.saturating_sub(1);
        self.last_size = sample.size_bytes;
        if let Some(d) = &sample.database {
            let total = self.database.get_or_insert_with(DatabaseSummary::default);
            total.xact_commit += d.xact_commit;
            total.xact_rollback += d.xact_rollback;
            total.deadlocks += d.deadlocks;
            total.coverage.add(sample.seconds);
        }
        if sample.max_connections > 0.0 {
            let share = sample.connections / sample.max_connections;
            self.connection_peak = Some(self.connection_peak.map_or(share, |p| p.max(share)));
        }
        let statements = sample.statements.as_ref().filter(|_| !warming_up);
        if let Some(statements) = statements {
            let statement_ms_before = self.statement_ms;
            self.statement_ms += statements.values().map(|s| s.total_ms).sum::<f64>();
            let seconds_before = self.seconds - sample.seconds.max(0.0);
            for (id, s) in statements {
                if !self.follows(id) && !self.make_room_for(id, s.total_ms) {
                    if !matches!(self.following, Following::None)
                        && self.other_ids.insert(id.clone())
                    {
                        self.others.statements += 1;
                    }
                    self.others.calls += s.calls;
                    self.others.total_ms += s.total_ms;
                    continue;
                }
                if let Following::Chosen { followed, .. } = &self.following {
                    if !followed.contains(id) && !self.statements.contains_key(id) {
                        self.new_followed += 1;
                    }
                }
                let (capacity, first_sample) = (self.capacity, self.samples);
                let entry = self
                    .statements
                    .entry(id.clone())
                    .or_insert_with(|| StatementSummary {
                        query: s.query.clone(),
                        total_ms: 0.0,
                        calls: 0.0,
                        means: Spread::new(capacity),
                        log_means: RunningMoments::default(),
                        pending_calls: 0.0,
                        pending_ms: 0.0,
                        rates: RunningMoments::default(),
                        first_sample,
                        seconds_before,
                        statement_ms_before,
                    });
                if entry.query.is_empty() && !s.query.is_empty() {
                    entry.query.clone_from(&s.query);
                }
                entry.total_ms += s.total_ms;
                entry.calls += s.calls;
                if sample.seconds > 0.0 {
                    entry.rates.push(s.total_ms / sample.seconds);
                }
                if s.calls > 0.0 && s.total_ms.is_finite() {
                    entry.pending_calls += s.calls;
                    entry.pending_ms += s.total_ms;
                }
                if entry.pending_calls >= self.min_calls as f64 {
                    let mean = entry.pending_ms / entry.pending_calls;
                    entry.pending_calls = 0.0;
                    entry.pending_ms = 0.0;
                    entry.means.push(mean);
                    if mean > 0.0 {
                        entry.log_means.push(mean.ln());
                    }
                }
            }
        }
        for (name, t) in &sample.tables {
            let entry = self.tables.entry(name.clone()).or_default();
            entry.seq_scan += t.seq_scan;
            entry.seq_tup_read += t.seq_tup_read;
            entry.coverage.add(sample.seconds);
        }
        for (name, index) in &sample.indexes {
            let entry = self
                .indexes
                .entry(name.clone())
                .or_insert_with(|| IndexSummary {
                    table: index.table.clone(),
                    scans: 0.0,
                    samples: 0,
                });
            entry.scans += index.scans;
            entry.samples += 1;
        }
        if sample.size_bytes > 0.0 {
            let point = (sample.at, sample.size_bytes);
            self.first_sized.get_or_insert(point);
            self.last_sized = Some(point);
            self.sized_samples += 1;
        }
        self.checks.add(sample);
    }

    /// Whether a span summarised with this summary's following saw statement `id`: followed,
    /// added up among the others, or known to the following (the baseline's statements).
    pub(crate) fn knows(&self, id: &str) -> bool {
        self.statements.contains_key(id) || self.other_ids.contains(id) || self.listed_as_known(id)
    }

    /// Whether this summary's following lists `id` among the statements known beforehand (a
    /// window's following lists the baseline's).
    pub(crate) fn listed_as_known(&self, id: &str) -> bool {
        matches!(&self.following, Following::Chosen { known, .. } if known.contains(id))
    }

    /// Whether any statement was seen at all (pg_stat_statements was readable).
    pub(crate) fn saw_statements(&self) -> bool {
        !self.statements.is_empty() || self.others.statements > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::sample::StatementDelta;

    #[test]
    fn a_spread_keeps_at_most_its_capacity_evenly_over_everything() {
        let mut spread = Spread::new(8);
        for i in 0..100 {
            spread.push(f64::from(i));
        }
        let values = spread.values();
        assert!(values.len() <= 8 && values.len() >= 4, "{values:?}");
        assert_eq!(values[0], 0.0);
        assert!(values.windows(2).all(|w| w[1] - w[0] == 16.0), "{values:?}");
        assert!(*values.last().unwrap_or(&0.0) >= 80.0, "{values:?}");
        assert_eq!(spread.offered, 100);
        let mut small = Spread::new(8);
        for i in 0..5 {
            small.push(f64::from(i));
        }
        assert_eq!(small.values(), &[0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    fn sample(at: f64, statements: &[(&str, f64, f64)]) -> Sample {
        Sample {
            at,
            seconds: 60.0,
            statements: Some(
                statements
                    .iter()
                    .map(|(id, calls, total)| {
                        (
                            id.to_string(),
                            StatementDelta {
                                calls: *calls,
                                total_ms: *total,
                                rows: 0.0,
                                query: format!("SELECT {id}"),
                            },
                        )
                    })
                    .collect(),
            ),
            ..Sample::default()
        }
    }

    #[test]
    fn only_chosen_and_a_few_new_statements_are_followed() {
        let mut summary = chosen(&["a"], &["a", "b"], 1);
        feed(
            &mut summary,
            0..10,
            &[
                ("a", 10.0, 10.0),
                ("b", 10.0, 5.0),
                ("new1", 2.0, 2.0),
                ("new2", 2.0, 2.0),
            ],
        );
        let ids: Vec<&str> = summary.statements.keys().map(String::as_str).collect();
        assert_eq!(ids, vec!["a", "new1"]);
        assert_eq!(summary.statements["a"].means.values().len(), 10);
        assert_eq!(summary.others.statements, 2);
        assert_eq!(summary.others.total_ms, 70.0);
    }

    #[test]
    fn the_samples_after_a_restart_leave_statement_times_out() {
        let mut summary = Summary::new(1, Following::All);
        for i in 0..5 {
            summary.add(&sample(f64::from(i), &[("a", 10.0, 10.0)]));
        }
        let mut restart = sample(5.0, &[("a", 10.0, 300.0)]);
        restart
            .resets
            .push(crate::analysis::sample::SERVER_RESTART.into());
        summary.add(&restart);
        for i in 6..(6 + RESTART_WARMUP_SAMPLES as u32 - 1) {
            summary.add(&sample(f64::from(i), &[("a", 10.0, 100.0)]));
        }
        let a = &summary.statements["a"];
        assert_eq!((a.log_means.n, a.calls, a.total_ms), (5, 50.0, 50.0));
        summary.add(&sample(100.0, &[("a", 10.0, 10.0)]));
        let a = &summary.statements["a"];
        assert_eq!(a.log_means.n, 6);
        assert_eq!(summary.restarts, 1);
        assert_eq!(summary.samples, 5 + RESTART_WARMUP_SAMPLES + 1);
        assert_eq!(summary.seconds, 60.0 * summary.samples as f64);
    }

    /// Adds a sample of `statements` at each second of `times`.
    fn feed(summary: &mut Summary, times: std::ops::Range<u32>, statements: &[(&str, f64, f64)]) {
        for i in times {
            summary.add(&sample(f64::from(i), statements));
        }
    }

    /// A summary following `followed` in detail, of the statements `known` beforehand, and
    /// up to `new_statements` new ones.
    fn chosen(followed: &[&str], known: &[&str], new_statements: usize) -> Summary {
        let set = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect();
        Summary::new(
            1,
            Following::Chosen {
                followed: set(followed),
                known: set(known),
                new_statements,
            },
        )
    }

    /// Approximate bytes a summary holds: what grows with what it follows.
    fn approximate_bytes(summary: &Summary) -> usize {
        let statements: usize = summary
            .statements
            .iter()
            .map(|(id, s)| id.len() + s.query.len() + s.means.values.capacity() * 8 + 96)
            .sum();
        statements
            + summary
                .other_ids
                .iter()
                .map(|id| id.len() + 32)
                .sum::<usize>()
            + (summary.tables.len() + summary.indexes.len()) * 96
            + summary.checks.last.len() * 160
    }

    #[test]
    fn memory_does_not_grow_with_samples() {
        let mut summary = Summary::new(1, Following::All);
        let ids: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        let mut sizes = Vec::new();
        for i in 0..20_000 {
            let mut s = sample(f64::from(i), &[]);
            let statements = s.statements.get_or_insert_with(Default::default);
            for id in &ids {
                statements.insert(
                    id.clone(),
                    StatementDelta {
                        calls: 5.0,
                        total_ms: 5.0,
                        rows: 0.0,
                        query: String::new(),
                    },
                );
            }
            summary.add(&s);
            if i == 5_000 || i == 19_999 {
                sizes.push(approximate_bytes(&summary));
            }
        }
        assert_eq!(sizes[0], sizes[1], "{sizes:?}");
    }

    #[test]
    fn a_costlier_new_statement_takes_the_place_of_the_cheapest_new_one() {
        let mut summary = chosen(&["a"], &["a"], 2);
        feed(
            &mut summary,
            0..5,
            &[
                ("a", 10.0, 10.0),
                ("cheap1", 10.0, 1.0),
                ("cheap2", 10.0, 2.0),
            ],
        );
        // A costly new statement arrives once the places are taken: the cheapest new one
        // (5 ms in all) makes way, and is not followed again.
        feed(
            &mut summary,
            5..10,
            &[
                ("a", 10.0, 10.0),
                ("cheap1", 10.0, 1.0),
                ("cheap2", 10.0, 2.0),
                ("costly", 10.0, 500.0),
            ],
        );
        let ids: Vec<&str> = summary.statements.keys().map(String::as_str).collect();
        assert_eq!(ids, vec!["a", "cheap2", "costly"]);
        assert_eq!(summary.statements["costly"].calls, 50.0);
        assert_eq!(summary.statements["costly"].first_sample, 6);
        // A statement cheaper than every followed new one gets no place.
        summary.add(&sample(10.0, &[("other", 10.0, 3.0)]));
        assert!(!summary.statements.contains_key("other"));
        // Nothing is lost: every statement's time is followed or among the others.
        let followed_ms: f64 = summary.statements.values().map(|s| s.total_ms).sum();
        assert_eq!(followed_ms + summary.others.total_ms, summary.statement_ms);
    }
}

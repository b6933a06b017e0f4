//! Samples of a target's cumulative statistics and the deltas between them.
//!
//! [`RawStats`] is what one sampling pass read (cumulative counters, as PostgreSQL keeps them).
//! [`delta`] turns two consecutive passes into a [`Sample`]: what happened in between. Counter
//! resets (a restart, `pg_stat_reset()`, `pg_stat_statements_reset()`) and query ids that
//! disappear are detected here and leave the affected part of the sample out, so they can never
//! look like a change in behaviour. Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters of the current database from `pg_stat_database`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DbCounters {
    pub xact_commit: f64,
    pub xact_rollback: f64,
    pub deadlocks: f64,
    pub conflicts: f64,
    pub temp_files: f64,
    pub temp_bytes: f64,
    pub blks_read: f64,
    pub blks_hit: f64,
}

impl DbCounters {
    fn fields(&self) -> [f64; 8] {
        [
            self.xact_commit,
            self.xact_rollback,
            self.deadlocks,
            self.conflicts,
            self.temp_files,
            self.temp_bytes,
            self.blks_read,
            self.blks_hit,
        ]
    }

    fn minus(&self, earlier: &DbCounters) -> Option<DbCounters> {
        let delta = DbCounters {
            xact_commit: self.xact_commit - earlier.xact_commit,
            xact_rollback: self.xact_rollback - earlier.xact_rollback,
            deadlocks: self.deadlocks - earlier.deadlocks,
            conflicts: self.conflicts - earlier.conflicts,
            temp_files: self.temp_files - earlier.temp_files,
            temp_bytes: self.temp_bytes - earlier.temp_bytes,
            blks_read: self.blks_read - earlier.blks_read,
            blks_hit: self.blks_hit - earlier.blks_hit,
        };
        delta.fields().iter().all(|v| *v >= 0.0).then_some(delta)
    }
}

/// One statement of `pg_stat_statements` (all users' executions of one query id summed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementCounters {
    pub(crate) calls: f64,
    pub(crate) total_ms: f64,
    pub(crate) rows: f64,
    pub(crate) query: String,
}

/// One index's cumulative scans, as read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexCounters {
    /// Its table, `schema.table`.
    pub table: String,
    pub scans: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TableCounters {
    pub seq_scan: f64,
    pub seq_tup_read: f64,
    pub idx_scan: f64,
}

/// A check's state at sampling time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckPoint {
    pub category: String,
    /// pass, fail, error or pending.
    pub status: String,
    pub value: Option<f64>,
}

/// What one sampling pass read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawStats {
    pub(crate) at: f64,
    pub(crate) database: Option<DbCounters>,
    /// `pg_stat_database.stats_reset`, as text.
    pub(crate) database_reset: Option<String>,
    /// `pg_postmaster_start_time()` (Unix seconds): a change means the server restarted,
    /// even when its statistics survived the restart (a clean shutdown keeps them).
    #[serde(default)]
    pub postmaster_start: Option<f64>,
    /// `None` when pg_stat_statements is not available.
    pub statements: Option<BTreeMap<String, StatementCounters>>,
    /// `pg_stat_statements_info.stats_reset` where the extension version has it.
    pub(crate) statements_reset: Option<String>,
    /// Keyed by `schema.index`.
    pub indexes: BTreeMap<String, IndexCounters>,
    /// Keyed by `schema.table`.
    pub tables: BTreeMap<String, TableCounters>,
    pub(crate) size_bytes: f64,
    pub(crate) connections: f64,
    pub(crate) max_connections: f64,
    pub(crate) checks: BTreeMap<String, CheckPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementDelta {
    pub calls: f64,
    pub total_ms: f64,
    pub rows: f64,
    /// The query text, shortened.
    pub query: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexDelta {
    pub table: String,
    pub scans: f64,
}

/// What happened on a target between two sampling passes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// End of the interval (unix seconds).
    pub at: f64,
    /// Length of the interval.
    pub seconds: f64,
    /// `None` when the counters were reset in the interval.
    pub database: Option<DbCounters>,
    /// `None` when pg_stat_statements is unavailable or was reset in the interval. Only
    /// statements that ran in the interval are present.
    pub statements: Option<BTreeMap<String, StatementDelta>>,
    pub indexes: BTreeMap<String, IndexDelta>,
    pub tables: BTreeMap<String, TableCounters>,
    pub size_bytes: f64,
    pub connections: f64,
    pub max_connections: f64,
    pub checks: BTreeMap<String, CheckPoint>,
    /// Which sources were reset in the interval (and left out), and [`SERVER_RESTART`] when
    /// the server restarted in it.
    pub resets: Vec<String>,
    /// Indexes and tables that were there at the start of the interval and are gone at its
    /// end (`index public.x`, `table public.y`): dropped, not reset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vanished: Vec<String>,
    /// Whether pg_stat_statements was available at all.
    pub statements_available: bool,
}

/// The mark in [`Sample::resets`] of an interval in which the server restarted.
pub const SERVER_RESTART: &str = "server restart";

impl Sample {
    /// A sample of `seconds` ending at `at` that holds statement statistics only.
    pub fn of_statements(
        at: f64,
        seconds: f64,
        statements: BTreeMap<String, StatementDelta>,
    ) -> Sample {
        Sample {
            at,
            seconds,
            statements: Some(statements),
            statements_available: true,
            ..Sample::default()
        }
    }

    /// The server restarted in the interval: its caches are cold for a while, so the times
    /// that follow are not the deployment's.
    pub fn restarted(&self) -> bool {
        self.resets.iter().any(|r| r == SERVER_RESTART)
    }
}

/// Longest query text kept with a statement.
const QUERY_TEXT_CHARS: usize = 200;

/// A query text on one line and at most [`QUERY_TEXT_CHARS`] characters long: what is kept
/// and shown of a statement.
pub(crate) fn shorten(query: &str) -> String {
    let one_line: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > QUERY_TEXT_CHARS {
        format!(
            "{}…",
            one_line.chars().take(QUERY_TEXT_CHARS).collect::<String>()
        )
    } else {
        one_line
    }
}

/// The delta between two consecutive passes.
pub fn delta(previous: &RawStats, current: &RawStats) -> Sample {
    let mut resets = Vec::new();
    let database = match (&previous.database, &current.database) {
        (Some(before), Some(after)) if previous.database_reset == current.database_reset => {
            let d = after.minus(before);
            if d.is_none() {
                resets.push("pg_stat_database".to_string());
            }
            d
        }
        (Some(_), Some(_)) => {
            resets.push("pg_stat_database".to_string());
            None
        }
        _ => None,
    };
    let statements = match (&previous.statements, &current.statements) {
        (Some(before), Some(after)) => {
            let total =
                |m: &BTreeMap<String, StatementCounters>| m.values().map(|s| s.calls).sum::<f64>();
            let reset_marker_changed = previous.statements_reset != current.statements_reset;
            // After pg_stat_statements_reset() most ids vanish or restart from zero, so the
            // total number of calls drops.
            if reset_marker_changed || total(after) < total(before) {
                resets.push("pg_stat_statements".to_string());
                None
            } else {
                let mut map = BTreeMap::new();
                for (id, now) in after {
                    // An id that is new (or came back after eviction) has no earlier value
                    // to subtract; it is left out of this interval rather than guessed.
                    let Some(then) = before.get(id) else { continue };
                    let calls = now.calls - then.calls;
                    let total_ms = now.total_ms - then.total_ms;
                    if calls <= 0.0 || total_ms < 0.0 {
                        continue;
                    }
                    map.insert(
                        id.clone(),
                        StatementDelta {
                            calls,
                            total_ms,
                            rows: (now.rows - then.rows).max(0.0),
                            query: shorten(&now.query),
                        },
                    );
                }
                Some(map)
            }
        }
        _ => None,
    };
    let mut indexes = BTreeMap::new();
    let mut dropping: Vec<(&str, f64)> = Vec::new();
    for (name, now) in &current.indexes {
        match previous.indexes.get(name) {
            Some(then) if now.scans >= then.scans => {
                indexes.insert(
                    name.clone(),
                    IndexDelta {
                        table: now.table.clone(),
                        scans: now.scans - then.scans,
                    },
                );
            }
            // Its statistics gone while the pass's catalog snapshot still lists it: a DROP
            // INDEX committed during the pass (the statistics entry is removed at commit).
            // Counted like a dropped index, not as a reset; it counts from zero if it stays.
            Some(then) if now.scans == 0.0 => {
                dropping.push((now.table.as_str(), then.scans));
            }
            Some(_) => {
                if !resets.iter().any(|r| r == "pg_stat_user_indexes") {
                    resets.push("pg_stat_user_indexes".to_string());
                }
            }
            // A new index: it exists from now on; its scans so far count in this interval.
            None => {
                indexes.insert(
                    name.clone(),
                    IndexDelta {
                        table: now.table.clone(),
                        scans: now.scans,
                    },
                );
            }
        }
    }
    // Indexes and tables gone since the previous pass were dropped (DROP INDEX, DROP TABLE): that
    // is no reset. A table's idx_scan is the sum over its indexes, so a dropped index takes its
    // scans out of that sum; the table's interval is then counted without them.
    let mut vanished = Vec::new();
    let mut dropped_scans: BTreeMap<&str, f64> = BTreeMap::new();
    for (table, scans) in dropping {
        *dropped_scans.entry(table).or_default() += scans;
    }
    for (name, then) in &previous.indexes {
        if !current.indexes.contains_key(name) {
            vanished.push(format!("index {name}"));
            *dropped_scans.entry(then.table.as_str()).or_default() += then.scans;
        }
    }
    for name in previous.tables.keys() {
        if !current.tables.contains_key(name) {
            vanished.push(format!("table {name}"));
        }
    }
    let mut tables = BTreeMap::new();
    for (name, now) in &current.tables {
        if let Some(then) = previous.tables.get(name) {
            let idx_scan = match dropped_scans.get(name.as_str()) {
                Some(dropped) if now.idx_scan < then.idx_scan => {
                    (now.idx_scan - (then.idx_scan - dropped)).max(0.0)
                }
                // The table's sum lost scans that its indexes, read just before it, still
                // have: an index was dropped between the two reads (the table's idx_scan is the
                // sum over its indexes), as samples read in two statements can show. The
                // indexes' own reading tells the interval; the index is found vanished at the
                // next pass.
                None if now.idx_scan < then.idx_scan => {
                    let listed: f64 = current
                        .indexes
                        .values()
                        .filter(|i| i.table == *name)
                        .map(|i| i.scans)
                        .sum();
                    listed - then.idx_scan
                }
                _ => now.idx_scan - then.idx_scan,
            };
            let d = TableCounters {
                seq_scan: now.seq_scan - then.seq_scan,
                seq_tup_read: now.seq_tup_read - then.seq_tup_read,
                idx_scan,
            };
            if d.seq_scan >= 0.0 && d.seq_tup_read >= 0.0 && d.idx_scan >= 0.0 {
                tables.insert(name.clone(), d);
            } else if !resets.iter().any(|r| r == "pg_stat_user_tables") {
                resets.push("pg_stat_user_tables".to_string());
            }
        }
    }
    if matches!(
        (previous.postmaster_start, current.postmaster_start),
        (Some(before), Some(after)) if before != after
    ) {
        resets.push(SERVER_RESTART.to_string());
    }
    Sample {
        at: current.at,
        seconds: (current.at - previous.at).max(0.0),
        database,
        statements,
        indexes,
        tables,
        size_bytes: current.size_bytes,
        connections: current.connections,
        max_connections: current.max_connections,
        checks: current.checks.clone(),
        resets,
        vanished,
        statements_available: current.statements.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(at: f64, commits: f64, calls: f64, total_ms: f64) -> RawStats {
        let mut statements = BTreeMap::new();
        statements.insert(
            "42".to_string(),
            StatementCounters {
                calls,
                total_ms,
                rows: calls,
                query: "SELECT   1\n FROM t".to_string(),
            },
        );
        RawStats {
            at,
            database: Some(DbCounters {
                xact_commit: commits,
                ..DbCounters::default()
            }),
            statements: Some(statements),
            ..RawStats::default()
        }
    }

    #[test]
    fn delta_subtracts_counters() {
        let s = delta(&raw(0.0, 10.0, 5.0, 50.0), &raw(60.0, 25.0, 15.0, 250.0));
        assert_eq!(s.seconds, 60.0);
        assert_eq!(s.database.map(|d| d.xact_commit), Some(15.0));
        let statement = &s.statements.as_ref().expect("statements")["42"];
        assert_eq!(statement.calls, 10.0);
        assert_eq!(statement.total_ms / statement.calls, 20.0);
        assert_eq!(statement.query, "SELECT 1 FROM t");
        assert!(s.resets.is_empty());
    }

    #[test]
    fn a_database_counter_going_backwards_is_a_reset_not_a_drop() {
        let s = delta(&raw(0.0, 100.0, 5.0, 50.0), &raw(60.0, 3.0, 15.0, 250.0));
        assert_eq!(s.database, None);
        assert_eq!(s.resets, vec!["pg_stat_database".to_string()]);
    }

    #[test]
    fn a_changed_stats_reset_time_is_a_reset() {
        let mut before = raw(0.0, 10.0, 5.0, 50.0);
        before.database_reset = Some("a".into());
        let mut after = raw(60.0, 20.0, 15.0, 250.0);
        after.database_reset = Some("b".into());
        assert_eq!(delta(&before, &after).database, None);
    }

    #[test]
    fn pg_stat_statements_reset_drops_the_statements_of_the_interval() {
        let s = delta(&raw(0.0, 10.0, 500.0, 50.0), &raw(60.0, 20.0, 3.0, 1.0));
        assert_eq!(s.statements, None);
        assert!(s.resets.contains(&"pg_stat_statements".to_string()));
        assert!(s.database.is_some());
    }

    #[test]
    fn a_new_or_vanished_query_id_is_left_out() {
        let before = raw(0.0, 10.0, 5.0, 50.0);
        let mut after = raw(60.0, 20.0, 15.0, 250.0);
        let statements = after.statements.as_mut().expect("statements");
        let old = statements.remove("42").expect("42");
        statements.insert("43".into(), old);
        let s = delta(&before, &after);
        assert_eq!(s.statements.map(|m| m.len()), Some(0));
    }

    #[test]
    fn a_new_index_counts_its_scans_so_far() {
        let before = RawStats::default();
        let mut after = RawStats {
            at: 10.0,
            ..RawStats::default()
        };
        after.indexes.insert(
            "public.idx_new".into(),
            IndexCounters {
                table: "public.t".into(),
                scans: 3.0,
            },
        );
        let s = delta(&before, &after);
        assert_eq!(s.indexes["public.idx_new"].scans, 3.0);
    }

    /// A table with two indexes, one of which `DROP INDEX` removes between two passes: the
    /// table's idx_scan (the sum over its indexes) drops with it.
    #[test]
    fn a_restart_is_told_even_when_the_counters_survived_it() {
        let mut before = raw(0.0, 100.0, 10.0, 10.0);
        let mut after = raw(60.0, 200.0, 20.0, 20.0);
        before.postmaster_start = Some(1000.0);
        after.postmaster_start = Some(1000.0);
        let s = delta(&before, &after);
        assert!(!s.restarted());
        after.postmaster_start = Some(1050.0);
        let s = delta(&before, &after);
        assert!(s.restarted());
        // The counters went on, so the interval is kept.
        assert_eq!(s.database.map(|d| d.xact_commit), Some(100.0));
        // Not known on one side (older store, failed read): no claim.
        before.postmaster_start = None;
        assert!(!delta(&before, &after).restarted());
    }

    fn with_indexes(at: f64, indexes: &[(&str, f64)], seq_scan: f64) -> RawStats {
        let mut raw = raw(at, 1.0, 1.0, 1.0);
        for (name, scans) in indexes {
            raw.indexes.insert(
                format!("public.{name}"),
                IndexCounters {
                    table: "public.submissions".to_string(),
                    scans: *scans,
                },
            );
        }
        raw.tables.insert(
            "public.submissions".to_string(),
            TableCounters {
                seq_scan,
                seq_tup_read: seq_scan * 100.0,
                idx_scan: indexes.iter().map(|(_, s)| s).sum(),
            },
        );
        raw
    }

    #[test]
    fn a_dropped_index_is_vanished_not_a_reset() {
        let before = with_indexes(0.0, &[("idx_a", 100.0), ("idx_b", 40.0)], 10.0);
        let after = with_indexes(60.0, &[("idx_a", 130.0)], 70.0);
        let s = delta(&before, &after);
        assert!(s.resets.is_empty(), "{:?}", s.resets);
        assert_eq!(s.vanished, vec!["index public.idx_b".to_string()]);
        // The table's interval is kept: its sequential scans are what shows a lost index.
        let table = s.tables["public.submissions"];
        assert_eq!(table.seq_scan, 60.0);
        assert_eq!(table.idx_scan, 30.0);
    }

    #[test]
    fn an_index_whose_statistics_end_during_the_pass_is_being_dropped_not_reset() {
        // The pass's catalog snapshot still lists idx_b, but DROP INDEX committed before its
        // statistics were read: its scans read 0, and the table's sum lost them.
        let before = with_indexes(0.0, &[("idx_a", 100.0), ("idx_b", 40.0)], 10.0);
        let after = with_indexes(60.0, &[("idx_a", 130.0), ("idx_b", 0.0)], 70.0);
        let s = delta(&before, &after);
        assert!(s.resets.is_empty(), "{:?}", s.resets);
        let table = s.tables["public.submissions"];
        assert_eq!((table.seq_scan, table.idx_scan), (60.0, 30.0));
        assert!(!s.indexes.contains_key("public.idx_b"));
        // At the next pass it is gone from the catalog too: vanished, still no reset.
        let gone = with_indexes(120.0, &[("idx_a", 150.0)], 80.0);
        let s = delta(&after, &gone);
        assert!(s.resets.is_empty(), "{:?}", s.resets);
        assert_eq!(s.vanished, vec!["index public.idx_b".to_string()]);
        assert_eq!(s.tables["public.submissions"].idx_scan, 20.0);
        // An index whose scans went down but not to zero is still a reset.
        let lower = with_indexes(60.0, &[("idx_a", 130.0), ("idx_b", 10.0)], 70.0);
        assert!(delta(&before, &lower)
            .resets
            .contains(&"pg_stat_user_indexes".to_string()));
    }

    #[test]
    fn an_index_dropped_between_the_index_and_the_table_reads_is_no_reset() {
        // The index read still saw idx_b (40 scans); the table read, a moment later, summed
        // the table's idx_scan without it (readings taken in two statements, as the sampler
        // did before it read both in one).
        let before = with_indexes(0.0, &[("idx_a", 100.0), ("idx_b", 40.0)], 10.0);
        let mut after = with_indexes(60.0, &[("idx_a", 130.0), ("idx_b", 40.0)], 70.0);
        if let Some(t) = after.tables.get_mut("public.submissions") {
            t.idx_scan = 130.0;
        }
        let s = delta(&before, &after);
        assert!(s.resets.is_empty(), "{:?}", s.resets);
        let table = s.tables["public.submissions"];
        assert_eq!((table.seq_scan, table.idx_scan), (60.0, 30.0));
        // Next pass: gone from the index read too.
        let gone = with_indexes(120.0, &[("idx_a", 150.0)], 80.0);
        let s = delta(&after, &gone);
        assert!(s.resets.is_empty(), "{:?}", s.resets);
        assert_eq!(s.vanished, vec!["index public.idx_b".to_string()]);
        assert_eq!(s.tables["public.submissions"].idx_scan, 20.0);
    }

    #[test]
    fn a_dropped_table_is_vanished() {
        let before = with_indexes(0.0, &[("idx_a", 1.0)], 1.0);
        let mut after = before.clone();
        after.at = 60.0;
        after.tables.clear();
        after.indexes.clear();
        let s = delta(&before, &after);
        assert!(s.resets.is_empty(), "{:?}", s.resets);
        assert_eq!(
            s.vanished,
            vec![
                "index public.idx_a".to_string(),
                "table public.submissions".to_string()
            ]
        );
    }

    #[test]
    fn table_counters_going_backwards_without_a_dropped_index_are_a_reset() {
        let before = with_indexes(0.0, &[("idx_a", 100.0)], 10.0);
        let mut after = with_indexes(60.0, &[("idx_a", 100.0)], 5.0);
        after.at = 60.0;
        let s = delta(&before, &after);
        assert_eq!(s.resets, vec!["pg_stat_user_tables".to_string()]);
        assert!(s.vanished.is_empty());
    }
}

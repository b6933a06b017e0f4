//! Incremental integrity checks against a real PostgreSQL: new violations found by the next
//! increment, a deleted parent by the early sweep, an UPDATE of an old row by the next
//! complete sweep, resets (TRUNCATE, a key that went backwards) by a full sweep, and a daemon
//! killed with `kill -9` mid-sweep resuming from its stored position with its watermark.

mod common;

use std::time::Duration;

use common::{cognit_cluster, corrupt, target_toml, wait_until, ConfigDir, Version};
use deploywatch::checks::incremental::{Progress, Sweep, SweepReason};
use deploywatch::checks::outcome::{Observation, Status};
use deploywatch::config::Config;
use deploywatch::postgres::runner::RunReport;
use deploywatch::storage::actor::StoreActor;
use deploywatch::storage::incremental::{self, ProgressStore};
use deploywatch::storage::Store;
use deploywatch::watch::incremental::run_check;
use deploywatch::watch::scheduler::Pools;
use deploywatch_testkit::pgcluster::PgCluster;

const DB: &str = "cognit";

/// The checklist's own full-scan queries: the truth an incremental count must equal.
const FULL_SCAN: [(&str, &str); 5] = [
    (
        "invalid_attention_score",
        "SELECT COUNT(*) FROM attention_stats WHERE attention_score < 0 OR attention_score > 1",
    ),
    (
        "invalid_quality_score",
        "SELECT COUNT(*) FROM submissions WHERE quality_score IS NOT NULL AND (quality_score < 0 OR quality_score > 1)",
    ),
    (
        "ai_suspected_without_quality_score",
        "SELECT COUNT(*) FROM submissions WHERE ai_suspected = TRUE AND quality_score IS NULL",
    ),
    (
        "orphaned_payments",
        "SELECT COUNT(*) FROM payments p WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = p.participant_id)",
    ),
    (
        "orphaned_submissions",
        "SELECT COUNT(*) FROM submissions s WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = s.participant_id)",
    ),
];

/// The shipped cognit pack on one database, sweeping `max_rows` rows per chunk, its progress
/// in a store file.
struct Harness {
    cluster: PgCluster,
    /// Holds the configuration and the store file.
    _dir: ConfigDir,
    config: Config,
    pools: Pools,
    store: Store,
    progress: ProgressStore,
}

impl Harness {
    fn new(version: Version, max_rows: u64, extra_pack: Option<&str>) -> Harness {
        let cluster = cognit_cluster(version);
        let dir = ConfigDir::new();
        dir.add_shipped_pack("cognit-3.7.0.toml");
        if let Some(pack) = extra_pack {
            dir.write("checks/extra.toml", pack);
        }
        dir.write(
            "deploywatch.toml",
            &format!(
                "[defaults]\nsweep_max_rows = {max_rows}\n\n[store]\npath = \"state.sqlite\"\n\n{}",
                target_toml("cognit", &cluster, DB)
            ),
        );
        let config = dir.load();
        let pools = Pools::for_config(&Pools::default(), &config);
        let store = Store::open(&dir.path().join("state.sqlite")).expect("store");
        let progress = ProgressStore::new(&StoreActor::start(store.clone()).expect("store thread"));
        Harness {
            cluster,
            _dir: dir,
            config,
            pools,
            store,
            progress,
        }
    }

    async fn run(&self, check: &str) -> RunReport {
        let target = &self.config.targets[0];
        let spec = target
            .checks
            .iter()
            .find(|c| c.name == check)
            .unwrap_or_else(|| panic!("no check {check}"));
        let pool = self.pools.get(&target.name).expect("pool");
        run_check(pool, spec, &self.progress, &target.name).await
    }

    /// Runs `check` once and returns its value (panics on an error).
    async fn value(&self, check: &str) -> i64 {
        let report = self.run(check).await;
        value_of(check, &report)
    }

    fn sql(&self, sql: &str) -> String {
        self.cluster
            .psql(DB, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn full_scan(&self, check: &str) -> i64 {
        let sql = FULL_SCAN
            .iter()
            .find(|(name, _)| *name == check)
            .map(|(_, sql)| *sql)
            .expect("known check");
        self.sql(sql).trim().parse().expect("a count")
    }

    fn stored(&self, check: &str) -> Progress {
        incremental::load(&self.store, "cognit", check)
            .expect("load")
            .expect("stored progress")
            .1
    }

    /// Waits until the statistics show `n_tup_<what>` of `table` above `above`.
    async fn stats_show(&self, table: &str, what: &str, above: i64) {
        let sql = format!("SELECT n_tup_{what} FROM pg_stat_user_tables WHERE relname = '{table}'");
        wait_until(
            &format!("{table}.n_tup_{what} > {above}"),
            Duration::from_secs(30),
            || {
                let seen: i64 = self.sql(&sql).trim().parse().unwrap_or(0);
                async move { (seen > above).then_some(()) }
            },
        )
        .await;
    }
}

/// Waits at most `seconds` until `read` gives a progress whose sweep `accept` takes; that
/// progress.
async fn progress_where(
    what: &str,
    seconds: u64,
    read: &impl Fn() -> Option<Progress>,
    accept: impl Fn(&Sweep) -> bool,
) -> Progress {
    wait_until(what, Duration::from_secs(seconds), || {
        let progress = read().filter(|p| p.sweep.as_ref().is_some_and(&accept));
        async move { progress }
    })
    .await
}

fn value_of(check: &str, report: &RunReport) -> i64 {
    match &report.outcome.observation {
        Some(Observation::Number(n)) => n.to_f64() as i64,
        other => panic!(
            "{check}: expected a count, got {other:?} ({:?})",
            report.outcome.error
        ),
    }
}

fn counters(h: &Harness, table: &str, what: &str) -> i64 {
    h.sql(&format!(
        "SELECT n_tup_{what} FROM pg_stat_user_tables WHERE relname = '{table}'"
    ))
    .trim()
    .parse()
    .unwrap_or(0)
}

#[tokio::test]
async fn inserted_orphans_and_out_of_range_scores_are_found_by_the_next_increment() {
    // Chunks of 20 rows: the periodic sweep of 400 submissions (50 payments) takes several
    // runs, so what the second run finds, the increment found.
    let h = Harness::new(Version::V360, 20, None);
    for check in common::INTEGRITY_CHECKS {
        let first = h.run(check).await;
        assert_eq!(value_of(check, &first), 0, "{check}");
        let report = first.incremental.as_ref().expect("an incremental check");
        assert!(
            report.last_complete_sweep.is_some(),
            "{check}: the first run sweeps it all"
        );
    }
    for script in [
        "orphaned_submissions",
        "orphaned_payments",
        "invalid_quality_score",
        "ai_suspected_without_quality_score",
    ] {
        corrupt(&h.cluster, DB, script);
    }
    for (check, expected) in [
        ("orphaned_submissions", 6),
        ("orphaned_payments", 5),
        ("invalid_quality_score", 2),
        ("ai_suspected_without_quality_score", 4),
    ] {
        let report = h.run(check).await;
        assert_eq!(value_of(check, &report), expected, "{check}");
        assert_eq!(
            h.full_scan(check),
            expected,
            "{check}: the checklist's query agrees"
        );
        let incremental = report.incremental.expect("incremental");
        assert_eq!(
            incremental.sweep_reason,
            Some(SweepReason::Periodic),
            "{check}"
        );
        assert!(
            incremental.sweep_progress < 1.0,
            "{check}: found before the periodic sweep got through the table"
        );
        // New rows (at most 12 submissions) plus one paced chunk of 20, not the table.
        assert!(
            incremental.rows_examined <= 12 + 20,
            "{check}: examined {} rows",
            incremental.rows_examined
        );
        assert_eq!(report.outcome.status, Status::Fail, "{check}");
    }
    // A third run counts nothing twice: the recounted range replaces its earlier count.
    assert_eq!(h.value("orphaned_submissions").await, 6);
    assert_eq!(h.value("orphaned_submissions").await, 6);
}

#[tokio::test]
async fn a_deleted_parent_is_found_by_the_early_sweep() {
    let h = Harness::new(Version::V370, 50, None);
    assert_eq!(h.value("orphaned_submissions").await, 0);
    assert_eq!(h.value("orphaned_payments").await, 0);
    // A participant whose submission comes first, then one whose submission comes last;
    // deleting each orphans old rows. Each delete after the previous early sweep completed
    // starts one of its own.
    let mut orphaned = 0;
    // (The last one's other rows may lie anywhere: its run may end early or complete the sweep.)
    for (order, ends_early) in [("", true), ("DESC", false)] {
        let participant = h.sql(&format!(
            "SELECT s.participant_id FROM submissions s \
             WHERE EXISTS (SELECT 1 FROM participants p WHERE p.participant_id = s.participant_id) \
             ORDER BY s.submission_id {order} LIMIT 1"
        ));
        let participant = participant.trim();
        let before = counters(&h, "participants", "del");
        h.sql(&format!(
            "DELETE FROM participants WHERE participant_id = {participant}"
        ));
        h.stats_show("participants", "del", before).await;
        let submissions = h.full_scan("orphaned_submissions");
        assert!(submissions > orphaned);
        let rows: u64 = h
            .sql("SELECT count(*) FROM submissions")
            .trim()
            .parse()
            .expect("count");
        // The run ends as soon as a chunk raised the count, to export it: the first
        // participant's rows are in the sweep's first chunk of 50 (of 400 rows), so that run
        // ends before the sweep does, reporting what it found (never more than there is).
        let report = h.run("orphaned_submissions").await;
        let found = value_of("orphaned_submissions", &report);
        let incremental = report.incremental.expect("incremental");
        assert!(
            found > orphaned && found <= submissions,
            "{found} of {submissions}, {orphaned} before"
        );
        if ends_early {
            assert_eq!(incremental.sweep_reason, Some(SweepReason::Early));
            assert!(
                incremental.sweep_progress < 0.5,
                "ended early, at {}",
                incremental.sweep_progress
            );
        }
        if incremental.sweep_reason.is_some() {
            // The next run takes the rest, chunk after chunk, to the complete count.
            let rest = h.run("orphaned_submissions").await;
            assert_eq!(value_of("orphaned_submissions", &rest), submissions);
            let rest = rest.incremental.expect("incremental");
            assert_eq!(rest.sweep_reason, None, "the early sweep completed");
            assert!(incremental.rows_examined + rest.rows_examined >= rows);
        } else {
            assert_eq!(found, submissions);
            assert!(incremental.rows_examined >= rows, "a full sweep");
        }
        orphaned = submissions;
        // Payments: one chunk of 50 holds them all.
        let payments = h.full_scan("orphaned_payments");
        let report = h.run("orphaned_payments").await;
        assert_eq!(value_of("orphaned_payments", &report), payments);
        assert_eq!(
            report.incremental.expect("incremental").sweep_reason,
            None,
            "orphaned_payments"
        );
    }
}

/// With `early_sweep_watch`, the statistics are read between runs: a deleted parent starts the
/// check's run (and its early sweep) at once instead of at the next interval, an hour away.
#[tokio::test]
async fn the_statistics_watch_runs_the_check_when_a_parent_is_deleted() {
    let cluster = cognit_cluster(Version::V370);
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\nearly_sweep_watch = \"1s\"\n\n[checks]\ninterval_override = \"1h\"\n\n\
             [deployments]\nenabled = false\n\n[store]\npath = \"state.sqlite\"\n\n{}",
            target_toml("cognit", &cluster, DB)
        ),
    );
    let port = common::free_port();
    let mut daemon = common::spawn_daemon(&dir, port);
    let base = format!("http://127.0.0.1:{port}");
    // Waits until `check` exports `expected`.
    let value_is = |what: String, check: &'static str, expected: f64| {
        let base = base.clone();
        async move {
            common::wait_for_metrics(&base, &what, Duration::from_secs(60), |m| {
                let value = m.metric("deploywatch_check_value").label("check", check);
                (value.value_opt() == Some(expected)).then_some(())
            })
            .await
        }
    };
    // The first runs (full sweeps) at start; the next ones due in an hour.
    for check in ["orphaned_submissions", "orphaned_payments"] {
        value_is(format!("{check}: the first count"), check, 0.0).await;
    }
    let participant = cluster
        .psql(
            DB,
            "SELECT p.participant_id FROM participants p \
             WHERE EXISTS (SELECT 1 FROM submissions s WHERE s.participant_id = p.participant_id) \
               AND EXISTS (SELECT 1 FROM payments y WHERE y.participant_id = p.participant_id) \
             ORDER BY p.participant_id LIMIT 1",
        )
        .expect("participant");
    cluster
        .psql(
            DB,
            &format!(
                "DELETE FROM participants WHERE participant_id = {}",
                participant.trim()
            ),
        )
        .expect("delete");
    let count = |sql: &str| -> f64 {
        cluster
            .psql(DB, sql)
            .expect("count")
            .trim()
            .parse()
            .expect("a number")
    };
    let submissions = count(FULL_SCAN[4].1);
    let payments = count(FULL_SCAN[3].1);
    assert!(submissions >= 1.0 && payments >= 1.0);
    for (check, expected) in [
        ("orphaned_submissions", submissions),
        ("orphaned_payments", payments),
    ] {
        let what = format!("{check} = {expected} long before the next interval");
        value_is(what, check, expected).await;
    }
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
}

/// A pack whose attention check is incremental but never swept early: only the periodic sweep
/// can find an updated old row.
const NO_EARLY_SWEEP: &str = include_str!("fixtures/packs/late.toml");

/// An orphan check swept over its parent's key, and two whose sweep key cannot work.
const SWEEP_BY_PARENT: &str = include_str!("fixtures/packs/sweep_by_parent.toml");

/// An orphan check that sweeps over the parent's key (`sweep_key`): an old row orphaned by a
/// delete, with the statistics not consulted, is found by the next complete sweep; a new orphan
/// inserted in the range that sweep has still to cover is counted once, by the increment.
#[tokio::test]
async fn a_sweep_over_the_parent_key_finds_an_orphaned_old_row_and_counts_new_rows_once() {
    // 400 submissions, chunks of 50.
    let h = Harness::new(Version::V370, 50, Some(SWEEP_BY_PARENT));
    let check = "late_orphaned_submissions";
    assert_eq!(h.value(check).await, 0, "first run: a full sweep");
    assert_eq!(h.value(check).await, 0, "a periodic sweep starts");
    let sweep = h.stored(check).sweep.expect("a periodic sweep");
    assert_eq!(sweep.reason, SweepReason::Periodic);
    assert!(sweep.rows >= 50 && sweep.rows < 400, "one chunk done");
    // The largest participant id: its rows are in the sweep's last chunk, still ahead.
    let participant: i64 = h
        .sql(
            "SELECT max(s.participant_id) FROM submissions s \
             WHERE EXISTS (SELECT 1 FROM participants p WHERE p.participant_id = s.participant_id)",
        )
        .trim()
        .parse()
        .expect("a participant id");
    h.sql(&format!(
        "DELETE FROM participants WHERE participant_id = {participant}"
    ));
    let old = h.full_scan("orphaned_submissions");
    assert!(old > 0, "the participant had submissions");
    // A new row of the deleted participant: past the sweep's bound on submission_id, within
    // its participant range.
    h.sql(&format!(
        "INSERT INTO submissions (participant_id, task_id) VALUES ({participant}, 'late')"
    ));
    let truth = old + 1;
    assert_eq!(h.full_scan("orphaned_submissions"), truth);
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs <= 20, "the sweep never completed");
        let value = h.value(check).await;
        assert!(
            value <= truth,
            "{value} counted, {truth} exist: a row was counted twice"
        );
        let same_sweep = h
            .stored(check)
            .sweep
            .as_ref()
            .is_some_and(|s| s.started_at == sweep.started_at);
        if !same_sweep {
            assert_eq!(value, truth, "the complete sweep found the old orphans");
            break;
        }
        assert!(value >= 1, "the increment counted the new orphan at once");
    }
    assert!(runs >= 3, "found by the paced sweep ({runs} runs)");
    // And nothing is counted twice afterwards.
    assert_eq!(h.value(check).await, truth);
    assert_eq!(h.value(check).await, truth);
}

/// A periodic sweep is paced by its period and the check's interval, not by a row budget: with
/// a 10 s interval and a 100 s period it takes a share of the table per run and completes
/// within the period's runs, whatever `sweep_max_rows` would allow.
#[tokio::test]
async fn a_paced_sweep_completes_within_its_period() {
    let h = Harness::new(Version::V370, 10_000, Some(SWEEP_BY_PARENT));
    // 20 thousand rows more, so that a run's share is above the smallest chunk (1000 rows).
    h.sql(
        "INSERT INTO submissions (participant_id, task_id, quality_score) \
         SELECT 1, 'bulk', 0.5 FROM generate_series(1, 20000); ANALYZE submissions",
    );
    let check = "paced_quality_score";
    assert_eq!(h.value(check).await, 0, "first run: a full sweep");
    let mut runs = 0;
    let started = loop {
        runs += 1;
        assert_eq!(h.value(check).await, 0);
        let sweep = h.stored(check).sweep.expect("a periodic sweep");
        if runs == 1 {
            break sweep.started_at;
        }
    };
    loop {
        runs += 1;
        assert!(
            runs <= 10,
            "not complete after {runs} runs of 10 s: past its 100 s period"
        );
        assert_eq!(h.value(check).await, 0);
        let stored = h.stored(check);
        if stored.sweep.is_none_or(|s| s.started_at != started) {
            break;
        }
    }
    assert!(
        runs >= 5,
        "paced over the period, not swept at once ({runs} runs)"
    );
}

#[tokio::test]
async fn a_sweep_key_that_may_be_null_or_is_not_a_column_is_an_error() {
    let h = Harness::new(Version::V370, 50, Some(SWEEP_BY_PARENT));
    for (check, message) in [
        (
            "nullable_sweep_key",
            "sweep_key \"reward_id\" of payments may be NULL",
        ),
        (
            "missing_sweep_key",
            "sweep_key \"no_such_column\" is not a column of payments",
        ),
    ] {
        let report = h.run(check).await;
        let error = report.outcome.error.expect("an error");
        assert!(
            error.message.contains(message),
            "{check}: {}",
            error.message
        );
    }
}

#[tokio::test]
async fn an_update_that_breaks_an_old_row_is_found_by_the_next_complete_sweep() {
    // 100 attention_stats rows, chunks of 30: a sweep takes 4 runs.
    let h = Harness::new(Version::V360, 30, Some(NO_EARLY_SWEEP));
    let check = "late_invalid_attention_score";
    assert_eq!(h.value(check).await, 0, "first run: full sweep");
    assert_eq!(h.value(check).await, 0, "a periodic sweep starts");
    let passed = h.stored(check).sweep.expect("a periodic sweep");
    assert!(passed.rows >= 30, "its first chunk is done");
    // Break the three lowest participant ids: rows this sweep has already passed.
    corrupt(&h.cluster, DB, "invalid_attention_score");
    h.stats_show("attention_stats", "upd", 0).await;
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs <= 12, "never found");
        let value = h.value(check).await;
        let stored = h.stored(check);
        let same_sweep = stored
            .sweep
            .as_ref()
            .is_some_and(|s| s.started_at == passed.started_at);
        if value == 3 {
            assert!(
                !same_sweep,
                "found by a later sweep, not the one that had passed them"
            );
            break;
        }
        assert_eq!(value, 0, "increments cannot see an updated old row");
    }
    assert!(
        runs >= 3,
        "the sweep in flight had to finish first ({runs} runs)"
    );
    assert_eq!(h.full_scan("invalid_attention_score"), 3);
    // With early sweeps (the shipped pack), the statistics find it on the next run.
    let shipped = h.run("invalid_attention_score").await;
    assert_eq!(value_of("invalid_attention_score", &shipped), 3);
    assert_eq!(h.value("invalid_attention_score").await, 3);
    let before = counters(&h, "attention_stats", "upd");
    h.sql("UPDATE attention_stats SET attention_score = 1.5 WHERE participant_id = (SELECT max(participant_id) - 10 FROM attention_stats)");
    h.stats_show("attention_stats", "upd", before).await;
    let report = h.run("invalid_attention_score").await;
    assert_eq!(
        value_of("invalid_attention_score", &report),
        4,
        "early sweep on n_tup_upd"
    );
}

#[tokio::test]
async fn a_truncate_or_a_key_going_backwards_resets_to_a_full_sweep() {
    let h = Harness::new(Version::V360, 50, None);
    let check = "orphaned_submissions";
    corrupt(&h.cluster, DB, "orphaned_submissions");
    assert_eq!(h.value(check).await, 6);
    // TRUNCATE (the sequence goes on, so keys do not go backwards) and two new orphans.
    h.sql("TRUNCATE submissions CASCADE");
    h.sql(
        "INSERT INTO submissions (participant_id, task_id, quality_score) \
         VALUES (-1, 't', 0.5), (-2, 't', 0.5)",
    );
    let report = h.run(check).await;
    assert!(report.incremental.as_ref().is_some_and(|r| r.reset));
    assert_eq!(value_of(check, &report), 2, "the old 6 are gone, not added");
    assert_eq!(h.full_scan(check), 2);
    // A restore from an older backup in place: the newest rows disappear, the key goes back.
    h.sql(
        "INSERT INTO submissions (participant_id, task_id, quality_score) \
         SELECT -10 - g, 't', 0.5 FROM generate_series(1, 5) g",
    );
    assert_eq!(h.value(check).await, 7);
    h.sql(
        "DELETE FROM submissions WHERE submission_id > (SELECT min(submission_id) FROM submissions)",
    );
    let report = h.run(check).await;
    assert!(report.incremental.as_ref().is_some_and(|r| r.reset));
    assert_eq!(value_of(check, &report), 1);
    assert_eq!(h.full_scan(check), 1);
    // No reset without a cause.
    let report = h.run(check).await;
    assert!(report.incremental.as_ref().is_some_and(|r| !r.reset));
    assert_eq!(value_of(check, &report), 1);
}

/// `kill -9` during a periodic sweep: the restarted daemon continues the same sweep from its
/// stored position and keeps its watermark and count (no new full sweep).
#[tokio::test]
async fn kill_9_mid_sweep_resumes_from_the_stored_position_with_the_watermark() {
    let cluster = cognit_cluster(Version::V360);
    corrupt(&cluster, DB, "orphaned_submissions");
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    // 406 submissions in chunks of 10: a periodic sweep takes about 40 one-second runs.
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\nsweep_max_rows = 10\n\n[checks]\ninterval_override = \"1s\"\n\n\
             [deployments]\nenabled = false\n\n[store]\npath = \"state.sqlite\"\n\n{}",
            target_toml("cognit", &cluster, DB)
        ),
    );
    let store_path = dir.path().join("state.sqlite");
    // Only a store the daemon has created: opening creates the file, and a daemon starting at
    // that instant would find an SQLite file with no tables yet.
    let read = || -> Option<Progress> {
        if !store_path.exists() {
            return None;
        }
        let store = Store::open(&store_path).ok()?;
        incremental::load(&store, "cognit", "orphaned_submissions")
            .ok()?
            .map(|p| p.1)
    };
    let port = common::free_port();
    let mut daemon = common::spawn_daemon(&dir, port);
    // Mid-way through the periodic sweep that follows the first one.
    let before = progress_where("a periodic sweep past 100 rows", 90, &read, |s| {
        s.reason == SweepReason::Periodic && s.rows >= 100 && s.rows < 300
    })
    .await;
    common::signal(daemon.id().expect("pid"), "-9");
    let _ = daemon.wait().await;
    let killed_at = read().expect("stored");
    let sweep = killed_at.sweep.clone().expect("a sweep in flight");
    assert_eq!(killed_at.value(), Some(6));
    // New rows while it is down: the watermark must make the restarted daemon count them
    // once, without a full sweep.
    cluster
        .psql(
            DB,
            "INSERT INTO submissions (participant_id, task_id, quality_score) VALUES (-3001, 't', 0.5)",
        )
        .expect("insert");
    let mut daemon = common::spawn_daemon(&dir, port);
    let after = progress_where("the sweep moves on after the restart", 60, &read, |s| {
        s.rows > sweep.rows
    })
    .await;
    let resumed = after.sweep.clone().expect("sweep");
    assert_eq!(
        resumed.started_at, sweep.started_at,
        "the same sweep, not a new one"
    );
    assert_eq!(resumed.reason, SweepReason::Periodic);
    assert!(resumed.rows > sweep.rows && resumed.rows < sweep.rows + 100);
    assert!(before.sweep.as_ref().is_some_and(|s| s.rows <= sweep.rows));
    assert_eq!(
        after.base_count, killed_at.base_count,
        "the base count survived"
    );
    assert_eq!(
        after.value(),
        Some(7),
        "6 before the kill + 1 new, counted once"
    );
    // And the exported value says so.
    common::wait_for_metrics(
        &format!("http://127.0.0.1:{port}"),
        "the value 7 exported",
        Duration::from_secs(30),
        |scrape| {
            (scrape
                .metric("deploywatch_check_value")
                .label("check", "orphaned_submissions")
                .value_opt()
                == Some(7.0))
            .then_some(())
        },
    )
    .await;
    let _ = daemon.start_kill();
    let _ = daemon.wait().await;
}

//! Incremental integrity checks at production size. Run with `cargo bench --bench incremental`;
//! prints Markdown for BENCHMARKS.md.
//!
//! The cognit fixture at `DEPLOYWATCH_BENCH_SCALE` (default 25000: 10 million submissions) on
//! the 3.6.0 schema, under the light application workload (inserts of participants,
//! submissions, payments and the read paths). Measured:
//! 1. database time of one cycle of the five integrity checks: the checklist's full scans
//!    against the shipped incremental checks in steady state (increments + one paced sweep
//!    chunk each, at the pack's 5-minute interval and the default 1-day period);
//! 2. a complete periodic sweep at the default budget, run back to back;
//! 3. with the daemon running the checks every `DEPLOYWATCH_BENCH_INTERVAL` seconds (default
//!    30) and reading the statistics every `DEPLOYWATCH_BENCH_WATCH` (`early_sweep_watch`,
//!    default 5s, "off" for none): time from inserting an orphan to its detection, and from
//!    deleting a parent to the detection of its orphaned children.
//!
//! The fixture is built set-based ([`FIXTURE`], `generate_series`, the distributions of
//! `cognit_generate`) with the tables the integrity checks and the workload read: participants,
//! consents, submissions, attention_stats, rewards and payments; responses, images and
//! attention_checks, which no integrity check reads, are left empty. No row violates a check.
//! `DEPLOYWATCH_BENCH_DATABASE_URL` points the benchmark at a database already holding it
//! (schema_3.6.0.sql, then [`FIXTURE`] with `-v n=2500000`) instead, and is left as it was found
//! apart from the rows the workload and the benchmark add and the participants it deletes.

#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use common::setting;
use deploywatch::config::Config;
use deploywatch::postgres::runner::{query_read_only, RunReport};
use deploywatch::storage::incremental::ProgressStore;
use deploywatch::storage::Store;
use deploywatch::watch::incremental::run_check;
use deploywatch::watch::scheduler::Pools;
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};
use tokio_util::sync::CancellationToken;

/// The checklist's own queries: what deploywatch ran before checks became incremental.
const FULL_SCAN: [(&str, &str); 5] = [
    (
        "invalid_attention_score",
        "SELECT COUNT(*)::bigint FROM attention_stats WHERE attention_score < 0 OR attention_score > 1",
    ),
    (
        "invalid_quality_score",
        "SELECT COUNT(*)::bigint FROM submissions WHERE quality_score IS NOT NULL AND (quality_score < 0 OR quality_score > 1)",
    ),
    (
        "ai_suspected_without_quality_score",
        "SELECT COUNT(*)::bigint FROM submissions WHERE ai_suspected = TRUE AND quality_score IS NULL",
    ),
    (
        "orphaned_payments",
        "SELECT COUNT(*)::bigint FROM payments p WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = p.participant_id)",
    ),
    (
        "orphaned_submissions",
        "SELECT COUNT(*)::bigint FROM submissions s WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = s.participant_id)",
    ),
];

/// The fixture for `:n` participants (4 `:n` submissions), set-based; no row violates a check.
const FIXTURE: &str = r#"
INSERT INTO participants (participant_id, email, country, created_at, deleted_at)
SELECT g, 'participant-' || g || '@example.org', (ARRAY['DE', 'FR', 'GB', 'US', 'NL'])[1 + g % 5],
       now() - (g % 90) * interval '1 day', CASE WHEN g % 25 = 0 THEN now() - interval '1 day' END
FROM generate_series(1, :n) AS g;
SELECT setval('participants_participant_id_seq', :n);
INSERT INTO consents (participant_id, consent_version, granted_at, withdrawn_at)
SELECT g, '2.' || (g % 3), now() - (g % 90) * interval '1 day',
       CASE WHEN g % 20 = 0 THEN now() - interval '2 days' END
FROM generate_series(1, :n) AS g;
INSERT INTO submissions (submission_id, participant_id, task_id, submitted_at, quality_score,
                         ai_suspected, flagged, review_status)
SELECT (i - 1) * 4 + j, i, 'task-' || j, now() - ((i * j) % 720) * interval '1 hour',
       CASE WHEN (i * 3 + j) % 10 <> 0 AND (i + j) % 7 = 0 THEN NULL
            ELSE ((i * 37 + j * 11) % 101) / 100.0 END,
       (i * 3 + j) % 10 = 0,
       (i * 3 + j) % 10 = 0 OR (i + j) % 13 = 0,
       (ARRAY['pending', 'accepted', 'rejected'])[1 + (i + j) % 3]
FROM generate_series(1, :n) AS i CROSS JOIN generate_series(1, 4) AS j
ORDER BY 1;
SELECT setval('submissions_submission_id_seq', 4 * :n);
INSERT INTO attention_stats (participant_id, checks_total, checks_passed, attention_score)
SELECT g, 3, p, round(CAST(p AS numeric) / 3, 4)
FROM generate_series(1, :n) AS g
CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE (g + k) % 4 <> 0)::int AS p
                    FROM generate_series(1, 3) AS k) c;
INSERT INTO rewards (reward_id, participant_id, amount_cents, status, created_at, paid_at)
SELECT g, g, 500 + (g % 5) * 100, (ARRAY['pending', 'approved', 'paid', 'cancelled'])[1 + g % 4],
       now() - (g % 30) * interval '1 day',
       CASE WHEN g % 4 = 2 THEN now() - (g % 30) * interval '1 hour' END
FROM generate_series(1, :n) AS g;
SELECT setval('rewards_reward_id_seq', :n);
INSERT INTO payments (participant_id, reward_id, amount_cents, status, paid, provider_ref, paid_at)
SELECT r.participant_id, r.reward_id, r.amount_cents, s.status, s.status = 'paid',
       CASE WHEN s.status = 'paid' THEN 'tx-' || r.reward_id END, r.paid_at
FROM rewards r
CROSS JOIN LATERAL (SELECT CASE WHEN r.status = 'paid' THEN 'paid'
                                WHEN (r.participant_id / 4) % 2 = 0 THEN 'pending'
                                ELSE 'failed' END AS status) s
WHERE r.status IN ('paid', 'approved')
ORDER BY r.reward_id;
VACUUM ANALYZE participants, consents, submissions, attention_stats, rewards, payments;
"#;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return f64::NAN;
    }
    values[values.len() / 2]
}

struct Setup {
    _cluster: Option<PgCluster>,
    url: String,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    if let Ok(url) = std::env::var("DEPLOYWATCH_BENCH_DATABASE_URL") {
        return Setup {
            _cluster: None,
            url,
            dir: tempfile::tempdir().expect("tempdir"),
        };
    }
    let scale: u32 = setting("DEPLOYWATCH_BENCH_SCALE", 25_000);
    let cluster = PgCluster::start(ClusterOptions::default()).expect("PostgreSQL");
    cluster.create_database("cognit").expect("db");
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testkit/fixtures/cognit");
    cluster
        .psql_file("cognit", &fixtures.join("schema_3.6.0.sql"))
        .expect("schema");
    eprintln!("generating the fixture at scale {scale} ...");
    let started = Instant::now();
    let file = tempfile::NamedTempFile::new().expect("fixture file");
    let participants = u64::from(scale) * 100;
    std::fs::write(
        file.path(),
        FIXTURE.replace(":n", &participants.to_string()),
    )
    .expect("fixture file");
    cluster.psql_file("cognit", file.path()).expect("fixture");
    eprintln!("generated in {:.0?}", started.elapsed());
    Setup {
        url: cluster.connection_string("cognit"),
        _cluster: Some(cluster),
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

fn write_config(setup: &Setup, interval: Option<u64>) -> Config {
    let dir = setup.dir.path();
    std::fs::create_dir_all(dir.join("checks")).expect("checks");
    let pack = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/checks/cognit-3.7.0.toml"),
    )
    .expect("pack");
    std::fs::write(dir.join("checks/cognit.toml"), pack).expect("pack");
    let checks = match interval {
        Some(seconds) => {
            // The statistics watch between runs (`DEPLOYWATCH_BENCH_WATCH`, default 5s; "off"
            // leaves it out).
            let watch = std::env::var("DEPLOYWATCH_BENCH_WATCH").unwrap_or_else(|_| "5s".into());
            let defaults = if watch == "off" {
                String::new()
            } else {
                format!("[defaults]\nearly_sweep_watch = \"{watch}\"\n\n")
            };
            format!("{defaults}[checks]\ninterval_override = \"{seconds}s\"\n\n")
        }
        None => String::new(),
    };
    std::fs::write(
        dir.join("deploywatch.toml"),
        format!(
            "{checks}[deployments]\nenabled = false\n\n[store]\npath = \"state.sqlite\"\n\n\
             [[targets]]\nname = \"cognit\"\nurl = \"{}\"\n\
             # the application's own (superuser) role of a throwaway benchmark database\n\
             allow_superuser = true\n",
            setup.url
        ),
    )
    .expect("config");
    Config::load(&dir.join("deploywatch.toml")).expect("config loads")
}

struct Cycle {
    seconds: f64,
    rows: u64,
}

async fn incremental_cycle(config: &Config, pools: &Pools, progress: &ProgressStore) -> Cycle {
    let target = &config.targets[0];
    let pool = pools.get(&target.name).expect("pool");
    let started = Instant::now();
    let mut rows = 0;
    for (name, _) in FULL_SCAN {
        let spec = target
            .checks
            .iter()
            .find(|c| c.name == name)
            .expect("check in pack");
        let report: RunReport = run_check(pool, spec, progress, &target.name).await;
        assert!(
            report.outcome.error.is_none(),
            "{name}: {:?}",
            report.outcome.error
        );
        rows += report.incremental.map(|r| r.rows_examined).unwrap_or(0);
    }
    Cycle {
        seconds: started.elapsed().as_secs_f64(),
        rows,
    }
}

async fn full_cycle(config: &Config, pools: &Pools) -> f64 {
    let pool = pools.get(&config.targets[0].name).expect("pool");
    let started = Instant::now();
    for (name, sql) in FULL_SCAN {
        query_read_only(
            pool,
            sql,
            &[],
            Duration::from_secs(600),
            Duration::from_secs(2),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    started.elapsed().as_secs_f64()
}

async fn psql(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(connection);
    client.batch_execute(sql).await.expect(sql);
    drop(client);
    let _ = driver.await;
}

/// Runs one statement as the application; returns the rows it changed.
async fn execute(url: &str, sql: &str) -> u64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(connection);
    let changed = client.execute(sql, &[]).await.expect(sql);
    drop(client);
    let _ = driver.await;
    changed
}

/// The exported orphaned_submissions count (0 while there is none), then a pause of `millis`:
/// where in the sweep cycle the next change lands.
async fn orphans_then_pause(base: &str, millis: u64) -> f64 {
    let current = scrape_value(base, "orphaned_submissions")
        .await
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_millis(millis)).await;
    current
}

async fn scrape_value(base: &str, check: &str) -> Option<f64> {
    let (_, body) = deploywatch::commands::client::get(&format!("{base}/metrics"), "*/*")
        .await
        .ok()?;
    body.lines()
        .filter(|l| l.starts_with("deploywatch_check_value{"))
        .find(|l| l.contains(&format!("check=\"{check}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn wait_for(base: &str, check: &str, above: f64, limit: Duration) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if scrape_value(base, check).await.is_some_and(|v| v > above) {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::main]
async fn main() {
    let setup = setup();
    let cancel = CancellationToken::new();
    let (workload, counters) = deploywatch_testkit::workload::spawn(
        &setup.url,
        5,
        Duration::from_millis(100),
        cancel.clone(),
    )
    .await
    .expect("workload");

    // 1. Cost per cycle.
    let config = write_config(&setup, None);
    let pools = Pools::for_config(&Pools::default(), &config);
    let store = Store::open(&setup.dir.path().join("bench-progress.sqlite")).expect("store");
    let progress = ProgressStore::new(
        &deploywatch::storage::actor::StoreActor::start(store.clone()).expect("store thread"),
    );
    let mut full: Vec<f64> = Vec::new();
    for _ in 0..3 {
        full.push(full_cycle(&config, &pools).await);
    }
    let first = incremental_cycle(&config, &pools, &progress).await;
    let mut steady = Vec::new();
    let mut steady_rows = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cycle = incremental_cycle(&config, &pools, &progress).await;
        steady.push(cycle.seconds);
        steady_rows.push(cycle.rows as f64);
    }
    let full_median = median(&mut full);
    let steady_mean = steady.iter().sum::<f64>() / steady.len().max(1) as f64;
    let steady_median = median(&mut steady);
    let rows_median = median(&mut steady_rows);

    // 2. A complete periodic sweep at the default budget, back to back.
    let sweep_started = Instant::now();
    let mut cycles = 0;
    let mut sweep_db = 0.0;
    let completed = loop {
        let cycle = incremental_cycle(&config, &pools, &progress).await;
        cycles += 1;
        sweep_db += cycle.seconds;
        let done = FULL_SCAN.iter().all(|(name, _)| {
            deploywatch::storage::incremental::load(&store, "cognit", name)
                .ok()
                .flatten()
                .and_then(|(_, p)| p.last_complete_at)
                .is_some_and(|t| {
                    t > deploywatch::time::unix_now() - sweep_started.elapsed().as_secs_f64()
                })
        });
        if done || cycles >= 2_000 {
            break done;
        }
    };
    pools.close_all();

    // 3. Detection with the daemon.
    let interval: u64 = setting("DEPLOYWATCH_BENCH_INTERVAL", 30);
    let trials: usize = setting("DEPLOYWATCH_BENCH_TRIALS", 3);
    let daemon_config = write_config(&setup, Some(interval));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = deploywatch::daemon::start(daemon_config, listener).expect("daemon");
    let base = format!("http://{}", handle.local_addr);
    let limit = Duration::from_secs(interval * 4 + 120);
    // Wait for the first values (the first run of each check is a full sweep).
    for (name, _) in FULL_SCAN {
        wait_for(&base, name, -1.0, limit)
            .await
            .expect("first value");
    }
    let mut insert_times = Vec::new();
    let mut delete_times = Vec::new();
    for trial in 0..trials {
        let current =
            orphans_then_pause(&base, 1_000 + 3_700 * trial as u64 % (interval * 1000)).await;
        psql(
            &setup.url,
            &format!(
                "INSERT INTO submissions (participant_id, task_id, quality_score) VALUES ({}, 'bench-orphan', 0.5)",
                -900_000 - trial as i64
            ),
        )
        .await;
        insert_times.push(wait_for(&base, "orphaned_submissions", current, limit).await);

        let current =
            orphans_then_pause(&base, 2_300 + 5_100 * trial as u64 % (interval * 1000)).await;
        // A participant that still exists, with submissions in the middle of the table (a
        // later trial's a little further on): each delete orphans rows the sweep must reach.
        let deleted = execute(
            &setup.url,
            &format!(
                "DELETE FROM participants WHERE participant_id = ( \
                     SELECT s.participant_id FROM submissions s \
                     WHERE s.submission_id >= (SELECT (min(submission_id) + max(submission_id)) / 2 \
                                               FROM submissions) + {} \
                       AND EXISTS (SELECT 1 FROM participants p \
                                   WHERE p.participant_id = s.participant_id) \
                     ORDER BY s.submission_id LIMIT 1)",
                trial * 1000
            ),
        )
        .await;
        assert_eq!(deleted, 1, "one participant deleted");
        delete_times.push(wait_for(&base, "orphaned_submissions", current, limit).await);
    }
    handle.shutdown().await.expect("shutdown");
    cancel.cancel();
    let _ = workload.await;

    let submissions = {
        let (client, connection) = tokio_postgres::connect(&setup.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT count(*) FROM submissions", &[])
            .await
            .expect("count");
        row.get::<_, i64>(0)
    };
    let show = |times: &[Option<f64>]| {
        times
            .iter()
            .map(|t| {
                t.map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "not detected".into())
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("### Incremental integrity checks ({submissions} submissions)\n");
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| full-scan cycle of the five checks (median of 3) | {full_median:.2} s |");
    println!(
        "| first incremental cycle (five full sweeps in chunks) | {:.2} s, {} rows |",
        first.seconds, first.rows
    );
    println!(
        "| steady incremental cycle (median of 20, 2 s apart) | {:.4} s, {rows_median:.0} rows examined |",
        steady_median
    );
    println!(
        "| steady / full | 1/{:.0} (mean of the 20: {steady_mean:.4} s, 1/{:.0}) |",
        full_median / steady_median.max(1e-9),
        full_median / steady_mean.max(1e-9)
    );
    println!(
        "| periodic sweep at the default budget | {} in {cycles} cycles ({:.1} s of cycles back to back; {:.0} h at one cycle per 5 min) |",
        if completed { "complete" } else { "NOT complete" },
        sweep_db,
        cycles as f64 * 300.0 / 3600.0
    );
    let watch = std::env::var("DEPLOYWATCH_BENCH_WATCH").unwrap_or_else(|_| "5s".into());
    println!(
        "| orphan inserted → detected (interval {interval} s, early_sweep_watch {watch}) | {} |",
        show(&insert_times)
    );
    println!(
        "| parent deleted → orphans detected (interval {interval} s, early_sweep_watch {watch}) | {} |",
        show(&delete_times)
    );
    println!(
        "\nworkload statements executed: {}",
        counters.executed.load(std::sync::atomic::Ordering::Relaxed)
    );
}

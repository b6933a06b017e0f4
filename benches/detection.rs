//! Detection benchmark. Run with `cargo bench --bench detection`; prints Markdown for
//! BENCHMARKS.md.
//!
//! 1. Detection quality of the first-day query-latency rule on injected slowdowns (1.2x, 1.5x,
//!    2x, 5x) and false alarms with no change, over many seeds: per-sample mean latencies are
//!    drawn from a log-normal noise model around the query's true time, as the rule sees them.
//! 2. The database-side cost of one sampling pass with a few thousand statements in
//!    pg_stat_statements, on a real PostgreSQL.

#[allow(dead_code)]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use deploywatch::analysis::regression::{judge, Thresholds};
use deploywatch::analysis::sample::{Sample, StatementDelta};
use deploywatch::analysis::window::Window;
use deploywatch::config::Config;
use deploywatch_testkit::pgcluster::ClusterOptions;

use common::random::Lcg;

fn sample(at: f64, mean_ms: f64) -> Sample {
    let mut statements = BTreeMap::new();
    statements.insert(
        "42".to_string(),
        StatementDelta {
            calls: 50.0,
            total_ms: mean_ms * 50.0,
            rows: 50.0,
            query: "SELECT hot".into(),
        },
    );
    Sample::of_statements(at, 60.0, statements)
}

const BASELINE: usize = 60;
const WINDOW_MAX: usize = 60;
const SIGMA: f64 = 0.25;

/// Whether the rule flags the query when the window closes after WINDOW_MAX samples.
fn flagged_at_close(seed: u64, factor: f64, t: &Thresholds) -> bool {
    let mut rng = Lcg(seed.wrapping_mul(7919).wrapping_add(17));
    let base_ms = 2.0;
    let baseline: Vec<Sample> = (0..BASELINE)
        .map(|i| sample(i as f64 * 60.0, base_ms * (SIGMA * rng.normal()).exp()))
        .collect();
    let window: Vec<Sample> = (0..WINDOW_MAX)
        .map(|i| {
            sample(
                1e6 + i as f64 * 60.0,
                base_ms * factor * (SIGMA * rng.normal()).exp(),
            )
        })
        .collect();
    !judge(Window::FirstDay, &baseline, &window, &window, true, t)
        .regressions
        .is_empty()
}

/// Samples until the rule flags the query in the open window (None: not within WINDOW_MAX).
fn samples_to_detect(seed: u64, factor: f64, t: &Thresholds) -> Option<usize> {
    let mut rng = Lcg(seed.wrapping_mul(7919).wrapping_add(17));
    let base_ms = 2.0;
    let baseline: Vec<Sample> = (0..BASELINE)
        .map(|i| sample(i as f64 * 60.0, base_ms * (SIGMA * rng.normal()).exp()))
        .collect();
    let mut window = Vec::new();
    for i in 0..WINDOW_MAX {
        window.push(sample(
            1e6 + i as f64 * 60.0,
            base_ms * factor * (SIGMA * rng.normal()).exp(),
        ));
        if window.len() < t.min_samples {
            continue;
        }
        let j = judge(Window::FirstDay, &baseline, &window, &window, false, t);
        if !j.regressions.is_empty() {
            return Some(window.len());
        }
    }
    None
}

fn quality() {
    let t = Thresholds::default();
    let seeds = 300u64;
    println!("## Detection quality: first-day query-latency rule\n");
    println!(
        "Model: one query, true time 2 ms, per-sample means log-normal (sigma {SIGMA}, i.e. about +/-25 % noise), \
         {BASELINE} baseline samples, window samples arriving one per sampling interval (1 min by default), \
         thresholds +20 %, p < 0.01, >= 3 samples. {seeds} seeds per row.\n"
    );
    println!("| slowdown | flagged while the window is open (within {WINDOW_MAX} samples) | median samples to detect | 90th percentile | flagged at the window's close |");
    println!("| --- | --- | --- | --- | --- |");
    for factor in [1.0, 1.2, 1.5, 2.0, 5.0] {
        let mut times: Vec<usize> = (0..seeds)
            .filter_map(|s| samples_to_detect(s, factor, &t))
            .collect();
        times.sort_unstable();
        let rate = times.len() as f64 / seeds as f64 * 100.0;
        let median = times
            .get(times.len() / 2)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into());
        let p90 = times
            .get(times.len() * 9 / 10)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into());
        let label = if factor == 1.0 {
            "none (false alarms)".to_string()
        } else {
            format!("{factor}x")
        };
        let at_close = (0..seeds)
            .filter(|s| flagged_at_close(*s, factor, &t))
            .count() as f64
            / seeds as f64
            * 100.0;
        println!("| {label} | {rate:.1} % | {median} | {p90} | {at_close:.1} % |");
    }
    println!();
}

async fn sampling_cost() {
    let options = ClusterOptions {
        extra_conf: vec![("pg_stat_statements.max".into(), "10000".into())],
        ..ClusterOptions::default()
    };
    let cluster = common::cluster_with(options, "bench");
    cluster
        .psql("bench", "CREATE EXTENSION pg_stat_statements")
        .expect("extension");
    let columns: Vec<String> = (0..80).map(|i| format!("c{i} int")).collect();
    cluster
        .psql(
            "bench",
            &format!("CREATE TABLE wide ({})", columns.join(", ")),
        )
        .expect("table");
    // 3160 structurally different statements: every pair of columns.
    let mut script = String::new();
    for i in 0..80 {
        for j in (i + 1)..80 {
            script.push_str(&format!("SELECT c{i}, c{j} FROM wide;\n"));
        }
    }
    let path = std::env::temp_dir().join(format!("deploywatch-bench-{}.sql", std::process::id()));
    std::fs::write(&path, script).expect("script");
    cluster.psql_file("bench", &path).expect("statements");
    let _ = std::fs::remove_file(&path);
    let statements: usize = cluster
        .psql("bench", "SELECT count(*) FROM pg_stat_statements")
        .expect("count")
        .trim()
        .parse()
        .unwrap_or(0);

    let dir = std::env::temp_dir().join(format!("deploywatch-bench-cfg-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("checks")).expect("dir");
    std::fs::write(dir.join("checks/p.toml"), "[pack]\nname = \"p\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\n").expect("pack");
    std::fs::write(
        dir.join("deploywatch.toml"),
        format!("[[targets]]\nname = \"bench\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"bench\"\nuser = \"deploywatch\"\n", cluster.port()),
    )
    .expect("config");
    let config = Config::load(&dir.join("deploywatch.toml")).expect("config");
    let pools = deploywatch::watch::scheduler::Pools::for_config(&Default::default(), &config);
    let pool = pools.get("bench").expect("pool");
    let support = deploywatch::postgres::sampler::statements_support(pool)
        .await
        .expect("support");
    let runs = 20;
    let mut durations = Vec::new();
    let mut rows = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let raw = deploywatch::postgres::sampler::read(pool, &support, 0.0)
            .await
            .expect("sample");
        durations.push(started.elapsed());
        rows = raw.statements.as_ref().map(|s| s.len()).unwrap_or(0)
            + raw.indexes.len()
            + raw.tables.len()
            + 1;
    }
    durations.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("## Sampling pass cost\n");
    println!("One pass of `sampler::read` (pg_stat_database, pg_stat_statements, pg_stat_user_indexes, pg_stat_user_tables, size, connections) against a local PostgreSQL with {statements} statements in pg_stat_statements, {runs} passes:\n");
    println!("| figure | value |\n| --- | --- |");
    println!(
        "| median wall time per pass | {:.1} ms |",
        ms(durations[runs / 2])
    );
    println!("| slowest pass | {:.1} ms |", ms(durations[runs - 1]));
    println!("| rows read per pass | {rows} |");
    println!();
    pools.close_all();
    let _ = std::fs::remove_dir_all(&dir);
    drop(cluster);
}

fn main() {
    quality();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(sampling_cost());
}

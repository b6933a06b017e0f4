//! Detection of injected regressions end to end. Run with
//! `cargo bench --bench injected_regressions`; prints Markdown for BENCHMARKS.md.
//!
//! A real PostgreSQL with pg_stat_statements runs one query, `SELECT pg_sleep($1)`, about 18
//! times a second with a base time of 2 ms. The daemon samples every second. Each round: a
//! baseline at the base time, then a deployment is announced and at the same moment the query
//! becomes `factor` times slower (1 = no change, the false-alarm row); after the window, the
//! speed is restored by a deployment of its own, so each baseline is clean. Detection is a
//! `query_latency` regression on that query in `first_hour` or `first_day`; time to detect is
//! from the announcement to the first `/status` that shows it. `DEPLOYWATCH_BENCH_ROUNDS`
//! sets the rounds per factor (default 5).

#[allow(dead_code)]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploywatch::analysis::deployment::{DeploymentView, Signal};
use deploywatch::analysis::window::{Verdict, Window};
use deploywatch_testkit::workload::next_tick;
use tokio_util::sync::CancellationToken;

const BASE_SECONDS: f64 = 0.002;
/// `first_hour` in seconds; `first_day` ends at twice that.
const HOUR: u64 = 6;
/// Seconds of baseline before each deployment.
const BASELINE: u64 = 10;

fn detected(view: &DeploymentView) -> bool {
    view.windows.iter().any(|w| {
        w.regressions
            .iter()
            .any(|f| f.signal == Signal::QueryLatency && f.message.contains("pg_sleep"))
    })
}

fn first_day_closed(view: &DeploymentView) -> bool {
    view.windows
        .iter()
        .any(|w| w.window == Window::FirstDay && w.verdict != Verdict::Watching)
}

struct Row {
    factor: f64,
    rounds: usize,
    detected: usize,
    seconds_to_detect: Vec<f64>,
    windows: Vec<&'static str>,
}

async fn run() {
    let rounds: usize = common::setting("DEPLOYWATCH_BENCH_ROUNDS", 5);
    let cluster = common::cluster_with_statements("bench");
    cluster
        .psql(
            "bench",
            "CREATE EXTENSION pg_stat_statements; \
             CREATE TABLE database_metadata (key text PRIMARY KEY, value text); \
             INSERT INTO database_metadata VALUES ('version', '1.0.0')",
        )
        .expect("setup");

    // The workload: one query whose time per call the bench controls.
    let sleep = Arc::new(AtomicU64::new(BASE_SECONDS.to_bits()));
    let cancel = CancellationToken::new();
    let (client, connection) =
        tokio_postgres::connect(&cluster.connection_string("bench"), tokio_postgres::NoTls)
            .await
            .expect("connect");
    let driver = tokio::spawn(connection);
    let workload = {
        let (sleep, cancel) = (sleep.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(55));
            while next_tick(&mut tick, &cancel).await {
                let seconds = f64::from_bits(sleep.load(Ordering::Relaxed));
                let _ = client.query("SELECT pg_sleep($1)", &[&seconds]).await;
            }
        })
    };

    let daemon = common::start(
        &cluster,
        "bench",
        "p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"up\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
        HOUR,
    )
    .await;
    let handle = &daemon.handle;

    let mut rows = Vec::new();
    let mut version = 0;
    for factor in [1.0, 1.5, 2.0, 5.0] {
        let mut row = Row {
            factor,
            rounds,
            detected: 0,
            seconds_to_detect: Vec::new(),
            windows: Vec::new(),
        };
        for _ in 0..rounds {
            // The previous round's slowdown is undone by a deployment of its own, so the
            // baseline of the next one (the samples since the last deployment) is clean.
            sleep.store(BASE_SECONDS.to_bits(), Ordering::Relaxed);
            version += 1;
            let restore = format!("1.0.{version}");
            common::announce(&daemon, &restore, "restore").await;
            tokio::time::sleep(Duration::from_secs(BASELINE)).await;
            version += 1;
            let to_version = format!("1.0.{version}");
            sleep.store((BASE_SECONDS * factor).to_bits(), Ordering::Relaxed);
            let announced = Instant::now();
            common::announce(&daemon, &to_version, "injected").await;
            let deadline = announced + Duration::from_secs(HOUR * 2 + 30);
            let mut first_seen = None;
            let view = loop {
                let view = handle.state.snapshot().deployments.get("bench").cloned();
                if let Some(view) = view.filter(|v| v.to_version == to_version) {
                    if first_seen.is_none() && detected(&view) {
                        first_seen = Some(announced.elapsed().as_secs_f64());
                    }
                    if first_day_closed(&view) {
                        break view;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "first_day of {to_version} never closed"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            if detected(&view) {
                row.detected += 1;
                row.seconds_to_detect.push(first_seen.unwrap_or(f64::NAN));
                for w in &view.windows {
                    if w.regressions
                        .iter()
                        .any(|f| f.signal == Signal::QueryLatency)
                    {
                        row.windows.push(w.window.as_str());
                        break;
                    }
                }
            }
        }
        rows.push(row);
    }
    daemon.stop_all(&cancel, workload, driver, cluster).await;

    println!("## Injected regressions end to end on a real PostgreSQL\n");
    println!(
        "One query, `SELECT pg_sleep($1)`, about 18 calls a second at {:.0} ms; sampling every \
         second; `first_hour` {HOUR} s, `first_day` {} s; {BASELINE} s of baseline before each \
         deployment. At the announcement the query becomes `factor` times slower. {rounds} \
         deployments per row.\n",
        BASE_SECONDS * 1000.0,
        HOUR * 2
    );
    println!(
        "| slowdown | flagged as query_latency | median time to detect | slowest | flagged in |\n| --- | --- | --- | --- | --- |"
    );
    for row in &rows {
        let mut times = row.seconds_to_detect.clone();
        times.sort_by(|a, b| a.total_cmp(b));
        let median = times
            .get(times.len() / 2)
            .map_or("-".to_string(), |t| format!("{t:.1} s"));
        let slowest = times
            .last()
            .map_or("-".to_string(), |t| format!("{t:.1} s"));
        let mut windows = row.windows.clone();
        windows.sort_unstable();
        windows.dedup();
        let label = if row.factor == 1.0 {
            "none (false alarms)".to_string()
        } else {
            format!("{}x", row.factor)
        };
        println!(
            "| {label} | {} of {} | {median} | {slowest} | {} |",
            row.detected,
            row.rounds,
            if windows.is_empty() {
                "-".to_string()
            } else {
                windows.join(", ")
            }
        );
    }
    println!();
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run());
}

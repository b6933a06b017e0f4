//! False alarms end to end. Run with `cargo bench --bench false_alarms`; prints Markdown for
//! BENCHMARKS.md.
//!
//! A real PostgreSQL holds the cognit application at 3.7.0 under the light workload
//! (`workload::spawn`); the daemon samples every second with compressed windows. Deployments that
//! change nothing are announced one after another; each one's `first_hour` and `first_day`
//! verdicts are counted. Every regression here is a false alarm. `DEPLOYWATCH_BENCH_ROUNDS`
//! sets the number of deployments (default 20), `DEPLOYWATCH_BENCH_HOUR` the length of
//! `first_hour` in seconds (default 4; `first_day` is twice that).

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use deploywatch::analysis::deployment::DeploymentView;
use deploywatch::analysis::window::{Verdict, Window};
use deploywatch_testkit::workload::fixtures;
use tokio_util::sync::CancellationToken;

fn verdict(view: &DeploymentView, window: Window) -> Verdict {
    view.windows
        .iter()
        .find(|w| w.window == window)
        .map_or(Verdict::Watching, |w| w.verdict)
}

async fn run() {
    let rounds: usize = common::setting("DEPLOYWATCH_BENCH_ROUNDS", 20);
    let hour: u64 = common::setting("DEPLOYWATCH_BENCH_HOUR", 4);
    let cluster = common::cluster_with_statements("cognit");
    let connection_string = cluster.connection_string("cognit");
    let (admin, connection) = tokio_postgres::connect(&connection_string, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let driver = tokio::spawn(connection);
    for sql in [
        fixtures::SCHEMA_3_6_0,
        fixtures::GENERATE,
        "SELECT cognit_generate(5)",
        fixtures::MIGRATION_001,
        "CREATE EXTENSION pg_stat_statements",
    ] {
        admin.batch_execute(sql).await.expect("fixture");
    }
    let cancel = CancellationToken::new();
    let (workload, _) = deploywatch_testkit::workload::spawn(
        &connection_string,
        40,
        Duration::from_millis(200),
        cancel.clone(),
    )
    .await
    .expect("workload");

    let pack =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/checks/cognit-3.7.0.toml");
    let pack_text = std::fs::read_to_string(pack).expect("pack");
    let daemon = common::start(&cluster, "cognit", "cognit-3.7.0.toml", &pack_text, hour).await;
    let handle = &daemon.handle;
    // A baseline of a dozen samples first.
    tokio::time::sleep(Duration::from_secs(12)).await;

    let started = Instant::now();
    let mut verdicts: HashMap<(Window, Verdict), usize> = HashMap::new();
    let mut signals: BTreeMap<String, usize> = BTreeMap::new();
    let mut with_alarm = 0;
    for round in 0..rounds {
        let version = format!("3.7.{}", round + 1);
        common::announce(&daemon, &version, "no change").await;
        let deadline = Instant::now() + Duration::from_secs(hour * 2 + 30);
        let view = loop {
            let view = handle.state.snapshot().deployments.get("cognit").cloned();
            if let Some(view) = view.filter(|v| {
                v.to_version == version && verdict(v, Window::FirstDay) != Verdict::Watching
            }) {
                break view;
            }
            assert!(
                Instant::now() < deadline,
                "first_day of {version} never closed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut alarm = false;
        for window in [Window::FirstHour, Window::FirstDay] {
            let v = verdict(&view, window);
            *verdicts.entry((window, v)).or_insert(0) += 1;
            if let Some(w) = view.windows.iter().find(|w| w.window == window) {
                for finding in &w.regressions {
                    *signals
                        .entry(finding.signal.as_str().to_string())
                        .or_insert(0) += 1;
                    eprintln!(
                        "false alarm in {window:?} of {version}: {}",
                        finding.message
                    );
                }
            }
            alarm |= v == Verdict::Regression;
        }
        with_alarm += usize::from(alarm);
    }
    let elapsed = started.elapsed();
    daemon.stop_all(&cancel, workload, driver, cluster).await;

    println!("## False alarms end to end: no-change deployments on a real PostgreSQL\n");
    println!(
        "{rounds} deployments that change nothing, announced one after another against the cognit \
         application at 3.7.0 under the light workload (the hot query 40 times a second plus the \
         application mix), sampling every second, `first_hour` {hour} s and `first_day` {} s, \
         {:.0} s in all.\n",
        hour * 2,
        elapsed.as_secs_f64()
    );
    println!(
        "| window | pass | regression (false alarm) | inconclusive |\n| --- | --- | --- | --- |"
    );
    for window in [Window::FirstHour, Window::FirstDay] {
        let n = |v: Verdict| verdicts.get(&(window, v)).copied().unwrap_or(0);
        println!(
            "| {} | {} | {} | {} |",
            window.as_str(),
            n(Verdict::Pass),
            n(Verdict::Regression),
            n(Verdict::Inconclusive)
        );
    }
    println!(
        "\nDeployments with at least one false alarm: {with_alarm} of {rounds} ({:.1} %).",
        100.0 * with_alarm as f64 / rounds as f64
    );
    if !signals.is_empty() {
        let list: Vec<String> = signals.iter().map(|(s, n)| format!("{s} x{n}")).collect();
        println!("Signals that fired: {}.", list.join(", "));
    }
    println!();
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run());
}

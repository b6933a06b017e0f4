//! False alarms end to end. Run with `cargo bench --bench false_alarms`; prints Markdown for
//! BENCHMARKS.md.
//!
//! A real PostgreSQL holds the cognit application at 3.7.0 under the light workload
//! (`workload::spawn`); the daemon samples every second with compressed windows. Deployments that
//! change nothing are announced one after another; each one's `first_hour` and `first_day`
//! verdicts are counted. Every regression here is a false alarm. `DEPLOYWATCH_BENCH_ROUNDS`
//! sets the number of deployments (default 20), `DEPLOYWATCH_BENCH_HOUR` the length of
//! `first_hour` in seconds (default 4; `first_day` is twice that).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use deploywatch::config::Config;
use deploywatch::deployment::DeploymentView;
use deploywatch::pgcluster::{ClusterOptions, PgCluster};
use deploywatch::window::{Verdict, Window};
use deploywatch::workload::fixtures;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-token";

fn verdict(view: &DeploymentView, window: Window) -> Verdict {
    view.windows
        .iter()
        .find(|w| w.window == window)
        .map_or(Verdict::Watching, |w| w.verdict)
}

async fn run() {
    let rounds: usize = std::env::var("DEPLOYWATCH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let hour: u64 = std::env::var("DEPLOYWATCH_BENCH_HOUR")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4);
    let cluster = PgCluster::start(ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".into()],
        ..ClusterOptions::default()
    })
    .expect("PostgreSQL");
    cluster.create_database("cognit").expect("db");
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
    let (workload, _) = deploywatch::workload::spawn(
        &connection_string,
        40,
        Duration::from_millis(200),
        cancel.clone(),
    )
    .await
    .expect("workload");

    let dir = std::env::temp_dir().join(format!("deploywatch-fa-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("checks")).expect("dir");
    let pack =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/checks/cognit-3.7.0.toml");
    std::fs::copy(pack, dir.join("checks/cognit-3.7.0.toml")).expect("pack");
    std::fs::write(dir.join("token"), TOKEN).expect("token");
    std::fs::write(
        dir.join("deploywatch.toml"),
        format!(
            "[server]\napi_token_file = \"token\"\n\n\
             [defaults]\ninterval = \"1s\"\ntimeout = \"5s\"\n\n[checks]\ninterval_override = \"1s\"\n\n\
             [deployments]\nsample_interval = \"1s\"\nbaseline_span = \"1h\"\nmin_baseline_samples = 4\nmin_window_samples = 3\n\
             latency_min_calls = 5\nfirst_hour = \"{hour}s\"\nfirst_day = \"{}s\"\nfirst_week = \"{}s\"\n\n\
             [[targets]]\nname = \"cognit\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"cognit\"\nuser = \"postgres\"\n",
            hour * 2,
            hour * 3,
            cluster.port()
        ),
    )
    .expect("config");
    let config = Config::load(&dir.join("deploywatch.toml")).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = deploywatch::daemon::start(config, listener).expect("daemon");
    // A baseline of a dozen samples first.
    tokio::time::sleep(Duration::from_secs(12)).await;

    let started = Instant::now();
    let mut verdicts: HashMap<(Window, Verdict), usize> = HashMap::new();
    let mut signals: BTreeMap<String, usize> = BTreeMap::new();
    let mut with_alarm = 0;
    for round in 0..rounds {
        let version = format!("3.7.{}", round + 1);
        let announcement = deploywatch::client::Announcement {
            version: &version,
            note: Some("no change"),
            ..Default::default()
        };
        let (code, answer) = deploywatch::client::announce(
            &format!("http://{}", handle.local_addr),
            TOKEN,
            &announcement,
        )
        .await
        .expect("announce");
        assert_eq!(code.as_u16(), 201, "{answer}");
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
    cancel.cancel();
    let _ = workload.await;
    handle.shutdown().await.expect("shutdown");
    driver.abort();
    let _ = std::fs::remove_dir_all(&dir);
    drop(cluster);

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

//! Daemon benchmark: `/metrics` latency and throughput under load from a second process (wrk),
//! resident memory idle and under load, and CPU per check cycle, with 10 targets x 30 checks on a
//! real PostgreSQL. Run with `cargo bench --bench daemon`; it prints a Markdown section for
//! BENCHMARKS.md.

use std::time::{Duration, Instant};

use deploywatch::config::Config;
use deploywatch::daemon;
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};
use deploywatch_testkit::process;

const TARGETS: usize = 10;
const CHECKS: usize = 30;

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    process::stat(std::process::id()).map_or(0.0, |stat| stat.cpu)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let cluster = PgCluster::start(ClusterOptions {
        max_connections: 100,
        ..ClusterOptions::default()
    })
    .expect("PostgreSQL for the benchmark");
    cluster
        .create_monitoring_role("deploywatch")
        .expect("monitoring role");
    let dir = std::env::temp_dir().join(format!("deploywatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("checks")).expect("dir");
    let mut pack = String::from("[pack]\nname = \"bench\"\n");
    for i in 0..CHECKS {
        let sql = match i % 3 {
            0 => "SELECT count(*) FROM pg_class".to_string(),
            1 => format!("SELECT {i}"),
            _ => "SELECT relname AS name, relpages AS pages FROM pg_class WHERE relkind = 'r' ORDER BY relname LIMIT 20".to_string(),
        };
        let shape = if i % 3 == 2 {
            "shape = \"rows\"\nlabels = [\"name\"]\nvalues = [\"pages\"]\n"
        } else {
            "expect = \">= 0\"\n"
        };
        pack.push_str(&format!(
            "\n[[check]]\nname = \"check_{i}\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"{sql}\"\n{shape}"
        ));
    }
    std::fs::write(dir.join("checks/bench.toml"), pack).expect("pack");
    let mut main =
        String::from("[defaults]\ninterval = \"10s\"\n\n[deployments]\nenabled = false\n");
    for t in 0..TARGETS {
        let db = format!("bench_{t}");
        cluster.create_database(&db).expect("database");
        main.push_str(&format!(
            "\n[[targets]]\nname = \"{db}\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\nuser = \"deploywatch\"\n",
            cluster.port()
        ));
    }
    std::fs::write(dir.join("deploywatch.toml"), main).expect("config");
    let config = Config::load(&dir.join("deploywatch.toml")).expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = daemon::start(config, listener).expect("daemon");
    let url = format!("http://{}/metrics", handle.local_addr);

    // Let every check run a few times.
    let settle = Instant::now();
    loop {
        let snapshot = handle.state.snapshot();
        let done = snapshot
            .targets
            .values()
            .all(|t| t.checks.values().all(|c| c.runs >= 1));
        if done || settle.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let runs = |h: &daemon::DaemonHandle| -> u64 {
        h.state
            .snapshot()
            .targets
            .values()
            .flat_map(|t| t.checks.values())
            .map(|c| c.runs)
            .sum()
    };
    // Idle: measure CPU over 30 s of scheduling (3 cycles of 300 checks).
    let cpu_start = cpu_seconds();
    let runs_start = runs(&handle);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let cpu_used = cpu_seconds() - cpu_start;
    let runs_done = runs(&handle) - runs_start;
    let rss_idle = process::rss_kib(std::process::id());
    let (_, body) = deploywatch::commands::client::get(&url, "*/*")
        .await
        .expect("scrape");
    let series = body.lines().filter(|l| !l.starts_with('#')).count();

    let wrk = tokio::process::Command::new("wrk")
        .args(["-t2", "-c16", "-d20s", "--latency", &url])
        .output();
    let peak = tokio::spawn(async {
        let mut peak = 0;
        for _ in 0..40 {
            peak = peak.max(process::rss_kib(std::process::id()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        peak
    });
    let output = wrk.await.expect("wrk is installed (apt-get install wrk)");
    let rss_load = peak.await.unwrap_or(0);
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let pick = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
            .unwrap_or_else(|| "?".into())
    };
    let requests = text
        .lines()
        .find(|l| l.starts_with("Requests/sec"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    println!("## Daemon: /metrics under load ({TARGETS} targets x {CHECKS} checks)\n");
    println!("| figure | value |\n| --- | --- |");
    println!("| series in one scrape | {series} |");
    println!("| scrape size | {} KiB |", body.len() / 1024);
    println!(
        "| /metrics p50 latency (wrk -t2 -c16 -d20s) | {} |",
        pick("50%")
    );
    println!("| /metrics p99 latency | {} |", pick("99%"));
    println!("| /metrics throughput | {requests} requests/s |");
    println!("| resident memory, idle | {} MiB |", rss_idle / 1024);
    println!(
        "| resident memory, peak under load | {} MiB |",
        rss_load / 1024
    );
    println!(
        "| CPU per check run (idle scheduling, 30 s) | {:.3} ms ({runs_done} runs, {cpu_used:.2} CPU s) |",
        if runs_done > 0 { cpu_used * 1000.0 / runs_done as f64 } else { 0.0 }
    );
    println!(
        "| CPU per check cycle ({} checks) | {:.1} ms |",
        TARGETS * CHECKS,
        if runs_done > 0 {
            cpu_used * 1000.0 / runs_done as f64 * (TARGETS * CHECKS) as f64
        } else {
            0.0
        }
    );
    println!("\nwrk output:\n```\n{}```", text);
    let _ = handle.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    drop(cluster);
}

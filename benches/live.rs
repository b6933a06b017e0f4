//! Deployment tracking at scale on a real PostgreSQL. Run with `cargo bench --bench live`;
//! prints Markdown for BENCHMARKS.md.
//!
//! `pg_stat_statements.max` = 5000, filled with 5,000 structurally different statements that
//! keep executing (heavy-tailed: a few run hundreds of times a second, most now and then). The
//! daemon (the release binary, its own process) samples every second into a store on disk; a
//! third of the way through, the schema version changes (a deployment). Resident memory of the
//! daemon is read from /proc every 10 s, with the durations of its last sampling and judging
//! passes (from /metrics), the store's size every minute.
//!
//! `DEPLOYWATCH_LIVE_MINUTES` (default 30) sets the length; the deployment is at a third.

#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use deploywatch_testkit::pgcluster::ClusterOptions;
use deploywatch_testkit::process;

use common::setting;

const COLUMNS: usize = 101;
const STATEMENTS: usize = 5000;

fn store_bytes(dir: &std::path::Path) -> u64 {
    ["state.sqlite", "state.sqlite-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Statement `k`: a distinct pair of columns of the wide table.
fn statement(k: usize) -> String {
    let mut n = 0;
    for i in 0..COLUMNS {
        for j in (i + 1)..COLUMNS {
            if n == k {
                return format!("SELECT c{i}, c{j} FROM wide WHERE id = 1");
            }
            n += 1;
        }
    }
    "SELECT 1".to_string()
}

/// Runs the statements forever: every round runs statement `k` when the round number is a
/// multiple of its period (rank-proportional, so call rates are Zipf-like).
async fn workload(connection_string: String, stop: tokio_util::sync::CancellationToken) {
    let (client, connection) =
        match tokio_postgres::connect(&connection_string, tokio_postgres::NoTls).await {
            Ok(pair) => pair,
            Err(error) => {
                eprintln!("workload cannot connect: {error}");
                return;
            }
        };
    tokio::spawn(connection);
    let texts: Vec<String> = (0..STATEMENTS).map(statement).collect();
    let mut round: usize = 0;
    while !stop.is_cancelled() {
        let mut batch = String::new();
        for (k, text) in texts.iter().enumerate() {
            // Statement k runs every (k / 50 + 1)-th round: the top 50 every round, the last
            // ones every hundredth.
            if round % (k / 50 + 1) == 0 {
                batch.push_str(text);
                batch.push_str(";\n");
            }
        }
        if let Err(error) = client.batch_execute(&batch).await {
            eprintln!("workload: {error}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let minutes = setting("DEPLOYWATCH_LIVE_MINUTES", 30);
    let options = ClusterOptions {
        extra_conf: vec![("pg_stat_statements.max".into(), STATEMENTS.to_string())],
        max_connections: 50,
        ..ClusterOptions::default()
    };
    let cluster = common::cluster_with(options, "app");
    let columns: Vec<String> = (0..COLUMNS).map(|i| format!("c{i} int")).collect();
    cluster
        .psql(
            "app",
            &format!(
                "CREATE EXTENSION pg_stat_statements; \
                 CREATE TABLE wide (id int primary key, {}); INSERT INTO wide (id) VALUES (1); \
                 CREATE TABLE database_metadata (key text primary key, value text); \
                 INSERT INTO database_metadata VALUES ('version', '1.0.0');",
                columns.join(", ")
            ),
        )
        .expect("schema");
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn(workload(cluster.connection_string("app"), stop.clone()));
    // Let every statement run once before the daemon starts.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let in_view: u64 = cluster
        .psql("app", "SELECT count(*) FROM pg_stat_statements")
        .expect("count")
        .trim()
        .parse()
        .unwrap_or(0);

    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("checks")).expect("checks");
    std::fs::write(
        dir.path().join("checks/p.toml"),
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\n",
    )
    .expect("pack");
    std::fs::write(
        dir.path().join("deploywatch.toml"),
        format!(
            "[store]\npath = \"state.sqlite\"\n\n\
             [deployments]\nsample_interval = \"1s\"\nbaseline_span = \"1h\"\n\n\
             [[targets]]\nname = \"app\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\nuser = \"deploywatch\"\n",
            cluster.port()
        ),
    )
    .expect("config");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .arg("--config")
        .arg(dir.path().join("deploywatch.toml"))
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("daemon");
    let pid = daemon.id().expect("pid");

    let began = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let deploy_at = total / 3;
    let mut deployed = false;
    // The minute of the reading taken just before the schema changed (same tick): readings
    // after the deployment are those after it.
    let mut deployed_after = f64::MAX;
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let mut sizes: Vec<(f64, u64)> = Vec::new();
    // (minutes, sampling pass, judging pass), seconds, from the daemon's gauges.
    let mut passes: Vec<(f64, f64, f64)> = Vec::new();
    let mut tick = 0u64;
    while began.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(10)).await;
        tick += 1;
        let at = began.elapsed().as_secs_f64() / 60.0;
        rss.push((at, process::rss_kib(pid)));
        if let Some((sampling, judging)) = pass_durations(port).await {
            passes.push((at, sampling, judging));
        }
        if tick % 6 == 0 {
            sizes.push((at, store_bytes(dir.path())));
        }
        if !deployed && began.elapsed() >= deploy_at {
            cluster
                .psql(
                    "app",
                    "UPDATE database_metadata SET value = '1.1.0' WHERE key = 'version'",
                )
                .expect("deploy");
            deployed = true;
            deployed_after = at;
        }
    }
    let status = reqwest_status(port).await;
    stop.cancel();
    let _ = load.await;
    let _ = daemon.kill().await;

    let after: Vec<u64> = rss
        .iter()
        .filter(|(at, _)| *at > deployed_after)
        .map(|(_, k)| *k)
        .collect();
    let (low, high) = (
        after.iter().copied().min().unwrap_or(0),
        after.iter().copied().max().unwrap_or(0),
    );
    let mean = after.iter().sum::<u64>() as f64 / after.len().max(1) as f64;
    let mib = |k: u64| k as f64 / 1024.0;
    println!("## Live: 5,000 statements on a real PostgreSQL, 1 s samples");
    println!();
    println!(
        "PostgreSQL with `pg_stat_statements.max = {STATEMENTS}` holding {in_view} statements that keep running (statement k every (k/50+1)-th round of 100 ms); the release daemon in its own process samples every second into a store on disk; the schema version changes after {:.0} min of {minutes} min.",
        deploy_at.as_secs_f64() / 60.0
    );
    println!();
    println!("| figure | value |");
    println!("| --- | --- |");
    for (at, k) in rss
        .iter()
        .filter(|(at, _)| (*at * 6.0).round() as u64 % 12 == 0)
    {
        println!("| daemon RSS at {at:.0} min | {:.1} MiB |", mib(*k));
    }
    println!(
        "| RSS after the deployment: min / mean / max | {:.1} / {:.1} / {:.1} MiB ({:+.1} % / {:+.1} % of the mean) |",
        mib(low),
        mean / 1024.0,
        mib(high),
        (low as f64 - mean) / mean * 100.0,
        (high as f64 - mean) / mean * 100.0
    );
    if let (Some(first), Some(last)) = (sizes.first(), sizes.last()) {
        let per_hour = (last.1.saturating_sub(first.1)) as f64 / ((last.0 - first.0) / 60.0);
        println!(
            "| store size at the end | {:.1} MiB |",
            last.1 as f64 / 1048576.0
        );
        println!(
            "| store growth | {:.1} MiB per hour (at 1 s samples; {:.1} MiB per day at the default 1 min) |",
            per_hour / 1048576.0,
            per_hour / 1048576.0 * 24.0 / 60.0
        );
    }
    let after_deploy: Vec<&(f64, f64, f64)> = passes
        .iter()
        .filter(|(at, _, _)| *at > deployed_after)
        .collect();
    for (name, pick) in [
        (
            "sampling",
            (|p: &(f64, f64, f64)| p.1) as fn(&(f64, f64, f64)) -> f64,
        ),
        ("judging", |p: &(f64, f64, f64)| p.2),
    ] {
        let mut values: Vec<f64> = after_deploy.iter().map(|p| pick(p) * 1000.0).collect();
        values.sort_by(f64::total_cmp);
        if let Some(max) = values.last() {
            let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
            println!(
                "| {name} pass after the deployment, last pass every 10 s ({} readings): p50 / p99 / max | {:.2} / {:.2} / {:.2} ms |",
                values.len(),
                at(0.5),
                at(0.99),
                max
            );
        }
    }
    println!("| deployment seen by the daemon | {status} |");
}

/// The daemon's last sampling and judging pass durations (seconds), from /metrics.
async fn pass_durations(port: u16) -> Option<(f64, f64)> {
    let (_, body) = deploywatch::commands::client::get(
        &format!("http://127.0.0.1:{port}/metrics"),
        "text/plain",
    )
    .await
    .ok()?;
    let gauge = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((
        gauge("deploywatch_sampling_duration_seconds")?,
        gauge("deploywatch_judging_duration_seconds")?,
    ))
}

/// The deployment the daemon reports, from /status.
async fn reqwest_status(port: u16) -> String {
    match deploywatch::commands::client::get(
        &format!("http://127.0.0.1:{port}/status"),
        "application/json",
    )
    .await
    {
        Ok((_, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .map(|v| {
                let d = &v["targets"][0]["deployment"];
                format!(
                    "{} -> {}, baseline {} samples, current window {}",
                    d["from_version"], d["to_version"], d["baseline_samples"], d["current_window"]
                )
            })
            .unwrap_or_else(|| "unreadable".into()),
        Err(error) => format!("no answer: {error}"),
    }
}

//! Fleet benchmark: N databases of one local PostgreSQL, copied from a template holding the
//! cognit fixture at 3.7.0, watched through discovery by the `deploywatch` binary with the
//! shipped packs at their default intervals and deployment tracking on. pg_stat_activity is
//! polled every 100 ms for the whole run: deploywatch's sessions against the budget, and the CPU
//! time of the server processes serving them (read from /proc at every poll, so a session that
//! ends is counted up to its last poll). Also measured from /proc: the daemon's CPU time and
//! resident memory, the whole server's CPU time, and how busy the machine was (its CPU time and
//! load average; other work on the machine slows the server and the daemon alike). The
//! daemon's metrics give the runs, errors, the checks skipped for lack of a session and the due
//! runs merged into late ones (a budget too small for the fleet stretches the intervals).
//!
//! `cargo bench --bench fleet`; `FLEET_DATABASES` (default 500), `FLEET_SECONDS` (default 600),
//! `FLEET_BUDGET` (default: unset, so the default budget of 4 applies), `FLEET_LOG` (the
//! daemon's log file; default a file in the temporary directory, named when the run ends),
//! `FLEET_WRAP` (a command the daemon runs under, such as a heap profiler),
//! `FLEET_SCRAPE_SECONDS` (default: unset, no scrapes; e.g. 15: `/metrics` is fetched at that
//! period during the run, as a Prometheus would, and the scrapes' size and time are reported),
//! `FLEET_SCRAPE_GZIP` (1: the scrapes ask for gzip, as Prometheus does, through `curl
//! --compressed`; the size reported is then the compressed one).
//! Peak resident memory is the kernel's high-water mark (`VmHWM`), so a short peak while a
//! scrape renders counts.
//! Prints a Markdown table for BENCHMARKS.md.

#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::setting;
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};
use deploywatch_testkit::process;
use deploywatch_testkit::workload::next_tick;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testkit/fixtures/cognit")
        .join(name)
}

/// CPU seconds of the whole server: the postmaster, its live children, and the children it
/// has already reaped (short-lived backends).
fn server_cpu(pg: &PgCluster) -> f64 {
    let pids = pg.server_pids();
    let Some((postmaster, children)) = pids.split_first() else {
        return 0.0;
    };
    let Some(own) = process::stat(*postmaster) else {
        return 0.0;
    };
    let live: f64 = children
        .iter()
        .filter_map(|&pid| process::stat(pid))
        .map(|stat| stat.cpu)
        .sum();
    own.cpu + own.reaped_cpu + live
}

fn prepare(pg: &PgCluster, databases: usize) {
    pg.psql(
        "postgres",
        "CREATE ROLE deploywatch LOGIN; GRANT pg_monitor TO deploywatch; CREATE EXTENSION pg_stat_statements",
    )
    .expect("role");
    pg.create_database("cognit_template").expect("template");
    for file in [
        "schema_3.6.0.sql",
        "generate.sql",
        "001_pragmatic_schema_fixes.sql",
    ] {
        pg.psql_file("cognit_template", &fixture(file))
            .expect("fixture");
    }
    pg.psql(
        "cognit_template",
        "SELECT cognit_generate(1); CREATE EXTENSION pg_stat_statements; \
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO deploywatch",
    )
    .expect("template data");
    let strategy = if pg.server_version_num().unwrap_or(0) >= 150000 {
        " STRATEGY FILE_COPY"
    } else {
        ""
    };
    let script: String = (0..databases)
        .map(|i| format!("CREATE DATABASE tenant_{i:03} TEMPLATE cognit_template{strategy};\n"))
        .collect();
    let file = std::env::temp_dir().join(format!("fleet-{}.sql", std::process::id()));
    std::fs::write(&file, script).expect("script");
    pg.psql_file("postgres", &file).expect("databases");
    let _ = std::fs::remove_file(file);
}

/// The one-minute load average.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// The process' peak resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Scrapes `/metrics` every `period` until `stop`: each scrape's size in bytes and time.
async fn scrape_periodically(
    url: String,
    period: Duration,
    gzip: bool,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(usize, f64)> {
    let mut scrapes = Vec::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while next_tick(&mut tick, &stop).await {
        let start = Instant::now();
        if gzip {
            // The body is decoded and thrown away; curl reports the bytes it received.
            let output = tokio::process::Command::new("curl")
                .args(["-sS", "--fail", "--compressed", "-o", "/dev/null"])
                .args(["-w", "%{size_download}", &url])
                .output()
                .await;
            if let Ok(output) = output {
                let size = String::from_utf8_lossy(&output.stdout)
                    .trim()
                    .parse::<usize>();
                if let (true, Ok(size)) = (output.status.success(), size) {
                    scrapes.push((size, start.elapsed().as_secs_f64()));
                }
            }
        } else if let Ok((code, body)) = deploywatch::commands::client::get(&url, "*/*").await {
            if code.is_success() {
                scrapes.push((body.len(), start.elapsed().as_secs_f64()));
            }
        }
    }
    scrapes
}

fn metric_sum(body: &str, name: &str, filter: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>()
        + 0.0 // an empty sum is -0
}

/// The daemon's pid when it runs under a wrapper (`FLEET_WRAP`): the deploywatch process
/// that descends from it.
async fn daemon_under(wrapper: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let found = process::all().into_iter().find(|&pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim() == "deploywatch" && descends(pid, wrapper)
        });
        if let Some(pid) = found {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no deploywatch process under the wrapper {wrapper}");
}

fn descends(mut pid: u32, ancestor: u32) -> bool {
    for _ in 0..8 {
        match process::stat(pid) {
            Some(stat) if stat.parent == ancestor => return true,
            Some(stat) if stat.parent > 1 => pid = stat.parent,
            _ => return false,
        }
    }
    false
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let databases: usize = setting("FLEET_DATABASES", 500);
    let seconds: u64 = setting("FLEET_SECONDS", 600);
    let budget: usize = setting("FLEET_BUDGET", 0);
    let scrape_seconds: u64 = setting("FLEET_SCRAPE_SECONDS", 0);
    let scrape_gzip = setting("FLEET_SCRAPE_GZIP", 0u8) == 1;
    let pg = PgCluster::start(ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".into()],
        max_connections: 100,
        ..ClusterOptions::default()
    })
    .expect("PostgreSQL");
    let setup = Instant::now();
    prepare(&pg, databases);
    let setup_seconds = setup.elapsed().as_secs_f64();

    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir(dir.path().join("checks")).expect("checks");
    for pack in ["cognit-3.7.0.toml", "postgres.toml"] {
        std::fs::copy(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("config/checks")
                .join(pack),
            dir.path().join("checks").join(pack),
        )
        .expect("pack");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let budget_line = if budget > 0 {
        format!("[defaults]\nmax_connections_per_server = {budget}\n\n")
    } else {
        String::new()
    };
    std::fs::write(
        dir.path().join("deploywatch.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n{budget_line}[store]\npath = \"state.sqlite\"\n\n\
             [[targets]]\nname = \"fleet\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"deploywatch\"\ndatabases = [\"tenant_*\"]\n",
            pg.port()
        ),
    )
    .expect("config");
    let budget = if budget > 0 { budget } else { 4 };

    let client = pg.connect("postgres").await.expect("poller");
    client
        .simple_query("SELECT pg_stat_statements_reset()")
        .await
        .expect("reset");
    let server_cpu_start = server_cpu(&pg);

    let log_path = std::env::var_os("FLEET_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("fleet-{databases}-{}.log", std::process::id()))
        });
    let log = std::fs::File::create(&log_path).expect("log file");
    let (machine_start, cores) = process::machine_cpu();
    // `FLEET_WRAP` runs the daemon under a profiler, e.g. `heaptrack -o /tmp/fleet`: its
    // figures are then the profiler's process' (CPU and memory are not comparable).
    let wrap: Vec<String> = std::env::var("FLEET_WRAP")
        .map(|w| w.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(args).arg(env!("CARGO_BIN_EXE_deploywatch"));
            command
        }
        None => tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch")),
    };
    let mut daemon = command
        .arg("--config")
        .arg(dir.path().join("deploywatch.toml"))
        .arg("run")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("daemon");
    let wrapper = daemon.id().expect("pid");
    let pid = if wrap.is_empty() {
        wrapper
    } else {
        daemon_under(wrapper).await
    };
    let started = Instant::now();
    let stop_scraping = tokio_util::sync::CancellationToken::new();
    let scraper = (scrape_seconds > 0).then(|| {
        tokio::spawn(scrape_periodically(
            format!("http://127.0.0.1:{port}/metrics"),
            Duration::from_secs(scrape_seconds),
            scrape_gzip,
            stop_scraping.clone(),
        ))
    });
    let mut polls = 0u64;
    let mut over_budget = 0u64;
    let mut max_sessions = 0usize;
    let mut max_rss = 0u64;
    // CPU seconds of each server process that served deploywatch, as last seen.
    let mut backend_cpu: HashMap<u32, f64> = HashMap::new();
    let mut loads = Vec::new();
    let mut half_way: Option<(f64, f64)> = None;
    // Resident memory half way through and at the end: whether it still grows.
    let mut half_rss = 0u64;
    // When /readyz first answered 200 (every database tried once).
    let mut ready_after: Option<f64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        let rows = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'deploywatch'",
                &[],
            )
            .await
            .expect("poll");
        polls += 1;
        max_sessions = max_sessions.max(rows.len());
        if rows.len() > budget {
            over_budget += 1;
        }
        for row in &rows {
            let backend = row.get::<_, i32>(0) as u32;
            if let Some(stat) = process::stat(backend) {
                backend_cpu.insert(backend, stat.cpu);
            }
        }
        if polls % 10 == 0 {
            max_rss = max_rss.max(process::rss_kib(pid));
        }
        if polls % 100 == 0 {
            loads.push(load_average());
        }
        if ready_after.is_none() && polls % 5 == 0 {
            let ready = deploywatch::commands::client::get(
                &format!("http://127.0.0.1:{port}/readyz"),
                "*/*",
            )
            .await;
            if ready.is_ok_and(|(code, _)| code.is_success()) {
                ready_after = Some(started.elapsed().as_secs_f64());
            }
        }
        if half_way.is_none() && started.elapsed() >= Duration::from_secs(seconds / 2) {
            half_way = Some((
                started.elapsed().as_secs_f64(),
                process::stat(pid).map_or(0.0, |stat| stat.cpu),
            ));
            half_rss = process::rss_kib(pid);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let daemon_cpu = process::stat(pid).map_or(0.0, |stat| stat.cpu);
    let machine_used = process::machine_cpu().0 - machine_start;
    let server_cpu_used = server_cpu(&pg) - server_cpu_start;
    let backends_used: f64 = backend_cpu.values().sum();
    let end_rss = process::rss_kib(pid);
    max_rss = max_rss.max(end_rss).max(peak_rss_kib(pid));
    stop_scraping.cancel();
    let scrapes = match scraper {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let (_, body) =
        deploywatch::commands::client::get(&format!("http://127.0.0.1:{port}/metrics"), "*/*")
            .await
            .expect("metrics");
    let exec = client
        .query_one(
            "SELECT coalesce(sum(total_exec_time) FILTER (WHERE r.rolname = 'deploywatch'), 0)::float8 / 1000, \
                    coalesce(sum(total_exec_time) FILTER (WHERE r.rolname <> 'deploywatch'), 0)::float8 / 1000 \
             FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid",
            &[],
        )
        .await
        .expect("exec time");
    let (dw_exec, other_exec): (f64, f64) = (exec.get(0), exec.get(1));
    if wrap.is_empty() {
        let _ = daemon.kill().await;
    } else {
        // The profiler writes its data when the daemon ends: a graceful stop, then its exit.
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(120), daemon.wait())
            .await
            .is_err()
        {
            let _ = daemon.kill().await;
        }
    }
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let log_lines = |needle: &str| log_text.lines().filter(|l| l.contains(needle)).count();

    let runs = metric_sum(&body, "deploywatch_check_runs_total", "");
    let no_session = metric_sum(&body, "deploywatch_check_skipped_total", "no_session");
    let skipped = metric_sum(&body, "deploywatch_check_skipped_total", "");
    let delayed = metric_sum(&body, "deploywatch_check_delayed_total", "");
    let errors = metric_sum(&body, "deploywatch_check_errors_total", "");
    let up = metric_sum(&body, "deploywatch_up", "");
    let (half_at, half_cpu) = half_way.unwrap_or((0.0, 0.0));
    let load_mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    let load_max = loads.iter().copied().fold(0.0, f64::max);
    println!("## Fleet: {databases} databases of one server, {seconds} s\n");
    println!("| figure | value |\n| --- | --- |");
    println!("| databases watched (up) | {up} of {databases} |");
    println!("| setup (template + {databases} copies) | {setup_seconds:.0} s |");
    println!("| session budget | {budget} |");
    println!(
        "| pg_stat_activity polls (every 100 ms) | {polls}, {over_budget} above the budget, max {max_sessions} sessions |"
    );
    println!(
        "| daemon CPU | {:.1} % of a core ({daemon_cpu:.1} CPU s in {elapsed:.0} s); second half {:.1} % |",
        100.0 * daemon_cpu / elapsed,
        100.0 * (daemon_cpu - half_cpu) / (elapsed - half_at).max(1.0)
    );
    println!(
        "| /readyz 200 (every database tried) after | {} |",
        ready_after.map_or("never".to_string(), |s| format!("{s:.1} s"))
    );
    println!(
        "| daemon RSS, peak / half way / end | {:.0} / {:.0} / {:.0} MiB |",
        max_rss as f64 / 1024.0,
        half_rss as f64 / 1024.0,
        end_rss as f64 / 1024.0
    );
    if scrape_seconds > 0 {
        let times: Vec<f64> = scrapes.iter().map(|s| s.1).collect();
        println!(
            "| /metrics scrapes (every {scrape_seconds} s{}) | {}, {:.1} MB largest; {:.2} s mean, {:.2} s max |",
            if scrape_gzip { ", gzip" } else { "" },
            scrapes.len(),
            scrapes.iter().map(|s| s.0).max().unwrap_or(0) as f64 / 1e6,
            times.iter().sum::<f64>() / times.len().max(1) as f64,
            times.iter().copied().fold(0.0, f64::max)
        );
    }
    println!(
        "| check runs | {runs:.0} ({:.1}/s), errors {errors:.0} |",
        runs / elapsed
    );
    println!(
        "| checks skipped for lack of a session | {no_session:.0} (all skips: {skipped:.0}; log lines: {} no session, {} slower than the interval) |",
        log_lines("no session within"),
        log_lines("slower than its interval")
    );
    println!(
        "| due runs merged into late runs (no session when due) | {delayed:.0} (runs plus merged: {:.0}; log lines about late runs: {}) |",
        runs + delayed,
        log_lines("run late") + log_lines("ran late")
    );
    println!(
        "| server CPU of deploywatch's sessions | {:.1} % of one core ({backends_used:.1} CPU s, {} sessions opened) |",
        100.0 * backends_used / elapsed,
        backend_cpu.len()
    );
    println!(
        "| server CPU, all processes | {:.1} % of one core ({server_cpu_used:.1} CPU s) |",
        100.0 * server_cpu_used / elapsed
    );
    println!(
        "| server execution time of deploywatch's statements | {:.1} % of one core ({dw_exec:.1} s; the poller's: {other_exec:.1} s) |",
        100.0 * dw_exec / elapsed
    );
    println!(
        "| machine: CPU busy, load average (1 min) | {:.0} % of {cores} cores; load mean {load_mean:.1}, max {load_max:.1} |",
        100.0 * machine_used / elapsed / cores as f64
    );
    println!("\ndaemon log: {}", log_path.display());
}

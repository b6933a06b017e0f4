//! Faults and hostile input must not stall the daemon, hurt the database or make it lie: wrong
//! passwords, huge results, a hung database, session state a check leaves behind, superuser
//! roles, and queries still running at shutdown. Everything runs against a real PostgreSQL.

mod common;

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cluster, get, parse_metrics, wait_until, ConfigDir};
use deploywatch::checks::outcome::Status;
use deploywatch::daemon::{self, DaemonHandle};
use deploywatch_testkit::pgcluster::PgCluster;

const FAST: &str = "[defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n\n[checks]\ninterval_override = \"1s\"\n\n[deployments]\nenabled = false\n\n";

/// A `[[targets]]` entry connecting as the cluster's monitoring role (not a superuser).
fn target(name: &str, pg: &PgCluster, db: &str) -> String {
    format!(
        "[[targets]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\nuser = \"{}\"\n",
        pg.port(),
        common::MONITOR_ROLE
    )
}

fn pack(name: &str, checks: &[(&str, &str)]) -> String {
    let mut text = format!("[pack]\nname = \"{name}\"\n");
    for (check, extra) in checks {
        text.push_str(&format!(
            "\n[[check]]\nname = \"{check}\"\ncategory = \"health\"\nseverity = \"critical\"\n{extra}\n"
        ));
    }
    text
}

async fn start(dir: &ConfigDir) -> DaemonHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    daemon::start(dir.load(), listener).expect("daemon starts")
}

fn base(handle: &DaemonHandle) -> String {
    format!("http://{}", handle.local_addr)
}

async fn wait_http(port: u16, path: &str) {
    let url = format!("http://127.0.0.1:{port}{path}");
    wait_until("the daemon answers", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let reply =
                deploywatch::commands::client::request(hyper::Method::GET, &url, "*/*", None, None)
                    .await
                    .ok()?;
            (reply.0.as_u16() == 200).then_some(())
        }
    })
    .await;
}

async fn scrape_port(port: u16) -> common::Scrape {
    let (code, body) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(code, 200);
    parse_metrics(&body)
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values[index.min(values.len() - 1)]
}

/// One raw HTTP/1.1 request on a fresh connection; returns the status code.
fn raw_get(port: u16, path: &str, authorization: Option<&str>) -> u16 {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Wrong basic-auth passwords

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_passwords_do_not_slow_probes_or_checks() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    let dir = ConfigDir::new();
    let hash = bcrypt::hash("right-password", 10).expect("hash");
    dir.write(
        "web.yml",
        &format!("basic_auth_users:\n  prometheus: '{hash}'\n"),
    );
    dir.write(
        "checks/p.toml",
        &pack(
            "p",
            &[
                ("a", "sql = \"SELECT 1\"\nexpect = \"== 1\""),
                ("b", "sql = \"SELECT 2\"\nexpect = \"== 2\""),
                ("c", "sql = \"SELECT 3\"\nexpect = \"== 3\""),
                ("d", "sql = \"SELECT 4\"\nexpect = \"== 4\""),
            ],
        ),
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\nweb_config_file = \"{}\"\n\n{FAST}{}",
            dir.path().join("web.yml").display(),
            target("db", &pg, "app")
        ),
    );
    let port = common::free_port();
    let _child = common::spawn_daemon(&dir, port);
    wait_http(port, "/healthz").await;
    let good = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "prometheus:right-password"
        )
    );
    let bad = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "prometheus:guess"
        )
    );
    assert_eq!(raw_get(port, "/metrics", Some(&good)), 200);

    // 32 clients send wrong passwords while `active`. Idle and attacked phases alternate, so
    // both see the same background load of the machine.
    let stop = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..32 {
        let (stop, active, bad) = (stop.clone(), active.clone(), bad.clone());
        attackers.push(std::thread::spawn(move || {
            let mut answers = std::collections::BTreeMap::<u16, u32>::new();
            while !stop.load(Ordering::Relaxed) {
                if active.load(Ordering::Relaxed) {
                    *answers
                        .entry(raw_get(port, "/metrics", Some(&bad)))
                        .or_default() += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            answers
        }));
    }
    // [idle, attacked]
    let mut healthz: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut durations: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut seen = std::collections::BTreeSet::new();
    for cycle in 0..8 {
        let phase = cycle % 2;
        active.store(phase == 1, Ordering::Relaxed);
        let phase_start = deploywatch::time::unix_now();
        let until = Instant::now() + Duration::from_secs(2);
        let mut round = 0;
        while Instant::now() < until {
            round += 1;
            let started = Instant::now();
            let code = tokio::task::spawn_blocking(move || raw_get(port, "/healthz", None))
                .await
                .expect("probe");
            healthz[phase].push(started.elapsed().as_secs_f64());
            assert_eq!(code, 200);
            if round % 10 == 0 {
                let good = good.clone();
                let text = tokio::task::spawn_blocking(move || raw_body(port, "/metrics", &good))
                    .await
                    .expect("scrape");
                let scrape = parse_metrics(&text);
                for check in CHECKS {
                    let last_run = scrape
                        .metric("deploywatch_check_last_run_timestamp_seconds")
                        .label("check", check)
                        .value_opt();
                    let duration = scrape
                        .metric("deploywatch_check_duration_seconds")
                        .label("check", check)
                        .value_opt();
                    if let (Some(at), Some(duration)) = (last_run, duration) {
                        // A run that ended in this phase (and began in it, give or take).
                        if at >= phase_start + 0.1 && seen.insert((check, at.to_bits())) {
                            durations[phase].push(duration);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = std::collections::BTreeMap::<u16, u32>::new();
    for attacker in attackers {
        for (code, n) in attacker.join().expect("attacker") {
            *answers.entry(code).or_default() += n;
        }
    }
    assert!(
        answers.keys().all(|c| *c == 401 || *c == 429),
        "wrong passwords are refused: {answers:?}"
    );
    assert!(answers.get(&429).is_some_and(|n| *n > 0), "{answers:?}");
    // The right password still works, from the same address, while it is throttled.
    assert_eq!(raw_get(port, "/metrics", Some(&good)), 200);

    // Ratios to the idle figures. Idle figures below a floor are taken as the floor: on a
    // loaded 2-core machine (load average 20 and more while this was written), scheduling
    // noise alone reaches that order (25 ms for a probe, 50 ms for a check's round trips to
    // PostgreSQL). Stalled workers show as seconds, not milliseconds.
    let [idle_healthz, attacked_healthz] = &mut healthz;
    for (name, v) in [
        ("idle", &mut *idle_healthz),
        ("attacked", &mut *attacked_healthz),
    ] {
        let n = v.len();
        eprintln!(
            "healthz {name}: n={n} p50={:.4} p90={:.4} p99={:.4} max={:.4}",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            percentile(v, 1.0)
        );
    }
    let idle_p99 = percentile(idle_healthz, 0.99).max(0.025);
    let attacked_p99 = percentile(attacked_healthz, 0.99);
    assert!(
        attacked_p99 <= 2.0 * idle_p99,
        "/healthz p99 {attacked_p99:.4}s under 32 wrong-password clients, idle {idle_p99:.4}s ({answers:?})"
    );
    let [idle_checks, attacked_checks] = &mut durations;
    assert!(
        idle_checks.len() >= 10 && attacked_checks.len() >= 10,
        "{idle_checks:?} {attacked_checks:?}"
    );
    let idle_check = percentile(idle_checks, 0.99).max(0.050);
    let attacked_check = percentile(attacked_checks, 0.99);
    assert!(
        attacked_check <= 2.0 * idle_check,
        "check duration p99 {attacked_check:.4}s under attack, idle {idle_check:.4}s"
    );
}

/// The body of a GET with an Authorization header, on a fresh connection.
fn raw_body(port: u16, path: &str, authorization: &str) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n"
    );
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default()
}

const CHECKS: [&str; 4] = ["a", "b", "c", "d"];

// ---------------------------------------------------------------------------------------------
// Result size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_result_ends_in_too_many_rows_without_growing_memory() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    pg.psql(
        "app",
        "CREATE TABLE knob (n int); INSERT INTO knob VALUES (0); GRANT SELECT ON knob TO PUBLIC",
    )
    .expect("knob");
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &pack(
            "p",
            &[
                (
                    "huge",
                    "sql = \"SELECT repeat('x', 1000) FROM generate_series(1, 1000000) WHERE (SELECT n FROM knob) > 0\"\ntimeout = \"60s\"",
                ),
                (
                    "wide",
                    "sql = \"SELECT i::text AS k, 1 AS v, repeat('y', 100000) AS pad FROM generate_series(1, 2000 * (SELECT n FROM knob)) AS i\"\nshape = \"rows\"\nlabels = [\"k\"]\nvalues = [\"v\"]\nmax_series = 100000\ntimeout = \"60s\"",
                ),
            ],
        ),
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "{}{}",
            FAST.replace("timeout = \"2s\"", "timeout = \"60s\""),
            target("db", &pg, "app")
        ),
    );
    let port = common::free_port();
    let mut child = common::spawn_daemon(&dir, port);
    let pid = child.id().expect("pid");
    wait_http(port, "/readyz").await;
    // Let a few small runs settle the allocator before the baseline is read.
    wait_until(
        "the gated checks ran",
        Duration::from_secs(30),
        || async move {
            let scrape = scrape_port(port).await;
            let runs = scrape
                .metric("deploywatch_check_runs_total")
                .label("check", "wide")
                .value_opt()?;
            (runs >= 3.0).then_some(())
        },
    )
    .await;
    let before = proc_status_kib(pid, "VmRSS:");
    pg.psql("app", "UPDATE knob SET n = 1")
        .expect("open the gate");
    for check in ["huge", "wide"] {
        wait_until(
            &format!("{check} ends in too_many_rows"),
            Duration::from_secs(120),
            || async move {
                let scrape = scrape_port(port).await;
                let errors = scrape
                    .metric("deploywatch_check_errors_total")
                    .label("check", check)
                    .label("kind", "too_many_rows")
                    .value_opt()?;
                (errors >= 1.0).then_some(())
            },
        )
        .await;
    }
    let peak = proc_status_kib(pid, "VmHWM:");
    let _ = child.kill().await;
    let grown_mib = (peak.saturating_sub(before)) as f64 / 1024.0;
    assert!(
        grown_mib < 20.0,
        "a million 1 kB rows (and 2000 rows of 100 kB) grew the daemon by {grown_mib:.1} MiB (VmRSS {before} kB -> VmHWM {peak} kB)"
    );
    // The result was not read to its end: PostgreSQL is not left producing it either.
    let busy = pg
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch' AND state = 'active'",
        )
        .expect("activity");
    assert_eq!(busy.trim(), "0");
}

// ---------------------------------------------------------------------------------------------
// A hung database

/// Waits until every check of `target` has passed at least once.
async fn wait_all_pass(handle: &DaemonHandle, target: &str) {
    let state = handle.state.clone();
    let target = target.to_string();
    wait_until("every check passes", Duration::from_secs(60), || {
        let (state, target) = (state.clone(), target.clone());
        async move {
            let snapshot = state.snapshot();
            snapshot.targets[&target]
                .checks
                .values()
                .all(|c| c.status == Status::Pass)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_turns_up_off_and_stale_passes_into_errors_within_the_timeouts() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    let dir = ConfigDir::new();
    let checks: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                format!("c{i}"),
                format!("sql = \"SELECT {i}\"\nexpect = \"== {i}\""),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = checks
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    dir.write("checks/p.toml", &pack("p", &refs));
    // check timeout 2 s + connect timeout 1 s
    dir.write(
        "deploywatch.toml",
        &format!("{FAST}{}max_connections = 2\n", target("db", &pg, "app")),
    );
    let handle = start(&dir).await;
    wait_all_pass(&handle, "db").await;
    let bound = Duration::from_secs(2) + Duration::from_secs(1);

    pg.pause().expect("SIGSTOP");
    let paused = Instant::now();
    let state = handle.state.clone();
    let url = base(&handle);
    let down_after = wait_until("up drops", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let (_, body) = get(&format!("{url}/metrics")).await;
            let up = parse_metrics(&body)
                .metric("deploywatch_up")
                .label("target", "db")
                .value();
            (up == 0.0).then(|| paused.elapsed())
        }
    })
    .await;
    let stale_gone_after = wait_until(
        "no check shows its last pass",
        Duration::from_secs(60),
        || {
            let state = state.clone();
            async move {
                let snapshot = state.snapshot();
                snapshot.targets["db"]
                    .checks
                    .values()
                    .all(|c| c.status != Status::Pass)
                    .then(|| paused.elapsed())
            }
        },
    )
    .await;
    // Read before the server answers again, when checks may pass once more.
    let snapshot = state.snapshot();
    pg.resume().expect("SIGCONT");
    // A little slack over the bound for the SIGSTOP itself and the polling.
    let slack = Duration::from_millis(1500);
    assert!(
        down_after <= bound + slack,
        "deploywatch_up dropped {down_after:?} after the hang (bound {bound:?})"
    );
    assert!(
        stale_gone_after <= bound + slack,
        "checks kept their last pass for {stale_gone_after:?} (bound {bound:?})"
    );
    for (name, check) in &snapshot.targets["db"].checks {
        let error = check
            .outcome
            .as_ref()
            .and_then(|o| o.error.as_ref())
            .unwrap_or_else(|| panic!("{name} shows an error"));
        assert!(!error.message.is_empty());
    }
    wait_all_pass(&handle, "db").await;
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_times_out_counts_toward_the_reconnect_backoff() {
    let pg = cluster();
    let dir = ConfigDir::new();
    dir.write("checks/p.toml", &pack("p", &[("a", "sql = \"SELECT 1\"")]));
    dir.write(
        "deploywatch.toml",
        &format!("{FAST}{}", target("db", &pg, "postgres")),
    );
    let config = dir.load();
    let settings = config.targets[0].connection.clone();
    let pool = deploywatch::postgres::pool::TargetPool::new(
        "db",
        settings,
        2,
        Duration::from_secs(30),
        Duration::from_secs(1),
    );
    pg.pause().expect("SIGSTOP");
    let first = pool
        .get()
        .await
        .err()
        .expect("a hung server gives no session");
    let started = Instant::now();
    let second = pool.get().await.err().expect("still no session");
    let took = started.elapsed();
    pg.resume().expect("SIGCONT");
    assert!(
        first.to_string().contains("handshake"),
        "first attempt: {first}"
    );
    assert!(
        matches!(second, deploywatch::postgres::pool::PoolError::BackingOff { .. }),
        "the second attempt backs off instead of waiting for another handshake: {second} after {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Read-only is not enough

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advisory_lock_taken_by_a_check_does_not_outlive_it() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &pack(
            "p",
            &[(
                "locker",
                "sql = \"SELECT pg_advisory_lock(4242)::text || current_setting('application_name')\"\ninterval = \"1h\"",
            )],
        ),
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ntimeout = \"5s\"\n\n[deployments]\nenabled = false\n\n{}max_connections = 1\n",
            target("db", &pg, "app")
        ),
    );
    let handle = start(&dir).await;
    wait_until("the check ran", Duration::from_secs(60), || {
        let state = handle.state.clone();
        async move { (state.snapshot().targets["db"].checks["locker"].runs > 0).then_some(()) }
    })
    .await;
    let held = pg
        .psql(
            "app",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242",
        )
        .expect("locks");
    let sessions = pg
        .psql(
            "app",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch'",
        )
        .expect("sessions");
    handle.shutdown().await.expect("shutdown");
    assert_eq!(sessions.trim(), "1", "the session stays open for reuse");
    assert_eq!(
        held.trim(),
        "0",
        "the advisory lock was released with the check"
    );
}

fn deploywatch(dir: &ConfigDir, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .arg("--config")
        .arg(dir.main())
        .args(args)
        .output()
        .expect("run deploywatch")
}

#[test]
fn a_superuser_role_is_refused_unless_allowed() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &pack("p", &[("a", "sql = \"SELECT 1\"\nexpect = \"== 1\"")]),
    );
    let superuser = format!(
        "[defaults]\nconnect_timeout = \"2s\"\n\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\nuser = \"postgres\"\n",
        pg.port()
    );
    dir.write("deploywatch.toml", &superuser);
    let refused = deploywatch(&dir, &["check"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(refused.status.code(), Some(2), "{text}");
    assert!(
        text.contains("superuser") && text.contains("allow_superuser"),
        "{text}"
    );

    dir.write(
        "deploywatch.toml",
        &format!("{superuser}allow_superuser = true\n"),
    );
    let allowed = deploywatch(&dir, &["check"]);
    let stderr = String::from_utf8_lossy(&allowed.stderr);
    assert_eq!(allowed.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("superuser"), "a warning: {stderr}");
    let privileges = deploywatch(&dir, &["check", "--privileges"]);
    let stdout = String::from_utf8_lossy(&privileges.stdout);
    assert_eq!(privileges.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("superuser"), "{stdout}");
}

#[test]
fn check_privileges_flags_roles_that_can_reach_beyond_the_database() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    pg.psql(
        "postgres",
        "CREATE ROLE risky LOGIN; GRANT pg_monitor, pg_signal_backend, pg_write_server_files TO risky",
    )
    .expect("role");
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &pack("p", &[("a", "sql = \"SELECT 1\"\nexpect = \"== 1\"")]),
    );
    dir.write(
        "deploywatch.toml",
        &target("db", &pg, "app").replace(common::MONITOR_ROLE, "risky"),
    );
    let output = deploywatch(&dir, &["check", "--privileges"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("pg_signal_backend") && stdout.contains("pg_write_server_files"),
        "{stdout}"
    );
    assert!(!stdout.contains("pg_execute_server_program"), "{stdout}");
    // The monitoring role the tests use has none of these.
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &pack("p", &[("a", "sql = \"SELECT 1\"\nexpect = \"== 1\"")]),
    );
    dir.write("deploywatch.toml", &target("db", &pg, "app"));
    let output = deploywatch(&dir, &["check", "--privileges"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_still_running_when_the_grace_period_ends_are_cancelled() {
    let pg = cluster();
    pg.create_database("app").expect("db");
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &pack(
            "p",
            &[(
                "slow",
                "sql = \"SELECT pg_sleep(60)::text\"\ntimeout = \"90s\"",
            )],
        ),
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\nshutdown_grace = \"1s\"\n\n{}{}",
            FAST.replace("timeout = \"2s\"", "timeout = \"90s\""),
            target("db", &pg, "app")
        ),
    );
    let port = common::free_port();
    let mut child = common::spawn_daemon(&dir, port);
    let running = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch' AND query LIKE '%pg_sleep(60)%' AND state = 'active'";
    let pg_ref = &pg;
    wait_until(
        "the slow check is running",
        Duration::from_secs(30),
        || async move { (pg_ref.psql("postgres", running).ok()?.trim() == "1").then_some(()) },
    )
    .await;
    let pid = child.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    wait_until(
        "no deploywatch query is left running",
        Duration::from_secs(3),
        || async move { (pg_ref.psql("postgres", running).ok()?.trim() == "0").then_some(()) },
    )
    .await;
}

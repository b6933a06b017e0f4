//! Faults and hostile input must not stall the daemon, hurt the database or make it lie: wrong
//! passwords, huge results, a hung database, announcements while it hangs, session state a
//! check leaves behind, superuser roles, a broken or full state store, and queries still
//! running at shutdown. Everything runs against a real PostgreSQL.

mod common;

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    base, cluster, pack, parse_metrics, start, target_toml, wait_for_metrics, wait_until,
    ConfigDir, FAST,
};
use deploywatch::checks::outcome::Status;
use deploywatch::daemon::DaemonHandle;

async fn wait_http(port: u16, path: &str) {
    let url = format!("http://127.0.0.1:{port}{path}");
    common::wait_until_ok(&url, "the daemon answers", Duration::from_secs(60)).await;
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
    let (pg, dir) = common::app_with_checks(&[
        ("a", "sql = \"SELECT 1\"\nexpect = \"== 1\""),
        ("b", "sql = \"SELECT 2\"\nexpect = \"== 2\""),
        ("c", "sql = \"SELECT 3\"\nexpect = \"== 3\""),
        ("d", "sql = \"SELECT 4\"\nexpect = \"== 4\""),
    ]);
    let hash = bcrypt::hash("right-password", 10).expect("hash");
    dir.write(
        "web.yml",
        &format!("basic_auth_users:\n  prometheus: '{hash}'\n"),
    );
    let settings = format!(
        "[server]\nweb_config_file = \"{}\"\n\n{FAST}",
        dir.path().join("web.yml").display()
    );
    common::write_app_config(&dir, &pg, &settings, "");
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

/// The body of a GET with an Authorization header, on a fresh connection. HTTP/1.0, so a
/// streamed body (`/metrics`) comes as it is, ended by the close, not in chunks.
fn raw_body(port: u16, path: &str, authorization: &str) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: {authorization}\r\n\r\n"
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
    let (pg, dir) = common::app_with_checks(&[
                (
                    "huge",
                    "sql = \"SELECT repeat('x', 1000) FROM generate_series(1, 1000000) WHERE (SELECT n FROM knob) > 0\"\ntimeout = \"60s\"",
                ),
                (
                    "wide",
                    "sql = \"SELECT i::text AS k, 1 AS v, repeat('y', 100000) AS pad FROM generate_series(1, 2000 * (SELECT n FROM knob)) AS i\"\nshape = \"rows\"\nlabels = [\"k\"]\nvalues = [\"v\"]\nmax_series = 100000\ntimeout = \"60s\"",
                ),
            ]);
    pg.psql(
        "app",
        "CREATE TABLE knob (n int); INSERT INTO knob VALUES (0); GRANT SELECT ON knob TO PUBLIC",
    )
    .expect("knob");
    common::write_app_config(&dir, &pg, &common::fast_with_timeout("60s"), "");
    let port = common::free_port();
    let mut child = common::spawn_daemon(&dir, port);
    let pid = child.id().expect("pid");
    wait_http(port, "/readyz").await;
    // Let a few small runs settle the allocator before the baseline is read.
    let url = format!("http://127.0.0.1:{port}");
    wait_for_metrics(&url, "the gated checks ran", Duration::from_secs(30), |m| {
        let runs = m
            .metric("deploywatch_check_runs_total")
            .label("check", "wide")
            .value_opt()?;
        (runs >= 3.0).then_some(())
    })
    .await;
    let before = proc_status_kib(pid, "VmRSS:");
    pg.psql("app", "UPDATE knob SET n = 1")
        .expect("open the gate");
    for check in ["huge", "wide"] {
        wait_for_metrics(
            &url,
            &format!("{check} ends in too_many_rows"),
            Duration::from_secs(120),
            |m| {
                let errors = m
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
    wait_until("every check passes", Duration::from_secs(60), || async {
        let snapshot = handle.state.snapshot();
        snapshot.targets[target]
            .checks
            .values()
            .all(|c| c.status == Status::Pass)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_turns_up_off_and_stale_passes_into_errors_within_the_timeouts() {
    let checks: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                format!("c{i}"),
                format!("sql = \"SELECT {i}\"\nexpect = \"== {i}\""),
            )
        })
        .collect();
    // interval 1 s, check timeout 2 s, connect timeout 1 s
    let (pg, _dir, handle) = common::start_app(&checks, FAST, "max_connections = 2\n").await;
    wait_all_pass(&handle, "db").await;
    // A check due just after the hang starts within one interval and gives up within its
    // timeout plus the connect timeout.
    let bound = Duration::from_secs(1) + Duration::from_secs(2) + Duration::from_secs(1);

    pg.pause().expect("SIGSTOP");
    let paused = Instant::now();
    let state = handle.state.clone();
    let url = base(&handle);
    let down_after = wait_for_metrics(&url, "up drops", Duration::from_secs(60), |m| {
        let up = m.metric("deploywatch_up").label("target", "db").value();
        (up == 0.0).then(|| paused.elapsed())
    })
    .await;
    let stale_gone_after = wait_until(
        "no check shows its last pass",
        Duration::from_secs(60),
        || async {
            state.snapshot().targets["db"]
                .checks
                .values()
                .all(|c| c.status != Status::Pass)
                .then(|| paused.elapsed())
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
        &format!("{FAST}{}", target_toml("db", &pg, "postgres")),
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
    let (pg, dir) = common::app_with_checks(&[(
                "locker",
                "sql = \"SELECT pg_advisory_lock(4242)::text || current_setting('application_name')\"\ninterval = \"1h\"",
            )]);
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ntimeout = \"5s\"\n\n[deployments]\nenabled = false\n\n{}max_connections = 1\n",
            target_toml("db", &pg, "app")
        ),
    );
    let handle = start(&dir).await;
    wait_until("the check ran", Duration::from_secs(60), || async {
        (handle.state.snapshot().targets["db"].checks["locker"].runs > 0).then_some(())
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

#[test]
fn a_superuser_role_is_refused_unless_allowed() {
    let (pg, dir) = common::app_with_checks(&[("a", "sql = \"SELECT 1\"\nexpect = \"== 1\"")]);
    let superuser = format!(
        "[defaults]\nconnect_timeout = \"2s\"\n\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\nuser = \"postgres\"\n",
        pg.port()
    );
    dir.write("deploywatch.toml", &superuser);
    let refused = dir.run(&["check"]);
    let text = common::output_text(&refused);
    assert_eq!(refused.status.code(), Some(2), "{text}");
    assert!(
        text.contains("superuser") && text.contains("allow_superuser"),
        "{text}"
    );

    dir.write(
        "deploywatch.toml",
        &format!("{superuser}allow_superuser = true\n"),
    );
    let allowed = dir.run(&["check"]);
    let stderr = String::from_utf8_lossy(&allowed.stderr);
    assert_eq!(allowed.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("superuser"), "a warning: {stderr}");
    let privileges = dir.run(&["check", "--privileges"]);
    let stdout = String::from_utf8_lossy(&privileges.stdout);
    assert_eq!(privileges.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("superuser"), "{stdout}");
}

#[test]
fn check_privileges_flags_roles_that_can_reach_beyond_the_database() {
    let (pg, dir) = common::app_with_checks(&[("a", "sql = \"SELECT 1\"\nexpect = \"== 1\"")]);
    pg.psql(
        "postgres",
        "CREATE ROLE risky LOGIN; GRANT pg_monitor, pg_signal_backend, pg_write_server_files TO risky",
    )
    .expect("role");
    dir.write(
        "deploywatch.toml",
        &target_toml("db", &pg, "app").replace(common::MONITOR_ROLE, "risky"),
    );
    let output = dir.run(&["check", "--privileges"]);
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
    dir.write("deploywatch.toml", &target_toml("db", &pg, "app"));
    let output = dir.run(&["check", "--privileges"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Announcements while the database hangs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_are_recorded_at_once_while_the_database_hangs() {
    let (pg, dir) = common::app_with_checks(&[("a", "sql = \"SELECT 1\"\nexpect = \"== 1\"")]);
    let token = dir.write("token", "s3cret-token\n");
    let store = dir.path().join("state.sqlite");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\napi_token_file = \"{}\"\n\n[store]\npath = \"{}\"\n\n\
             [defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n\n\
             [deployments]\nsample_interval = \"1s\"\nversion_query = \"SELECT '1.0'\"\n\n{}",
            token.display(),
            store.display(),
            target_toml("db", &pg, "app")
        ),
    );
    let handle = start(&dir).await;
    let url = base(&handle);
    wait_until(
        "the tracker has sampled",
        Duration::from_secs(60),
        || async { handle.state.snapshot().targets["db"].schema_version.clone() },
    )
    .await;
    pg.pause().expect("SIGSTOP");
    // The tracker's sampling pass waits on the hung server.
    wait_until("the hang shows", Duration::from_secs(60), || async {
        (handle.state.snapshot().targets["db"].reachable == Some(false)).then_some(())
    })
    .await;
    let post = |body: String| {
        let url = url.clone();
        async move {
            let started = Instant::now();
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                deploywatch::commands::client::request(
                    hyper::Method::POST,
                    &format!("{url}/api/deployments"),
                    "application/json",
                    Some("s3cret-token"),
                    Some(body),
                ),
            )
            .await;
            (reply, started.elapsed())
        }
    };
    let body = r#"{"version": "2.0", "started_at": "2026-01-02T03:04:05Z"}"#.to_string();
    let (reply, took) = post(body.clone()).await;
    let Ok(reply) = reply else {
        pg.resume().expect("SIGCONT");
        panic!("no answer within 5 s while the database hangs");
    };
    let (code, text) = reply.expect("request");
    assert_eq!(code.as_u16(), 201, "{text} after {took:?}");
    let view: serde_json::Value = serde_json::from_str(&text).expect("json");
    let expected_at = humantime::parse_rfc3339("2026-01-02T03:04:05Z")
        .expect("time")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs_f64();
    assert_eq!(view["at"].as_f64(), Some(expected_at), "{text}");
    // A pipeline that retries gets the same deployment, not a second one.
    let (retry, _) = post(body).await;
    let (code, text) = retry.expect("answer").expect("request");
    assert!(code.is_success(), "{code} {text}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).expect("json")["id"],
        view["id"]
    );
    // Without started_at, the time the request was received.
    let sent = deploywatch::time::unix_now();
    let (reply, _) = post(r#"{"version": "2.1"}"#.to_string()).await;
    let (code, text) = reply.expect("answer").expect("request");
    assert_eq!(code.as_u16(), 201, "{text}");
    let at = serde_json::from_str::<serde_json::Value>(&text).expect("json")["at"]
        .as_f64()
        .expect("at");
    assert!((at - sent).abs() < 2.0, "recorded at {at}, sent at {sent}");
    pg.resume().expect("SIGCONT");
    handle.shutdown().await.expect("shutdown");
    let recorded = deploywatch::storage::Store::open(&store)
        .expect("store")
        .deployments(Some("db"))
        .expect("deployments");
    let versions: Vec<&str> = recorded.iter().map(|d| d.to_version.as_str()).collect();
    assert_eq!(versions, ["2.1", "2.0"], "{recorded:?}");
}

// ---------------------------------------------------------------------------------------------
// The state store

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_store_stops_the_start_until_reset_explicitly() {
    let (pg, dir) = common::app_with_checks(&[("a", "sql = \"SELECT 1\"")]);
    let store = dir.path().join("state.sqlite");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[store]\npath = \"{}\"\n\n{}",
            store.display(),
            target_toml("db", &pg, "app")
        ),
    );
    {
        let s = deploywatch::storage::Store::open(&store).expect("store");
        s.set_last_version("db", "1.0", 1.0).expect("write");
    }
    for broken in [&b""[..], &b"this is not a database"[..]] {
        std::fs::write(&store, broken).expect("break the store");
        let port = common::free_port();
        let mut child = common::spawn_daemon(&dir, port);
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("the daemon refuses to start")
            .expect("wait");
        let stderr = common::stderr_of(&mut child).await;
        assert_ne!(status.code(), Some(0), "{stderr}");
        assert!(
            stderr.contains(&store.display().to_string()) && stderr.contains("--reset-store"),
            "{stderr}"
        );
        assert_eq!(
            std::fs::read(&store).expect("kept"),
            broken,
            "the file is left as it was"
        );
    }
    let port = common::free_port();
    let mut child = common::spawn_run(
        &dir,
        &[],
        &["--reset-store", "--listen", &format!("127.0.0.1:{port}")],
    );
    wait_http(port, "/readyz").await;
    let _ = child.kill().await;
    let aside = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.sqlite.invalid-")
        });
    assert!(aside, "the invalid file is kept aside");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_write_failures_answer_503_are_counted_and_logged_once() {
    use std::os::unix::process::CommandExt as _;
    let (pg, dir) = common::app_with_checks(&[("a", "sql = \"SELECT 1\"")]);
    let store = dir.path().join("state.sqlite");
    let token = dir.write("token", "tok\n");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\napi_token_file = \"{}\"\n\n[store]\npath = \"{}\"\n\n[deployments]\nsample_interval = \"1h\"\n\n{}",
            token.display(),
            store.display(),
            target_toml("db", &pg, "app")
        ),
    );
    drop(deploywatch::storage::Store::open(&store).expect("store"));
    // A file size limit stands for a full disk: writes beyond it fail (EFBIG) instead of the
    // process being killed, as SIGXFSZ is ignored.
    const LIMIT: u64 = 96 * 1024;
    let port = common::free_port();
    let mut command = dir.async_command();
    command
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    unsafe {
        command.as_std_mut().pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().expect("spawn");
    let pid = child.id().expect("pid");
    wait_http(port, "/healthz").await;
    let url = format!("http://127.0.0.1:{port}/api/deployments");
    let announce = |n: u32| {
        let url = url.clone();
        async move {
            let body = format!(r#"{{"version": "1.{n}", "note": "{}"}}"#, "x".repeat(2000));
            deploywatch::commands::client::request(
                hyper::Method::POST,
                &url,
                "*/*",
                Some("tok"),
                Some(body),
            )
            .await
            .expect("request")
        }
    };
    let mut n = 0;
    let mut codes = Vec::new();
    loop {
        n += 1;
        let (code, text) = announce(n).await;
        codes.push(code.as_u16());
        if code.as_u16() == 503 {
            assert!(text.contains("store"), "{text}");
            break;
        }
        assert_eq!(code.as_u16(), 201, "until the disk is full: {text}");
        assert!(n < 200, "the store never filled up: {codes:?}");
    }
    for _ in 0..3 {
        n += 1;
        assert_eq!(announce(n).await.0.as_u16(), 503);
    }
    let scrape = common::scrape_at(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("/metrics answers 200");
    let failures = scrape
        .metric("deploywatch_store_errors_total")
        .label("operation", "announce")
        .value();
    assert!(failures >= 4.0, "{failures}");
    // Room again: the next write works and the recovery is logged.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    let raised = unsafe {
        libc::prlimit(
            i32::try_from(pid).expect("pid"),
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(raised, 0);
    n += 1;
    assert_eq!(announce(n).await.0.as_u16(), 201);
    // A clean stop, so every log line is written out.
    common::terminate(&mut child, Duration::from_secs(20)).await;
    let stderr = common::stderr_of(&mut child).await;
    assert_eq!(
        stderr.matches("state store writes are failing").count(),
        1,
        "one warning for the change to failing: {stderr}"
    );
    assert_eq!(
        stderr.matches("state store writes work again").count(),
        1,
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_still_running_when_the_grace_period_ends_are_cancelled() {
    let (pg, dir) = common::app_with_checks(&[(
        "slow",
        "sql = \"SELECT pg_sleep(60)::text\"\ntimeout = \"90s\"",
    )]);
    let settings = format!(
        "[server]\nshutdown_grace = \"1s\"\n\n{}",
        common::fast_with_timeout("90s")
    );
    common::write_app_config(&dir, &pg, &settings, "");
    let port = common::free_port();
    let mut child = common::spawn_daemon(&dir, port);
    let running = "%pg_sleep(60)%";
    common::wait_for_queries(&pg, running, 1, Duration::from_secs(30)).await;
    let status = common::terminate(&mut child, Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    // None is left running.
    common::wait_for_queries(&pg, running, 0, Duration::from_secs(3)).await;
}

// ---------------------------------------------------------------------------------------------
// Many scrapers

/// A rows check of 1,000 series with long labels, watched as 40 targets (one database): an
/// exposition of about 10 MB in chunks of a target's family each, far more than the socket
/// buffers hold, so a scrape whose client stops reading stays unfinished.
fn big_exposition_checks() -> Vec<(String, String)> {
    vec![(
        "big".to_string(),
        "sql = \"SELECT repeat('x', 150) || i AS k, 1 AS v FROM generate_series(1, 1000) AS i\"\n\
         shape = \"rows\"\nlabels = [\"k\"]\nvalues = [\"v\"]\nmax_series = 1000"
            .to_string(),
    )]
}

const BIG_TARGETS: usize = 40;

/// The main file of a daemon under the scrape tests: `limit` concurrent scrapes, the check of
/// [`big_exposition_checks`] on [`BIG_TARGETS`] targets.
fn write_scrape_config(
    dir: &ConfigDir,
    pg: &deploywatch_testkit::pgcluster::PgCluster,
    limit: usize,
) {
    let mut text = format!(
        "[server]\nmax_concurrent_scrapes = {limit}\n\n[defaults]\ninterval = \"5s\"\ntimeout = \"30s\"\nconnect_timeout = \"2s\"\n\n[deployments]\nenabled = false\n\n"
    );
    for i in 0..BIG_TARGETS {
        text.push_str(&target_toml(&format!("t{i}"), pg, "app"));
    }
    dir.write("deploywatch.toml", &text);
}

/// Waits until every check of every target has run once: the exposition is at its full size.
async fn wait_all_ran(handle: &DaemonHandle) {
    wait_until("every check ran", Duration::from_secs(120), || async {
        let snapshot = handle.state.snapshot();
        (snapshot.targets.len() == BIG_TARGETS
            && snapshot
                .targets
                .values()
                .all(|t| t.checks.values().all(|c| c.runs >= 1)))
        .then_some(())
    })
    .await;
}

/// A scrape whose client reads the status line and then nothing: once the socket buffers are
/// full, the daemon's writing of it waits on the client.
async fn held_scrape(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: deploywatch\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut head))
        .await
        .expect("the held scrape answers within 30 s")
        .expect("status line");
    assert_eq!(&head, b"HTTP/1.1 200", "a held scrape is served");
    stream
}

/// Reads what is left of a held scrape: `Some(bytes)` when the chunked body ended properly,
/// `None` when the connection ended without the body's end.
async fn finish_held(mut stream: tokio::net::TcpStream) -> Option<usize> {
    use tokio::io::AsyncReadExt as _;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut rest))
        .await
        .expect("the held scrape ends within 120 s");
    match read {
        Ok(_) if rest.ends_with(b"\r\n0\r\n\r\n") => Some(rest.len()),
        _ => None,
    }
}

/// A one-off request with `Connection: close`: status code, head, body.
async fn raw_request(addr: std::net::SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: deploywatch\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("request");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("answer");
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} answers within 30 s"));
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let code = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, head, answer[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_beyond_the_limit_get_503_while_status_answers_and_held_ones_finish() {
    let (pg, dir) = common::app_with_checks(&big_exposition_checks());
    write_scrape_config(&dir, &pg, 2);
    let handle = start(&dir).await;
    let addr = handle.local_addr;
    wait_all_ran(&handle).await;

    // Two scrapes take both turns and stop reading.
    let held = [held_scrape(addr).await, held_scrape(addr).await];

    // A third waits briefly for a turn, then is refused; the other endpoints answer meanwhile.
    let third = tokio::spawn(async move { raw_request(addr, "/metrics").await });
    let (status_code, _, _) = raw_request(addr, "/status").await;
    assert_eq!(status_code, 200, "/status answers while scrapes queue");
    let (health_code, _, _) = raw_request(addr, "/healthz").await;
    assert_eq!(health_code, 200, "/healthz answers while scrapes queue");
    let (code, head, body) = third.await.expect("third scrape");
    assert_eq!(code, 503, "a scrape beyond the limit is refused: {head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: "),
        "the refusal says when to retry: {head}"
    );
    assert!(
        String::from_utf8_lossy(&body).contains("max_concurrent_scrapes"),
        "the refusal names the setting"
    );

    // The held scrapes finish whole once read.
    for stream in held {
        let length = finish_held(stream).await.expect("a held scrape ends whole");
        assert!(
            length > 8 * 1024 * 1024,
            "the exposition ({length} bytes) is larger than the socket buffers, so the scrape was really held"
        );
    }

    // Their turns came back: a new scrape is served, and counts the refusal.
    let (code, body) = common::get(&format!("{}/metrics", base(&handle))).await;
    assert_eq!(code, 200, "a scrape after the held ones finished is served");
    assert!(
        body.lines()
            .any(|l| l == "deploywatch_scrapes_refused_total 1"),
        "the refusal is counted"
    );
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraper_that_stops_reading_is_cut_off_and_its_turn_comes_back() {
    let (pg, dir) = common::app_with_checks(&big_exposition_checks());
    write_scrape_config(&dir, &pg, 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = deploywatch::daemon::start_with_scrape_stall_timeout(
        dir.load(),
        listener,
        Duration::from_secs(2),
    )
    .expect("daemon starts");
    let addr = handle.local_addr;
    wait_all_ran(&handle).await;

    // The only turn is taken by a client that stops reading.
    let stalled = held_scrape(addr).await;

    // It is cut off: its turn comes back and another scrape is served.
    wait_until(
        "a scrape is served after the stalled one is cut off",
        Duration::from_secs(20),
        || async {
            let (code, _, _) = raw_request(addr, "/metrics").await;
            (code == 200).then_some(())
        },
    )
    .await;

    // The stalled client, reading again, does not get a body that looks whole.
    assert_eq!(
        finish_held(stalled).await,
        None,
        "a cut-off scrape ends without the end of its chunked body"
    );
    handle.shutdown().await.expect("shutdown");
}

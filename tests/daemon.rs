//! `deploywatch run` against real PostgreSQL servers: the endpoints, the metrics contract,
//! databases that go down or hang, the connection cap, overlapping runs, reload and shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{
    base, cluster, cognit_cluster, get, parse_metrics, scrape, start, target_toml, wait_for_answer,
    wait_for_metrics, wait_ready, wait_until, ConfigDir, Version, FAST,
};
use deploywatch::daemon::{self, DaemonHandle};
use deploywatch_testkit::pgcluster::PgCluster;

/// A configuration with the shipped cognit pack, the `FAST` settings and one target `db`, the
/// cognit database of `pg`.
fn fast_dir(pg: &PgCluster) -> ConfigDir {
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.write(
        "deploywatch.toml",
        &format!("{FAST}{}", target_toml("db", pg, "cognit")),
    );
    dir
}

/// Waits until every check of every target has run at least once.
async fn wait_all_ran(handle: &DaemonHandle) {
    let state = handle.state.clone();
    wait_until("every check ran", Duration::from_secs(60), || async {
        let snapshot = state.snapshot();
        snapshot
            .targets
            .values()
            .all(|t| t.checks.values().all(|c| c.runs > 0))
            .then_some(())
    })
    .await;
}

fn two_targets(a: &PgCluster, b: &PgCluster) -> ConfigDir {
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.write(
        "deploywatch.toml",
        &format!(
            "{FAST}{}\n{}",
            target_toml("migrated", a, "cognit"),
            target_toml("legacy", b, "cognit")
        ),
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_show_every_check_of_every_target() {
    let a = cognit_cluster(Version::V370);
    let b = cognit_cluster(Version::V360);
    let dir = two_targets(&a, &b);
    let handle = start(&dir).await;
    wait_ready(&handle).await;
    wait_all_ran(&handle).await;

    let m = scrape(&handle).await;
    assert_eq!(
        m.metric("deploywatch_up")
            .label("target", "migrated")
            .value(),
        1.0
    );
    assert_eq!(
        m.metric("deploywatch_up").label("target", "legacy").value(),
        1.0
    );
    assert_eq!(m.metric("deploywatch_build_info").value(), 1.0);
    assert_eq!(
        m.metric("deploywatch_config_last_reload_successful")
            .value(),
        1.0
    );
    let config = dir.load();
    for check in &config.targets[0].checks {
        let success = m
            .metric("deploywatch_check_success")
            .label("target", "migrated")
            .label("check", &check.name)
            .label("category", check.category.as_str())
            .label("severity", check.severity.as_str())
            .value();
        assert_eq!(success, 1.0, "{} on migrated", check.name);
        assert!(
            m.metric("deploywatch_check_duration_seconds")
                .label("check", &check.name)
                .label("target", "migrated")
                .value()
                >= 0.0
        );
        assert!(
            m.metric("deploywatch_check_last_run_timestamp_seconds")
                .label("check", &check.name)
                .label("target", "migrated")
                .value()
                > 1.7e9
        );
    }
    let legacy_version = m
        .metric("deploywatch_check_success")
        .label("target", "legacy")
        .label("check", "schema_version")
        .value();
    assert_eq!(legacy_version, 0.0);
    assert_eq!(
        m.metric("deploywatch_check_status")
            .label("target", "legacy")
            .label("check", "schema_version")
            .label("status", "fail")
            .value(),
        1.0
    );
    assert_eq!(
        m.metric("deploywatch_check_value")
            .label("target", "legacy")
            .label("check", "image_id_type_consistency")
            .value(),
        2.0
    );
    assert_eq!(
        m.metric("deploywatch_check_value")
            .label("target", "migrated")
            .label("check", "orphaned_payments")
            .value(),
        0.0
    );
    let partial = m
        .metric("deploywatch_check_value")
        .label("target", "migrated")
        .label("check", "partial_index_usage")
        .label("column", "scans")
        .samples();
    assert!(
        partial.len() >= 9,
        "one scans series per partial index, got {}",
        partial.len()
    );
    assert!(partial.iter().all(|s| s.labels.get("indexname").is_some()));

    // /status says the same, with each target's schema version (read even though deployment
    // tracking is off here).
    let url = base(&handle);
    wait_for_metrics(&url, "schema versions read", Duration::from_secs(20), |m| {
        let seen = |target: &str, version: &str| {
            m.metric("deploywatch_schema_version_info")
                .label("target", target)
                .label("version", version)
                .value_opt()
                == Some(1.0)
        };
        (seen("legacy", "3.6.0") && seen("migrated", "3.7.0")).then_some(())
    })
    .await;
    let (code, body) = get(&format!("{}/status", base(&handle))).await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(status["status"], "failing", "legacy is on 3.6.0");
    let targets = status["targets"].as_array().expect("targets");
    let legacy = targets
        .iter()
        .find(|t| t["name"] == "legacy")
        .expect("legacy");
    assert_eq!(legacy["reachable"], true);
    assert_eq!(legacy["schema_version"], "3.6.0");
    let version_check = legacy["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "schema_version")
        .expect("check");
    assert_eq!(version_check["status"], "fail");
    assert_eq!(version_check["value"], "3.6.0");
    assert_eq!(version_check["expectation"], "== \"3.7.0\"");
    assert_eq!(version_check["severity"], "critical");
    assert!(version_check["runbook"].is_string());
    assert!(version_check["last_run"].is_string());

    // Filters and the text table.
    let (_, body) = get(&format!(
        "{}/status?target=migrated&status=fail",
        base(&handle)
    ))
    .await;
    let filtered: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(filtered["targets"].as_array().map(|t| t.len()), Some(1));
    assert_eq!(
        filtered["targets"][0]["checks"].as_array().map(|c| c.len()),
        Some(0)
    );
    let (_, text) = get(&format!("{}/status?format=text", base(&handle))).await;
    assert!(
        text.contains("FAIL    schema_version")
            || text
                .lines()
                .any(|l| l.contains("FAIL") && l.contains("schema_version")),
        "{text}"
    );

    // `deploywatch status` against the running daemon.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .args(["status", "--url", &base(&handle), "--target", "migrated"])
        .output()
        .await
        .expect("status command");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("target migrated"), "{stdout}");
    assert!(stdout.contains("PASS"), "{stdout}");
    assert_eq!(
        output.status.code(),
        Some(0),
        "the migrated target alone is ok: {stdout}"
    );
    for args in [&["--target", "legacy"][..], &[][..]] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
            .args(["status", "--url", &base(&handle)])
            .args(args)
            .output()
            .await
            .expect("status command");
        assert_eq!(
            output.status.code(),
            Some(1),
            "{args:?}: the 3.6.0 target is failing: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_404_405_and_probes() {
    let a = cognit_cluster(Version::V370);
    let dir = fast_dir(&a);
    let handle = start(&dir).await;
    let url = base(&handle);
    assert_eq!(get(&format!("{url}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{url}/nope")).await.0, 404);
    let (code, _) = deploywatch::commands::client::request(
        hyper::Method::POST,
        &format!("{url}/metrics"),
        "*/*",
        None,
        Some("x".into()),
    )
    .await
    .expect("post");
    assert_eq!(code.as_u16(), 405);
    assert_eq!(get(&format!("{url}/status?status=bogus")).await.0, 400);
    wait_ready(&handle).await;
    handle.shutdown().await.expect("clean shutdown");
}

/// `curl` fetching `url`, with `--compressed` (asks for gzip and decodes it) or without: the
/// response headers (lower case) and the body.
async fn curl(url: &str, compressed: bool) -> (String, String) {
    let headers = tempfile::NamedTempFile::new().expect("temporary file");
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "--fail", "-D"]).arg(headers.path());
    if compressed {
        command.arg("--compressed");
    }
    let output = command.arg(url).output().await.expect("curl runs");
    assert!(
        output.status.success(),
        "curl {url}: {}",
        common::output_text(&output)
    );
    let headers = std::fs::read_to_string(headers.path())
        .expect("headers")
        .to_ascii_lowercase();
    (
        headers,
        String::from_utf8(output.stdout).expect("UTF-8 text"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_streamed_gzipped_when_accepted_and_pass_promtool() {
    let a = cognit_cluster(Version::V370);
    let dir = fast_dir(&a);
    let handle = start(&dir).await;
    wait_ready(&handle).await;
    wait_all_ran(&handle).await;
    let url = format!("{}/metrics", base(&handle));

    let (headers, gzipped) = curl(&url, true).await;
    assert!(headers.contains("content-encoding: gzip"), "{headers}");
    assert!(headers.contains("transfer-encoding: chunked"), "{headers}");
    let (headers, plain) = curl(&url, false).await;
    assert!(!headers.contains("content-encoding"), "{headers}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );

    // The same series either way (values move between the two scrapes).
    let names = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_string()))
            .collect()
    };
    assert_eq!(names(&gzipped), names(&plain));
    let m = parse_metrics(&gzipped);
    assert_eq!(
        m.metric("deploywatch_up").label("target", "db").value(),
        1.0
    );

    // promtool reads the decoded text as Prometheus would.
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install -y prometheus)");
    let mut stdin = promtool.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, gzipped.as_bytes())
        .await
        .expect("write to promtool");
    drop(stdin);
    let checked = promtool.wait_with_output().await.expect("promtool ends");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}",
        common::output_text(&checked)
    );

    // A HEAD is answered without rendering the text.
    let (code, _) =
        deploywatch::commands::client::request(hyper::Method::HEAD, &url, "*/*", None, None)
            .await
            .expect("head");
    assert_eq!(code.as_u16(), 200);
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_is_reported_and_recovers_without_a_restart() {
    let mut a = cognit_cluster(Version::V370);
    let dir = fast_dir(&a);
    let handle = start(&dir).await;
    wait_ready(&handle).await;
    wait_all_ran(&handle).await;

    a.stop().expect("stop postgres");
    let url = base(&handle);
    wait_for_metrics(&url, "up = 0", Duration::from_secs(20), |m| {
        (m.metric("deploywatch_up").label("target", "db").value() == 0.0).then_some(())
    })
    .await;
    let started = Instant::now();
    let (_, body) = get(&format!("{url}/metrics")).await;
    let (status_code, status_body) = get(&format!("{url}/status")).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "scrapes must not wait on the database"
    );
    assert_eq!(status_code, 200);
    let m = parse_metrics(&body);
    let connection_errors: f64 = m
        .metric("deploywatch_check_errors_total")
        .label("target", "db")
        .label("kind", "connection")
        .sum();
    assert!(connection_errors >= 1.0, "connection errors are counted");
    let status: serde_json::Value = serde_json::from_str(&status_body).expect("json");
    assert_eq!(status["targets"][0]["reachable"], false);
    assert!(
        status["targets"][0]["connection_error"]
            .as_str()
            .unwrap_or("")
            .contains("connect"),
        "{status_body}"
    );

    a.start_again().expect("start postgres");
    wait_for_metrics(&url, "up = 1 again", Duration::from_secs(60), |m| {
        let up = m.metric("deploywatch_up").label("target", "db").value() == 1.0;
        let passing = m
            .metric("deploywatch_check_success")
            .label("target", "db")
            .label("check", "orphaned_payments")
            .value()
            == 1.0;
        (up && passing).then_some(())
    })
    .await;
    handle.shutdown().await.expect("clean shutdown");
}

/// deploywatch's sessions on `pg` that also meet `filter` (a condition on `pg_stat_activity`),
/// -1 when they cannot be counted.
fn deploywatch_sessions(pg: &PgCluster, filter: &str) -> i64 {
    pg.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'deploywatch' AND ({filter})"
        ),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(-1)
}

/// The most sessions [`deploywatch_sessions`] counts when asked every `every` for `span`: an
/// observation over a period, not a wait for a condition.
async fn most_sessions(pg: &PgCluster, filter: &str, span: Duration, every: Duration) -> i64 {
    let mut most = 0;
    let deadline = Instant::now() + span;
    while Instant::now() < deadline {
        most = most.max(deploywatch_sessions(pg, filter));
        tokio::time::sleep(every).await;
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_times_out_without_delaying_other_targets() {
    let hung = cognit_cluster(Version::V370);
    let healthy = cognit_cluster(Version::V370);
    let dir = ConfigDir::new();
    dir.write(
        "checks/light.toml",
        "[pack]\nname = \"light\"\n\n[[check]]\nname = \"ping\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n\n[[check]]\nname = \"orphans\"\ncategory = \"integrity\"\nseverity = \"critical\"\nsql = \"SELECT count(*) FROM payments p WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = p.participant_id)\"\nexpect = \"== 0\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "{}{}\n{}",
            common::fast_with_timeout("1s"),
            target_toml("hung", &hung, "cognit"),
            target_toml("healthy", &healthy, "cognit")
        ),
    );
    let handle = start(&dir).await;
    wait_ready(&handle).await;
    wait_all_ran(&handle).await;
    // The daemon runs on this test's runtime: its tasks are counted here.
    let alive_tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let tasks_before = alive_tasks();

    hung.pause().expect("SIGSTOP postgres");
    let state = handle.state.clone();
    let runs_of_healthy = |state: &deploywatch::watch::state::State| {
        state.snapshot().targets["healthy"].checks["ping"].runs
    };
    let before = runs_of_healthy(&state);
    let url = base(&handle);
    // A query in flight hits the client deadline (timeout); a new session's handshake hits the
    // connect bound (connection). Either way the check ends in seconds instead of hanging.
    wait_until("hung checks time out", Duration::from_secs(30), || async {
        let snapshot = state.snapshot();
        let check = &snapshot.targets["hung"].checks["ping"];
        let error = check.outcome.as_ref().and_then(|o| o.error.clone())?;
        let timed_out = error.message.contains("no answer from the server")
            || error
                .message
                .contains("did not complete the connection handshake");
        (timed_out && matches!(error.kind.as_str(), "timeout" | "connection")).then_some(())
    })
    .await;
    for _ in 0..5 {
        let started = Instant::now();
        let (code, _) = get(&format!("{url}/metrics")).await;
        assert_eq!(code, 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "scrapes stay fast while a target hangs"
        );
    }
    // The hung target is noticed within its timeouts, which may be before the healthy one
    // ran three times: its runs are awaited while the other still hangs.
    wait_until(
        "the healthy target keeps its schedule while the other hangs",
        Duration::from_secs(10),
        || async { (runs_of_healthy(&state) >= before + 3).then_some(()) },
    )
    .await;

    hung.resume().expect("SIGCONT postgres");
    wait_until("hung target recovers", Duration::from_secs(60), || async {
        let snapshot = state.snapshot();
        let check = &snapshot.targets["hung"].checks["ping"];
        (check.status == deploywatch::checks::outcome::Status::Pass
            && snapshot.targets["hung"].reachable == Some(true))
        .then_some(())
    })
    .await;
    // Sessions abandoned during the hang are gone; at most the cap remain.
    let sessions = wait_until(
        "abandoned sessions are closed",
        Duration::from_secs(30),
        || {
            let n = deploywatch_sessions(&hung, "true");
            async move { (0..=2).contains(&n).then_some(n) }
        },
    )
    .await;
    assert!(sessions <= 2);
    // Runs abandoned during the hang left no tasks behind (a little slack for connections of
    // the test's own HTTP client winding down).
    let tasks_after = wait_until("no leaked tasks", Duration::from_secs(30), || {
        let n = alive_tasks();
        async move { (n <= tasks_before + 2).then_some(n) }
    })
    .await;
    assert!(
        tasks_after <= tasks_before + 2,
        "{tasks_before} -> {tasks_after}"
    );
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_due_checks_never_open_more_sessions_than_the_cap() {
    let sleepy =
        "interval = \"1s\"\nsql = \"SELECT count(*) FROM pg_sleep(0.05)\"\nexpect = \"== 1\"";
    let checks: Vec<(String, &str)> = (0..50).map(|i| (format!("sleepy_{i}"), sleepy)).collect();
    let settings = common::fast_with_timeout("10s");
    let (pg, _dir, handle) = common::start_app(&checks, &settings, "max_connections = 2\n").await;
    let max_seen = most_sessions(
        &pg,
        "true",
        Duration::from_secs(6),
        Duration::from_millis(50),
    )
    .await;
    assert!(max_seen >= 1, "checks were running");
    assert!(
        max_seen <= 2,
        "PostgreSQL saw {max_seen} deploywatch sessions with a cap of 2"
    );
    let runs: u64 = handle.state.snapshot().targets["db"]
        .checks
        .values()
        .map(|c| c.runs)
        .sum();
    assert!(runs >= 50, "the queue drained: {runs} runs");
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_slower_than_its_interval_is_skipped_not_doubled() {
    let slow = "interval = \"1s\"\ntimeout = \"10s\"\nsql = \"SELECT count(*) FROM pg_sleep(2.5)\"\nexpect = \"== 1\"";
    let settings = common::fast_with_timeout("10s");
    let (pg, _dir, handle) =
        common::start_app(&[("slow", slow)], &settings, "max_connections = 4\n").await;
    let max_running = most_sessions(
        &pg,
        "query LIKE '%pg_sleep(2.5)%' AND state = 'active'",
        Duration::from_secs(7),
        Duration::from_millis(100),
    )
    .await;
    assert_eq!(max_running, 1, "never two runs of one check at once");
    let m = scrape(&handle).await;
    let skipped = m
        .metric("deploywatch_check_skipped_total")
        .label("check", "slow")
        .label("reason", "overlap")
        .value();
    assert!(skipped >= 2.0, "skipped runs are counted: {skipped}");
    handle.shutdown().await.expect("clean shutdown");
}

/// The binary with real signals: SIGHUP with a good and a bad configuration, then SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_or_rejects_and_sigterm_exits_zero() {
    let pg = cognit_cluster(Version::V370);
    let dir = ConfigDir::new();
    let one = "[pack]\nname = \"p\"\n\n[[check]]\nname = \"first\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n";
    dir.write("checks/p.toml", one);
    let main = format!("{FAST}{}", target_toml("db", &pg, "cognit"));
    dir.write("deploywatch.toml", &main);
    let port = common::free_port();
    let mut child = common::spawn_daemon(&dir, port);
    let url = format!("http://127.0.0.1:{port}");
    wait_for_metrics(&url, "first check reported", Duration::from_secs(30), |m| {
        m.metric("deploywatch_check_success")
            .label("check", "first")
            .value_opt()
    })
    .await;
    let pid = child.id().expect("pid");

    // A good new configuration: a second check appears.
    dir.write("checks/p.toml", &format!("{one}\n[[check]]\nname = \"second\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 2\"\nexpect = \"== 2\"\n"));
    common::signal(pid, "-HUP");
    wait_for_metrics(
        &url,
        "second check after reload",
        Duration::from_secs(30),
        |m| {
            m.metric("deploywatch_check_success")
                .label("check", "second")
                .value_opt()
                .filter(|v| *v == 1.0)
        },
    )
    .await;

    // A bad one: rejected, the old checks keep running.
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"broken\"\n",
    );
    common::signal(pid, "-HUP");
    wait_for_metrics(
        &url,
        "reload failure reported",
        Duration::from_secs(30),
        |m| {
            m.metric("deploywatch_config_last_reload_successful")
                .value_opt()
                .filter(|v| *v == 0.0)
        },
    )
    .await;
    let runs = |m: &common::Scrape| {
        m.metric("deploywatch_check_runs_total")
            .label("check", "second")
            .value()
    };
    let before = runs(&parse_metrics(&get(&format!("{url}/metrics")).await.1));
    wait_for_metrics(
        &url,
        "the previous configuration keeps running",
        Duration::from_secs(20),
        |m| (runs(m) > before).then_some(()),
    )
    .await;

    let status = common::terminate(&mut child, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    let stderr = common::stderr_of(&mut child).await;
    assert!(stderr.contains("configuration reload rejected"), "{stderr}");
    assert!(
        stderr.contains("check[0] (broken)"),
        "the log names the key: {stderr}"
    );
}

/// A target with `databases` patterns watches every matching database of its server, picks up
/// databases created later and lets dropped ones go; a server that cannot be asked shows as
/// an unreachable target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_matching_a_pattern_are_discovered_and_followed() {
    let pg = cluster();
    for db in ["app_eu", "app_us", "app_us_test", "reporting"] {
        pg.create_database(db).expect("create database");
    }
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"db\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT current_database()::text\"\nexpect = \"!= \\\"\\\"\"\n",
    );
    let closed_port = common::free_port();
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\ndiscovery_interval = \"1s\"\n\n\
             [deployments]\nenabled = false\n\n\
             [[targets]]\nname = \"fleet\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"deploywatch\"\n\
             databases = [\"app_*\"]\nexclude_databases = [\"*_test\"]\n\n\
             [[targets]]\nname = \"gone\"\nhost = \"127.0.0.1\"\nport = {closed_port}\nuser = \"deploywatch\"\ndatabases = [\"*\"]\n",
            pg.port()
        ),
    );
    let handle = start(&dir).await;
    wait_ready(&handle).await;
    let url = base(&handle);
    let targets_up = |what: &'static str, names: &'static [(&str, f64)]| {
        let want: Vec<(String, f64)> = names.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        let url = url.clone();
        async move {
            wait_for_metrics(&url, what, Duration::from_secs(30), |m| {
                (m.metric("deploywatch_up").by_label("target") == want).then_some(())
            })
            .await
        }
    };
    targets_up(
        "both matching databases are watched",
        &[("fleet/app_eu", 1.0), ("fleet/app_us", 1.0), ("gone", 0.0)],
    )
    .await;
    let (_, status) = get(&format!("{url}/status")).await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let targets = status["targets"].as_array().expect("targets");
    let eu = targets
        .iter()
        .find(|t| t["name"] == "fleet/app_eu")
        .expect("fleet/app_eu");
    wait_for_answer(
        &format!("{url}/status?target=fleet/app_eu"),
        "the check ran in the discovered database",
        Duration::from_secs(10),
        |_, body| body.contains("\"app_eu\"").then_some(()),
    )
    .await;
    assert!(
        eu["checks"].as_array().is_some_and(|c| c.len() == 1),
        "{eu}"
    );
    let gone = targets.iter().find(|t| t["name"] == "gone").expect("gone");
    assert_eq!(gone["reachable"], false);
    assert!(
        gone["connection_error"]
            .as_str()
            .unwrap_or("")
            .contains("discovery"),
        "{gone}"
    );

    // A new database is picked up; a dropped one goes away; no restart.
    pg.create_database("app_asia").expect("create database");
    pg.psql("postgres", "DROP DATABASE app_us WITH (FORCE)")
        .expect("drop database");
    targets_up(
        "the fleet follows the server",
        &[
            ("fleet/app_asia", 1.0),
            ("fleet/app_eu", 1.0),
            ("gone", 0.0),
        ],
    )
    .await;
    handle.shutdown().await.expect("clean shutdown");
}

/// Every metric family the daemon exports is documented in the README's metrics reference.
#[test]
fn every_exported_metric_is_documented() {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).expect("README");
    let source =
        std::fs::read_to_string(common::repo().join("src/server/metrics.rs")).expect("metrics.rs");
    let exported: Vec<&str> = source
        .split('"')
        .filter(|s| s.starts_with("deploywatch_") && !s.contains(' '))
        .collect();
    assert!(exported.len() >= 20, "{exported:?}");
    for name in exported {
        assert!(
            readme.contains(&format!("`{name}`")),
            "{name} is not in the README"
        );
    }
}

/// SIGTERM while a check is running: the daemon waits for it (within the grace period), then
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_check_in_flight_finish_within_the_grace_period() {
    let (pg, dir) = common::app_with_checks(&[(
        "slow",
        "sql = \"SELECT pg_sleep(3)::text\"\ntimeout = \"10s\"",
    )]);
    let settings = format!("[server]\nshutdown_grace = \"8s\"\n\n{FAST}");
    common::write_app_config(&dir, &pg, &settings, "");
    let port = common::free_port();
    let mut child = common::spawn_daemon(&dir, port);
    // Wait until PostgreSQL shows the check running.
    common::wait_for_queries(&pg, "%pg_sleep(3)%", 1, Duration::from_secs(30)).await;
    let asked = Instant::now();
    let status = common::terminate(&mut child, Duration::from_secs(20)).await;
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0));
    let stderr = common::stderr_of(&mut child).await;
    assert!(
        stderr.contains("waiting for checks in flight") && !stderr.contains("grace period expired"),
        "{stderr}"
    );
    // The check had up to 3 s left when SIGTERM came: the daemon waited for it, and no longer
    // than the grace period allows.
    assert!(
        took > Duration::from_millis(500) && took < Duration::from_secs(8 + 3),
        "exited after {took:?}"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch'"
        )
        .expect("sessions")
        .trim(),
        "0",
        "sessions are closed"
    );
}

/// A reload applies the deployment settings too: tracking switched on and an API token given
/// in the new configuration take effect for `POST /api/deployments` without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_the_deployment_api_settings() {
    let pg = cognit_cluster(Version::V370);
    let dir = fast_dir(&pg);
    dir.write("token", "reload-token");
    let handle = start(&dir).await;
    let announce = |base: String| async move {
        let announcement = deploywatch::commands::client::Announcement {
            version: "3.7.1",
            ..Default::default()
        };
        deploywatch::commands::client::announce(&base, "reload-token", &announcement)
            .await
            .expect("post")
    };
    let (code, body) = announce(base(&handle)).await;
    assert_eq!(code.as_u16(), 401, "no token is configured yet: {body}");

    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\napi_token_file = \"token\"\n\n[checks]\ninterval_override = \"1s\"\n\n[deployments]\nsample_interval = \"1s\"\n\n{}",
            target_toml("db", &pg, "cognit")
        ),
    );
    handle
        .events
        .send(daemon::Event::Reload)
        .await
        .expect("reload");
    let url = base(&handle);
    let body = wait_until(
        "the announcement is taken",
        Duration::from_secs(20),
        || async {
            let (code, body) = announce(url.clone()).await;
            (code.as_u16() == 201).then_some(body)
        },
    )
    .await;
    assert!(body.contains("3.7.1"), "{body}");
    handle.shutdown().await.expect("clean shutdown");
}

/// A target no check has given a result on yet is `pending`, never `ok`: a daemon that has
/// just started answers `deploywatch status` with exit 1 for a database it has not reached
/// (here one whose server accepts the connection and never answers), not a green 0. Once a
/// check has a result the target is judged on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_not_reached_yet_is_pending_not_ok() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("address").port();
    // Accepted by the kernel's backlog and never answered.
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"ping\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\ninterval = \"1s\"\nconnect_timeout = \"15s\"\ntimeout = \"15s\"\n\n\
             [deployments]\nenabled = false\n\n\
             [[targets]]\nname = \"silent\"\nhost = \"127.0.0.1\"\nport = {silent_port}\ndbname = \"x\"\n"
        ),
    );
    let handle = start(&dir).await;
    // Alive, not ready: readiness waits for the first results, as `pending` does.
    common::wait_until_ok(
        &format!("{}/healthz", base(&handle)),
        "healthz",
        Duration::from_secs(10),
    )
    .await;
    let (code, body) = get(&format!("{}/status", base(&handle))).await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(status["status"], "pending", "{status:#}");
    assert_eq!(status["targets"][0]["status"], "pending", "{status:#}");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .args(["status", "--url", &base(&handle)])
        .output()
        .await
        .expect("status command");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("PENDING"), "{stdout}");
    handle.shutdown().await.expect("shutdown");
    drop(silent);
}

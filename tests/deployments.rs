//! Deployments, windows and regressions against a real PostgreSQL on a compressed clock:
//! detection by version change, announcement and rollback; an injected regression; a
//! deployment that changes nothing; counter resets and restarts; `kill -9` of the daemon.

mod common;

use std::time::Duration;

use common::{cluster, cognit_cluster, get, scrape, wait_until, ConfigDir, Version};
use deploywatch::analysis::deployment::{
    DeploymentKind, DeploymentView, Detection, FlagState, Signal, WindowView,
};
use deploywatch::analysis::window::{Verdict, Window};
use deploywatch::daemon::DaemonHandle;
use deploywatch::storage::Store;
use deploywatch_testkit::config::compressed_clock;
use deploywatch_testkit::pgcluster::PgCluster;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-5f1c";

/// One test's world: a throwaway cluster holding the cognit database, the daemon's
/// configuration (windows of `hour`, `2*hour`, `3*hour` seconds, sampling every second) and the
/// application's workload once asked for. The workload stops when the setup is dropped.
struct Setup {
    pg: PgCluster,
    dir: ConfigDir,
    cancel: CancellationToken,
}

impl Setup {
    /// cognit at `version` on a new cluster.
    fn new(version: Version, hour: u32) -> Setup {
        let pg = cognit_cluster(version);
        Setup::on(pg, hour)
    }

    /// cognit at `version` with pg_stat_statements preloaded and created.
    fn with_statements(version: Version, hour: u32) -> Setup {
        Setup::with_statements_at(1, version, hour)
    }

    /// [`Setup::with_statements`] with cognit's data generated at `scale`.
    fn with_statements_at(scale: u32, version: Version, hour: u32) -> Setup {
        let pg = common::cluster_with_statements();
        common::cognit_db_at(&pg, "cognit", scale, version);
        pg.psql("cognit", "CREATE EXTENSION pg_stat_statements")
            .expect("extension");
        Setup::on(pg, hour)
    }

    /// The configuration for a cluster that already holds the cognit database.
    fn on(pg: PgCluster, hour: u32) -> Setup {
        let dir = ConfigDir::new();
        dir.add_shipped_pack("cognit-3.7.0.toml");
        dir.write("token", TOKEN);
        dir.write(
            "deploywatch.toml",
            &compressed_clock(
                "cognit",
                pg.port(),
                Some("path = \"state.sqlite\""),
                1,
                hour.into(),
            ),
        );
        Setup {
            pg,
            dir,
            cancel: CancellationToken::new(),
        }
    }

    /// Replaces `from` with `to` in the main configuration file.
    fn edit_config(&self, from: &str, to: &str) {
        let main = std::fs::read_to_string(self.dir.main()).expect("config");
        assert!(main.contains(from), "the configuration holds {from:?}");
        std::fs::write(self.dir.main(), main.replace(from, to)).expect("config");
    }

    /// Starts the application's workload on cognit.
    async fn workload(&self) {
        let (_handle, _counters) = deploywatch_testkit::workload::spawn(
            &self.pg.connection_string("cognit"),
            40,
            Duration::from_millis(200),
            self.cancel.clone(),
        )
        .await
        .expect("workload");
    }

    /// Stops the workload, then the daemon.
    async fn stop(&self, handle: DaemonHandle) {
        self.cancel.cancel();
        handle.shutdown().await.expect("shutdown");
    }

    async fn start(&self) -> DaemonHandle {
        common::start(&self.dir).await
    }

    /// The daemon, once `samples` baseline samples are stored.
    async fn start_after_baseline(&self, samples: usize) -> DaemonHandle {
        let handle = self.start().await;
        wait_baseline(&handle, samples).await;
        handle
    }

    /// The daemon's store, opened beside it (or after it).
    fn store(&self) -> Store {
        Store::open(&self.dir.path().join("state.sqlite")).expect("store")
    }

    /// `deploywatch report` with `args`: what it printed.
    fn report(&self, args: &[&str]) -> String {
        let output = self.dir.run(&[&["report"], args].concat());
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The latest deployment view of the only target, once `accept` holds.
async fn deployment_where(
    handle: &DaemonHandle,
    what: &str,
    timeout: Duration,
    accept: impl Fn(&DeploymentView) -> bool,
) -> DeploymentView {
    let state = handle.state.clone();
    wait_until(what, timeout, || {
        let view = state.snapshot().deployments.get("cognit").cloned();
        let accepted = view.filter(|v| accept(v));
        async move { accepted }
    })
    .await
}

fn verdict(view: &DeploymentView, window: Window) -> Option<Verdict> {
    view.windows
        .iter()
        .find(|w| w.window == window)
        .map(|w| w.verdict)
}

fn closed(view: &DeploymentView, window: Window) -> bool {
    verdict(view, window).is_some_and(|v| v != Verdict::Watching)
}

/// The view of `window` in `view`.
fn window_of(view: &DeploymentView, window: Window) -> &WindowView {
    view.windows
        .iter()
        .find(|w| w.window == window)
        .unwrap_or_else(|| panic!("{window:?} in {view:#?}"))
}

/// The first deployment the daemon shows.
async fn first_deployment(handle: &DaemonHandle, what: &str) -> DeploymentView {
    deployment_where(handle, what, Duration::from_secs(20), |_| true).await
}

/// The deployment once `window` has closed.
async fn once_closed(handle: &DaemonHandle, window: Window, timeout: Duration) -> DeploymentView {
    let what = format!("{} closed", window.as_str());
    deployment_where(handle, &what, timeout, |v| closed(v, window)).await
}

async fn wait_baseline(handle: &DaemonHandle, samples: usize) {
    // Samples are written every second; wait until the baseline has enough of them.
    let state = handle.state.clone();
    wait_until("baseline samples stored", Duration::from_secs(60), || {
        let target = state.snapshot().targets["cognit"].clone();
        let ready =
            target.schema_version.is_some() && target.samples_recorded >= samples as u64 + 3;
        async move { ready.then_some(()) }
    })
    .await;
}

/// Waits until `count` more statistics samples have been stored.
async fn wait_samples(handle: &DaemonHandle, count: u64) {
    let recorded = |state: &deploywatch::watch::state::State| {
        state.snapshot().targets["cognit"].samples_recorded
    };
    let target = recorded(&handle.state) + count;
    let state = handle.state.clone();
    wait_until("more samples stored", Duration::from_secs(30), || {
        let done = recorded(&state) >= target;
        async move { done.then_some(()) }
    })
    .await;
}

async fn announce(handle: &DaemonHandle, version: &str) -> (u16, String) {
    announce_to(&common::base(handle), version).await
}

/// Announces `version` and waits until the daemon shows it as the deployment.
async fn announced(handle: &DaemonHandle, version: &str) -> DeploymentView {
    let (code, body) = announce(handle, version).await;
    assert_eq!(code, 201, "{body}");
    let what = format!("{version} recorded");
    deployment_where(handle, &what, Duration::from_secs(20), |v| {
        v.to_version == version
    })
    .await
}

/// Announces `version` to the daemon at `base` (`http://ADDRESS`): the answer.
async fn announce_to(base: &str, version: &str) -> (u16, String) {
    let announcement = deploywatch::commands::client::Announcement {
        version,
        note: Some("test"),
        ..Default::default()
    };
    let (code, body) = deploywatch::commands::client::announce(base, TOKEN, &announcement)
        .await
        .expect("post");
    (code.as_u16(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_is_detected_and_its_windows_close_in_order() {
    let setup = Setup::new(Version::V360, 6);
    setup.workload().await;
    let pg = &setup.pg;
    let handle = setup.start_after_baseline(6).await;

    common::migrate(pg, "cognit").expect("migration");
    let view = first_deployment(&handle, "deployment detected").await;
    assert_eq!(view.kind, DeploymentKind::Deploy);
    assert_eq!(view.detected_by, Detection::VersionChange);
    assert_eq!(view.from_version.as_deref(), Some("3.6.0"));
    assert_eq!(view.to_version, "3.7.0");
    assert!(
        view.baseline_samples >= 4,
        "baseline: {}",
        view.baseline_samples
    );
    assert_eq!(view.current_window, Some(Window::FirstHour));
    assert_eq!(verdict(&view, Window::FirstHour), Some(Verdict::Watching));

    // first_hour closes before first_day, which closes before first_week.
    let view = once_closed(&handle, Window::FirstHour, Duration::from_secs(30)).await;
    assert!(!closed(&view, Window::FirstDay));
    assert_eq!(
        verdict(&view, Window::FirstHour),
        Some(Verdict::Pass),
        "{view:#?}"
    );
    let view = once_closed(&handle, Window::FirstDay, Duration::from_secs(30)).await;
    assert!(!closed(&view, Window::FirstWeek));
    // New partial indexes the workload never scanned are flagged, and only those: at this
    // scale the planner seq-scans the small images table, while the submissions queries use
    // their partial indexes from the start.
    let first_day = window_of(&view, Window::FirstDay);
    let unused: Vec<&str> = first_day
        .regressions
        .iter()
        .filter(|f| f.signal == Signal::UnusedIndex)
        .map(|f| f.subject.as_str())
        .collect();
    let never_scanned = pg
        .psql("cognit", "SELECT 'public.' || indexrelname FROM pg_stat_user_indexes WHERE indexrelname ~ '(_true|_paid|_pending)$' AND indexrelname NOT IN ('idx_consents_active') AND idx_scan = 0")
        .expect("index scans");
    let never_scanned: Vec<&str> = never_scanned.lines().collect();
    assert!(
        never_scanned.contains(&"public.idx_images_ai_generated_true"),
        "{never_scanned:?}"
    );
    for index in &never_scanned {
        assert!(
            unused.contains(index),
            "{index} was never scanned and should be flagged: {unused:?}"
        );
    }
    assert!(
        !unused.contains(&"public.idx_submissions_flagged_true"),
        "an index the workload uses is not flagged: {unused:?}"
    );
    // Notices, not regressions: they never fail the window nor page.
    assert!(first_day
        .regressions
        .iter()
        .filter(|f| f.signal == Signal::UnusedIndex)
        .all(|f| f.state == FlagState::Notice && !f.active()));
    assert_eq!(first_day.verdict, Verdict::Pass, "{first_day:#?}");
    let view = once_closed(&handle, Window::FirstWeek, Duration::from_secs(30)).await;
    assert_eq!(view.current_window, Some(Window::Steady));

    let m = scrape(&handle).await;
    assert_eq!(
        m.metric("deploywatch_deployment_info")
            .label("version", "3.7.0")
            .label("previous_version", "3.6.0")
            .label("kind", "deploy")
            .value(),
        1.0
    );
    assert_eq!(
        m.metric("deploywatch_deployment_window")
            .label("window", "steady")
            .value(),
        1.0
    );
    assert_eq!(
        m.metric("deploywatch_window_verdict")
            .label("window", "first_hour")
            .label("verdict", "pass")
            .value(),
        1.0
    );
    assert_eq!(
        m.metric("deploywatch_confirmed_regressions")
            .label("window", "first_day")
            .label("signal", "unused_index")
            .value(),
        0.0
    );
    assert!(m.metric("deploywatch_deployment_timestamp_seconds").value() > 1.7e9);

    // `deploywatch report` fills in the checklist's notes from the store.
    let text = setup.report(&[]);
    assert!(text.contains("3.6.0 -> 3.7.0"), "{text}");
    assert!(
        text.contains("**Database Size Before**:") && !text.contains("not sampled"),
        "{text}"
    );
    assert!(text.contains("first_day: pass"), "{text}");
    assert!(text.contains("unused_index"), "{text}");
    assert!(text.contains("[x] Schema version is 3.7.0"), "{text}");
    setup.stop(handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_index_a_hot_query_needs_is_flagged_with_evidence() {
    let setup = Setup::with_statements_at(25, Version::V370, 8);
    setup.workload().await;
    let pg = &setup.pg;
    let handle = setup.start_after_baseline(8).await;

    let (code, body) = announce(&handle, "3.7.1").await;
    assert_eq!(code, 201, "{body}");
    pg.psql("cognit", "DROP INDEX idx_submissions_participant")
        .expect("drop index");

    let view = deployment_where(
        &handle,
        "query latency regression",
        Duration::from_secs(40),
        |v| {
            v.windows.iter().any(|w| {
                w.regressions
                    .iter()
                    .any(|f| f.signal == Signal::QueryLatency)
            })
        },
    )
    .await;
    let (window, finding) = view
        .windows
        .iter()
        .flat_map(|w| w.regressions.iter().map(move |f| (w.window, f)))
        .find(|(_, f)| f.signal == Signal::QueryLatency)
        .expect("finding");
    // The index goes right after the deployment: flagged in first_hour, or in first_day when
    // first_hour held too few samples; nothing later.
    assert!(
        matches!(window, Window::FirstHour | Window::FirstDay),
        "{window:?}: {finding:#?}"
    );
    assert!(
        finding.message.contains("submissions WHERE participant_id"),
        "{finding:#?}"
    );
    let figure = |key: &str| {
        finding
            .evidence
            .get(key)
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("evidence {key} in {:#?}", finding.evidence))
    };
    assert!(
        figure("window_ms_per_call") > figure("baseline_ms_per_call") * 1.2,
        "{finding:#?}"
    );
    assert!(figure("extra_db_ms_per_second") > 0.1, "{finding:#?}");
    assert!(figure("q_value") <= 0.01, "{finding:#?}");
    assert!(
        figure("sequential_p_value") <= figure("q_value"),
        "{finding:#?}"
    );
    assert!(figure("n_baseline") >= 4.0, "{finding:#?}");
    assert!(figure("n_window") >= 3.0, "{finding:#?}");
    assert!(figure("window_calls") >= 5.0, "{finding:#?}");
    let view = deployment_where(
        &handle,
        "sequential scans regression",
        Duration::from_secs(40),
        |v| {
            v.windows
                .iter()
                .any(|w| w.regressions.iter().any(|f| f.signal == Signal::SeqScans))
        },
    )
    .await;
    let seq = view
        .windows
        .iter()
        .find(|w| w.regressions.iter().any(|f| f.signal == Signal::SeqScans))
        .expect("window");
    assert!(
        matches!(seq.window, Window::FirstHour | Window::FirstDay),
        "{seq:#?}"
    );
    assert!(
        seq.regressions
            .iter()
            .any(|f| f.signal == Signal::SeqScans && f.subject.contains("submissions")),
        "{seq:#?}"
    );
    let status = get(&format!("http://{}/status", handle.local_addr)).await.1;
    assert!(
        status.contains("query_latency") && status.contains("evidence"),
        "{status}"
    );
    setup.stop(handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_that_change_nothing_pass() {
    let setup = Setup::with_statements(Version::V370, 4);
    setup.workload().await;
    let handle = setup.start_after_baseline(5).await;
    let mut alarms = 0;
    let rounds = 3;
    for round in 0..rounds {
        let version = format!("3.7.{}", round + 1);
        let (code, body) = announce(&handle, &version).await;
        assert_eq!(code, 201, "{body}");
        let view = deployment_where(&handle, "first_day closed", Duration::from_secs(40), |v| {
            v.to_version == version && closed(v, Window::FirstDay)
        })
        .await;
        for window in [Window::FirstHour, Window::FirstDay] {
            match verdict(&view, window) {
                Some(Verdict::Regression) => {
                    alarms += 1;
                    eprintln!("false alarm in {window:?}: {view:#?}");
                }
                Some(Verdict::Pass) => {}
                other => panic!("{window:?} ended {other:?}: {view:#?}"),
            }
        }
    }
    assert_eq!(alarms, 0, "false alarms in {rounds} no-change deployments");
    setup.stop(handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announcement_for_the_detected_version_moves_its_start_and_keeps_its_baseline() {
    let setup = Setup::new(Version::V360, 60);
    let pg = &setup.pg;
    let handle = setup.start_after_baseline(6).await;
    common::migrate(pg, "cognit").expect("migration");
    let detected = first_deployment(&handle, "deployment detected").await;
    assert_eq!(detected.detected_by, Detection::VersionChange);
    // The pipeline announces it afterwards, dated a few seconds before it was noticed.
    let started_at = deploywatch::time::rfc3339(detected.at.floor() - 3.0);
    let announcement = deploywatch::commands::client::Announcement {
        version: "3.7.0",
        started_at: Some(&started_at),
        note: Some("pipeline"),
        ..Default::default()
    };
    let (code, body) = deploywatch::commands::client::announce(
        &format!("http://{}", handle.local_addr),
        TOKEN,
        &announcement,
    )
    .await
    .expect("post");
    assert_eq!(code.as_u16(), 201, "{body}");
    let merged = deployment_where(&handle, "start moved", Duration::from_secs(20), |v| {
        v.at < detected.at
    })
    .await;
    assert_eq!(merged.id, detected.id, "{merged:#?}");
    assert_eq!(merged.at, detected.at.floor() - 3.0);
    assert_eq!(merged.from_version.as_deref(), Some("3.6.0"));
    assert_eq!(merged.to_version, "3.7.0");
    assert!(
        merged.baseline_samples >= 4,
        "the baseline was cut: {merged:#?}"
    );
    let store = setup.store();
    let all = store.deployments(Some("cognit")).expect("deployments");
    assert_eq!(all.len(), 1, "{all:#?}");
    assert!(all
        .iter()
        .all(|d| d.from_version.as_deref() != Some(d.to_version.as_str())));
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_small_a_baseline_judges_no_signal() {
    let setup = Setup::new(Version::V360, 8);
    // Far more baseline samples wanted than the few seconds before the deployment give.
    setup.edit_config("min_baseline_samples = 4", "min_baseline_samples = 500");
    let pg = &setup.pg;
    let handle = setup.start_after_baseline(4).await;
    common::migrate(pg, "cognit").expect("migration");
    first_deployment(&handle, "deployment detected").await;
    // An integrity check that passed throughout the (short) baseline now fails.
    common::corrupt(pg, "cognit", "orphaned_payments");
    let view = once_closed(&handle, Window::FirstHour, Duration::from_secs(40)).await;
    let first_hour = window_of(&view, Window::FirstHour);
    assert_eq!(first_hour.verdict, Verdict::Inconclusive, "{view:#?}");
    assert!(first_hour.regressions.is_empty(), "{view:#?}");
    assert!(
        view.limitations
            .iter()
            .any(|l| l.contains("baseline sample")),
        "{view:#?}"
    );
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_back_to_3_6_0_is_reported_as_a_rollback() {
    let setup = Setup::new(Version::V370, 30);
    let pg = &setup.pg;
    let handle = setup.start_after_baseline(2).await;
    pg.psql_file("cognit", &common::fixture("rollback_to_3.6.0.sql"))
        .expect("rollback script");
    let view = first_deployment(&handle, "rollback detected").await;
    assert_eq!(view.kind, DeploymentKind::Rollback);
    assert_eq!(view.from_version.as_deref(), Some("3.7.0"));
    assert_eq!(view.to_version, "3.6.0");
    assert_eq!(view.rollbacks_seen, 1);
    let m = scrape(&handle).await;
    assert_eq!(
        m.metric("deploywatch_deployment_info")
            .label("kind", "rollback")
            .label("version", "3.6.0")
            .value(),
        1.0
    );
    assert_eq!(
        m.metric("deploywatch_rollbacks_total")
            .label("target", "cognit")
            .value(),
        1.0
    );
    let (_, text) = get(&format!("http://{}/status?format=text", handle.local_addr)).await;
    assert!(text.contains("rollback 3.7.0 -> 3.6.0"), "{text}");
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_resets_and_a_restart_raise_no_alarm() {
    let mut setup = Setup::with_statements(Version::V370, 10);
    setup.workload().await;
    let handle = setup.start_after_baseline(6).await;
    let (code, body) = announce(&handle, "3.7.1").await;
    assert_eq!(code, 201, "{body}");
    wait_samples(&handle, 2).await;
    setup
        .pg
        .psql("cognit", "SELECT pg_stat_statements_reset()")
        .expect("statements reset");
    wait_samples(&handle, 2).await;
    setup
        .pg
        .psql("cognit", "SELECT pg_stat_reset()")
        .expect("stats reset");
    wait_samples(&handle, 1).await;
    setup.cancel.cancel();
    setup.pg.restart().expect("restart postgres");
    setup.cancel = CancellationToken::new();
    setup.workload().await;
    let view = once_closed(&handle, Window::FirstDay, Duration::from_secs(60)).await;
    assert_eq!(
        verdict(&view, Window::FirstHour),
        Some(Verdict::Pass),
        "{view:#?}"
    );
    assert_eq!(
        verdict(&view, Window::FirstDay),
        Some(Verdict::Pass),
        "{view:#?}"
    );
    setup.stop(handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_api_checks_its_token_and_its_body() {
    let setup = Setup::new(Version::V370, 30);
    let dir = &setup.dir;
    let handle = setup.start().await;
    let url = format!("http://{}/api/deployments", handle.local_addr);
    let post = |token: Option<&'static str>, body: &'static str| {
        let url = url.clone();
        async move {
            let (code, body) = deploywatch::commands::client::request(
                hyper::Method::POST,
                &url,
                "application/json",
                token,
                Some(body.to_string()),
            )
            .await
            .expect("post");
            (code.as_u16(), body)
        }
    };
    // Refused: who asks, what, the status and what the answer says.
    let refused: [(Option<&'static str>, &'static str, u16, &str); 5] = [
        (None, "{\"version\": \"3.8.0\"}", 401, ""),
        (Some("wrong"), "{\"version\": \"3.8.0\"}", 401, ""),
        (Some(TOKEN), "{\"version\": ", 400, "malformed body"),
        (
            Some(TOKEN),
            "{\"version\": \"3.8.0\", \"target\": \"nope\"}",
            400,
            "no target is named",
        ),
        (
            Some(TOKEN),
            "{\"version\": \"3.8.0\", \"started_at\": \"yesterday\"}",
            400,
            "",
        ),
    ];
    for (token, request, status, says) in refused {
        let (code, body) = post(token, request).await;
        assert_eq!(code, status, "{request}: {body}");
        assert!(body.contains(says), "{request}: {body}");
        assert!(!body.contains(TOKEN), "{body}");
    }
    let (code, body) = post(
        Some(TOKEN),
        "{\"version\": \"3.8.0\", \"note\": \"release train 42\"}",
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(created["to_version"], "3.8.0");
    assert_eq!(created["detected_by"], "announced");
    assert_eq!(created["note"], "release train 42");

    // `deploywatch deploy mark` from a pipeline.
    let output = dir
        .async_command()
        .args([
            "deploy",
            "mark",
            "--version",
            "3.8.1",
            "--url",
            &format!("http://{}", handle.local_addr),
        ])
        .output()
        .await
        .expect("deploy mark");
    let stdout = common::succeeded(&output);
    assert!(stdout.contains("\"to_version\": \"3.8.1\""), "{stdout}");
    let (_, listed) = get(&url).await;
    assert!(listed.contains("3.8.1"), "{listed}");
    handle.shutdown().await.expect("shutdown");
}

/// `kill -9` mid-window: the restarted daemon still has the baseline, the deployment and the
/// window timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_window_loses_nothing() {
    let setup = Setup::new(Version::V370, 6);
    let dir = &setup.dir;
    let port = common::free_port();
    let spawn = || common::spawn_daemon(dir, port);
    let status = format!("http://127.0.0.1:{port}/status");
    let mut child = spawn();
    // A baseline of a few stored samples before the announcement.
    common::wait_for_json(
        &status,
        "baseline samples stored",
        Duration::from_secs(60),
        |s| (s["targets"][0]["samples_recorded"].as_u64() > Some(6)).then_some(()),
    )
    .await;
    let (code, body) = announce_to(&format!("http://127.0.0.1:{port}"), "3.7.1").await;
    assert_eq!(code, 201, "{body}");
    let before =
        common::wait_for_json(&status, "first_hour closed", Duration::from_secs(30), |s| {
            let d = &s["targets"][0]["deployment"];
            (d["windows"][0]["verdict"] != "watching" && d["windows"][0]["verdict"].is_string())
                .then(|| d.clone())
        })
        .await;
    common::signal(child.id().expect("pid"), "-9");
    let _ = child.wait().await;
    // The daemon was writing a sample every second when it died: the file is sound and every
    // sample in it reads back whole.
    {
        let store = deploywatch::storage::Store::open(&dir.path().join("state.sqlite"))
            .expect("the store opens after kill -9");
        store.check_integrity().expect("integrity_check");
        let stored = store.sample_count("cognit", 0.0, f64::MAX).expect("count");
        assert!(stored >= 4, "{stored} samples");
        let read = store.samples("cognit", 0.0, f64::MAX).expect("samples");
        assert_eq!(read.len(), stored, "every stored sample decodes");
    }

    let mut child = spawn();
    let after = common::wait_for_json(
        &status,
        "deployment restored",
        Duration::from_secs(30),
        |s| {
            let d = &s["targets"][0]["deployment"];
            d["id"].is_number().then(|| d.clone())
        },
    )
    .await;
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["at"], before["at"]);
    assert_eq!(after["to_version"], "3.7.1");
    assert!(
        after["baseline_samples"].as_u64() >= before["baseline_samples"].as_u64(),
        "{after:#}"
    );
    assert!(
        before["baseline_samples"].as_u64().unwrap_or(0) >= 4,
        "{before:#}"
    );
    assert_eq!(
        after["windows"][0]["verdict"],
        before["windows"][0]["verdict"]
    );
    assert_ne!(
        after["current_window"], "first_hour",
        "the clock kept running: {after:#}"
    );
    // Every window keeps its place on the clock: same start and end as before the kill.
    let bounds = |d: &serde_json::Value| -> Vec<(String, String, String)> {
        d["windows"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .map(|w| {
                        (
                            w["window"].as_str().unwrap_or_default().to_string(),
                            w["start"].as_str().unwrap_or_default().to_string(),
                            w["end"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (was, is) = (bounds(&before), bounds(&after));
    assert!(
        was.len() >= 2,
        "first_hour and first_day were open: {before:#}"
    );
    assert_eq!(is[..was.len()], was[..], "{before:#}\n{after:#}");
    // The window that was open when the daemon died still closes, with a verdict.
    let closed = common::wait_for_json(
        &status,
        "first_day closes after the restart",
        Duration::from_secs(30),
        |s| {
            let day = s["targets"][0]["deployment"]["windows"]
                .as_array()?
                .iter()
                .find(|w| w["window"] == "first_day")?;
            (day["verdict"] != "watching").then(|| day.clone())
        },
    )
    .await;
    assert!(
        matches!(
            closed["verdict"].as_str(),
            Some("pass" | "regression" | "inconclusive")
        ),
        "{closed:#}"
    );
    let _ = child.kill().await;
}

/// A deployment declared in the configuration is recorded once, with its windows, and survives
/// a reload without being recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_declared_in_config_is_recorded_once() {
    let setup = Setup::new(Version::V370, 30);
    setup.edit_config(
        "[[targets]]",
        "[[deployments.declared]]\ntarget = \"cognit\"\nversion = \"3.7.0\"\nat = \"2026-01-05T10:00:00Z\"\nnote = \"release train 12\"\n\n[[targets]]",
    );
    let handle = setup.start().await;
    let view = first_deployment(&handle, "declared deployment").await;
    assert_eq!(view.detected_by, Detection::Declared);
    assert_eq!(view.to_version, "3.7.0");
    assert_eq!(view.note.as_deref(), Some("release train 12"));
    assert_eq!(view.at_text, "2026-01-05T10:00:00Z");
    assert_eq!(
        view.current_window,
        Some(Window::Steady),
        "long past: every window has closed"
    );
    let reloaded_before = handle.state.snapshot().config_last_reload_success;
    handle
        .events
        .send(deploywatch::daemon::Event::Reload)
        .await
        .expect("reload");
    let state = handle.state.clone();
    wait_until("the reload applied", Duration::from_secs(20), || {
        let now = state.snapshot().config_last_reload_success;
        async move { (now != reloaded_before).then_some(()) }
    })
    .await;
    let text = setup.report(&[]);
    assert!(
        text.contains("# Deployment notes: cognit #1"),
        "recorded once: {text}"
    );
    handle.shutdown().await.expect("shutdown");
    let store = setup.store();
    assert_eq!(
        store
            .deployments(Some("cognit"))
            .expect("deployments")
            .len(),
        1
    );
}

/// The connection string of database `db` of `pg` as deploywatch's role.
fn monitor_dsn(pg: &PgCluster, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={} dbname={db}",
        pg.port(),
        common::MONITOR_ROLE
    )
}

/// A pool `name` of one session to database `db` of `pg` as deploywatch's role.
fn monitor_pool(name: &str, pg: &PgCluster, db: &str) -> deploywatch::postgres::pool::TargetPool {
    let settings = deploywatch::postgres::target::ConnectionSettings::parse(
        &monitor_dsn(pg, db),
        Duration::from_secs(5),
    )
    .expect("settings");
    deploywatch::postgres::pool::TargetPool::new(
        name,
        settings,
        1,
        Duration::from_secs(10),
        Duration::from_secs(5),
    )
}

/// A clean restart keeps the statistics (they are saved at shutdown), so no counter goes back;
/// the sampler still tells the interval that held the restart, from the server's start time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_tells_a_restart_the_counters_survived() {
    use deploywatch::analysis::sample::delta;
    use deploywatch::postgres::sampler::{self, StatementsSupport};

    let mut pg = cluster();
    let pool = monitor_pool("restart", &pg, "postgres");
    let none = StatementsSupport::Unavailable(String::new());
    let read = |at: f64| {
        let (pool, none) = (&pool, &none);
        async move { sampler::read(pool, none, at).await.expect("read") }
    };
    let first = read(0.0).await;
    let second = read(1.0).await;
    assert!(first.postmaster_start.is_some(), "{first:?}");
    assert!(!delta(&first, &second).restarted());
    pg.restart().expect("restart");
    // The pool's session died with the server; the next read opens a new one.
    let third = wait_until(
        "a read after the restart",
        Duration::from_secs(30),
        || async { sampler::read(&pool, &none, 2.0).await.ok() },
    )
    .await;
    let s = delta(&second, &third);
    assert!(s.restarted(), "{s:?}");
    pool.close();
}

/// deploywatch's own statements (its checks, its statistics reads) run as its own role and are
/// not the application's: the sampler leaves them out, so they are never judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_leaves_out_the_statements_of_its_own_role() {
    use deploywatch::postgres::sampler;

    // Structurally different (constants would be normalised away into one query id).
    const OWN: &str = "SELECT count(*), max(relpages) FROM pg_class";
    const APPLICATION: &str = "SELECT count(*), min(relpages) FROM pg_class";
    let pg = common::cluster_with_statements();
    pg.create_database("app").expect("database");
    pg.psql("app", "CREATE EXTENSION pg_stat_statements")
        .expect("extension");
    let pool = monitor_pool("own", &pg, "app");
    let (own, connection) =
        tokio_postgres::connect(&monitor_dsn(&pg, "app"), tokio_postgres::NoTls)
            .await
            .expect("connect as deploywatch's role");
    tokio::spawn(connection);
    own.simple_query(OWN).await.expect("own statement");
    pg.psql("app", APPLICATION).expect("application statement");
    let id_of = |text: &str| {
        pg.psql(
            "app",
            &format!(
                "SELECT queryid FROM pg_stat_statements WHERE query LIKE '%{}%'",
                &text[16..29]
            ),
        )
        .expect("query id")
        .trim()
        .to_string()
    };
    let (own_id, application_id) = (id_of(OWN), id_of(APPLICATION));
    assert!(
        !own_id.is_empty() && !application_id.is_empty(),
        "both ran: {own_id:?} {application_id:?}"
    );
    let support = sampler::statements_support(&pool).await.expect("support");
    let raw = sampler::read(&pool, &support, 1.0).await.expect("read");
    let statements = raw.statements.expect("statements read");
    assert!(
        statements.contains_key(&application_id),
        "the application's statement is sampled: {statements:?}"
    );
    assert!(
        !statements.contains_key(&own_id),
        "deploywatch's own statement is left out"
    );
    pool.close();
}

/// The report of a deployment that a later one superseded counts only its own samples (up to
/// the next deployment), judges the version it had, and names what superseded it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_of_a_superseded_deployment_uses_its_own_samples() {
    let setup = Setup::new(Version::V370, 30);
    let handle = setup.start_after_baseline(2).await;
    let first = announced(&handle, "3.7.1").await;
    // Samples under 3.7.1, then 3.7.2 supersedes it, and more samples follow.
    wait_samples(&handle, 3).await;
    let second = announced(&handle, "3.7.2").await;
    wait_samples(&handle, 3).await;
    handle.shutdown().await.expect("shutdown");
    let (own, since) = {
        let store = setup.store();
        (
            store
                .sample_count("cognit", first.at, second.at)
                .expect("count"),
            store
                .sample_count("cognit", first.at, f64::MAX)
                .expect("count"),
        )
    };
    assert!(own >= 2 && since > own, "own {own}, since {since}");
    let text = setup.report(&["--deployment", &first.id.to_string()]);
    assert!(
        text.contains(&format!(
            "**Watched**: {own} sample(s) since the deployment"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("**Superseded**: by #{}", second.id)),
        "{text}"
    );
    assert!(text.contains("[x] Schema version is 3.7.1"), "{text}");
}

/// A statement the deployment brings (its query id, and so its text, first seen after the
/// deployment) is followed in the window, named with its id and text in another signal's
/// evidence (here: listed among the queries on a table whose new index nothing scans), shown
/// with its text in /status, and its text is kept in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_first_seen_after_the_deployment_is_named_in_evidence_and_shown_with_its_text()
{
    const NEW: &str = "SELECT count(*) FROM images WHERE image_id <> 'none'";
    const NORMALISED: &str = "SELECT count(*) FROM images WHERE image_id <> $1";
    let setup = Setup::with_statements(Version::V360, 6);
    setup.workload().await;
    let pg = &setup.pg;
    let handle = setup.start_after_baseline(6).await;

    // The deployment: the migration adds a partial index on images that nothing scans, and
    // the new release runs a statement on images that was never run before.
    common::migrate(pg, "cognit").expect("migration");
    let deployed = deployment_where(
        &handle,
        "deployment detected",
        Duration::from_secs(20),
        |v| v.to_version == "3.7.0",
    )
    .await;
    let seen_before: i64 = pg
        .psql(
            "cognit",
            "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%images WHERE image_id <>%'",
        )
        .expect("count")
        .trim()
        .parse()
        .expect("number");
    assert_eq!(seen_before, 0, "the statement is new");
    let client = pg.connect("cognit").await.expect("connect");
    let stop = setup.cancel.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let _ = client.simple_query(NEW).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Closed at its end, not only showing a regression (the statement's sequential scans).
    let view = deployment_where(&handle, "first_day closed", Duration::from_secs(60), |v| {
        v.id == deployed.id
            && closed(v, Window::FirstDay)
            && v.current_window
                .is_some_and(|w| w != Window::FirstHour && w != Window::FirstDay)
    })
    .await;
    let query_id = pg
        .psql(
            "cognit",
            "SELECT queryid FROM pg_stat_statements WHERE query LIKE '%images WHERE image_id <>%'",
        )
        .expect("query id")
        .trim()
        .to_string();
    assert!(!query_id.is_empty(), "the statement ran");
    let first_day = window_of(&view, Window::FirstDay);
    let finding = first_day
        .regressions
        .iter()
        .find(|f| {
            f.signal == Signal::UnusedIndex && f.subject == "public.idx_images_ai_generated_true"
        })
        .unwrap_or_else(|| panic!("the new index is judged: {first_day:#?}"));
    let named = format!("{query_id}: {NORMALISED}");
    let queries = finding.evidence["queries_on_table"]
        .as_array()
        .expect("queries on the table");
    assert!(
        queries.iter().any(|q| q.as_str() == Some(named.as_str())),
        "{named} in {queries:?}"
    );
    let (_, body) = common::get_as(
        &format!("http://{}/status", handle.local_addr),
        "application/json",
    )
    .await;
    assert!(body.contains(&named), "{body}");
    setup.stop(handle).await;
    // Its text was fetched after the deployment and is kept in the store.
    let store = setup.store();
    assert_eq!(
        store
            .query_texts("cognit")
            .get(&query_id)
            .map(String::as_str),
        Some(NORMALISED)
    );
}

/// Runs `sql` every `pause` until the setup is cancelled, on a connection of the application.
async fn keep_running(setup: &Setup, sql: &'static str, pause: Duration) {
    let (client, connection) =
        tokio_postgres::connect(&setup.pg.connection_string("cognit"), tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    let stop = setup.cancel.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let _ = client.simple_query(sql).await;
            tokio::time::sleep(pause).await;
        }
    });
}

/// cognit 3.7.0 under its workload (windows of `hour` seconds), the daemon started after a
/// baseline of 5 samples and 3.7.1 announced; from then on `sql`, a statement new to
/// pg_stat_statements (its text holds `marker`), runs every 50 ms.
async fn new_statement_deployed(
    hour: u32,
    sql: &'static str,
    marker: &str,
) -> (Setup, DaemonHandle, DeploymentView) {
    let setup = Setup::with_statements(Version::V370, hour);
    setup.workload().await;
    let handle = setup.start_after_baseline(5).await;
    let deployed = announced(&handle, "3.7.1").await;
    assert!(
        statement_in_view(&setup.pg, marker).0.is_empty(),
        "the statement is new"
    );
    keep_running(&setup, sql, Duration::from_millis(50)).await;
    (setup, handle, deployed)
}

/// The query id and text pg_stat_statements has for statements whose text contains `part`.
fn statement_in_view(pg: &PgCluster, part: &str) -> (String, String) {
    let row = pg
        .psql(
            "cognit",
            &format!(
                "SELECT queryid || '|' || query FROM pg_stat_statements WHERE query LIKE '%{part}%' \
                 AND query NOT LIKE '%pg_stat_statements%'"
            ),
        )
        .expect("statement");
    let row = row.trim();
    let (id, text) = row.split_once('|').unwrap_or_default();
    (id.to_string(), text.to_string())
}

/// A statement the release brings that takes a material share of the database's time is a
/// regression on its own (`new_statement`), confirmed and shown with its text, though the
/// baseline has nothing to compare it with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_expensive_statement_after_the_deployment_is_flagged_with_its_text() {
    const EXPENSIVE: &str =
        "SELECT count(*) AS new_feature_total FROM generate_series(1, 300000) g WHERE g % 7 = 3";
    let (setup, handle, deployed) =
        new_statement_deployed(40, EXPENSIVE, "new_feature_total").await;
    let view = deployment_where(
        &handle,
        "first_hour closed",
        Duration::from_secs(120),
        |v| v.id == deployed.id && closed(v, Window::FirstHour),
    )
    .await;
    let (query_id, text) = statement_in_view(&setup.pg, "new_feature_total");
    assert!(!query_id.is_empty(), "the statement ran");
    let first_hour = window_of(&view, Window::FirstHour);
    assert_eq!(first_hour.verdict, Verdict::Regression, "{view:#?}");
    let finding = first_hour
        .regressions
        .iter()
        .find(|f| f.signal == Signal::NewStatement)
        .unwrap_or_else(|| panic!("the new statement is flagged: {view:#?}"));
    assert!(finding.was_confirmed(), "{finding:#?}");
    assert_eq!(finding.subject, format!("query {query_id}"));
    assert_eq!(finding.evidence["query"].as_str(), Some(text.as_str()));
    assert!(finding.message.contains(&text), "{}", finding.message);
    let share = finding.evidence["share_of_statement_time"]
        .as_f64()
        .unwrap_or(0.0);
    let per_second = finding.evidence["db_ms_per_second"].as_f64().unwrap_or(0.0);
    assert!(share >= 0.05 && per_second >= 10.0, "{finding:#?}");
    let (_, status) = common::get_as(
        &format!("http://{}/status", handle.local_addr),
        "application/json",
    )
    .await;
    assert!(
        status.contains("new_statement") && status.contains(&text),
        "{status}"
    );
    setup.stop(handle).await;
}

/// Every sample holds the statements that ran in its own interval, however irregular the
/// passes. Here every other pass waits 0.6 s on its version query before reading the
/// statistics, so the next pass reads them about 0.4 s later; the server-wide reading (shared
/// by the databases of a server within an interval) must not be handed to the same database
/// twice, which made the second of those intervals look as if no statement had run and the
/// next one hold two intervals' worth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn irregular_passes_never_make_an_interval_look_empty_of_statements() {
    let setup = Setup::with_statements(Version::V370, 40);
    setup.edit_config(
        "user = \"deploywatch\"\n",
        "user = \"deploywatch\"\nversion_query = \"SELECT value FROM database_metadata, \
         pg_sleep(CASE WHEN floor(extract(epoch FROM clock_timestamp()))::bigint % 2 = 0 THEN 0.6 ELSE 0 END) \
         WHERE key = 'version'\"\n",
    );
    setup.workload().await;
    let handle = setup.start_after_baseline(2).await;
    // The workload runs its hot query 40 times a second, each call its own transaction; a
    // sample with traffic has at least a few commits. Wait for ten of them, however slowly a
    // loaded machine gets there.
    let store = setup.store();
    let samples = wait_until("ten samples with traffic", Duration::from_secs(120), || {
        let samples = store.samples("cognit", 0.0, f64::MAX).expect("samples");
        let busy = samples
            .iter()
            .filter(|s| s.database.is_some_and(|d| d.xact_commit >= 5.0))
            .count();
        async move { (busy >= 10).then_some(samples) }
    })
    .await;
    let busy: Vec<_> = samples
        .iter()
        .filter(|s| s.database.is_some_and(|d| d.xact_commit >= 5.0))
        .collect();
    let empty: Vec<(f64, f64)> = busy
        .iter()
        .filter(|s| s.statements.as_ref().is_some_and(|m| m.is_empty()))
        .map(|s| (s.at, s.database.map_or(0.0, |d| d.xact_commit)))
        .collect();
    assert!(
        empty.is_empty(),
        "samples with commits but no statement: {empty:?} of {}",
        busy.len()
    );
    setup.stop(handle).await;
}

/// A sample is stamped when its counters were read, not when its pass began. Every pass here
/// waits 1.5 s on its version query before it reads the statistics; calls made after a
/// deployment announced during that wait belong to the deployment's windows, never to its
/// baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_an_announcement_are_never_in_the_baseline_of_a_slow_pass() {
    const MARKER: &str = "ran_after_the_announcement";
    let setup = Setup::with_statements(Version::V370, 40);
    setup.edit_config(
        "user = \"deploywatch\"\n",
        "user = \"deploywatch\"\nversion_query = \"SELECT value FROM database_metadata, pg_sleep(1.5) WHERE key = 'version'\"\n",
    );
    let pg = &setup.pg;
    let statement = format!("SELECT 1 AS {MARKER}");
    // Known to pg_stat_statements from the start, so that every later call is in a sample.
    pg.psql("cognit", &statement).expect("statement");
    let handle = setup.start_after_baseline(2).await;
    wait_until(
        "a pass waiting on its version query",
        Duration::from_secs(30),
        || {
            let waiting = pg
                .psql(
                    "cognit",
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch' \
                     AND state = 'active' AND query LIKE '%pg_sleep(1.5)%'",
                )
                .is_ok_and(|n| n.trim() == "1");
            async move { waiting.then_some(()) }
        },
    )
    .await;
    let deployed = announced(&handle, "3.7.1").await;
    pg.psql("cognit", &format!("{statement}; {statement}; {statement}"))
        .expect("statement");
    let (query_id, _) = statement_in_view(pg, MARKER);
    assert!(!query_id.is_empty(), "the statement ran");
    wait_samples(&handle, 2).await;
    let samples = setup
        .store()
        .samples("cognit", 0.0, f64::MAX)
        .expect("samples");
    let calls = |s: &deploywatch::analysis::sample::Sample| {
        s.statements
            .as_ref()
            .and_then(|m| m.get(&query_id))
            .map_or(0.0, |d| d.calls)
    };
    let before: f64 = samples
        .iter()
        .filter(|s| s.at < deployed.at)
        .map(calls)
        .sum();
    let after: f64 = samples
        .iter()
        .filter(|s| s.at >= deployed.at)
        .map(calls)
        .sum();
    assert_eq!(
        (before, after),
        (0.0, 3.0),
        "calls in samples stamped before / after the deployment at {}",
        deployed.at
    );
    setup.stop(handle).await;
}

/// A cheap statement the release brings (a lookup at a sliver of the database's time, touching
/// no table so that no other signal moves) is followed but not a regression: the windows pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cheap_statement_after_the_deployment_lets_the_windows_pass() {
    const CHEAP: &str = "SELECT current_setting('TimeZone') AS new_feature_zone";
    let (setup, handle, deployed) = new_statement_deployed(15, CHEAP, "new_feature_zone").await;
    let view = deployment_where(&handle, "first_day closed", Duration::from_secs(60), |v| {
        v.id == deployed.id && closed(v, Window::FirstDay)
    })
    .await;
    let calls: f64 = setup
        .pg
        .psql(
            "cognit",
            "SELECT sum(calls) FROM pg_stat_statements WHERE query LIKE '%new_feature_zone%'",
        )
        .expect("calls")
        .trim()
        .parse()
        .unwrap_or(0.0);
    assert!(
        calls >= 100.0,
        "the statement ran throughout: {calls} calls"
    );
    for window in [Window::FirstHour, Window::FirstDay] {
        assert_eq!(verdict(&view, window), Some(Verdict::Pass), "{view:#?}");
    }
    assert!(
        view.windows
            .iter()
            .flat_map(|w| &w.regressions)
            .all(|f| f.signal != Signal::NewStatement),
        "{view:#?}"
    );
    setup.stop(handle).await;
}

/// One pass reads every index's and every table's scan counters from one reading of the
/// statistics: a table's `idx_scan` is the sum over its indexes (on every version), so
/// under an application scanning the whole time the sum the pass reads for the table is exactly
/// the sum of the index counts it read. Read in two statements, the application's statistics
/// flushed in between made them disagree (which a dropped index turned into a false "reset").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_reads_index_and_table_counters_from_one_reading() {
    use deploywatch::postgres::sampler::{self, StatementsSupport};

    let pg = cluster();
    pg.create_database("app").expect("database");
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v int); \
         CREATE INDEX t_v ON t (v); \
         INSERT INTO t SELECT i, i % 97 FROM generate_series(1, 5000) i; \
         ANALYZE t",
    )
    .expect("schema");
    let version = pg.server_version_num().expect("version");
    let cancel = CancellationToken::new();
    let mut loaders = Vec::new();
    for client in 0..3 {
        let (app, connection) =
            tokio_postgres::connect(&pg.connection_string("app"), tokio_postgres::NoTls)
                .await
                .expect("application session");
        tokio::spawn(connection);
        let cancel = cancel.clone();
        loaders.push(tokio::spawn(async move {
            let (by_id, by_v) = (
                app.prepare("SELECT v FROM t WHERE id = $1").await?,
                app.prepare("SELECT count(*) FROM t WHERE v = $1").await?,
            );
            let mut i = client;
            while !cancel.is_cancelled() {
                i += 1;
                app.query(&by_id, &[&(i % 5000 + 1)]).await?;
                app.query(&by_v, &[&(i % 97)]).await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        }));
    }
    let pool = monitor_pool("one-reading", &pg, "app");
    let none = StatementsSupport::Unavailable(String::new());
    let mut table_scans_seen = 0.0;
    for pass in 0..400 {
        let raw = sampler::read(&pool, &none, pass as f64)
            .await
            .expect("read");
        let table = raw.tables.get("public.t").expect("the table is listed");
        let indexes: Vec<_> = raw
            .indexes
            .iter()
            .filter(|(_, index)| index.table == "public.t")
            .collect();
        assert_eq!(indexes.len(), 2, "both indexes are listed: {indexes:?}");
        let sum: f64 = indexes.iter().map(|(_, index)| index.scans).sum();
        assert_eq!(
            table.idx_scan, sum,
            "pass {pass} on {version}: the table's idx_scan is the sum of the index counts read with it"
        );
        table_scans_seen = table.idx_scan;
    }
    cancel.cancel();
    for loader in loaders {
        loader.await.expect("loader").expect("application queries");
    }
    assert!(
        table_scans_seen > 0.0,
        "the application's scans reached the statistics"
    );
    pool.close();
}

//! `deploywatch demo` end to end on a very short clock: every story step shows up in /status,
//! and the throwaway cluster is gone afterwards.

mod common;

use std::time::Duration;

use tokio::io::AsyncReadExt;

/// `deploywatch demo` on a 3-second clock, listening on `port`, its stdout and stderr captured.
fn spawn_demo(port: u16, extra: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .args([
            "demo",
            "--step",
            "3s",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tells_the_whole_story_and_leaves_nothing_behind() {
    let port = common::free_port();
    let mut child = spawn_demo(port, &["--exit-after-story"]);
    let url = format!("http://127.0.0.1:{port}/status");

    // What /status showed over the story.
    let mut saw_deployment = false;
    let mut saw_first_hour_pass = false;
    let mut saw_integrity_failure = false;
    let mut saw_repair = false;
    let mut saw_regression = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo did not finish in time"
        );
        if let Some(json) = common::get_json(&url).await {
            let target = &json["targets"][0];
            let deployment = &target["deployment"];
            saw_deployment |=
                deployment["to_version"] == "3.7.0" && deployment["from_version"] == "3.6.0";
            if let Some(windows) = deployment["windows"].as_array() {
                saw_first_hour_pass |= windows
                    .iter()
                    .any(|w| w["window"] == "first_hour" && w["verdict"] == "pass");
                saw_regression |= windows.iter().any(|w| {
                    w["regressions"].as_array().is_some_and(|r| {
                        r.iter().any(|f| {
                            (f["signal"] == "query_latency" || f["signal"] == "seq_scans")
                                && f["evidence"].as_object().is_some_and(|e| e.len() >= 3)
                        })
                    })
                });
            }
            if let Some(checks) = target["checks"].as_array() {
                saw_integrity_failure |= checks.iter().any(|c| {
                    c["name"] == "orphaned_payments" && c["status"] == "fail" && c["value"] == 5.0
                });
                saw_repair |= saw_integrity_failure
                    && checks
                        .iter()
                        .any(|c| c["name"] == "orphaned_payments" && c["status"] == "pass");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut stdout = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout).await;
    }
    let stderr = common::stderr_of(&mut child).await;
    assert!(status.success(), "{stdout}\n{stderr}");
    // The story reads on its own: the daemon logs to the file the demo names, not the terminal.
    assert!(
        stderr.trim().is_empty(),
        "nothing but the story on the terminal:\n{stderr}"
    );
    let log_path = stdout
        .lines()
        .find_map(|l| l.split("the daemon's log goes to ").nth(1))
        .and_then(|rest| rest.split(" (").next())
        .map(std::path::PathBuf::from)
        .expect("the demo names its log file");
    let log = std::fs::read_to_string(&log_path).expect("the log file is there");
    let _ = std::fs::remove_file(&log_path);
    assert!(
        stdout.contains(&format!("the daemon's log stays in {}", log_path.display())),
        "{stdout}"
    );
    assert!(log.contains("deployment detected"), "{log}");
    // DROP INDEX is told as what it is, not as a statistics reset.
    assert!(
        log.lines()
            .any(|l| l.contains("indexes or tables were dropped")
                && l.contains("index public.idx_submissions_participant")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("statistics were reset") && l.contains("pg_stat_user_tables")),
        "{log}"
    );
    // Every regression the story promises is told when it is flagged, or said not to have been.
    for signal in ["query_latency", "seq_scans"] {
        assert!(
            stdout.contains(&format!(": REGRESSION first_day {signal}: "))
                || stdout.contains(&format!("REGRESSION first_hour {signal}: "))
                || stdout.contains(&format!("({signal} was not flagged within")),
            "{signal} told\n{stdout}"
        );
    }
    // The story ends by itself: no invitation to a daemon about to stop.
    assert!(!stdout.contains("Try: curl"), "{stdout}");
    assert!(stdout.contains("then the demo ends"), "{stdout}");
    assert!(
        saw_deployment,
        "deployment 3.6.0 -> 3.7.0 in /status\n{stdout}"
    );
    assert!(saw_first_hour_pass, "first_hour pass in /status\n{stdout}");
    assert!(
        saw_integrity_failure,
        "orphaned_payments failing with 5 in /status\n{stdout}"
    );
    assert!(
        saw_repair,
        "orphaned_payments passing again after the repair\n{stdout}"
    );
    assert!(
        saw_regression,
        "a regression with evidence in /status\n{stdout}"
    );
    for step in [
        "[1/5]",
        "[2/5]",
        "[3/5]",
        "[4/5]",
        "[5/5]",
        "REGRESSION",
        "The story is over",
    ] {
        assert!(stdout.contains(step), "{step} announced\n{stdout}");
    }
    let directory = stdout
        .lines()
        .find_map(|l| l.split("cluster directory ").nth(1))
        .map(|rest| rest.trim_end_matches(')').to_string())
        .expect("the demo names its cluster directory");
    assert!(
        !std::path::Path::new(&directory).exists(),
        "{directory} is removed"
    );
}

/// Ctrl-C while the demo is still setting up (loading the fixture) stops it cleanly: the
/// cluster directory is removed all the same, and so on SIGTERM once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_demo_leaves_nothing_behind() {
    use tokio::io::AsyncBufReadExt;
    for (signal, wait_for) in [
        ("-INT", "PostgreSQL on"),
        ("-TERM", "deploywatch is watching"),
    ] {
        let mut child = spawn_demo(common::free_port(), &[]);
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut directory = None;
        let mut seen = String::new();
        let reached = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push_str(&line);
                seen.push('\n');
                if let Some(rest) = line.split("cluster directory ").nth(1) {
                    directory = Some(rest.trim_end_matches(')').to_string());
                }
                if line.contains(wait_for) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(reached, Ok(true), "{wait_for:?} never printed:\n{seen}");
        let directory = directory.expect("the demo names its cluster directory");
        assert!(std::path::Path::new(&directory).exists());
        let pid = child.id().expect("pid").to_string();
        std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .expect("the demo stops")
            .expect("wait");
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
        }
        assert!(status.success(), "{signal}: {status:?}\n{seen}");
        assert!(
            !std::path::Path::new(&directory).exists(),
            "{signal}: {directory} is removed\n{seen}"
        );
    }
}

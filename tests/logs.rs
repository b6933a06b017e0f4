//! Logs an operator can keep: a check that keeps failing and a version query that keeps failing
//! are each logged once when they start, not on every run; sampling failures are counted in a
//! metric; JSON lines carry one `target` key (the logging module) and the database as
//! `db_target`.

mod common;

use std::time::Duration;

use common::{cluster, target_toml, wait_for_metrics, ConfigDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_keeps_failing_is_logged_once_not_on_every_run() {
    let pg = cluster();
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"always_fails\"\ncategory = \"integrity\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 0\"\n\n[[check]]\nname = \"always_errors\"\ncategory = \"health\"\nseverity = \"warning\"\nsql = \"SELECT * FROM no_such_table\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[checks]\ninterval_override = \"1s\"\n\n[deployments]\nsample_interval = \"1s\"\nversion_query = \"SELECT value FROM no_such_metadata\"\n\n{}",
            target_toml("db", &pg, "postgres")
        ),
    );
    let port = common::free_port();
    let mut child = common::spawn_daemon_with(&dir, port, &["--log-format", "json"]);
    // Wait until both checks ran at least six times and sampling failed at least three times.
    wait_for_metrics(
        &format!("http://127.0.0.1:{port}"),
        "six runs and three sampling failures",
        Duration::from_secs(60),
        |scrape| {
            let runs = |check: &str| {
                scrape
                    .metric("deploywatch_check_runs_total")
                    .label("check", check)
                    .value_opt()
                    .unwrap_or(0.0)
            };
            let sampling = scrape
                .metric("deploywatch_sampling_errors_total")
                .label("step", "version")
                .value_opt()
                .unwrap_or(0.0);
            (runs("always_fails") >= 6.0 && runs("always_errors") >= 6.0 && sampling >= 3.0)
                .then_some(())
        },
    )
    .await;
    let status = common::terminate(&mut child, Duration::from_secs(30)).await;
    assert!(status.success());
    let stderr = common::stderr_of(&mut child).await;
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!lines.is_empty(), "{stderr}");
    let count = |check: &str| {
        lines
            .iter()
            .filter(|l| l["check"] == check && l["level"] == "WARN")
            .count()
    };
    assert_eq!(count("always_fails"), 1, "{stderr}");
    assert_eq!(count("always_errors"), 1, "{stderr}");
    // Warnings that are not about a check (the version query that cannot work): each once.
    let mut others = std::collections::BTreeMap::new();
    for line in lines
        .iter()
        .filter(|l| l["level"] == "WARN" && l["check"].is_null())
    {
        *others
            .entry(line["message"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    assert!(
        others.keys().any(|m| m.contains("version")),
        "the failing version query is warned about: {stderr}"
    );
    assert!(others.values().all(|n| *n == 1), "{others:?}");
    // One `target` key per line: the database is `db_target`.
    for line in stderr.lines().filter(|l| l.starts_with('{')) {
        assert!(line.matches("\"target\":").count() <= 1, "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["check"] == "always_fails" && l["db_target"] == "db"),
        "{stderr}"
    );
}

/// A target removed by a reload is forgotten: added back later, its first failure is logged
/// again as a first observation, and a fleet whose discovered databases come and go does not
/// keep the log state of every database it ever saw.
#[test]
fn a_removed_target_is_forgotten_by_the_log_state() {
    use deploywatch::watch::state::State;
    use deploywatch::watch::transitions::Transition;

    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        &common::pack("p", &[("c", "sql = \"SELECT 1\"\nexpect = \"== 0\"")]),
    );
    let target = |name: &str| {
        format!("[[targets]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = 1\ndbname = \"d\"\nuser = \"u\"\n")
    };
    dir.write(
        "deploywatch.toml",
        &format!("{}{}", target("a"), target("b")),
    );
    let both = dir.load();
    dir.write("deploywatch.toml", &target("a"));
    let only_a = dir.load();

    let state = State::new();
    let now = std::time::Instant::now();
    // A failure of check `c` of `target` as the log state sees it.
    let fails = |target: &str| state.transitions.observe(target, "c", "fail", now);
    state.apply_config(&both, 0.0);
    assert_eq!(fails("a"), Transition::First);
    assert_eq!(fails("b"), Transition::First);
    state.apply_config(&only_a, 1.0);
    state.apply_config(&both, 2.0);
    assert_eq!(fails("a"), Transition::Same);
    assert_eq!(fails("b"), Transition::First);
}

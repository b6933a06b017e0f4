//! The operations package against the real programs: promtool checks and unit-tests the rules,
//! every dashboard and rule expression parses and uses metrics the daemon really exports, and an
//! integrity failure travels daemon → Prometheus → Alertmanager → webhook and resolves.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cognit_cluster, repo, target_toml, wait_for_answer, wait_until, ConfigDir, Version};

fn tool(names: &[&str]) -> PathBuf {
    for name in names {
        if let Ok(output) = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
        {
            let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
            if output.status.success() && !path.is_empty() {
                return PathBuf::from(path);
            }
        }
    }
    panic!(
        "{} not found: install it with `apt-get install -y prometheus prometheus-alertmanager`",
        names.join(" or ")
    );
}

fn run(command: &mut Command) -> String {
    let output = command.output().expect("run tool");
    let text = common::output_text(&output);
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let promtool = tool(&["promtool"]);
    let dir = repo().join("deploy/prometheus");
    let checked = run(Command::new(&promtool).current_dir(&dir).args([
        "check",
        "rules",
        "deploywatch-rules.yml",
    ]));
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(Command::new(&promtool).current_dir(&dir).args([
        "test",
        "rules",
        "deploywatch-rules.test.yml",
    ]));
    assert!(tested.contains("SUCCESS"), "{tested}");
    // The Prometheus Operator resource carries exactly these rules.
    let operator: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/kubernetes/prometheusrule.yaml"))
            .expect("PrometheusRule"),
    )
    .expect("yaml");
    let plain: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.join("deploywatch-rules.yml")).expect("rules"),
    )
    .expect("yaml");
    assert_eq!(
        operator["spec"], plain,
        "run deploy/kubernetes/sync_prometheusrule.py"
    );
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(dir.join("deploywatch-rules.yml")).expect("rules");
    let tests = std::fs::read_to_string(dir.join("deploywatch-rules.test.yml")).expect("tests");
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool test"
        );
    }
}

/// Every `expr` of the dashboard (variables substituted) and of the rules file.
fn expressions() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/deploywatch.json"))
            .expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let mut found = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                found.push(expr.to_string());
            }
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            found.push(expr.to_string());
        }
    }
    assert!(found.len() >= 15, "the dashboard has its panels");
    // The structure Grafana's importer needs.
    assert_eq!(dashboard["uid"], "deploywatch");
    assert!(
        dashboard["title"].is_string() && dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 30
    );
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, vec!["datasource", "target"]);
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel ids are unique"
        );
        assert!(panel["type"].is_string() && panel["title"].is_string());
        for key in ["x", "y", "w", "h"] {
            assert!(
                panel["gridPos"][key].is_u64(),
                "gridPos.{key} of {}",
                panel["title"]
            );
        }
        for target in panel["targets"].as_array().expect("targets") {
            assert!(target["refId"].is_string());
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "every query uses the datasource variable"
            );
            assert!(
                target["expr"].as_str().unwrap_or("").contains("$target"),
                "every query filters by target"
            );
        }
    }
    found
        .into_iter()
        .map(|e| e.replace("$target", ".*"))
        .collect()
}

/// Metric names in PromQL text (string literals, such as label values, are skipped).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut unquoted = String::new();
    let mut in_string = false;
    for c in expr.chars() {
        if c == '"' {
            in_string = !in_string;
            unquoted.push(' ');
        } else if !in_string {
            unquoted.push(c);
        }
    }
    let bytes: Vec<char> = unquoted.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphabetic() || bytes[i] == '_' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':')
            {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            if word.starts_with("deploywatch_") || word.starts_with("deploywatch:") {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rule_queries_parse_and_use_metrics_the_daemon_exports() {
    let promtool = tool(&["promtool"]);
    // 1. Each dashboard expression parses: promtool checks them as recording rules.
    let dashboard_exprs = expressions();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(e).expect("json")
        ));
    }
    std::fs::write(scratch.path().join("dashboard.yml"), rules).expect("write");
    run(Command::new(&promtool).current_dir(scratch.path()).args([
        "check",
        "rules",
        "dashboard.yml",
    ]));

    // 2. Every metric they use exists in a real scrape (or is a recording rule of ours).
    let rules_text =
        std::fs::read_to_string(repo().join("deploy/prometheus/deploywatch-rules.yml"))
            .expect("rules");
    let recorded: BTreeSet<String> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(str::to_string)
        .collect();
    let mut used = BTreeSet::new();
    for e in &dashboard_exprs {
        used.extend(metric_names(e));
    }
    for line in rules_text
        .lines()
        .filter(|l| !l.trim_start().starts_with("- record:"))
    {
        used.extend(metric_names(line));
    }

    assert!(used.len() >= 15, "metric names found: {used:?}");
    let mut pg = cognit_cluster(Version::V370);
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.add_shipped_pack("postgres.toml");
    dir.write("checks/broken.toml", "[pack]\nname = \"broken\"\n\n[[check]]\nname = \"broken\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT nope\"\n");
    dir.write("token", "t0ken");
    let handle = start_on_cognit(
        &dir,
        &pg,
        "[server]\napi_token_file = \"token\"\n\n[checks]\ninterval_override = \"1s\"\n\n[deployments]\nsample_interval = \"1s\"\nfirst_hour = \"2s\"\nfirst_day = \"4s\"\nfirst_week = \"6s\"\n\n",
    )
    .await;
    let metrics = format!("{}/metrics", common::base(&handle));
    // A deployment, so the deployment families exist: the rollback comes once the daemon has
    // read the version it rolls back from (its first sample may come up to an interval late).
    wait_for_answer(
        &metrics,
        "the version before the rollback read",
        Duration::from_secs(30),
        |_, body| {
            body.lines()
                .any(|l| l.starts_with("deploywatch_schema_version_info{") && l.contains("3.7.0"))
                .then_some(())
        },
    )
    .await;
    pg.psql_file("cognit", &common::fixture("rollback_to_3.6.0.sql"))
        .expect("rollback");
    let body = wait_for_answer(
        &metrics,
        "every family exported",
        Duration::from_secs(60),
        |_, body| {
            let ready = [
                "deploywatch_window_verdict",
                "deploywatch_pg_connections",
                "deploywatch_check_errors_total",
                "deploywatch_schema_version_info",
            ]
            .iter()
            .all(|name| body.contains(&format!("\n{name}{{")));
            ready.then(|| body.to_string())
        },
    )
    .await;
    let exported: BTreeSet<String> = common::parse_metrics(&body).names();
    for name in &used {
        assert!(
            exported.contains(name) || recorded.contains(name),
            "{name} is used by the dashboard or the rules but the daemon does not export it"
        );
    }
    handle.shutdown().await.expect("shutdown");
    pg.stop().expect("stop");
}

/// The daemon in this process on `dir`, whose main file is `settings` and the target `cognit`
/// (database cognit of `pg`).
async fn start_on_cognit(
    dir: &ConfigDir,
    pg: &deploywatch_testkit::pgcluster::PgCluster,
    settings: &str,
) -> deploywatch::daemon::DaemonHandle {
    dir.write(
        "deploywatch.toml",
        &format!("{settings}{}", target_toml("cognit", pg, "cognit")),
    );
    common::start(dir).await
}

/// A webhook receiver that keeps every body it is sent.
async fn webhook() -> (u16, Arc<Mutex<Vec<String>>>) {
    use http_body_util::BodyExt;
    let received = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let bytes = request
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            store
                                .lock()
                                .expect("lock")
                                .push(String::from_utf8_lossy(&bytes).into_owned());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, received)
}

fn alert_in(bodies: &[String], status: &str) -> Option<serde_json::Value> {
    bodies
        .iter()
        .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .find_map(|payload| {
            payload["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["status"] == status
                        && a["labels"]["alertname"] == "DeploywatchIntegrityCheckFailing"
                        && a["labels"]["check"] == "orphaned_payments"
                })
                .cloned()
        })
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integrity_failure_pages_through_prometheus_and_alertmanager_and_resolves() {
    let prometheus = tool(&["prometheus"]);
    let alertmanager = tool(&["prometheus-alertmanager", "alertmanager"]);
    let pg = cognit_cluster(Version::V370);

    // The daemon.
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    let handle = start_on_cognit(
        &dir,
        &pg,
        "[checks]\ninterval_override = \"1s\"\n\n[deployments]\nenabled = false\n\n",
    )
    .await;

    // The webhook, Alertmanager and Prometheus, all on loopback.
    let (hook_port, received) = webhook().await;
    let work = tempfile::tempdir().expect("tempdir");
    // `--FLAG=PATH` of `file` in the work directory.
    let in_work = |flag: &str, file: &str| format!("--{flag}={}", work.path().join(file).display());
    let am_port = common::free_port();
    write(
        &work.path().join("alertmanager.yml"),
        &format!(
            "route:\n  receiver: hook\n  group_by: [alertname, target, check]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    webhook_configs:\n      - url: http://127.0.0.1:{hook_port}/\n        send_resolved: true\n"
        ),
    );
    let mut am = tokio::process::Command::new(&alertmanager)
        .arg(in_work("config.file", "alertmanager.yml"))
        .arg(in_work("storage.path", "am-data"))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start alertmanager");
    // The shipped rules with short `for:` durations.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/deploywatch-rules.yml"))
        .expect("rules")
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                "        for: 2s".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    write(&work.path().join("rules.yml"), &rules);
    let prom_port = common::free_port();
    write(
        &work.path().join("prometheus.yml"),
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [rules.yml]\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\nscrape_configs:\n  - job_name: deploywatch\n    static_configs:\n      - targets: ['{}']\n",
            handle.local_addr
        ),
    );
    let mut prom = tokio::process::Command::new(&prometheus)
        .current_dir(work.path())
        .arg(in_work("config.file", "prometheus.yml"))
        .arg(in_work("storage.tsdb.path", "prom-data"))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus");

    // Prometheus scrapes the daemon.
    wait_for_answer(
        &format!("http://127.0.0.1:{prom_port}/api/v1/query?query=deploywatch_up"),
        "prometheus scrapes deploywatch",
        Duration::from_secs(60),
        |code, body| {
            ((200..300).contains(&code) && body.contains("\"target\":\"cognit\"")).then_some(())
        },
    )
    .await;

    common::corrupt(&pg, "cognit", "orphaned_payments");
    let fired = {
        let received = received.clone();
        wait_until(
            "the integrity alert reaches the webhook",
            Duration::from_secs(90),
            || {
                let bodies = received.lock().expect("lock").clone();
                async move { alert_in(&bodies, "firing") }
            },
        )
        .await
    };
    assert_eq!(fired["labels"]["target"], "cognit");
    assert_eq!(fired["labels"]["severity"], "critical");
    assert_eq!(fired["labels"]["page"], "true");
    assert_eq!(
        fired["annotations"]["description"],
        "orphaned_payments on cognit counts 5 violating rows (expected 0)."
    );

    common::repair(&pg, "cognit", "orphaned_payments");
    let resolved = {
        let received = received.clone();
        wait_until("the alert resolves", Duration::from_secs(90), || {
            let bodies = received.lock().expect("lock").clone();
            async move { alert_in(&bodies, "resolved") }
        })
        .await
    };
    assert_eq!(resolved["labels"]["check"], "orphaned_payments");

    let _ = prom.kill().await;
    let _ = am.kill().await;
    handle.shutdown().await.expect("shutdown");
}

#[test]
fn the_systemd_unit_verifies() {
    let analyze = tool(&["systemd-analyze"]);
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/deploywatch.service"))
        .expect("unit")
        .replace(
            "/usr/local/bin/deploywatch",
            env!("CARGO_BIN_EXE_deploywatch"),
        );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("deploywatch.service");
    std::fs::write(&path, unit).expect("write");
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = common::output_text(&output);
    assert!(
        output.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

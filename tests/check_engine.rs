//! The check engine against a real PostgreSQL: the checklist pack on the cognit fixture at
//! 3.6.0 and 3.7.0, each corruption script, checks that break in every way, and
//! `deploywatch check` as a deployment gate.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{cluster, cognit_db, target_toml, ConfigDir, Version};
use deploywatch::checks::outcome::{ErrorKind, Observation, Status};
use deploywatch::commands;
use deploywatch::commands::cli::OutputFormat;
use deploywatch::config::Config;
use deploywatch::watch::scheduler::{self, Pools};
use deploywatch::watch::state::{CheckState, State};
use deploywatch_testkit::pgcluster::PgCluster;

/// Config with the shipped packs for one database.
/// `check` (of `only` or every check) on [`shipped_config`]: its exit code and output.
async fn check_shipped(
    cluster: &PgCluster,
    db: &str,
    only: Option<&str>,
    format: OutputFormat,
) -> (u8, String) {
    commands::check(shipped_config(cluster, db).load(), None, only, format).await
}

fn shipped_config(cluster: &PgCluster, db: &str) -> ConfigDir {
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.add_shipped_pack("postgres.toml");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[checks]\nfiles = [\"checks/*.toml\"]\n\n{}",
            target_toml("cognit", cluster, db)
        ),
    );
    dir
}

async fn run_all(config: &Config) -> BTreeMap<String, CheckState> {
    let state = Arc::new(State::new());
    state.apply_config(config, 0.0);
    let pools = Pools::for_config(&Pools::default(), config);
    scheduler::run_once(config, &pools, &state).await;
    pools.close_all();
    let snapshot = state.snapshot();
    snapshot
        .targets
        .into_values()
        .next()
        .map(|t| t.checks)
        .unwrap_or_default()
}

fn status_of(checks: &BTreeMap<String, CheckState>, name: &str) -> Status {
    checks
        .get(name)
        .unwrap_or_else(|| panic!("no check {name}"))
        .status
}

fn number_of(checks: &BTreeMap<String, CheckState>, name: &str) -> f64 {
    checks
        .get(name)
        .and_then(|c| c.outcome.as_ref())
        .and_then(|o| o.observation.as_ref())
        .and_then(Observation::as_number)
        .unwrap_or_else(|| panic!("check {name} has no numeric value: {:?}", checks.get(name)))
}

fn describe(checks: &BTreeMap<String, CheckState>) -> String {
    checks
        .iter()
        .map(|(n, c)| format!("{n}: {:?} {:?}", c.status, c.outcome))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_360_the_health_checks_fail_for_the_right_reasons() {
    let pg = common::cognit_cluster(Version::V360);
    let checks = run_all(&shipped_config(&pg, "cognit").load()).await;
    let all = describe(&checks);
    for failing in [
        "schema_version",
        "image_id_type_consistency",
        "image_id_varchar_200",
        "score_check_constraints",
        "partial_indexes",
    ] {
        assert_eq!(
            status_of(&checks, failing),
            Status::Fail,
            "{failing}\n{all}"
        );
    }
    let version = checks["schema_version"]
        .outcome
        .as_ref()
        .and_then(|o| o.detail.clone())
        .unwrap_or_default();
    assert!(
        version.contains("\"3.6.0\"") && version.contains("\"3.7.0\""),
        "{version}"
    );
    assert_eq!(number_of(&checks, "image_id_type_consistency"), 2.0);
    for check in common::INTEGRITY_CHECKS {
        assert_eq!(status_of(&checks, check), Status::Pass, "{check}\n{all}");
        assert_eq!(number_of(&checks, check), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_migration_every_check_passes() {
    let pg = common::cognit_cluster(Version::V370);
    let checks = run_all(&shipped_config(&pg, "cognit").load()).await;
    let all = describe(&checks);
    assert!(checks.len() >= 25, "{all}");
    for (name, check) in &checks {
        assert_eq!(check.status, Status::Pass, "{name} should pass\n{all}");
    }
    assert!(number_of(&checks, "score_check_constraints") >= 4.0);
    assert!(number_of(&checks, "partial_indexes") >= 9.0);
    match checks["partial_index_usage"]
        .outcome
        .as_ref()
        .and_then(|o| o.observation.clone())
    {
        Some(Observation::Rows(series)) => {
            let indexes: std::collections::BTreeSet<_> = series
                .iter()
                .filter_map(|s| {
                    s.labels
                        .iter()
                        .find(|(k, _)| k == "indexname")
                        .map(|(_, v)| v.clone())
                })
                .collect();
            assert!(indexes.len() >= 9, "{indexes:?}");
            assert!(indexes
                .iter()
                .all(|i| i.ends_with("_true") || i.ends_with("_paid") || i.ends_with("_pending")));
            let columns: std::collections::BTreeSet<_> =
                series.iter().map(|s| s.column.clone()).collect();
            assert_eq!(
                columns.into_iter().collect::<Vec<_>>(),
                vec!["scans", "size_bytes", "tuples_fetched", "tuples_read"]
            );
        }
        other => panic!("partial_index_usage should be rows, got {other:?}"),
    }
}

/// `(xact_commit, xact_rollback)` of a database, as the statistics views show them.
fn transactions(pg: &PgCluster, db: &str) -> (f64, f64) {
    let text = pg
        .psql(
            db,
            &format!("SELECT xact_commit || ' ' || xact_rollback FROM pg_stat_database WHERE datname = '{db}'"),
        )
        .expect("pg_stat_database");
    let mut numbers = text
        .split_whitespace()
        .map(|n| n.parse::<f64>().expect("number"));
    (
        numbers.next().expect("commits"),
        numbers.next().expect("rollbacks"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitors_reads_never_count_as_the_applications_rollbacks() {
    let pg = common::cognit_cluster(Version::V370);
    let config = shipped_config(&pg, "cognit").load();
    let (commits_before, rollbacks_before) = transactions(&pg, "cognit");
    let mut runs = 0.0;
    for _ in 0..3 {
        let checks = run_all(&config).await;
        for (name, check) in &checks {
            assert_eq!(check.status, Status::Pass, "{name}\n{}", describe(&checks));
        }
        runs += checks.len() as f64;
    }
    // The sessions are closed, so their statistics reach the views soon.
    let (commits, rollbacks) = common::wait_until(
        "the checks' transactions counted",
        std::time::Duration::from_secs(30),
        || {
            let now = transactions(&pg, "cognit");
            async move { (now.0 - commits_before >= runs).then_some(now) }
        },
    )
    .await;
    assert_eq!(
        rollbacks - rollbacks_before,
        0.0,
        "{runs} passing check runs: commits {commits_before} -> {commits}, rollbacks {rollbacks_before} -> {rollbacks}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_corruption_fails_exactly_its_own_integrity_check_with_its_count() {
    let pg = cluster();
    let expected = [
        ("invalid_attention_score", 3.0),
        ("invalid_quality_score", 2.0),
        ("ai_suspected_without_quality_score", 4.0),
        ("orphaned_payments", 5.0),
        ("orphaned_submissions", 6.0),
    ];
    for (script, count) in expected {
        cognit_db(&pg, script, Version::V360);
        common::corrupt(&pg, script, script);
        let checks = run_all(&shipped_config(&pg, script).load()).await;
        for other in common::INTEGRITY_CHECKS {
            if other == script {
                assert_eq!(status_of(&checks, other), Status::Fail, "{script}");
                assert_eq!(number_of(&checks, other), count, "{script}");
                let detail = checks[other]
                    .outcome
                    .as_ref()
                    .and_then(|o| o.detail.clone());
                assert_eq!(detail, Some(format!("observed {count}, expected == 0")));
            } else {
                assert_eq!(
                    status_of(&checks, other),
                    Status::Pass,
                    "{other} after {script}"
                );
            }
        }
        // The migration refuses corrupted data and leaves 3.6.0 in place.
        if script.starts_with("invalid") || script.starts_with("ai_") {
            let result = common::migrate(&pg, script);
            assert!(result.is_err(), "migration should fail on {script}");
            let version = pg
                .psql(
                    script,
                    "SELECT value FROM database_metadata WHERE key = 'version'",
                )
                .expect("version");
            assert_eq!(version.trim(), "3.6.0");
        }
        common::repair(&pg, script, script);
        let checks = run_all(&shipped_config(&pg, script).load()).await;
        assert_eq!(
            status_of(&checks, script),
            Status::Pass,
            "{script} after repair"
        );
    }
}

/// The values deploywatch reports equal what the checklist's own queries return verbatim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_values_equal_the_checklist_queries_run_verbatim() {
    let pg = common::cognit_cluster(Version::V370);
    common::corrupt(&pg, "cognit", "orphaned_payments");
    let checks = run_all(&shipped_config(&pg, "cognit").load()).await;
    let verbatim = |sql: &str| -> f64 {
        pg.psql("cognit", sql)
            .expect("checklist query")
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("numeric result of {sql}"))
    };
    let pairs = [
        ("score_check_constraints", "SELECT COUNT(*) FROM information_schema.check_constraints WHERE constraint_name LIKE '%score%';"),
        ("partial_indexes", "SELECT COUNT(*) FROM pg_indexes WHERE indexdef LIKE '%WHERE%';"),
        ("invalid_attention_score", "SELECT COUNT(*) FROM attention_stats WHERE attention_score < 0 OR attention_score > 1;"),
        ("invalid_quality_score", "SELECT COUNT(*) FROM submissions WHERE quality_score IS NOT NULL AND (quality_score < 0 OR quality_score > 1);"),
        ("ai_suspected_without_quality_score", "SELECT COUNT(*) FROM submissions WHERE ai_suspected = TRUE AND quality_score IS NULL;"),
        ("orphaned_payments", "SELECT COUNT(*) FROM payments p WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = p.participant_id);"),
        ("orphaned_submissions", "SELECT COUNT(*) FROM submissions s WHERE NOT EXISTS (SELECT 1 FROM participants WHERE participant_id = s.participant_id);"),
        ("database_size_bytes", "SELECT pg_database_size(current_database());"),
    ];
    // From PostgreSQL 18 on, information_schema.check_constraints also lists NOT NULL
    // constraints, named <table>_<column>_not_null (attention_stats.attention_score is NOT NULL),
    // which the checklist's query then counts as well; the check counts CHECK constraints only.
    let not_null_named_score = verbatim(
        "SELECT COUNT(*) FROM information_schema.check_constraints c \
         JOIN pg_constraint p ON p.conname = c.constraint_name \
         JOIN pg_namespace n ON n.oid = p.connamespace AND n.nspname = c.constraint_schema \
         WHERE c.constraint_name LIKE '%score%' AND p.contype = 'n';",
    );
    let server_version = pg.server_version_num().expect("server version");
    assert_eq!(
        not_null_named_score,
        if server_version >= 180000 { 1.0 } else { 0.0 },
        "NOT NULL constraints in information_schema.check_constraints on {server_version}"
    );
    for (check, sql) in pairs {
        let like_with_like = if check == "score_check_constraints" {
            verbatim(sql) - not_null_named_score
        } else {
            verbatim(sql)
        };
        assert_eq!(number_of(&checks, check), like_with_like, "{check}");
    }
    assert_eq!(number_of(&checks, "score_check_constraints"), 4.0);
    assert_eq!(number_of(&checks, "orphaned_payments"), 5.0);
    let version = pg
        .psql(
            "cognit",
            "SELECT value FROM database_metadata WHERE key = 'version';",
        )
        .expect("version");
    let reported = checks["schema_version"]
        .outcome
        .as_ref()
        .and_then(|o| o.observation.clone());
    assert_eq!(
        reported,
        Some(Observation::Text(version.trim().to_string()))
    );
}

const BROKEN_PACK: &str = include_str!("fixtures/packs/broken.toml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_checks_report_their_own_error_kind_while_the_others_pass() {
    let pg = common::cognit_cluster(Version::V370);
    let dir = ConfigDir::new();
    dir.write("checks/broken.toml", BROKEN_PACK);
    dir.write("deploywatch.toml", &target_toml("cognit", &pg, "cognit"));
    let checks = run_all(&dir.load()).await;
    let kind = |name: &str| {
        checks[name]
            .outcome
            .as_ref()
            .and_then(|o| o.error.as_ref())
            .map(|e| e.kind)
    };
    assert_eq!(
        status_of(&checks, "good"),
        Status::Pass,
        "{}",
        describe(&checks)
    );
    assert_eq!(kind("syntax_error"), Some(ErrorKind::Sql));
    let syntax = checks["syntax_error"]
        .outcome
        .as_ref()
        .and_then(|o| o.error.clone())
        .expect("error");
    assert_eq!(syntax.sqlstate.as_deref(), Some("42601"));
    assert!(
        syntax.message.contains("syntax error"),
        "{}",
        syntax.message
    );
    assert_eq!(kind("too_slow"), Some(ErrorKind::Timeout));
    assert_eq!(kind("tries_to_write"), Some(ErrorKind::ReadOnly));
    assert_eq!(kind("returns_null"), Some(ErrorKind::NullValue));
    assert_eq!(kind("returns_nothing"), Some(ErrorKind::NoRows));
    assert_eq!(kind("text_for_number"), Some(ErrorKind::NotNumeric));
    assert_eq!(kind("too_many_rows"), Some(ErrorKind::TooManyRows));
    assert_eq!(kind("too_many_series"), Some(ErrorKind::TooManySeries));
    // The write was refused: the data is untouched.
    let count = pg
        .psql("cognit", "SELECT count(*) FROM participants")
        .expect("count");
    assert!(count.trim().parse::<i64>().unwrap_or(0) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_command_gates_a_deployment_with_its_exit_code() {
    let pg = cluster();
    cognit_db(&pg, "before", Version::V360);
    cognit_db(&pg, "after", Version::V370);
    let (code, output) = check_shipped(&pg, "before", None, OutputFormat::Table).await;
    assert_eq!(code, 1, "{output}");
    assert!(
        output
            .lines()
            .any(|l| l.trim_start().starts_with("FAIL") && l.contains("schema_version")),
        "{output}"
    );
    assert!(output.contains("schema version 3.6.0"), "{output}");
    let (code, output) = check_shipped(&pg, "after", None, OutputFormat::Table).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        !output.contains("FAIL") && !output.contains("ERROR"),
        "{output}"
    );
    let (code, output) =
        check_shipped(&pg, "before", Some("orphaned_payments"), OutputFormat::Json).await;
    assert_eq!(code, 0, "{output}");
    let json: serde_json::Value = serde_json::from_str(&output).expect("json");
    assert_eq!(
        json["targets"][0]["checks"].as_array().map(|a| a.len()),
        Some(1)
    );
    assert_eq!(json["targets"][0]["checks"][0]["status"], "pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_exits_2_with_a_clear_message() {
    // A port nothing listens on.
    let port = common::free_port();
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.write(
        "deploywatch.toml",
        &format!("[[targets]]\nname = \"gone\"\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"x\"\nuser = \"deploywatch\"\n"),
    );
    let (code, output) = commands::check(dir.load(), None, None, OutputFormat::Table).await;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("UNREACHABLE"), "{output}");
    assert!(
        output.contains("Connection refused") || output.contains("connection refused"),
        "{output}"
    );
}

/// The binary itself, as a pipeline would call it.
#[test]
fn the_binary_prints_every_checklist_check_as_passing_on_a_migrated_database() {
    let pg = common::cognit_cluster(Version::V370);
    let dir = shipped_config(&pg, "cognit");
    let stdout = common::succeeded(&dir.run(&["check"]));
    for check in [
        "connection",
        "schema_version",
        "image_id_type_consistency",
        "score_check_constraints",
        "partial_indexes",
        "orphaned_submissions",
        "partial_index_usage",
        "long_running_queries",
    ] {
        assert!(
            stdout.contains(&format!("PASS    {check}"))
                || stdout
                    .lines()
                    .any(|l| l.contains("PASS") && l.contains(check)),
            "{check}\n{stdout}"
        );
    }
}

/// A role with only pg_monitor: the privilege report names exactly the checks that read
/// application tables.
#[test]
fn the_privilege_report_names_the_checks_a_pg_monitor_role_cannot_run() {
    let pg = common::cognit_cluster(Version::V370);
    pg.psql(
        "cognit",
        "CREATE ROLE watcher LOGIN; GRANT pg_monitor TO watcher",
    )
    .expect("role");
    let dir = shipped_config(&pg, "cognit");
    let main = std::fs::read_to_string(dir.main())
        .expect("config")
        .replace("user = \"deploywatch\"", "user = \"watcher\"");
    dir.write("deploywatch.toml", &main);
    let stdout = common::exit_stdout(&dir.run(&["check", "--privileges"]), 1);
    assert!(
        stdout.contains("role watcher is a member of pg_monitor"),
        "{stdout}"
    );
    let denied: std::collections::BTreeSet<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("cognit / "))
        .filter_map(|l| l.split(':').next())
        .collect();
    let expected: std::collections::BTreeSet<&str> = [
        "schema_version",
        "invalid_attention_score",
        "invalid_quality_score",
        "ai_suspected_without_quality_score",
        "orphaned_payments",
        "orphaned_submissions",
    ]
    .into_iter()
    .collect();
    assert_eq!(denied, expected, "{stdout}");
    assert!(stdout.contains("permission denied"), "{stdout}");
    // Granting SELECT on the tables the checks read makes every check runnable.
    pg.psql(
        "cognit",
        "GRANT SELECT ON database_metadata, attention_stats, submissions, payments, participants TO watcher",
    )
    .expect("grant");
    let stdout = common::exit_stdout(&dir.run(&["check", "--privileges"]), 0);
    assert!(
        stdout.contains("checks can run with these privileges"),
        "{stdout}"
    );
}

/// `check` on a target with `databases` patterns runs the checks in every matching database,
/// and `--target` with the template's name selects them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_runs_in_every_discovered_database() {
    let pg = cluster();
    cognit_db(&pg, "cognit_before", Version::V360);
    cognit_db(&pg, "cognit_after", Version::V370);
    pg.create_database("unrelated").expect("create database");
    let dir = ConfigDir::new();
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[deployments]\nenabled = false\n\n[[targets]]\nname = \"cognit\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"deploywatch\"\ndatabases = [\"cognit_*\"]\n",
            pg.port()
        ),
    );
    let (code, output) = commands::check(
        dir.load(),
        Some("cognit"),
        Some("schema_version"),
        OutputFormat::Json,
    )
    .await;
    assert_eq!(
        code, 1,
        "the 3.6.0 database fails the version check: {output}"
    );
    let json: serde_json::Value = serde_json::from_str(&output).expect("json");
    let verdicts: BTreeMap<String, String> = json["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or_default().to_string(),
                t["checks"][0]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        BTreeMap::from([
            ("cognit/cognit_after".to_string(), "pass".to_string()),
            ("cognit/cognit_before".to_string(), "fail".to_string()),
        ])
    );
    let (code, output) = commands::check(
        dir.load(),
        Some("cognit/cognit_after"),
        None,
        OutputFormat::Table,
    )
    .await;
    assert_eq!(code, 0, "{output}");
}

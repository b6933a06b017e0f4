//! A malformed configuration names the file and the key, and nothing starts.

mod common;

use common::ConfigDir;
use deploywatch::config::Config;

const TARGET: &str = "[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\ndbname = \"x\"\n";

const GOOD_CHECK: &str = include_str!("fixtures/packs/good.toml");

/// The `shard_peers` of a configuration with two replicas.
const PEERS: &str = "shard_peers = [\"http://a:9788\", \"http://b:9788\"]\n";

/// A configuration directory of the main file `main` and one pack.
fn config_dir(main: &str, pack: &str) -> ConfigDir {
    let dir = ConfigDir::new();
    dir.write("deploywatch.toml", main);
    dir.write("checks/pack.toml", pack);
    dir
}

/// Loads a config made of `main` and one pack, expecting one problem that mentions `file`,
/// `key` and `message`.
fn check(main: &str, pack: &str, file: &str, key: &str, message: &str) {
    let dir = config_dir(main, pack);
    let error = match Config::load(&dir.main()) {
        Ok(_) => panic!("config should be rejected ({message})"),
        Err(error) => error,
    };
    let text = error.to_string();
    let found = error
        .problems()
        .iter()
        .any(|p| p.file.ends_with(file) && p.key.contains(key) && p.message.contains(message));
    assert!(found, "expected {file} / {key} / {message:?} in:\n{text}");
}

#[test]
fn unknown_key_in_the_main_file() {
    check(
        &format!("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 1\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "server",
        "unknown field `listne`",
    );
}

#[test]
fn unknown_key_in_a_target() {
    check(
        &format!("{TARGET}pasword_env = \"X\"\n"),
        GOOD_CHECK,
        "deploywatch.toml",
        "targets[0]",
        "unknown field `pasword_env`",
    );
}

#[test]
fn bad_duration() {
    check(
        &format!("[defaults]\ninterval = \"5 parsecs\"\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "defaults.interval",
        "invalid duration",
    );
}

#[test]
fn bad_duration_in_a_check() {
    let pack = GOOD_CHECK.replace("sql = ", "interval = \"often\"\nsql = ");
    check(
        TARGET,
        &pack,
        "pack.toml",
        "check[0] (one).interval",
        "invalid duration",
    );
}

#[test]
fn check_without_sql() {
    let pack = GOOD_CHECK.replace("sql = \"SELECT 0\"\n", "");
    check(
        TARGET,
        &pack,
        "pack.toml",
        "check[0] (one).sql",
        "sql is required",
    );
}

#[test]
fn duplicate_check_name() {
    let pack = format!("{GOOD_CHECK}\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT 1\"\n");
    check(
        TARGET,
        &pack,
        "pack.toml",
        "check[1] (one).name",
        "duplicate check name",
    );
}

#[test]
fn unparsable_expectation_points_at_the_problem() {
    let pack = GOOD_CHECK.replace("== 0", "=> 0");
    check(
        TARGET,
        &pack,
        "pack.toml",
        "check[0] (one).expect",
        "column 1",
    );
}

#[test]
fn unknown_parameter_in_an_expectation() {
    let pack = GOOD_CHECK.replace("== 0", "== $expected_versoin");
    check(
        TARGET,
        &pack,
        "pack.toml",
        "check[0] (one).expect",
        "expected_versoin",
    );
}

#[test]
fn unknown_key_in_a_check() {
    let pack = GOOD_CHECK.replace("sql = ", "sqll = \"x\"\nsql = ");
    check(TARGET, &pack, "pack.toml", "", "unknown field `sqll`");
}

#[test]
fn unknown_category() {
    let pack = GOOD_CHECK.replace("\"integrity\"", "\"integrty\"");
    check(TARGET, &pack, "pack.toml", "", "unknown variant `integrty`");
}

#[test]
fn new_statement_thresholds_are_validated() {
    check(
        &format!("[deployments]\nnew_statement_min_share = 1.5\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "deployments.new_statement_min_share",
        "must be above 0 and at most 1, found 1.5",
    );
    check(
        &format!("[deployments]\nnew_statement_min_ms_per_second = -1.0\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "deployments.new_statement_min_ms_per_second",
        "must be a positive number",
    );
    check(
        &format!("[deployments]\nnew_statement_min_ms_per_call = 0.0\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "deployments.new_statement_min_ms_per_call",
        "must be a positive number",
    );
}

#[test]
fn no_targets() {
    check(
        "[server]\nlisten = \"127.0.0.1:1\"\n",
        GOOD_CHECK,
        "deploywatch.toml",
        "targets",
        "at least one",
    );
}

#[test]
fn malformed_connection_url_does_not_echo_the_password() {
    let main =
        "[[targets]]\nname = \"db\"\nurl = \"postgres://u:Hunter2Secret@host:notaport/db\"\n";
    check(
        main,
        GOOD_CHECK,
        "deploywatch.toml",
        "targets[0].url",
        "invalid connection string",
    );
    let dir = config_dir(main, GOOD_CHECK);
    let text = Config::load(&dir.main())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(!text.contains("Hunter2Secret"), "{text}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = config_dir(
        &format!("[defaults]\ninterval = \"x\"\ntimeout = \"y\"\n{TARGET}"),
        GOOD_CHECK,
    );
    let error = Config::load(&dir.main()).expect_err("rejected");
    assert!(error.problems().len() >= 2, "{error}");
}

#[test]
fn environment_overrides_a_section_but_leaves_secrets_alone() {
    let dir = config_dir(TARGET, GOOD_CHECK);
    let env = vec![
        (
            "DEPLOYWATCH_SERVER__LISTEN".to_string(),
            "127.0.0.1:9999".to_string(),
        ),
        (
            "DEPLOYWATCH_DEFAULTS__INTERVAL".to_string(),
            "7s".to_string(),
        ),
        (
            "DEPLOYWATCH_COGNIT_PASSWORD".to_string(),
            "not-a-key".to_string(),
        ),
    ];
    let config = Config::load_with_env(&dir.main(), env).expect("loads");
    assert_eq!(config.server.listen.port(), 9999);
    assert_eq!(
        config.targets[0].checks[0].interval,
        std::time::Duration::from_secs(7)
    );
}

#[test]
fn the_shipped_configuration_is_valid() {
    let config =
        Config::load(&common::repo().join("config/deploywatch.toml")).expect("shipped config");
    let names: Vec<_> = config.targets[0]
        .checks
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for expected in [
        "schema_version",
        "orphaned_payments",
        "partial_index_usage",
        "invalid_indexes",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
}

#[test]
fn malformed_database_pattern() {
    check(
        &format!("{TARGET}databases = [\"app_*\", \"[tenant\"]\n"),
        GOOD_CHECK,
        "deploywatch.toml",
        "targets[0].databases[1]",
        "\"[tenant\" is not a valid pattern",
    );
}

#[test]
fn excluded_databases_without_included_ones() {
    check(
        &format!("{TARGET}exclude_databases = [\"*_test\"]\n"),
        GOOD_CHECK,
        "deploywatch.toml",
        "targets[0].exclude_databases",
        "needs databases",
    );
}

#[test]
fn retention_shorter_than_a_baseline_and_its_windows() {
    check(
        &format!("[store]\nretention = \"3d\"\n\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "store.retention",
        "shorter than deployments.baseline_span + deployments.first_week (14days)",
    );
}

#[test]
fn an_unknown_key_does_not_hide_the_other_problems() {
    let dir = ConfigDir::new();
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\nintervall = \"1m\"\ntimeout = \"soon\"\n\n[store]\nretention = \"later\"\n\n{TARGET}passwrd_env = \"X\"\n"
        ),
    );
    dir.write(
        "checks/pack.toml",
        &format!("{GOOD_CHECK}colour = \"red\"\ninterval = \"never\"\n"),
    );
    let error = Config::load(&dir.main()).expect_err("rejected");
    let text = error.to_string();
    for expected in [
        "intervall",
        "soon",
        "later",
        "passwrd_env",
        "colour",
        "never",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
}

#[test]
fn an_invalid_environment_override_names_the_variable() {
    let dir = config_dir(TARGET, GOOD_CHECK);
    for (variable, value) in [
        ("DEPLOYWATCH_DEFAULTS__TIMEOUT", "soon"),
        ("DEPLOYWATCH_DEFAULTS__MAX_CONNECTIONS_PER_TARGET", "many"),
        ("DEPLOYWATCH_SERVER__LISTEN", "nowhere"),
    ] {
        let env = vec![(variable.to_string(), value.to_string())];
        let error = Config::load_with_env(&dir.main(), env).expect_err("rejected");
        let text = error.to_string();
        assert!(text.contains(variable), "{variable}: {text}");
        assert!(
            !text.contains("deploywatch.toml"),
            "{variable} is not the file's fault: {text}"
        );
    }
}

const PARAMETER_CHECK: &str = include_str!("fixtures/packs/parameter.toml");

/// The expectation of the parameter check when the main file overrides `expectedVersion`
/// with 2.5.0 and the environment is `env`.
fn overridden_expectation(env: Vec<(String, String)>) -> String {
    let dir = config_dir(
        &format!("[checks.parameters]\nexpectedVersion = \"2.5.0\"\n\n{TARGET}"),
        PARAMETER_CHECK,
    );
    let config = Config::load_with_env(&dir.main(), env).expect("loads");
    format!("{:?}", config.targets[0].checks[0].expectation)
}

#[test]
fn a_parameter_override_keeps_the_case_of_its_name() {
    // The main file's override of `expectedVersion` must reach the pack parameter of that
    // name; a loader that lowercases keys turned it into `expectedversion` and dropped it.
    let expectation = overridden_expectation(Vec::new());
    assert!(expectation.contains("2.5.0"), "{expectation}");
}

#[test]
fn an_environment_override_matches_a_parameter_whatever_its_case() {
    let expectation = overridden_expectation(vec![(
        "DEPLOYWATCH_CHECKS__PARAMETERS__EXPECTEDVERSION".to_string(),
        "3.0.0".to_string(),
    )]);
    assert!(expectation.contains("3.0.0"), "{expectation}");
}

#[test]
fn a_shard_that_is_not_index_of_count() {
    for (shard, message) in [
        ("1", "write INDEX/COUNT"),
        ("one/2", "write INDEX/COUNT"),
        ("2/2", "shard 2 does not exist with 2 shards"),
        ("0/0", "at least 1"),
    ] {
        check(
            &format!("[server]\nshard = \"{shard}\"\n{TARGET}"),
            GOOD_CHECK,
            "deploywatch.toml",
            "server.shard",
            message,
        );
    }
}

#[test]
fn shard_peers_are_one_base_url_per_shard() {
    check(
        &format!(
            "[server]\nshard = \"0/3\"\nshard_peers = [\"http://a:9788\", \"http://b:9788\"]\n{TARGET}"
        ),
        GOOD_CHECK,
        "deploywatch.toml",
        "server.shard_peers",
        "lists 2 replicas, but the fleet is split into 3 shards",
    );
    check(
        &format!("[server]\nshard = \"0/2\"\nshard_peers = [\"https://a:9788\", \"ftp://b:9788\"]\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "server.shard_peers[1]",
        "only http:// and https:// peers",
    );
    check(
        &format!("[server]\nshard = \"0/2\"\nshard_peers = [\"https://u:secret@a:9788\", \"https://b:9788\"]\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "server.shard_peers[0]",
        "holds no user or password",
    );
    // The CA of https:// peers is read when the configuration is.
    check(
        &format!("[server]\nshard = \"0/2\"\nshard_peers = [\"https://a:9788\", \"https://b:9788\"]\nshard_peers_ca_file = \"missing-ca.pem\"\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "server.shard_peers_ca_file",
        "missing-ca.pem",
    );
    check(
        &format!(
            "[server]\nshard = \"0/2\"\nshard_peers = [\"http://a:9788/status\", \"b\"]\n{TARGET}"
        ),
        GOOD_CHECK,
        "deploywatch.toml",
        "server.shard_peers[0]",
        "base URL",
    );
}

#[test]
fn the_command_line_shard_wins_but_must_match_the_peers() {
    let dir = config_dir(
        &format!("[server]\nshard = \"0/2\"\n{PEERS}{TARGET}"),
        GOOD_CHECK,
    );
    let mut config = Config::load_with_env(&dir.main(), Vec::new()).expect("loads");
    let overrides = |shard: &str| deploywatch::config::Overrides {
        shard: Some(shard.parse().expect("shard")),
    };
    config
        .apply_overrides(&overrides("1/2"))
        .expect("1/2 fits two peers");
    assert_eq!(config.server.shard.to_string(), "1/2");
    let error = config
        .apply_overrides(&overrides("1/3"))
        .expect_err("three shards, two peers");
    assert!(
        error.to_string().contains("split into 3 shards")
            && error.to_string().contains("--shard 1/3"),
        "{error}"
    );
    // An environment override of the file's key works like any other.
    let env = vec![("DEPLOYWATCH_SERVER__SHARD".to_string(), "1/2".to_string())];
    let config = Config::load_with_env(&dir.main(), env).expect("loads");
    assert_eq!(config.server.shard.to_string(), "1/2");
}

#[test]
fn peers_without_a_shard_load_but_run_needs_one() {
    // Each pod of a StatefulSet reads the same file and gets its shard from the command line.
    let dir = config_dir(&format!("[server]\n{PEERS}{TARGET}"), GOOD_CHECK);
    let mut config = Config::load_with_env(&dir.main(), Vec::new()).expect("loads");
    let error = config
        .apply_overrides(&deploywatch::config::Overrides::default())
        .expect_err("no shard");
    assert!(
        error
            .to_string()
            .contains("this replica has no shard: give it one with --shard N/2"),
        "{error}"
    );
}

#[test]
fn a_postgresql_store_with_a_password_in_its_url_or_beside_a_file() {
    check(
        &format!("[store]\nurl = \"postgres://u:secret@h/db\"\n\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "store.url",
        "password_env",
    );
    check(
        &format!("[store]\nurl = \"postgres://u@h/db\"\npath = \"state.sqlite\"\n\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "store.url",
        "not both",
    );
    check(
        &format!("[store]\nurl = \"postgres://u@h/db?sslmode=bogus\"\n\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "store.url",
        "invalid sslmode \"bogus\"",
    );
}

/// A pack with one incremental orphan check whose sweep settings are `sweep`.
fn sweep_pack(sweep: &str) -> String {
    format!(
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"orphans\"\ncategory = \"integrity\"\n\
         severity = \"critical\"\nexpect = \"== 0\"\nincremental_key = \"child_id\"\n\
         incremental_table = \"child\"\n\
         sql = \"SELECT count(*) FROM child WHERE child_id > $1::bigint AND child_id <= $2::bigint\"\n\
         {sweep}"
    )
}

#[test]
fn a_sweep_key_and_its_query_come_together_and_use_their_parameters() {
    let main = TARGET;
    let sweep_sql = "SELECT count(*) FROM child c WHERE c.parent_id > $1::bigint \
                     AND c.parent_id <= $2::bigint AND c.child_id <= $3::bigint";
    // The good one loads.
    let dir = config_dir(
        main,
        &sweep_pack(&format!(
            "sweep_key = \"parent_id\"\nsweep_sql = \"{sweep_sql}\"\n"
        )),
    );
    Config::load(&dir.main()).expect("a sweep key with its query loads");
    check(
        main,
        &sweep_pack("sweep_key = \"parent_id\"\n"),
        "pack.toml",
        "check[0] (orphans).sweep_sql",
        "sweep_key needs sweep_sql",
    );
    check(
        main,
        &sweep_pack(&format!("sweep_sql = \"{sweep_sql}\"\n")),
        "pack.toml",
        "check[0] (orphans).sweep_key",
        "sweep_sql needs sweep_key",
    );
    check(
        main,
        &sweep_pack(&format!(
            "sweep_key = \"child_id\"\nsweep_sql = \"{sweep_sql}\"\n"
        )),
        "pack.toml",
        "check[0] (orphans).sweep_key",
        "is the incremental_key",
    );
    check(
        main,
        &sweep_pack(&format!(
            "sweep_key = \"Parent Id\"\nsweep_sql = \"{sweep_sql}\"\n"
        )),
        "pack.toml",
        "check[0] (orphans).sweep_key",
        "is not a column name",
    );
    // Without the bound on the incremental key, rows inserted during the sweep would be
    // counted by the sweep and by the increments.
    check(
        main,
        &sweep_pack(
            "sweep_key = \"parent_id\"\nsweep_sql = \"SELECT count(*) FROM child c \
             WHERE c.parent_id > $1::bigint AND c.parent_id <= $2::bigint AND c.x = $13\"\n",
        ),
        "pack.toml",
        "check[0] (orphans).sweep_sql",
        "does not use $3",
    );
    check(
        main,
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"plain\"\ncategory = \"integrity\"\n\
         severity = \"critical\"\nexpect = \"== 0\"\nsql = \"SELECT 0\"\nsweep_key = \"parent_id\"\n",
        "pack.toml",
        "check[0] (plain).sweep_key",
        "only applies to an incremental check",
    );
}

#[test]
fn no_scrape_turns() {
    check(
        &format!("[server]\nmax_concurrent_scrapes = 0\n{TARGET}"),
        GOOD_CHECK,
        "deploywatch.toml",
        "server.max_concurrent_scrapes",
        "must be at least 1, found 0",
    );
}

//! Property tests: whatever text reaches a parser — an expectation, a number, a connection string,
//! a configuration or check pack file, an announcement body — it is accepted or refused with a
//! message, never a panic. Case counts are kept small so the suite stays quick; raise
//! `PROPTEST_CASES` to search longer.

mod common;

use std::time::Duration;

use common::{cluster, target_toml, ConfigDir};
use deploywatch::checks::expectation::{self, Observed};
use deploywatch::checks::number::Number;
use deploywatch::config::Config;
use deploywatch::postgres::target::ConnectionSettings;
use proptest::prelude::*;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Failures are reported with the shrunk input; nothing is written next to the tests.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn params(name: &str) -> Option<String> {
    match name {
        "version" => Some("3.7.0".to_string()),
        "limit" => Some("9223372036854775807".to_string()),
        "ratio" => Some("0.25".to_string()),
        _ => None,
    }
}

/// Text that looks like an expectation often enough to reach the deeper parser paths.
fn expectation_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("==".to_string()),
        Just("!=".to_string()),
        Just("<".to_string()),
        Just(">=".to_string()),
        Just("=>".to_string()),
        Just("between".to_string()),
        Just("not".to_string()),
        Just("and".to_string()),
        Just("$version".to_string()),
        Just("$limit".to_string()),
        Just("$nosuch".to_string()),
        Just("\"3.7.0\"".to_string()),
        Just("\"unterminated".to_string()),
        Just("1e400000".to_string()),
        Just("1e-99999999999999999999".to_string()),
        Just("inf".to_string()),
        Just("NaN".to_string()),
        "-?[0-9]{1,30}(\\.[0-9]{0,20})?([eE][+-]?[0-9]{1,6})?",
        "\\PC{0,8}",
    ];
    prop_oneof![
        proptest::collection::vec(token, 0..6).prop_map(|t| t.join(" ")),
        "\\PC{0,40}",
    ]
}

fn observed() -> impl Strategy<Value = Observed> {
    prop_oneof![
        any::<i64>().prop_map(|i| Observed::Number(Number::from_i64(i))),
        any::<f64>().prop_map(|f| Observed::Number(Number::from_f64(f))),
        "-?[0-9]{1,60}(\\.[0-9]{1,30})?"
            .prop_map(|t| Observed::Number(Number::parse(&t).unwrap_or(Number::from_i64(0)))),
        "\\PC{0,20}".prop_map(Observed::Text),
        any::<bool>().prop_map(Observed::Bool),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn expectations_parse_or_fail_with_a_message_and_round_trip(text in expectation_text()) {
        match expectation::parse(&text, &params) {
            Ok(parsed) => {
                let rendered = parsed.to_string();
                let again = expectation::parse(&rendered, &params);
                prop_assert_eq!(again.as_ref().ok(), Some(&parsed), "{} -> {}", text, rendered);
            }
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn evaluating_any_observation_never_panics(text in expectation_text(), value in observed()) {
        if let Ok(parsed) = expectation::parse(&text, &params) {
            let nan = matches!(&value, Observed::Number(n) if n.is_nan());
            let result = parsed.evaluate(&value);
            if nan {
                prop_assert_eq!(result, Ok(false));
            }
        }
    }

    #[test]
    fn numbers_parse_from_decimal_text_only(text in "\\PC{0,30}") {
        let parsed = Number::parse(&text);
        let trimmed = text.trim();
        let lowered = trimmed.to_ascii_lowercase();
        if lowered.contains("inf") || lowered.contains("nan") {
            prop_assert!(parsed.is_none(), "{:?}", text);
        }
        if let Some(number) = parsed {
            // What is shown reads back as the same number.
            prop_assert_eq!(Number::parse(&number.to_string()), Some(number));
        }
    }

    #[test]
    fn decimal_text_always_parses(text in "[+-]?[0-9]{1,40}(\\.[0-9]{0,40})?([eE][+-]?[0-9]{1,5})?") {
        prop_assert!(Number::parse(&text).is_some(), "{:?}", text);
    }

    #[test]
    fn a_connection_string_never_shows_its_password(
        user in "[a-z]{1,8}",
        password in "\\PC{1,16}",
        host in "[a-z]{1,8}(\\.[a-z]{1,5})?",
        form in 0..3u8,
    ) {
        let secret = format!("Qz8{password}");
        let text = match form {
            0 => format!("postgres://{user}:{secret}@{host}/db"),
            1 => format!("postgresql://{user}:{secret}@{host}:5432/db?sslmode=disable"),
            _ => format!("host={host} user={user} password={secret} dbname=db"),
        };
        let result = ConnectionSettings::parse(&text, Duration::from_secs(1));
        let shown = match result {
            Ok(settings) => format!("{} {settings:?}", settings.display),
            Err(error) => error.to_string(),
        };
        prop_assert!(!shown.contains("Qz8"), "{:?} shows {:?}", text, shown);
    }

    #[test]
    fn any_connection_string_is_parsed_or_refused(text in "\\PC{0,60}") {
        let _ = ConnectionSettings::parse(&text, Duration::from_secs(1));
    }
}

const PACK: &str = "[pack]\nname = \"p\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n";
const MAIN: &str = "[defaults]\ninterval = \"1m\"\n\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\ndbname = \"x\"\n";

/// A valid file with one line replaced or inserted: mostly valid TOML that reaches validation.
fn mutated(base: &'static str) -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "[a-z_]{1,12} = \"\\PC{0,12}\"",
        "[a-z_]{1,12} = -?[0-9]{1,20}",
        "[a-z_]{1,12} = (true|false)",
        "(interval|timeout|retention|expect|sql|name|severity|category|shape|labels|values|max_series|port|url) = \"\\PC{0,16}\"",
        "(max_series|port|max_connections|interval) = -?[0-9]{1,20}",
        "\\[\\[?[a-z_.]{1,12}\\]\\]?",
        "\\PC{0,30}",
    ];
    let lines = base.lines().count();
    (line, 0..=lines, any::<bool>()).prop_map(move |(line, at, replace)| {
        let mut all: Vec<String> = base.lines().map(str::to_string).collect();
        if replace && at < all.len() {
            all[at] = line;
        } else {
            all.insert(at.min(all.len()), line);
        }
        all.join("\n") + "\n"
    })
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn any_main_file_loads_or_is_refused_with_problems(main in prop_oneof![mutated(MAIN), "\\PC{0,200}"]) {
        let dir = ConfigDir::new();
        dir.write("deploywatch.toml", &main);
        dir.write("checks/p.toml", PACK);
        if let Err(error) = Config::load_with_env(&dir.main(), Vec::new()) {
            prop_assert!(!error.problems().is_empty());
        }
    }

    #[test]
    fn any_check_pack_loads_or_is_refused_with_problems(pack in prop_oneof![mutated(PACK), "\\PC{0,200}"]) {
        let dir = ConfigDir::new();
        dir.write("deploywatch.toml", MAIN);
        dir.write("checks/p.toml", &pack);
        if let Err(error) = Config::load_with_env(&dir.main(), Vec::new()) {
            prop_assert!(!error.problems().is_empty());
        }
    }

    #[test]
    fn any_environment_override_loads_or_is_refused_with_problems(
        key in "(SERVER|DEFAULTS|STORE|CHECKS|DEPLOYMENTS)__[A-Z_]{1,30}",
        value in "\\PC{0,20}",
    ) {
        let dir = ConfigDir::new();
        dir.write("deploywatch.toml", MAIN);
        dir.write("checks/p.toml", PACK);
        let env = vec![(format!("DEPLOYWATCH_{key}"), value)];
        if let Err(error) = Config::load_with_env(&dir.main(), env) {
            prop_assert!(!error.problems().is_empty());
        }
    }
}

/// Announcement bodies: valid-looking JSON with odd field values, and arbitrary text.
fn announcement_body() -> impl Strategy<Value = String> {
    let time = prop_oneof![
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})",
        Just("0000-01-01T00:00:00Z".to_string()),
        Just("9999-12-31T23:59:59Z".to_string()),
        Just("1970-01-01T00:00:00Z".to_string()),
        "\\PC{0,20}",
    ];
    let field = prop_oneof![
        Just(serde_json::Value::Null),
        "\\PC{0,20}".prop_map(serde_json::Value::String),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<bool>().prop_map(serde_json::Value::from),
    ];
    let object = (
        prop_oneof![
            Just(None),
            Just(Some("db".to_string())),
            "\\PC{0,10}".prop_map(Some)
        ],
        prop_oneof!["[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", "\\PC{0,20}"],
        proptest::option::of(time.clone()),
        proptest::option::of(time),
        proptest::option::of(field),
    )
        .prop_map(|(target, version, started, finished, extra)| {
            let mut map = serde_json::Map::new();
            if let Some(target) = target {
                map.insert("target".into(), target.into());
            }
            map.insert("version".into(), version.into());
            if let Some(started) = started {
                map.insert("started_at".into(), started.into());
            }
            if let Some(finished) = finished {
                map.insert("finished_at".into(), finished.into());
            }
            if let Some(extra) = extra {
                map.insert("note".into(), extra);
            }
            serde_json::Value::Object(map).to_string()
        });
    prop_oneof![4 => object, 1 => "\\PC{0,100}"]
}

#[test]
fn any_announcement_body_gets_an_answer() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let pg = cluster();
    let dir = ConfigDir::new();
    dir.write("token", "secret-token");
    dir.write("checks/p.toml", PACK);
    dir.write(
        "deploywatch.toml",
        &format!(
            "[server]\napi_token_file = \"token\"\n\n[deployments]\nsample_interval = \"1s\"\nversion_query = \"SELECT '1.0.0'\"\n\n{}",
            target_toml("db", &pg, "postgres")
        ),
    );
    let handle = runtime.block_on(common::start(&dir));
    let url = format!("http://{}/api/deployments", handle.local_addr);
    let health = format!("http://{}/healthz", handle.local_addr);
    let mut runner = proptest::test_runner::TestRunner::new(cases(24));
    let result = runner.run(&announcement_body(), |body| {
        let answer = runtime.block_on(deploywatch::commands::client::request(
            hyper::Method::POST,
            &url,
            "application/json",
            Some("secret-token"),
            Some(body.clone()),
        ));
        let (code, text) = answer.map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        prop_assert!(
            [201, 400, 404, 409, 503].contains(&code.as_u16()),
            "{} -> {} {}",
            body,
            code,
            text
        );
        let (code, _) = runtime.block_on(common::get(&health));
        prop_assert_eq!(code, 200);
        Ok(())
    });
    runtime.block_on(handle.shutdown()).expect("clean shutdown");
    if let Err(error) = result {
        panic!("{error}");
    }
}

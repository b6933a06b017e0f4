//! Values at the edges, against a real PostgreSQL: big integers and numerics compare exactly,
//! NaN passes no expectation, the text 'inf' / 'nan' is not a number, numerics beyond the double
//! range keep their exact text, and a rows check never exports one series twice.

mod common;

use common::{cluster, target_toml, ConfigDir};
use deploywatch::commands;
use deploywatch::commands::cli::OutputFormat;

/// One scalar check: name, SQL, expectation (`None`: observe only).
type Scalar<'a> = (&'a str, &'a str, Option<&'a str>);

fn pack(checks: &[Scalar<'_>]) -> String {
    let mut text = String::from("[pack]\nname = \"values\"\n");
    for (name, sql, expect) in checks {
        text.push_str(&format!(
            "\n[[check]]\nname = \"{name}\"\ncategory = \"health\"\nseverity = \"warning\"\nsql = \"{sql}\"\n"
        ));
        if let Some(expect) = expect {
            text.push_str(&format!("expect = '{expect}'\n"));
        }
    }
    text
}

/// Runs `deploywatch check` over the pack and returns each check's JSON report by name.
async fn run(pack_text: &str) -> serde_json::Map<String, serde_json::Value> {
    let pg = cluster();
    let dir = ConfigDir::new();
    dir.write("checks/values.toml", pack_text);
    dir.write("deploywatch.toml", &target_toml("db", &pg, "postgres"));
    let (_, output) = commands::check(dir.load(), None, None, OutputFormat::Json).await;
    let json: serde_json::Value = serde_json::from_str(&output).expect("JSON output");
    json["targets"][0]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_string(),
                c.clone(),
            )
        })
        .collect()
}

fn expect_status(
    checks: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    status: &str,
    error_kind: Option<&str>,
) {
    let check = &checks[name];
    assert_eq!(check["status"], status, "{name}: {check:#}");
    if let Some(kind) = error_kind {
        assert_eq!(check["error_kind"], kind, "{name}: {check:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_at_the_edges_are_judged_exactly() {
    let big = "10000000000000000000000000000000000000000000000001";
    let beyond_double = format!("1{}1", "0".repeat(399));
    let checks = run(&pack(&[
        (
            "bigint_off_by_one",
            "SELECT 9223372036854775807::bigint",
            Some("== 9223372036854775806"),
        ),
        (
            "bigint_equal",
            "SELECT 9223372036854775807::bigint",
            Some("== 9223372036854775807"),
        ),
        (
            "numeric_off_by_one",
            &format!("SELECT {big}::numeric"),
            Some("!= 10000000000000000000000000000000000000000000000000"),
        ),
        (
            "numeric_between",
            "SELECT 0.30000000000000000001::numeric",
            Some("not between 0 and 0.3"),
        ),
        ("float_nan_ne", "SELECT 'NaN'::float8", Some("!= 0")),
        (
            "float_nan_not_between",
            "SELECT 'NaN'::float8",
            Some("not between 0 and 1"),
        ),
        ("numeric_nan_ne", "SELECT 'NaN'::numeric", Some("!= 0")),
        ("text_nan", "SELECT 'nan'::text", Some("!= 0")),
        ("text_inf", "SELECT 'inf'::text", Some("> 0")),
        ("float_text_equal", "SELECT 0.9::float8", Some("== 0.9")),
        (
            "beyond_double",
            &format!("SELECT {beyond_double}::numeric"),
            None,
        ),
        (
            "beyond_double_compared",
            &format!("SELECT {beyond_double}::numeric"),
            Some("> 1e400"),
        ),
    ]))
    .await;
    expect_status(&checks, "bigint_off_by_one", "fail", None);
    expect_status(&checks, "bigint_equal", "pass", None);
    assert_eq!(
        checks["bigint_equal"]["value"].to_string(),
        "9223372036854775807"
    );
    expect_status(&checks, "numeric_off_by_one", "pass", None);
    expect_status(&checks, "numeric_between", "pass", None);
    expect_status(&checks, "float_nan_ne", "fail", None);
    expect_status(&checks, "float_nan_not_between", "fail", None);
    expect_status(&checks, "numeric_nan_ne", "fail", None);
    expect_status(&checks, "text_nan", "error", Some("not_numeric"));
    expect_status(&checks, "text_inf", "error", Some("not_numeric"));
    expect_status(&checks, "float_text_equal", "pass", None);
    expect_status(&checks, "beyond_double", "pass", None);
    assert_eq!(
        checks["beyond_double"]["value"].as_str(),
        Some(beyond_double.as_str()),
        "{:#}",
        checks["beyond_double"]
    );
    expect_status(&checks, "beyond_double_compared", "pass", None);
}

fn rows_pack(sql: &str) -> String {
    format!(
        "[pack]\nname = \"rows\"\n\n[[check]]\nname = \"by_label\"\ncategory = \"activity\"\nseverity = \"info\"\nshape = \"rows\"\nlabels = [\"name\"]\nvalues = [\"n\"]\nsql = \"{sql}\"\n"
    )
}

/// The error message of the rows check on `sql`, which must end in an error of `kind`.
async fn rows_error(sql: &str, kind: &str) -> String {
    let checks = run(&rows_pack(sql)).await;
    expect_status(&checks, "by_label", "error", Some(kind));
    let message = checks["by_label"]["error"].as_str().unwrap_or_default();
    message.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_label_is_an_error_not_a_second_empty_series() {
    let message = rows_error(
        "SELECT * FROM (VALUES ('a', 1), ('', 2), (NULL, 3)) AS t(name, n)",
        "null_label",
    )
    .await;
    assert!(message.contains("\"name\""), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_the_same_labels_are_an_error() {
    let message = rows_error(
        "SELECT * FROM (VALUES ('a', 1), ('b', 2), ('a', 3)) AS t(name, n)",
        "duplicate_series",
    )
    .await;
    assert!(message.contains("name=a"), "{message}");
}

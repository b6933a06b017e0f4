//! The command line as an operator and a pipeline use it: unknown target names, closed pipes,
//! help for every flag, unreachable databases in one-shot commands, token variables.

mod common;

use std::process::Stdio;

use clap::CommandFactory;
use common::{cluster, get, target_toml, ConfigDir};
use deploywatch::commands::cli::Cli;
use deploywatch::daemon::DaemonHandle;

// A short interval: the first runs of a server's targets are spread over it, and the daemon is
// ready once every target has been tried.
const PACK: &str = "[pack]\nname = \"p\"\n\n[[check]]\nname = \"one\"\ncategory = \"health\"\nseverity = \"critical\"\ninterval = \"4s\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n";

fn binary() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
}

/// The daemon in this process, once ready.
async fn start(dir: &ConfigDir) -> DaemonHandle {
    let handle = common::start(dir).await;
    common::wait_ready(&handle).await;
    handle
}

fn unreachable_config() -> ConfigDir {
    let dir = ConfigDir::new();
    // Two checks: the second must not talk about reconnect backoff after the first failed.
    dir.write(
        "checks/p.toml",
        &format!("{PACK}\n[[check]]\nname = \"two\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 2\"\n"),
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\nconnect_timeout = \"2s\"\n\n[[targets]]\nname = \"gone\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"x\"\nuser = \"deploywatch\"\n",
            common::free_port()
        ),
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_target_is_an_error_that_lists_the_known_ones() {
    let pg = cluster();
    let dir = ConfigDir::new();
    dir.write("checks/p.toml", PACK);
    dir.write(
        "deploywatch.toml",
        &format!(
            "{}\n{}",
            target_toml("alpha", &pg, "postgres"),
            target_toml("beta", &pg, "postgres")
        ),
    );
    let handle = start(&dir).await;
    let base = format!("http://{}", handle.local_addr);
    for query in ["target=nosuch", "target=nosuch&format=text"] {
        let (code, body) = get(&format!("{base}/status?{query}")).await;
        assert_eq!(code, 404, "{query}: {body}");
        assert!(
            body.contains("nosuch") && body.contains("alpha") && body.contains("beta"),
            "{query}: {body}"
        );
    }
    let (code, _) = get(&format!("{base}/status?target=alpha")).await;
    assert_eq!(code, 200);
    for format in ["table", "json"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
            .args([
                "status", "--url", &base, "--target", "nosuch", "--format", format,
            ])
            .output()
            .await
            .expect("status command");
        let text = common::exit_text(&output, 2);
        assert!(
            text.contains("nosuch") && text.contains("alpha, beta"),
            "{format}: {text}"
        );
    }
    // `check` lists them too.
    let text = common::exit_stdout(&dir.run(&["check", "--target", "nosuch"]), 2);
    assert!(text.contains("alpha, beta"), "{text}");

    // A reader that goes away early (`| head`) ends the command quietly, without a panic.
    let mut child = binary()
        .args(["status", "--url", &base, "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn status");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("status ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(output.status.code(), Some(101), "{stderr}");
    handle.shutdown().await.expect("clean shutdown");
}

#[test]
fn every_flag_has_help() {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} --{id}"));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut command = Cli::command();
    command.build();
    let mut missing = Vec::new();
    walk(&command, "deploywatch", &mut missing);
    assert!(missing.is_empty(), "flags without help: {missing:?}");
}

#[test]
fn check_against_an_unreachable_database_says_it_cannot_connect() {
    let dir = unreachable_config();
    let text = common::exit_stdout(&dir.run(&["check"]), 2);
    assert!(text.contains("cannot connect"), "{text}");
    assert!(
        !text.contains("reconnecting") && !text.contains("backoff"),
        "{text}"
    );

    let text = common::exit_stdout(&dir.run(&["check", "--privileges"]), 2);
    assert!(
        text.contains("gone") && text.contains("cannot connect"),
        "{text}"
    );
    assert!(!text.contains("of 0 checks"), "{text}");
}

#[test]
fn deploy_mark_says_the_token_variable_is_empty() {
    let dir = unreachable_config();
    let main = std::fs::read_to_string(dir.main()).expect("config");
    dir.write(
        "deploywatch.toml",
        &format!("[server]\napi_token_env = \"DW_TEST_EMPTY_TOKEN\"\n\n{main}"),
    );
    let mark = || {
        let mut command = dir.command();
        command.args(["deploy", "mark", "--version", "3.7.0"]);
        command
    };
    let output = mark()
        .env("DW_TEST_EMPTY_TOKEN", "")
        .output()
        .expect("deploy mark");
    let text = common::exit_text(&output, 2);
    assert!(
        text.contains("DW_TEST_EMPTY_TOKEN") && text.contains("is empty"),
        "{text}"
    );
    let output = mark()
        .env_remove("DW_TEST_EMPTY_TOKEN")
        .output()
        .expect("deploy mark");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("DW_TEST_EMPTY_TOKEN") && text.contains("not set"),
        "{text}"
    );
}

//! Secrets never leak: a distinctive password and API token are driven through the error paths
//! (wrong password, unreachable host, a server that refuses TLS, malformed connection string, SQL
//! errors, refused API calls, a rejected reload) and must not appear in logs at any level, stderr, `/status` or
//! `/metrics`.

mod common;

use std::time::Duration;

use common::{cluster, wait_for_answer, ConfigDir};
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};

const PASSWORD: &str = "Zx9-LEAK-CANARY-pw-7q";
const WRONG_PASSWORD: &str = "Wr0ng-LEAK-CANARY-pw-3k";
const TOKEN: &str = "Tk4-LEAK-CANARY-token-9m";

/// A server that asks every role but `postgres` for a SCRAM password. Every password set on it is
/// stored as a SCRAM verifier (PostgreSQL 13 would store md5, which a scram-sha-256 line of
/// pg_hba.conf refuses), including those a test changes later with `ALTER ROLE`.
fn password_cluster() -> PgCluster {
    let pg = PgCluster::start(ClusterOptions {
        extra_conf: vec![("password_encryption".into(), "'scram-sha-256'".into())],
        hba: Some(
            "local all postgres trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
                .to_string(),
        ),
        ..ClusterOptions::default()
    })
    .expect("PostgreSQL with password authentication");
    pg.create_database("app").expect("db");
    pg.psql(
        "app",
        &format!("CREATE ROLE secretive LOGIN PASSWORD '{PASSWORD}'"),
    )
    .expect("role");
    pg
}

fn assert_clean(what: &str, text: &str) {
    for secret in [PASSWORD, WRONG_PASSWORD, TOKEN, "LEAK-CANARY"] {
        assert!(!text.contains(secret), "{what} leaks {secret}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_status_metrics_or_errors() {
    let pg = password_cluster();
    let _unused = cluster(); // a second server whose port we point at with a wrong password
    let dir = ConfigDir::new();
    dir.write("pw", PASSWORD);
    dir.write("wrong", WRONG_PASSWORD);
    dir.write("token", TOKEN);
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"ok\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n\n[[check]]\nname = \"broken\"\ncategory = \"health\"\nseverity = \"warning\"\nsql = \"SELECT * FROM no_such_table\"\n",
    );
    let closed_port = common::free_port();
    let main = format!(
        "[server]\napi_token_file = \"token\"\n\n[checks]\ninterval_override = \"1s\"\n\n[deployments]\nsample_interval = \"1s\"\n\n\
         [[targets]]\nname = \"good\"\nurl = \"postgres://secretive@127.0.0.1:{port}/app\"\npassword_file = \"pw\"\n\n\
         [[targets]]\nname = \"wrong_password\"\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"app\"\nuser = \"secretive\"\npassword_file = \"wrong\"\n\n\
         [[targets]]\nname = \"no_server\"\nhost = \"127.0.0.1\"\nport = {closed_port}\ndbname = \"app\"\nuser = \"secretive\"\npassword_file = \"pw\"\n\n\
         [[targets]]\nname = \"tls_refused\"\nurl = \"postgres://secretive@127.0.0.1:{port}/app?sslmode=require\"\npassword_file = \"pw\"\n",
        port = pg.port()
    );
    dir.write("deploywatch.toml", &main);
    let port = common::free_port();
    let mut child = dir
        .async_command()
        .args([
            "--log-level",
            "trace",
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn daemon");
    // Drain the pipes while the daemon runs, or a full pipe would block its logging.
    let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text).await;
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stderr_task = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    );
    let stdout_task = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    );
    let base = format!("http://127.0.0.1:{port}");
    let status = wait_for_answer(
        &format!("{base}/status"),
        "every target tried, the good one passing",
        Duration::from_secs(60),
        |_, body| {
            let json: serde_json::Value = serde_json::from_str(body).ok()?;
            let targets = json["targets"].as_array()?;
            let good_ok = targets
                .iter()
                .any(|t| t["name"] == "good" && t["reachable"] == true);
            let all_tried = targets.iter().all(|t| t["reachable"].is_boolean());
            (good_ok && all_tried).then(|| body.to_string())
        },
    )
    .await;
    assert!(
        status.contains("password authentication failed"),
        "the wrong password is reported, not shown: {status}"
    );
    // A refused and a malformed announcement.
    for (token, body) in [
        (Some("not-the-token"), "{\"version\": \"1\"}"),
        (Some(TOKEN), "{\"version\": "),
    ] {
        let (_, answer) = deploywatch::commands::client::request(
            hyper::Method::POST,
            &format!("{base}/api/deployments"),
            "application/json",
            token,
            Some(body.to_string()),
        )
        .await
        .expect("post");
        assert_clean("an API answer", &answer);
    }
    // A reload with a malformed connection string that holds the password.
    dir.write(
        "deploywatch.toml",
        &format!("{main}\n[[targets]]\nname = \"malformed\"\nurl = \"postgres://secretive:{PASSWORD}@127.0.0.1:notaport/app\"\n"),
    );
    common::signal(child.id().expect("pid"), "-HUP");
    // The reload is refused (the connection string is malformed): wait until it has been tried.
    common::wait_for_json(
        &format!("{base}/status?format=json"),
        "the reload refused",
        Duration::from_secs(20),
        |json| (json["config_reload_successful"] == false).then_some(()),
    )
    .await;

    let (_, metrics) = common::get_as(&format!("{base}/metrics"), "*/*").await;
    let (_, status) = common::get_as(&format!("{base}/status"), "application/json").await;
    let (_, text) = common::get_as(&format!("{base}/status?format=text"), "text/plain").await;
    assert!(
        metrics.contains("deploywatch_config_last_reload_successful 0"),
        "the bad reload was rejected"
    );
    let exit = common::terminate(&mut child, Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(0));
    let logs = stderr_task.await.expect("stderr") + &stdout_task.await.expect("stdout");
    assert!(logs.contains("configuration reload rejected"), "{logs}");
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "logs were captured at every level"
    );
    assert_clean("/metrics", &metrics);
    assert_clean("/status", &status);
    assert_clean("/status?format=text", &text);
    assert_clean("the logs", &logs);

    // The CLI's own error paths.
    let check = dir.run(&["check"]);
    assert_eq!(check.status.code(), Some(2));
    assert_clean("`check` with a malformed URL", &common::output_text(&check));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"))
        .arg("--help")
        .output()
        .expect("help");
    assert_clean("--help", &String::from_utf8_lossy(&help.stdout));
}

/// A target that names only itself: host, port, database and user come from libpq's
/// environment variables, the password from the file PGPASSFILE names.
#[test]
fn libpq_environment_and_pgpass_fill_what_the_target_leaves_out() {
    let pg = password_cluster();
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"who\"\ncategory = \"health\"\nseverity = \"info\"\nsql = \"SELECT current_user::text\"\nexpect = \"== \\\"secretive\\\"\"\n",
    );
    dir.write(
        "deploywatch.toml",
        "[deployments]\nenabled = false\n\n[[targets]]\nname = \"from_env\"\n",
    );
    let pgpass = dir.write(
        "pgpass",
        &format!(
            "# host:port:db:user:password\n127.0.0.1:{}:app:secretive:{PASSWORD}\n",
            pg.port()
        ),
    );
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let run = |passfile: &std::path::Path| {
        dir.command()
            .arg("check")
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port().to_string())
            .env("PGDATABASE", "app")
            .env("PGUSER", "secretive")
            .env("PGPASSFILE", passfile)
            .output()
            .expect("check")
    };
    let output = run(&pgpass);
    let stdout = common::succeeded(&output);
    assert!(stdout.contains("secretive@127.0.0.1"), "{stdout}");
    assert_clean("`check` output", &stdout);
    // Without a matching .pgpass line the server refuses, and says so without a secret.
    let empty = dir.write("empty-pgpass", "");
    let output = run(&empty);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("password"), "{stdout}");
    assert_clean("`check` output", &stdout);
}

/// A password file is read at every connect: rotating the role's password and then the file
/// (as a Kubernetes secret update does) brings the target back without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_file_is_picked_up_without_a_restart() {
    const ROTATED: &str = "Rot8-LEAK-CANARY-pw-5v";
    let pg = password_cluster();
    let dir = ConfigDir::new();
    dir.write("pw", PASSWORD);
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"ok\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[defaults]\nconnect_timeout = \"1s\"\n\n[checks]\ninterval_override = \"1s\"\n\n[deployments]\nenabled = false\n\n\
             [[targets]]\nname = \"rotating\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"app\"\nuser = \"secretive\"\npassword_file = \"pw\"\n",
            pg.port()
        ),
    );
    let handle = common::start(&dir).await;
    let status = format!("{}/status", common::base(&handle));
    // `/status` once its only target is as `accept` wants it (given the target and the text).
    let target_where =
        |what: &'static str, deadline: u64, accept: fn(&serde_json::Value, &str) -> bool| {
            let status = status.clone();
            async move {
                wait_for_answer(&status, what, Duration::from_secs(deadline), |_, body| {
                    let json: serde_json::Value = serde_json::from_str(body).ok()?;
                    accept(&json["targets"][0], body).then(|| body.to_string())
                })
                .await
            }
        };
    target_where("the first password works", 30, |t, _| {
        t["reachable"] == true && t["checks"][0]["status"] == "pass"
    })
    .await;

    // The role's password changes and its sessions end: the old file no longer opens one.
    // Two statements, two transactions: sessions are ended only once the new password is
    // committed, so none opened in between survives with the old one.
    pg.psql("app", &format!("ALTER ROLE secretive PASSWORD '{ROTATED}'"))
        .expect("rotate the role's password");
    pg.psql(
        "app",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'secretive'",
    )
    .expect("end the role's sessions");
    // A session the server ended may first show as closed; the next attempt opens a new one,
    // which the old password cannot.
    let refused = target_where("the old password is refused", 30, |t, body| {
        t["reachable"] == false && body.contains("password authentication failed")
    })
    .await;
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );

    // The secret is updated in place; the daemon is not told.
    dir.write("pw", ROTATED);
    let recovered = target_where("the rotated password is used", 60, |t, _| {
        t["reachable"] == true && t["checks"][0]["status"] == "pass"
    })
    .await;
    assert_clean("/status", &recovered);
    handle.shutdown().await.expect("clean shutdown");
}

/// A password with an unencoded '@' would split the URL in the wrong place and put part of the
/// password into the host name (shown in `/status`, `status`, `check` and logs). Such a string
/// is refused with the reason and without any part of it.
#[test]
fn a_connection_string_that_cannot_be_parsed_never_shows_any_part_of_it() {
    let dir = ConfigDir::new();
    dir.write(
        "checks/p.toml",
        "[pack]\nname = \"p\"\n\n[[check]]\nname = \"ok\"\ncategory = \"health\"\nseverity = \"critical\"\nsql = \"SELECT 1\"\n",
    );
    dir.write(
        "deploywatch.toml",
        "[[targets]]\nname = \"app\"\nurl = \"postgres://appuser:Zq9@LEAK-CANARY-xyz@db.example.invalid/app\"\n",
    );
    for command in [
        &["validate"][..],
        &["check"],
        &["check", "--privileges"],
        &["run"],
    ] {
        let output = dir.run(&[&["--log-level", "trace"][..], command].concat());
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{command:?}: {stdout}{stderr}"
        );
        assert!(
            stderr.contains("unencoded '@' in the user name or password: percent-encode it as %40"),
            "{command:?}: {stderr}"
        );
        assert_clean(&format!("{command:?} stdout"), &stdout);
        assert_clean(&format!("{command:?} stderr"), &stderr);
        assert!(!stderr.contains("Zq9"), "{stderr}");
    }
}

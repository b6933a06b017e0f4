//! Every command the documentation gives runs as written, from the directory it names.
//!
//! Each fenced shell or SQL block of README.md, deploy/README.md and docs/*.md carries a comment
//! on the line before it that says how it is tested:
//!
//! - `<!-- doc-test: run [dir=repo|deploy] -->`: run by bash, in document order, in one session
//!   (so a `cd` or `export` carries over), in a scratch copy of the repository, with the built
//!   `deploywatch` on `PATH`, `HOME` a scratch directory and libpq's `PG*` variables pointing
//!   at a real PostgreSQL the test starts. `dir` changes to that directory of the copy first.
//! - `<!-- doc-test: daemon -->`: one command started in the background, waited for until
//!   `/readyz` answers, stopped when the document ends.
//! - `<!-- doc-test: file PATH -->`: the block's text is what the document says to save as PATH.
//! - `<!-- doc-test: sql [rollback] -->`: run with psql (inside a rolled-back transaction with
//!   `rollback`).
//! - `<!-- doc-test: values -->`: the values a reader sets; replaced by the test's own (the test
//!   checks the block sets exactly the variables it supplies).
//! - `<!-- doc-test: config -->` / `pack`: a TOML block that must load as a main configuration
//!   (with the shipped packs) or as a check pack.
//! - `<!-- doc-test: parse REASON -->`: cannot run here (installs system-wide, needs a container
//!   engine, a cluster or your own database); bash must parse it and every `deploywatch` command
//!   line in it must parse with the real command-line definition.
//! - `<!-- doc-test: version-query TOOL -->`: tested against TOOL's real table in
//!   `version_queries_work_on_the_tables_their_tools_create`.
//!
//! The only rewrite the test makes: the daemon's documented address `127.0.0.1:9788` becomes a
//! free port, so the test never collides with a daemon or demo running on this machine.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser as _;
use common::{cognit_db, free_port, repo, Version};
use deploywatch_testkit::pgcluster::PgCluster;

const DOCUMENTED_ADDRESS: &str = "127.0.0.1:9788";

#[derive(Debug, Clone)]
struct Block {
    doc: String,
    line: usize,
    lang: String,
    mode: String,
    args: String,
    text: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.doc, self.line)
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .split_whitespace()
            .find_map(|a| a.strip_prefix(&format!("{key}=")))
    }
}

/// The fenced blocks of a document with their `doc-test` comments.
fn blocks(doc: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap_or_else(|e| panic!("{doc}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let start = i;
        let mut end = i + 1;
        while end < lines.len() && lines[end].trim_start() != "```" {
            end += 1;
        }
        assert!(
            end < lines.len(),
            "{doc}:{}: unclosed code block",
            start + 1
        );
        let annotation = lines[..start]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("<!-- doc-test:"))
            .and_then(|l| l.strip_suffix("-->"))
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        let (mode, args) = annotation
            .split_once(' ')
            .map(|(m, a)| (m.to_string(), a.trim().to_string()))
            .unwrap_or((annotation.clone(), String::new()));
        found.push(Block {
            doc: doc.to_string(),
            line: start + 1,
            lang: lang.trim().to_string(),
            mode,
            args,
            text: lines[start + 1..end].join("\n") + "\n",
        });
        i = end + 1;
    }
    found
}

const DOCS: &[&str] = &[
    "README.md",
    "deploy/README.md",
    "docs/runbooks.md",
    "docs/getting-started.md",
];

/// Every document under docs/ is one of the tested ones.
#[test]
fn every_document_is_tested() {
    let mut listed: BTreeSet<String> = DOCS.iter().map(|d| d.to_string()).collect();
    for entry in std::fs::read_dir(repo().join("docs")).expect("docs/") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".md") {
            assert!(
                listed.remove(&format!("docs/{name}")),
                "docs/{name} is not in the documentation test's list"
            );
        }
    }
}

/// Every shell and SQL block says how it is tested; `parse` blocks parse with bash; every
/// `deploywatch` command line in any block and in inline code parses with the real CLI; every
/// repository path a `parse` block names exists.
#[test]
fn every_command_block_is_tested_and_parses() {
    let modes = [
        "run",
        "daemon",
        "file",
        "sql",
        "values",
        "config",
        "pack",
        "parse",
        "version-query",
    ];
    for doc in DOCS {
        for block in blocks(doc) {
            let command_like = matches!(block.lang.as_str(), "sh" | "bash" | "console" | "sql");
            if command_like || !block.mode.is_empty() {
                assert!(
                    modes.contains(&block.mode.as_str()),
                    "{}: a {} block needs a `<!-- doc-test: MODE -->` comment (one of {modes:?}), found {:?}",
                    block.at(),
                    block.lang,
                    block.mode
                );
            }
            if block.mode == "parse" {
                assert!(
                    !block.args.is_empty(),
                    "{}: say why it cannot run",
                    block.at()
                );
                let output = Command::new("bash")
                    .arg("-n")
                    .arg("-c")
                    .arg(&block.text)
                    .output()
                    .expect("bash");
                assert!(
                    output.status.success(),
                    "{}: bash cannot parse it: {}",
                    block.at(),
                    String::from_utf8_lossy(&output.stderr)
                );
                for path in repository_paths(&block.text) {
                    let pattern = repo().join(&path);
                    let matches = glob::glob(&pattern.to_string_lossy())
                        .map(|m| m.count())
                        .unwrap_or(0);
                    assert!(matches > 0, "{}: {path} does not exist", block.at());
                }
            }
            if matches!(block.lang.as_str(), "sh" | "bash") {
                for args in deploywatch_command_lines(&block.text) {
                    if let Err(error) = parses(&args) {
                        panic!("{}: {args:?} does not parse:\n{error}", block.at());
                    }
                }
            }
        }
        for (line, span) in inline_commands(doc) {
            let args = synopsis_to_args(&span);
            if let Err(error) = parses(&args) {
                panic!("{doc}:{line}: `{span}` does not parse:\n{error}");
            }
        }
    }
}

/// Whether a command line parses with the real command-line definition (`--version` and
/// `--help` count as parsing).
fn parses(args: &[String]) -> Result<(), clap::Error> {
    match deploywatch::commands::cli::Cli::try_parse_from(args) {
        Ok(_) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelp
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Words of a shell block that name files of the repository.
fn repository_paths(text: &str) -> Vec<String> {
    let prefixes = ["config/", "deploy/", "docs/", "tests/"];
    let mut paths = Vec::new();
    for line in text.lines() {
        let code = line.split(" #").next().unwrap_or("");
        for word in code.split_whitespace() {
            let word = word.trim_matches(|c| c == '"' || c == '\'');
            let word = word.rsplit_once('=').map(|(_, v)| v).unwrap_or(word);
            if prefixes.iter().any(|p| word.starts_with(p)) {
                paths.push(word.trim_end_matches('/').to_string());
            }
        }
    }
    paths
}

/// The argument vectors of every `deploywatch` (or `cargo run ... --`) command in a shell block.
fn deploywatch_command_lines(text: &str) -> Vec<Vec<String>> {
    let joined = text.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let Some(words) = shlex::split(line) else {
            continue;
        };
        let words: Vec<String> = words
            .into_iter()
            .take_while(|w| !w.starts_with('#'))
            .collect();
        for segment in words.split(|w| ["&&", "||", "|", ";"].contains(&w.as_str())) {
            let mut rest: Vec<&String> = segment
                .iter()
                .skip_while(|w| w.as_str() == "sudo" || (w.contains('=') && !w.starts_with('-')))
                .collect();
            let Some(first) = rest.first() else { continue };
            let args: Vec<String> = if Path::new(first.as_str()).file_name()
                == Some(std::ffi::OsStr::new("deploywatch"))
            {
                rest.drain(1..).cloned().collect()
            } else if first.as_str() == "cargo" && rest.get(1).map(|w| w.as_str()) == Some("run") {
                match rest.iter().position(|w| w.as_str() == "--") {
                    Some(dash) => rest[dash + 1..].iter().map(|w| w.to_string()).collect(),
                    None => continue,
                }
            } else {
                continue;
            };
            let mut argv = vec!["deploywatch".to_string()];
            argv.extend(args);
            found.push(argv);
        }
    }
    found
}

/// Inline code spans that are deploywatch command lines, with their line numbers.
fn inline_commands(doc: &str) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(repo().join(doc)).expect("doc");
    let mut found = Vec::new();
    let mut in_block = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 1 && span.starts_with("deploywatch ") {
                found.push((n + 1, span.to_string()));
            }
        }
    }
    found
}

/// A command synopsis as the CLI table writes it (`[--target T]`, `table\|json`, `...`) turned
/// into one concrete command line.
fn synopsis_to_args(span: &str) -> Vec<String> {
    let placeholders: BTreeMap<&str, &str> = [
        ("ADDR", "127.0.0.1:9788"),
        ("ID", "1"),
        ("TIME", "2026-11-24T10:00:00Z"),
        ("N/M", "0/2"),
        ("...", "x"),
    ]
    .into_iter()
    .collect();
    span.replace("\\|", "|")
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '[' || c == ']'))
        .filter(|w| !w.is_empty())
        .map(|w| {
            let w = w.split('|').next().unwrap_or(w);
            placeholders.get(w).copied().unwrap_or(w).to_string()
        })
        .collect()
}

/// TOML blocks marked `config` load as a main configuration, `pack` ones as a check pack.
#[test]
fn configuration_examples_load() {
    for doc in DOCS {
        for block in blocks(doc) {
            if block.mode != "config" && block.mode != "pack" {
                continue;
            }
            let dir = common::ConfigDir::new();
            if block.mode == "config" {
                dir.add_shipped_pack("postgres.toml");
                dir.add_shipped_pack("cognit-3.7.0.toml");
                dir.write("deploywatch.toml", &block.text);
            } else {
                dir.write(
                    "deploywatch.toml",
                    "[[targets]]\nname = \"t\"\nhost = \"127.0.0.1\"\n",
                );
                dir.write("checks/example.toml", &block.text);
            }
            if let Err(error) = deploywatch::config::Config::load(&dir.main()) {
                panic!("{}: does not load:\n{error}", block.at());
            }
        }
    }
}

/// A copy of the repository's files (tracked and new, not ignored) in a scratch directory.
fn scratch_repository(into: &Path) -> PathBuf {
    let output = Command::new("git")
        .current_dir(repo())
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .expect("git ls-files");
    assert!(output.status.success(), "git ls-files failed");
    let root = into.join("deploywatch");
    for file in output.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let relative = PathBuf::from(String::from_utf8_lossy(file).into_owned());
        let from = repo().join(&relative);
        if !from.is_file() {
            continue;
        }
        let to = root.join(&relative);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&from, &to).expect("copy");
    }
    root
}

/// The bash script a document's runnable blocks make, in order.
fn script(doc: &str, values: &[(&str, String)], address: &str) -> String {
    let mut out = String::from(
        "set -euo pipefail\n\
         cd \"$DOCTEST_REPO\"\n\
         trap 'if [ -n \"${DOCTEST_DAEMON:-}\" ]; then kill \"$DOCTEST_DAEMON\" 2>/dev/null; wait \"$DOCTEST_DAEMON\" || true; fi' EXIT\n",
    );
    let mut saw_values = false;
    for block in blocks(doc) {
        let text = block.text.replace(DOCUMENTED_ADDRESS, address);
        let marker = format!("echo '>>> {}' >&2\n", block.at());
        match block.mode.as_str() {
            "values" => {
                saw_values = true;
                let documented: BTreeSet<String> = block
                    .text
                    .split_whitespace()
                    .filter_map(|w| w.split_once('=').map(|(k, _)| k.to_string()))
                    .filter(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                    .collect();
                let supplied: BTreeSet<String> =
                    values.iter().map(|(k, _)| k.to_string()).collect();
                assert_eq!(
                    documented,
                    supplied,
                    "{}: the values the reader sets",
                    block.at()
                );
                out.push_str(&marker);
                for (key, value) in values {
                    out.push_str(&format!(
                        "export {key}={}\n",
                        shlex::try_quote(value).expect("quote")
                    ));
                }
            }
            "run" => {
                out.push_str(&marker);
                match block.arg("dir") {
                    Some("repo") => out.push_str("cd \"$DOCTEST_REPO\"\n"),
                    Some(dir) => out.push_str(&format!("cd \"$DOCTEST_REPO/{dir}\"\n")),
                    None => {}
                }
                out.push_str(&text);
            }
            "daemon" => {
                let command: Vec<&str> = text
                    .lines()
                    .map(|l| l.split(" #").next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .collect();
                assert_eq!(command.len(), 1, "{}: one command", block.at());
                out.push_str(&marker);
                out.push_str(&format!(
                    "{} > \"$DOCTEST_LOGS/daemon.log\" 2>&1 &\nDOCTEST_DAEMON=$!\n\
                     for _ in $(seq 1 600); do curl -fsS -o /dev/null http://{address}/readyz && break; \
                     kill -0 \"$DOCTEST_DAEMON\" || break; sleep 0.1; done\n\
                     curl -fsS -o /dev/null http://{address}/readyz || {{ cat \"$DOCTEST_LOGS/daemon.log\" >&2; exit 1; }}\n",
                    command[0]
                ));
            }
            "file" => {
                let path = block.args.trim();
                assert!(!path.is_empty(), "{}: file needs a path", block.at());
                out.push_str(&marker);
                out.push_str(&format!(
                    "mkdir -p \"$(dirname {path})\"\ncat > {path} <<'DOCTEST_EOF'\n{text}DOCTEST_EOF\n"
                ));
            }
            "sql" => {
                out.push_str(&marker);
                let body = if block.args.contains("rollback") {
                    format!("BEGIN;\n{text}ROLLBACK;\n")
                } else {
                    text
                };
                out.push_str(&format!(
                    "psql -X -q -v ON_ERROR_STOP=1 <<'DOCTEST_SQL'\n{body}DOCTEST_SQL\n"
                ));
            }
            _ => {}
        }
    }
    if !values.is_empty() {
        assert!(saw_values, "{doc}: values supplied but no values block");
    }
    out
}

struct Ran {
    stdout: String,
    stderr: String,
}

/// Runs a document's script; panics with its output when a command fails.
fn run_document(doc: &str, cluster: &PgCluster, database: &str, values: &[(&str, String)]) -> Ran {
    let scratch = tempfile::tempdir().expect("tempdir");
    let root = scratch_repository(scratch.path());
    let home = scratch.path().join("home");
    let bin = scratch.path().join("bin");
    let logs = scratch.path().join("logs");
    for dir in [&home, &bin, &logs] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_deploywatch"), bin.join("deploywatch"))
        .expect("symlink");
    let address = format!("127.0.0.1:{}", free_port());
    // `{repo}` in a value stands for the scratch copy of the repository.
    let values: Vec<(&str, String)> = values
        .iter()
        .map(|(k, v)| (*k, v.replace("{repo}", &root.to_string_lossy())))
        .collect();
    let text = script(doc, &values, &address);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out_file = scratch.path().join("stdout");
    let err_file = scratch.path().join("stderr");
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(&text)
        .env("PATH", path)
        .env("HOME", &home)
        .env("DOCTEST_REPO", &root)
        .env("DOCTEST_LOGS", &logs)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", cluster.port().to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", database)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("DEPLOYWATCH_CONFIG")
        .env_remove("DEPLOYWATCH_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_file).expect("stdout file"))
        .stderr(std::fs::File::create(&err_file).expect("stderr file"));
    let mut child = command.spawn().expect("bash");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{doc}: the commands did not finish within 5 minutes:\n{}",
                std::fs::read_to_string(&err_file).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let ran = Ran {
        stdout: std::fs::read_to_string(&out_file).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_file).unwrap_or_default(),
    };
    assert!(
        status.success(),
        "{doc}: a command failed ({status}); the last block started is the last `>>>` line\n\
         --- stdout ---\n{}\n--- stderr ---\n{}\n--- daemon log ---\n{}",
        ran.stdout,
        ran.stderr,
        std::fs::read_to_string(logs.join("daemon.log")).unwrap_or_default()
    );
    ran
}

/// The README's commands, with the role it gives created in a database of the checklist's
/// application: that role can run every shipped check.
#[test]
fn the_readme_runs_and_its_role_can_run_every_shipped_check() {
    let cluster = common::bare_cluster();
    cognit_db(&cluster, "cognit", Version::V370);
    run_document("README.md", &cluster, "cognit", &[]);

    let dir = common::ConfigDir::new();
    dir.add_shipped_pack("postgres.toml");
    dir.add_shipped_pack("cognit-3.7.0.toml");
    dir.write(
        "deploywatch.toml",
        &format!(
            "[[targets]]\nname = \"cognit\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"cognit\"\nuser = \"deploywatch\"\n",
            cluster.port()
        ),
    );
    let output = dir.run(&["check", "--privileges"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the README's role cannot run every shipped check:\n{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_operations_guide_runs() {
    let cluster = common::bare_cluster();
    run_document("deploy/README.md", &cluster, "postgres", &[]);
}

#[test]
fn the_runbooks_queries_run_on_the_application_schema() {
    let cluster = common::bare_cluster();
    cognit_db(&cluster, "cognit", Version::V370);
    run_document("docs/runbooks.md", &cluster, "cognit", &[]);
}

/// The tutorial, from an empty server to a deployment recorded and reported.
#[test]
fn the_tutorial_runs_from_an_empty_server_to_a_reported_deployment() {
    let cluster = common::bare_cluster();
    let ran = run_document(
        "docs/getting-started.md",
        &cluster,
        "shop",
        &[
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", cluster.port().to_string()),
            ("PGDATABASE", "shop".to_string()),
            ("PGUSER", "postgres".to_string()),
            ("DEPLOYWATCH_SRC", "{repo}".to_string()),
            ("DEPLOYWATCH_SHOP_PASSWORD", "tutorial-password".to_string()),
            ("DEPLOYWATCH_API_TOKEN", "tutorial-token".to_string()),
        ],
    );
    println!("{}", ran.stdout);
    // `check` saw the Flyway version; the deployment was recorded and reported.
    assert!(ran.stdout.contains("schema version 2"), "{}", ran.stdout);
    assert!(
        ran.stdout.contains("deploywatch_up{target=\"shop\"} 1"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains("2 -> 3"), "{}", ran.stdout);
    assert!(!ran.stderr.contains("warning"), "{}", ran.stderr);
}

/// The tables the migration tools create on PostgreSQL, with the rows they write, and one more
/// migration (or a rollback) applied later.
struct Tool {
    name: &'static str,
    database: &'static str,
    schema: &'static str,
    version: &'static str,
    change: &'static str,
    changed_version: &'static str,
    kind: &'static str,
    /// A further change back, with the kind it must be recorded as.
    back: Option<(&'static str, &'static str)>,
}

const TOOLS: &[Tool] = &[
    Tool {
        name: "flyway",
        database: "flyway_app",
        schema: "CREATE TABLE flyway_schema_history (
                installed_rank integer NOT NULL PRIMARY KEY, version varchar(50),
                description varchar(200) NOT NULL, type varchar(20) NOT NULL,
                script varchar(1000) NOT NULL, checksum integer,
                installed_by varchar(100) NOT NULL, installed_on timestamp NOT NULL DEFAULT now(),
                execution_time integer NOT NULL, success boolean NOT NULL);
            CREATE INDEX flyway_schema_history_s_idx ON flyway_schema_history (success);
            INSERT INTO flyway_schema_history
                (installed_rank, version, description, type, script, checksum, installed_by, execution_time, success)
            VALUES (1, '1', 'init', 'SQL', 'V1__init.sql', 1, 'flyway', 10, true),
                   (2, '1.9', 'nine', 'SQL', 'V1_9__nine.sql', 2, 'flyway', 10, true),
                   (3, '1.10', 'ten', 'SQL', 'V1_10__ten.sql', 3, 'flyway', 10, true),
                   (4, NULL, 'views', 'SQL', 'R__views.sql', 4, 'flyway', 10, true),
                   (5, '1.11', 'broken', 'SQL', 'V1_11__broken.sql', 5, 'flyway', 10, false);",
        version: "1.10",
        change: "DELETE FROM flyway_schema_history WHERE installed_rank = 5;
            INSERT INTO flyway_schema_history
                (installed_rank, version, description, type, script, checksum, installed_by, execution_time, success)
            VALUES (5, '1.11', 'fixed', 'SQL', 'V1_11__fixed.sql', 6, 'flyway', 10, true);",
        changed_version: "1.11",
        kind: "deploy",
        back: None,
    },
    Tool {
        name: "rails",
        database: "rails_app",
        schema: "CREATE TABLE schema_migrations (version character varying NOT NULL PRIMARY KEY);
            CREATE TABLE ar_internal_metadata (key character varying NOT NULL PRIMARY KEY,
                value character varying, created_at timestamp(6) NOT NULL, updated_at timestamp(6) NOT NULL);
            INSERT INTO schema_migrations VALUES ('20231204093000'), ('20240101120000'), ('20240215093000');",
        version: "20240215093000",
        // db:rollback deletes the newest migration's row.
        change: "DELETE FROM schema_migrations WHERE version = '20240215093000';",
        changed_version: "20240101120000",
        kind: "rollback",
        back: None,
    },
    Tool {
        name: "alembic",
        database: "alembic_app",
        schema: "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL,
                CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num));
            INSERT INTO alembic_version (version_num) VALUES ('ae1027a6acf');",
        version: "ae1027a6acf",
        change: "UPDATE alembic_version SET version_num = '27c6a30d7c24' WHERE version_num = 'ae1027a6acf';",
        changed_version: "27c6a30d7c24",
        // Revision ids have no order: with version_order = "unordered" a new one is a deploy,
        // and `alembic downgrade -1` back to the one it replaced a rollback.
        kind: "deploy",
        back: Some((
            "UPDATE alembic_version SET version_num = 'ae1027a6acf';",
            "rollback",
        )),
    },
    Tool {
        name: "golang-migrate",
        database: "migrate_app",
        schema: "CREATE TABLE IF NOT EXISTS schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);
            INSERT INTO schema_migrations (version, dirty) VALUES (3, false);",
        version: "3",
        // What `migrate up` writes while migration 4 runs and fails halfway: version 4, dirty.
        change: "TRUNCATE schema_migrations; INSERT INTO schema_migrations (version, dirty) VALUES (4, true);",
        changed_version: "4",
        kind: "deploy",
        back: None,
    },
];

/// The documented version query of each migration tool, and the golang-migrate check, run on
/// the tables those tools create: `check` shows the version, and a daemon configured as the
/// documentation says records the next migration (or rollback) as a deployment of the right kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_queries_work_on_the_tables_their_tools_create() {
    let documented: BTreeMap<String, String> = blocks("docs/getting-started.md")
        .into_iter()
        .filter(|b| b.mode == "version-query")
        .map(|b| (b.args.clone(), b.text))
        .collect();
    let cluster = common::cluster();
    for tool in TOOLS {
        let block = documented.get(tool.name).unwrap_or_else(|| {
            panic!("docs/getting-started.md has no {} version query", tool.name)
        });
        cluster.create_database(tool.database).expect("database");
        cluster.psql(tool.database, tool.schema).expect("schema");
        // The block is either a `version_query = ...` line (for [deployments] or a target) or a
        // [deployments] table of its own.
        let parsed: toml::Table = toml::from_str(block).expect("toml");
        let deployments = match parsed.get("deployments") {
            Some(toml::Value::Table(table)) => table.clone(),
            _ => parsed,
        };
        let mut deployments = deployments;
        deployments.insert("sample_interval".into(), "1s".into());
        let mut config = toml::Table::new();
        config.insert("deployments".into(), toml::Value::Table(deployments));
        config.insert(
            "checks".into(),
            toml::Value::Table(toml::toml! { interval_override = "1s" }),
        );
        let dir = common::ConfigDir::new();
        let mut text = toml::to_string(&config).expect("toml");
        text.push_str(&common::target_toml(tool.name, &cluster, tool.database));
        if tool.name == "golang-migrate" {
            let check = documented
                .get("golang-migrate-check")
                .expect("the golang-migrate dirty check");
            dir.write(
                "checks/migrations.toml",
                &format!("[pack]\nname = \"migrations\"\n\n{check}"),
            );
        } else {
            dir.write(
                "checks/basic.toml",
                "[pack]\nname = \"basic\"\n\n[[check]]\nname = \"alive\"\ncategory = \"health\"\n\
                 severity = \"info\"\nsql = \"SELECT 1\"\nexpect = \"== 1\"\n",
            );
        }
        dir.write("deploywatch.toml", &text);
        watch_tool(tool, &cluster, &dir).await;
    }
}

/// The only target of the `/status` at `url`, once `read` finds in it what the test waits for.
async fn target_where<T>(
    url: &str,
    what: &str,
    seconds: u64,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> T {
    common::wait_for_json(url, what, Duration::from_secs(seconds), |json| {
        read(json["targets"].get(0)?)
    })
    .await
}

async fn watch_tool(tool: &Tool, cluster: &PgCluster, dir: &common::ConfigDir) {
    // `check` shows the version.
    let output = dir.run(&["check"]);
    let table = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}: {table}{stderr}", tool.name);
    assert!(!stderr.contains("warning"), "{}: {stderr}", tool.name);
    let header = table
        .lines()
        .find(|l| l.starts_with(&format!("target {} (", tool.name)))
        .unwrap_or_default();
    assert!(
        header.ends_with(&format!(", schema version {}", tool.version)),
        "{}: expected version {}:\n{table}",
        tool.name,
        tool.version
    );
    if tool.name == "golang-migrate" {
        assert!(table.contains("PASS    migration_dirty"), "{table}");
    }

    // The daemon sees the version, then each change as a deployment of the right kind.
    let port = free_port();
    let mut child = common::spawn_daemon(dir, port);
    let url = format!("http://127.0.0.1:{port}/status?format=json");
    target_where(
        &url,
        &format!("{}: version {} seen", tool.name, tool.version),
        60,
        |t| (t["schema_version"] == tool.version).then_some(()),
    )
    .await;
    let mut expected = vec![(tool.change, tool.version, tool.changed_version, tool.kind)];
    if let Some((sql, kind)) = tool.back {
        expected.push((sql, tool.changed_version, tool.version, kind));
    }
    for (sql, from, to, kind) in expected {
        cluster.psql(tool.database, sql).expect("migration");
        let deployment = target_where(
            &url,
            &format!("{}: {from} -> {to} recorded", tool.name),
            60,
            |t| (t["deployment"]["to_version"] == to).then(|| t["deployment"].clone()),
        )
        .await;
        assert_eq!(deployment["from_version"], from, "{}", tool.name);
        assert_eq!(deployment["detected_by"], "version_change", "{}", tool.name);
        assert_eq!(deployment["kind"], kind, "{}: {from} -> {to}", tool.name);
    }
    if tool.name == "golang-migrate" {
        // The dirty flag fails the documented check until the schema is fixed.
        let dirty = |status: &'static str| {
            move |t: &serde_json::Value| {
                let check = t["checks"]
                    .as_array()?
                    .iter()
                    .find(|c| c["name"] == "migration_dirty")?;
                (check["status"] == status).then(|| check.clone())
            }
        };
        target_where(&url, "migration_dirty fails", 30, dirty("fail")).await;
        cluster
            .psql(tool.database, "UPDATE schema_migrations SET dirty = false")
            .expect("migrate force");
        target_where(&url, "migration_dirty passes again", 30, dirty("pass")).await;
    }
    let _ = child.kill().await;
}

/// Reads `lines` into `log` until one contains `needle`: whether one did, within 60 s.
async fn log_until(
    lines: &mut tokio::io::Lines<impl tokio::io::AsyncBufRead + Unpin>,
    log: &mut String,
    needle: &str,
) -> Result<bool, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains(needle) {
                return true;
            }
        }
        false
    })
    .await
}

/// On a schema without the checklist's `database_metadata` table the default version query
/// cannot work: `check` says so (on standard error, so its report stays clean) and names what to
/// set, and the daemon logs it as a warning once, then that it works again once fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_version_query_on_a_foreign_schema_is_warned_about() {
    use tokio::io::AsyncBufReadExt;
    let cluster = common::cluster();
    cluster.create_database("shop").expect("database");
    cluster
        .psql("shop", "CREATE TABLE orders (order_id bigint PRIMARY KEY)")
        .expect("schema");
    let dir = common::ConfigDir::new();
    dir.write(
        "checks/basic.toml",
        "[pack]\nname = \"basic\"\n\n[[check]]\nname = \"orders_readable\"\ncategory = \"health\"\n\
         severity = \"info\"\nsql = \"SELECT count(*) FROM orders\"\nexpect = \">= 0\"\n",
    );
    dir.write(
        "deploywatch.toml",
        &format!(
            "[checks]\ninterval_override = \"1s\"\n[deployments]\nsample_interval = \"1s\"\n{}",
            common::target_toml("shop", &cluster, "shop")
        ),
    );

    let output = dir.run(&["check", "--format", "json"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the checks themselves pass:\n{stderr}"
    );
    serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("the report stays JSON");
    assert!(
        stderr.contains(
            "warning: target shop: the default version query reads the database_metadata table"
        ) && stderr.contains("does not exist")
            && stderr.contains("targets[].version_query"),
        "{stderr}"
    );

    let port = free_port();
    let mut child = common::spawn_daemon(&dir, port);
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut log = String::new();
    let found = log_until(
        &mut lines,
        &mut log,
        "the default version query reads the database_metadata table",
    )
    .await;
    assert_eq!(found, Ok(true), "the daemon warns:\n{log}");
    assert!(log.contains("WARN"), "{log}");
    // Several more passes over the same problem, then the table appears.
    common::wait_for_metrics(
        &format!("http://127.0.0.1:{port}"),
        "a few more passes",
        Duration::from_secs(60),
        |scrape| {
            (scrape
                .metric("deploywatch_check_runs_total")
                .label("check", "orders_readable")
                .value_opt()?
                >= 5.0)
                .then_some(())
        },
    )
    .await;
    cluster
        .psql(
            "shop",
            "CREATE TABLE database_metadata (key text PRIMARY KEY, value text);
             INSERT INTO database_metadata VALUES ('version', '1.0.0')",
        )
        .expect("metadata");
    let fixed = log_until(&mut lines, &mut log, "the version query works again").await;
    assert_eq!(fixed, Ok(true), "the daemon says it works again:\n{log}");
    assert_eq!(
        log.matches("the default version query reads").count(),
        1,
        "warned once, not on every pass:\n{log}"
    );
    let _ = child.kill().await;
}

//! Shared test support: a real PostgreSQL per test (via `deploywatch_testkit::pgcluster`), the cognit
//! fixture at a chosen version, configuration files pointing at it, an in-process daemon on a
//! free port, and small matchers over a real Prometheus exposition parse.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploywatch::config::Config;
use deploywatch::daemon::DaemonHandle;
use deploywatch_testkit::pgcluster::{ClusterOptions, PgCluster};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("testkit/fixtures/cognit").join(name)
}

/// The role deploywatch connects as in tests: what the README asks for (`pg_monitor`), plus
/// read access to every table (`pg_read_all_data`), and not a superuser.
pub const MONITOR_ROLE: &str = "deploywatch";

/// A throwaway PostgreSQL with the [`MONITOR_ROLE`]. Fails loudly (with the fix) when
/// PostgreSQL is not installed.
pub fn cluster() -> PgCluster {
    let cluster = bare_cluster();
    cluster
        .create_monitoring_role(MONITOR_ROLE)
        .expect("the monitoring role");
    cluster
}

/// A throwaway PostgreSQL with only its bootstrap superuser (for documents that create the
/// monitoring role themselves).
pub fn bare_cluster() -> PgCluster {
    let options = ClusterOptions {
        shared_preload_libraries: vec!["pg_stat_statements".to_string()],
        ..ClusterOptions::default()
    };
    match PgCluster::start(options) {
        Ok(cluster) => cluster,
        Err(error) => panic!("cannot start a test PostgreSQL: {error}"),
    }
}

/// A throwaway PostgreSQL for a test that needs query statistics: fails at once, saying why,
/// when pg_stat_statements could not be loaded (instead of timing out on a missing signal).
pub fn cluster_with_statements() -> PgCluster {
    let pg = cluster();
    assert!(
        pg.pg_stat_statements_available(),
        "this test needs pg_stat_statements, but the PostgreSQL in {} has no pg_stat_statements.so \
         in its module directory (`pg_config --pkglibdir`, or lib/postgresql or lib beside bin), \
         so it was not preloaded: install the contrib modules (Debian: postgresql-contrib)",
        pg.bindir().display()
    );
    pg
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Version {
    V360,
    V370,
}

/// A throwaway PostgreSQL (see [`cluster`]) whose database `cognit` holds the cognit
/// application at `version`.
pub fn cognit_cluster(version: Version) -> PgCluster {
    let pg = cluster();
    cognit_db(&pg, "cognit", version);
    pg
}

/// Creates database `name` holding the cognit application at `version` with generated data.
pub fn cognit_db(cluster: &PgCluster, name: &str, version: Version) {
    cognit_db_at(cluster, name, 1, version);
}

/// [`cognit_db`] with the data generated at `scale` (`cognit_generate(scale)`).
pub fn cognit_db_at(cluster: &PgCluster, name: &str, scale: u32, version: Version) {
    cluster.create_database(name).expect("create database");
    cluster
        .psql_file(name, &fixture("schema_3.6.0.sql"))
        .expect("schema 3.6.0");
    cluster
        .psql_file(name, &fixture("generate.sql"))
        .expect("generator");
    cluster
        .psql(name, &format!("SELECT cognit_generate({scale})"))
        .expect("generate data");
    if version == Version::V370 {
        migrate(cluster, name).expect("migration");
    }
}

pub fn migrate(
    cluster: &PgCluster,
    name: &str,
) -> Result<String, deploywatch_testkit::pgcluster::PgClusterError> {
    cluster.psql_file(name, &fixture("001_pragmatic_schema_fixes.sql"))
}

pub fn corrupt(cluster: &PgCluster, name: &str, script: &str) {
    cluster
        .psql_file(name, &fixture(&format!("corrupt/{script}.sql")))
        .unwrap_or_else(|e| panic!("corruption {script}: {e}"));
}

pub fn repair(cluster: &PgCluster, name: &str, script: &str) {
    cluster
        .psql_file(name, &fixture(&format!("repair/{script}.sql")))
        .unwrap_or_else(|e| panic!("repair {script}: {e}"));
}

/// Creates the databases `names` on `pg` in one psql run, each a copy of `template` if given.
pub fn create_databases(pg: &PgCluster, names: &[String], template: Option<&str>) {
    let template = template
        .map(|t| format!(" TEMPLATE {t}"))
        .unwrap_or_default();
    let script: String = names
        .iter()
        .map(|name| format!("CREATE DATABASE {name}{template};\n"))
        .collect();
    let file = tempfile::NamedTempFile::new().expect("script file");
    std::fs::write(file.path(), script).expect("script");
    pg.psql_file("postgres", file.path())
        .expect("create the databases");
}

/// The integrity checks of the shipped cognit pack.
pub const INTEGRITY_CHECKS: [&str; 5] = [
    "invalid_attention_score",
    "invalid_quality_score",
    "ai_suspected_without_quality_score",
    "orphaned_payments",
    "orphaned_submissions",
];

/// A directory with a main config file and (optionally) check packs.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
}

impl ConfigDir {
    /// Runs the deploywatch binary on this configuration with `args` and waits for it.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.command().args(args).output().expect("run deploywatch")
    }

    /// The deploywatch binary on this configuration (`--config` given), for more arguments.
    pub fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"));
        command.arg("--config").arg(self.main());
        command
    }

    /// [`ConfigDir::command`] as a child process of the async runtime.
    pub fn async_command(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploywatch"));
        command.arg("--config").arg(self.main());
        command
    }

    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("checks")).expect("checks dir");
        ConfigDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn main(&self) -> PathBuf {
        self.dir.path().join("deploywatch.toml")
    }

    pub fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(relative);
        std::fs::write(&path, text).expect("write config file");
        path
    }

    /// Copies one of the shipped packs into `checks/`.
    pub fn add_shipped_pack(&self, file: &str) {
        let text = std::fs::read_to_string(repo().join("config/checks").join(file)).expect("pack");
        self.write(&format!("checks/{file}"), &text);
    }

    pub fn load(&self) -> Config {
        match Config::load(&self.main()) {
            Ok(config) => config,
            Err(error) => panic!("config should load: {error}"),
        }
    }
}

/// Settings for a daemon under test: every check every second, short timeouts, no
/// deployment sampling. A main file starts with them and adds its targets.
pub const FAST: &str = "[defaults]\ninterval = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n\n[checks]\ninterval_override = \"1s\"\n\n[deployments]\nenabled = false\n\n";

/// [`FAST`] with another check timeout.
pub fn fast_with_timeout(timeout: &str) -> String {
    FAST.replace("timeout = \"2s\"", &format!("timeout = \"{timeout}\""))
}

/// Writes the main file of an [`app_with_checks`] configuration: `settings`, then the target
/// `db` on database `app` followed by `target_keys` (more keys of that target).
pub fn write_app_config(dir: &ConfigDir, pg: &PgCluster, settings: &str, target_keys: &str) {
    dir.write(
        "deploywatch.toml",
        &format!("{settings}{}{target_keys}", target_toml("db", pg, "app")),
    );
}

/// A check pack `name` of `checks`: (check name, its further TOML lines), each a critical
/// health check.
pub fn pack(name: &str, checks: &[(impl AsRef<str>, impl AsRef<str>)]) -> String {
    let mut text = format!("[pack]\nname = \"{name}\"\n");
    for (check, extra) in checks {
        let (check, extra) = (check.as_ref(), extra.as_ref());
        text.push_str(&format!(
            "\n[[check]]\nname = \"{check}\"\ncategory = \"health\"\nseverity = \"critical\"\n{extra}\n"
        ));
    }
    text
}

/// A test cluster with an empty database `app`, and a configuration directory whose check
/// pack `checks/p.toml` holds `checks` (see [`pack`]); the test writes the main file.
pub fn app_with_checks(checks: &[(impl AsRef<str>, impl AsRef<str>)]) -> (PgCluster, ConfigDir) {
    let pg = cluster();
    pg.create_database("app").expect("db");
    let dir = ConfigDir::new();
    dir.write("checks/p.toml", &pack("p", checks));
    (pg, dir)
}

/// An [`app_with_checks`] configuration whose main file [`write_app_config`] writes, and the
/// daemon on it.
pub async fn start_app(
    checks: &[(impl AsRef<str>, impl AsRef<str>)],
    settings: &str,
    target_keys: &str,
) -> (PgCluster, ConfigDir, DaemonHandle) {
    let (pg, dir) = app_with_checks(checks);
    write_app_config(&dir, &pg, settings, target_keys);
    let handle = start(&dir).await;
    (pg, dir, handle)
}

/// The daemon in this process on `dir`'s configuration, listening on a free port.
pub async fn start(dir: &ConfigDir) -> DaemonHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    deploywatch::daemon::start(dir.load(), listener).expect("daemon starts")
}

/// `http://ADDRESS` of an in-process daemon.
pub fn base(handle: &DaemonHandle) -> String {
    format!("http://{}", handle.local_addr)
}

/// The daemon's `/metrics`, parsed; panics unless it answers 200.
pub async fn scrape(handle: &DaemonHandle) -> Scrape {
    let (code, body) = get(&format!("{}/metrics", base(handle))).await;
    assert_eq!(code, 200);
    parse_metrics(&body)
}

/// Waits until the daemon's `/readyz` answers 200.
pub async fn wait_ready(handle: &DaemonHandle) {
    let url = format!("{}/readyz", base(handle));
    wait_until_ok(&url, "readyz", Duration::from_secs(30)).await;
}

/// Waits until `url` answers 200.
pub async fn wait_until_ok(url: &str, what: &str, deadline: Duration) {
    wait_for_answer(url, what, deadline, |code, _| (code == 200).then_some(())).await;
}

/// A `[[targets]]` entry for a database of a test cluster.
pub fn target_toml(name: &str, cluster: &PgCluster, db: &str) -> String {
    format!(
        "[[targets]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"{db}\"\nuser = \"{MONITOR_ROLE}\"\n",
        cluster.port()
    )
}

/// A port nothing listens on right now (for servers a test starts and for closed ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// The first target name `app0`, `app1`, … that shard `shard` of `count` owns.
pub fn name_in_shard(shard: u32, count: u32) -> String {
    (0..)
        .map(|i| format!("app{i}"))
        .find(|name| deploywatch::shard::shard_of(name, count) == shard)
        .expect("a name")
}

/// A `[[targets]]` entry named `name` for a database on `port` of 127.0.0.1 (often a closed one).
pub fn target_on_port(name: &str, port: u16) -> String {
    format!("[[targets]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"x\"\nuser = \"deploywatch\"\n")
}

/// A `deploywatch.toml` of a replica: `server` (the `[server]` table's lines), a 1 s connect
/// timeout and a [`target_on_port`] for each of `names`.
pub fn replica_config(server: &str, port: u16, names: &[&str]) -> String {
    let targets: String = names.iter().map(|n| target_on_port(n, port)).collect();
    format!("[server]\n{server}\n[defaults]\nconnect_timeout = \"1s\"\n\n{targets}")
}

/// An HTTP GET against the daemon; returns status code and body.
pub async fn get(url: &str) -> (u16, String) {
    get_as(url, "*/*").await
}

/// GET `url` asking for `accept`; panics when no answer comes.
pub async fn get_as(url: &str, accept: &str) -> (u16, String) {
    let (code, body) =
        deploywatch::commands::client::request(hyper::Method::GET, url, accept, None, None)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (code.as_u16(), body)
}

pub use deploywatch_testkit::wait::wait_until;

/// Polls `url` until `read` finds in an answer (status code, body) what the test waits for;
/// what `read` returned. No answer at all counts as not yet.
pub async fn wait_for_answer<T>(
    url: &str,
    what: &str,
    deadline: Duration,
    read: impl Fn(u16, &str) -> Option<T>,
) -> T {
    let read = &read;
    wait_until(what, deadline, || async move {
        let (code, body) = get_or_none(url).await?;
        read(code, &body)
    })
    .await
}

/// Polls the `/metrics` of the daemon at `base` (`http://ADDRESS`) until `read` finds in a
/// scrape what the test waits for; what `read` returned. A scrape that gets no answer, or not
/// 200, counts as not yet.
pub async fn wait_for_metrics<T>(
    base: &str,
    what: &str,
    deadline: Duration,
    read: impl Fn(&Scrape) -> Option<T>,
) -> T {
    let url = format!("{base}/metrics");
    wait_for_answer(&url, what, deadline, |code, body| {
        (code == 200)
            .then(|| parse_metrics(body))
            .and_then(|m| read(&m))
    })
    .await
}

/// The `/metrics` of the daemon at `base` (`http://ADDRESS`), parsed; `None` when it gets no
/// answer or not 200.
pub async fn scrape_at(base: &str) -> Option<Scrape> {
    let (code, body) = get_or_none(&format!("{base}/metrics")).await?;
    (code == 200).then(|| parse_metrics(&body))
}

/// Polls the JSON document at `url` (`/status`…) until `read` finds in it what the test waits
/// for; what `read` returned. No answer, not a success or not JSON counts as not yet.
pub async fn wait_for_json<T>(
    url: &str,
    what: &str,
    deadline: Duration,
    read: impl Fn(&serde_json::Value) -> Option<T>,
) -> T {
    wait_for_answer(url, what, deadline, |code, body| {
        let json = serde_json::from_str((200..300).contains(&code).then_some(body)?).ok()?;
        read(&json)
    })
    .await
}

/// A parsed Prometheus scrape with small matchers.
pub struct Scrape(pub prometheus_parse::Scrape);

pub fn parse_metrics(text: &str) -> Scrape {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    Scrape(prometheus_parse::Scrape::parse(lines).expect("valid exposition format"))
}

pub struct Query<'a> {
    scrape: &'a Scrape,
    name: String,
    labels: Vec<(String, String)>,
}

impl Scrape {
    pub fn metric(&self, name: &str) -> Query<'_> {
        Query {
            scrape: self,
            name: name.to_string(),
            labels: Vec::new(),
        }
    }

    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.0.samples.iter().map(|s| s.metric.clone()).collect()
    }
}

impl<'a> Query<'a> {
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    pub fn samples(&self) -> Vec<&'a prometheus_parse::Sample> {
        self.scrape
            .0
            .samples
            .iter()
            .filter(|s| s.metric == self.name)
            .filter(|s| {
                self.labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).map(|x| x == v).unwrap_or(false))
            })
            .collect()
    }

    /// The single matching sample's value; panics if there is not exactly one.
    pub fn value(&self) -> f64 {
        let samples = self.samples();
        assert_eq!(
            samples.len(),
            1,
            "expected one sample of {}{:?}, found {}",
            self.name,
            self.labels,
            samples.len()
        );
        match samples[0].value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("unexpected sample type"),
        }
    }

    pub fn value_opt(&self) -> Option<f64> {
        (self.samples().len() == 1).then(|| self.value())
    }

    /// The sum of the matching counters (0 when none matches).
    pub fn sum(&self) -> f64 {
        self.samples()
            .iter()
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    }

    /// Each matching sample's `key` label and value, by that label.
    pub fn by_label(&self, key: &str) -> Vec<(String, f64)> {
        let mut values: Vec<(String, f64)> = self
            .samples()
            .iter()
            .filter_map(|s| {
                let value = match s.value {
                    prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                    _ => return None,
                };
                Some((s.labels.get(key)?.to_string(), value))
            })
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        values
    }
}

/// Everything a command wrote: its standard output, then its standard error.
pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The standard output of a command that must have succeeded (its output shown if not).
pub fn succeeded(output: &std::process::Output) -> String {
    exit_stdout(output, 0)
}

/// The standard output of a command that must have exited with `code` (its output shown if
/// not).
pub fn exit_stdout(output: &std::process::Output, code: i32) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Everything a command that must have exited with `code` wrote (see [`output_text`]).
pub fn exit_text(output: &std::process::Output, code: i32) -> String {
    let text = output_text(output);
    assert_eq!(output.status.code(), Some(code), "{text}");
    text
}

/// The JSON document at `url` (`/status`, `/api/deployments`…), or `None` while there is
/// none: no answer, not a success, or not JSON.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    let (code, body) = deploywatch::commands::client::get(url, "application/json")
        .await
        .ok()?;
    code.is_success().then_some(())?;
    serde_json::from_str(&body).ok()
}

/// A GET that answers `None` instead of panicking when nothing answers.
pub async fn get_or_none(url: &str) -> Option<(u16, String)> {
    let answer = deploywatch::commands::client::get(url, "*/*").await;
    answer.ok().map(|(code, body)| (code.as_u16(), body))
}

/// Waits until `count` of the daemon's sessions on `pg` are running a statement like `like`
/// (an SQL `LIKE` pattern), for at most `deadline`.
pub async fn wait_for_queries(pg: &PgCluster, like: &str, count: usize, deadline: Duration) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deploywatch' \
         AND query LIKE '{like}' AND state = 'active'"
    );
    let (sql, expected) = (&sql, count.to_string());
    let expected = &expected;
    wait_until(
        &format!("{count} deploywatch queries like {like} running"),
        deadline,
        || async move { (pg.psql("postgres", sql).ok()?.trim() == expected).then_some(()) },
    )
    .await;
}

/// `deploywatch run` as a process of its own (for signals), its stderr captured.
pub fn spawn_daemon(dir: &ConfigDir, port: u16) -> tokio::process::Child {
    spawn_daemon_with(dir, port, &[])
}

/// [`spawn_daemon`] with global options (`--log-format json`…) before `run`.
pub fn spawn_daemon_with(dir: &ConfigDir, port: u16, options: &[&str]) -> tokio::process::Child {
    spawn_run(dir, options, &["--listen", &format!("127.0.0.1:{port}")])
}

/// `deploywatch OPTIONS run RUN_ARGS` on `dir` as a process of its own, its stderr captured,
/// killed when dropped.
pub fn spawn_run(dir: &ConfigDir, options: &[&str], run_args: &[&str]) -> tokio::process::Child {
    dir.async_command()
        .args(options)
        .arg("run")
        .args(run_args)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn daemon")
}

/// Sends `signal` (`-HUP`, `-TERM`…) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// SIGTERM to a daemon process; its exit status, which must come within `limit`.
pub async fn terminate(
    child: &mut tokio::process::Child,
    limit: Duration,
) -> std::process::ExitStatus {
    signal(child.id().expect("pid"), "-TERM");
    tokio::time::timeout(limit, child.wait())
        .await
        .expect("exits")
        .expect("wait")
}

/// Everything the process wrote to stderr (once it has exited).
pub async fn stderr_of(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    stderr
}

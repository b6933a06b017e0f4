//! Configuration: the main file (`config/deploywatch.toml`) with `DEPLOYWATCH_<SECTION>__<KEY>`
//! environment overrides, and the check packs it names.
//!
//! Loading happens in two stages. The files are first deserialized into raw structs that mirror
//! them (unknown keys are refused), then converted into a validated [`Config`] while every problem
//! is collected with the file and key it belongs to. Nothing connects to a database here.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub(crate) mod databases;
pub(crate) mod packs;
pub(crate) mod web;

use crate::analysis::deployment::VersionOrder;
use crate::analysis::judging;
use crate::analysis::regression::{NewStatementThresholds, Thresholds};
use crate::analysis::window::WindowDurations;
use crate::checks::incremental::SweepBudget;
use crate::config::databases::Discovery;
use crate::config::packs::{CheckSpec, Pack};
use crate::postgres::target::{ConnectionParts, ConnectionSettings, PasswordSource};
use crate::shard::Shard;

/// Default address of the HTTP server. 9788 is not used by any well-known exporter.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:9788";

/// The sections an environment override may address (`DEPLOYWATCH_SERVER__LISTEN`). Other
/// `DEPLOYWATCH_*` variables are left alone: they commonly hold passwords named by `password_env`.
const ENV_SECTIONS: &[&str] = &["server", "defaults", "checks", "store", "deployments"];

/// One thing wrong with the configuration: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: PathBuf,
    pub key: String,
    pub message: String,
    /// The `DEPLOYWATCH_<SECTION>__<KEY>` variable the value came from, when it did.
    pub(crate) variable: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(variable) = &self.variable {
            write!(
                f,
                "environment variable {variable} (overrides {}): {}",
                self.key, self.message
            )
        } else if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(problems) => problems,
        }
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collects problems while a configuration is validated.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn push(&mut self, file: &Path, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_path_buf(),
            key: key.into(),
            message: message.into(),
            variable: None,
        });
    }

    /// The problems of one file, for reading its optional values.
    pub(crate) fn in_file<'a>(&'a mut self, file: &'a Path) -> InFile<'a> {
        InFile {
            problems: self,
            file,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw form: exactly what the file says.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    checks: RawChecks,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    deployments: RawDeployments,
    #[serde(default)]
    targets: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    shutdown_grace: Option<String>,
    api_token_env: Option<String>,
    api_token_file: Option<PathBuf>,
    web_config_file: Option<PathBuf>,
    shard: Option<String>,
    shard_peers: Option<Vec<String>>,
    shard_peers_ca_file: Option<PathBuf>,
    max_concurrent_scrapes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    interval: Option<String>,
    timeout: Option<String>,
    lock_timeout: Option<String>,
    connect_timeout: Option<String>,
    max_connections_per_target: Option<i64>,
    max_connections_per_server: Option<i64>,
    server_connection_share: Option<f64>,
    max_series: Option<i64>,
    discovery_interval: Option<String>,
    sweep_period: Option<String>,
    sweep_max_rows: Option<i64>,
    sweep_max_time: Option<String>,
    early_sweep_watch: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChecks {
    files: Option<Vec<String>>,
    interval_override: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    path: Option<PathBuf>,
    url: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployments {
    enabled: Option<bool>,
    sample_interval: Option<String>,
    baseline_span: Option<String>,
    min_baseline_samples: Option<i64>,
    min_window_samples: Option<i64>,
    version_query: Option<String>,
    first_hour: Option<String>,
    first_day: Option<String>,
    first_week: Option<String>,
    latency_min_increase: Option<f64>,
    latency_min_calls: Option<i64>,
    latency_min_window_samples: Option<i64>,
    latency_p_value: Option<f64>,
    latency_min_delta_ms: Option<f64>,
    new_statement_min_ms_per_second: Option<f64>,
    new_statement_min_share: Option<f64>,
    new_statement_min_ms_per_call: Option<f64>,
    version_order: Option<String>,
    #[serde(default)]
    declared: Vec<RawDeclaredDeployment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeclaredDeployment {
    target: String,
    version: String,
    at: String,
    note: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Option<String>,
    url: Option<String>,
    host: Option<String>,
    port: Option<i64>,
    dbname: Option<String>,
    user: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    max_connections: Option<i64>,
    packs: Option<Vec<String>>,
    #[serde(default)]
    parameters: BTreeMap<String, toml::Value>,
    version_query: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
    /// Whether sessions may be opened as a superuser.
    allow_superuser: Option<bool>,
    /// Glob patterns: the target stands for every matching database of its server.
    databases: Option<Vec<String>>,
    exclude_databases: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------------------------
// Validated form.
// ---------------------------------------------------------------------------------------------

/// The validated configuration the daemon and the CLI run on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The main file it was loaded from, for reloads and messages.
    pub(crate) source: PathBuf,
    pub server: ServerConfig,
    pub(crate) defaults: Defaults,
    pub store: StoreConfig,
    pub(crate) deployments: DeploymentConfig,
    pub targets: Vec<TargetConfig>,
    /// Every pack that was loaded, in load order.
    pub(crate) packs: Vec<Arc<Pack>>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub(crate) shutdown_grace: Duration,
    /// Where the bearer token for `POST /api/deployments` comes from. Without one, the
    /// endpoint refuses every request.
    pub(crate) api_token: Option<PasswordSource>,
    /// TLS and basic authentication of the endpoints (exporter-toolkit format).
    pub(crate) web_config_file: Option<PathBuf>,
    /// This replica's part of a split fleet (`0/1`, the whole fleet, by default).
    pub shard: Shard,
    /// The base URL of every replica, by shard index (empty: announcements for another
    /// shard's targets are refused with the owner's shard instead of forwarded).
    pub shard_peers: Vec<String>,
    /// Certificates (PEM) that `https://` peers' certificates may be signed by, besides the
    /// system's roots.
    pub(crate) shard_peers_ca_file: Option<PathBuf>,
    /// How many `/metrics` requests are written at once; more wait briefly, then get 503.
    pub(crate) max_concurrent_scrapes: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Defaults {
    pub(crate) interval: Duration,
    /// Runs every check at this interval whatever its pack says (demos, tests, drills).
    pub(crate) interval_override: Option<Duration>,
    pub(crate) timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_connections_per_target: usize,
    /// Sessions to one server (host and port), all its targets and databases together.
    pub(crate) max_connections_per_server: usize,
    /// Share of the server's `max_connections` (minus reserved connections) deploywatch may
    /// take, whatever `max_connections_per_server` says.
    pub(crate) server_connection_share: f64,
    pub(crate) max_series: usize,
    /// How often targets with `databases` patterns ask their server again.
    pub(crate) discovery_interval: Duration,
    /// Incremental checks' sweep budget where a check sets none.
    pub(crate) sweep: SweepBudget,
    /// Incremental checks: how often the statistics of their tables are read between runs, a
    /// change that calls for an early sweep running the check at once; `None`: only at runs.
    pub(crate) early_sweep_watch: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `None` keeps deployment state in memory only (no baseline survives a restart).
    pub path: Option<PathBuf>,
    /// A PostgreSQL store shared by replicas (`postgres://…`, no password in it), instead of
    /// the file.
    pub url: Option<String>,
    /// Where the PostgreSQL store's password comes from.
    pub password: Option<PasswordSource>,
    pub(crate) retention: Duration,
    /// Set by `run --reset-store`, never by a file: an existing file that is not a valid
    /// store is moved aside and an empty store started instead of refusing to start.
    pub reset_invalid: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct DeploymentConfig {
    pub(crate) enabled: bool,
    pub(crate) sample_interval: Duration,
    pub(crate) baseline_span: Duration,
    /// The windows, the samples they need and the rules' thresholds.
    pub(crate) judging: judging::Settings,
    /// How versions order, which tells a deployment from a rollback.
    pub(crate) version_order: VersionOrder,
    pub(crate) declared: Vec<DeclaredDeployment>,
}

#[derive(Debug, Clone)]
pub(crate) struct DeclaredDeployment {
    pub(crate) target: String,
    pub(crate) version: String,
    /// Unix seconds.
    pub(crate) at: f64,
    pub(crate) note: Option<String>,
}

/// One database deploywatch watches, with the checks resolved for it.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub connection: ConnectionSettings,
    pub(crate) max_connections: usize,
    pub(crate) version_query: String,
    pub checks: Vec<Arc<CheckSpec>>,
    /// `Some` for a template that stands for the matching databases of its server; see
    /// [`crate::postgres::discovery`].
    pub(crate) discover: Option<Discovery>,
}

pub(crate) const DEFAULT_VERSION_QUERY: &str =
    "SELECT value FROM database_metadata WHERE key = 'version'";

impl Config {
    /// Loads and validates the main file, its environment overrides and every check pack it
    /// names. Every problem found is reported at once.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut problems = Problems::default();
        let raw = read_raw(path, env.iter().cloned(), &mut problems);
        let config = raw.and_then(|raw| validate(path, raw, &mut problems));
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => {
                // A value that came from an environment variable is that variable's fault.
                let overridden = env_overrides(&env);
                let mut problems = problems.0;
                for problem in &mut problems {
                    let key = problem.key.to_ascii_lowercase();
                    problem.variable = overridden
                        .iter()
                        .find(|(path_key, _)| {
                            key == *path_key
                                || key.starts_with(&format!("{path_key}."))
                                || key.starts_with(&format!("{path_key}["))
                        })
                        .map(|(_, variable)| variable.clone());
                }
                Err(ConfigError::Invalid(problems))
            }
        }
    }

    /// Where the daemon of the configuration at `path` listens and whether it serves HTTPS, read
    /// from `[server]` alone (with the environment's overrides) for the CLI commands that ask
    /// it: they need neither the checks nor the web configuration's key, which their user may
    /// not be able to read. `None` when the file cannot be read or its listen address parsed.
    pub fn daemon_endpoint(path: &Path) -> Option<(SocketAddr, bool)> {
        let raw = read_raw(path, std::env::vars(), &mut Problems::default())?;
        let listen = raw
            .server
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_LISTEN)
            .parse()
            .ok()?;
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = raw
            .server
            .web_config_file
            .is_some_and(|file| web::serves_tls(&base.join(file)));
        Some((listen, tls))
    }

    pub(crate) fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Applies what the command line says over what the file says (`run --shard`), then
    /// checks that the peers listed are one per shard of the shard the daemon will run.
    pub fn apply_overrides(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        let shard = overrides.shard.unwrap_or(self.server.shard);
        check_peer_count(shard, &self.server.shard_peers).map_err(|message| {
            let from = match overrides.shard {
                Some(shard) => format!(" (--shard {shard})"),
                None => String::new(),
            };
            ConfigError::Invalid(vec![Problem {
                file: self.source.clone(),
                key: "server.shard_peers".to_string(),
                message: format!("{message}{from}"),
                variable: None,
            }])
        })?;
        self.server.shard = shard;
        Ok(())
    }

    /// Keeps only the targets this replica's shard owns, by name. Applied after discovery,
    /// which every replica runs on every template, so the databases a template finds are
    /// assigned one by one; a template itself (shown while its server cannot be asked) is
    /// kept by the shard that owns its name, so its failure shows once.
    pub(crate) fn retain_owned(&mut self) {
        let shard = self.server.shard;
        self.targets.retain(|target| shard.owns(&target.name));
    }
}

/// Settings of `deploywatch run`'s command line. They win over the file, on every (re)load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--shard N/M`.
    pub shard: Option<Shard>,
}

/// A peer is a replica's base URL: HTTP or HTTPS, no credentials in it (they would show in
/// errors and logs; the caller's bearer token is passed on), nothing after the address.
fn check_peer_url(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|error| format!("{text:?} is not a URL: {error}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "{text:?}: only http:// and https:// peers are supported"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "a peer's URL holds no user or password (the caller's bearer token is passed on): {}://{}",
            url.scheme(),
            url.host_str().unwrap_or_default()
        ));
    }
    if url.host_str().is_none() || url.path() != "/" || url.query().is_some() {
        return Err(format!(
            "{text:?} must be a replica's base URL, e.g. \"http://deploywatch-0.deploywatch:9788\""
        ));
    }
    Ok(())
}

fn check_peer_count(shard: Shard, peers: &[String]) -> Result<(), String> {
    if peers.is_empty() || peers.len() == shard.count as usize {
        Ok(())
    } else if !shard.is_split() {
        Err(format!(
            "lists {count} replicas, but this replica has no shard: give it one with --shard N/{count}, DEPLOYWATCH_SHARD or server.shard",
            count = peers.len()
        ))
    } else {
        Err(format!(
            "lists {} replicas, but the fleet is split into {} shards: give one URL per shard, in shard order",
            peers.len(),
            shard.count
        ))
    }
}

/// The keys the `DEPLOYWATCH_<SECTION>__<KEY>` variables set (`defaults.timeout`), with the
/// variable's name.
fn env_overrides(env: &[(String, String)]) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix("DEPLOYWATCH_")?;
            let section = rest.split("__").next()?.to_ascii_lowercase();
            (ENV_SECTIONS.contains(&section.as_str()) && rest.contains("__")).then(|| {
                (
                    rest.split("__")
                        .map(str::to_ascii_lowercase)
                        .collect::<Vec<_>>()
                        .join("."),
                    name.clone(),
                )
            })
        })
        .collect()
}

fn read_raw(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Problems,
) -> Option<RawConfig> {
    if !path.is_file() {
        problems.push(path, "", "configuration file not found");
        return None;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            problems.push(path, "", format!("cannot read the file: {error}"));
            return None;
        }
    };
    let mut table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(error) => {
            problems.push(path, "", error.to_string().trim_end().to_string());
            return None;
        }
    };
    overlay_environment(&mut table, env);
    let value = match serde_json::to_value(&table) {
        Ok(value) => value,
        Err(error) => {
            problems.push(path, "", error.to_string());
            return None;
        }
    };
    deserialize_all_unknown(path, value, problems)
}

/// Applies `DEPLOYWATCH_<SECTION>__<KEY>[__<KEY>...]` variables to the file's table. A key
/// matches an existing key of the file regardless of case (so `..__EXPECTEDVERSION` overrides a
/// parameter written `expectedVersion`: keys keep their case); a new key is taken in lower
/// case. The value is read as a TOML literal when it is one (`3`, `true`, `["a", "b"]`), else
/// as a string. A variable that would set a key inside a value that is not a table is ignored
/// here and reported by validation, which names the variable.
fn overlay_environment(table: &mut toml::Table, env: impl IntoIterator<Item = (String, String)>) {
    let mut variables: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| {
            name.strip_prefix("DEPLOYWATCH_").is_some_and(|rest| {
                let section = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
                rest.contains("__") && ENV_SECTIONS.contains(&section.as_str())
            })
        })
        .collect();
    variables.sort();
    for (name, value) in variables {
        let parts: Vec<&str> = name["DEPLOYWATCH_".len()..].split("__").collect();
        if parts.iter().all(|part| !part.is_empty()) {
            set_path(table, &parts, env_value(&value));
        }
    }
}

/// Sets `value` at the key path `parts`, each matched to an existing key regardless of case,
/// creating tables on the way; false when a key on the way is not a table.
fn set_path(table: &mut toml::Table, parts: &[&str], value: toml::Value) -> bool {
    let key = existing_key(table, parts[0]);
    if parts.len() == 1 {
        table.insert(key, value);
        return true;
    }
    match table
        .entry(key)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(inner) => set_path(inner, &parts[1..], value),
        _ => false,
    }
}

fn existing_key(table: &toml::Table, part: &str) -> String {
    table
        .keys()
        .find(|key| key.eq_ignore_ascii_case(part))
        .cloned()
        .unwrap_or_else(|| part.to_ascii_lowercase())
}

fn env_value(text: &str) -> toml::Value {
    format!("value = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Deserializes `value`, reporting every unknown key rather than stopping at the first: each one
/// found is reported and taken out, and deserializing starts again, so the validation that
/// follows still reports the file's other problems.
pub(crate) fn deserialize_all_unknown<T: serde::de::DeserializeOwned>(
    file: &Path,
    mut value: serde_json::Value,
    problems: &mut Problems,
) -> Option<T> {
    // Bounded: every round removes one key.
    for _ in 0..1000 {
        let error = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(parsed) => return Some(parsed),
            Err(error) => error,
        };
        let key = error.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let message = error.inner().to_string();
        let segments: Vec<&serde_path_to_error::Segment> = error.path().iter().collect();
        let removed = message.starts_with("unknown field")
            && segments
                .split_last()
                .is_some_and(|(last, parents)| remove_key(&mut value, parents, last));
        problems.push(file, key, message);
        if !removed {
            return None;
        }
    }
    None
}

/// Removes the key `last` from the object at `parents` in `value`.
fn remove_key(
    value: &mut serde_json::Value,
    parents: &[&serde_path_to_error::Segment],
    last: &serde_path_to_error::Segment,
) -> bool {
    use serde_path_to_error::Segment;
    let mut node = value;
    for segment in parents {
        let next = match (segment, node) {
            (Segment::Seq { index }, serde_json::Value::Array(items)) => items.get_mut(*index),
            (Segment::Map { key }, serde_json::Value::Object(map)) => map.get_mut(key),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (last, node) {
        (Segment::Map { key }, serde_json::Value::Object(map)) => map.remove(key).is_some(),
        _ => false,
    }
}

/// Reads one file's optional values into typed ones: an absent value is the default, and a bad
/// one is the default with a problem noted under its key.
pub(crate) struct InFile<'a> {
    problems: &'a mut Problems,
    file: &'a Path,
}

impl InFile<'_> {
    pub(crate) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(self.file, key, message);
    }

    /// A duration above zero.
    pub(crate) fn duration(
        &mut self,
        key: &str,
        value: &Option<String>,
        default: Duration,
    ) -> Duration {
        let Some(text) = value else { return default };
        match crate::time::parse_duration(text) {
            Ok(duration) if !duration.is_zero() => duration,
            Ok(_) => {
                self.problems
                    .push(self.file, key, "duration must be greater than zero");
                default
            }
            Err(error) => {
                let message = format!(
                    "invalid duration {text:?} ({error}); write e.g. \"30s\", \"5m\", \"1h\""
                );
                self.problems.push(self.file, key, message);
                default
            }
        }
    }

    /// A secret read from an environment variable (`<key>_env`) or a file (`<key>_file`,
    /// relative to `base`), never both.
    pub(crate) fn secret(
        &mut self,
        key: &str,
        env: Option<String>,
        file: Option<PathBuf>,
        base: &Path,
    ) -> Option<PasswordSource> {
        match (env, file) {
            (Some(_), Some(_)) => {
                let name = key.rsplit('.').next().unwrap_or(key);
                self.push(
                    format!("{key}_env"),
                    format!("give {name}_env or {name}_file, not both"),
                );
                None
            }
            (Some(var), None) => Some(PasswordSource::Env(var)),
            (None, Some(file)) => Some(PasswordSource::File(base.join(file))),
            (None, None) => None,
        }
    }

    /// A count of at least 1.
    pub(crate) fn positive(&mut self, key: &str, value: Option<i64>, default: usize) -> usize {
        match value {
            None => default,
            Some(v) if v >= 1 => usize::try_from(v).unwrap_or(default),
            Some(v) => {
                self.problems
                    .push(self.file, key, format!("must be at least 1, found {v}"));
                default
            }
        }
    }

    /// A share: above zero, at most 1.
    pub(crate) fn share(&mut self, key: &str, value: Option<f64>, default: f64) -> f64 {
        match value {
            None => default,
            Some(v) if v > 0.0 && v <= 1.0 => v,
            Some(v) => {
                self.problems.push(
                    self.file,
                    key,
                    format!("must be above 0 and at most 1, found {v}"),
                );
                default
            }
        }
    }

    /// A finite number above zero.
    pub(crate) fn fraction(&mut self, key: &str, value: Option<f64>, default: f64) -> f64 {
        match value {
            None => default,
            Some(v) if v > 0.0 && v.is_finite() => v,
            Some(v) => {
                self.problems.push(
                    self.file,
                    key,
                    format!("must be a positive number, found {v}"),
                );
                default
            }
        }
    }
}

const fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

/// Parameters are written as TOML strings, numbers or booleans; they are kept as text.
pub(crate) fn parameter_text(
    problems: &mut Problems,
    file: &Path,
    key: &str,
    value: &toml::Value,
) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => {
            problems.push(file, key, "a parameter must be a string, number or boolean");
            None
        }
    }
}

fn validate(path: &Path, raw: RawConfig, problems: &mut Problems) -> Option<Config> {
    let mut f = problems.in_file(path);
    let base = path.parent().unwrap_or(Path::new("."));
    let listen_text = raw.server.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            f.push(
                "server.listen",
                format!("{listen_text:?} is not an address with a port, e.g. \"127.0.0.1:9788\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 9788))
        }
    };
    let shutdown_grace = f.duration(
        "server.shutdown_grace",
        &raw.server.shutdown_grace,
        secs(10),
    );
    let api_token = f.secret(
        "server.api_token",
        raw.server.api_token_env,
        raw.server.api_token_file,
        base,
    );
    let web_config_file = raw.server.web_config_file.map(|p| base.join(p));
    if let Some(file) = &web_config_file {
        if let Err(error) = crate::config::web::WebConfig::load(file) {
            f.push("server.web_config_file", error.to_string());
        }
    }
    let shard = match raw.server.shard.as_deref().map(str::parse::<Shard>) {
        None => Shard::default(),
        Some(Ok(shard)) => shard,
        Some(Err(error)) => {
            f.push("server.shard", error.to_string());
            Shard::default()
        }
    };
    let shard_peers = raw.server.shard_peers.unwrap_or_default();
    for (index, peer) in shard_peers.iter().enumerate() {
        if let Err(message) = check_peer_url(peer) {
            f.push(format!("server.shard_peers[{index}]"), message);
        }
    }
    let shard_peers_ca_file = raw.server.shard_peers_ca_file.map(|p| base.join(p));
    if let Some(file) = &shard_peers_ca_file {
        let mut roots = rustls::RootCertStore::empty();
        if let Err(error) =
            crate::postgres::tls::add_roots(&mut roots, file, "server.shard_peers_ca_file")
        {
            f.push("server.shard_peers_ca_file", error.to_string());
        }
    }
    // Without `server.shard` the shard may still come from the command line (each pod of a
    // StatefulSet has its own): `run` checks the peers against it.
    if raw.server.shard.is_some() {
        if let Err(message) = check_peer_count(shard, &shard_peers) {
            f.push("server.shard_peers", message);
        }
    }
    let server = ServerConfig {
        listen,
        shutdown_grace,
        api_token,
        web_config_file,
        shard,
        shard_peers,
        shard_peers_ca_file,
        max_concurrent_scrapes: f.positive(
            "server.max_concurrent_scrapes",
            raw.server.max_concurrent_scrapes,
            4,
        ),
    };

    let d = &raw.defaults;
    let interval_override = raw.checks.interval_override.is_some().then(|| {
        f.duration(
            "checks.interval_override",
            &raw.checks.interval_override,
            secs(60),
        )
    });
    let defaults = Defaults {
        interval_override,
        interval: f.duration("defaults.interval", &d.interval, secs(60)),
        timeout: f.duration("defaults.timeout", &d.timeout, secs(10)),
        lock_timeout: f.duration("defaults.lock_timeout", &d.lock_timeout, secs(2)),
        connect_timeout: f.duration("defaults.connect_timeout", &d.connect_timeout, secs(5)),
        max_connections_per_target: f.positive(
            "defaults.max_connections_per_target",
            d.max_connections_per_target,
            2,
        ),
        max_connections_per_server: f.positive(
            "defaults.max_connections_per_server",
            d.max_connections_per_server,
            crate::postgres::pool::DEFAULT_SESSIONS_PER_SERVER,
        ),
        server_connection_share: match d.server_connection_share {
            None => crate::postgres::pool::DEFAULT_SERVER_SHARE,
            Some(share) if share > 0.0 && share <= 1.0 => share,
            Some(share) => {
                f.push(
                    "defaults.server_connection_share",
                    format!("must be above 0 and at most 1 (0.1 = 10 %), found {share}"),
                );
                crate::postgres::pool::DEFAULT_SERVER_SHARE
            }
        },
        max_series: f.positive("defaults.max_series", d.max_series, 500),
        discovery_interval: f.duration(
            "defaults.discovery_interval",
            &d.discovery_interval,
            secs(300),
        ),
        sweep: SweepBudget {
            period: f.duration(
                "defaults.sweep_period",
                &d.sweep_period,
                crate::checks::incremental::DEFAULT_SWEEP_PERIOD,
            ),
            max_rows: f.positive(
                "defaults.sweep_max_rows",
                d.sweep_max_rows,
                crate::checks::incremental::DEFAULT_SWEEP_MAX_ROWS as usize,
            ) as u64,
            max_time: f.duration(
                "defaults.sweep_max_time",
                &d.sweep_max_time,
                crate::checks::incremental::DEFAULT_SWEEP_MAX_TIME,
            ),
        },
        early_sweep_watch: d
            .early_sweep_watch
            .as_ref()
            .map(|_| f.duration("defaults.early_sweep_watch", &d.early_sweep_watch, secs(5))),
    };

    let store_password = f.secret(
        "store.password",
        raw.store.password_env,
        raw.store.password_file,
        base,
    );
    if raw.store.path.is_some() && raw.store.url.is_some() {
        f.push(
            "store.url",
            "give store.path (an SQLite file) or store.url (PostgreSQL), not both",
        );
    }
    if let Some(url) = &raw.store.url {
        if let Err(reason) = store_settings(url, None) {
            f.push("store.url", format!("cannot be used: {reason}"));
        }
    }
    let store = StoreConfig {
        path: raw.store.path.map(|p| base.join(p)),
        url: raw.store.url,
        password: store_password,
        retention: f.duration(
            "store.retention",
            &raw.store.retention,
            secs(30 * 24 * 3600),
        ),
        reset_invalid: false,
    };

    let default_version_query = raw
        .deployments
        .version_query
        .clone()
        .unwrap_or_else(|| DEFAULT_VERSION_QUERY.to_string());
    let deployments = validate_deployments(path, raw.deployments, f.problems);
    // A sample is needed for as long as it can be part of a baseline that a window open now
    // is judged against: the baseline span before a deployment plus the longest window.
    let needed = deployments.baseline_span + deployments.judging.durations.first_week;
    if deployments.enabled && store.retention < needed {
        f.push(
            "store.retention",
            format!(
                "{} is shorter than deployments.baseline_span + deployments.first_week ({}): \
                 baselines would be deleted while windows still need them",
                humantime::format_duration(store.retention),
                humantime::format_duration(needed)
            ),
        );
    }

    // Packs: every file matched by every pattern, relative to the main file.
    let patterns = raw
        .checks
        .files
        .unwrap_or_else(|| vec!["checks/*.toml".to_string()]);
    let mut pack_files: Vec<PathBuf> = Vec::new();
    for (index, pattern) in patterns.iter().enumerate() {
        let key = format!("checks.files[{index}]");
        let full = base.join(pattern);
        let Some(full_text) = full.to_str() else {
            f.push(key, "path is not valid UTF-8");
            continue;
        };
        match glob::glob(full_text) {
            Ok(paths) => {
                let mut matched: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
                matched.sort();
                if matched.is_empty() {
                    f.push(key, format!("{pattern:?} matches no check file"));
                }
                for file in matched {
                    if !pack_files.contains(&file) {
                        pack_files.push(file);
                    }
                }
            }
            Err(error) => f.push(key, format!("bad pattern {pattern:?}: {error}")),
        }
    }
    let packs: Vec<Arc<Pack>> = pack_files
        .iter()
        .filter_map(|file| packs::load(file, f.problems).map(Arc::new))
        .collect();
    packs::reject_duplicates(&packs, f.problems);
    let mut pack_names = HashSet::new();
    for pack in &packs {
        if !pack_names.insert(pack.name.clone()) {
            f.problems.push(
                &pack.file,
                "pack.name",
                format!("pack name {:?} is used by another file", pack.name),
            );
        }
    }

    let mut global_parameters = BTreeMap::new();
    for (name, value) in &raw.checks.parameters {
        if let Some(text) = parameter_text(
            f.problems,
            path,
            &format!("checks.parameters.{name}"),
            value,
        ) {
            global_parameters.insert(name.clone(), text);
        }
    }

    if raw.targets.is_empty() {
        f.push("targets", "at least one [[targets]] entry is required");
    }
    let mut targets = Vec::new();
    let mut target_names = HashSet::new();
    for (index, raw_target) in raw.targets.into_iter().enumerate() {
        let key = format!("targets[{index}]");
        if let Some(target) = validate_target(
            path,
            base,
            &key,
            raw_target,
            &defaults,
            &packs,
            &global_parameters,
            &default_version_query,
            f.problems,
        ) {
            if !target_names.insert(target.name.clone()) {
                f.push(
                    format!("{key}.name"),
                    format!("target name {:?} is used twice", target.name),
                );
            }
            targets.push(target);
        }
    }
    for (index, declared) in deployments.declared.iter().enumerate() {
        if !target_names.contains(&declared.target) {
            f.push(
                format!("deployments.declared[{index}].target"),
                format!("no target is named {:?}", declared.target),
            );
        }
    }

    Some(Config {
        source: path.to_path_buf(),
        server,
        defaults,
        store,
        deployments,
        targets,
        packs,
    })
}

fn validate_deployments(
    path: &Path,
    raw: RawDeployments,
    problems: &mut Problems,
) -> DeploymentConfig {
    let mut f = problems.in_file(path);
    let shipped = judging::Settings::default();
    let defaults = shipped.durations;
    let windows = WindowDurations {
        first_hour: f.duration(
            "deployments.first_hour",
            &raw.first_hour,
            defaults.first_hour,
        ),
        first_day: f.duration("deployments.first_day", &raw.first_day, defaults.first_day),
        first_week: f.duration(
            "deployments.first_week",
            &raw.first_week,
            defaults.first_week,
        ),
    };
    if let Err(error) = windows.validate() {
        f.push("deployments.first_hour", error.to_string());
    }
    let mut declared = Vec::new();
    for (index, d) in raw.declared.into_iter().enumerate() {
        match crate::time::parse_rfc3339(&d.at) {
            Ok(at) => {
                declared.push(DeclaredDeployment {
                    target: d.target,
                    version: d.version,
                    at,
                    note: d.note,
                });
            }
            Err(error) => f.push(
                format!("deployments.declared[{index}].at"),
                format!(
                    "{:?} is not a time like \"2026-11-24T10:00:00Z\" ({error})",
                    d.at
                ),
            ),
        }
    }
    let sample_interval = f.duration(
        "deployments.sample_interval",
        &raw.sample_interval,
        secs(60),
    );
    let baseline_span = f.duration(
        "deployments.baseline_span",
        &raw.baseline_span,
        secs(7 * 24 * 3600),
    );
    let min_baseline_samples = f.positive(
        "deployments.min_baseline_samples",
        raw.min_baseline_samples,
        shipped.min_baseline_samples,
    );
    let min_window_samples = f.positive(
        "deployments.min_window_samples",
        raw.min_window_samples,
        shipped.min_window_samples,
    );
    let thresholds = Thresholds {
        min_samples: min_window_samples,
        latency_min_increase: f.fraction(
            "deployments.latency_min_increase",
            raw.latency_min_increase,
            shipped.thresholds.latency_min_increase,
        ),
        latency_min_calls: f.positive(
            "deployments.latency_min_calls",
            raw.latency_min_calls,
            shipped.thresholds.latency_min_calls as usize,
        ) as u64,
        latency_min_window_samples: f.positive(
            "deployments.latency_min_window_samples",
            raw.latency_min_window_samples,
            shipped.thresholds.latency_min_window_samples,
        ),
        latency_p_value: f.fraction(
            "deployments.latency_p_value",
            raw.latency_p_value,
            shipped.thresholds.latency_p_value,
        ),
        latency_min_delta_ms: f.fraction(
            "deployments.latency_min_delta_ms",
            raw.latency_min_delta_ms,
            shipped.thresholds.latency_min_delta_ms,
        ),
        new_statement: {
            let shipped = shipped.thresholds.new_statement;
            NewStatementThresholds {
                min_ms_per_second: f.fraction(
                    "deployments.new_statement_min_ms_per_second",
                    raw.new_statement_min_ms_per_second,
                    shipped.min_ms_per_second,
                ),
                min_share: f.share(
                    "deployments.new_statement_min_share",
                    raw.new_statement_min_share,
                    shipped.min_share,
                ),
                min_ms_per_call: f.fraction(
                    "deployments.new_statement_min_ms_per_call",
                    raw.new_statement_min_ms_per_call,
                    shipped.min_ms_per_call,
                ),
            }
        },
    };
    DeploymentConfig {
        enabled: raw.enabled.unwrap_or(true),
        sample_interval,
        baseline_span,
        judging: judging::Settings {
            durations: windows,
            thresholds,
            min_baseline_samples,
            min_window_samples,
        },
        version_order: match raw.version_order.as_deref() {
            None => VersionOrder::default(),
            Some(text) => VersionOrder::parse(text).unwrap_or_else(|| {
                f.push(
                    "deployments.version_order",
                    format!("must be \"semver\" or \"unordered\", found {text:?}"),
                );
                VersionOrder::default()
            }),
        },
        declared,
    }
}

#[allow(clippy::too_many_arguments)]
fn validate_target(
    path: &Path,
    base: &Path,
    key: &str,
    raw: RawTarget,
    defaults: &Defaults,
    packs: &[Arc<Pack>],
    global_parameters: &BTreeMap<String, String>,
    default_version_query: &str,
    problems: &mut Problems,
) -> Option<TargetConfig> {
    let mut f = problems.in_file(path);
    let before = f.problems.0.len();
    let name = match raw.name {
        Some(name) if crate::config::packs::valid_name(&name) => name,
        Some(name) => {
            f.push(
                format!("{key}.name"),
                format!("{name:?} is not a valid name: use letters, digits, '_' and '-'"),
            );
            return None;
        }
        None => {
            f.push(format!("{key}.name"), "every target needs a name");
            return None;
        }
    };
    let password = f.secret(
        &format!("{key}.password"),
        raw.password_env,
        raw.password_file,
        base,
    );
    let port = match raw.port {
        None => None,
        Some(p) => match u16::try_from(p) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                f.push(format!("{key}.port"), format!("{p} is not a TCP port"));
                None
            }
        },
    };
    let mut tls_options = BTreeMap::new();
    if let Some(mode) = raw.sslmode {
        tls_options.insert("sslmode".to_string(), mode);
    }
    if let Some(root) = raw.sslrootcert {
        let value = if root == "system" {
            root
        } else {
            base.join(root).display().to_string()
        };
        tls_options.insert("sslrootcert".to_string(), value);
    }
    if let Some(cert) = raw.sslcert {
        tls_options.insert("sslcert".to_string(), base.join(cert).display().to_string());
    }
    if let Some(key) = raw.sslkey {
        tls_options.insert("sslkey".to_string(), base.join(key).display().to_string());
    }
    let discover = validate_discovery(path, key, raw.databases, raw.exclude_databases, f.problems);
    let parts = ConnectionParts {
        url: raw.url.as_deref(),
        host: raw.host,
        port,
        dbname: raw.dbname,
        user: raw.user,
        password,
        tls_options,
    };
    let connection = match ConnectionSettings::new(parts, defaults.connect_timeout) {
        // Discovery asks the server from its maintenance database unless told otherwise.
        Ok(settings) if discover.is_some() && settings.dbname().is_none() => {
            Some(settings.with_dbname("postgres"))
        }
        Ok(settings) => Some(settings),
        Err(error) => {
            f.push(format!("{key}.url"), error.to_string());
            None
        }
    }
    .map(|mut settings| {
        settings.allow_superuser = raw.allow_superuser.unwrap_or(false);
        settings
    });
    let max_connections = f.positive(
        &format!("{key}.max_connections"),
        raw.max_connections,
        defaults.max_connections_per_target,
    );

    let mut parameters = global_parameters.clone();
    for (name, value) in &raw.parameters {
        if let Some(text) =
            parameter_text(f.problems, path, &format!("{key}.parameters.{name}"), value)
        {
            parameters.insert(name.clone(), text);
        }
    }
    let selected: Vec<&Arc<Pack>> = match &raw.packs {
        None => packs.iter().collect(),
        Some(names) => {
            for (index, wanted) in names.iter().enumerate() {
                if !packs.iter().any(|p| &p.name == wanted) {
                    f.push(
                        format!("{key}.packs[{index}]"),
                        format!("no loaded check pack is named {wanted:?}"),
                    );
                }
            }
            packs.iter().filter(|p| names.contains(&p.name)).collect()
        }
    };
    let mut checks = Vec::new();
    for pack in selected {
        for def in &pack.checks {
            if let Some(spec) = packs::resolve(pack, def, &parameters, defaults, &name, f.problems)
            {
                checks.push(Arc::new(spec));
            }
        }
    }
    if f.problems.0.len() > before {
        return None;
    }
    Some(TargetConfig {
        name,
        connection: connection?,
        max_connections,
        version_query: raw
            .version_query
            .unwrap_or_else(|| default_version_query.to_string()),
        checks,
        discover,
    })
}

fn validate_discovery(
    path: &Path,
    key: &str,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    problems: &mut Problems,
) -> Option<Discovery> {
    let patterns = |problems: &mut Problems, field: &str, list: Vec<String>| {
        let mut out = Vec::new();
        for (index, text) in list.iter().enumerate() {
            match glob::Pattern::new(text) {
                Ok(pattern) => out.push(pattern),
                Err(error) => problems.push(
                    path,
                    format!("{key}.{field}[{index}]"),
                    format!("{text:?} is not a valid pattern: {}", error.msg),
                ),
            }
        }
        out
    };
    match (include, exclude) {
        (None, None) => None,
        (None, Some(_)) => {
            problems.push(
                path,
                format!("{key}.exclude_databases"),
                "exclude_databases needs databases (the patterns to include)",
            );
            None
        }
        (Some(include), exclude) => {
            if include.is_empty() {
                problems.push(
                    path,
                    format!("{key}.databases"),
                    "give at least one pattern, e.g. [\"*\"] for every database",
                );
            }
            Some(Discovery {
                include: patterns(problems, "databases", include),
                exclude: patterns(problems, "exclude_databases", exclude.unwrap_or_default()),
            })
        }
    }
}

/// The settings of a PostgreSQL store from its URL: the TLS options (`sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`, with libpq's meanings, as for targets) taken out and checked, the rest
/// parsed as the driver does.
pub fn store_settings(
    url: &str,
    password: Option<crate::storage::PasswordReader>,
) -> Result<crate::storage::PgSettings, String> {
    let (rest, options) = crate::postgres::tls::split_options(url);
    let tls =
        crate::postgres::tls::TlsSettings::from_options(&options).map_err(|e| e.to_string())?;
    let mut settings = crate::storage::PgSettings::parse(&rest, password)?;
    settings.config.ssl_mode(tls.mode.for_driver());
    // Checked now, so a missing or unreadable file is a configuration error, not a store that
    // never opens; read again for every session.
    tls.client_config().map_err(|e| e.to_string())?;
    let make: crate::storage::TlsMaker =
        std::sync::Arc::new(move || tls.client_config().map_err(|e| e.to_string()));
    settings.tls = Some(make);
    Ok(settings)
}

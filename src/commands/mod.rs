//! What each CLI subcommand does, as library functions returning an exit code, so tests can
//! call them and `main` stays a flat dispatch.

use std::sync::Arc;

pub mod cli;
pub mod client;
pub mod demo;
pub mod privileges;

use crate::checks::outcome::{CheckError, CheckOutcome};
use crate::checks::outcome::{ErrorKind, Status};
use crate::commands::cli::OutputFormat;
use crate::config::Config;
use crate::postgres::pool::PoolError;
use crate::postgres::runner::RunReport;
use crate::postgres::target::PasswordSource;
use crate::server::status::{self, Filter, Overall};
use crate::time::unix_now;
use crate::watch::discovery::{self, Expanded};
use crate::watch::scheduler::{self, Pools};
use crate::watch::state::{Claim, State};

/// Exit code: everything passed.
pub const EXIT_OK: u8 = 0;
/// Exit code: a check failed or errored (or the daemon reports a problem).
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit code: a target or the daemon cannot be reached, or the configuration is invalid.
pub const EXIT_UNREACHABLE: u8 = 2;

/// `deploywatch check`: runs the selected checks once and prints the results.
pub async fn check(
    config: Config,
    target: Option<&str>,
    check: Option<&str>,
    format: OutputFormat,
) -> (u8, String) {
    let checked = check_with_warnings(config, target, check, format).await;
    (checked.code, checked.output)
}

/// What `deploywatch check` found: the exit code, the report, and warnings for standard error
/// (a target whose version query does not work, so deployments would go unnoticed).
pub struct Checked {
    pub code: u8,
    pub output: String,
    pub warnings: Vec<String>,
}

/// [`check`], with the warnings kept apart from the report (which may be JSON).
pub async fn check_with_warnings(
    config: Config,
    target: Option<&str>,
    check: Option<&str>,
    format: OutputFormat,
) -> Checked {
    let fail = |code: u8, output: String| Checked {
        code,
        output,
        warnings: Vec::new(),
    };
    // Targets with `databases` patterns stand for the databases their server lists now.
    let Expanded {
        mut config,
        failures,
        ..
    } = discovery::expand(&config).await;
    if let Some(name) = target {
        // A template's name selects every database discovered under it.
        let prefix = format!("{name}/");
        let selected =
            |t: &crate::config::TargetConfig| t.name == name || t.name.starts_with(&prefix);
        if !config.targets.iter().any(selected) {
            let known: Vec<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
            return fail(
                EXIT_UNREACHABLE,
                format!(
                    "no target is named {name:?}; known targets: {}\n",
                    known.join(", ")
                ),
            );
        }
        config.targets.retain(selected);
    }
    if let Some(name) = check {
        let known = config
            .targets
            .iter()
            .any(|t| t.checks.iter().any(|c| c.name == name));
        if !known {
            return fail(EXIT_UNREACHABLE, format!("no check is named {name:?}\n"));
        }
        for t in &mut config.targets {
            t.checks.retain(|c| c.name == name);
        }
        // A target without that check is not asked about: it would only show as not tried.
        config.targets.retain(|t| !t.checks.is_empty());
    }
    let state = Arc::new(State::new());
    state.apply_config(&config, unix_now());
    for (name, message) in failures {
        state.set_unreachable(&name, message);
    }
    let pools = Pools::for_config(&Pools::default(), &config);
    // A one-shot command tries each target once: one that cannot be reached is reported as
    // such for all its checks, instead of each check retrying on its own.
    let mut reachable_config = config.clone();
    reachable_config.targets.clear();
    for target in &config.targets {
        let Some(pool) = pools.get(&target.name) else {
            continue;
        };
        match pool.get().await {
            Ok(session) => {
                drop(session);
                reachable_config.targets.push(target.clone());
            }
            Err(error) => {
                let message = match &error {
                    PoolError::Connect { message, .. } => format!("cannot connect: {message}"),
                    other => format!("cannot connect: {other}"),
                };
                state.set_unreachable(&target.name, message.clone());
                for spec in &target.checks {
                    if state.claim(&target.name, &spec.name) == Claim::Started {
                        let report = RunReport {
                            outcome: CheckOutcome::error(CheckError::new(
                                ErrorKind::Connection,
                                message.clone(),
                            )),
                            duration: std::time::Duration::ZERO,
                            reachable: false,
                            incremental: None,
                        };
                        state.record(&target.name, &spec.name, &report, unix_now());
                    }
                }
            }
        }
    }
    scheduler::run_once(&reachable_config, &pools, &state).await;
    let mut warnings = Vec::new();
    for target in &config.targets {
        if let Some(pool) = pools.get(&target.name) {
            let read = crate::postgres::sampler::read_version(pool, &target.version_query).await;
            warnings.extend(crate::postgres::sampler::version_problem(
                &target.name,
                target.version_query == crate::config::DEFAULT_VERSION_QUERY,
                &read,
            ));
            if let Ok(version) = read {
                state.set_schema_version(&target.name, version);
            }
        }
    }
    pools.close_all();
    let snapshot = state.snapshot();
    let report = status::build(&snapshot, &Filter::default(), unix_now());
    let unreachable = snapshot.targets.values().any(|t| {
        t.reachable == Some(false)
            || t.checks.values().any(|c| {
                c.outcome
                    .as_ref()
                    .and_then(|o| o.error.as_ref())
                    .is_some_and(|e| e.kind == ErrorKind::Connection)
            })
    });
    let any_bad = snapshot
        .targets
        .values()
        .flat_map(|t| t.checks.values())
        .any(|c| c.status != Status::Pass);
    let code = if unreachable {
        EXIT_UNREACHABLE
    } else if any_bad {
        EXIT_FAILED
    } else {
        EXIT_OK
    };
    let output = match format {
        OutputFormat::Table => status::render_text(&report),
        OutputFormat::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
    };
    Checked {
        code,
        output,
        warnings,
    }
}

/// `deploywatch validate`.
pub fn validate(config: &Config) -> String {
    let checks: usize = config.targets.iter().map(|t| t.checks.len()).sum();
    format!(
        "{}: valid ({} target(s), {} pack(s), {} check(s) in all)\n",
        config.source.display(),
        config.targets.len(),
        config.packs.len(),
        checks
    )
}

/// The daemon's base URL: `url`, else the configured listen address (loopback for an
/// unspecified one), `https://` when the configured web configuration serves TLS.
fn base_url(url: Option<&str>, config: Option<&Config>) -> String {
    match (url, config) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, Some(config)) => daemon_url(
            config.server.listen,
            config
                .server
                .web_config_file
                .as_deref()
                .is_some_and(crate::config::web::serves_tls),
        ),
        (None, None) => format!("http://{}", crate::config::DEFAULT_LISTEN),
    }
}

/// The base URL of a daemon listening on `listen` (loopback for an unspecified address),
/// `https://` when it serves TLS.
pub fn daemon_url(mut listen: std::net::SocketAddr, tls: bool) -> String {
    if listen.ip().is_unspecified() {
        listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{listen}")
}

/// A warning when `user`'s password would cross the network unencrypted: a plain `http://`
/// URL whose host is not this machine's loopback. Basic authentication sends the password
/// with every request, readable by anyone on the path.
fn cleartext_password_warning(base: &str, user: &str) -> Option<String> {
    let url = url::Url::parse(base).ok()?;
    let loopback = match url.host()? {
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    (url.scheme() == "http" && !loopback).then(|| {
        // Whatever credentials the URL holds are not repeated.
        let mut shown = url.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        format!(
            "warning: the password of --user {user} goes to {shown} unencrypted (plain http://): \
             serve TLS (server.web_config_file) and use an https:// URL"
        )
    })
}

/// `deploywatch status`: asks a running daemon.
pub async fn status(
    url: Option<&str>,
    config: Option<&Config>,
    target: Option<&str>,
    format: OutputFormat,
    trust: &client::Trust,
    basic: Option<&client::BasicAuth>,
) -> (u8, String) {
    let base = base_url(url, config);
    if let Some(warning) = basic.and_then(|b| cleartext_password_warning(&base, &b.user)) {
        eprintln!("{warning}");
    }
    let mut full = format!("{base}/status?format=json");
    if let Some(target) = target {
        full.push_str("&target=");
        full.push_str(&url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>());
    }
    let body = match client::get_as(&full, "application/json", trust, basic).await {
        Ok((code, body)) if code.is_success() => body,
        Ok((code, _)) if code.as_u16() == 401 => {
            let why = match basic {
                None => "its web configuration asks for a user: give --user NAME (or \
                         DEPLOYWATCH_USER) with the password in DEPLOYWATCH_PASSWORD"
                    .to_string(),
                Some(basic) => format!("the user {:?} or its password was refused", basic.user),
            };
            return (
                EXIT_UNREACHABLE,
                format!("deploywatch at {base} answered {code}: {why}\n"),
            );
        }
        Ok((code, body)) if code.as_u16() == 404 && target.is_some() => {
            // An unknown target: the daemon's message lists the known ones.
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or(body);
            return (EXIT_UNREACHABLE, format!("{}\n", message.trim_end()));
        }
        Ok((code, body)) => {
            return (
                EXIT_UNREACHABLE,
                format!("deploywatch at {base} answered {code}: {body}\n"),
            )
        }
        Err(error) => return (EXIT_UNREACHABLE, format!("{error}\n")),
    };
    let value: serde_json::Value = match serde_json::from_str(&body) {
        Ok(value) => value,
        Err(error) => {
            return (
                EXIT_UNREACHABLE,
                format!("unexpected answer from {base}: {error}\n"),
            )
        }
    };
    let overall = value
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("failing");
    let code = if overall == Overall::Ok.as_str() {
        EXIT_OK
    } else {
        EXIT_FAILED
    };
    let output = match format {
        OutputFormat::Json => body,
        OutputFormat::Table => {
            let text_url = full.replace("format=json", "format=text");
            match client::get_as(&text_url, "text/plain", trust, basic).await {
                Ok((code, text)) if code.is_success() => text,
                Ok((code, body)) => {
                    return (
                        EXIT_UNREACHABLE,
                        format!("deploywatch at {base} answered {code}: {body}\n"),
                    )
                }
                Err(error) => return (EXIT_UNREACHABLE, format!("{error}\n")),
            }
        }
    };
    (code, output)
}

/// `deploywatch deploy mark`.
#[allow(clippy::too_many_arguments)]
pub async fn deploy_mark(
    config: Option<&Config>,
    url: Option<&str>,
    token_env: Option<&str>,
    target: Option<&str>,
    version: &str,
    note: Option<&str>,
    started_at: Option<&str>,
    trust: &client::Trust,
) -> (u8, String) {
    let base = base_url(url, config);
    let source = match token_env {
        Some(var) => Some((PasswordSource::Env(var.to_string()), "--token-env")),
        None => config
            .and_then(|c| c.server.api_token.clone())
            .map(|source| (source, "server.api_token_env / api_token_file")),
    };
    let Some((source, origin)) = source else {
        return (
            EXIT_UNREACHABLE,
            "no API token: set server.api_token_env (or api_token_file) in the configuration, or pass --token-env\n"
                .to_string(),
        );
    };
    let token = match source.read() {
        Ok(token) if !token.trim().is_empty() => token,
        Ok(_) => {
            let what = match &source {
                PasswordSource::Env(var) => format!("the environment variable {var}"),
                PasswordSource::File(path) => format!("the file {}", path.display()),
            };
            return (
                EXIT_UNREACHABLE,
                format!("no API token: {what} (from {origin}) is empty\n"),
            );
        }
        Err(error) => {
            return (
                EXIT_UNREACHABLE,
                format!("no API token: {error} (from {origin})\n"),
            )
        }
    };
    let announcement = client::Announcement {
        target,
        version,
        note,
        started_at,
    };
    match client::announce_with(&base, &token, &announcement, trust).await {
        Ok((code, body)) if code.is_success() => (EXIT_OK, body + "\n"),
        Ok((code, body)) => (
            EXIT_FAILED,
            format!("deploywatch refused the deployment ({code}): {body}\n"),
        ),
        Err(error) => (EXIT_UNREACHABLE, format!("{error}\n")),
    }
}

/// `deploywatch report`: reads the state store named in the configuration.
pub fn report(config: &Config, target: Option<&str>, deployment: Option<i64>) -> (u8, String) {
    if config.store.url.is_some() {
        let store = match crate::daemon::open_store(&config.store) {
            Ok(store) => store,
            Err(error) => return (EXIT_UNREACHABLE, format!("{error}\n")),
        };
        // The PostgreSQL store's calls block: they run on a thread of their own.
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| report_from(&store, target, deployment))
                .join()
                .unwrap_or(Err(crate::storage::StoreError::Closed))
        });
        return report_outcome(result);
    }
    let Some(path) = &config.store.path else {
        return (
            EXIT_UNREACHABLE,
            "no [store] path in the configuration: deployments are only kept in memory\n"
                .to_string(),
        );
    };
    if !path.exists() {
        return (
            EXIT_UNREACHABLE,
            format!(
                "the state store {} does not exist yet: run the daemon first\n",
                path.display()
            ),
        );
    }
    let result =
        crate::storage::Store::open(path).and_then(|store| report_from(&store, target, deployment));
    report_outcome(result)
}

fn report_outcome(result: Result<Option<String>, crate::storage::StoreError>) -> (u8, String) {
    match result {
        Ok(Some(text)) => (EXIT_OK, text),
        Ok(None) => (EXIT_FAILED, "no deployment recorded yet\n".to_string()),
        Err(error) => (EXIT_UNREACHABLE, format!("{error}\n")),
    }
}

/// The report of a deployment (the latest of `target`, or `deployment`) from `store`.
fn report_from(
    store: &crate::storage::Store,
    target: Option<&str>,
    deployment: Option<i64>,
) -> Result<Option<String>, crate::storage::StoreError> {
    {
        let record = match deployment {
            Some(id) => store.deployment(id)?,
            None => store.deployments(target)?.into_iter().next(),
        };
        let Some(record) = record else {
            return Ok(None);
        };
        let before = store.last_sample_before(&record.target, record.at)?;
        // A deployment that a later one superseded is reported on its own samples: up to the
        // next deployment, with the version the database had then.
        let next = store.next_deployment(&record.target, record.at, record.id)?;
        let (until, version) = match &next {
            Some(next) => (next.at, next.from_version.clone()),
            None => (unix_now() + 1.0, store.last_version(&record.target)?),
        };
        let mut after = Vec::new();
        store.each_sample(&record.target, record.at, until, |mut sample| {
            // The report reads checks, sizes and counts; statements would only take memory.
            sample.statements = None;
            sample.indexes.clear();
            sample.tables.clear();
            after.push(sample);
        })?;
        let now = next.as_ref().map_or(unix_now(), |n| n.at);
        let verdicts = store.verdicts(record.id)?;
        Ok(Some(crate::analysis::report::render(
            &crate::analysis::report::ReportInput {
                deployment: &record,
                before: before.as_ref(),
                after: &after,
                verdicts: &verdicts,
                current_version: version.as_deref(),
                superseded_by: next.as_ref(),
                now,
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_password_over_plain_http_beyond_this_machine_is_warned_of() {
        use super::cleartext_password_warning as warning;
        let far = warning("http://10.1.2.3:9187", "sre").expect("a warning");
        assert!(
            far.contains("--user sre") && far.contains("unencrypted") && far.contains("https://"),
            "{far}"
        );
        assert!(warning("http://dw.example.com:9187", "sre").is_some());
        let with_secret = warning("http://u:hunter2@10.1.2.3:9187", "sre").expect("a warning");
        assert!(!with_secret.contains("hunter2"), "{with_secret}");
        for near in [
            "https://10.1.2.3:9187",
            "https://dw.example.com",
            "http://127.0.0.1:9187",
            "http://127.8.0.1:9187",
            "http://localhost:9187",
            "http://LOCALHOST:9187",
            "http://[::1]:9187",
        ] {
            assert_eq!(warning(near, "sre"), None, "{near}");
        }
    }
}

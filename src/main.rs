//! The `deploywatch` binary: parse the command line, start logging, load the configuration and
//! dispatch. Everything else lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use deploywatch::commands::cli::{Cli, Command, DeployAction, LogFormat};
use deploywatch::commands::{self, EXIT_UNREACHABLE};
use deploywatch::config::{Config, Overrides};
use deploywatch::daemon::{self, Event};
use tracing_subscriber::EnvFilter;

/// Logs go to stderr through a bounded, lossy buffer: if whatever reads stderr stalls, log lines
/// are dropped rather than the daemon (and its /metrics) blocking on the write. The guard
/// flushes what is buffered when `main` returns.
fn init_logging(
    format: LogFormat,
    filter: &str,
    file: Option<std::fs::File>,
) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(true);
    // Colours only for a person at a terminal, not in journald or a file.
    let ansi = file.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = match file {
        Some(file) => builder.finish(file),
        None => builder.finish(std::io::stderr()),
    };
    deploywatch::server::metrics::count_dropped_log_lines(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// Where the demo's daemon logs: `--log-file`, `-` for standard error, by default a file of
/// this process in the temporary directory.
fn demo_log_path(given: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    match given {
        Some(path) if path.as_os_str() == "-" => None,
        Some(path) => Some(path.to_path_buf()),
        None => {
            Some(std::env::temp_dir().join(format!("deploywatch-demo-{}.log", std::process::id())))
        }
    }
}

fn load(cli: &Cli) -> Result<Config, ExitCode> {
    Config::load(&cli.config).map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(EXIT_UNREACHABLE)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's story is told on standard output; the daemon's log goes to a file it names.
    let demo_log = match &cli.command {
        Command::Demo { log_file, .. } => demo_log_path(log_file.as_deref()),
        _ => None,
    };
    let log_file = match &demo_log {
        Some(path) => match std::fs::File::create(path) {
            Ok(file) => Some(file),
            Err(error) => {
                eprintln!("demo: cannot write its log to {}: {error}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let _log_guard = init_logging(cli.log_format, &cli.log_level, log_file);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(EXIT_UNREACHABLE)
        }
    }
}

/// Writes a command's output. A reader that went away (`deploywatch status | head`) is not an
/// error worth a panic: the rest is dropped and the exit code stays the command's.
fn print_output(output: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(output.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("cannot write the output: {error}");
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let printed = |(code, output): (u8, String)| {
        print_output(&output);
        ExitCode::from(code)
    };
    match &cli.command {
        Command::Run {
            listen,
            shard,
            reset_store,
        } => {
            let mut config = match load(&cli) {
                Ok(config) => config,
                Err(code) => return Ok(code),
            };
            config.store.reset_invalid = *reset_store;
            let overrides = Overrides { shard: *shard };
            if let Err(error) = config.apply_overrides(&overrides) {
                eprintln!("{error}");
                return Ok(ExitCode::from(EXIT_UNREACHABLE));
            }
            let address = listen.unwrap_or(config.server.listen);
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address}"))?;
            tracing::info!(address = %listener.local_addr()?, "serving /metrics, /status, /healthz, /readyz");
            let handle = daemon::start_with_overrides(config, listener, overrides)?;
            forward_signals(handle.events.clone())?;
            handle.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            target,
            check,
            format,
            privileges,
        } => {
            let config = match load(&cli) {
                Ok(config) => config,
                Err(code) => return Ok(code),
            };
            if *privileges {
                let report = deploywatch::commands::privileges::report(&config).await;
                return Ok(printed((report.exit_code(), report.render())));
            }
            let checked =
                commands::check_with_warnings(config, target.as_deref(), check.as_deref(), *format)
                    .await;
            for warning in &checked.warnings {
                eprintln!("warning: {warning}");
            }
            Ok(printed((checked.code, checked.output)))
        }
        Command::Validate => Ok(match load(&cli) {
            Ok(config) => printed((0, commands::validate(&config))),
            Err(code) => code,
        }),
        Command::Status {
            url,
            target,
            format,
            cacert,
            user,
        } => {
            let basic = match user {
                None => None,
                Some(user) if user.contains(':') => {
                    return Ok(printed((
                        EXIT_UNREACHABLE,
                        format!("--user {user:?}: a basic-auth user name cannot hold ':'\n"),
                    )))
                }
                Some(user) => match std::env::var("DEPLOYWATCH_PASSWORD") {
                    Ok(password) => Some(commands::client::BasicAuth {
                        user: user.clone(),
                        password,
                    }),
                    Err(std::env::VarError::NotPresent) => {
                        return Ok(printed((
                            EXIT_UNREACHABLE,
                            format!("--user {user}: set its password in DEPLOYWATCH_PASSWORD\n"),
                        )))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Ok(printed((
                            EXIT_UNREACHABLE,
                            "DEPLOYWATCH_PASSWORD is not valid UTF-8\n".to_string(),
                        )))
                    }
                },
            };
            let daemon = Daemon::of(&cli.config, url, cacert);
            Ok(printed(
                commands::status(
                    daemon.url.as_deref(),
                    daemon.config.as_ref(),
                    target.as_deref(),
                    *format,
                    &daemon.trust,
                    basic.as_ref(),
                )
                .await,
            ))
        }
        Command::Deploy {
            action:
                DeployAction::Mark {
                    version,
                    target,
                    note,
                    started_at,
                    url,
                    token_env,
                    cacert,
                },
        } => {
            let daemon = Daemon::of(&cli.config, url, cacert);
            Ok(printed(
                commands::deploy_mark(
                    daemon.config.as_ref(),
                    daemon.url.as_deref(),
                    token_env.as_deref(),
                    target.as_deref(),
                    version,
                    note.as_deref(),
                    started_at.as_deref(),
                    &daemon.trust,
                )
                .await,
            ))
        }
        Command::Report { target, deployment } => Ok(match load(&cli) {
            Ok(config) => printed(commands::report(&config, target.as_deref(), *deployment)),
            Err(code) => code,
        }),
        Command::Demo {
            no_story,
            step,
            listen,
            exit_after_story,
            log_file,
        } => {
            let options = deploywatch::commands::demo::DemoOptions {
                step: step.clone(),
                listen: *listen,
                story: !no_story,
                exit_after_story: *exit_after_story,
                log_file: demo_log_path(log_file.as_deref()),
            };
            match deploywatch::commands::demo::run(options).await {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(error) => {
                    eprintln!("demo: {error}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// SIGHUP reloads, SIGTERM and SIGINT shut down gracefully.
fn forward_signals(events: tokio::sync::mpsc::Sender<Event>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = hangup.recv() => Event::Reload,
                _ = terminate.recv() => Event::Shutdown,
                _ = interrupt.recv() => Event::Shutdown,
            };
            tracing::info!(?event, "signal received");
            if events.send(event).await.is_err() || event == Event::Shutdown {
                break;
            }
        }
    });
    Ok(())
}

/// What a command that talks to a running daemon needs: the configuration when it loads,
/// the daemon's URL and whom its HTTPS certificate is checked against.
struct Daemon {
    config: Option<Config>,
    url: Option<String>,
    trust: commands::client::Trust,
}

impl Daemon {
    fn of(path: &Path, url: &Option<String>, cacert: &Option<PathBuf>) -> Daemon {
        let config = Config::load(path).ok();
        let url = daemon_url(url, config.as_ref(), path);
        let trust = commands::client::Trust::new(cacert.clone());
        Daemon { config, url, trust }
    }
}

/// `--url`, else, when the configuration does not load as a whole (a web configuration whose
/// key this user cannot read, a check pack with an error), the address its `[server]` gives:
/// the commands that ask the daemon need nothing else from it.
fn daemon_url(url: &Option<String>, config: Option<&Config>, path: &Path) -> Option<String> {
    url.clone().or_else(|| {
        config
            .is_none()
            .then(|| Config::daemon_endpoint(path))
            .flatten()
            .map(|(listen, tls)| commands::daemon_url(listen, tls))
    })
}

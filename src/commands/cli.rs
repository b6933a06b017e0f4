//! The command line: subcommands and their flags (clap). Parsing only; `main` dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "deploywatch",
    version,
    about = "Watches PostgreSQL after a schema migration: runs health, integrity and index-usage \
             checks, exports Prometheus metrics and flags regressions against the pre-deployment baseline."
)]
pub struct Cli {
    /// The main configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "DEPLOYWATCH_CONFIG",
        default_value = "config/deploywatch.toml"
    )]
    pub config: PathBuf,

    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "deploywatch=debug".
    #[arg(long, global = true, env = "DEPLOYWATCH_LOG", default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: schedule checks, serve /metrics and /status, track deployments.
    Run {
        /// Listen address; overrides server.listen.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Watch only shard N of M of the targets, e.g. "0/3"; overrides server.shard, also
        /// on reload. Discovered databases are assigned one by one.
        #[arg(long, env = "DEPLOYWATCH_SHARD", value_name = "N/M")]
        shard: Option<crate::shard::Shard>,
        /// When store.path holds a file that is not a valid state store (truncated, not
        /// SQLite), move it aside and start with an empty store instead of refusing to start.
        #[arg(long)]
        reset_store: bool,
    },
    /// Run every configured check once and print the results (a deployment gate).
    /// Exit code: 0 all pass, 1 a check failed or errored, 2 a target is unreachable or the
    /// configuration is invalid.
    Check {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Only this check.
        #[arg(long)]
        check: Option<String>,
        /// Output: a table for people, or the JSON of /status.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
        /// Instead of running the checks, report which ones the role cannot run (EXPLAIN only).
        #[arg(long)]
        privileges: bool,
    },
    /// Validate the configuration and the check packs without connecting anywhere.
    Validate,
    /// Ask a running daemon for its status. Exit code: 0 ok, 1 pending (nothing known yet), degraded
    /// or failing, 2 unreachable.
    Status {
        /// The daemon's base URL (default: from server.listen in the configuration).
        #[arg(long)]
        url: Option<String>,
        /// Only this target; the exit code then follows its state alone. An unknown name exits 2.
        #[arg(long)]
        target: Option<String>,
        /// Output: the text table, or the JSON of /status.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
        /// A CA certificate (PEM) the daemon's HTTPS certificate is checked against, besides
        /// the system's roots (a private CA or a self-signed certificate).
        #[arg(long, env = "DEPLOYWATCH_CACERT")]
        cacert: Option<PathBuf>,
        /// A user of the daemon's basic authentication (`basic_auth_users` of its web
        /// configuration); the password comes from the environment variable
        /// DEPLOYWATCH_PASSWORD, never from the command line.
        #[arg(long, env = "DEPLOYWATCH_USER")]
        user: Option<String>,
    },
    /// Deployments.
    Deploy {
        #[command(subcommand)]
        action: DeployAction,
    },
    /// Print the checklist's deployment notes filled in from what was recorded.
    Report {
        /// The target whose latest deployment to report (default: the latest of any target).
        #[arg(long)]
        target: Option<String>,
        /// A deployment id (default: the latest).
        #[arg(long)]
        deployment: Option<i64>,
    },
    /// Start a throwaway PostgreSQL with the demo application and watch a deployment happen.
    Demo {
        /// Only keep the baseline workload running, without the scripted story.
        #[arg(long)]
        no_story: bool,
        /// Length of each story step, e.g. "20s".
        #[arg(long, default_value = "20s")]
        step: String,
        /// Listen address of the demo daemon.
        #[arg(long, default_value = "127.0.0.1:9788")]
        listen: SocketAddr,
        /// Exit when the story is over instead of waiting for Ctrl-C.
        #[arg(long)]
        exit_after_story: bool,
        /// Where the daemon's log goes, so the story reads on its own on the terminal
        /// (default: deploywatch-demo-PID.log in the temporary directory; "-" for standard error).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeployAction {
    /// Announce a deployment to a running daemon (POST /api/deployments).
    Mark {
        /// The schema version deployed, e.g. "3.7.0".
        #[arg(long)]
        version: String,
        /// The target deployed to (may be left out when the daemon watches one target).
        #[arg(long)]
        target: Option<String>,
        /// Free text kept with the deployment, e.g. a change ticket or commit.
        #[arg(long)]
        note: Option<String>,
        /// When the deployment started (RFC 3339); default now.
        #[arg(long)]
        started_at: Option<String>,
        /// The daemon's base URL (default: from server.listen).
        #[arg(long)]
        url: Option<String>,
        /// Environment variable holding the API token (default: server.api_token_env).
        #[arg(long)]
        token_env: Option<String>,
        /// A CA certificate (PEM) the daemon's HTTPS certificate is checked against, besides
        /// the system's roots (a private CA or a self-signed certificate).
        #[arg(long, env = "DEPLOYWATCH_CACERT")]
        cacert: Option<PathBuf>,
    },
}

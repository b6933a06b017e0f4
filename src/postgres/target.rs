//! How to reach one target database: connection settings and where its password comes from.
//!
//! The password is never stored in the configuration structs; it is read from its source
//! (an environment variable or a file) each time a connection is opened, so a rotated secret
//! is picked up without a restart. Nothing in this module prints a password: `Debug` output of
//! every type here is redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::postgres::tls::{split_options, TlsSettings};

/// The `application_name` every deploywatch session carries, so DBAs can see and count them.
pub const APPLICATION_NAME: &str = "deploywatch";

#[derive(Clone, PartialEq)]
pub enum PasswordSource {
    /// The name of an environment variable holding the secret.
    Env(String),
    /// A file whose contents (trailing newline trimmed) are the secret.
    File(PathBuf),
}

impl fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordSource::Env(var) => write!(f, "Env({var})"),
            PasswordSource::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid connection string: {0}")]
    InvalidConnectionString(String),
    #[error("environment variable {0} (password_env) is not set")]
    MissingEnv(String),
    #[error("cannot read password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no host given: set url or host")]
    NoHost,
    #[error(transparent)]
    Tls(#[from] crate::postgres::tls::TlsError),
}

impl PasswordSource {
    /// Reads the secret now.
    pub fn read(&self) -> Result<String, TargetError> {
        match self {
            PasswordSource::Env(var) => {
                std::env::var(var).map_err(|_| TargetError::MissingEnv(var.clone()))
            }
            PasswordSource::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|source| TargetError::PasswordFile {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

/// Everything needed to open a session on a target, except the password itself.
#[derive(Clone)]
pub struct ConnectionSettings {
    base: tokio_postgres::Config,
    password: Option<PasswordSource>,
    pub tls: TlsSettings,
    /// A human description without secrets, e.g. `postgres@127.0.0.1:5432/cognit`.
    pub display: String,
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("display", &self.display)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ConnectionSettings {
    /// Builds settings from a connection string (libpq URL or `key=value` form) and/or parts.
    /// Parts override what the string says; `tls_options` (sslmode, sslrootcert, sslcert,
    /// sslkey) override the string's TLS options.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        url: Option<&str>,
        host: Option<String>,
        port: Option<u16>,
        dbname: Option<String>,
        user: Option<String>,
        password: Option<PasswordSource>,
        connect_timeout: Duration,
        tls_options: BTreeMap<String, String>,
    ) -> Result<Self, TargetError> {
        let (rest, mut options) = match url {
            Some(text) => split_options(text),
            None => (String::new(), BTreeMap::new()),
        };
        options.extend(tls_options);
        let tls = TlsSettings::from_options(&options)?;
        let mut base = match url {
            // tokio-postgres' parse errors name the option, never its value, so they are safe
            // to show even when the string holds a password.
            Some(_) => tokio_postgres::Config::from_str(&rest)
                .map_err(|e| TargetError::InvalidConnectionString(e.to_string()))?,
            None => tokio_postgres::Config::new(),
        };
        base.ssl_mode(tls.mode.for_driver());
        // tokio-postgres appends hosts and ports (for multi-host strings); a part given
        // separately replaces what the string said instead.
        if host.is_some() || port.is_some() {
            base = replace_endpoint(&base, host, port);
        }
        if let Some(dbname) = dbname {
            base.dbname(dbname);
        }
        if let Some(user) = user {
            base.user(user);
        }
        // libpq's environment variables fill what the target leaves out.
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if base.get_hosts().is_empty() {
            match env("PGHOST") {
                Some(host) => {
                    base.host(host);
                }
                None => return Err(TargetError::NoHost),
            }
        }
        if base.get_ports().is_empty() {
            if let Some(port) = env("PGPORT").and_then(|p| p.parse::<u16>().ok()) {
                base.port(port);
            }
        }
        if base.get_dbname().is_none() {
            if let Some(dbname) = env("PGDATABASE") {
                base.dbname(dbname);
            }
        }
        if base.get_user().is_none() {
            base.user(env("PGUSER").unwrap_or_else(|| "postgres".to_string()));
        }
        base.application_name(APPLICATION_NAME);
        base.connect_timeout(connect_timeout);
        // Keepalives notice a network that silently stopped forwarding.
        base.keepalives(true);
        base.keepalives_idle(Duration::from_secs(30));
        base.keepalives_interval(Duration::from_secs(10));
        base.keepalives_retries(3);
        let display = describe(&base);
        Ok(ConnectionSettings {
            base,
            password,
            tls,
            display,
        })
    }

    /// The database these settings open, when one is named.
    pub fn dbname(&self) -> Option<&str> {
        self.base.get_dbname()
    }

    /// The same server, user, password source and TLS, on another database.
    pub fn with_dbname(&self, dbname: &str) -> ConnectionSettings {
        let mut base = self.base.clone();
        base.dbname(dbname);
        ConnectionSettings {
            display: describe(&base),
            base,
            password: self.password.clone(),
            tls: self.tls.clone(),
        }
    }

    /// The tokio-postgres configuration with the password read from its source now.
    pub fn resolve(&self) -> Result<tokio_postgres::Config, TargetError> {
        let mut config = self.base.clone();
        if let Some(source) = &self.password {
            config.password(source.read()?);
        } else if config.get_password().is_none() {
            if let Some(password) = self.pgpass() {
                config.password(password);
            }
        }
        Ok(config)
    }

    /// The password from `PGPASSFILE` or `~/.pgpass` for this host, port, database and user,
    /// read on every connect like the other sources.
    fn pgpass(&self) -> Option<String> {
        let path = std::env::var_os("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pgpass")))?;
        let text = std::fs::read_to_string(path).ok()?;
        let host = match self.base.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "localhost".to_string(),
        };
        let port = self
            .base
            .get_ports()
            .first()
            .copied()
            .unwrap_or(5432)
            .to_string();
        let dbname = self.base.get_dbname().unwrap_or_default().to_string();
        let user = self.base.get_user().unwrap_or_default().to_string();
        pgpass_lookup(&text, &[&host, &port, &dbname, &user])
    }
}

/// Finds the password in `.pgpass` text: `host:port:database:user:password` lines, `*` matching
/// anything, `\:` and `\\` escaping; the first matching line wins.
pub fn pgpass_lookup(text: &str, wanted: &[&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut current = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        current.push(next);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut current)),
                other => current.push(other),
            }
        }
        fields.push(current);
        if fields.len() != 5 {
            continue;
        }
        let matches = fields
            .iter()
            .zip(wanted.iter())
            .all(|(field, want)| field == "*" || field == want);
        if matches {
            return fields.pop();
        }
    }
    None
}

/// A copy of `config` with its host and/or port replaced.
fn replace_endpoint(
    config: &tokio_postgres::Config,
    host: Option<String>,
    port: Option<u16>,
) -> tokio_postgres::Config {
    let mut fresh = tokio_postgres::Config::new();
    match host {
        Some(host) => {
            fresh.host(host);
        }
        None => {
            for h in config.get_hosts() {
                match h {
                    tokio_postgres::config::Host::Tcp(name) => {
                        fresh.host(name);
                    }
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(path) => {
                        fresh.host_path(path);
                    }
                }
            }
        }
    }
    match port {
        Some(port) => {
            fresh.port(port);
        }
        None => {
            for p in config.get_ports() {
                fresh.port(*p);
            }
        }
    }
    if let Some(user) = config.get_user() {
        fresh.user(user);
    }
    if let Some(password) = config.get_password() {
        fresh.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        fresh.dbname(dbname);
    }
    if let Some(options) = config.get_options() {
        fresh.options(options);
    }
    fresh.ssl_mode(config.get_ssl_mode());
    fresh
}

fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "?".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{}:{}/{}",
        config.get_user().unwrap_or("?"),
        host,
        port,
        config.get_dbname().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_url_error_does_not_contain_password() {
        let error = ConnectionSettings::new(
            Some("postgres://u:S3cretPw!@host:notaport/db"),
            None,
            None,
            None,
            None,
            None,
            Duration::from_secs(1),
            BTreeMap::new(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(error.contains("invalid connection string"), "{error}");
        assert!(!error.contains("S3cretPw"), "{error}");
    }

    #[test]
    fn debug_output_is_redacted() {
        let settings = ConnectionSettings::new(
            Some("host=db user=u password=S3cretPw dbname=x"),
            None,
            None,
            None,
            None,
            None,
            Duration::from_secs(1),
            BTreeMap::new(),
        )
        .expect("valid");
        let debug = format!("{settings:?}");
        assert!(!debug.contains("S3cretPw"), "{debug}");
        assert_eq!(settings.display, "u@db:5432/x");
    }

    #[test]
    fn parts_override_the_url() {
        let settings = ConnectionSettings::new(
            Some("postgres://a@h1:1/d1"),
            Some("h2".into()),
            Some(2),
            Some("d2".into()),
            Some("b".into()),
            None,
            Duration::from_secs(1),
            BTreeMap::new(),
        )
        .expect("valid");
        assert_eq!(settings.display, "b@h2:2/d2");
    }

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let text = "# comment\ndb:5432:app:u:first\n*:*:*:admin:a\\:b\\\\c\nother:*:*:*:nope\n";
        assert_eq!(
            pgpass_lookup(text, &["db", "5432", "app", "u"]).as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_lookup(text, &["x", "1", "y", "admin"]).as_deref(),
            Some("a:b\\c")
        );
        assert_eq!(pgpass_lookup(text, &["db", "5433", "app", "u"]), None);
    }

    #[test]
    fn password_file_is_read_each_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "one\n").expect("write");
        let source = PasswordSource::File(file.clone());
        assert_eq!(source.read().expect("read"), "one");
        std::fs::write(&file, "two").expect("write");
        assert_eq!(source.read().expect("read"), "two");
    }
}

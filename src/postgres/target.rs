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
pub(crate) const APPLICATION_NAME: &str = "deploywatch";

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
    #[error("environment variable {0} is not set")]
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
    pub(crate) fn read(&self) -> Result<String, TargetError> {
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
    pub(crate) tls: TlsSettings,
    /// A human description without secrets, e.g. `postgres@127.0.0.1:5432/cognit`.
    pub display: String,
    /// Whether sessions may be opened as a superuser (refused unless the target allows it).
    pub allow_superuser: bool,
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("display", &self.display)
            .field("password", &self.password)
            .field("allow_superuser", &self.allow_superuser)
            .field("tls", &self.tls)
            .finish()
    }
}

/// What a target says about its connection: a connection string (libpq URL or `key=value`
/// form) and/or parts. Parts override what the string says; `tls_options` (sslmode,
/// sslrootcert, sslcert, sslkey) override the string's TLS options.
#[derive(Debug, Default)]
pub struct ConnectionParts<'a> {
    pub url: Option<&'a str>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<PasswordSource>,
    pub tls_options: BTreeMap<String, String>,
}

impl ConnectionSettings {
    /// Settings from a connection string alone.
    pub fn parse(url: &str, connect_timeout: Duration) -> Result<Self, TargetError> {
        let parts = ConnectionParts {
            url: Some(url),
            ..ConnectionParts::default()
        };
        ConnectionSettings::new(parts, connect_timeout)
    }

    /// Settings from a connection string the test knows to be valid, with a one-second
    /// connect timeout.
    #[cfg(test)]
    pub(crate) fn for_test(url: &str) -> Self {
        ConnectionSettings::parse(url, Duration::from_secs(1)).expect("a valid connection string")
    }

    /// Settings from a connection string and/or parts.
    pub fn new(parts: ConnectionParts<'_>, connect_timeout: Duration) -> Result<Self, TargetError> {
        let ConnectionParts {
            url,
            host,
            port,
            dbname,
            user,
            password,
            tls_options,
        } = parts;
        let (rest, mut options) = match url {
            Some(text) => split_options(text),
            None => (String::new(), BTreeMap::new()),
        };
        options.extend(tls_options);
        let tls = TlsSettings::from_options(&options)?;
        let mut base = match url {
            // Neither the string nor any part of it is ever shown: it may hold a password.
            Some(text) => {
                if let Some(problem) = connection_string_problem(text) {
                    return Err(TargetError::InvalidConnectionString(problem));
                }
                tokio_postgres::Config::from_str(&rest)
                    .map_err(|e| TargetError::InvalidConnectionString(safe_parse_error(&e)))?
            }
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
            allow_superuser: false,
        })
    }

    /// The database these settings open, when one is named.
    pub(crate) fn dbname(&self) -> Option<&str> {
        self.base.get_dbname()
    }

    /// The server these settings reach, `host:port`: targets with the same one share a
    /// session budget.
    pub(crate) fn server(&self) -> String {
        let host = match self.base.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = self.base.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// Who reads the server's statistics through these settings, `user@host:port`. The
    /// server-wide views depend on the role that reads them (without `pg_read_all_stats`,
    /// other roles' statements have no query id) and the sampler leaves out the reading role's
    /// own statements, so one reading serves only targets that connect as the same role.
    pub(crate) fn statistics_reader(&self) -> String {
        format!(
            "{}@{}",
            self.base.get_user().unwrap_or_default(),
            self.server()
        )
    }

    /// The same server, user, password source and TLS, on another database.
    pub(crate) fn with_dbname(&self, dbname: &str) -> ConnectionSettings {
        let mut base = self.base.clone();
        base.dbname(dbname);
        ConnectionSettings {
            display: describe(&base),
            base,
            password: self.password.clone(),
            tls: self.tls.clone(),
            allow_superuser: self.allow_superuser,
        }
    }

    /// The tokio-postgres configuration with the password read from its source now.
    pub(crate) fn resolve(&self) -> Result<tokio_postgres::Config, TargetError> {
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

/// libpq's connection keywords, which an error may name (an unknown word may be part of a
/// password and is never shown).
const LIBPQ_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Why a connection string cannot be read as meant, in words that quote none of it (it may
/// hold a password). `None` when nothing is wrong that can be found before parsing.
pub(crate) fn connection_string_problem(text: &str) -> Option<String> {
    let rest = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"));
    match rest {
        Some(rest) => url_problem(rest),
        None if text.contains("://") => Some(
            "a URL must start with postgres:// or postgresql://, the key/value form is \
             key=value pairs separated by spaces"
                .to_string(),
        ),
        None => key_value_problem(text),
    }
}

fn url_problem(rest: &str) -> Option<String> {
    // The credentials end at the first '@'; the host list at the next '/' or '?'.
    let (credentials, after) = match rest.split_once('@') {
        Some((credentials, after)) => (Some(credentials), after),
        None => (None, rest),
    };
    let hosts = after.split(['/', '?']).next().unwrap_or_default();
    if hosts.contains('@') {
        return Some(
            "unencoded '@' in the user name or password: percent-encode it as %40".to_string(),
        );
    }
    if let Some(credentials) = credentials {
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        if user.is_empty() && !password.is_empty() {
            return Some("a password without a user name before it".to_string());
        }
        if has_bad_percent(user) || has_bad_percent(password) {
            return Some(
                "a '%' in the user name or password that is not a %XX escape: percent-encode \
                 it as %25"
                    .to_string(),
            );
        }
    }
    for host in hosts.split(',') {
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-._:[]%".contains(c);
        if !host.chars().all(allowed) {
            return Some(
                "the host part holds a character no host name has (a space, '#', '!' ...); \
                 if it belongs to the password, percent-encode it (e.g. '#' as %23)"
                    .to_string(),
            );
        }
    }
    None
}

fn has_bad_percent(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

fn key_value_problem(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if chars.get(i) != Some(&'=') {
            return Some(
                "a word without '=' after it: a value holding spaces must be quoted, e.g. \
                 password='a b'"
                    .to_string(),
            );
        }
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if chars.get(i) == Some(&'\'') {
            i += 1;
            let mut closed = false;
            while i < chars.len() {
                match chars[i] {
                    '\\' => i += 2,
                    '\'' => {
                        closed = true;
                        i += 1;
                        break;
                    }
                    _ => i += 1,
                }
            }
            if !closed {
                return Some(format!(
                    "the quoted value of {} has no closing quote",
                    shown_keyword(&key)
                ));
            }
        } else {
            let value_start = i;
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            if i == value_start {
                return Some(format!("{} has no value", shown_keyword(&key)));
            }
        }
        if !LIBPQ_KEYWORDS.contains(&key.as_str()) {
            return Some(
                "a word that is not a libpq option (not shown: it may be part of a password); \
                 quote values holding spaces, e.g. password='a b'"
                    .to_string(),
            );
        }
    }
    None
}

/// The keyword for a message when it is one of libpq's, else a neutral phrase.
fn shown_keyword(key: &str) -> String {
    if LIBPQ_KEYWORDS.contains(&key) {
        format!("`{key}`")
    } else {
        "an option".to_string()
    }
}

/// tokio-postgres' parse error, kept only when it names a libpq option (`invalid value for
/// option `port``); anything else may quote the string and is replaced.
fn safe_parse_error(error: &tokio_postgres::Error) -> String {
    let text = std::error::Error::source(error)
        .map(|cause| cause.to_string())
        .unwrap_or_default();
    for keyword in LIBPQ_KEYWORDS {
        if text.ends_with(&format!("invalid value for option `{keyword}`")) {
            return format!("invalid value for `{keyword}`");
        }
        if text.ends_with(&format!("unknown option `{keyword}`")) {
            return format!("option `{keyword}` is not supported");
        }
    }
    "it cannot be parsed (the text is not shown, as it may hold a password)".to_string()
}

/// Finds the password in `.pgpass` text: `host:port:database:user:password` lines, `*` matching
/// anything, `\:` and `\\` escaping; the first matching line wins.
pub(crate) fn pgpass_lookup(text: &str, wanted: &[&str; 4]) -> Option<String> {
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
        let error = error_of("postgres://u:S3cretPw!@host:notaport/db");
        assert!(error.contains("invalid connection string"), "{error}");
        assert!(!error.contains("S3cretPw"), "{error}");
    }

    fn error_of(url: &str) -> String {
        ConnectionSettings::parse(url, Duration::from_secs(1))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn an_unencoded_at_sign_is_refused_without_showing_any_part() {
        let error = error_of("postgres://usr7:Zq9@SECRET-xyz@host/db");
        assert!(
            error.contains("unencoded '@' in the user name or password: percent-encode it as %40"),
            "{error}"
        );
        for part in ["Zq9", "SECRET", "xyz", "host/", "usr7"] {
            assert!(!error.contains(part), "{part} in {error}");
        }
        // Encoded, it is fine.
        assert_eq!(error_of("postgres://usr7:Zq9%40SECRET-xyz@host/db"), "");
    }

    #[test]
    fn malformed_strings_are_explained_without_their_text() {
        for (text, reason) in [
            ("postgres://u@SECRET#host/db", "host part"),
            ("postgres://u:50%SECRET@host/db", "%25"),
            ("host=db password=abc SECRET user=u", "must be quoted"),
            ("host=db password=abc SECRET=1 user=u", "not a libpq option"),
            ("host=db password='SECRET user=u", "no closing quote"),
            (
                "postgress://u:SECRET@host/db",
                "must start with postgres://",
            ),
            (
                "postgres://u:SECRET@host:port/db",
                "invalid value for `port`",
            ),
        ] {
            let error = error_of(text);
            assert!(error.contains(reason), "{text}: {error}");
            assert!(!error.contains("SECRET"), "{text}: {error}");
        }
    }

    #[test]
    fn debug_output_is_redacted() {
        let settings = ConnectionSettings::for_test("host=db user=u password=S3cretPw dbname=x");
        let debug = format!("{settings:?}");
        assert!(!debug.contains("S3cretPw"), "{debug}");
        assert_eq!(settings.display, "u@db:5432/x");
    }

    #[test]
    fn parts_override_the_url() {
        let parts = ConnectionParts {
            url: Some("postgres://a@h1:1/d1"),
            host: Some("h2".into()),
            port: Some(2),
            dbname: Some("d2".into()),
            user: Some("b".into()),
            ..ConnectionParts::default()
        };
        let settings = ConnectionSettings::new(parts, Duration::from_secs(1)).expect("valid");
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

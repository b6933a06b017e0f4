//! Protection of the HTTP endpoints, in the format of the Prometheus exporter toolkit's web
//! configuration file (the file other exporters take with `--web.config.file`):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.pem
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: ca.pem                         # optional
//! basic_auth_users:
//!   prometheus: $2y$10$...                         # bcrypt hashes
//! ```
//!
//! `/healthz` and `/readyz` stay open for probes unless `protect_probes: true`. Credentials are
//! checked with bcrypt, whose comparison takes the same time whatever the input; answers to
//! wrong or missing credentials say only "unauthorized".
//!
//! Like the exporter toolkit, the daemon follows the file as it changes ([`LiveWebConfig`]):
//! when the web configuration or a certificate, key or CA file it names is replaced (a renewed
//! certificate, a new user), new connections and requests use the new version. A broken new
//! version is logged and the previous one stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde::Deserialize;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;

#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    #[error("{path}: cannot read the web configuration: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebConfig {
    tls_server_config: Option<RawTls>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    #[serde(default)]
    protect_probes: bool,
    /// Accepted for compatibility with the exporter toolkit; HTTP/2 is not served.
    http_server_config: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
}

/// The validated web configuration.
pub struct WebConfig {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    users: BTreeMap<String, String>,
    protect_probes: bool,
    /// SHA-256 digests of Authorization headers already verified: bcrypt is deliberately slow,
    /// scrapes are frequent. Compared in constant time, every entry every time.
    verified: Mutex<Vec<[u8; 32]>>,
    /// A hash of the users' cost, checked for unknown users so they take as long as known ones.
    dummy: String,
    /// The configuration file and every file it names, to notice a change.
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("protect_probes", &self.protect_probes)
            .finish()
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> WebConfigError {
    WebConfigError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn certs(
    path: &Path,
    key: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, WebConfigError> {
    let data = std::fs::read(path).map_err(|e| invalid(path, format!("{key}: {e}")))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path, format!("{key}: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, format!("{key}: no PEM certificate")));
    }
    Ok(certs)
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| WebConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let raw: RawWebConfig =
            serde_yaml::from_str(&text).map_err(|e| invalid(path, e.to_string()))?;
        let _ = raw.http_server_config;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut files = vec![path.to_path_buf()];
        if let Some(t) = &raw.tls_server_config {
            files.push(base.join(&t.cert_file));
            files.push(base.join(&t.key_file));
            files.extend(t.client_ca_file.as_ref().map(|ca| base.join(ca)));
        }
        for (user, hash) in &raw.basic_auth_users {
            if !hash.starts_with("$2") {
                return Err(invalid(
                    path,
                    format!("basic_auth_users.{user}: not a bcrypt hash (htpasswd -nBC 10 \"\" | tr -d ':')"),
                ));
            }
        }
        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let builder = rustls::ServerConfig::builder_with_provider(provider.clone());
                let builder = match t.min_version.as_deref() {
                    None | Some("TLS12") => builder.with_safe_default_protocol_versions(),
                    Some("TLS13") => builder.with_protocol_versions(&[&rustls::version::TLS13]),
                    Some(other) => {
                        return Err(invalid(
                            path,
                            format!(
                                "tls_server_config.min_version: {other:?} is not TLS12 or TLS13"
                            ),
                        ))
                    }
                }
                .map_err(|e| invalid(path, e.to_string()))?;
                let client_auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
                let builder = match (client_auth, &t.client_ca_file) {
                    ("NoClientCert", _) => builder.with_no_client_auth(),
                    ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", Some(ca)) => {
                        let mut roots = rustls::RootCertStore::empty();
                        for cert in certs(&base.join(ca), "tls_server_config.client_ca_file")? {
                            roots.add(cert).map_err(|e| invalid(path, e.to_string()))?;
                        }
                        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                            Arc::new(roots),
                            provider.clone(),
                        );
                        let verifier = if client_auth == "VerifyClientCertIfGiven" {
                            verifier.allow_unauthenticated()
                        } else {
                            verifier
                        };
                        builder.with_client_cert_verifier(verifier.build().map_err(|e| invalid(path, e.to_string()))?)
                    }
                    (_, None) if client_auth != "NoClientCert" => {
                        return Err(invalid(path, "tls_server_config.client_ca_file is required to verify client certificates"))
                    }
                    (other, _) => {
                        return Err(invalid(path, format!("tls_server_config.client_auth_type: {other:?} is not supported (NoClientCert, RequireAndVerifyClientCert, VerifyClientCertIfGiven)")))
                    }
                };
                let chain = certs(&base.join(&t.cert_file), "tls_server_config.cert_file")?;
                let key_path = base.join(&t.key_file);
                let key_data = std::fs::read(&key_path)
                    .map_err(|e| invalid(path, format!("tls_server_config.key_file: {e}")))?;
                let key = rustls_pemfile::private_key(&mut key_data.as_slice())
                    .map_err(|e| invalid(path, format!("tls_server_config.key_file: {e}")))?
                    .ok_or_else(|| {
                        invalid(path, "tls_server_config.key_file: no PEM private key")
                    })?;
                let mut config = builder
                    .with_single_cert(chain, key)
                    .map_err(|e| invalid(path, format!("tls_server_config: {e}")))?;
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
        };
        let cost = raw
            .basic_auth_users
            .values()
            .next()
            .and_then(|h| h.get(4..6))
            .and_then(|c| c.parse::<u32>().ok())
            .unwrap_or(10);
        let dummy = if raw.basic_auth_users.is_empty() {
            String::new()
        } else {
            bcrypt::hash("deploywatch", cost).map_err(|e| invalid(path, e.to_string()))?
        };
        Ok(WebConfig {
            tls,
            users: raw.basic_auth_users,
            protect_probes: raw.protect_probes,
            verified: Mutex::new(Vec::new()),
            dummy,
            files,
        })
    }

    /// Modification times of the files this configuration was read from.
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        modification_times(&self.files)
    }

    /// Whether `path` needs credentials at all.
    pub(crate) fn protects(&self, path: &str) -> bool {
        if self.users.is_empty() {
            return false;
        }
        let probe = path == "/healthz" || path == "/readyz";
        !probe || self.protect_probes
    }

    /// Checks an `Authorization: Basic ...` header value.
    pub(crate) fn authorized(&self, header: Option<&str>) -> bool {
        let Some(value) = header else { return false };
        let digest: [u8; 32] = sha2::Sha256::digest(value.as_bytes()).into();
        {
            let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            let seen = verified
                .iter()
                .fold(subtle::Choice::from(0), |seen, known| {
                    seen | known.ct_eq(&digest)
                });
            if bool::from(seen) {
                return true;
            }
        }
        let Some(encoded) = value.strip_prefix("Basic ") else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = text.split_once(':') else {
            return false;
        };
        let (hash, known) = match self.users.get(user) {
            Some(hash) => (hash.as_str(), true),
            None => (self.dummy.as_str(), false),
        };
        let ok = bcrypt::verify(password, hash).unwrap_or(false) && known;
        if ok {
            let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified.len() >= 64 {
                verified.clear();
            }
            verified.push(digest);
        }
        ok
    }
}

fn modification_times(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// How often [`LiveWebConfig::current`] looks at the files' modification times.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// A web configuration that follows its files: see the module documentation.
#[derive(Debug)]
pub struct LiveWebConfig {
    path: PathBuf,
    current: RwLock<Arc<WebConfig>>,
    /// When the files were last looked at, and their modification times then.
    seen: Mutex<(Instant, Vec<Option<SystemTime>>)>,
}

impl LiveWebConfig {
    pub fn load(path: &Path) -> Result<LiveWebConfig, WebConfigError> {
        let config = WebConfig::load(path)?;
        let stamps = config.stamps();
        Ok(LiveWebConfig {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new((Instant::now(), stamps)),
        })
    }

    /// The configuration in force. At most once a second it first checks whether a file
    /// changed, and if so reads the new version; one that does not load is logged and ignored
    /// until its files change again.
    pub fn current(&self) -> Arc<WebConfig> {
        if self.changed() {
            match WebConfig::load(&self.path) {
                Ok(config) => {
                    tracing::info!(path = %self.path.display(), "web configuration reloaded");
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                }
                Err(error) => {
                    tracing::error!(%error, "new web configuration rejected; the previous one stays in force");
                }
            }
        }
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether a file changed since the last look (the new times are recorded, so a file
    /// written later is noticed at a later look).
    fn changed(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.0.elapsed() < RECHECK_EVERY {
            return false;
        }
        seen.0 = Instant::now();
        // The files of the version in force, which may name files the first one did not.
        let files = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .files
            .clone();
        let stamps = modification_times(&files);
        if stamps == seen.1 {
            return false;
        }
        seen.1 = stamps;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_checks_bcrypt_hashes_and_leaves_probes_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let path = dir.path().join("web.yml");
        std::fs::write(
            &path,
            format!("basic_auth_users:\n  prometheus: '{hash}'\n"),
        )
        .expect("write");
        let web = WebConfig::load(&path).expect("valid");
        let header = |user: &str, password: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )
        };
        assert!(web.authorized(Some(&header("prometheus", "s3cret"))));
        assert!(
            web.authorized(Some(&header("prometheus", "s3cret"))),
            "cached"
        );
        assert!(!web.authorized(Some(&header("prometheus", "wrong"))));
        assert!(!web.authorized(Some(&header("nobody", "s3cret"))));
        assert!(!web.authorized(None));
        assert!(web.protects("/metrics"));
        assert!(!web.protects("/healthz"));
    }

    #[test]
    fn a_plain_password_instead_of_a_hash_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.yml");
        std::fs::write(&path, "basic_auth_users:\n  prometheus: hunter2\n").expect("write");
        let error = WebConfig::load(&path).expect_err("refused").to_string();
        assert!(
            error.contains("basic_auth_users.prometheus") && !error.contains("hunter2"),
            "{error}"
        );
    }
}

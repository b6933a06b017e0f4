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
//! bcrypt is slow on purpose, so it must not be a lever against the daemon
//! ([`LiveWebConfig::authorize`]): it runs on a few threads of its own ([`bcrypt_slots`]),
//! never on the async workers, at the lowest CPU priority (nice 19) so that probes, scrapes
//! and checks go first, with a bounded queue; credentials once verified are remembered (a bounded set of
//! digests), so a scraper pays for bcrypt once; and each client address may fail only a few
//! times before its further attempts are answered `429 Too Many Requests` without running
//! bcrypt at all (a token bucket per address, refilled slowly).
//!
//! Like the exporter toolkit, the daemon follows the file as it changes ([`LiveWebConfig`]):
//! when the web configuration or a certificate, key or CA file it names is replaced (a renewed
//! certificate, a new user), new connections and requests use the new version. A broken new
//! version is logged and the previous one stays in force.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
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

/// Whether the web configuration at `path` makes the daemon serve HTTPS, read without loading
/// its certificate or key (a client need not be able to read those). `false` when the file
/// cannot be read or parsed: the daemon would refuse it anyway.
pub(crate) fn serves_tls(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_yaml::from_str::<RawWebConfig>(&text).ok())
        .is_some_and(|raw| raw.tls_server_config.is_some())
}

/// The validated web configuration.
pub(crate) struct WebConfig {
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
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
    pub(crate) fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
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

    /// Whether these exact header bytes were verified before (constant time over the set).
    fn remembered(&self, digest: &[u8; 32]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let seen = verified
            .iter()
            .fold(subtle::Choice::from(0), |seen, known| {
                seen | known.ct_eq(digest)
            });
        bool::from(seen)
    }

    /// Remembers a verified header; the oldest is forgotten beyond [`VERIFIED_CAPACITY`].
    fn remember(&self, digest: [u8; 32]) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CAPACITY {
            verified.remove(0);
        }
        verified.push(digest);
    }

    /// The password and the hash to check it against (a dummy one for unknown users, so they
    /// take as long), or `None` for a header that is not basic authentication.
    fn credentials(&self, header: &str) -> Option<(String, String, bool)> {
        let encoded = header.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        let (hash, known) = match self.users.get(user) {
            Some(hash) => (hash.clone(), true),
            None => (self.dummy.clone(), false),
        };
        Some((password.to_string(), hash, known))
    }

    /// Checks an `Authorization: Basic ...` header value, running bcrypt on this thread
    /// (the server uses [`LiveWebConfig::authorize`] instead).
    #[cfg(test)]
    pub(crate) fn authorized(&self, header: Option<&str>) -> bool {
        let Some(value) = header else { return false };
        let digest: [u8; 32] = sha2::Sha256::digest(value.as_bytes()).into();
        if self.remembered(&digest) {
            return true;
        }
        let Some((password, hash, known)) = self.credentials(value) else {
            return false;
        };
        let ok = bcrypt::verify(password, &hash).unwrap_or(false) && known;
        if ok {
            self.remember(digest);
        }
        ok
    }
}

/// How many verified Authorization headers are remembered.
const VERIFIED_CAPACITY: usize = 64;
/// Failed attempts a client address may make at once before it is throttled.
const FAILURE_BURST: f64 = 5.0;
/// Failed attempts a client address is allowed per second after the burst.
const FAILURE_REFILL_PER_SECOND: f64 = 0.5;
/// Client addresses whose failures are tracked; beyond that idle ones are forgotten first.
const TRACKED_ADDRESSES: usize = 4096;

/// Verifications waiting for a bcrypt thread; beyond that a request is told to retry.
const BCRYPT_QUEUE: usize = 32;

/// How many bcrypt verifications may run at once: half the cores, at least one, so the
/// async workers always keep CPU time for probes, scrapes and checks.
pub(crate) fn bcrypt_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}

/// A password, the hash to check it against, and where to send the answer.
type BcryptJob = (String, String, tokio::sync::oneshot::Sender<bool>);

/// The threads that run bcrypt, at the lowest CPU priority; they end with the sender.
fn bcrypt_workers() -> std::sync::mpsc::SyncSender<BcryptJob> {
    let (sender, receiver) = std::sync::mpsc::sync_channel::<BcryptJob>(BCRYPT_QUEUE);
    let receiver = Arc::new(Mutex::new(receiver));
    for index in 0..bcrypt_slots() {
        let receiver = receiver.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("bcrypt-{index}"))
            .spawn(move || {
                if let Err(error) = thread_priority::ThreadPriority::Min.set_for_current() {
                    tracing::debug!(?error, "cannot lower the bcrypt thread's priority");
                }
                loop {
                    let job = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((password, hash, reply)) = job else {
                        return;
                    };
                    let _ = reply.send(bcrypt::verify(password, &hash).unwrap_or(false));
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "cannot start a bcrypt thread");
        }
    }
    sender
}

/// What an Authorization header gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthVerdict {
    Allowed,
    Denied,
    /// Too many failures from this address; try again after this long.
    Throttled(Duration),
}

/// A token bucket of allowed failures per client address.
#[derive(Debug, Default)]
struct FailureThrottle {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl FailureThrottle {
    /// Takes one allowed failure from `address`'s bucket, or says how long until there is one.
    fn reserve(&mut self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() >= TRACKED_ADDRESSES && !self.buckets.contains_key(&address) {
            // Forget the addresses whose buckets are full again (nothing to remember).
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * FAILURE_REFILL_PER_SECOND
                    < FAILURE_BURST
            });
            if self.buckets.len() >= TRACKED_ADDRESSES {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(address).or_insert((FAILURE_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * FAILURE_REFILL_PER_SECOND)
            .min(FAILURE_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - *tokens) / FAILURE_REFILL_PER_SECOND,
            ))
        }
    }

    /// Gives back a reserved failure (the attempt succeeded).
    fn refund(&mut self, address: IpAddr) {
        if let Some((tokens, _)) = self.buckets.get_mut(&address) {
            *tokens = (*tokens + 1.0).min(FAILURE_BURST);
        }
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
pub(crate) struct LiveWebConfig {
    path: PathBuf,
    current: RwLock<Arc<WebConfig>>,
    /// When the files were last looked at, and their modification times then.
    seen: Mutex<(Instant, Vec<Option<SystemTime>>)>,
    /// The bcrypt threads' queue.
    bcrypt: std::sync::mpsc::SyncSender<BcryptJob>,
    /// Failures per client address (kept across reloads of the file).
    throttle: Mutex<FailureThrottle>,
}

impl LiveWebConfig {
    pub(crate) fn load(path: &Path) -> Result<LiveWebConfig, WebConfigError> {
        let config = WebConfig::load(path)?;
        let stamps = config.stamps();
        Ok(LiveWebConfig {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(config)),
            seen: Mutex::new((Instant::now(), stamps)),
            bcrypt: bcrypt_workers(),
            throttle: Mutex::new(FailureThrottle::default()),
        })
    }

    /// Checks an `Authorization` header from `client` against `config` without stalling the
    /// async workers: see the module documentation.
    pub(crate) async fn authorize(
        &self,
        config: &Arc<WebConfig>,
        header: Option<&str>,
        client: IpAddr,
    ) -> AuthVerdict {
        let Some(value) = header else {
            return AuthVerdict::Denied;
        };
        let digest: [u8; 32] = sha2::Sha256::digest(value.as_bytes()).into();
        if config.remembered(&digest) {
            return AuthVerdict::Allowed;
        }
        let Some((password, hash, known)) = config.credentials(value) else {
            return AuthVerdict::Denied;
        };
        let reserved = self
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reserve(client, Instant::now());
        if let Err(wait) = reserved {
            return AuthVerdict::Throttled(wait);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.bcrypt.try_send((password, hash, reply)).is_err() {
            // Every bcrypt thread is busy and the queue is full: no more work is taken on.
            self.throttle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refund(client);
            return AuthVerdict::Throttled(Duration::from_secs(1));
        }
        let verified = answer.await.unwrap_or(false);
        if verified && known {
            config.remember(digest);
            self.throttle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refund(client);
            AuthVerdict::Allowed
        } else {
            AuthVerdict::Denied
        }
    }

    /// The configuration in force. At most once a second it first checks whether a file
    /// changed, and if so reads the new version; one that does not load is logged and ignored
    /// until its files change again.
    pub(crate) fn current(&self) -> Arc<WebConfig> {
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
    fn failures_are_throttled_per_address_and_refill_slowly() {
        let mut throttle = FailureThrottle::default();
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(throttle.reserve(a, start), Ok(()));
        }
        let wait = throttle.reserve(a, start).expect_err("throttled");
        assert!(wait <= Duration::from_secs(2), "{wait:?}");
        assert_eq!(
            throttle.reserve(b, start),
            Ok(()),
            "other addresses are not"
        );
        assert_eq!(throttle.reserve(a, start + Duration::from_secs(2)), Ok(()));
        assert!(throttle.reserve(a, start + Duration::from_secs(2)).is_err());
        throttle.refund(a);
        assert_eq!(throttle.reserve(a, start + Duration::from_secs(2)), Ok(()));
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

//! TLS to PostgreSQL with libpq's names and semantics, so users can paste what they already use:
//! `sslmode` = `disable`, `prefer`, `require`, `verify-ca`, `verify-full`; `sslrootcert` (a CA
//! file, or `system` for the operating system's roots); `sslcert` / `sslkey` for a client
//! certificate. tokio-postgres knows only disable/prefer/require, so these options are taken out
//! of the connection string here and turned into a rustls client configuration.
//!
//! As in libpq, `prefer` and `require` encrypt without checking who answers; `verify-ca`
//! checks the chain against the root certificates; `verify-full` also checks the host name.
//! Without `sslrootcert`, libpq's default `~/.postgresql/root.crt` is used when it exists, and
//! `require` with a root certificate (given or default) checks the chain like `verify-ca`, as
//! libpq does for backwards compatibility. `allow` is taken as `prefer`: TLS is tried first.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) fn parse(text: &str) -> Option<SslMode> {
        match text {
            "disable" => Some(SslMode::Disable),
            "prefer" | "allow" => Some(SslMode::Prefer),
            "require" => Some(SslMode::Require),
            "verify-ca" => Some(SslMode::VerifyCa),
            "verify-full" => Some(SslMode::VerifyFull),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS is attempted and whether it is mandatory.
    pub(crate) fn for_driver(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RootCert {
    File(PathBuf),
    /// The operating system's trust store.
    System,
}

/// The TLS options of one target.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<RootCert>,
    pub(crate) client_cert: Option<PathBuf>,
    pub(crate) client_key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid sslmode {0:?}: use disable, prefer, require, verify-ca or verify-full")]
    Mode(String),
    #[error("sslmode={0} needs sslrootcert (a CA file, or \"system\"), or ~/.postgresql/root.crt")]
    NoRootCert(&'static str),
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("sslcert and sslkey go together")]
    HalfClientCert,
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

const TLS_KEYS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Takes the TLS options out of a connection string (URL or `key=value` form). Returns the
/// string without them and the options found.
pub(crate) fn split_options(text: &str) -> (String, BTreeMap<String, String>) {
    let mut found = BTreeMap::new();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        if let Some((base, query)) = text.split_once('?') {
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if TLS_KEYS.contains(&key) {
                    let value = url::form_urlencoded::parse(format!("v={value}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default();
                    found.insert(key.to_string(), value);
                } else {
                    kept.push(pair);
                }
            }
            let rebuilt = if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            };
            return (rebuilt, found);
        }
        return (text.to_string(), found);
    }
    // key=value pairs separated by spaces; values may be single-quoted.
    let mut kept = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        let mut quoted = false;
        while i < chars.len() && (quoted || !chars[i].is_whitespace()) {
            if chars[i] == '\\' {
                i += 1;
            } else if chars[i] == '\'' {
                quoted = !quoted;
            }
            i += 1;
        }
        let pair: String = chars[start..i.min(chars.len())].iter().collect();
        if pair.is_empty() {
            continue;
        }
        match pair.split_once('=') {
            Some((key, value)) if TLS_KEYS.contains(&key.trim()) => {
                found.insert(key.trim().to_string(), value.trim_matches('\'').to_string());
            }
            _ => kept.push(pair),
        }
    }
    (kept.join(" "), found)
}

impl TlsSettings {
    /// From the options of a connection string, then the target's own keys, then `PGSSLMODE`
    /// and `PGSSLROOTCERT` for what is still missing.
    pub(crate) fn from_options(
        options: &BTreeMap<String, String>,
    ) -> Result<TlsSettings, TlsError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mode_text = options
            .get("sslmode")
            .cloned()
            .or_else(|| env("PGSSLMODE"))
            .unwrap_or_else(|| "prefer".to_string());
        let mode = SslMode::parse(&mode_text).ok_or(TlsError::Mode(mode_text))?;
        let root_cert = options
            .get("sslrootcert")
            .cloned()
            .or_else(|| env("PGSSLROOTCERT"))
            .map(|v| {
                if v == "system" {
                    RootCert::System
                } else {
                    RootCert::File(PathBuf::from(v))
                }
            })
            .or_else(|| {
                // libpq's default root certificate file, when there is one.
                let default = PathBuf::from(env("HOME")?).join(".postgresql/root.crt");
                (mode != SslMode::Disable && default.is_file()).then_some(RootCert::File(default))
            });
        let client_cert = options.get("sslcert").map(PathBuf::from);
        let client_key = options.get("sslkey").map(PathBuf::from);
        if client_cert.is_some() != client_key.is_some() {
            return Err(TlsError::HalfClientCert);
        }
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            return Err(TlsError::NoRootCert(mode.as_str()));
        }
        Ok(TlsSettings {
            mode,
            root_cert,
            client_cert,
            client_key,
        })
    }

    /// The rustls configuration, or `None` for `disable`. Files are read now, so a rotated
    /// certificate is picked up by the next connection.
    pub(crate) fn client_config(&self) -> Result<Option<rustls::ClientConfig>, TlsError> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let verify_chain = match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        };
        let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            if self.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(Lenient {
                    provider,
                    chain: Some(webpki),
                })
            }
        } else {
            Arc::new(Lenient {
                provider,
                chain: None,
            })
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "sslcert")?;
                let key = read_key(key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Rustls(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(RootCert::File(path)) => add_roots(&mut roots, path, "sslrootcert")?,
            Some(RootCert::System) => add_system_roots(&mut roots),
            None => {}
        }
        Ok(roots)
    }
}

/// The PEM certificates of `path`; `what` names the setting it came from in errors.
pub(crate) fn read_certs(
    path: &PathBuf,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what,
        path: path.clone(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in it".to_string()));
    }
    Ok(certs)
}

/// Adds the system's CA certificates to `roots`; one rustls cannot parse is skipped, as the
/// system's own clients do.
pub(crate) fn add_system_roots(roots: &mut rustls::RootCertStore) {
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
}

/// Adds the PEM certificates of `path` to `roots` as trust anchors; `what` names the setting
/// it came from in errors (a file without a certificate, or one that cannot be an anchor).
pub(crate) fn add_roots(
    roots: &mut rustls::RootCertStore,
    path: &PathBuf,
    what: &'static str,
) -> Result<(), TlsError> {
    for cert in read_certs(path, what)? {
        roots.add(cert).map_err(|e| TlsError::File {
            what,
            path: path.clone(),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(())
}

fn read_key(path: &PathBuf) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        what: "sslkey",
        path: path.clone(),
        reason,
    };
    let data = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| file_error(e.to_string()))?
        .ok_or_else(|| file_error("no PEM private key in it".to_string()))
}

/// A verifier short of `verify-full`, with libpq's semantics. Handshake signatures are always
/// verified with the provider's algorithms.
/// - `prefer` / `require` (`chain` is `None`): encrypted, the server's identity is not checked;
/// - `verify-ca` (`chain` is set): the chain must lead to a trusted root; the host name is not
///   compared.
#[derive(Debug)]
struct Lenient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

/// The handshake signature methods of a verifier holding `provider`: each checks with the
/// provider's algorithms through rustls' function of the same name.
macro_rules! handshake_signatures {
    ($($method:ident),+) => {$(
        fn $method(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            let algorithms = &self.provider.signature_verification_algorithms;
            rustls::crypto::$method(message, cert, dss, algorithms)
        }
    )+};
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    handshake_signatures!(verify_tls12_signature, verify_tls13_signature);

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, kept: &str, options: &[(&str, &str)]) {
        let (rest, found) = split_options(input);
        assert_eq!(rest, kept, "{input}");
        let expected: BTreeMap<String, String> = options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(found, expected, "{input}");
    }

    #[test]
    fn tls_options_are_taken_out_of_connection_strings() {
        check(
            "postgres://u@db:5432/x?sslmode=verify-full&sslrootcert=%2Fca.pem&connect_timeout=3",
            "postgres://u@db:5432/x?connect_timeout=3",
            &[("sslmode", "verify-full"), ("sslrootcert", "/ca.pem")],
        );
        check(
            "postgres://u@db/x?sslmode=require",
            "postgres://u@db/x",
            &[("sslmode", "require")],
        );
        check("postgres://u@db/x", "postgres://u@db/x", &[]);
        check(
            "host=db dbname=x sslmode=verify-ca sslrootcert='/etc/ca.pem' user=u",
            "host=db dbname=x user=u",
            &[("sslmode", "verify-ca"), ("sslrootcert", "/etc/ca.pem")],
        );
    }

    #[test]
    fn modes_parse_and_verification_needs_roots() {
        let options = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(TlsSettings::from_options(&options(&[("sslmode", "verify-full")])).is_err());
        assert!(TlsSettings::from_options(&options(&[("sslmode", "bogus")])).is_err());
        assert!(
            TlsSettings::from_options(&options(&[("sslmode", "require"), ("sslcert", "/c")]))
                .is_err()
        );
        let s = TlsSettings::from_options(&options(&[
            ("sslmode", "verify-ca"),
            ("sslrootcert", "system"),
        ]))
        .expect("valid");
        assert_eq!(s.root_cert, Some(RootCert::System));
        assert_eq!(
            SslMode::VerifyFull.for_driver(),
            tokio_postgres::config::SslMode::Require
        );
    }
}

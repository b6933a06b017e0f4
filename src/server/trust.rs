//! Whom deploywatch's own HTTPS requests trust: the CLI's (`status`, `deploy mark`) and a
//! replica's announcement forwarded to the replica that owns its target. A certificate is
//! checked against the system's roots and, when given, the certificates of a PEM file (a
//! private CA, a self-signed certificate), read once, at the first https:// request.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("CA certificate: {0}")]
    CaFile(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// The roots an HTTPS certificate is checked against.
#[derive(Debug)]
pub struct Trust {
    ca_file: Option<PathBuf>,
    /// The setting the CA file came from, for its errors (`--cacert`).
    what: &'static str,
    roots: OnceLock<Arc<rustls::RootCertStore>>,
}

impl Default for Trust {
    fn default() -> Self {
        Trust::new(None)
    }
}

impl Trust {
    /// The system's roots and, when given, `--cacert`'s certificates.
    pub fn new(ca_file: Option<PathBuf>) -> Trust {
        Trust::from_setting(ca_file, "--cacert")
    }

    /// The system's roots and the certificates of `ca_file`, which the setting `what` names.
    pub(crate) fn from_setting(ca_file: Option<PathBuf>, what: &'static str) -> Trust {
        Trust {
            ca_file,
            what,
            roots: OnceLock::new(),
        }
    }

    /// The system's roots and the CA file's certificates.
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TrustError> {
        if let Some(roots) = self.roots.get() {
            return Ok(roots.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        crate::postgres::tls::add_system_roots(&mut roots);
        if let Some(path) = &self.ca_file {
            crate::postgres::tls::add_roots(&mut roots, path, self.what)
                .map_err(|e| TrustError::CaFile(e.to_string()))?;
        }
        Ok(self.roots.get_or_init(|| Arc::new(roots)).clone())
    }

    /// A connector for one request: TLS checked against the roots for an https:// URL; for a
    /// plain http:// one, which never uses TLS, no roots or CA file are read (the connector
    /// needs a configuration all the same).
    pub(crate) fn connector(
        &self,
        https: bool,
    ) -> Result<HttpsConnector<HttpConnector>, TrustError> {
        let roots = if https {
            self.roots()?
        } else {
            Arc::new(rustls::RootCertStore::empty())
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TrustError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build())
    }
}

/// An error and its sources, one after the other: hyper's client errors say what failed (a
/// certificate, a refused connection) only in their sources.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

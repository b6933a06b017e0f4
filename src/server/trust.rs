//! Whom deploywatch's own HTTPS requests trust: the CLI's (`status`, `deploy mark`) and a
//! replica's announcement forwarded to the replica that owns its target. A certificate is
//! checked against the system's roots and, when given, the certificates of a PEM file (a
//! private CA, a self-signed certificate), read once, at the first https:// request.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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

/// Why a request got no whole answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// No connection, a failed handshake, or a body cut short or too large.
    #[error("{0}")]
    Unreachable(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A whole answer: its status, content type and body.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<HeaderValue>,
    pub(crate) body: Bytes,
}

/// Sends `request` over HTTP or HTTPS, as its parsed scheme says (case-insensitive), with the
/// certificate checked against `trust`, and reads a body of at most `max_body` bytes, all
/// within `timeout`. A certificate error gets `certificate_hint` (where the CA comes from and
/// which name the certificate must hold) appended.
pub(crate) async fn exchange(
    trust: &Trust,
    request: Request<Full<Bytes>>,
    max_body: usize,
    timeout: Duration,
    certificate_hint: &str,
) -> Result<Answer, ExchangeError> {
    let https = request.uri().scheme() == Some(&hyper::http::uri::Scheme::HTTPS);
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(trust.connector(https)?);
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            let mut reason = error_chain(&e);
            if https && reason.contains("certificate") {
                reason.push_str(&format!(" ({certificate_hint})"));
            }
            ExchangeError::Unreachable(reason)
        })?;
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let body = Limited::new(response.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| ExchangeError::Unreachable(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status,
            content_type,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ExchangeError::Timeout(timeout))?
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

//! A small HTTP client for the CLI commands that talk to a running daemon
//! (`deploywatch status`, `deploywatch deploy mark`), over plain HTTP or HTTPS (the daemon's
//! `server.web_config_file`). Only this module knows hyper's client side.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach deploywatch at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("deploywatch at {url} did not answer within {TIMEOUT:?}")]
    Timeout { url: String },
    #[error("CA certificate: {0}")]
    CaFile(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// How the daemon's HTTPS certificate is checked: against the system's roots and, when given,
/// the certificates of a PEM file (a private CA, a self-signed certificate). The roots are read
/// once, at the first https:// request (`status` asks twice for its table).
#[derive(Debug, Default)]
pub struct Trust {
    ca_file: Option<PathBuf>,
    roots: OnceLock<Arc<rustls::RootCertStore>>,
}

impl Trust {
    pub fn new(ca_file: Option<PathBuf>) -> Trust {
        Trust {
            ca_file,
            roots: OnceLock::new(),
        }
    }

    /// The system's roots and the CA file's certificates.
    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, ClientError> {
        if let Some(roots) = self.roots.get() {
            return Ok(roots.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            // A system certificate rustls cannot parse is skipped, as the system's own
            // clients do.
            let _ = roots.add(cert);
        }
        if let Some(path) = &self.ca_file {
            let certs = crate::postgres::tls::read_certs(path, "--cacert")
                .map_err(|e| ClientError::CaFile(e.to_string()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| ClientError::CaFile(format!("{}: {e}", path.display())))?;
            }
        }
        Ok(self.roots.get_or_init(|| Arc::new(roots)).clone())
    }

    /// The TLS configuration for a request: the roots for an https:// URL; none for a plain
    /// http:// one, which never uses it (the connector needs one) and reads no roots or CA file.
    fn client_config(&self, https: bool) -> Result<rustls::ClientConfig, ClientError> {
        let roots = if https {
            self.roots()?
        } else {
            Arc::new(rustls::RootCertStore::empty())
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }
}

/// A `GET`: the status and body. The status comes as hyper's type so callers need not know it.
pub async fn get(url: &str, accept: &str) -> Result<(StatusCode, String), ClientError> {
    get_with(url, accept, &Trust::default()).await
}

/// A `GET`, an HTTPS certificate checked with `trust`.
pub async fn get_with(
    url: &str,
    accept: &str,
    trust: &Trust,
) -> Result<(StatusCode, String), ClientError> {
    request_with(Method::GET, url, accept, None, None, trust).await
}

/// Sends one request and returns the status and body (an HTTPS certificate checked against
/// the system's roots).
pub async fn request(
    method: Method,
    url: &str,
    accept: &str,
    bearer: Option<&str>,
    body: Option<String>,
) -> Result<(StatusCode, String), ClientError> {
    request_with(method, url, accept, bearer, body, &Trust::default()).await
}

/// Sends one request, an HTTPS certificate checked with `trust`, and returns the status and
/// body.
pub async fn request_with(
    method: Method,
    url: &str,
    accept: &str,
    bearer: Option<&str>,
    body: Option<String>,
    trust: &Trust,
) -> Result<(StatusCode, String), ClientError> {
    let uri: hyper::Uri =
        url.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| ClientError::Url {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
    let https = uri.scheme_str() == Some("https");
    if !https && uri.scheme_str() != Some("http") {
        return Err(ClientError::Url {
            url: url.to_string(),
            reason: "only http:// and https:// URLs are supported".to_string(),
        });
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(ACCEPT, accept);
    if let Some(token) = bearer {
        builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Url {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(trust.client_config(https)?)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            let mut reason = error_chain(&e);
            if https && reason.contains("certificate") {
                reason.push_str(
                    " (the daemon's certificate must be signed by a CA of the system or of \
                         --cacert, and name the host of the URL: use --url https://<a name in the \
                         certificate>:<port>)",
                );
            }
            ClientError::Unreachable {
                url: url.to_string(),
                reason,
            }
        })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout {
            url: url.to_string(),
        })?
}

/// What a pipeline says when it announces a deployment (`POST /api/deployments`).
#[derive(Debug, Default, serde::Serialize)]
pub struct Announcement<'a> {
    pub target: Option<&'a str>,
    pub version: &'a str,
    pub note: Option<&'a str>,
    pub started_at: Option<&'a str>,
}

/// Announces a deployment to the daemon at `base` (`http://host:port` or `https://…`) with the
/// API token.
pub async fn announce(
    base: &str,
    token: &str,
    announcement: &Announcement<'_>,
) -> Result<(StatusCode, String), ClientError> {
    announce_with(base, token, announcement, &Trust::default()).await
}

/// As [`announce`], an HTTPS certificate checked with `trust`.
pub async fn announce_with(
    base: &str,
    token: &str,
    announcement: &Announcement<'_>,
    trust: &Trust,
) -> Result<(StatusCode, String), ClientError> {
    let body = serde_json::to_string(announcement).unwrap_or_default();
    request_with(
        Method::POST,
        &format!("{}/api/deployments", base.trim_end_matches('/')),
        "application/json",
        Some(token),
        Some(body),
        trust,
    )
    .await
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

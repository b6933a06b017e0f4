//! A small HTTP client for the CLI commands that talk to a running daemon
//! (`deploywatch status`, `deploywatch deploy mark`), over plain HTTP or HTTPS (the daemon's
//! `server.web_config_file`). Whom HTTPS trusts is `server::trust`'s, which the replicas'
//! forwarding shares.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot reach deploywatch at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("deploywatch at {url} did not answer within {TIMEOUT:?}")]
    Timeout { url: String },
    #[error(transparent)]
    Trust(#[from] TrustError),
}

pub use crate::server::trust::Trust;
use crate::server::trust::{exchange, ExchangeError, TrustError};

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
    get_as(url, accept, trust, None).await
}

/// A user of the daemon's basic authentication (`basic_auth_users` of its web configuration).
#[derive(Clone)]
pub struct BasicAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl BasicAuth {
    /// The `Authorization` header's value.
    fn header(&self) -> String {
        use base64::Engine as _;
        let pair = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// A `GET`, an HTTPS certificate checked with `trust`, as `basic`'s user when given.
pub async fn get_as(
    url: &str,
    accept: &str,
    trust: &Trust,
    basic: Option<&BasicAuth>,
) -> Result<(StatusCode, String), ClientError> {
    let authorization = basic.map(BasicAuth::header);
    send(Method::GET, url, accept, authorization, None, trust).await
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
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    send(method, url, accept, authorization, body, trust).await
}

/// Sends one request with an `Authorization` header's value, when given.
async fn send(
    method: Method,
    url: &str,
    accept: &str,
    authorization: Option<String>,
    body: Option<String>,
    trust: &Trust,
) -> Result<(StatusCode, String), ClientError> {
    let uri: hyper::Uri =
        url.parse()
            .map_err(|e: hyper::http::uri::InvalidUri| ClientError::Url {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(ClientError::Url {
            url: url.to_string(),
            reason: "only http:// and https:// URLs are supported".to_string(),
        });
    }
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(ACCEPT, accept);
    if let Some(value) = authorization {
        builder = builder.header(AUTHORIZATION, value);
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
    let hint = "the daemon's certificate must be signed by a CA of the system or of --cacert, \
                and name the host of the URL: use --url https://<a name in the certificate>:<port>";
    let answer = exchange(trust, request, usize::MAX, TIMEOUT, hint)
        .await
        .map_err(|error| match error {
            ExchangeError::Trust(error) => ClientError::Trust(error),
            ExchangeError::Unreachable(reason) => ClientError::Unreachable {
                url: url.to_string(),
                reason,
            },
            ExchangeError::Timeout(_) => ClientError::Timeout {
                url: url.to_string(),
            },
        })?;
    Ok((
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
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

//! The HTTP server (hyper 1.x): `/metrics`, `/status`, `/healthz`, `/readyz` and the deployment
//! API. Only this module knows hyper's server side. Handlers read the in-memory state and never
//! query a database, so they answer quickly whatever the databases do.
//!
//! Requests are bounded: headers must arrive within a few seconds and fit in a small buffer,
//! bodies are capped in size and time.
//!
//! On a replica of a split fleet (`server.shard`), an announcement for a target of another
//! shard is forwarded once to the replica that owns it (`server.shard_peers`, HTTP or HTTPS, the
//! caller's bearer token, a bounded wait) and answered with its answer, or refused with 421.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::checks::outcome::Status;
use crate::config::web::AuthVerdict;
use crate::postgres::target::PasswordSource;
use crate::server::status::{self, Filter};
use crate::server::trust::{self, Trust};
use crate::shard::{shard_of, Shard};
use crate::watch::state::State;
use crate::watch::tracker::{Announcement, Announcer, TrackerError};

const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_HEADER_BYTES: usize = 16 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a throttled authentication attempt waits for its 429 at most.
const THROTTLE_DELAY: Duration = Duration::from_secs(1);

/// The part of the configuration the handlers follow across reloads.
#[derive(Debug, Clone)]
pub(crate) struct HttpSettings {
    /// Whether deployments are tracked (announcements are refused with 503 otherwise).
    pub(crate) tracking: bool,
    /// The bearer token `POST /api/deployments` requires; `None` refuses every announcement.
    pub(crate) api_token: Option<PasswordSource>,
    /// This replica's shard: announcements for another shard's targets go to their owner.
    pub(crate) shard: Shard,
    /// Every replica's base URL, by shard; empty when they are not known.
    pub(crate) shard_peers: Vec<String>,
    /// Whom an `https://` peer's certificate is checked against (read again at a reload).
    pub(crate) shard_peers_trust: Arc<Trust>,
    /// How many `/metrics` requests are written at once (`server.max_concurrent_scrapes`).
    pub(crate) max_concurrent_scrapes: usize,
}

impl HttpSettings {
    pub(crate) fn from_config(config: &crate::config::Config) -> HttpSettings {
        HttpSettings {
            tracking: config.deployments.enabled,
            api_token: config.server.api_token.clone(),
            shard: config.server.shard,
            shard_peers: config.server.shard_peers.clone(),
            shard_peers_trust: Arc::new(Trust::from_setting(
                config.server.shard_peers_ca_file.clone(),
                "server.shard_peers_ca_file",
            )),
            max_concurrent_scrapes: config.server.max_concurrent_scrapes,
        }
    }
}

/// How long a scrape beyond `server.max_concurrent_scrapes` waits for a turn before its 503.
const SCRAPE_QUEUE_WAIT: Duration = Duration::from_secs(2);
/// How long a client may take to read a chunk of `/metrics` by default: one that stops
/// reading is cut off, so it does not hold a blocking thread and a scrape's turn for good.
pub const SCRAPE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The turns of `/metrics`: a scrape writes the whole exposition on a blocking thread, so only
/// a few are written at once, however many clients ask.
pub(crate) struct Scrapes {
    turns: Arc<tokio::sync::Semaphore>,
    /// The limit the permits stand for now (it follows reloads).
    limit: std::sync::Mutex<usize>,
    /// How long a client may take to read one chunk before it is cut off.
    stall_timeout: Duration,
}

impl Scrapes {
    pub(crate) fn new(limit: usize, stall_timeout: Duration) -> Scrapes {
        Scrapes {
            turns: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit: std::sync::Mutex::new(limit),
            stall_timeout,
        }
    }

    /// Follows a reloaded limit. Turns in use when the limit shrinks are taken out of play
    /// as they come back.
    fn set_limit(&self, limit: usize) {
        let mut current = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        if limit > *current {
            self.turns.add_permits(limit - *current);
        } else if limit < *current {
            let surplus = *current - limit;
            let short = surplus - self.turns.forget_permits(surplus);
            if short > 0 {
                let turns = self.turns.clone();
                if let (Ok(short), Ok(runtime)) =
                    (u32::try_from(short), tokio::runtime::Handle::try_current())
                {
                    runtime.spawn(async move {
                        if let Ok(permits) = turns.acquire_many_owned(short).await {
                            permits.forget();
                        }
                    });
                }
            }
        }
        *current = limit;
    }
}

/// Marks an announcement one replica forwarded to another, so it is never forwarded again
/// (replicas configured with different shard counts would otherwise pass it around).
const FORWARDED_BY: &str = "x-deploywatch-forwarded-by";
/// How long the owner of a target may take to answer a forwarded announcement.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers need.
pub(crate) struct AppContext {
    pub(crate) state: Arc<State>,
    pub(crate) announcer: Announcer,
    /// What a configuration reload can change for the handlers.
    pub(crate) settings: std::sync::RwLock<HttpSettings>,
    /// TLS and basic authentication, when a web configuration file is given.
    pub(crate) web: Option<crate::config::web::LiveWebConfig>,
    /// The turns of `/metrics`.
    pub(crate) scrapes: Scrapes,
}

impl AppContext {
    /// The settings in force now.
    pub(crate) fn settings(&self) -> HttpSettings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes the settings of a (re)loaded configuration.
    pub(crate) fn apply(&self, config: &crate::config::Config) {
        let settings = HttpSettings::from_config(config);
        self.scrapes.set_limit(settings.max_concurrent_scrapes);
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
    }
}

/// A response body: whole, or the chunks a task writes as they come (`/metrics`).
type Body = Either<Full<Bytes>, Chunks>;

/// Chunks of a body as another task writes them; the body ends when that task is done. A
/// client that goes away drops the receiver, so the writer learns it at its next chunk. A
/// writer that stops before the end (a client cut off for not reading) leaves `complete`
/// unset: the body then ends in an error, so the connection is dropped instead of the
/// chunked encoding being closed as if the text were whole.
pub(crate) struct Chunks {
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
    complete: Arc<std::sync::atomic::AtomicBool>,
}

/// A body whose writer stopped before the end.
#[derive(Debug, thiserror::Error)]
#[error("the response was cut off before its end")]
pub(crate) struct CutOff;

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = CutOff;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, CutOff>>> {
        let complete = self.complete.clone();
        self.receiver.poll_recv(cx).map(|chunk| match chunk {
            Some(bytes) => Some(Ok(hyper::body::Frame::data(bytes))),
            None if complete.load(std::sync::atomic::Ordering::Acquire) => None,
            None => Some(Err(CutOff)),
        })
    }
}

/// A whole body.
fn whole(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(whole(body));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    response(status, "text/plain; charset=utf-8", body.into())
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => response(status, "application/json", body),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode JSON: {error}"),
        ),
    }
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn method_not_allowed(allowed: &str) -> Response<Body> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    if let Ok(value) = HeaderValue::from_str(allowed) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

fn query_pairs(request: &Request<Incoming>) -> Vec<(String, String)> {
    request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// Serves until `shutdown` fires. Connections in progress are given a moment to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<AppContext>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let acceptor = ctx.web.as_ref().and_then(|w| w.current().tls.clone());
            match acceptor {
                None => serve_stream(stream, peer, ctx, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_stream(tls, peer, ctx, shutdown).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), connections.wait()).await;
}

/// Serves HTTP/1.1 on one accepted connection (plain or TLS).
async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<AppContext>,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, request, peer).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
        }
    }
}

async fn handle(ctx: &AppContext, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    // Basic authentication, where configured. Announcements carry their own bearer token.
    if let Some(live) = ctx.web.as_ref() {
        let web = live.current();
        let announcement = path == "/api/deployments" && method == Method::POST;
        let header = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !announcement && web.protects(&path) {
            match live.authorize(&web, header, peer.ip()).await {
                AuthVerdict::Allowed => {}
                AuthVerdict::Denied => {
                    let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
                    response.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"deploywatch\""),
                    );
                    return response;
                }
                AuthVerdict::Throttled(wait) => {
                    // Answered a little late: a client retrying in a tight loop is slowed
                    // down at the cost of an idle connection, not of CPU.
                    tokio::time::sleep(wait.min(THROTTLE_DELAY)).await;
                    let mut response =
                        text(StatusCode::TOO_MANY_REQUESTS, "too many failed attempts\n");
                    if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
                        response
                            .headers_mut()
                            .insert(hyper::header::RETRY_AFTER, value);
                    }
                    return response;
                }
            }
        }
    }
    let response = match path.as_str() {
        "/" => match method {
            Method::GET | Method::HEAD => text(
                StatusCode::OK,
                "deploywatch\n\n/metrics  Prometheus metrics\n/status   checks and deployments (JSON; ?format=text)\n\
                 /healthz  liveness\n/readyz   readiness\n/api/deployments  announce (POST) or list (GET) deployments\n",
            ),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/metrics" => match method {
            Method::GET => metrics(ctx, &request).await,
            // Nothing is rendered for a HEAD: it would be thrown away.
            Method::HEAD => response(
                StatusCode::OK,
                crate::server::metrics::CONTENT_TYPE,
                Bytes::new(),
            ),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/status" => match method {
            Method::GET | Method::HEAD => status_page(ctx, &request),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/healthz" => match method {
            Method::GET | Method::HEAD => text(StatusCode::OK, "ok\n"),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/readyz" => match method {
            Method::GET | Method::HEAD => {
                if ctx.state.all_targets_tried() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: not every target has been tried yet\n",
                    )
                }
            }
            _ => method_not_allowed("GET, HEAD"),
        },
        "/api/deployments" => match method {
            Method::POST => announce(ctx, request).await,
            Method::GET => {
                let snapshot = ctx.state.snapshot();
                let target = query_pairs(&request)
                    .into_iter()
                    .find(|(k, _)| k == "target")
                    .map(|(_, v)| v);
                let list: Vec<_> = snapshot
                    .deployments
                    .values()
                    .filter(|d| target.as_ref().is_none_or(|t| t == &d.target))
                    .collect();
                json(StatusCode::OK, &list)
            }
            _ => method_not_allowed("GET, POST"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    tracing::debug!(%peer, %method, %path, status = response.status().as_u16(), "HTTP request");
    response
}

/// How many chunks of `/metrics` may wait for a slow client: the text a scrape holds.
const METRICS_CHUNKS_QUEUED: usize = 2;

/// `/metrics`: the exposition streamed as a blocking task writes it from the state, chunk by
/// chunk (gzip-compressed when the client accepts it, as Prometheus does). The scrape never
/// holds the whole text, and the writing never runs on the async workers. At most
/// `server.max_concurrent_scrapes` are written at once: another waits a moment for a turn,
/// then gets 503 with `Retry-After`. The turn comes back when the writing ends, whole or cut
/// off because the client stopped reading.
async fn metrics(ctx: &AppContext, request: &Request<Incoming>) -> Response<Body> {
    let turn = match tokio::time::timeout(
        SCRAPE_QUEUE_WAIT,
        ctx.scrapes.turns.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(turn)) => turn,
        // Timed out, or (never) closed.
        _ => {
            ctx.state.count_refused_scrape();
            let limit = ctx.settings().max_concurrent_scrapes;
            tracing::debug!(
                limit,
                "scrape refused: the concurrent scrapes are at their limit"
            );
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{limit} scrapes are being written already (server.max_concurrent_scrapes); retry later\n"
                ),
            );
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("5"));
            return response;
        }
    };
    let gzip = accepts_gzip(
        request
            .headers()
            .get(hyper::header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(METRICS_CHUNKS_QUEUED);
    let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let completed = complete.clone();
    let state = ctx.state.clone();
    let stall_timeout = ctx.scrapes.stall_timeout;
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        // Held until the writing ends.
        let _turn = turn;
        let send = |bytes: Vec<u8>| {
            bytes.is_empty()
                || runtime.block_on(async {
                    matches!(
                        tokio::time::timeout(stall_timeout, sender.send(bytes.into())).await,
                        Ok(Ok(()))
                    )
                })
        };
        if gzip {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(crate::server::metrics::CHUNK_BYTES / 4),
                flate2::Compression::fast(),
            );
            let mut open = true;
            crate::server::metrics::render(&state, &mut |chunk| {
                // Writing into a Vec cannot fail.
                open = encoder.write_all(chunk.as_bytes()).is_ok()
                    && send(std::mem::take(encoder.get_mut()));
                open
            });
            if open {
                if let Ok(rest) = encoder.finish() {
                    if send(rest) {
                        completed.store(true, std::sync::atomic::Ordering::Release);
                    }
                }
            }
        } else {
            let mut open = true;
            crate::server::metrics::render(&state, &mut |chunk| {
                open = send(chunk.into_bytes());
                open
            });
            if open {
                completed.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        if !completed.load(std::sync::atomic::Ordering::Acquire) {
            tracing::debug!("scrape cut off: the client stopped reading");
        }
    });
    let mut response = Response::new(Either::Right(Chunks { receiver, complete }));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::server::metrics::CONTENT_TYPE),
    );
    headers.insert(
        hyper::header::VARY,
        HeaderValue::from_static("accept-encoding"),
    );
    if gzip {
        headers.insert(
            hyper::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
    }
    response
}

/// Whether an `Accept-Encoding` header accepts gzip: listed (or `*`) without `q=0`.
fn accepts_gzip(header: Option<&str>) -> bool {
    let Some(header) = header else {
        return false;
    };
    let mut gzip = None;
    let mut any = None;
    for item in header.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let accepted = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .all(|q| q.trim().parse::<f64>().map_or(true, |q| q > 0.0));
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(accepted),
            "*" => any = Some(accepted),
            _ => {}
        }
    }
    gzip.or(any).unwrap_or(false)
}

fn status_page(ctx: &AppContext, request: &Request<Incoming>) -> Response<Body> {
    let mut filter = Filter::default();
    let mut as_text = request
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/plain") && !accept.contains("json"));
    for (key, value) in query_pairs(request) {
        match key.as_str() {
            "format" => match value.as_str() {
                "text" => as_text = true,
                "json" => as_text = false,
                other => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("unknown format {other:?}: use text or json\n"),
                    )
                }
            },
            "target" => filter.target = Some(value),
            "check" => filter.check = Some(value),
            "status" => match Status::parse(&value) {
                Some(status) => filter.status = Some(status),
                None => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("unknown status {value:?}: use pending, pass, fail or error\n"),
                    )
                }
            },
            _ => {}
        }
    }
    let snapshot = ctx.state.snapshot();
    if let Some(asked) = &filter.target {
        if !snapshot
            .targets
            .keys()
            .any(|name| status::target_matches(asked, name))
        {
            let shard = ctx.settings().shard;
            let message = if shard.is_split() && !shard.owns(asked) {
                format!(
                    "target {asked:?} belongs to shard {}/{}, not to this replica (shard {shard}): ask that replica",
                    shard_of(asked, shard.count),
                    shard.count
                )
            } else {
                format!(
                    "no target is named {asked:?}; {}",
                    status::known_targets(&snapshot)
                )
            };
            return if as_text {
                text(StatusCode::NOT_FOUND, message + "\n")
            } else {
                json_error(StatusCode::NOT_FOUND, message)
            };
        }
    }
    let report = status::build(&snapshot, &filter, ctx.state.now());
    if as_text {
        text(StatusCode::OK, status::render_text(&report))
    } else {
        json(StatusCode::OK, &report)
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
/// Digests first, so neither the content nor the length of the token shows in the timing.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let given = sha2::Sha256::digest(given);
    let expected = sha2::Sha256::digest(expected);
    bool::from(given.as_slice().ct_eq(expected.as_slice()))
}

fn authorized(ctx: &AppContext, request: &Request<Incoming>) -> bool {
    let token = ctx.settings().api_token;
    let Some(expected) = token.as_ref().and_then(|s| s.read().ok()) else {
        return false;
    };
    if expected.is_empty() {
        return false;
    }
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    same_secret(given.as_bytes(), expected.as_bytes())
}

async fn announce(ctx: &AppContext, request: Request<Incoming>) -> Response<Body> {
    if !authorized(ctx, &request) {
        let mut response = json_error(StatusCode::UNAUTHORIZED, "unauthorized");
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    if !ctx.settings().tracking {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "deployment tracking is disabled in the configuration",
        );
    }
    let announcer = &ctx.announcer;
    let authorization = request.headers().get(AUTHORIZATION).cloned();
    let forwarded_by = request
        .headers()
        .get(FORWARDED_BY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Limited::new(request.into_body(), MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {MAX_BODY_BYTES} bytes"),
            )
        }
        Err(_) => return json_error(StatusCode::REQUEST_TIMEOUT, "body not received in time"),
    };
    let announcement: Announcement = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(error) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "malformed body: {error}; expected JSON like \
                     {{\"target\": \"cognit\", \"version\": \"3.7.0\", \"started_at\": \"2026-11-24T10:00:00Z\", \"note\": \"...\"}}"
                ),
            )
        }
    };
    let settings = ctx.settings();
    if settings.shard.is_split() {
        let Some(target) = announcement.target.as_deref() else {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "\"target\" is required: this replica is shard {} of a fleet split over several replicas",
                    settings.shard
                ),
            );
        };
        if !settings.shard.owns(target) {
            let owner = shard_of(target, settings.shard.count);
            let peer = settings.shard_peers.get(owner as usize);
            return match (peer, forwarded_by) {
                (Some(peer), None) => {
                    let trust = &settings.shard_peers_trust;
                    forward(
                        peer,
                        trust,
                        authorization,
                        bytes,
                        settings.shard,
                        owner,
                        target,
                    )
                    .await
                }
                (peer, forwarded_by) => misdirected(
                    settings.shard,
                    owner,
                    target,
                    peer.map(String::as_str),
                    forwarded_by.as_deref(),
                ),
            };
        }
    }
    match announcer.announce(announcement).await {
        Ok(view) => json(StatusCode::CREATED, &view),
        // The request was fine; the daemon could not keep it. The pipeline may retry.
        Err(error @ TrackerError::Store(_)) => {
            json_error(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        Err(error) => json_error(StatusCode::BAD_REQUEST, error.to_string()),
    }
}

/// 421 Misdirected Request: the announcement is well-formed and authorized, but this replica
/// is not the one that can record it. Retrying the same request at the owner succeeds, which
/// is what 421 tells a client (409 would say the request conflicts with this resource's state).
fn misdirected(
    shard: Shard,
    owner: u32,
    target: &str,
    peer: Option<&str>,
    forwarded_by: Option<&str>,
) -> Response<Body> {
    let why = match forwarded_by {
        Some(from) => format!(
            "; it was forwarded here by shard {from}, so the replicas disagree on the shards: check server.shard and server.shard_peers"
        ),
        None => "; send it to that replica, or list every replica in server.shard_peers so replicas forward announcements".to_string(),
    };
    json(
        StatusCode::MISDIRECTED_REQUEST,
        &serde_json::json!({
            "error": format!(
                "target {target:?} belongs to shard {owner}/{count}, not to this replica (shard {shard}){why}",
                count = shard.count
            ),
            "shard": owner,
            "shards": shard.count,
            "owner": peer,
        }),
    )
}

/// Hands an announcement to the replica that owns its target and answers with its answer.
async fn forward(
    peer: &str,
    trust: &Trust,
    authorization: Option<HeaderValue>,
    body: Bytes,
    shard: Shard,
    owner: u32,
    target: &str,
) -> Response<Body> {
    let url = format!("{}/api/deployments", peer.trim_end_matches('/'));
    let unreachable = |reason: String| {
        json_error(
            StatusCode::BAD_GATEWAY,
            format!(
                "target {target:?} belongs to shard {owner}/{}, whose replica at {peer} cannot be reached: {reason}",
                shard.count
            ),
        )
    };
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json")
        .header(FORWARDED_BY, shard.to_string());
    if let Some(value) = authorization {
        builder = builder.header(AUTHORIZATION, value);
    }
    let request = match builder.body(Full::new(body)) {
        Ok(request) => request,
        Err(error) => return unreachable(error.to_string()),
    };
    let hint = "the replica's certificate must be signed by a CA of the system or of \
                server.shard_peers_ca_file, and name the host of its server.shard_peers URL";
    match trust::exchange(trust, request, MAX_BODY_BYTES, FORWARD_TIMEOUT, hint).await {
        Ok(answer) => {
            tracing::info!(db_target = %target, owner = %peer, status = answer.status.as_u16(), "announcement forwarded to the owner's shard");
            let mut response = Response::new(whole(answer.body));
            *response.status_mut() = answer.status;
            if let Some(value) = answer.content_type {
                response.headers_mut().insert(CONTENT_TYPE, value);
            }
            response
        }
        Err(error) => unreachable(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{accepts_gzip, same_secret, Scrapes, SCRAPE_STALL_TIMEOUT};

    #[test]
    fn gzip_is_used_when_accepted_and_not_refused() {
        assert!(accepts_gzip(Some("gzip")));
        assert!(accepts_gzip(Some("identity, GZip;q=0.5")));
        assert!(accepts_gzip(Some("br, *")));
        assert!(accepts_gzip(Some("gzip, deflate, br")));
        assert!(!accepts_gzip(None));
        assert!(!accepts_gzip(Some("")));
        assert!(!accepts_gzip(Some("identity")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("gzip; q=0.0, *")));
        assert!(!accepts_gzip(Some("*;q=0")));
        assert!(!accepts_gzip(Some("deflate")));
    }

    #[tokio::test]
    async fn the_scrape_limit_follows_a_reload_even_while_turns_are_taken() {
        let scrapes = Scrapes::new(2, SCRAPE_STALL_TIMEOUT);
        scrapes.set_limit(3);
        assert_eq!(scrapes.turns.available_permits(), 3);
        let taken = scrapes
            .turns
            .clone()
            .acquire_many_owned(3)
            .await
            .expect("turns");
        // Shrinking while every turn is in use takes turns out as they come back.
        scrapes.set_limit(1);
        drop(taken);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while scrapes.turns.available_permits() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} turns left instead of 1",
                scrapes.turns.available_permits()
            );
            tokio::task::yield_now().await;
        }
        scrapes.set_limit(1);
        assert_eq!(scrapes.turns.available_permits(), 1);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcd", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}

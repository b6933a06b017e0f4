//! Sessions to PostgreSQL servers, under a budget per server.
//!
//! Every target that reaches the same server (host and port) — the databases one discovery entry
//! found, or several entries naming the same server — draws its sessions from one
//! [`ServerPool`]. At most `max_connections_per_server` sessions exist to that server at any
//! moment, whichever databases they are open on, and never more than `server_connection_share`
//! of the server's own `max_connections` minus its reserved connections (read from the server
//! on the first session, and again whenever its statistics are sampled; until then one session).
//! A target is also held to its own cap (`max_connections`).
//!
//! PostgreSQL sessions belong to one database, so a session is opened when a check of its
//! database needs one and closed once it has been idle for [`IDLE_TIMEOUT`], or at once when a
//! check of another database waits for the slot. Waiting checks queue in arrival order; an idle
//! session goes first to a waiting check of its own database (no reconnect). The queue — its
//! length, the oldest waiting check — is visible through [`ServerPool::view`].
//!
//! A closing session keeps its place in the budget until the server has closed its socket (its
//! backend has then left `pg_stat_activity` and given its connection back; see
//! [`crate::postgres::socket`]); so does a session whose handshake was given up on (it ran out
//! of time or failed), whose backend may still be starting on the server. A reload
//! keeps the server pools (only the budget changes), so the sessions of the previous
//! configuration count until they are gone: the budget holds across a reload.
//!
//! On top of that, per target ([`Connector`]): the password is read from its source on every
//! connect, and failed connects back off exponentially up to a ceiling (a down database is not
//! hammered). Opening a session — TCP, TLS, authentication and the role check — is bounded by
//! the connect timeout as a whole, and a handshake that runs out of time counts as a failed
//! connect for the backoff. A session whose role is a superuser is refused unless the target
//! allows it. Once a target is found not answering ([`TargetPool::mark_down`]), its checks
//! waiting for a session stop waiting (with the reason), and its sessions opened before are
//! not reused. The cancel keys of the queries in flight are kept, so shutdown can ask the
//! server to cancel them. deadpool, used before, pools per key and cannot share one cap
//! between keys nor evict an idle session of one database for a waiter of another, which is
//! the whole point here.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::postgres::socket;
use crate::postgres::target::{ConnectionSettings, TargetError};

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CEILING: Duration = Duration::from_secs(30);
/// An idle session is closed after this long.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing session may take to say goodbye before its socket is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Default sessions per server, all its databases together.
pub(crate) const DEFAULT_SESSIONS_PER_SERVER: usize = 4;
/// Default share of the server's usable connections deploywatch may take.
pub(crate) const DEFAULT_SERVER_SHARE: f64 = 0.1;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Settings(#[from] TargetError),
    #[error("cannot connect to {target}: {message}")]
    Connect { target: String, message: String },
    #[error("not reconnecting to {target} for another {remaining:.1}s after: {last_error}")]
    BackingOff {
        target: String,
        remaining: f64,
        last_error: String,
    },
    #[error("no session to {server} became free within {waited:.1?} ({queue} waiting, {limit} allowed: {limited_by})")]
    Exhausted {
        server: String,
        waited: Duration,
        queue: usize,
        limit: usize,
        limited_by: String,
    },
    #[error(
        "{target}: the role {role:?} is a superuser; deploywatch refuses to run checks with it, \
         as READ ONLY does not stop a superuser from writing files or running programs on the \
         server. Connect as a role with pg_monitor, or set allow_superuser = true on the target"
    )]
    Superuser { target: String, role: String },
    #[error("could not run: {target} stopped answering ({reason})")]
    Down { target: String, reason: String },
}

/// The server's connection limits, as read from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ServerLimits {
    pub(crate) max_connections: u32,
    /// `superuser_reserved_connections` plus `reserved_connections` (PostgreSQL 16+).
    pub(crate) reserved: u32,
}

/// A server pool as shown in `/status` and the metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServerView {
    /// `host:port`
    pub(crate) server: String,
    /// Sessions that may exist now.
    pub(crate) limit: usize,
    /// `max_connections_per_server`.
    pub(crate) configured: usize,
    pub(crate) max_connections: Option<u32>,
    pub(crate) reserved_connections: Option<u32>,
    /// Why the limit is what it is.
    pub(crate) limited_by: String,
    /// Sessions open (in use, idle or closing).
    pub(crate) open: usize,
    pub(crate) in_use: usize,
    pub(crate) idle: usize,
    /// Checks and samplers waiting for a session.
    pub(crate) queue: usize,
    pub oldest_wait_seconds: Option<f64>,
    /// Who has waited longest (`target check`).
    pub oldest_waiting: Option<String>,
}

/// An open session. Dropping it closes the session; its place in the server's budget is given
/// back once the socket is closed.
pub struct Session {
    pub(crate) client: tokio_postgres::Client,
    driver: Option<JoinHandle<()>>,
    slot: Option<Arc<Slot>>,
    /// The target's down epoch, and its value when the session was opened: a session opened
    /// before the target was last found not answering is not reused.
    epoch: Arc<AtomicU64>,
    opened_in: u64,
}

impl Drop for Session {
    fn drop(&mut self) {
        let slot = self.slot.take();
        if let Some(slot) = &slot {
            slot.mark_closing();
        }
        let Some(mut driver) = self.driver.take() else {
            return;
        };
        // The client is dropped right after this: the driver then says goodbye (Terminate) and
        // ends once the server has closed the session. A server that does not answer gets its
        // socket cut after the grace.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if tokio::time::timeout(CLOSE_GRACE, &mut driver)
                        .await
                        .is_err()
                    {
                        driver.abort();
                    }
                    drop(slot);
                });
            }
            Err(_) => driver.abort(),
        }
    }
}

impl Session {
    fn is_broken(&self) -> bool {
        self.client.is_closed()
            || self.driver.as_ref().is_none_or(|d| d.is_finished())
            || self.epoch.load(Ordering::Acquire) != self.opened_in
    }
}

/// One place in a server's budget, held by a session (or a connect in progress) until it is
/// closed. Shared by the session and its socket ([`socket::Lingering`]): the place is given
/// back when both are done, so a session whose handshake was abandoned keeps it until the
/// server has closed its end (its backend gone), not just until deploywatch gave up.
struct Slot {
    pool: Arc<ServerPool>,
    target: Arc<str>,
    closing: AtomicBool,
    /// False once the place was given back by other means (a grant nobody took).
    armed: AtomicBool,
}

impl Slot {
    fn new(pool: Arc<ServerPool>, target: Arc<str>) -> Slot {
        Slot {
            pool,
            target,
            closing: AtomicBool::new(false),
            armed: AtomicBool::new(true),
        }
    }

    fn mark_closing(&self) {
        if self.armed.load(Ordering::Acquire) && !self.closing.swap(true, Ordering::AcqRel) {
            self.pool.lock().closing += 1;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !*self.armed.get_mut() {
            return;
        }
        let closing = *self.closing.get_mut();
        let closed = {
            let mut inner = self.pool.lock();
            inner.free(&self.target, closing);
            inner.dispatch(&self.pool, Instant::now())
        };
        drop(closed);
    }
}

enum Grant {
    /// An idle session of the waiter's database.
    Idle(Session),
    /// A place in the budget: the waiter opens the session.
    Open(Arc<Slot>),
}

struct IdleSession {
    ident: Arc<str>,
    since: Instant,
    session: Session,
}

struct Waiter {
    ticket: u64,
    target: Arc<str>,
    ident: Arc<str>,
    cap: usize,
    what: Arc<str>,
    since: Instant,
    reply: oneshot::Sender<Grant>,
}

struct Inner {
    configured: usize,
    share: f64,
    limits: Option<ServerLimits>,
    /// Places taken: sessions connecting, in use, idle or closing.
    open: usize,
    closing: usize,
    per_target: HashMap<Arc<str>, usize>,
    /// Oldest first.
    idle: VecDeque<IdleSession>,
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
}

/// The sessions allowed for a server's `max_connections` (minus the reserved ones) at `share`.
pub(crate) fn share_of(limits: ServerLimits, share: f64) -> usize {
    let usable = f64::from(limits.max_connections.saturating_sub(limits.reserved));
    ((usable * share).floor() as usize).max(1)
}

impl Inner {
    fn share_cap(&self) -> Option<usize> {
        self.limits.map(|l| share_of(l, self.share))
    }

    fn limit(&self) -> usize {
        match self.share_cap() {
            Some(cap) => self.configured.min(cap),
            // One session until the server has told its limits.
            None => 1,
        }
        .max(1)
    }

    fn limited_by(&self) -> String {
        match (self.limits, self.share_cap()) {
            (Some(l), Some(cap)) if cap < self.configured => format!(
                "{:.0} % of the server's max_connections {} minus {} reserved connections",
                self.share * 100.0,
                l.max_connections,
                l.reserved
            ),
            (Some(_), _) => "max_connections_per_server".to_string(),
            (None, _) => "the server's max_connections are not known yet".to_string(),
        }
    }

    fn free(&mut self, target: &Arc<str>, closing: bool) {
        self.open = self.open.saturating_sub(1);
        if closing {
            self.closing = self.closing.saturating_sub(1);
        }
        if let Some(n) = self.per_target.get_mut(target) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_target.remove(target);
            }
        }
    }

    /// Takes the idle session at `index` out to be closed (dropped by the caller, outside the
    /// lock).
    fn close_idle(&mut self, index: usize) -> Option<Session> {
        let idle = self.idle.remove(index)?;
        if let Some(slot) = &idle.session.slot {
            if !slot.closing.swap(true, Ordering::AcqRel) {
                self.closing += 1;
            }
        }
        Some(idle.session)
    }

    /// Hands out what can be handed out. Returns the sessions to close, which the caller drops
    /// after releasing the lock.
    fn dispatch(&mut self, pool: &Arc<ServerPool>, now: Instant) -> Vec<Session> {
        let mut closed = Vec::new();
        while self
            .idle
            .front()
            .is_some_and(|s| now.duration_since(s.since) >= IDLE_TIMEOUT)
        {
            closed.extend(self.close_idle(0));
        }
        // Sessions that closed, or whose target was found not answering since they opened.
        while let Some(index) = self.idle.iter().position(|s| s.session.is_broken()) {
            closed.extend(self.close_idle(index));
        }
        let limit = self.limit();
        while self.open.saturating_sub(self.closing) > limit && !self.idle.is_empty() {
            closed.extend(self.close_idle(0));
        }
        // An idle session goes to a waiter of its own database first.
        let mut i = 0;
        while i < self.waiters.len() && !self.idle.is_empty() {
            let Some(pos) = self
                .idle
                .iter()
                .position(|s| s.ident == self.waiters[i].ident)
            else {
                i += 1;
                continue;
            };
            let Some(waiter) = self.waiters.remove(i) else {
                break;
            };
            let Some(idle) = self.idle.remove(pos) else {
                self.waiters.insert(i, waiter);
                break;
            };
            if let Err(Grant::Idle(session)) = waiter.reply.send(Grant::Idle(idle.session)) {
                // The waiter gave up in the meantime: the session stays idle.
                self.idle.insert(
                    pos,
                    IdleSession {
                        ident: idle.ident,
                        since: idle.since,
                        session,
                    },
                );
            }
        }
        // New sessions, in arrival order, within the budget and each target's cap. A full
        // budget with nothing idle to close grants nothing: the (long) queue is not walked.
        let mut needing = 0;
        let mut i = 0;
        while i < self.waiters.len() {
            if self.open >= limit
                && (self.idle.is_empty() || needing >= self.closing + self.idle.len())
            {
                break;
            }
            let waiter = &self.waiters[i];
            let target_open = self.per_target.get(&waiter.target).copied().unwrap_or(0);
            if target_open >= waiter.cap {
                i += 1;
                continue;
            }
            if self.open >= limit {
                needing += 1;
                i += 1;
                continue;
            }
            let Some(waiter) = self.waiters.remove(i) else {
                break;
            };
            self.open += 1;
            *self.per_target.entry(waiter.target.clone()).or_insert(0) += 1;
            let slot = Arc::new(Slot::new(pool.clone(), waiter.target.clone()));
            if let Err(Grant::Open(slot)) = waiter.reply.send(Grant::Open(slot)) {
                slot.armed.store(false, Ordering::Release);
                self.free(&waiter.target, false);
            }
        }
        // Idle sessions of other databases make room for waiters that need a new one.
        while self.closing < needing && !self.idle.is_empty() {
            closed.extend(self.close_idle(0));
        }
        closed
    }
}

/// The sessions deploywatch holds to one server, shared by every target that reaches it.
pub struct ServerPool {
    server: String,
    inner: Mutex<Inner>,
}

impl ServerPool {
    pub fn new(server: &str, configured: usize, share: f64) -> Arc<ServerPool> {
        let pool = Arc::new(ServerPool {
            server: server.to_string(),
            inner: Mutex::new(Inner {
                configured: configured.max(1),
                share,
                limits: None,
                open: 0,
                closing: 0,
                per_target: HashMap::new(),
                idle: VecDeque::new(),
                waiters: VecDeque::new(),
                next_ticket: 0,
            }),
        });
        // Closes idle sessions on time; ends once nothing refers to the pool any more.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    if Arc::strong_count(&pool) == 1 + pool.lock().open {
                        // Only its own sessions keep it: close them all and stop.
                        pool.close_idle();
                    }
                    let closed = pool.lock().dispatch(&pool, Instant::now());
                    drop(closed);
                }
            });
        }
        pool
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the counters consistent before it can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// A new budget and share (a reload). Sessions beyond it are closed as they become idle;
    /// none is opened until the count is below it.
    pub(crate) fn set_budget(self: &Arc<Self>, configured: usize, share: f64) {
        let closed = {
            let mut inner = self.lock();
            inner.configured = configured.max(1);
            inner.share = share;
            inner.dispatch(self, Instant::now())
        };
        drop(closed);
    }

    /// The server's limits, as just read from it.
    pub(crate) fn set_limits(self: &Arc<Self>, limits: ServerLimits) {
        let closed = {
            let mut inner = self.lock();
            if inner.limits == Some(limits) {
                return;
            }
            inner.limits = Some(limits);
            inner.dispatch(self, Instant::now())
        };
        drop(closed);
    }

    fn knows_limits(&self) -> bool {
        self.lock().limits.is_some()
    }

    /// Closes the idle sessions that closed or whose target was found not answering.
    fn close_broken(self: &Arc<Self>) {
        let closed = self.lock().dispatch(self, Instant::now());
        drop(closed);
    }

    /// Closes every idle session (shutdown, or a target that went away).
    pub fn close_idle(&self) {
        let closed: Vec<Session> = {
            let mut inner = self.lock();
            let mut closed = Vec::new();
            while !inner.idle.is_empty() {
                closed.extend(inner.close_idle(0));
            }
            closed
        };
        drop(closed);
    }

    pub(crate) fn view(&self, now: Instant) -> ServerView {
        let inner = self.lock();
        let oldest = inner.waiters.iter().min_by_key(|w| w.since);
        ServerView {
            server: self.server.clone(),
            limit: inner.limit(),
            configured: inner.configured,
            max_connections: inner.limits.map(|l| l.max_connections),
            reserved_connections: inner.limits.map(|l| l.reserved),
            limited_by: inner.limited_by(),
            open: inner.open,
            in_use: inner
                .open
                .saturating_sub(inner.idle.len())
                .saturating_sub(inner.closing),
            idle: inner.idle.len(),
            queue: inner.waiters.len(),
            oldest_wait_seconds: oldest.map(|w| now.duration_since(w.since).as_secs_f64()),
            oldest_waiting: oldest.map(|w| w.what.to_string()),
        }
    }

    /// Waits up to `wait` for a session of `ident` (or a place to open one).
    async fn acquire(
        self: &Arc<Self>,
        target: &Arc<str>,
        ident: &Arc<str>,
        cap: usize,
        what: &str,
        wait: Duration,
    ) -> Result<Grant, PoolError> {
        let (reply, mut answer) = oneshot::channel();
        let (ticket, closed) = {
            let mut inner = self.lock();
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            inner.waiters.push_back(Waiter {
                ticket,
                target: target.clone(),
                ident: ident.clone(),
                cap: cap.max(1),
                what: Arc::from(what),
                since: Instant::now(),
                reply,
            });
            (ticket, inner.dispatch(self, Instant::now()))
        };
        drop(closed);
        // Leaves the queue however this ends, the future dropped included.
        let queued = Queued { pool: self, ticket };
        let result = tokio::time::timeout(wait, &mut answer).await;
        drop(queued);
        match result {
            Ok(Ok(grant)) => Ok(grant),
            // Granted just as the wait ran out.
            _ => match answer.try_recv() {
                Ok(grant) => Ok(grant),
                Err(_) => {
                    let inner = self.lock();
                    Err(PoolError::Exhausted {
                        server: self.server.clone(),
                        waited: wait,
                        queue: inner.waiters.len(),
                        limit: inner.limit(),
                        limited_by: inner.limited_by(),
                    })
                }
            },
        }
    }

    fn release(self: &Arc<Self>, ident: Arc<str>, session: Session) {
        let closed = {
            let mut inner = self.lock();
            let mut closed = inner.dispatch(self, Instant::now());
            if inner.open.saturating_sub(inner.closing) > inner.limit() {
                if let Some(slot) = &session.slot {
                    if !slot.closing.swap(true, Ordering::AcqRel) {
                        inner.closing += 1;
                    }
                }
                closed.push(session);
            } else {
                inner.idle.push_back(IdleSession {
                    ident,
                    since: Instant::now(),
                    session,
                });
                closed.extend(inner.dispatch(self, Instant::now()));
            }
            closed
        };
        drop(closed);
    }

    /// Reads the server's connection limits on a fresh session.
    async fn learn_limits(self: &Arc<Self>, client: &tokio_postgres::Client) {
        let sql = "BEGIN READ ONLY; SET LOCAL statement_timeout = 5000; \
                   SELECT current_setting('max_connections'), current_setting('superuser_reserved_connections'), \
                   coalesce(current_setting('reserved_connections', true), '0'); COMMIT";
        let answer = tokio::time::timeout(Duration::from_secs(6), client.simple_query(sql)).await;
        let Ok(Ok(messages)) = answer else {
            tracing::debug!(server = %self.server, "cannot read the server's connection limits yet");
            return;
        };
        for message in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                let n = |i: usize| row.get(i).and_then(|v| v.parse::<u32>().ok());
                if let (Some(max), Some(superuser), Some(reserved)) = (n(0), n(1), n(2)) {
                    self.set_limits(ServerLimits {
                        max_connections: max,
                        reserved: superuser + reserved,
                    });
                }
            }
        }
    }
}

struct Queued<'a> {
    pool: &'a Arc<ServerPool>,
    ticket: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut inner = self.pool.lock();
        inner.waiters.retain(|w| w.ticket != self.ticket);
    }
}

/// The server pools of a process, by `host:port`; kept across reloads.
#[derive(Clone, Default)]
pub(crate) struct Servers {
    pools: Arc<Mutex<HashMap<String, Arc<ServerPool>>>>,
}

impl Servers {
    /// The pool of `server`, created on first use, with this budget.
    pub(crate) fn get(&self, server: &str, configured: usize, share: f64) -> Arc<ServerPool> {
        let pool = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools
                .entry(server.to_string())
                .or_insert_with(|| ServerPool::new(server, configured, share))
                .clone()
        };
        pool.set_budget(configured, share);
        pool
    }

    /// Every server pool, for `/status` and the metrics.
    pub(crate) fn views(&self, now: Instant) -> Vec<ServerView> {
        let pools: Vec<Arc<ServerPool>> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.values().cloned().collect()
        };
        let mut views: Vec<ServerView> = pools.iter().map(|p| p.view(now)).collect();
        views.sort_by(|a, b| a.server.cmp(&b.server));
        views
    }

    /// Forgets the servers no target reaches any more (their sessions close as they go idle).
    pub(crate) fn retain(&self, used: &std::collections::HashSet<String>) {
        let removed: Vec<Arc<ServerPool>> = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<String> = pools
                .keys()
                .filter(|k| !used.contains(*k))
                .cloned()
                .collect();
            gone.iter().filter_map(|k| pools.remove(k)).collect()
        };
        for pool in removed {
            pool.close_idle();
        }
    }

    pub(crate) fn close_idle(&self) {
        let pools: Vec<Arc<ServerPool>> = {
            let pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.values().cloned().collect()
        };
        for pool in pools {
            pool.close_idle();
        }
    }
}

#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Backoff {
    fn delay(failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
        BACKOFF_START.saturating_mul(factor).min(BACKOFF_CEILING)
    }
}

/// The cancel keys of the queries in flight on one target, by a number of their own.
#[derive(Default)]
struct InFlight {
    next: u64,
    tokens: HashMap<u64, tokio_postgres::CancelToken>,
}

/// Keeps a query's cancel key registered while it runs.
pub(crate) struct InFlightGuard {
    connector: Arc<Connector>,
    id: u64,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.connector.in_flight().tokens.remove(&self.id);
    }
}

/// Opens sessions to one target, backing off after failures; knows whether the target was
/// found not answering, and the queries in flight on it.
pub struct Connector {
    target: String,
    settings: ConnectionSettings,
    backoff: Mutex<Backoff>,
    /// Bumped each time the target is found not answering.
    down_epoch: Arc<AtomicU64>,
    /// Wakes the waiters for a session when the target is found not answering.
    down: Notify,
    /// Why the target was last found not answering.
    down_reason: Mutex<String>,
    /// Whether the warning about an allowed superuser session was logged.
    warned_superuser: AtomicBool,
    in_flight: Mutex<InFlight>,
}

impl Connector {
    pub fn new(target: &str, settings: ConnectionSettings) -> Connector {
        Connector {
            target: target.to_string(),
            settings,
            backoff: Mutex::new(Backoff::default()),
            down_epoch: Arc::new(AtomicU64::new(0)),
            down: Notify::new(),
            down_reason: Mutex::new(String::new()),
            warned_superuser: AtomicBool::new(false),
            in_flight: Mutex::new(InFlight::default()),
        }
    }

    fn in_flight(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn down_reason(&self) -> String {
        self.down_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn backing_off(&self) -> Option<PoolError> {
        let backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let retry_at = backoff.retry_at?;
        let now = Instant::now();
        (retry_at > now).then(|| PoolError::BackingOff {
            target: self.target.clone(),
            remaining: (retry_at - now).as_secs_f64(),
            last_error: backoff.last_error.clone(),
        })
    }

    fn record_success(&self) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        *backoff = Backoff::default();
    }

    fn record_failure(&self, message: &str) {
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff.failures = backoff.failures.saturating_add(1);
        backoff.retry_at = Some(Instant::now() + Backoff::delay(backoff.failures));
        backoff.last_error = message.to_string();
    }

    /// Opens a session and checks its role, within `limit` as a whole; any failure, a
    /// timeout included, counts toward the backoff.
    async fn connect(
        &self,
        limit: Duration,
        hold: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<(tokio_postgres::Client, JoinHandle<()>), PoolError> {
        let result = match tokio::time::timeout(limit, self.open(hold)).await {
            Ok(result) => result,
            Err(_) => Err(PoolError::Connect {
                target: self.target.clone(),
                message: format!(
                    "the server did not complete the connection handshake within {limit:?}"
                ),
            }),
        };
        match &result {
            Ok(_) => self.record_success(),
            Err(PoolError::BackingOff { .. }) => {}
            Err(error) => self.record_failure(&error.to_string()),
        }
        result
    }

    /// Opens a session whose socket holds `hold` until the server has closed its end (or a
    /// grace has passed), however the session ends, its handshake abandoned included.
    async fn open(
        &self,
        hold: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<(tokio_postgres::Client, JoinHandle<()>), PoolError> {
        let config = self.settings.resolve()?;
        let tls = self
            .settings
            .tls
            .client_config()
            .map_err(|error| PoolError::Connect {
                target: self.target.clone(),
                message: error.to_string(),
            })?;
        let target = self.target.clone();
        // The driver task owns the socket; its type depends on TLS, the client's does not. The
        // server reports the role and whether it is a superuser at startup. A socket of our own
        // (the usual case, one host) makes the driver end only once the server has closed the
        // session, so its place in the budget is free on the server too.
        let connected = match (socket::open(&config, tls.is_some(), Some(hold)).await, tls) {
            (Some(Err(error)), _) => {
                return Err(PoolError::Connect {
                    target: self.target.clone(),
                    message: format!("error connecting to server: {error}"),
                });
            }
            (Some(Ok((stream, _))), None) => config
                .connect_raw(stream, tokio_postgres::NoTls)
                .await
                .map(|session| started(session, target)),
            (Some(Ok((stream, host))), Some(tls)) => config
                .connect_raw(stream, tls_over_socket(tls, &host))
                .await
                .map(|session| started(session, target)),
            (None, None) => config
                .connect(tokio_postgres::NoTls)
                .await
                .map(|session| started(session, target)),
            (None, Some(tls)) => config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map(|session| started(session, target)),
        };
        let (client, reported, driver) = connected.map_err(|error| PoolError::Connect {
            target: self.target.clone(),
            message: describe_connect_error(&error),
        })?;
        let (role, superuser) = match reported {
            Some(reported) => reported,
            // Not reported (a proxy in between): asked.
            None => match session_role(&client).await {
                Ok(asked) => asked,
                Err(error) => {
                    driver.abort();
                    return Err(PoolError::Connect {
                        target: self.target.clone(),
                        message: describe_connect_error(&error),
                    });
                }
            },
        };
        if superuser {
            if !self.settings.allow_superuser {
                // Dropping the client ends the session (the driver says goodbye).
                return Err(PoolError::Superuser {
                    target: self.target.clone(),
                    role,
                });
            }
            if !self.warned_superuser.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    db_target = %self.target, %role,
                    "connected as a superuser because allow_superuser = true: READ ONLY does not \
                     stop a superuser from writing files, running programs or signalling other \
                     sessions on the server"
                );
            }
        }
        Ok((client, driver))
    }

    /// Records that the target does not answer: its waiters for a session stop waiting, and
    /// its sessions opened before are not reused.
    fn mark_down(&self, reason: &str) {
        *self.down_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
        self.down_epoch.fetch_add(1, Ordering::AcqRel);
        self.down.notify_waiters();
    }

    /// Asks the server to cancel every query in flight on this target (PostgreSQL's cancel
    /// request, on a connection of its own), each within `limit`. Returns how many were asked.
    async fn cancel_in_flight(&self, limit: Duration) -> usize {
        let tokens: Vec<tokio_postgres::CancelToken> =
            self.in_flight().tokens.values().cloned().collect();
        let tls = self.settings.tls.client_config().ok().flatten();
        let mut cancels = tokio::task::JoinSet::new();
        let count = tokens.len();
        for token in tokens {
            let (tls, target) = (tls.clone(), self.target.clone());
            let config = self.settings.resolve().ok();
            cancels.spawn(async move {
                let sent = tokio::time::timeout(limit, cancel(token, config, tls)).await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(
                        db_target = %target, %error,
                        "cannot cancel a query in flight"
                    ),
                    Err(_) => {
                        tracing::warn!(db_target = %target, "cancelling a query in flight timed out")
                    }
                }
            });
        }
        while cancels.join_next().await.is_some() {}
        count
    }
}

/// Sends PostgreSQL's cancel request for `token`'s query. A session opened on a socket of
/// deploywatch's own ([`socket`]) has a cancel key without the server's address, so the request
/// goes over a socket opened the same way.
async fn cancel(
    token: tokio_postgres::CancelToken,
    config: Option<tokio_postgres::Config>,
    tls: Option<rustls::ClientConfig>,
) -> Result<(), String> {
    let opened = match &config {
        Some(config) => socket::open(config, tls.is_some(), None).await,
        None => None,
    };
    let sent = match (opened, tls) {
        (Some(Err(error)), _) => return Err(format!("error connecting to server: {error}")),
        (Some(Ok((stream, _))), None) => {
            token.cancel_query_raw(stream, tokio_postgres::NoTls).await
        }
        (Some(Ok((stream, host))), Some(tls)) => {
            token
                .cancel_query_raw(stream, tls_over_socket(tls, &host))
                .await
        }
        (None, None) => token.cancel_query(tokio_postgres::NoTls).await,
        (None, Some(tls)) => {
            token
                .cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
        }
    };
    sent.map_err(|error| describe_connect_error(&error))
}

/// The TLS handshake with `host` over a socket of deploywatch's own ([`socket`]).
fn tls_over_socket(
    tls: rustls::ClientConfig,
    host: &str,
) -> <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
    socket::Lingering,
>>::TlsConnect {
    let connect = tokio_postgres::tls::MakeTlsConnect::<socket::Lingering>::make_tls_connect(
        &mut tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        host,
    );
    match connect {
        Ok(connect) => connect,
        Err(never) => match never {},
    }
}

/// A session just opened: its client, the role the server reported, and the task that drives
/// its connection.
fn started<S, T>(
    (client, connection): (tokio_postgres::Client, tokio_postgres::Connection<S, T>),
    target: String,
) -> (
    tokio_postgres::Client,
    Option<(String, bool)>,
    JoinHandle<()>,
)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let role = reported_role(&connection);
    (client, role, tokio::spawn(drive(connection, target)))
}

/// The role and whether it is a superuser, as the server reported them at startup.
fn reported_role<S, T>(connection: &tokio_postgres::Connection<S, T>) -> Option<(String, bool)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let superuser = connection.parameter("is_superuser")? == "on";
    let role = connection
        .parameter("session_authorization")
        .unwrap_or_default()
        .to_string();
    Some((role, superuser))
}

/// The session's role and whether it is a superuser, asked.
async fn session_role(
    client: &tokio_postgres::Client,
) -> Result<(String, bool), tokio_postgres::Error> {
    let messages = client
        .simple_query("SELECT current_user, current_setting('is_superuser')")
        .await?;
    let row = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let role = row.and_then(|r| r.get(0)).unwrap_or_default().to_string();
    let superuser = row.and_then(|r| r.get(1)) == Some("on");
    Ok((role, superuser))
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>, target: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::debug!(db_target = %target, %error, "session closed with an error");
    }
}

/// tokio-postgres' connect errors are terse ("error connecting to server"); the source error
/// says why (refused, timed out, authentication failed).
pub(crate) fn describe_connect_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

#[derive(Clone)]
enum Home {
    Server {
        pool: Arc<ServerPool>,
        ident: Arc<str>,
    },
    Pinned(Arc<Pin>),
}

/// A session lent to one query (or one pass); dropping it gives the session back.
pub struct Lease {
    session: Option<Session>,
    home: Home,
}

impl std::ops::Deref for Lease {
    type Target = Session;

    fn deref(&self) -> &Session {
        match &self.session {
            Some(session) => session,
            None => unreachable!("a lease holds its session until it is dropped or discarded"),
        }
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Session {
        match &mut self.session {
            Some(session) => session,
            None => unreachable!("a lease holds its session until it is dropped or discarded"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        if session.is_broken() {
            return;
        }
        match &self.home {
            Home::Server { pool, ident } => pool.release(ident.clone(), session),
            Home::Pinned(pin) => {
                *pin.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session);
            }
        }
    }
}

/// One session kept for a series of queries (a check run, a sampling pass).
struct Pin {
    session: Mutex<Option<Session>>,
    pool: Arc<ServerPool>,
    ident: Arc<str>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let session = self
            .session
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(session) = session.filter(|s| !s.is_broken()) {
            self.pool.release(self.ident.clone(), session);
        }
    }
}

/// A target's way to its server's sessions.
#[derive(Clone)]
pub struct TargetPool {
    server: Arc<ServerPool>,
    connector: Arc<Connector>,
    target: Arc<str>,
    /// Which sessions can be reused for this target: its name and connection settings.
    ident: Arc<str>,
    cap: usize,
    wait: Duration,
    /// Bound on opening one session, handshake and role check included: a server that accepts
    /// TCP but never answers (stopped, overloaded) must not hold a check forever.
    connect_timeout: Duration,
    pin: Option<Arc<Pin>>,
}

impl TargetPool {
    /// A pool with a server budget of its own (`max_connections` sessions); the daemon shares
    /// one budget per server through [`TargetPool::on_server`]. `wait` bounds how long a query
    /// queues for a session.
    pub fn new(
        target: &str,
        settings: ConnectionSettings,
        max_connections: usize,
        wait: Duration,
        connect_timeout: Duration,
    ) -> TargetPool {
        let server = ServerPool::new(&settings.server(), max_connections, 1.0);
        let connector = Arc::new(Connector::new(target, settings));
        TargetPool::on_server(server, connector, max_connections, wait, connect_timeout)
    }

    /// A pool for the target of `connector` on `server`, at most `cap` sessions of its own.
    pub fn on_server(
        server: Arc<ServerPool>,
        connector: Arc<Connector>,
        cap: usize,
        wait: Duration,
        connect_timeout: Duration,
    ) -> TargetPool {
        let ident: Arc<str> = Arc::from(format!("{}|{:?}", connector.target, connector.settings));
        TargetPool {
            target: Arc::from(connector.target.as_str()),
            server,
            connector,
            ident,
            cap: cap.max(1),
            wait,
            connect_timeout,
            pin: None,
        }
    }

    pub(crate) fn server(&self) -> &Arc<ServerPool> {
        &self.server
    }

    pub(crate) fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    /// How long a query waits in line for a session.
    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }

    /// The bound on opening a session; also how long an answer may be late beyond a
    /// statement's own timeout before the server counts as not answering.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Records that the target does not answer: checks waiting for one of its sessions stop
    /// waiting, and its sessions opened before are not reused (idle ones are closed now).
    pub(crate) fn mark_down(&self, reason: &str) {
        self.connector.mark_down(reason);
        self.server.close_broken();
    }

    /// Registers the cancel key of a query about to run, until the guard is dropped.
    pub(crate) fn in_flight(&self, client: &tokio_postgres::Client) -> InFlightGuard {
        let mut in_flight = self.connector.in_flight();
        in_flight.next += 1;
        let id = in_flight.next;
        in_flight.tokens.insert(id, client.cancel_token());
        InFlightGuard {
            connector: self.connector.clone(),
            id,
        }
    }

    /// Asks the server to cancel every query in flight on this target; returns how many.
    pub(crate) async fn cancel_in_flight(&self) -> usize {
        self.connector.cancel_in_flight(self.connect_timeout).await
    }

    /// The database this pool's sessions open.
    pub(crate) fn dbname(&self) -> Option<&str> {
        self.connector.settings.dbname()
    }

    /// A session, waiting in line when the budget is taken.
    pub async fn get(&self) -> Result<Lease, PoolError> {
        if let Some(pin) = &self.pin {
            let session = pin.session.lock().unwrap_or_else(|e| e.into_inner()).take();
            return match session {
                Some(session) => Ok(Lease {
                    session: Some(session),
                    home: Home::Pinned(pin.clone()),
                }),
                None => Err(PoolError::Connect {
                    target: self.target.to_string(),
                    message: "the session was closed".to_string(),
                }),
            };
        }
        self.acquire(&self.target, self.wait).await
    }

    /// A session for `what` (shown while it waits), waiting at most `wait`; unless the target
    /// is found not answering meanwhile: then [`PoolError::Down`] at once.
    pub(crate) async fn acquire(&self, what: &str, wait: Duration) -> Result<Lease, PoolError> {
        if let Some(error) = self.connector.backing_off() {
            return Err(error);
        }
        let down = self.connector.down.notified();
        tokio::pin!(down);
        down.as_mut().enable();
        let granted = tokio::select! {
            biased;
            grant = self.server.acquire(&self.target, &self.ident, self.cap, what, wait) => grant,
            _ = down => Err(PoolError::Down {
                target: self.target.to_string(),
                reason: self.connector.down_reason(),
            }),
        };
        let slot = match granted? {
            Grant::Idle(session) => {
                return Ok(Lease {
                    session: Some(session),
                    home: self.home(),
                })
            }
            Grant::Open(slot) => slot,
        };
        if let Some(error) = self.connector.backing_off() {
            return Err(error);
        }
        let opened_in = self.connector.down_epoch.load(Ordering::Acquire);
        // The socket holds the place too: a handshake given up on keeps it until the server
        // has closed its end.
        let hold: Arc<dyn std::any::Any + Send + Sync> = slot.clone();
        // Boxed: a check waiting in line holds this future, and thousands wait at once when a
        // fleet's budget is busy; opening a session needs far more state than waiting does.
        let connect = Box::pin(self.connector.connect(self.connect_timeout, hold));
        let (client, driver) = match connect.await {
            Ok(pair) => pair,
            Err(error) => {
                slot.mark_closing();
                drop(slot);
                self.mark_down(&error.to_string());
                return Err(error);
            }
        };
        let session = Session {
            client,
            driver: Some(driver),
            slot: Some(slot),
            epoch: self.connector.down_epoch.clone(),
            opened_in,
        };
        if !self.server.knows_limits() {
            Box::pin(self.server.learn_limits(&session.client)).await;
        }
        Ok(Lease {
            session: Some(session),
            home: self.home(),
        })
    }

    fn home(&self) -> Home {
        Home::Server {
            pool: self.server.clone(),
            ident: self.ident.clone(),
        }
    }

    /// A pool whose every `get` returns `lease`'s session: the queries of one run or pass share
    /// one session instead of queueing for each.
    pub(crate) fn pinned(&self, mut lease: Lease) -> TargetPool {
        let session = lease.session.take();
        let pin = Arc::new(Pin {
            session: Mutex::new(session),
            pool: self.server.clone(),
            ident: self.ident.clone(),
        });
        TargetPool {
            pin: Some(pin),
            ..self.clone()
        }
    }

    /// Drops a session instead of returning it (its server stopped answering).
    pub(crate) fn discard(mut lease: Lease) {
        drop(lease.session.take());
    }

    /// Closes the idle sessions of this pool's server.
    pub fn close(&self) {
        self.server.close_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling() {
        assert_eq!(Backoff::delay(1), Duration::from_millis(500));
        assert_eq!(Backoff::delay(2), Duration::from_secs(1));
        assert_eq!(Backoff::delay(3), Duration::from_secs(2));
        assert_eq!(Backoff::delay(10), BACKOFF_CEILING);
        assert_eq!(Backoff::delay(u32::MAX), BACKOFF_CEILING);
    }

    #[test]
    fn a_check_waiting_for_a_session_holds_little_memory() {
        // Thousands of checks wait in line when a fleet's budget is busy: what each holds
        // while waiting must not be sized for opening a session (a TLS handshake's state),
        // which only the one granted a place needs.
        let settings =
            ConnectionSettings::for_test("postgresql://deploywatch@127.0.0.1:1/tenant_1");
        let pool = TargetPool::new(
            "tenant_1",
            settings,
            1,
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let waiting = std::mem::size_of_val(&pool.acquire("tenant_1 a check", Duration::ZERO));
        let hold: Arc<dyn std::any::Any + Send + Sync> = Arc::new(());
        let opening = std::mem::size_of_val(&pool.connector.connect(Duration::from_secs(1), hold));
        assert!(
            waiting * 2 < opening,
            "waiting for a session holds {waiting} bytes, opening one {opening}"
        );
    }

    #[test]
    fn the_share_is_of_the_usable_connections_and_at_least_one() {
        let limits = |max, reserved| ServerLimits {
            max_connections: max,
            reserved,
        };
        assert_eq!(share_of(limits(100, 3), 0.1), 9);
        assert_eq!(share_of(limits(30, 3), 0.1), 2);
        assert_eq!(share_of(limits(10, 3), 0.1), 1);
        assert_eq!(share_of(limits(3, 3), 0.1), 1);
        assert_eq!(share_of(limits(1000, 3), 0.25), 249);
    }
}

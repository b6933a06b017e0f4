//! A capped pool of sessions to one target.
//!
//! deadpool provides the cap and the queue: however many checks are due, at most
//! `max_connections` sessions exist and the rest wait their turn. This module adds what a
//! monitoring tool needs on top: the password is read from its source on every connect,
//! failed connects back off exponentially up to a ceiling (so a down database is not hammered),
//! and a session whose server stopped answering is discarded rather than reused.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use tokio::task::JoinHandle;

use crate::postgres::target::{ConnectionSettings, TargetError};

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CEILING: Duration = Duration::from_secs(30);

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
    #[error("no session to {target} became free within {waited:?}")]
    Exhausted { target: String, waited: Duration },
}

/// An open session. Dropping it closes the session: the task driving the socket is aborted,
/// so a session stuck on a hung server cannot outlive its client.
pub struct Session {
    pub client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
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

pub struct Manager {
    target: String,
    settings: ConnectionSettings,
    backoff: Mutex<Backoff>,
}

impl managed::Manager for Manager {
    type Type = Session;
    type Error = PoolError;

    async fn create(&self) -> Result<Session, PoolError> {
        if let Some(error) = self.backing_off() {
            return Err(error);
        }
        let config = self.settings.resolve()?;
        let tls = match self.settings.tls.client_config() {
            Ok(tls) => tls,
            Err(error) => {
                let message = error.to_string();
                self.record_failure(&message);
                return Err(PoolError::Connect {
                    target: self.target.clone(),
                    message,
                });
            }
        };
        let target = self.target.clone();
        // The driver task owns the socket; its type depends on TLS, the client's does not.
        let connected = match tls {
            None => config
                .connect(tokio_postgres::NoTls)
                .await
                .map(|(client, connection)| (client, tokio::spawn(drive(connection, target)))),
            Some(tls) => config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map(|(client, connection)| (client, tokio::spawn(drive(connection, target)))),
        };
        match connected {
            Ok((client, driver)) => {
                self.record_success();
                Ok(Session { client, driver })
            }
            Err(error) => {
                let message = describe_connect_error(&error);
                self.record_failure(&message);
                Err(PoolError::Connect {
                    target: self.target.clone(),
                    message,
                })
            }
        }
    }

    async fn recycle(&self, session: &mut Session, _: &Metrics) -> RecycleResult<PoolError> {
        if session.client.is_closed() || session.driver.is_finished() {
            return Err(RecycleError::message("session closed"));
        }
        Ok(())
    }
}

impl Manager {
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
pub fn describe_connect_error(error: &tokio_postgres::Error) -> String {
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

/// The pool of one target.
#[derive(Clone)]
pub struct TargetPool {
    pool: managed::Pool<Manager>,
    target: String,
    wait: Duration,
    /// Bound on opening one session, handshake included: a server that accepts TCP but never
    /// answers (stopped, overloaded) must not hold a check forever.
    create: Duration,
}

impl TargetPool {
    /// `wait` bounds how long a check queues for a free session.
    pub fn new(
        target: &str,
        settings: ConnectionSettings,
        max_connections: usize,
        wait: Duration,
        connect_timeout: Duration,
    ) -> TargetPool {
        let manager = Manager {
            target: target.to_string(),
            settings,
            backoff: Mutex::new(Backoff::default()),
        };
        // Building only fails without a runtime, and the runtime is set right here.
        let pool = managed::Pool::builder(manager)
            .max_size(max_connections.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .unwrap_or_else(|_| unreachable!("runtime is configured"));
        TargetPool {
            pool,
            target: target.to_string(),
            wait,
            create: connect_timeout * 2 + Duration::from_secs(2),
        }
    }

    /// A session, waiting in line when all of them are busy.
    pub async fn get(&self) -> Result<managed::Object<Manager>, PoolError> {
        let timeouts = managed::Timeouts {
            wait: Some(self.wait),
            create: Some(self.create),
            recycle: Some(Duration::from_secs(5)),
        };
        match self.pool.timeout_get(&timeouts).await {
            Ok(object) => Ok(object),
            Err(managed::PoolError::Backend(error)) => Err(error),
            Err(managed::PoolError::Timeout(managed::TimeoutType::Create)) => {
                Err(PoolError::Connect {
                    target: self.target.clone(),
                    message: format!(
                        "the server did not complete the connection handshake within {:?}",
                        self.create
                    ),
                })
            }
            Err(managed::PoolError::Timeout(_)) => Err(PoolError::Exhausted {
                target: self.target.clone(),
                waited: self.wait,
            }),
            Err(other) => Err(PoolError::Connect {
                target: self.target.clone(),
                message: other.to_string(),
            }),
        }
    }

    /// Drops a session instead of returning it to the pool (its server stopped answering).
    pub fn discard(object: managed::Object<Manager>) {
        drop(managed::Object::take(object));
    }

    /// Closes every idle session and refuses new ones.
    pub fn close(&self) {
        self.pool.close();
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
}

//! The socket of a session, opened by deploywatch itself so that closing a session waits for the
//! server.
//!
//! tokio-postgres ends a session by sending Terminate and shutting down its side of the socket;
//! its connection future then completes, although the server's backend may still be exiting —
//! and, until it has, it holds one of the server's connections and shows in
//! `pg_stat_activity`. A place in a server's session budget is given back when the session's
//! connection future completes, so that future must not complete before the backend is gone.
//! [`Lingering`] makes its shutdown wait until the server has closed its end: a backend closes
//! its socket last when it exits, after leaving `pg_stat_activity` and giving its connection
//! slot back. The session pool bounds that wait (a server that never closes gets its socket cut).
//!
//! A connection string with several hosts, `hostaddr` or `target_session_attrs` is connected by
//! tokio-postgres itself ([`open`] returns `None`), without that wait.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{Host, TargetSessionAttrs};

enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

/// A TCP or Unix socket whose shutdown completes once the server has closed its end too.
pub struct Lingering {
    stream: Stream,
    /// Our side is shut down; waiting for the server's end of file.
    shut: bool,
}

/// Opens the socket for `config`'s one host, as tokio-postgres would (TCP_NODELAY, keepalives
/// and `connect_timeout` as configured), or `None` when the configuration needs tokio-postgres'
/// own connect (several hosts, `hostaddr`, `target_session_attrs`, TLS over a Unix socket).
/// Also returns the host name, for TLS.
pub async fn open(
    config: &tokio_postgres::Config,
    tls: bool,
) -> Option<io::Result<(Lingering, String)>> {
    let [host] = config.get_hosts() else {
        return None;
    };
    if (tls && matches!(host, Host::Unix(_)))
        || !config.get_hostaddrs().is_empty()
        || config.get_target_session_attrs() != TargetSessionAttrs::Any
        || config.get_ports().len() > 1
    {
        return None;
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let connect = connect(host, port, config);
    Some(match config.get_connect_timeout() {
        Some(limit) => match tokio::time::timeout(*limit, connect).await {
            Ok(connected) => connected,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {limit:?}"),
            )),
        },
        None => connect.await,
    })
}

async fn connect(
    host: &Host,
    port: u16,
    config: &tokio_postgres::Config,
) -> io::Result<(Lingering, String)> {
    match host {
        Host::Tcp(name) => {
            let stream = TcpStream::connect((name.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            if config.get_keepalives() {
                let mut keepalive =
                    socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
                if let Some(interval) = config.get_keepalives_interval() {
                    keepalive = keepalive.with_interval(interval);
                }
                if let Some(retries) = config.get_keepalives_retries() {
                    keepalive = keepalive.with_retries(retries);
                }
                socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
            }
            Ok((
                Lingering {
                    stream: Stream::Tcp(stream),
                    shut: false,
                },
                name.clone(),
            ))
        }
        #[cfg(unix)]
        Host::Unix(dir) => {
            let stream = UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
            Ok((
                Lingering {
                    stream: Stream::Unix(stream),
                    shut: false,
                },
                String::new(),
            ))
        }
    }
}

impl Lingering {
    fn inner(&mut self) -> Pin<&mut (dyn AsyncReadWrite + Unpin)> {
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s),
            #[cfg(unix)]
            Stream::Unix(s) => Pin::new(s),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite {}
impl<T: AsyncRead + AsyncWrite> AsyncReadWrite for T {}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner().poll_flush(cx)
    }

    /// Shuts our side down, then waits for the server's end of file (what it still sends is
    /// of no interest: the session is over).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            match self.inner().poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.shut = true,
                other => return other,
            }
        }
        let mut scratch = [0u8; 512];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match self.inner().poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                // A reset or a broken socket: the server's end is gone as well.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

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
//! A socket may also hold its session's place in the budget ([`open`]'s `hold`) and lets go of it
//! only once the server has closed its end: when a handshake is abandoned (it ran out of time,
//! or failed), the socket is dropped half-way, while the server's backend is still starting or
//! waiting; the dropped socket then shuts its side down and waits, in a task of its own, for
//! the server's end of file, at most [`LINGER_GRACE`], before the place is given back.
//!
//! A connection string with several hosts, `hostaddr` or `target_session_attrs` is connected by
//! tokio-postgres itself ([`open`] returns `None`), without that wait.

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{Host, TargetSessionAttrs};

enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

/// How long a socket dropped before the server closed its end waits for it to, holding what
/// it holds (its session's place in the budget).
pub(crate) const LINGER_GRACE: Duration = Duration::from_secs(10);

/// What a socket keeps until the server has closed its end.
pub(crate) type Hold = Arc<dyn Any + Send + Sync>;

/// A TCP or Unix socket whose shutdown completes once the server has closed its end too.
pub(crate) struct Lingering {
    /// `None` only once handed to the task that waits for the server after a drop.
    stream: Option<Stream>,
    /// Our side is shut down; waiting for the server's end of file.
    shut: bool,
    /// The server has closed its end (end of file, or the socket broke).
    closed: bool,
    hold: Option<Hold>,
}

/// Opens the socket for `config`'s one host, as tokio-postgres would (TCP_NODELAY, keepalives
/// and `connect_timeout` as configured), or `None` when the configuration needs tokio-postgres'
/// own connect (several hosts, `hostaddr`, `target_session_attrs`, TLS over a Unix socket).
/// Also returns the host name, for TLS. The socket keeps `hold` until the server has closed its
/// end, however it ends (dropped half-way through a handshake included), at most
/// [`LINGER_GRACE`] after it was dropped.
pub(crate) async fn open(
    config: &tokio_postgres::Config,
    tls: bool,
    hold: Option<Hold>,
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
    let connected = match config.get_connect_timeout() {
        Some(limit) => match tokio::time::timeout(*limit, connect).await {
            Ok(connected) => connected,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {limit:?}"),
            )),
        },
        None => connect.await,
    };
    Some(connected.map(|(mut socket, host)| {
        socket.hold = hold;
        (socket, host)
    }))
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
            Ok((Lingering::new(Stream::Tcp(stream)), name.clone()))
        }
        #[cfg(unix)]
        Host::Unix(dir) => {
            let stream = UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?;
            Ok((Lingering::new(Stream::Unix(stream)), String::new()))
        }
    }
}

impl Stream {
    fn pinned(&mut self) -> Pin<&mut (dyn AsyncReadWrite + Unpin)> {
        match self {
            Stream::Tcp(s) => Pin::new(s),
            #[cfg(unix)]
            Stream::Unix(s) => Pin::new(s),
        }
    }

    /// Shuts our side down and reads (discarding) until the server's end of file or an error.
    async fn wait_for_server(self) {
        match self {
            Stream::Tcp(s) => drain(s).await,
            #[cfg(unix)]
            Stream::Unix(s) => drain(s).await,
        }
    }
}

async fn drain<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 512];
    while let Ok(n) = stream.read(&mut scratch).await {
        if n == 0 {
            return;
        }
    }
}

impl Lingering {
    fn new(stream: Stream) -> Lingering {
        Lingering {
            stream: Some(stream),
            shut: false,
            closed: false,
            hold: None,
        }
    }

    fn inner(&mut self) -> io::Result<Pin<&mut (dyn AsyncReadWrite + Unpin)>> {
        match &mut self.stream {
            Some(stream) => Ok(stream.pinned()),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

impl Drop for Lingering {
    /// A socket dropped before the server closed its end (a handshake abandoned, a driver
    /// cut off) keeps what it holds until the server has, at most [`LINGER_GRACE`].
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.closed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(LINGER_GRACE, stream.wait_for_server()).await;
                drop(hold);
            });
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
        let before = buf.filled().len();
        let read = match self.inner() {
            Ok(inner) => inner.poll_read(cx, buf),
            Err(error) => return Poll::Ready(Err(error)),
        };
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.closed = true
            }
            Poll::Ready(Err(_)) => self.closed = true,
            _ => {}
        }
        read
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner() {
            Ok(inner) => inner.poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner() {
            Ok(inner) => inner.poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    /// Shuts our side down, then waits for the server's end of file (what it still sends is
    /// of no interest: the session is over).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            match self.inner()?.poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.shut = true,
                other => return other,
            }
        }
        let mut scratch = [0u8; 512];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match self.inner()?.poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    self.closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => continue,
                // A reset or a broken socket: the server's end is gone as well.
                Poll::Ready(Err(_)) => {
                    self.closed = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

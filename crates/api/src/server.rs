//! The HTTP server under the router: accepts connections up to a cap that
//! stays below the process's descriptor limit, and bounds every way a client
//! can hold one open. A request's headers must arrive within the header
//! timeout (which also closes a kept-alive connection that sends nothing
//! more); a connection with no bytes moving either way for the idle timeout
//! is closed (a slow reader, a stalled body); a handler has the request
//! timeout to answer (`?wait=` has its own bound). Past the cap, new
//! connections wait in the kernel's backlog until one of these frees a slot.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How the server bounds connections (`QUERN_HTTP_*`).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// A request's headers must arrive within this, counted from when the
    /// connection may send one (QUERN_HTTP_HEADER_TIMEOUT_S).
    pub header_timeout: Duration,
    /// A connection with no bytes moving either way this long is closed
    /// (QUERN_HTTP_IDLE_TIMEOUT_S).
    pub idle_timeout: Duration,
    /// A handler must answer within this (QUERN_HTTP_REQUEST_TIMEOUT_S).
    pub request_timeout: Duration,
    /// Connections served at once (QUERN_HTTP_MAX_CONNECTIONS); never more
    /// than the descriptor limit leaves room for.
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Descriptors kept free of connections: the database, the handlers, logs.
const RESERVED_DESCRIPTORS: u64 = 64;

/// The connection cap: the setting, lowered to what the soft descriptor
/// limit leaves after the reserve.
pub fn connection_cap(wanted: usize) -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(u64::MAX);
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1)
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    settings: ServerSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let cap = connection_cap(settings.max_connections);
    if cap < settings.max_connections {
        tracing::warn!(cap, wanted = settings.max_connections, "the descriptor limit caps open connections lower");
    }
    let slots = Arc::new(Semaphore::new(cap));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(settings.header_timeout).keep_alive(true);
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or the like: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request.map(axum::body::Body::new)
        });
        let io = TokioIo::new(Watched::new(stream, settings.idle_timeout));
        let connection = http.serve_connection(io, TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(Duration::from_secs(30)) => {
            tracing::warn!("open connections did not finish within 30 s of shutdown; closing them");
        }
    }
    Ok(())
}

/// A connection that ends with an error once no byte has moved either way
/// for the idle timeout.
struct Watched {
    stream: TcpStream,
    idle: Duration,
    /// Milliseconds since `epoch` at the last byte moved.
    last: AtomicU64,
    epoch: Instant,
    deadline: Pin<Box<Sleep>>,
}

impl Watched {
    fn new(stream: TcpStream, idle: Duration) -> Self {
        let epoch = Instant::now();
        Self { stream, idle, last: AtomicU64::new(0), epoch, deadline: Box::pin(tokio::time::sleep(idle)) }
    }

    fn moved(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// `Err` once idle too long; else arms the timer to wake at the deadline.
    fn check_idle(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        let due = self.epoch + Duration::from_millis(self.last.load(Ordering::Relaxed)) + self.idle;
        if self.deadline.deadline() != due {
            self.deadline.as_mut().reset(due);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle connection closed")),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(error) => Poll::Ready(Err(error)),
            },
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, data) {
            Poll::Ready(result) => {
                if matches!(result, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.check_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(error) => Poll::Ready(Err(error)),
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

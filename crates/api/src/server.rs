//! The HTTP server under the router: accepts connections up to a cap that
//! stays below the process's descriptor limit, and bounds every way a client
//! can hold one open, by where the connection is in its exchange:
//! - a request's headers must arrive within the header timeout, counted from
//!   the connection's opening for its first request and from the first byte
//!   of each later one (a slow or half-sent request: slowloris);
//! - between requests a kept-alive connection may sit idle for the keep-alive
//!   time, announced in `Keep-Alive: timeout=N`. It is far longer than the
//!   header timeout on purpose: clients keep idle connections in pools
//!   (reqwest 90 s, undici up to the announced time) and a POST sent on a
//!   connection the server is closing fails without a retry, so the server
//!   must not be the first to give up on a connection a client still holds;
//! - while a request is served, a connection with no bytes moving either way
//!   for the idle timeout is closed (a slow reader, a stalled body), and a
//!   handler has the request timeout to answer (`?wait=` has its own bound).
//!
//! Past the cap, new connections wait in the kernel's backlog until one of
//! these frees a slot.
//!
//! Over 400 lines on purpose: a connection's states (first head, kept
//! alive, serving, upgraded, lingering) and the socket wrapper that holds
//! each to its deadline are one mechanism, read together.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::header::{CONNECTION, HeaderName};
use axum::http::{HeaderValue, StatusCode};
use futures_util::task::AtomicWaker;
use http_body_util::BodyExt;
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
    /// A request's headers must arrive within this, counted from the
    /// connection's opening for its first request and from the first byte
    /// of each later one (QUERN_HTTP_HEADER_TIMEOUT_S).
    pub header_timeout: Duration,
    /// A kept-alive connection may wait this long for its next request
    /// (QUERN_HTTP_KEEP_ALIVE_S).
    pub keep_alive: Duration,
    /// While a request is served, a connection with no bytes moving either
    /// way this long is closed (QUERN_HTTP_IDLE_TIMEOUT_S).
    pub idle_timeout: Duration,
    /// A handler must answer within this (QUERN_HTTP_REQUEST_TIMEOUT_S).
    pub request_timeout: Duration,
    /// Connections served at once (QUERN_HTTP_MAX_CONNECTIONS); never more
    /// than the descriptor limit leaves room for.
    pub max_connections: usize,
}

/// Between requests, how long a kept-alive connection stays open by default:
/// nginx's `keepalive_timeout`, longer than most clients keep an idle one.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(75);

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            keep_alive: DEFAULT_KEEP_ALIVE,
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
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's own header timeout also runs while a kept-alive connection
    // waits for its next request; `Exchange` tells the two apart instead.
    http.timer(TokioTimer::new()).header_read_timeout(None).keep_alive(true);
    let keep_alive_hint = HeaderValue::try_from(format!("timeout={}", settings.keep_alive.as_secs()))
        .expect("`timeout=` and digits are a valid header value");
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
        let exchange = Arc::new(Exchange::new(&settings));
        let (started, ended, hint) = (exchange.clone(), exchange.clone(), keep_alive_hint.clone());
        let service = router
            .clone()
            .map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
                started.request_started();
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                request.map(Body::new)
            })
            .map_response(move |mut response: axum::response::Response| {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    ended.upgraded.store(true, Ordering::Relaxed);
                } else if !response.headers().contains_key(CONNECTION) {
                    response.headers_mut().insert(KEEP_ALIVE, hint.clone());
                }
                let written = ResponseWritten(ended.clone());
                // The body is dropped once hyper has written it whole (or
                // the connection ended): then the connection waits again.
                response.map(move |body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &written;
                        frame
                    }))
                })
            });
        let io = TokioIo::new(Watched::new(stream, exchange));
        // Upgrades: the Realtime websocket passed through (passthrough.rs).
        let connection = http.serve_connection(io, TowerToHyperService::new(service)).with_upgrades();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            // On shutdown a connection finishes the request it serves and
            // takes no other.
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stopping.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every slot back is every connection closed.
    let all = u32::try_from(cap).unwrap_or(u32::MAX);
    if tokio::time::timeout(Duration::from_secs(30), slots.acquire_many(all)).await.is_err() {
        tracing::warn!("open connections did not finish within 30 s of shutdown; closing them");
    }
    Ok(())
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Marks a head that has not started.
const NOT_STARTED: u64 = u64::MAX;

/// Where one connection is in its exchange of requests and responses, in
/// milliseconds since its opening; shared by its reader and its service.
struct Exchange {
    opened: Instant,
    header_timeout: Duration,
    keep_alive: Duration,
    idle_timeout: Duration,
    /// The last byte moved either way.
    last_moved: AtomicU64,
    /// When the head being received began: the opening for the first
    /// request, the first byte for a later one; `NOT_STARTED` between
    /// requests and while one is served.
    head_started: AtomicU64,
    /// When the last response was written whole.
    waiting_since: AtomicU64,
    /// Requests received whose response is not yet written whole.
    serving: AtomicU32,
    /// Switched to another protocol (a websocket): no more heads, only
    /// frames, held to the idle timeout.
    upgraded: AtomicBool,
    /// The connection's task, as last seen waiting on the socket: woken when
    /// a response ends, since the deadline it armed (the idle timeout) no
    /// longer holds.
    task: AtomicWaker,
}

impl Exchange {
    fn new(settings: &ServerSettings) -> Self {
        Self {
            opened: Instant::now(),
            header_timeout: settings.header_timeout,
            keep_alive: settings.keep_alive,
            idle_timeout: settings.idle_timeout,
            last_moved: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            serving: AtomicU32::new(0),
            upgraded: AtomicBool::new(false),
            task: AtomicWaker::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// A request's head arrived whole.
    fn request_started(&self) {
        self.serving.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NOT_STARTED, Ordering::Relaxed);
    }

    /// Its response was written whole (or abandoned).
    fn response_written(&self) {
        self.waiting_since.store(self.now(), Ordering::Relaxed);
        self.serving.fetch_sub(1, Ordering::Relaxed);
        // hyper may already wait on a read armed with the idle timeout; a
        // keep-alive shorter than it would otherwise be kept late.
        self.task.wake();
    }

    /// Bytes arrived: between requests, they begin the next one's head.
    fn received(&self) {
        let now = self.now();
        self.last_moved.store(now, Ordering::Relaxed);
        if self.serving.load(Ordering::Relaxed) == 0 && self.head_started.load(Ordering::Relaxed) == NOT_STARTED {
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    fn sent(&self) {
        self.last_moved.store(self.now(), Ordering::Relaxed);
    }

    /// When the connection is closed unless something changes.
    fn deadline(&self) -> Instant {
        let (since, allowed) = if self.serving.load(Ordering::Relaxed) > 0 || self.upgraded.load(Ordering::Relaxed) {
            (self.last_moved.load(Ordering::Relaxed), self.idle_timeout)
        } else {
            match self.head_started.load(Ordering::Relaxed) {
                NOT_STARTED => (self.waiting_since.load(Ordering::Relaxed), self.keep_alive),
                started => (started, self.header_timeout),
            }
        };
        self.opened + Duration::from_millis(since) + allowed
    }
}

/// Dropped with a response's body: the response is done.
struct ResponseWritten(Arc<Exchange>);

impl Drop for ResponseWritten {
    fn drop(&mut self) {
        self.0.response_written();
    }
}

/// A connection that ends with an error once its exchange's deadline passes
/// with nothing read.
struct Watched {
    stream: TcpStream,
    exchange: Arc<Exchange>,
    deadline: Pin<Box<Sleep>>,
    /// Set once the server has sent its last byte and closes: until then
    /// what the client still sends is read and dropped (see `poll_shutdown`).
    lingering: Option<Lingering>,
}

/// How long, and how much, a closing connection drains.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

struct Lingering {
    until: Instant,
    drained: usize,
}

impl Watched {
    fn new(stream: TcpStream, exchange: Arc<Exchange>) -> Self {
        let deadline = Box::pin(tokio::time::sleep_until(exchange.deadline()));
        Self { stream, exchange, deadline, lingering: None }
    }

    /// `Err` once past the deadline; else arms the timer to wake at it.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        self.exchange.task.register(cx.waker());
        let due = self.exchange.deadline();
        if self.deadline.deadline() != due {
            self.deadline.as_mut().reset(due);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connection closed at its deadline"))
            }
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
                    self.exchange.received();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.check_deadline(cx) {
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
                    self.exchange.sent();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.check_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(error) => Poll::Ready(Err(error)),
            },
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// A lingering close, as nginx makes one: the answer is finished with a
    /// FIN, then what the client is still sending (the rest of a body refused
    /// with 413, say) is read and dropped until it closes too, for at most
    /// [`LINGER`] and [`LINGER_BYTES`]. Closing a socket with unread data
    /// sends a reset instead, which can destroy the answer in flight, so the
    /// client would see a broken connection instead of the 413.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.lingering.is_none() {
            std::task::ready!(Pin::new(&mut self.stream).poll_shutdown(cx))?;
            let until = Instant::now() + LINGER;
            self.deadline.as_mut().reset(until);
            self.lingering = Some(Lingering { until, drained: 0 });
        }
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                // The client closed too, or the connection broke: done.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let read = buf.filled().len();
                    let lingering = self.lingering.as_mut().expect("set above");
                    lingering.drained += read;
                    if lingering.drained > LINGER_BYTES || Instant::now() >= lingering.until {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Pending => {
                    return match self.deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

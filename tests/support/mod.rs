//! Shared by the integration tests: where the built components are, a
//! runtime with a shared compile cache, polling with a deadline, and a real
//! HTTP upstream on a loopback port that plays a script and records requests.
#![allow(dead_code)] // each test file uses part of this

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use quern_runtime::registry::read_component;
use quern_runtime::{HandlerVersion, Runtime, RuntimeSettings};

pub mod db;
pub mod project;
pub mod server;
pub mod workers;

/// A built component under `handlers-dist/` (built by `cargo xtask build-handlers`).
pub fn dist(relative: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("handlers-dist").join(relative);
    assert!(path.exists(), "{} is missing: build the handlers first with `cargo xtask build-handlers`", path.display());
    path
}

/// Compiled components shared by every test run (keyed by content hash).
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("quern-compiled")
}

pub fn settings() -> RuntimeSettings {
    RuntimeSettings {
        cache_dir: Some(cache_dir()),
        max_instances: 16,
        config: quern_runtime::config::ConfigSource::empty(),
        ..RuntimeSettings::default()
    }
}

pub fn runtime() -> Arc<Runtime> {
    Arc::new(Runtime::new(settings()).expect("runtime"))
}

/// Loads a component under `handlers-dist/` with its manifest.
pub fn load(runtime: &Runtime, relative: &str) -> HandlerVersion {
    let (bytes, manifest) = read_component(&dist(relative)).expect("read component");
    runtime.load(&bytes, manifest).expect("load component")
}

/// Polls `check` until it returns `Some`, or panics after `deadline`.
pub async fn poll_until<T>(deadline: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One scripted answer of the [`Upstream`].
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn new(status: u16, body: &str) -> Self {
        Self { status, headers: Vec::new(), body: body.to_string(), delay: Duration::ZERO }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A request the upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names lowercase, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub at: Instant,
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    /// Served once the script runs out.
    fallback: Option<Reply>,
    received: Vec<Received>,
}

/// A real HTTP server on 127.0.0.1:<random port>.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl Upstream {
    /// Starts a server that answers `replies` in order, then `fallback` forever.
    pub async fn start(replies: Vec<Reply>, fallback: Reply) -> Self {
        let script =
            Arc::new(Mutex::new(Script { replies: replies.into(), fallback: Some(fallback), received: Vec::new() }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new().fallback(answer).with_state(script.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Self { addr, script }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.script.lock().unwrap().received.clone()
    }
}

async fn answer(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reply = {
        let mut script = script.lock().unwrap();
        script.received.push(Received {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (name.as_str().to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned())
                })
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
        });
        script.replies.pop_front().or_else(|| script.fallback.clone()).expect("a fallback reply")
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = Response::builder().status(StatusCode::from_u16(reply.status).expect("status"));
    for (name, value) in &reply.headers {
        response = response.header(*name, value);
    }
    response.body(Body::from(reply.body)).expect("response")
}

/// A loopback TCP proxy that can be cut and restored: a database that
/// "goes away" without touching the real server.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

/// Copies `from` to `to`, holding each chunk `latency` first.
async fn relay(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, latency: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        tokio::time::sleep(latency).await;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        Self::with_latency(target, Duration::ZERO).await
    }

    /// A proxy that holds every chunk, each way, for `latency`: a slow database.
    pub async fn with_latency(target: SocketAddr, latency: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (is_cut, tracked) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if is_cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the connection is refused by closing it
                }
                let task = tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(relay(in_read, out_write, latency), relay(out_read, in_write, latency));
                });
                tracked.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { addr, cut, connections }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

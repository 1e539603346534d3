//! `quern bench http`: the gateway over real HTTP on loopback. An in-process
//! gateway (no worker, no per-IP rate limit, the per-user limit checked but
//! set out of reach) on a fresh database; 100 users' clients in the same
//! process (so they share the machine's cores with the server) send
//! enqueues, cache hits and status reads, and print requests per second and
//! latency percentiles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::queue::{Backend, open, progress};
use super::{Latencies, millis, thousands};
use quern_api::auth::{Auth, AuthSettings, PremiumRule, mint};
use quern_api::server::ServerSettings;
use quern_api::{self as api, Gateway, GatewaySettings};
use quern_queue::cache_key::cache_key;
use quern_queue::{Queue, QueueSettings};
use quern_runtime::registry::{Registry, read_component};
use quern_runtime::{Runtime, RuntimeSettings};
use quern_store::CacheWrite;

/// Distinct users the requests come from (each with its own token).
const USERS: usize = 100;

#[derive(clap::Args, Debug, Clone)]
pub struct HttpBenchArgs {
    #[arg(long, value_enum, default_value = "sqlite")]
    pub db: Backend,
    /// PostgreSQL to use (a fresh schema is created and dropped).
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Requests per phase.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// The handler whose type is enqueued (made cacheable for the cache phase).
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: PathBuf,
}

pub async fn run(args: &HttpBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(args.db, &args.postgres_url, "http").await?;
    let (bytes, mut manifest) = read_component(&args.component)?;
    manifest.cacheable = true;
    let job_type = manifest.job_type.clone();
    let runtime = Arc::new(Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() })?);
    let registry = Registry::new(runtime.clone());
    let handler = registry.install(runtime.load(&bytes, manifest)?);
    let queue = Arc::new(Queue::new(
        store.clone(),
        QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() },
    ));

    let gateway = InProcessGateway::start(queue.clone(), registry, ServerSettings::default()).await?;
    let tokens = (0..USERS).map(|n| gateway.token(&format!("bench-user-{n}"))).collect::<Result<Vec<_>, _>>()?;
    let base = gateway.base.clone();

    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    println!(
        "quern bench http: {} on {}, {} requests per phase, {} in flight",
        job_type,
        store.backend(),
        thousands(args.requests as f64),
        args.concurrency
    );

    // 1. Enqueue: each request a new input, so each is a miss and an insert.
    let enqueue_url = format!("{base}/v1/jobs");
    let (enqueue, ids) = phase(args, "enqueue", |n| {
        let request = client
            .post(&enqueue_url)
            .header("authorization", &tokens[n % USERS])
            .header("content-type", "application/json")
            .body(json!({"type": job_type, "input": {"n": n, "text": "arroz, feijão e bife"}}).to_string());
        async move {
            let response = request.send().await.ok()?;
            if response.status() != 202 {
                return None;
            }
            let body: Value = response.json_value().await?;
            body["id"].as_str().and_then(|id| Uuid::parse_str(id).ok()).map(|id| (id, n % USERS))
        }
    })
    .await;

    // 2. Cache hit: one input whose result is cached (for every user, when
    //    the type's cache is per user).
    let cached_input = json!({"text": "arroz, feijão e bife", "cached": true});
    let now = chrono::Utc::now();
    for n in 0..USERS {
        let scope = handler.manifest.cache_scope;
        let key = cache_key(&job_type, &handler.version, scope, &format!("bench-user-{n}"), &cached_input);
        let response = json!({"foods": ["arroz", "feijão", "bife"]});
        let entry = CacheWrite { key, job_type: job_type.clone(), expires_at: now + chrono::Duration::hours(1) };
        store.cache_put(&entry, &response, now).await?;
    }
    let cached_body = json!({"type": job_type, "input": cached_input}).to_string();
    let (cache, _) = phase(args, "cache", |n| {
        let request = client
            .post(&enqueue_url)
            .header("authorization", &tokens[n % USERS])
            .header("content-type", "application/json")
            .body(cached_body.clone());
        async move { (request.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;

    // 3. Status reads of the jobs enqueued in phase 1.
    let (status, _) = phase(args, "status", |n| {
        // Each id comes with the user who enqueued it.
        let (id, user) = ids.get(n % ids.len().max(1)).copied().unwrap_or_default();
        let request = client.get(format!("{base}/v1/jobs/{id}")).header("authorization", &tokens[user]);
        async move { (request.send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;

    gateway.stop().await;
    cleanup.run().await;
    for (name, result) in [("enqueue", enqueue), ("cache hit", cache), ("GET status", status)] {
        match result.latencies {
            Some(l) => println!(
                "  {name:<11} {:>9} req/s  p50 {}  p99 {}  max {}  errors {}",
                thousands(result.per_second),
                millis(l.p50),
                millis(l.p99),
                millis(l.max),
                result.errors
            ),
            None => println!("  {name:<11} no successful requests ({} errors)", result.errors),
        }
    }
    Ok(())
}

/// A gateway serving loopback HTTP in this process (no worker, no per-IP
/// limit), its tokens signed with a key made for the run.
pub(super) struct InProcessGateway {
    pub base: String,
    secret: Vec<u8>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcessGateway {
    pub(super) async fn start(
        queue: Arc<Queue>,
        registry: Arc<Registry>,
        server: ServerSettings,
    ) -> anyhow::Result<Self> {
        let secret = rand::random::<[u8; 32]>().to_vec();
        let premium = PremiumRule::parse("app_metadata.plan=premium").map_err(anyhow::Error::msg)?;
        let hs256_secret = Some(secret.clone());
        let auth = Auth::new(AuthSettings { hs256_secret, jwks_url: None, audience: None, premium })?;
        let shutdown = CancellationToken::new();
        let settings = GatewaySettings { rate_limit_per_min: None, ..GatewaySettings::default() };
        let gateway = Gateway::new(queue, registry, auth, settings, quern_api::InProcess::alone(), shutdown.clone());
        let (router, _) = api::router(gateway);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(api::serve(listener, router, server, shutdown.clone()));
        Ok(Self { base, secret, shutdown, server })
    }

    /// An `Authorization` value for `user`, good for an hour.
    pub(super) fn token(&self, user: &str) -> anyhow::Result<String> {
        Ok(format!("Bearer {}", mint(&self.secret, user, false, None, Duration::from_secs(3600))?))
    }

    pub(super) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
    }
}

struct PhaseResult {
    per_second: f64,
    latencies: Option<Latencies>,
    errors: usize,
}

/// Sends `args.requests` requests, `args.concurrency` at a time; `send(n)`
/// yields `Some` on success. Returns the figures and the successes' values.
async fn phase<T, F, Fut>(args: &HttpBenchArgs, label: &'static str, send: F) -> (PhaseResult, Vec<T>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    use futures_util::StreamExt;
    let bar = progress(args.requests as u64, label);
    let started = Instant::now();
    let results: Vec<(Duration, Option<T>)> = futures_util::stream::iter(0..args.requests)
        .map(|n| {
            let request = send(n);
            let bar = &bar;
            async move {
                let sent = Instant::now();
                let value = request.await;
                bar.inc(1);
                (sent.elapsed(), value)
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let mut samples = Vec::with_capacity(results.len());
    let mut values = Vec::with_capacity(results.len());
    let mut errors = 0;
    for (latency, value) in results {
        match value {
            Some(value) => {
                samples.push(latency);
                values.push(value);
            }
            None => errors += 1,
        }
    }
    let per_second = samples.len() as f64 / elapsed.as_secs_f64();
    (PhaseResult { per_second, latencies: Latencies::of(&mut samples), errors }, values)
}

/// Reads a JSON body without reqwest's `json` feature.
trait JsonValue {
    async fn json_value(self) -> Option<Value>;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Option<Value> {
        serde_json::from_slice(&self.bytes().await.ok()?).ok()
    }
}

//! `quern bench events`: what open event streams cost. An in-process gateway
//! (no worker) on a fresh PostgreSQL schema holds `--streams` SSE streams open
//! on pending jobs, and the bench prints the database's transactions per
//! second with none open and with all open (pushed events: the same), the
//! process's resident memory, and `/health` latency while they are open.
//! Then it completes jobs from a second store (its own connections, as a
//! worker would) and prints how long each completion took, from its commit,
//! to reach the stream following it. The streams' client sides live in the
//! same process: the memory figure counts both ends, and the descriptor
//! limit (two per stream) bounds `--streams`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use super::http::InProcessGateway;
use super::queue::{Backend, load_handler, open};
use super::{Latencies, millis, thousands};
use quern_api::server::ServerSettings;
use quern_queue::{EnqueueRequest, Queue, QueueSettings};
use quern_store::prelude::*;
use quern_store::{AttemptEnd, Claim, PostgresStore, Transition};

#[derive(clap::Args, Debug, Clone)]
pub struct EventsBenchArgs {
    /// PostgreSQL to use (a fresh schema is created and dropped).
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Event streams held open on idle jobs.
    #[arg(long, default_value_t = 1_000)]
    pub streams: usize,
    /// How long each database-load window lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    pub window_s: u64,
    /// Jobs completed one at a time for the push latency.
    #[arg(long, default_value_t = 300)]
    pub completions: usize,
    /// The handler whose type is enqueued.
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: std::path::PathBuf,
}

pub async fn run(args: &EventsBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(Backend::Postgres, &args.postgres_url, "events").await?;
    let schema = format!("quern_bench_events_{}", std::process::id());
    let (registry, job_type) = load_handler(&args.component, 1)?;
    let queue = Arc::new(Queue::new(
        store.clone(),
        QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() },
    ));
    // Room for every stream, the health checks and the followed jobs.
    let server = ServerSettings { max_connections: args.streams + 64, ..ServerSettings::default() };
    let gateway = InProcessGateway::start(queue.clone(), registry, server).await?;
    let (base, token) = (gateway.base.clone(), gateway.token("bench-user")?);
    let counter = sqlx::PgPool::connect(&args.postgres_url).await?;
    println!(
        "quern bench events: {} streams on PostgreSQL, {} s windows",
        thousands(args.streams as f64),
        args.window_s
    );

    let idle = enqueue(&queue, &job_type, args.streams).await?;
    let window = Duration::from_secs(args.window_s);
    let rss_before = rss_kib();
    let none = transactions_per_second(&counter, window).await?;

    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let opened = Instant::now();
    let mut streams = Vec::with_capacity(idle.len());
    for chunk in idle.chunks(200) {
        let opening = chunk.iter().map(|id| open_stream(&client, &base, &token, *id));
        for stream in futures_util::future::join_all(opening).await {
            streams.push(stream?);
        }
    }
    println!("  opened {} streams in {:.1} s", thousands(streams.len() as f64), opened.elapsed().as_secs_f64());
    let rss_open = rss_kib();
    let (open, health) =
        tokio::join!(transactions_per_second(&counter, window), health_latency(&client, &base, window + WAIT_OUT * 2));
    let open = open?;
    println!(
        "  database transactions/s: {:.1} with no stream, {:.1} with {} open",
        none,
        open,
        thousands(streams.len() as f64)
    );
    match rss_before.zip(rss_open) {
        Some((before, after)) => println!(
            "  resident memory: {:.1} MiB before, {:.1} MiB with the streams open ({:.1} KiB per stream)",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / streams.len().max(1) as f64
        ),
        None => println!("  resident memory: not readable on this system"),
    }
    match health {
        Some(l) => println!(
            "  GET /health/live while open: p50 {}  p99 {}  max {}",
            millis(l.p50),
            millis(l.p99),
            millis(l.max)
        ),
        None => println!("  GET /health/live while open: no successful requests"),
    }

    let worker_store = PostgresStore::connect_with(
        std::str::FromStr::from_str(&args.postgres_url)
            .map(|options: sqlx::postgres::PgConnectOptions| options.options([("search_path", schema.as_str())]))?,
    )
    .await?;
    let mut pushed = Vec::with_capacity(args.completions);
    for n in 0..args.completions {
        // Most urgent, so the claim below takes this job, not an idle one.
        let request = EnqueueRequest {
            user_id: "bench-user".into(),
            job_type: job_type.clone(),
            input: json!({ "followed": n }),
            priority: Some(1),
            ..EnqueueRequest::default()
        };
        let id = queue.enqueue(request).await?.id;
        let mut stream = open_stream(&client, &base, &token, id).await?;
        let now = chrono::Utc::now();
        let claimed = worker_store
            .claim(&Claim {
                worker_id: "bench-worker",
                limit: 1,
                now,
                lease_until: now + chrono::Duration::seconds(30),
                types: std::slice::from_ref(&job_type),
            })
            .await?;
        let Some(job) = claimed.into_iter().find(|job| job.id == id) else { continue };
        let end = AttemptEnd {
            job_id: job.id,
            worker_id: "bench-worker".into(),
            attempt: job.attempts,
            handler_version: None,
            started_at: now,
            ended_at: now,
            transition: Transition::Complete { result: json!({}), processing_time_ms: 0, next: None, cache: None },
        };
        worker_store.finish_attempt(&end, chrono::Utc::now()).await?;
        let committed = Instant::now();
        if stream.until_text("\"completed\"", Duration::from_secs(5)).await {
            pushed.push(committed.elapsed());
        }
    }
    let missed = args.completions - pushed.len();
    match Latencies::of(&mut pushed) {
        Some(l) => println!(
            "  completion to stream (commit → event): p50 {}  p95 {}  p99 {}  max {}  ({} jobs, {} missed)",
            millis(l.p50),
            millis(l.p95),
            millis(l.p99),
            millis(l.max),
            args.completions,
            missed
        ),
        None => println!("  completion to stream: no event arrived"),
    }

    drop(streams);
    gateway.stop().await;
    cleanup.run().await;
    Ok(())
}

async fn enqueue(queue: &Queue, job_type: &str, count: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(count);
    for _ in (0..count).step_by(1000) {
        let requests = (0..1000.min(count - ids.len()))
            .map(|n| EnqueueRequest {
                user_id: "bench-user".into(),
                job_type: job_type.into(),
                input: json!({ "n": n }),
                ..EnqueueRequest::default()
            })
            .collect();
        ids.extend(queue.enqueue_batch(requests).await.map_err(|e| anyhow::anyhow!("{e:?}"))?.iter().map(|j| j.id));
    }
    Ok(ids)
}

/// How long a session may hold its statistics before they reach the view.
const WAIT_OUT: Duration = Duration::from_secs(11);

/// The database's committed and rolled-back transactions per second over
/// `window` (PostgreSQL's statistics, all sessions).
async fn transactions_per_second(pool: &sqlx::PgPool, window: Duration) -> anyhow::Result<f64> {
    const READ: &str =
        "SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database WHERE datname = current_database()";
    // Statistics reach the view when each session flushes them (at most
    // once a second, or after 10 s idle): the window is followed by a
    // wait-out, and the rate is over both (the load is the same throughout).
    tokio::time::sleep(WAIT_OUT).await;
    let before: f64 = sqlx::query_scalar(READ).fetch_one(pool).await?;
    tokio::time::sleep(window + WAIT_OUT).await;
    let after: f64 = sqlx::query_scalar(READ).fetch_one(pool).await?;
    // The first read is a transaction of its own.
    Ok((after - before - 1.0).max(0.0) / (window + WAIT_OUT).as_secs_f64())
}

async fn health_latency(client: &reqwest::Client, base: &str, window: Duration) -> Option<Latencies> {
    let until = Instant::now() + window;
    let mut samples = Vec::new();
    while Instant::now() < until {
        let sent = Instant::now();
        if client.get(format!("{base}/health/live")).send().await.is_ok_and(|r| r.status().is_success()) {
            samples.push(sent.elapsed());
        }
    }
    Latencies::of(&mut samples)
}

/// An open event stream and what it has sent so far.
struct OpenStream {
    response: reqwest::Response,
    text: String,
}

impl OpenStream {
    /// Reads until the stream has sent `needle` (true) or `within` passes.
    async fn until_text(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.text.contains(needle) {
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return false,
            }
        }
        true
    }
}

/// Opens `/v1/jobs/{id}/events` and reads its first event.
async fn open_stream(client: &reqwest::Client, base: &str, token: &str, id: Uuid) -> anyhow::Result<OpenStream> {
    let response = client.get(format!("{base}/v1/jobs/{id}/events")).header("authorization", token).send().await?;
    anyhow::ensure!(response.status() == 200, "the stream of {id} answered {}", response.status());
    let mut stream = OpenStream { response, text: String::new() };
    anyhow::ensure!(stream.until_text("\n\n", Duration::from_secs(10)).await, "no first event on {id}");
    stream.text.clear();
    Ok(stream)
}

/// This process's resident memory, KiB (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok())
}

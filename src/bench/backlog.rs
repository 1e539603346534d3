//! `quern bench backlog`: what a claim costs, and how fast an idle worker
//! picks a job up, on an empty queue and then with a large backlog pending:
//! first a backlog of a type the worker does not run (a paused type, another
//! pool's work), then one of its own type. A claim must cost what it takes,
//! not what waits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::queue::{Backend, open, pickup_latencies, progress};
use super::{Latencies, millis, thousands};
use quern_queue::worker::{Worker, WorkerSettings};
use quern_queue::{EnqueueRequest, MAX_BATCH, Queue, QueueSettings};
use quern_runtime::registry::{Registry, read_component};
use quern_runtime::{Runtime, RuntimeSettings};
use quern_store::{Claim, Store};

#[derive(clap::Args, Debug, Clone)]
pub struct BacklogBenchArgs {
    #[arg(long, value_enum, default_value = "postgres")]
    pub db: Backend,
    /// PostgreSQL to use (a fresh schema is created and dropped).
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Jobs in each backlog.
    #[arg(long, default_value_t = 1_000_000)]
    pub pending: usize,
    /// Measurements of each kind in each state.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: std::path::PathBuf,
}

pub async fn run(args: &BacklogBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(args.db, &args.postgres_url, "backlog").await?;
    let (bytes, manifest) = read_component(&args.component)?;
    let job_type = manifest.job_type.clone();
    let runtime = Arc::new(Runtime::new(RuntimeSettings { max_instances: 16, ..RuntimeSettings::default() })?);
    let registry = Registry::new(runtime.clone());
    registry.install(runtime.load(&bytes, manifest)?);
    let queue = Arc::new(Queue::new(
        store.clone(),
        QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() },
    ));
    println!(
        "quern bench backlog: {job_type} on {}, backlogs of {} jobs, {} samples each",
        store.backend(),
        thousands(args.pending as f64),
        args.samples
    );

    measure(&store, &queue, &registry, &job_type, args.samples, "empty queue").await?;
    // Most urgent of all, and of a type no worker here runs.
    fill(&queue, "not_deployed", 1, args.pending, "other type").await?;
    measure(&store, &queue, &registry, &job_type, args.samples, "+ backlog of another type").await?;
    fill(&queue, &job_type, 9, args.pending, "same type").await?;
    let types = [job_type.clone()];
    let mut claims = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let started = Instant::now();
        let claimed = claim_now(&store, 100, &types).await?;
        claims.push(started.elapsed());
        anyhow::ensure!(claimed.len() == 100, "the backlog ran out");
    }
    let claim = Latencies::of(&mut claims).ok_or_else(|| anyhow::anyhow!("no samples"))?;
    println!(
        "  {:<34} claim of 100 from the top: p50 {}  p99 {}",
        "+ backlog of its own type",
        millis(claim.p50),
        millis(claim.p99)
    );
    cleanup.run().await;
    Ok(())
}

/// Bulk-enqueues `count` jobs of `job_type` at `priority`.
/// Claims up to `limit` due jobs of `types`, leased for a day: the bench
/// never ends them.
async fn claim_now(store: &Arc<dyn Store>, limit: u32, types: &[String]) -> anyhow::Result<Vec<quern_store::Job>> {
    let now = Utc::now();
    let lease_until = now + chrono::Duration::days(1);
    Ok(store.claim(&Claim { worker_id: "bench", limit, now, lease_until, types }).await?)
}

async fn fill(queue: &Queue, job_type: &str, priority: i64, count: usize, label: &'static str) -> anyhow::Result<()> {
    let bar = progress(count as u64, label);
    for first in (0..count).step_by(MAX_BATCH) {
        let batch = (first..(first + MAX_BATCH).min(count))
            .map(|n| EnqueueRequest {
                user_id: format!("user-{}", n % 1000),
                job_type: job_type.to_string(),
                input: json!({ "n": n }),
                priority: Some(priority),
                ..EnqueueRequest::default()
            })
            .collect();
        queue.enqueue_batch(batch).await.map_err(|error| anyhow::anyhow!("bulk enqueue: {error}"))?;
        bar.inc(MAX_BATCH as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// Claim statements (held a day, so no reaper interferes) with nothing of the worker's type pending (an idle
/// worker's poll) and with one job pending, then the pickup latency of an
/// idle in-process worker.
async fn measure(
    store: &Arc<dyn Store>,
    queue: &Arc<Queue>,
    registry: &Arc<Registry>,
    job_type: &str,
    samples: usize,
    label: &str,
) -> anyhow::Result<()> {
    let types = [job_type.to_string()];
    let request = |n: usize| EnqueueRequest {
        user_id: "bench".into(),
        job_type: job_type.into(),
        input: json!({ "n": n }),
        ..Default::default()
    };
    let (mut empty, mut one) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    for n in 0..samples {
        let started = Instant::now();
        claim_now(store, 10, &types).await?;
        empty.push(started.elapsed());
        queue.enqueue(request(n)).await?;
        let started = Instant::now();
        let claimed = claim_now(store, 10, &types).await?;
        one.push(started.elapsed());
        anyhow::ensure!(claimed.len() == 1, "expected the one job just enqueued, claimed {}", claimed.len());
    }

    let shutdown = CancellationToken::new();
    let settings = WorkerSettings { concurrency: 4, ..WorkerSettings::default() };
    let worker = tokio::spawn(Worker::new(queue.clone(), registry.clone(), settings).run(shutdown.clone()));
    // One job first, so the worker's start-up is not counted as a pickup.
    let warmup = queue.enqueue(request(2 * samples)).await?.id;
    while !store.get(warmup).await?.is_some_and(|job| job.status.is_finished()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ids = Vec::with_capacity(samples);
    for n in 0..samples {
        ids.push(queue.enqueue(request(samples + n)).await?.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut pickups = pickup_latencies(store, ids).await?;
    shutdown.cancel();
    worker.await??;

    let of = |samples: &mut Vec<Duration>| Latencies::of(samples).ok_or_else(|| anyhow::anyhow!("no samples"));
    let (empty, one, pickup) = (of(&mut empty)?, of(&mut one)?, of(&mut pickups)?);
    println!(
        "  {label:<34} claim, none due: p50 {}  p99 {} · claim of 1: p50 {}  p99 {} · pickup: p50 {}  p99 {}",
        millis(empty.p50),
        millis(empty.p99),
        millis(one.p50),
        millis(one.p99),
        millis(pickup.p50),
        millis(pickup.p99)
    );
    Ok(())
}

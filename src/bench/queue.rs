//! `quern bench queue`: the queue end to end with a near no-op handler
//! (`echo` by default): enqueue throughput, processing throughput at a given
//! concurrency, and pickup latency (enqueue → claim) with an idle worker.
//! Runs on a fresh SQLite file or a fresh PostgreSQL schema, dropped after.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Latencies, millis, thousands};
use quern_queue::completer::CompletionSettings;
use quern_queue::worker::{Worker, WorkerProbe, WorkerSettings};
use quern_queue::{EnqueueRequest, Queue, QueueSettings};
use quern_runtime::registry::{Registry, read_component};
use quern_runtime::{Runtime, RuntimeSettings};
use quern_store::{PostgresStore, SqliteStore, Store};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(clap::Args, Debug, Clone)]
pub struct QueueBenchArgs {
    #[arg(long, value_enum, default_value = "sqlite")]
    pub db: Backend,
    /// PostgreSQL to use (a fresh schema is created and dropped).
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Worker concurrency.
    #[arg(long, default_value_t = 10)]
    pub concurrency: u32,
    /// Tasks enqueueing at once.
    #[arg(long, default_value_t = 4)]
    pub enqueuers: usize,
    /// Jobs per transaction in the bulk enqueue.
    #[arg(long, default_value_t = 1000, value_parser = parse_bulk_batch)]
    pub bulk_batch: usize,
    /// Jobs enqueued one at a time to an idle worker for the pickup latency.
    #[arg(long, default_value_t = 300)]
    pub latency_samples: usize,
    /// The handler to run.
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: PathBuf,
    /// The worker's local queue (QUERN_WORKER_LOCAL_QUEUE).
    #[arg(long, default_value_t = WorkerSettings::default().local_queue)]
    pub local_queue: u32,
    /// The completion batch delay in ms (QUERN_COMPLETION_BATCH_DELAY_MS).
    #[arg(long, default_value_t = CompletionSettings::default().delay.as_millis() as u64)]
    pub completion_delay_ms: u64,
}

pub async fn run(args: &QueueBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(args.db, &args.postgres_url, "queue").await?;
    let (registry, job_type) = load_handler(&args.component, args.concurrency)?;
    let settings = QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() };
    let queue = Arc::new(Queue::new(store.clone(), settings));
    println!(
        "quern bench queue: {} on {}, {} jobs, concurrency {}, local queue ≤ {}, completion delay {} ms",
        &job_type,
        store.backend(),
        thousands(args.jobs as f64),
        args.concurrency,
        args.local_queue,
        args.completion_delay_ms,
    );
    let request = move |user: String, input| EnqueueRequest {
        user_id: user,
        job_type: job_type.clone(),
        input,
        ..Default::default()
    };

    // 1. Enqueue one job per call, several callers at once, no worker running.
    let bar = progress(args.jobs as u64, "enqueue");
    let started = Instant::now();
    let per_task = args.jobs.div_ceil(args.enqueuers.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..args.enqueuers.max(1) {
        let (queue, bar, request) = (queue.clone(), bar.clone(), request.clone());
        let count = per_task.min(args.jobs.saturating_sub(task * per_task));
        tasks.spawn(async move {
            for n in 0..count {
                queue.enqueue(request(format!("user-{}", n % 100), json!({"n": n, "task": task}))).await?;
                bar.inc(1);
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let enqueue_time = started.elapsed();
    bar.finish_and_clear();

    // 2. Process the backlog with a worker started for it.
    let worker_settings = WorkerSettings {
        concurrency: args.concurrency,
        local_queue: args.local_queue,
        completion: CompletionSettings {
            delay: Duration::from_millis(args.completion_delay_ms),
            ..CompletionSettings::default()
        },
        ..WorkerSettings::default()
    };
    let start_worker = || {
        let worker = Worker::new(queue.clone(), registry.clone(), worker_settings.clone());
        let (probe, shutdown) = (worker.probe(), CancellationToken::new());
        (probe, shutdown.clone(), tokio::spawn(worker.run(shutdown)))
    };
    let (probe, shutdown, worker) = start_worker();
    let process_time = drain(&probe, args.jobs as u64, "process").await;
    let first_statements = probe.statements();
    shutdown.cancel();
    worker.await??;

    // 3. Bulk enqueue, `--bulk-batch` jobs per transaction, no worker
    //    running; 4. process that backlog with a fresh worker.
    let bar = progress(args.jobs as u64, "bulk");
    let bulk_started = Instant::now();
    let mut sent = 0;
    while sent < args.jobs {
        let batch: Vec<_> = (sent..(sent + args.bulk_batch).min(args.jobs))
            .map(|n| request(format!("user-{}", n % 100), json!({"n": n, "bulk": true})))
            .collect();
        sent += batch.len();
        queue.enqueue_batch(batch).await.map_err(|error| anyhow::anyhow!("bulk enqueue: {error}"))?;
        bar.set_position(sent as u64);
    }
    let bulk_time = bulk_started.elapsed();
    bar.finish_and_clear();
    let (probe, shutdown, worker) = start_worker();
    let second_process_time = drain(&probe, args.jobs as u64, "process").await;
    let second_statements = probe.statements();
    let left = store.count_unfinished().await?;
    anyhow::ensure!(left == 0, "{left} jobs are still unfinished after the worker ended all of them");

    // 5. Pickup latency: one job at a time to an idle worker.
    let bar = progress(args.latency_samples as u64, "latency");
    let mut ids = Vec::with_capacity(args.latency_samples);
    let mut enqueue_calls = Vec::with_capacity(args.latency_samples);
    for n in 0..args.latency_samples {
        let call = Instant::now();
        ids.push(queue.enqueue(request("latency".into(), json!({"n": n}))).await?.id);
        enqueue_calls.push(call.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
        bar.inc(1);
    }
    let mut pickups = pickup_latencies(&store, ids).await?;
    bar.finish_and_clear();
    shutdown.cancel();
    worker.await??;
    cleanup.run().await;

    let pickup = Latencies::of(&mut pickups).ok_or_else(|| anyhow::anyhow!("no latency samples"))?;
    let enqueue_call = Latencies::of(&mut enqueue_calls).ok_or_else(|| anyhow::anyhow!("no latency samples"))?;
    let rate = |jobs: usize, time: Duration| {
        format!("{:>10} jobs/s  ({} jobs in {})", thousands(jobs as f64 / time.as_secs_f64()), jobs, millis(time))
    };
    println!("  enqueue     {}, one per call, {} callers", rate(args.jobs, enqueue_time), args.enqueuers);
    println!("  bulk        {}, {} per batch", rate(args.jobs, bulk_time), args.bulk_batch);
    println!("  processed   {}, first backlog", rate(args.jobs, process_time));
    println!("  processed   {}, second backlog (after the bulk enqueue)", rate(args.jobs, second_process_time));
    for (label, s) in [("first", first_statements), ("second", second_statements)] {
        println!(
            "  statements  {label} backlog: {} claims ({:.1} jobs each), {} commits of attempt ends ({:.1} each)",
            s.claims,
            s.claimed as f64 / s.claims.max(1) as f64,
            s.completion_commits,
            s.ended as f64 / s.completion_commits.max(1) as f64
        );
    }
    println!(
        "  pickup      p50 {}  p95 {}  p99 {}  ({} jobs, enqueue → claim, idle worker)",
        millis(pickup.p50),
        millis(pickup.p95),
        millis(pickup.p99),
        args.latency_samples
    );
    println!(
        "              of which the enqueue's own insert and commit: p50 {}  p99 {}",
        millis(enqueue_call.p50),
        millis(enqueue_call.p99)
    );
    Ok(())
}

fn parse_bulk_batch(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=quern_queue::MAX_BATCH).contains(&n) => Ok(n),
        _ => Err(format!("use 1 to {}", quern_queue::MAX_BATCH)),
    }
}

/// Waits for each job to end, then reads how long each waited between its
/// enqueue and its claim (`started_at − created_at`).
pub(super) async fn pickup_latencies(store: &Arc<dyn Store>, ids: Vec<uuid::Uuid>) -> anyhow::Result<Vec<Duration>> {
    let mut pickups = Vec::with_capacity(ids.len());
    for id in ids {
        let job = loop {
            let job = store.get(id).await?.ok_or_else(|| anyhow::anyhow!("job {id} vanished"))?;
            if job.status.is_finished() {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let started_at = job.started_at.ok_or_else(|| anyhow::anyhow!("job {id} has no start time"))?;
        pickups.push((started_at - job.created_at).to_std().unwrap_or_default());
    }
    Ok(pickups)
}

/// Waits until the worker has ended `total` jobs since it started; returns
/// how long this backlog took (from the first end counted here). The worker
/// counts the ends it committed: watching that costs the database nothing,
/// and a millisecond's poll keeps the timing exact.
async fn drain(probe: &WorkerProbe, total: u64, label: &'static str) -> Duration {
    let first = probe.ended();
    let bar = progress(total - first, label);
    let started = Instant::now();
    while probe.ended() < total {
        bar.set_position(probe.ended() - first);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bar.finish_and_clear();
    started.elapsed()
}

pub(super) fn progress(len: u64, label: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("  {prefix:<8} [{bar:40}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label);
    bar
}

/// Drops what the benchmark created.
pub(super) enum Cleanup {
    Directory(PathBuf),
    Schema { pool: sqlx::PgPool, schema: String },
}

impl Cleanup {
    pub(super) async fn run(self) {
        match self {
            Self::Directory(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Self::Schema { pool, schema } => {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await;
            }
        }
    }
}

/// A registry serving the component at `path` (with its manifest beside
/// it) for a worker of `concurrency`, and the component's job type.
pub(super) fn load_handler(path: &std::path::Path, concurrency: u32) -> anyhow::Result<(Arc<Registry>, String)> {
    let (bytes, manifest) = read_component(path)?;
    let job_type = manifest.job_type.clone();
    let runtime =
        Arc::new(Runtime::new(RuntimeSettings { max_instances: concurrency * 2 + 4, ..RuntimeSettings::default() })?);
    let registry = Registry::new(runtime.clone());
    registry.install(runtime.load(&bytes, manifest)?);
    Ok((registry, job_type))
}

/// A fresh database for one benchmark: a new SQLite file, or a new schema.
pub(super) async fn open(db: Backend, postgres_url: &str, name: &str) -> anyhow::Result<(Arc<dyn Store>, Cleanup)> {
    match db {
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(format!("quern-bench-{name}-{}", std::process::id()));
            let store = SqliteStore::open(&dir.join("quern.db")).await?;
            store.migrate().await?;
            Ok((Arc::new(store), Cleanup::Directory(dir)))
        }
        Backend::Postgres => {
            let schema = format!("quern_bench_{name}_{}", std::process::id());
            let pool = sqlx::PgPool::connect(postgres_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await?;
            let options =
                sqlx::postgres::PgConnectOptions::from_str(postgres_url)?.options([("search_path", schema.as_str())]);
            let store = PostgresStore::connect_with(options).await?;
            store.migrate().await?;
            Ok((Arc::new(store), Cleanup::Schema { pool, schema }))
        }
    }
}

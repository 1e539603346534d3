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
use crate::queue::worker::{Worker, WorkerSettings};
use crate::queue::{EnqueueRequest, Queue, QueueSettings};
use crate::runtime::registry::{Registry, read_component};
use crate::runtime::{Runtime, RuntimeSettings};
use crate::store::{PostgresStore, SqliteStore, Store};

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
    /// Jobs enqueued one at a time to an idle worker for the pickup latency.
    #[arg(long, default_value_t = 300)]
    pub latency_samples: usize,
    /// The handler to run.
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: PathBuf,
}

pub async fn run(args: &QueueBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(args.db, &args.postgres_url, "queue").await?;
    let (bytes, manifest) = read_component(&args.component)?;
    let job_type = manifest.job_type.clone();
    let runtime = Arc::new(Runtime::new(RuntimeSettings {
        max_instances: args.concurrency * 2 + 4,
        ..RuntimeSettings::default()
    })?);
    let registry = Registry::new(runtime.clone());
    registry.install(runtime.load(&bytes, manifest)?);
    let settings = QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() };
    let queue = Arc::new(Queue::new(store.clone(), settings));
    println!(
        "quern bench queue: {} on {}, {} jobs, concurrency {}",
        job_type,
        store.backend(),
        thousands(args.jobs as f64),
        args.concurrency
    );

    // 1. Enqueue, no worker running.
    let bar = progress(args.jobs as u64, "enqueue");
    let started = Instant::now();
    let per_task = args.jobs.div_ceil(args.enqueuers.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..args.enqueuers.max(1) {
        let (queue, bar, job_type) = (queue.clone(), bar.clone(), job_type.clone());
        let count = per_task.min(args.jobs.saturating_sub(task * per_task));
        tasks.spawn(async move {
            for n in 0..count {
                let input = json!({"n": n, "task": task});
                let request = EnqueueRequest {
                    user_id: format!("user-{}", n % 100),
                    job_type: job_type.clone(),
                    input,
                    ..Default::default()
                };
                queue.enqueue(request).await?;
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

    // 2. Process the backlog.
    let shutdown = CancellationToken::new();
    let worker_settings = WorkerSettings { concurrency: args.concurrency, ..WorkerSettings::default() };
    let worker = tokio::spawn(Worker::new(queue.clone(), registry.clone(), worker_settings).run(shutdown.clone()));
    let bar = progress(args.jobs as u64, "process");
    let started = Instant::now();
    loop {
        let left = store.count_unfinished().await?;
        bar.set_position((args.jobs as i64 - left).max(0) as u64);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let process_time = started.elapsed();
    bar.finish_and_clear();

    // 3. Pickup latency: one job at a time to an idle worker.
    let bar = progress(args.latency_samples as u64, "latency");
    let mut ids = Vec::with_capacity(args.latency_samples);
    for n in 0..args.latency_samples {
        let request = EnqueueRequest {
            user_id: "latency".into(),
            job_type: job_type.clone(),
            input: json!({"n": n}),
            ..Default::default()
        };
        ids.push(queue.enqueue(request).await?.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
        bar.inc(1);
    }
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
    bar.finish_and_clear();
    shutdown.cancel();
    worker.await??;
    cleanup.run().await;

    let pickup = Latencies::of(&mut pickups).ok_or_else(|| anyhow::anyhow!("no latency samples"))?;
    println!(
        "  enqueue     {:>10} jobs/s  ({} jobs in {})",
        thousands(args.jobs as f64 / enqueue_time.as_secs_f64()),
        args.jobs,
        millis(enqueue_time)
    );
    println!(
        "  processed   {:>10} jobs/s  ({} jobs in {})",
        thousands(args.jobs as f64 / process_time.as_secs_f64()),
        args.jobs,
        millis(process_time)
    );
    println!(
        "  pickup      p50 {}  p95 {}  p99 {}  ({} jobs, enqueue → claim, idle worker)",
        millis(pickup.p50),
        millis(pickup.p95),
        millis(pickup.p99),
        args.latency_samples
    );
    Ok(())
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

//! `quern bench fleet`: several `quern worker` processes draining one backlog
//! on one PostgreSQL, as a deployment with a fleet of worker containers
//! would. Prints the aggregate rate and checks that no job ran twice: every
//! job ends with exactly one attempt, completed.

use quern_store::prelude::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use sqlx::Row;

use super::queue::progress;
use super::{millis, thousands};
use quern_queue::{EnqueueRequest, MAX_BATCH, Queue, QueueSettings};
use quern_runtime::registry::read_component;
use quern_store::{PostgresStore, Store};

#[derive(clap::Args, Debug, Clone)]
pub struct FleetBenchArgs {
    /// PostgreSQL to use (a fresh schema is created and dropped).
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    #[arg(long, default_value_t = 40_000)]
    pub jobs: usize,
    /// Each worker's concurrency.
    #[arg(long, default_value_t = 10)]
    pub concurrency: u32,
    /// The handler to run (its `.toml` beside it).
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: PathBuf,
}

/// A worker process, killed if the bench stops early.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: &FleetBenchArgs) -> anyhow::Result<()> {
    let schema = format!("quern_bench_fleet_{}", std::process::id());
    let admin = sqlx::PgPool::connect(&args.postgres_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await?;
    let result = drain_with_fleet(args, &schema).await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await;
    result
}

async fn drain_with_fleet(args: &FleetBenchArgs, schema: &str) -> anyhow::Result<()> {
    let options = sqlx::postgres::PgConnectOptions::from_str(&args.postgres_url)?.options([("search_path", schema)]);
    let store = std::sync::Arc::new(PostgresStore::connect_with(options.clone()).await?);
    store.migrate().await?;
    let pool = sqlx::PgPool::connect_with(options).await?;
    let (_, manifest) = read_component(&args.component)?;
    let queue = Queue::new(store.clone(), QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    println!(
        "quern bench fleet: {} on postgres, {} jobs, {} worker processes × concurrency {}",
        manifest.job_type,
        thousands(args.jobs as f64),
        args.workers,
        args.concurrency
    );

    let bar = progress(args.jobs as u64, "bulk");
    for first in (0..args.jobs).step_by(MAX_BATCH) {
        let batch = (first..(first + MAX_BATCH).min(args.jobs))
            .map(|n| EnqueueRequest {
                user_id: format!("user-{}", n % 100),
                job_type: manifest.job_type.clone(),
                input: json!({ "n": n }),
                ..EnqueueRequest::default()
            })
            .collect();
        queue.enqueue_batch(batch).await.map_err(|error| anyhow::anyhow!("bulk enqueue: {error}"))?;
        bar.inc(MAX_BATCH as u64);
    }
    bar.finish_and_clear();

    // The handlers directory a worker process loads: this one component.
    let dir = std::env::temp_dir().join(format!("quern-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let job_type = &manifest.job_type;
    std::fs::copy(&args.component, dir.join(format!("{job_type}.wasm")))
        .with_context(|| format!("cannot copy {}", args.component.display()))?;
    std::fs::copy(args.component.with_extension("toml"), dir.join(format!("{job_type}.toml")))
        .with_context(|| format!("{} needs its manifest beside it", args.component.display()))?;
    let separator = if args.postgres_url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}options=-csearch_path%3D{schema}", args.postgres_url);

    let bar = progress(args.jobs as u64, "process");
    let spawned = Instant::now();
    let exe = std::env::current_exe()?;
    let fleet: Vec<Process> = (0..args.workers)
        .map(|n| {
            Command::new(&exe)
                .arg("worker")
                .env("QUERN_ADMIN_PORT", "0")
                .env("DATABASE_URL", &url)
                .env("QUERN_HANDLERS_DIR", &dir)
                .env("QUERN_DATA_DIR", dir.join(format!("data-{n}")))
                .env("WORKER_ID", format!("fleet-{n}"))
                .env("WORKER_CONCURRENCY", args.concurrency.to_string())
                .env("QUERN_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .map(Process)
        })
        .collect::<Result<_, _>>()?;
    loop {
        let left = store.count_unfinished().await?;
        bar.set_position(args.jobs as u64 - left as u64);
        if left == 0 {
            break;
        }
        anyhow::ensure!(spawned.elapsed() < Duration::from_secs(600), "{left} jobs still unfinished after 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = spawned.elapsed();
    bar.finish_and_clear();
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);

    // From the first claim to the last completion, by the database's clock:
    // the processes' start-up is not the queue's work.
    let span = sqlx::query(
        "SELECT extract(epoch FROM max(completed_at) - min(started_at))::float8 AS seconds, \
         count(*) FILTER (WHERE status = 'completed') AS completed, count(DISTINCT worker_id) AS workers FROM quern_jobs",
    )
    .fetch_one(&pool)
    .await?;
    let attempts = sqlx::query(
        "SELECT count(*) AS attempts, count(DISTINCT job_id) AS jobs, \
         count(*) FILTER (WHERE outcome = 'completed') AS completed FROM quern_job_attempts",
    )
    .fetch_one(&pool)
    .await?;
    let seconds: f64 = span.try_get("seconds")?;
    let (completed, workers): (i64, i64) = (span.try_get("completed")?, span.try_get("workers")?);
    let (attempt_rows, attempted, completions): (i64, i64, i64) =
        (attempts.try_get("attempts")?, attempts.try_get("jobs")?, attempts.try_get("completed")?);
    println!(
        "  processed   {:>10} jobs/s  ({} jobs, first claim → last completion {}; {} from spawning the processes)",
        thousands(args.jobs as f64 / seconds),
        args.jobs,
        millis(Duration::from_secs_f64(seconds)),
        millis(wall)
    );
    println!("  workers     {workers} of {} took part", args.workers);
    println!(
        "  run twice   {} (attempts {attempt_rows} for {attempted} jobs, {completions} completed)",
        attempt_rows - attempted
    );
    anyhow::ensure!(
        completed == args.jobs as i64 && attempt_rows == args.jobs as i64 && completions == args.jobs as i64,
        "every job should end completed with one attempt: {completed} completed, {attempt_rows} attempts"
    );
    Ok(())
}

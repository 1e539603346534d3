//! `quern bench retention`: deleting old jobs from a large table, as the
//! maintenance leader does, while enqueues go on. Seeds `--rows` finished
//! jobs (one attempt each; every tenth a pipeline step naming the job before
//! it, so the `parent_id` foreign key is exercised), `--old` of them past
//! their retention, then prunes and reports the time and the enqueue latency
//! meanwhile. Runs on a fresh SQLite file or PostgreSQL schema, dropped after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::queue::{Backend, Cleanup, open};
use super::{Latencies, millis, thousands};
use quern_queue::maintenance::{Maintenance, MaintenanceSettings};
use quern_queue::{EnqueueRequest, Queue, QueueSettings};

#[derive(clap::Args, Debug, Clone)]
pub struct RetentionBenchArgs {
    #[arg(long, value_enum, default_value = "postgres")]
    pub db: Backend,
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Finished jobs in the table before the prune.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// How many of them are past their retention.
    #[arg(long, default_value_t = 100_000)]
    pub old: u64,
    /// Jobs deleted per statement (QUERN_PRUNE_BATCH).
    #[arg(long, default_value_t = MaintenanceSettings::default().prune_batch)]
    pub batch: u32,
}

/// One attempt for every seeded job (the same SQL on both databases).
const SEED_ATTEMPTS: &str = "INSERT INTO quern_job_attempts (job_id, attempt, worker_id, started_at, ended_at, outcome) \
                             SELECT id, 1, 'w', started_at, completed_at, 'completed' FROM quern_jobs";

/// Seeds the table in SQL, in the database's own fast path.
async fn seed(cleanup: &Cleanup, args: &RetentionBenchArgs) -> anyhow::Result<()> {
    // Old rows are numbered first, ended 10 days ago; the rest an hour ago.
    match cleanup {
        Cleanup::Schema { pool, schema } => {
            let mut tx = pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL search_path TO {schema}"))).execute(&mut *tx).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO quern_jobs (id, user_id, type, input, result, status, attempts, run_at, created_at, \
                 updated_at, started_at, completed_at, parent_id) \
                 SELECT md5(n::text)::uuid, 'seed', 'echo', '{{\"n\": 1}}', '{{\"ok\": true}}', 'completed', 1, t, t, t, t, t, \
                        CASE WHEN n % 10 = 0 THEN md5((n - 1)::text)::uuid END \
                 FROM (SELECT n, now() - CASE WHEN n <= {old} THEN interval '10 days' ELSE interval '1 hour' END AS t \
                       FROM generate_series(1, {rows}) AS n) AS seeded",
                old = args.old,
                rows = args.rows,
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query(SEED_ATTEMPTS).execute(&mut *tx).await?;
            tx.commit().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {schema}.quern_jobs"))).execute(pool).await?;
        }
        Cleanup::Directory(dir) => {
            let url = format!("sqlite://{}", dir.join("quern.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await?;
            let now = chrono::Utc::now().timestamp_micros();
            let (old_at, recent_at) = (now - 10 * 86_400_000_000, now - 3_600_000_000);
            let mut tx = pool.begin().await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < {rows}) \
                 INSERT INTO quern_jobs (id, user_id, type, input, result, status, attempts, run_at, created_at, \
                 updated_at, started_at, completed_at, parent_id) \
                 SELECT printf('%032x', n), 'seed', 'echo', '{{\"n\": 1}}', '{{\"ok\": true}}', 'completed', 1, t, t, t, t, t, \
                        CASE WHEN n % 10 = 0 THEN printf('%032x', n - 1) END \
                 FROM (SELECT n, CASE WHEN n <= {old} THEN {old_at} ELSE {recent_at} END AS t FROM seq)",
                old = args.old,
                rows = args.rows,
            )))
            .execute(&mut *tx)
            .await?;
            sqlx::query(SEED_ATTEMPTS).execute(&mut *tx).await?;
            tx.commit().await?;
            sqlx::query("ANALYZE").execute(&pool).await?;
            pool.close().await;
        }
    }
    Ok(())
}

pub async fn run(args: &RetentionBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.old <= args.rows, "--old ({}) cannot exceed --rows ({})", args.old, args.rows);
    let (store, cleanup) = open(args.db, &args.postgres_url, "retention").await?;
    let seeding = Instant::now();
    let seeded = seed(&cleanup, args).await;
    if let Err(error) = seeded {
        cleanup.run().await;
        return Err(error);
    }
    println!(
        "retention on {}: {} finished jobs with one attempt each, {} past their retention (seeded in {:.1} s)",
        store.backend(),
        thousands(args.rows as f64),
        thousands(args.old as f64),
        seeding.elapsed().as_secs_f64()
    );
    let queue =
        Arc::new(Queue::new(store.clone(), QueueSettings { max_unfinished_per_user: None, ..Default::default() }));
    let settings = MaintenanceSettings { prune_batch: args.batch, ..MaintenanceSettings::default() };
    let maintenance = Maintenance::new(queue.clone(), settings);
    let stop = CancellationToken::new();
    let enqueuer = {
        let (queue, stop) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            let mut latencies: Vec<Duration> = Vec::new();
            while !stop.is_cancelled() {
                let started = Instant::now();
                let request = EnqueueRequest {
                    user_id: "live".into(),
                    job_type: "echo".into(),
                    input: json!({"n": latencies.len()}),
                    ..EnqueueRequest::default()
                };
                if queue.enqueue(request).await.is_ok() {
                    latencies.push(started.elapsed());
                }
            }
            latencies
        })
    };
    let started = Instant::now();
    let pruned = maintenance.prune_jobs(&CancellationToken::new()).await;
    let took = started.elapsed();
    stop.cancel();
    let mut latencies = enqueuer.await?;
    cleanup.run().await;
    let deleted = pruned?;
    println!(
        "  deleted {} jobs (and their attempts) in {:.2} s: {} jobs/s, {} per statement",
        thousands(deleted as f64),
        took.as_secs_f64(),
        thousands(deleted as f64 / took.as_secs_f64()),
        args.batch
    );
    if let Some(l) = Latencies::of(&mut latencies) {
        println!(
            "  {} enqueues meanwhile: p50 {}, p99 {}, max {}",
            thousands(latencies.len() as f64),
            millis(l.p50),
            millis(l.p99),
            millis(l.max)
        );
    }
    Ok(())
}

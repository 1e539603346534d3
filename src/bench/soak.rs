//! `quern bench soak`: a long day compressed into minutes. Jobs arrive at a
//! steady rate, a worker runs them, and the maintenance loop prunes them
//! seconds after they finish (retention set to seconds, upkeep every few
//! seconds). Every sample prints the jobs in the table, the database's size
//! on disk and the process's resident memory: after warm-up all three
//! should stay flat. Runs on a fresh SQLite file or PostgreSQL schema.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::queue::{Backend, Cleanup, load_handler, open};
use super::thousands;
use quern_queue::leader::Leader;
use quern_queue::maintenance::{Maintenance, MaintenanceSettings, Retention};
use quern_queue::worker::{Worker, WorkerSettings};
use quern_queue::{EnqueueRequest, Queue, QueueSettings};

#[derive(clap::Args, Debug, Clone)]
pub struct SoakBenchArgs {
    #[arg(long, value_enum, default_value = "postgres")]
    pub db: Backend,
    #[arg(long, env = "QUERN_BENCH_POSTGRES_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// How long the load runs, e.g. `10m`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Jobs enqueued per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// How long finished jobs are kept.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub retain: Duration,
    /// How often the maintenance loop prunes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub upkeep_every: Duration,
    /// How often a sample is printed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    #[arg(long, default_value_t = 10)]
    pub concurrency: u32,
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: PathBuf,
}

/// The process's resident memory, from `/proc/self/status` (Linux).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// The queue's tables on disk: PostgreSQL's relations with their indexes
/// and TOAST, or SQLite's file with its write-ahead log.
async fn database_bytes(cleanup: &Cleanup) -> anyhow::Result<u64> {
    match cleanup {
        Cleanup::Schema { pool, schema } => {
            let bytes: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT pg_total_relation_size('{schema}.quern_jobs') + pg_total_relation_size('{schema}.quern_job_attempts')"
            )))
            .fetch_one(pool)
            .await?;
            Ok(bytes as u64)
        }
        Cleanup::Directory(dir) => {
            let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
            Ok(size("quern.db") + size("quern.db-wal"))
        }
    }
}

/// Whether PostgreSQL's autovacuum is switched off (some benchmark servers
/// are): space freed by pruning is then reused only after a manual vacuum.
async fn autovacuum_is_off(cleanup: &Cleanup) -> bool {
    match cleanup {
        Cleanup::Schema { pool, .. } => sqlx::query_scalar::<_, String>("SHOW autovacuum")
            .fetch_one(pool)
            .await
            .is_ok_and(|setting| setting == "off"),
        Cleanup::Directory(_) => false,
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub async fn run(args: &SoakBenchArgs) -> anyhow::Result<()> {
    let (store, cleanup) = open(args.db, &args.postgres_url, "soak").await?;
    let (registry, job_type) = load_handler(&args.component, args.concurrency)?;
    let queue =
        Arc::new(Queue::new(store.clone(), QueueSettings { max_unfinished_per_user: None, ..Default::default() }));
    let stop = CancellationToken::new();
    let worker = Worker::new(
        queue.clone(),
        registry.clone(),
        WorkerSettings { concurrency: args.concurrency, ..WorkerSettings::default() },
    );
    let worker = tokio::spawn(worker.run(stop.clone()));
    let retention = Retention { completed: args.retain, cancelled: args.retain, failed: args.retain };
    let maintenance =
        MaintenanceSettings { upkeep_every: args.upkeep_every, retention, ..MaintenanceSettings::default() };
    Maintenance::new(queue.clone(), maintenance).spawn(Leader::always(), stop.clone());
    println!(
        "quern bench soak: {job_type} on {}, {} jobs/s for {}, kept {} after they end, pruned every {}",
        store.backend(),
        args.rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.retain),
        humantime::format_duration(args.upkeep_every),
    );

    let enqueued = Arc::new(AtomicU64::new(0));
    let load = {
        let (queue, stop, enqueued, rate) = (queue.clone(), stop.clone(), enqueued.clone(), args.rate.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.is_cancelled() {
                tick.tick().await;
                let n = enqueued.fetch_add(1, Ordering::Relaxed);
                let request = EnqueueRequest {
                    user_id: format!("user-{}", n % 100),
                    job_type: job_type.clone(),
                    input: json!({"n": n}),
                    ..Default::default()
                };
                if let Err(error) = queue.enqueue(request).await {
                    tracing::warn!(%error, "soak enqueue failed");
                }
            }
        })
    };

    let vacuum_by_hand = autovacuum_is_off(&cleanup).await;
    if vacuum_by_hand {
        println!(
            "  autovacuum is off on this server: the bench vacuums the queue's tables at each sample, as autovacuum would"
        );
    }
    println!("{:>8}  {:>10}  {:>10}  {:>12}  {:>10}", "elapsed", "enqueued", "in table", "database", "RSS");
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut outcome = Ok(());
    while started.elapsed() < args.duration {
        tokio::time::sleep(args.sample_every.min(args.duration.saturating_sub(started.elapsed()))).await;
        let rows: i64 = match store.count_by_status().await {
            Ok(counts) => counts.iter().map(|(_, n)| n).sum(),
            Err(error) => {
                outcome = Err(anyhow::anyhow!("counting jobs: {error}"));
                break;
            }
        };
        if vacuum_by_hand && let Cleanup::Schema { pool, schema } = &cleanup {
            let vacuum = format!("VACUUM {schema}.quern_jobs, {schema}.quern_job_attempts");
            if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(vacuum)).execute(pool).await {
                tracing::warn!(%error, "vacuum failed");
            }
        }
        let disk = database_bytes(&cleanup).await.unwrap_or(0);
        let rss = resident_bytes().unwrap_or(0);
        println!(
            "{:>7.0}s  {:>10}  {:>10}  {:>12}  {:>10}",
            started.elapsed().as_secs_f64(),
            thousands(enqueued.load(Ordering::Relaxed) as f64),
            thousands(rows as f64),
            mib(disk),
            mib(rss)
        );
        samples.push((rows, disk, rss));
    }
    stop.cancel();
    let _ = load.await;
    let _ = worker.await;
    cleanup.run().await;
    outcome?;
    // Flat after warm-up: the second half's largest against the first half's.
    if samples.len() >= 4 {
        let half = samples.len() / 2;
        let peak =
            |part: &[(i64, u64, u64)], pick: fn(&(i64, u64, u64)) -> f64| part.iter().map(pick).fold(0.0, f64::max);
        let (warm, late) = (&samples[1..half], &samples[half..]);
        for (what, pick) in [
            ("jobs in the table", (|s: &(i64, u64, u64)| s.0 as f64) as fn(&(i64, u64, u64)) -> f64),
            ("database size", |s| s.1 as f64),
            ("resident memory", |s| s.2 as f64),
        ] {
            let (before, after) = (peak(warm, pick), peak(late, pick));
            let change = if before > 0.0 { (after / before - 1.0) * 100.0 } else { 0.0 };
            println!("  {what}: peak {change:+.1} % from the first half (after warm-up) to the second");
        }
    }
    Ok(())
}

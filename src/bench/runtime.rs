//! `quern bench runtime`: the per-job cost of the sandbox. Each job is a fresh
//! `Store` and instance from the pre-linked component, one `handle` call, and
//! the drop; all host capabilities are linked, as in production.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Latencies, micros, millis, thousands};
use quern_runtime::registry::{Registry, read_component};
use quern_runtime::{HandlerVersion, JobSpec, LoadError, Outcome, RunOptions, Runtime, RuntimeError, RuntimeSettings};

#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeBenchArgs {
    /// The component to run (its manifest beside it is read when present).
    #[arg(long, default_value = "handlers-dist/echo.wasm")]
    pub component: PathBuf,
    /// Jobs per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Threads for the all-cores measurement [default: the number of cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// The job input (JSON).
    #[arg(
        long,
        default_value = r#"{"user":"u-123","meal":"lunch","items":[{"name":"rice","grams":150},{"name":"beans","grams":100}]}"#
    )]
    pub input: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("a benchmark job did not complete: {0:?}")]
    JobFailed(Outcome),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("--jobs must be at least 1")]
    NoJobs,
}

pub fn run(args: &RuntimeBenchArgs) -> Result<(), BenchError> {
    if args.jobs == 0 {
        return Err(BenchError::NoJobs);
    }
    let (bytes, manifest) = read_component(&args.component)?;
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "quern bench runtime: {} ({} KiB), {} jobs per measurement",
        args.component.display(),
        bytes.len() >> 10,
        thousands(args.jobs as f64)
    );

    // Compile without a cache, three times; report the median.
    let uncached = Runtime::new(RuntimeSettings { max_instances: 4, ..RuntimeSettings::default() })?;
    let mut compiles = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        uncached.load(&bytes, manifest.clone())?;
        compiles.push(started.elapsed());
    }
    drop(uncached);

    // Load from a warm on-disk cache and swap into a registry.
    let cache_dir = std::env::temp_dir().join(format!("quern-bench-{}", std::process::id()));
    let settings = RuntimeSettings {
        cache_dir: Some(cache_dir.clone()),
        max_instances: (threads as u32 * 2).max(4),
        ..RuntimeSettings::default()
    };
    let runtime = Arc::new(Runtime::new(settings)?);
    runtime.load(&bytes, manifest.clone())?;
    let registry = Registry::new(runtime.clone());
    let mut swaps = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let handler = runtime.load(&bytes, manifest.clone())?;
        registry.install(handler);
        swaps.push(started.elapsed());
    }
    let _ = std::fs::remove_dir_all(&cache_dir);
    let handler = registry.get(&manifest.job_type).expect("installed above");
    println!(
        "  compile, no cache (median of 3)     {}",
        millis(Latencies::of(&mut compiles).map_or(Duration::ZERO, |l| l.p50))
    );
    println!(
        "  cached load + swap (median of 5)    {}",
        millis(Latencies::of(&mut swaps).map_or(Duration::ZERO, |l| l.p50))
    );

    for threads in [1, threads] {
        let (mut samples, wall) = measure(&runtime, &handler, &args.input, args.jobs, threads)?;
        let latencies = Latencies::of(&mut samples).ok_or(BenchError::NoJobs)?;
        println!(
            "  {threads} thread{}  per job p50 {}  p99 {}   {} jobs/s",
            if threads == 1 { " " } else { "s" },
            micros(latencies.p50),
            micros(latencies.p99),
            thousands(args.jobs as f64 / wall.as_secs_f64())
        );
    }
    Ok(())
}

/// Runs `jobs` jobs spread over `threads` threads (each with its own
/// single-threaded executor); returns each job's latency and the wall time.
fn measure(
    runtime: &Arc<Runtime>,
    handler: &Arc<HandlerVersion>,
    input: &str,
    jobs: usize,
    threads: usize,
) -> Result<(Vec<Duration>, Duration), BenchError> {
    let per_thread = jobs.div_ceil(threads.max(1));
    let started = Instant::now();
    let results: Vec<Result<Vec<Duration>, BenchError>> = std::thread::scope(|scope| {
        let workers: Vec<_> =
            (0..threads).map(|_| scope.spawn(|| run_jobs(runtime, handler, input, per_thread))).collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let wall = started.elapsed();
    let mut samples = Vec::with_capacity(jobs);
    for result in results {
        samples.extend(result?);
    }
    Ok((samples, wall))
}

fn run_jobs(
    runtime: &Runtime,
    handler: &HandlerVersion,
    input: &str,
    jobs: usize,
) -> Result<Vec<Duration>, BenchError> {
    let executor = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    executor.block_on(async {
        let job = JobSpec { id: "0190b7a4-bench".into(), input: input.to_string(), attempt: 1, max_attempts: 1 };
        // Warm the instance slots and caches before measuring.
        for _ in 0..200 {
            runtime.run(handler, &job, RunOptions::default()).await;
        }
        let mut samples = Vec::with_capacity(jobs);
        for _ in 0..jobs {
            let started = Instant::now();
            let report = runtime.run(handler, &job, RunOptions::default()).await;
            samples.push(started.elapsed());
            if !matches!(report.outcome, Outcome::Completed { .. }) {
                return Err(BenchError::JobFailed(report.outcome));
            }
        }
        Ok(samples)
    })
}

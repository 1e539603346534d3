//! Benchmarks that print their numbers (`quern bench …`). Speed is claimed
//! from these, never from timed tests; BENCHMARKS.md records what they print.

pub mod backlog;
pub mod e2e;
pub mod events;
pub mod fleet;
pub mod http;
pub mod isolation;
pub mod queue;
pub mod retention;
pub mod runtime;
pub mod soak;

use std::time::Duration;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Per-job cost of a fresh sandbox: instantiate, call, drop.
    Runtime(runtime::RuntimeBenchArgs),
    /// The queue end to end: enqueue and processing throughput, pickup latency.
    Queue(queue::QueueBenchArgs),
    /// Several `quern worker` processes draining one backlog on one PostgreSQL.
    Fleet(fleet::FleetBenchArgs),
    /// Claim cost and pickup latency on an empty queue and behind a large backlog.
    Backlog(backlog::BacklogBenchArgs),
    /// The gateway's latency while every worker slot spins.
    Isolation(isolation::IsolationBenchArgs),
    /// Open event streams: database load with and without them, memory, push latency.
    Events(events::EventsBenchArgs),
    /// The HTTP gateway: enqueue, cache hit and status requests per second, latency.
    Http(http::HttpBenchArgs),
    /// Simulated users enqueueing and following jobs end to end (the seed's load test).
    E2e(e2e::E2eBenchArgs),
    /// Deleting old jobs from a large table while enqueues go on.
    Retention(retention::RetentionBenchArgs),
    /// Steady load for minutes with retention in seconds: table, disk and memory stay flat.
    Soak(soak::SoakBenchArgs),
}

fn block_on(bench: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench)
}

/// Runs one benchmark to its end; each prints its own numbers.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Runtime(args) => Ok(runtime::run(&args)?),
        BenchCommand::Queue(args) => block_on(queue::run(&args)),
        BenchCommand::Fleet(args) => block_on(fleet::run(&args)),
        BenchCommand::Backlog(args) => block_on(backlog::run(&args)),
        BenchCommand::Isolation(args) => block_on(isolation::run(&args)),
        BenchCommand::Events(args) => block_on(events::run(&args)),
        BenchCommand::Http(args) => block_on(http::run(&args)),
        BenchCommand::E2e(args) => block_on(e2e::run(&args)),
        BenchCommand::Retention(args) => block_on(retention::run(&args)),
        BenchCommand::Soak(args) => block_on(soak::run(&args)),
    }
}

/// Percentiles of a set of latency samples.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latencies {
    /// `None` for no samples.
    pub fn of(samples: &mut [Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Self { p50: at(0.50), p95: at(0.95), p99: at(0.99), max: samples[samples.len() - 1] })
    }
}

/// Microseconds with one decimal.
pub fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

/// Milliseconds with two decimals.
pub fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

/// A whole number with thousands separators: 78,120.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_ranked_sample() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let l = Latencies::of(&mut samples).unwrap();
        assert_eq!(l.p50, Duration::from_micros(51));
        assert_eq!(l.p99, Duration::from_micros(99));
        assert_eq!(l.max, Duration::from_micros(100));
        assert!(Latencies::of(&mut []).is_none());
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(78120.4), "78,120");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
    }
}

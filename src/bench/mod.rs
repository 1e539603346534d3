//! Benchmarks that print their numbers (`quern bench …`). Speed is claimed
//! from these, never from timed tests; BENCHMARKS.md records what they print.

pub mod backlog;
pub mod e2e;
pub mod fleet;
pub mod http;
pub mod isolation;
pub mod queue;
pub mod retention;
pub mod runtime;
pub mod soak;

use std::time::Duration;

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

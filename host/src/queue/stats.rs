//! Figures over a window of recent attempts: what the dashboard draws,
//! `/v1/stats` serves and the failure-rate alert judges. Computed here from
//! the attempts each store returns, so both databases give the same numbers.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::{AttemptOutcome, AttemptSample, OutcomeCount};

/// How many buckets the throughput series has, whatever the window.
pub const BUCKETS: i64 = 60;

/// One job type's attempts in the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TypeStats {
    #[serde(rename = "type")]
    pub job_type: String,
    /// Attempts that ended in the window (released ones not counted: a
    /// shutdown handed them back unharmed).
    pub attempts: u64,
    pub completed: u64,
    /// Attempts that failed the job for good.
    pub failed: u64,
    /// Attempts that will run again (a retryable failure or a lapsed lease).
    pub retried: u64,
    pub cancelled: u64,
    /// Mean and 95th percentile run time of completed attempts.
    pub avg_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// failed / (completed + failed): how many jobs that ended, ended badly.
    pub error_rate: Option<f64>,
    /// retried / attempts.
    pub retry_rate: Option<f64>,
}

/// Attempts that ended within one slice of the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub completed: u64,
    pub failed: u64,
}

/// Per type, sorted by type.
pub fn by_type(samples: &[AttemptSample]) -> Vec<TypeStats> {
    summarize(samples, |sample| Some(&sample.job_type)).into_values().collect()
}

/// Per handler version of one type, by version (attempts that never ran on
/// a version, such as lapsed leases, are left out). `job_type` of each is the type.
pub fn by_version(samples: &[AttemptSample], job_type: &str) -> BTreeMap<String, TypeStats> {
    let of_type = samples.iter().filter(|s| s.job_type == job_type);
    let mut versions = summarize(of_type, |sample| sample.handler_version.as_ref());
    for stats in versions.values_mut() {
        stats.job_type = job_type.to_string();
    }
    versions
}

/// Figures per key (`job_type` set to the key).
fn summarize<'a>(
    samples: impl IntoIterator<Item = &'a AttemptSample>,
    key: impl Fn(&'a AttemptSample) -> Option<&'a String>,
) -> BTreeMap<String, TypeStats> {
    let mut groups: BTreeMap<&str, (TypeStats, Vec<f64>)> = BTreeMap::new();
    for sample in samples {
        let Some(key) = key(sample) else { continue };
        if sample.outcome == AttemptOutcome::Released {
            continue;
        }
        let (stats, durations) = groups.entry(key).or_default();
        stats.attempts += 1;
        match sample.outcome {
            AttemptOutcome::Completed => {
                stats.completed += 1;
                durations.push((sample.ended_at - sample.started_at).num_microseconds().unwrap_or(0) as f64 / 1e3);
            }
            AttemptOutcome::Failed => stats.failed += 1,
            AttemptOutcome::Retry | AttemptOutcome::LeaseExpired => stats.retried += 1,
            AttemptOutcome::Cancelled => stats.cancelled += 1,
            AttemptOutcome::Released => {}
        }
    }
    groups
        .into_iter()
        .map(|(key, (mut stats, mut durations))| {
            stats.job_type = key.to_string();
            durations.sort_by(f64::total_cmp);
            if !durations.is_empty() {
                stats.avg_ms = Some(durations.iter().sum::<f64>() / durations.len() as f64);
                stats.p95_ms = Some(percentile(&durations, 0.95));
            }
            stats.error_rate = ratio(stats.failed, stats.completed + stats.failed);
            stats.retry_rate = ratio(stats.retried, stats.attempts);
            (key.to_string(), stats)
        })
        .collect()
}

/// Per type, from counts the database made (no run times: `avg_ms` and
/// `p95_ms` stay empty), sorted by type.
pub fn by_type_counted(counts: &[OutcomeCount]) -> Vec<TypeStats> {
    tally(counts, |count| Some(&count.job_type)).into_values().collect()
}

/// Per handler version of one type, from counts the database made.
pub fn by_version_counted(counts: &[OutcomeCount], job_type: &str) -> BTreeMap<String, TypeStats> {
    let of_type = counts.iter().filter(|c| c.job_type == job_type);
    let mut versions = tally(of_type, |count| count.handler_version.as_ref());
    for stats in versions.values_mut() {
        stats.job_type = job_type.to_string();
    }
    versions
}

/// Figures per key from outcome counts, by the same rules as [`summarize`].
fn tally<'a>(
    counts: impl IntoIterator<Item = &'a OutcomeCount>,
    key: impl Fn(&'a OutcomeCount) -> Option<&'a String>,
) -> BTreeMap<String, TypeStats> {
    let mut groups: BTreeMap<String, TypeStats> = BTreeMap::new();
    for count in counts {
        let Some(key) = key(count) else { continue };
        if count.outcome == AttemptOutcome::Released {
            continue;
        }
        let stats = groups.entry(key.clone()).or_default();
        stats.attempts += count.count;
        match count.outcome {
            AttemptOutcome::Completed => stats.completed += count.count,
            AttemptOutcome::Failed => stats.failed += count.count,
            AttemptOutcome::Retry | AttemptOutcome::LeaseExpired => stats.retried += count.count,
            AttemptOutcome::Cancelled => stats.cancelled += count.count,
            AttemptOutcome::Released => {}
        }
    }
    for (key, stats) in &mut groups {
        stats.job_type = key.clone();
        stats.error_rate = ratio(stats.failed, stats.completed + stats.failed);
        stats.retry_rate = ratio(stats.retried, stats.attempts);
    }
    groups
}

/// Completed and failed attempts in [`BUCKETS`] equal slices of
/// `since..until`, oldest first.
pub fn throughput(samples: &[AttemptSample], since: DateTime<Utc>, until: DateTime<Utc>) -> Vec<Bucket> {
    let width = bucket_width(since, until);
    let mut buckets: Vec<Bucket> =
        (0..BUCKETS).map(|n| Bucket { start: since + width * n as i32, completed: 0, failed: 0 }).collect();
    for sample in samples {
        let offset = (sample.ended_at - since).num_milliseconds();
        if offset < 0 || sample.ended_at > until {
            continue;
        }
        let index = (offset / width.num_milliseconds().max(1)).min(BUCKETS - 1) as usize;
        match sample.outcome {
            AttemptOutcome::Completed => buckets[index].completed += 1,
            AttemptOutcome::Failed => buckets[index].failed += 1,
            _ => {}
        }
    }
    buckets
}

/// The width of one throughput bucket (a minute for the default hour).
pub fn bucket_width(since: DateTime<Utc>, until: DateTime<Utc>) -> TimeDelta {
    let total = (until - since).num_milliseconds().max(BUCKETS);
    TimeDelta::milliseconds(total / BUCKETS)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(job_type: &str, outcome: AttemptOutcome, ended_s: i64, ran_ms: i64) -> AttemptSample {
        let ended_at = DateTime::from_timestamp(1_800_000_000 + ended_s, 0).unwrap();
        AttemptSample {
            job_type: job_type.into(),
            handler_version: Some(format!("v{}", ended_s % 2)),
            outcome,
            started_at: ended_at - TimeDelta::milliseconds(ran_ms),
            ended_at,
        }
    }

    #[test]
    fn rates_and_times_are_per_type_and_released_attempts_do_not_count() {
        let mut samples: Vec<_> = (1..=20).map(|n| sample("a", AttemptOutcome::Completed, n, n * 10)).collect();
        samples.push(sample("a", AttemptOutcome::Failed, 30, 5));
        samples.push(sample("a", AttemptOutcome::Retry, 31, 5));
        samples.push(sample("a", AttemptOutcome::LeaseExpired, 32, 5));
        samples.push(sample("a", AttemptOutcome::Released, 33, 5));
        samples.push(sample("b", AttemptOutcome::Cancelled, 34, 5));
        let stats = by_type(&samples);
        assert_eq!(stats.len(), 2);
        let a = &stats[0];
        assert_eq!((a.attempts, a.completed, a.failed, a.retried), (23, 20, 1, 2));
        assert_eq!(a.avg_ms, Some(105.0));
        assert_eq!(a.p95_ms, Some(190.0));
        assert_eq!(a.error_rate, Some(1.0 / 21.0));
        assert_eq!(a.retry_rate, Some(2.0 / 23.0));
        let b = &stats[1];
        assert_eq!((b.job_type.as_str(), b.cancelled, b.avg_ms, b.error_rate), ("b", 1, None, None));
    }

    #[test]
    fn figures_per_version_keep_versions_apart() {
        let samples: Vec<_> = (0..10).map(|n| sample("a", AttemptOutcome::Completed, n, 10)).collect();
        let mut samples = samples;
        samples.push(sample("a", AttemptOutcome::Failed, 11, 1));
        samples.push(sample("b", AttemptOutcome::Failed, 12, 1));
        let versions = by_version(&samples, "a");
        assert_eq!(versions.keys().collect::<Vec<_>>(), ["v0", "v1"]);
        assert_eq!((versions["v0"].completed, versions["v0"].failed), (5, 0));
        assert_eq!((versions["v1"].completed, versions["v1"].failed), (5, 1));
        assert_eq!(versions["v1"].job_type, "a");
    }

    #[test]
    fn counts_from_the_database_give_the_same_rates_as_the_samples() {
        let mut samples: Vec<_> = (1..=20).map(|n| sample("a", AttemptOutcome::Completed, n, n * 10)).collect();
        samples.push(sample("a", AttemptOutcome::Failed, 30, 5));
        samples.push(sample("a", AttemptOutcome::Retry, 31, 5));
        samples.push(sample("a", AttemptOutcome::Released, 33, 5));
        samples.push(sample("b", AttemptOutcome::Cancelled, 34, 5));
        let mut counts: BTreeMap<(String, Option<String>, &str), u64> = BTreeMap::new();
        for s in &samples {
            *counts.entry((s.job_type.clone(), s.handler_version.clone(), s.outcome.as_str())).or_default() += 1;
        }
        let counts: Vec<OutcomeCount> = counts
            .into_iter()
            .map(|((job_type, handler_version, outcome), count)| OutcomeCount {
                job_type,
                handler_version,
                outcome: AttemptOutcome::parse(outcome).unwrap(),
                count,
            })
            .collect();
        let without_times = |mut stats: TypeStats| {
            (stats.avg_ms, stats.p95_ms) = (None, None);
            stats
        };
        let from_samples: Vec<_> = by_type(&samples).into_iter().map(without_times).collect();
        assert_eq!(by_type_counted(&counts), from_samples);
        let versions: BTreeMap<_, _> =
            by_version(&samples, "a").into_iter().map(|(v, stats)| (v, without_times(stats))).collect();
        assert_eq!(by_version_counted(&counts, "a"), versions);
    }

    #[test]
    fn throughput_counts_each_attempt_in_its_minute() {
        let since = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let until = since + TimeDelta::hours(1);
        let samples = [
            sample("a", AttemptOutcome::Completed, 0, 1),
            sample("a", AttemptOutcome::Completed, 59, 1),
            sample("a", AttemptOutcome::Failed, 61, 1),
            sample("a", AttemptOutcome::Retry, 62, 1),
            sample("a", AttemptOutcome::Completed, 3600, 1),
            sample("a", AttemptOutcome::Completed, 3601, 1),
        ];
        let buckets = throughput(&samples, since, until);
        assert_eq!(buckets.len(), 60);
        assert_eq!(bucket_width(since, until), TimeDelta::minutes(1));
        assert_eq!((buckets[0].completed, buckets[0].failed), (2, 0));
        assert_eq!((buckets[1].completed, buckets[1].failed), (0, 1));
        assert_eq!(buckets[59].completed, 1, "the window's last instant falls in its last bucket");
        assert_eq!(buckets.iter().map(|b| b.completed + b.failed).sum::<u64>(), 4);
    }
}

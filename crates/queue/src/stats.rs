//! Figures over a window of recent attempts: what the dashboard draws,
//! `/v1/stats` serves and the failure-rate alert judges. The database counts
//! and ranks (no attempt rows are loaded); the rates are derived here, so both
//! databases give the same numbers.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use quern_store::{AttemptOutcome, EndedInSlice, OutcomeCount, RunTimes};

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

/// Per type, sorted by type, from the counts and run times the database
/// made (`times` per type; without them `avg_ms` and `p95_ms` stay empty).
pub fn by_type(counts: &[OutcomeCount], times: &[RunTimes]) -> Vec<TypeStats> {
    let mut types = tally(counts, |count| Some(&count.job_type));
    for time in times {
        if let Some(stats) = types.get_mut(&time.job_type) {
            (stats.avg_ms, stats.p95_ms) = (Some(time.avg_ms), Some(time.p95_ms));
        }
    }
    types.into_values().collect()
}

/// Per handler version of one type, by version (attempts that never ran on
/// a version, such as lapsed leases, are left out); `times` per version.
/// `job_type` of each is the type.
pub fn by_version(counts: &[OutcomeCount], times: &[RunTimes], job_type: &str) -> BTreeMap<String, TypeStats> {
    let of_type = counts.iter().filter(|c| c.job_type == job_type);
    let mut versions = tally(of_type, |count| count.handler_version.as_ref());
    for time in times.iter().filter(|t| t.job_type == job_type) {
        if let Some(stats) = time.handler_version.as_ref().and_then(|v| versions.get_mut(v)) {
            (stats.avg_ms, stats.p95_ms) = (Some(time.avg_ms), Some(time.p95_ms));
        }
    }
    for stats in versions.values_mut() {
        stats.job_type = job_type.to_string();
    }
    versions
}

/// Figures per key from outcome counts: released attempts (a shutdown
/// handed them back unharmed) are not counted.
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

/// [`BUCKETS`] equal slices of `since..until`, oldest first, filled with
/// the counts the database made per slice of [`bucket_width`] (an attempt
/// that ended at `until` counts in the last).
pub fn throughput(slices: &[EndedInSlice], since: DateTime<Utc>, until: DateTime<Utc>) -> Vec<Bucket> {
    let width = bucket_width(since, until);
    let mut buckets: Vec<Bucket> =
        (0..BUCKETS).map(|n| Bucket { start: since + width * n as i32, completed: 0, failed: 0 }).collect();
    for slice in slices {
        let index = slice.slice.clamp(0, BUCKETS - 1) as usize;
        buckets[index].completed += slice.completed;
        buckets[index].failed += slice.failed;
    }
    buckets
}

/// The width of one throughput bucket (a minute for the default hour).
pub fn bucket_width(since: DateTime<Utc>, until: DateTime<Utc>) -> TimeDelta {
    let total = (until - since).num_milliseconds().max(BUCKETS);
    TimeDelta::milliseconds(total / BUCKETS)
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(job_type: &str, version: &str, outcome: AttemptOutcome, count: u64) -> OutcomeCount {
        OutcomeCount { job_type: job_type.into(), handler_version: Some(version.into()), outcome, count }
    }

    fn times(job_type: &str, version: Option<&str>, avg_ms: f64, p95_ms: f64) -> RunTimes {
        RunTimes { job_type: job_type.into(), handler_version: version.map(Into::into), avg_ms, p95_ms }
    }

    #[test]
    fn rates_and_times_are_per_type_and_released_attempts_do_not_count() {
        let counts = [
            count("a", "v0", AttemptOutcome::Completed, 12),
            count("a", "v1", AttemptOutcome::Completed, 8),
            count("a", "v1", AttemptOutcome::Failed, 1),
            count("a", "v1", AttemptOutcome::Retry, 1),
            count("a", "v1", AttemptOutcome::LeaseExpired, 1),
            count("a", "v1", AttemptOutcome::Released, 4),
            count("b", "v0", AttemptOutcome::Cancelled, 1),
        ];
        let stats = by_type(&counts, &[times("a", None, 105.0, 190.0)]);
        assert_eq!(stats.len(), 2);
        let a = &stats[0];
        assert_eq!((a.attempts, a.completed, a.failed, a.retried), (23, 20, 1, 2));
        assert_eq!((a.avg_ms, a.p95_ms), (Some(105.0), Some(190.0)));
        assert_eq!(a.error_rate, Some(1.0 / 21.0));
        assert_eq!(a.retry_rate, Some(2.0 / 23.0));
        let b = &stats[1];
        assert_eq!((b.job_type.as_str(), b.cancelled, b.avg_ms, b.error_rate), ("b", 1, None, None));
    }

    #[test]
    fn figures_per_version_keep_versions_apart() {
        let counts = [
            count("a", "v0", AttemptOutcome::Completed, 5),
            count("a", "v1", AttemptOutcome::Completed, 5),
            count("a", "v1", AttemptOutcome::Failed, 1),
            count("b", "v1", AttemptOutcome::Failed, 1),
            OutcomeCount {
                job_type: "a".into(),
                handler_version: None,
                outcome: AttemptOutcome::LeaseExpired,
                count: 3,
            },
        ];
        let run_times = [times("a", Some("v0"), 10.0, 12.0), times("a", Some("v1"), 20.0, 25.0)];
        let versions = by_version(&counts, &run_times, "a");
        assert_eq!(versions.keys().collect::<Vec<_>>(), ["v0", "v1"]);
        assert_eq!((versions["v0"].completed, versions["v0"].failed, versions["v0"].p95_ms), (5, 0, Some(12.0)));
        assert_eq!((versions["v1"].completed, versions["v1"].failed, versions["v1"].p95_ms), (5, 1, Some(25.0)));
        assert_eq!(versions["v1"].job_type, "a");
    }

    #[test]
    fn throughput_puts_each_slice_in_its_bucket_and_the_window_s_end_in_the_last() {
        let since = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let until = since + TimeDelta::hours(1);
        let slices = [
            EndedInSlice { slice: 0, completed: 2, failed: 0 },
            EndedInSlice { slice: 1, completed: 0, failed: 1 },
            EndedInSlice { slice: 60, completed: 1, failed: 0 },
        ];
        let buckets = throughput(&slices, since, until);
        assert_eq!(buckets.len(), 60);
        assert_eq!(bucket_width(since, until), TimeDelta::minutes(1));
        assert_eq!(buckets[1].start, since + TimeDelta::minutes(1));
        assert_eq!((buckets[0].completed, buckets[0].failed), (2, 0));
        assert_eq!((buckets[1].completed, buckets[1].failed), (0, 1));
        assert_eq!(buckets[59].completed, 1, "the window's last instant falls in its last bucket");
        assert_eq!(buckets.iter().map(|b| b.completed + b.failed).sum::<u64>(), 4);
    }
}

//! What the database counts for health, metrics and the dashboard: [`StatsStore`].

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{AttemptOutcome, JobStatus, StoreError};

/// How many attempts of one type and version ended one way, counted by the
/// database (what the failure-rate alert and the canary judge need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeCount {
    pub job_type: String,
    pub handler_version: Option<String>,
    pub outcome: AttemptOutcome,
    pub count: u64,
}

/// How long the completed attempts of one group ran: per type
/// (`handler_version` is `None`) or per type and handler version.
#[derive(Debug, Clone, PartialEq)]
pub struct RunTimes {
    pub job_type: String,
    pub handler_version: Option<String>,
    pub avg_ms: f64,
    /// Nearest rank: the smallest run time at least 95 % of the group ran within.
    pub p95_ms: f64,
}

/// Completed and failed attempts that ended within one slice of a window
/// (slice 0 starts at the window's start).
#[derive(Debug, Clone, PartialEq)]
pub struct EndedInSlice {
    pub slice: i64,
    pub completed: u64,
    pub failed: u64,
}

/// A job that failed for good: what operators look at first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedJob {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub error: Option<String>,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

/// Counts of jobs by type and status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepthRow {
    #[serde(rename = "type")]
    pub job_type: String,
    pub status: JobStatus,
    pub count: i64,
}

/// Counts and times read for health, metrics and the dashboard.
#[async_trait]
pub trait StatsStore: Send + Sync {
    /// Unfinished (pending and processing) jobs by type and status.
    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError>;

    /// Attempts that ended at or after `since`, counted by type, version and
    /// outcome in the database (no rows are loaded).
    async fn outcome_counts(&self, since: DateTime<Utc>) -> Result<Vec<OutcomeCount>, StoreError>;

    /// Mean and 95th-percentile run time of the attempts that completed at
    /// or after `since`, per type, or per type and version when
    /// `per_version` (computed in the database: no rows are loaded).
    async fn run_times(&self, since: DateTime<Utc>, per_version: bool) -> Result<Vec<RunTimes>, StoreError>;

    /// Mean and 95th percentile time from enqueue to end of the jobs
    /// completed since `since`, by type (`handler_version` is `None`).
    async fn latencies(&self, since: DateTime<Utc>) -> Result<Vec<RunTimes>, StoreError>;

    /// Completed and failed attempts that ended within `since..=until`,
    /// counted per `slice`-wide slice of it; slices without any are left out.
    async fn ended_per_slice(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        slice: TimeDelta,
    ) -> Result<Vec<EndedInSlice>, StoreError>;

    /// The latest jobs that failed for good, newest first.
    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailedJob>, StoreError>;

    /// Counts of jobs by status.
    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError>;
}

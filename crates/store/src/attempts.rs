//! How an attempt ends: what it does to its job ([`Transition`]) and how it is recorded.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::NewJob;

/// How one attempt ended, as recorded in `quern_job_attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Completed,
    Retry,
    Failed,
    Cancelled,
    LeaseExpired,
    Released,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Retry => "retry",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::LeaseExpired => "lease_expired",
            Self::Released => "released",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Completed, Self::Retry, Self::Failed, Self::Cancelled, Self::LeaseExpired, Self::Released]
            .into_iter()
            .find(|outcome| outcome.as_str() == text)
    }
}

/// One recorded attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub worker_id: String,
    pub handler_version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
}

/// The end of an attempt held by `worker_id`.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    pub job_id: Uuid,
    pub worker_id: String,
    /// The attempt number the claim gave the job; a mismatch means the job was
    /// reclaimed meanwhile and this end is stale.
    pub attempt: i32,
    pub handler_version: Option<String>,
    pub started_at: DateTime<Utc>,
    /// When the attempt ended (its handler returned, or its lease lapsed):
    /// the time a retry's delay counts from, recorded as the attempt's end,
    /// not the later moment its batch is written.
    pub ended_at: DateTime<Utc>,
    pub transition: Transition,
}

/// What an attempt's end does to its job.
#[derive(Debug, Clone)]
pub enum Transition {
    /// `completed` with the result; `next`, a pipeline's next job, and
    /// `cache`, the result's cache entry, are written in the same transaction,
    /// so whoever sees the job completed also finds its result cached.
    Complete { result: Value, processing_time_ms: i32, next: Option<Box<NewJob>>, cache: Option<CacheWrite> },
    /// Back to `pending`, to run at `run_at`. `outcome` is `Retry` or `LeaseExpired`.
    Retry { error: String, run_at: DateTime<Utc>, outcome: AttemptOutcome },
    /// `failed`. `outcome` is `Failed` or `LeaseExpired`.
    Fail { error: String, outcome: AttemptOutcome },
    /// The job was cancelled while it ran: only the attempt is recorded.
    Cancelled,
    /// Shutdown: back to `pending` at once, the attempt not counted.
    Release,
}

impl Transition {
    /// The name the stores' batch statements give this kind of end.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Complete { .. } => "complete",
            Self::Retry { .. } => "retry",
            Self::Fail { .. } => "fail",
            Self::Cancelled => "cancelled",
            Self::Release => "release",
        }
    }

    /// How the attempt is recorded (a release records nothing).
    pub(crate) fn outcome(&self) -> AttemptOutcome {
        match self {
            Self::Complete { .. } => AttemptOutcome::Completed,
            Self::Retry { outcome, .. } | Self::Fail { outcome, .. } => *outcome,
            Self::Cancelled => AttemptOutcome::Cancelled,
            Self::Release => AttemptOutcome::Released,
        }
    }

    /// The error the job and the attempt record carry.
    pub(crate) fn error(&self) -> Option<&str> {
        match self {
            Self::Retry { error, .. } | Self::Fail { error, .. } => Some(error),
            Self::Cancelled => Some(CANCELLED_WHILE_RUNNING),
            Self::Complete { .. } | Self::Release => None,
        }
    }
}

/// The error of an attempt cut short by a cancel.
pub(crate) const CANCELLED_WHILE_RUNNING: &str = "cancelled while running";

/// A completed job's result to cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheWrite {
    pub key: String,
    pub job_type: String,
    pub expires_at: DateTime<Utc>,
}

/// What became of an attempt's end handed to [`Store::finish_attempts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndWritten {
    /// Written as asked.
    Recorded,
    /// The job was cancelled while the attempt ran (or while its end waited
    /// to be written): the attempt is recorded as cancelled, its result dropped.
    Cancelled,
    /// The worker no longer held the attempt (the job was reclaimed, or its
    /// lease lapsed and it was reaped): nothing was written.
    Stale,
}

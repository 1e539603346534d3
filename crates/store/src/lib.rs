//! The only place that speaks SQL. [`Store`] is the seam between the queue's
//! rules (the `quern-queue` crate) and a database; `sqlite.rs` and
//! `postgres.rs` implement it, and one conformance suite (the
//! `quern-conformance` crate, run by `tests/queue_conformance.rs`) runs
//! against both.
//!
//! A store performs state transitions atomically and checks who holds a job;
//! it does not decide anything (when to retry, what a lapsed lease means):
//! that is the queue's.

mod nodelay;
mod postgres;
mod rows;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [Self::Pending, Self::Processing, Self::Completed, Self::Failed, Self::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Processing => "processing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// Completed, failed or cancelled: nothing more happens to the job.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pipeline step that runs after a job completes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    #[serde(rename = "type")]
    pub job_type: String,
    pub input: Value,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub user_id: String,
    pub job_type: String,
    pub input: Value,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub status: JobStatus,
    pub priority: i16,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub worker_id: Option<String>,
    pub handler_version: Option<String>,
    pub progress_percent: i16,
    pub progress_message: Option<String>,
    pub processing_time_ms: Option<i32>,
    pub parent_id: Option<Uuid>,
    pub root_id: Option<Uuid>,
    pub next_steps: Vec<Step>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Job {
    /// A job as its insert stored it: the store need not read it back.
    /// Times keep the microseconds both databases keep.
    pub fn pending(new: &NewJob, now: DateTime<Utc>) -> Self {
        use chrono::SubsecRound;
        let now = now.trunc_subsecs(6);
        Self {
            id: new.id,
            user_id: new.user_id.clone(),
            job_type: new.job_type.clone(),
            input: new.input.clone(),
            result: None,
            error: None,
            status: JobStatus::Pending,
            priority: new.priority,
            attempts: 0,
            max_attempts: new.max_attempts,
            run_at: new.run_at.trunc_subsecs(6),
            lease_expires_at: None,
            worker_id: None,
            handler_version: None,
            progress_percent: 0,
            progress_message: None,
            processing_time_ms: None,
            parent_id: new.parent_id,
            root_id: new.root_id,
            next_steps: new.next_steps.clone(),
            created_at: now,
            updated_at: now,
            started_at: None,
            completed_at: None,
        }
    }
}

/// Finished jobs that ended before these times may be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneCutoffs {
    pub completed: DateTime<Utc>,
    pub cancelled: DateTime<Utc>,
    pub failed: DateTime<Utc>,
}

/// A job to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub id: Uuid,
    pub user_id: String,
    pub job_type: String,
    pub input: Value,
    pub priority: i16,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub next_steps: Vec<Step>,
    pub parent_id: Option<Uuid>,
    pub root_id: Option<Uuid>,
}

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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    pub attempt: i32,
    pub worker_id: String,
    pub handler_version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub outcome: AttemptOutcome,
    pub error: Option<String>,
}

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FailedJob {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub error: Option<String>,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

/// A handler version as uploaded: the component and its manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub job_type: String,
    pub version: String,
    pub sha256: String,
    pub component: Vec<u8>,
    /// `handler.toml`, as uploaded.
    pub manifest: String,
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
}

/// A stored version without its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionInfo {
    #[serde(rename = "type")]
    pub job_type: String,
    pub version: String,
    /// The sha256 of the component alone.
    pub sha256: String,
    pub size_bytes: i64,
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
}

/// A type's rollout: the version serving it, the one before (for a
/// rollback), a canary taking `canary_percent` of jobs, and the pause flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rollout {
    #[serde(rename = "type")]
    pub job_type: String,
    pub active_version: Option<String>,
    pub previous_version: Option<String>,
    pub canary_version: Option<String>,
    pub canary_percent: i16,
    pub paused: bool,
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

/// A running job's latest progress report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub job_id: Uuid,
    pub percent: i16,
    pub message: String,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending or processing and is now cancelled; a running instance
    /// is interrupted by its worker.
    Cancelled {
        was_running: bool,
    },
    /// It had ended, but a later step of its pipeline had not: that step is
    /// cancelled, and with it the steps still to come.
    StepCancelled {
        step: Uuid,
        was_running: bool,
    },
    /// It had already ended, and nothing after it was left to run.
    AlreadyFinished(JobStatus),
    NotFound,
}

/// What a cancel does to a job and the rest of its pipeline, from the
/// job's status and the unfinished jobs of its chain (`id`, `status`).
pub(crate) fn cancel_outcome(id: Uuid, status: JobStatus, unfinished: &[(Uuid, JobStatus)]) -> CancelOutcome {
    if !status.is_finished() {
        return CancelOutcome::Cancelled { was_running: status == JobStatus::Processing };
    }
    match unfinished.iter().find(|(other, _)| *other != id) {
        Some((step, status)) => {
            CancelOutcome::StepCancelled { step: *step, was_running: *status == JobStatus::Processing }
        }
        None => CancelOutcome::AlreadyFinished(status),
    }
}

/// A cached result.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub response: Value,
    pub hit_count: i64,
    pub last_hit_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
}

/// Which jobs a listing returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this user's jobs; every user's when `None`.
    pub user_id: Option<String>,
    pub status: Option<JobStatus>,
    pub job_type: Option<String>,
    /// Keyset cursor: only jobs older than this `(created_at, id)`.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: u32,
}

/// What a request to run a finished job again did.
#[derive(Debug, Clone, PartialEq)]
pub enum RequeueOutcome {
    /// Back to `pending` with fresh attempts.
    Requeued(Box<Job>),
    /// Not failed or cancelled (or a cancelled job whose instance is still
    /// stopping): nothing changed.
    NotRetryable(JobStatus),
    NotFound,
}

/// Counts of jobs by type and status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DepthRow {
    #[serde(rename = "type")]
    pub job_type: String,
    pub status: JobStatus,
    pub count: i64,
}

/// The result cache at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CacheStats {
    /// Rows, live or expired but not yet purged.
    pub entries: i64,
    /// Rows still live.
    pub live: i64,
    /// Hits counted across all rows.
    pub hits: i64,
}

/// A worker's row in `quern_workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub active_jobs: i32,
    pub concurrency: i32,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("user {user_id} already has {limit} unfinished jobs, the most allowed; wait for one to finish")]
    TooManyActiveJobs { user_id: String, limit: u32 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {message}")]
    Corrupt { table: &'static str, message: String },
    #[error("unsupported DATABASE_URL `{0}`: use sqlite://path/to/file.db or postgres://user@host/db")]
    UnsupportedUrl(String),
    #[error("this database lacks Supabase's {0}: --supabase is for a Supabase project's database")]
    NotSupabase(String),
    #[error(
        "the database is not migrated ({0}): run `quern migrate` with the same DATABASE_URL, or start `quern serve`, which migrates"
    )]
    NotMigrated(String),
}

/// Waits until jobs may be ready to claim: a NOTIFY on Postgres, an
/// in-process signal on SQLite. Wake-ups may be spurious or missed; the worker
/// also polls.
#[async_trait]
pub trait Wakeups: Send {
    async fn wait(&mut self);
}

/// The maintenance lead, held while this lives (see [`quern_queue::leader`]).
#[async_trait]
pub trait LeaderLock: Send {
    /// Fails when the lock may have been lost (its connection broke).
    async fn check(&mut self) -> Result<(), StoreError>;
}

/// SQLite's lead: the one process serving the file always holds it.
pub struct SoleProcess;

#[async_trait]
impl LeaderLock for SoleProcess {
    async fn check(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks, changing nothing, that every migration this build knows is
    /// applied: [`StoreError::NotMigrated`] names the first one missing.
    async fn check_migrated(&self) -> Result<(), StoreError>;

    /// Inserts a job. With `max_unfinished_per_user`, refuses atomically when
    /// the user already has that many pending or processing jobs.
    async fn enqueue(
        &self,
        job: &NewJob,
        now: DateTime<Utc>,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<Job, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// A user's jobs, newest first.
    async fn jobs_of_user(&self, user_id: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.list_jobs(&JobFilter { user_id: Some(user_id.to_string()), limit, ..JobFilter::default() }).await
    }

    /// Jobs matching `filter`, newest first (by `created_at`, then id).
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError>;

    /// Puts a failed or cancelled job back to `pending`, due now, with
    /// `extra_attempts` more attempts. With `max_unfinished_per_user`, refuses
    /// atomically when its user is at the limit, as enqueue does.
    async fn requeue(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        extra_attempts: i32,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<RequeueOutcome, StoreError>;

    /// A trivial round trip: does the database answer?
    async fn ping(&self) -> Result<(), StoreError>;

    /// Unfinished (pending and processing) jobs by type and status.
    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError>;

    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError>;

    /// Claims up to `limit` due pending jobs of `types` (the ones the worker
    /// has handlers for), most urgent first, for `worker_id`: each becomes
    /// `processing` with its attempt counted and a lease until `lease_until`.
    /// No job is handed to two claimers. The cost follows the jobs claimed,
    /// not the backlog: each type is read through its own part of the claim
    /// index, so pending jobs of other types are never scanned.
    async fn claim(
        &self,
        worker_id: &str,
        limit: u32,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        types: &[String],
    ) -> Result<Vec<Job>, StoreError>;

    /// Inserts many jobs in one transaction, all or none, and wakes workers
    /// once. No per-user limit: this is for trusted server-side producers.
    async fn enqueue_batch(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Ends many attempts in one transaction (one commit for all: a worker's
    /// group commit), answering for each, in order, what was written. Each
    /// end is guarded on its own: it is written only while its worker still
    /// holds that attempt. A job cancelled meanwhile keeps its cancellation
    /// (the attempt is recorded as cancelled, the result dropped); a reclaimed
    /// or reaped one is left alone. A completion's cache entry and pipeline
    /// step are written with it, or not at all.
    async fn finish_attempts(&self, ends: &[AttemptEnd], now: DateTime<Utc>) -> Result<Vec<EndWritten>, StoreError>;

    /// Ends one attempt: `true` when it was written as asked (see
    /// [`Store::finish_attempts`]).
    async fn finish_attempt(&self, end: &AttemptEnd, now: DateTime<Utc>) -> Result<bool, StoreError> {
        Ok(self.finish_attempt_written(end, now).await? == EndWritten::Recorded)
    }

    /// Ends one attempt, answering what was written.
    async fn finish_attempt_written(&self, end: &AttemptEnd, now: DateTime<Utc>) -> Result<EndWritten, StoreError> {
        let written = self.finish_attempts(std::slice::from_ref(end), now).await?;
        written.into_iter().next().ok_or_else(|| corrupt("quern_jobs", "no answer for an attempt's end"))
    }

    /// Extends the leases of `ids` that `worker_id` still holds; returns the
    /// ids it no longer holds (cancelled, reaped), whose instances should stop.
    async fn renew_leases(
        &self,
        worker_id: &str,
        ids: &[Uuid],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Of `ids`, those `worker_id` no longer holds. Read-only: checked often.
    async fn released(&self, worker_id: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError>;

    /// Processing jobs whose lease lapsed before `now`.
    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, StoreError>;

    /// Cancels a pending or processing job, and every unfinished job of its
    /// pipeline (the chain of steps from the same first job): cancelling any
    /// step stops the steps not yet run.
    async fn cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError>;

    /// Saves the latest progress of jobs `worker_id` holds, in one statement.
    async fn set_progress(&self, worker_id: &str, progress: &[Progress]) -> Result<(), StoreError>;

    async fn attempts(&self, id: Uuid) -> Result<Vec<AttemptRecord>, StoreError>;

    /// A live cached result; counts the hit atomically.
    async fn cache_hit(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError>;

    /// A cache row as it is, without counting a hit.
    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError>;

    async fn cache_put(
        &self,
        key: &str,
        job_type: &str,
        response: &Value,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Deletes expired cache rows; returns how many.
    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError>;

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError>;

    /// Removes a worker's row: it stopped cleanly and is not missed.
    async fn remove_worker(&self, id: &str) -> Result<(), StoreError>;

    /// Removes rows of workers silent since before `before` (long dead:
    /// killed, never stopped); returns how many.
    async fn forget_workers(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Deletes at most `limit` finished jobs (their attempts with them) that
    /// ended before their status's cutoff and that no instance still holds;
    /// returns how many. One short statement: callers loop while it deletes
    /// a full batch, so enqueues and claims are never held up for long.
    /// Takes the maintenance lead if no other process holds it.
    async fn try_lead(&self) -> Result<Option<Box<dyn LeaderLock>>, StoreError>;

    async fn prune_jobs(&self, cutoffs: &PruneCutoffs, limit: u32) -> Result<u64, StoreError>;

    /// Deletes the stored handler versions no rollout names (active,
    /// canary, previous) that are not among the `keep_newest` uploads of
    /// their type; returns each as (type, version).
    async fn prune_handler_versions(&self, keep_newest: u32) -> Result<Vec<(String, String)>, StoreError>;

    /// Attempts that ended at or after `since`, counted by type, version and
    /// outcome in the database (no rows are loaded).
    async fn outcome_counts(&self, since: DateTime<Utc>) -> Result<Vec<OutcomeCount>, StoreError>;

    /// Mean and 95th-percentile run time of the attempts that completed at
    /// or after `since`, per type, or per type and version when
    /// `per_version` (computed in the database: no rows are loaded).
    async fn run_times(&self, since: DateTime<Utc>, per_version: bool) -> Result<Vec<RunTimes>, StoreError>;

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

    /// Pending and processing jobs: the queue's depth.
    async fn count_unfinished(&self) -> Result<i64, StoreError>;

    /// Counts of jobs by status.
    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError>;

    /// A source of wake-ups for workers.
    async fn wakeups(&self) -> Result<Box<dyn Wakeups>, StoreError>;

    /// Stores an uploaded version; `false` when that version was there already.
    async fn put_version(&self, version: &StoredVersion) -> Result<bool, StoreError>;

    /// One stored version with its bytes.
    async fn version(&self, job_type: &str, version: &str) -> Result<Option<StoredVersion>, StoreError>;

    /// Every stored version, without bytes, newest first.
    async fn versions(&self) -> Result<Vec<VersionInfo>, StoreError>;

    /// Every type's rollout.
    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;

    /// Writes a type's rollout and tells every worker and gateway.
    async fn put_rollout(&self, rollout: &Rollout, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Writes `next` only if the stored rollout of its type is still
    /// `expected` (`None`: none is stored); false when it changed meanwhile.
    /// Every process hears of a write, as with [`Store::put_rollout`].
    async fn swap_rollout(
        &self,
        expected: Option<&Rollout>,
        next: &Rollout,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Wakes when any rollout changes (may be spurious; poll as well).
    async fn rollout_changes(&self) -> Result<Box<dyn Wakeups>, StoreError>;
}

/// Opens the store a `DATABASE_URL` names: `sqlite://…` (or a plain path) or
/// `postgres://…`.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    connect_pooled(url, DEFAULT_POOL_SIZE).await
}

/// The PostgreSQL connections a process keeps by default (QUERN_DB_POOL_SIZE).
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// [`connect`], with at most `pool_size` PostgreSQL connections (SQLite keeps
/// its one writer and few readers whatever is asked).
pub async fn connect_pooled(url: &str, pool_size: u32) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_pooled(url.parse()?, pool_size).await?))
    } else if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(path)).await?))
    } else if !url.contains("://") {
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(url)).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.split('@').next_back().unwrap_or(url).to_string()))
    }
}

/// The first migration `migrator` knows that `applied` lacks, as
/// [`StoreError::NotMigrated`]. `applied` is `None` when the migrations table
/// itself is missing (a database quern never touched).
fn first_missing(migrator: &sqlx::migrate::Migrator, applied: Option<&[i64]>) -> Result<(), StoreError> {
    let Some(applied) = applied else {
        return Err(StoreError::NotMigrated("it has no quern tables".into()));
    };
    match migrator.iter().find(|migration| !applied.contains(&migration.version)) {
        None => Ok(()),
        Some(missing) => Err(StoreError::NotMigrated(format!(
            "migration {} ({}) is not applied",
            missing.version, missing.description
        ))),
    }
}

/// Whether a job in `status` may be put back to `pending` by hand: failed, or
/// cancelled and no longer held by an instance that is still stopping.
pub(crate) fn requeueable(status: JobStatus, lease_expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    match status {
        JobStatus::Failed => true,
        JobStatus::Cancelled => lease_expires_at.is_none_or(|lease| lease <= now),
        _ => false,
    }
}

/// A status read from the database.
pub(crate) fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    JobStatus::parse(text).ok_or_else(|| corrupt("quern_jobs", format!("status `{text}`")))
}

pub(crate) fn parse_outcome(text: &str) -> Result<AttemptOutcome, StoreError> {
    AttemptOutcome::parse(text).ok_or_else(|| corrupt("quern_job_attempts", format!("outcome `{text}`")))
}

pub(crate) fn corrupt(table: &'static str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { table, message: message.to_string() }
}

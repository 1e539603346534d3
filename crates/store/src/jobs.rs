//! Jobs: what a job is, what becomes of a cancel or a retry, and [`JobStore`].
//!
//! Over 400 lines on purpose: the trait is the contract each backend keeps,
//! and its documentation (most of the file) says what each method promises.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{AttemptEnd, AttemptRecord, EndWritten, StoreError, corrupt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

/// A job to enqueue, with its owner's unfinished-jobs limit (`None`: none).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitedJob {
    pub job: NewJob,
    pub max_unfinished_per_user: Option<u32>,
}

/// Which of `jobs` fit under their owners' limits, taken in order, given the
/// `unfinished` jobs each limited owner has now (an owner absent has none):
/// the answer for each, and the ones to insert. Both backends decide alike.
pub(crate) fn within_limits(
    jobs: &[LimitedJob],
    mut unfinished: std::collections::HashMap<String, i64>,
    now: DateTime<Utc>,
) -> (Vec<Result<Job, StoreError>>, Vec<&NewJob>) {
    let mut answers = Vec::with_capacity(jobs.len());
    let mut admitted = Vec::with_capacity(jobs.len());
    for LimitedJob { job, max_unfinished_per_user } in jobs {
        if let Some(limit) = *max_unfinished_per_user {
            let count = unfinished.entry(job.user_id.clone()).or_default();
            if *count >= i64::from(limit) {
                answers.push(Err(StoreError::TooManyActiveJobs { user_id: job.user_id.clone(), limit }));
                continue;
            }
            *count += 1;
        }
        answers.push(Ok(Job::pending(job, now)));
        admitted.push(job);
    }
    (answers, admitted)
}

/// The owners among `jobs` that have a limit, each once, sorted.
pub(crate) fn limited_owners(jobs: &[LimitedJob]) -> Vec<&str> {
    let mut owners: Vec<&str> = jobs
        .iter()
        .filter(|limited| limited.max_unfinished_per_user.is_some())
        .map(|l| l.job.user_id.as_str())
        .collect();
    owners.sort_unstable();
    owners.dedup();
    owners
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

/// Which jobs a listing returns, newest first.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this user's jobs; every user's when `None`.
    pub user_id: Option<String>,
    pub status: Option<JobStatus>,
    pub job_type: Option<String>,
    /// Only the jobs of the pipeline whose first job this is (it included).
    pub pipeline: Option<Uuid>,
    /// Keyset cursor: only jobs older than this `(created_at, id)`.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub limit: u32,
}

/// What a worker asks of [`JobStore::claim`].
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub worker_id: &'a str,
    /// At most this many jobs.
    pub limit: u32,
    pub now: DateTime<Utc>,
    /// Each claimed job's lease runs until then.
    pub lease_until: DateTime<Utc>,
    /// Only jobs of these types: the ones the worker has handlers for.
    pub types: &'a [String],
}

/// A failed or cancelled job to run again: [`JobStore::requeue`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Requeue {
    pub id: Uuid,
    pub now: DateTime<Utc>,
    /// Attempts it gets on top of those it has used (at least 1).
    pub extra_attempts: i32,
    /// Its owner's unfinished-jobs limit (`None`: none).
    pub max_unfinished_per_user: Option<u32>,
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

/// Waits until jobs may be ready to claim: a NOTIFY on Postgres, an
/// in-process signal on SQLite. Wake-ups may be spurious or missed; the worker
/// also polls.
#[async_trait]
pub trait Wakeups: Send {
    async fn wait(&mut self);
}

/// What a process's one listener for job changes hears next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobChange {
    /// These jobs' status or progress changed (committed): read them to know
    /// how. A job may be named more than once.
    Jobs(Vec<Uuid>),
    /// Changes may have gone unheard (the listener's connection was lost
    /// and is back, or it fell behind): re-read every job you follow.
    Missed,
}

/// The changes of every job, as they commit: a NOTIFY on PostgreSQL, sent by
/// the statement that changes the jobs; an in-process channel on SQLite.
#[async_trait]
pub trait JobChanges: Send {
    async fn next(&mut self) -> JobChange;

    /// How often to re-read followed jobs even when nothing was heard:
    /// SQLite hears only its own process's changes, so a job another
    /// process changes is seen at the next re-read. `None`: every change is
    /// heard (or reported [`JobChange::Missed`]).
    fn reread_every(&self) -> Option<std::time::Duration>;
}

/// Jobs: enqueue, claim, the ends of attempts, leases, cancel and retry, pruning.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Inserts a job. With a `max_unfinished_per_user`, refuses atomically
    /// when the user already has that many pending or processing jobs.
    async fn enqueue(&self, job: &LimitedJob, now: DateTime<Utc>) -> Result<Job, StoreError>;

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError>;

    /// The jobs among `ids` that exist, in no particular order.
    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Job>, StoreError>;

    /// A user's jobs, newest first.
    async fn jobs_of_user(&self, user_id: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.list_jobs(&JobFilter { user_id: Some(user_id.to_string()), limit, ..JobFilter::default() }).await
    }

    /// Jobs matching `filter`, newest first (by `created_at`, then id).
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError>;

    /// Puts a failed or cancelled job back to `pending`, due now, with more
    /// attempts. With a `max_unfinished_per_user`, refuses atomically when
    /// its user is at the limit, as enqueue does.
    async fn requeue(&self, requeue: &Requeue) -> Result<RequeueOutcome, StoreError>;

    /// Claims up to `limit` due pending jobs of `types` (the ones the worker
    /// has handlers for), most urgent first, for `worker_id`: each becomes
    /// `processing` with its attempt counted and a lease until `lease_until`.
    /// No job is handed to two claimers. The cost follows the jobs claimed,
    /// not the backlog: each type is read through its own part of the claim
    /// index, so pending jobs of other types are never scanned.
    async fn claim(&self, claim: &Claim<'_>) -> Result<Vec<Job>, StoreError>;

    /// Inserts many jobs in one transaction, all or none, and wakes workers
    /// once. No per-user limit: this is for trusted server-side producers.
    async fn enqueue_batch(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Inserts jobs that separate callers enqueued at about the same time in
    /// one transaction (the gateway's group commit), each checked against
    /// its owner's unfinished-jobs limit (`None`: no limit) exactly as if
    /// they had been enqueued one after another in this order. Answers, in
    /// order, each job or [`StoreError::TooManyActiveJobs`]; an error for the
    /// whole call means none was inserted.
    async fn enqueue_each(
        &self,
        jobs: &[LimitedJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Job, StoreError>>, StoreError>;

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

    /// A job with its attempts, oldest first (what `GET /v1/jobs/{id}`
    /// shows), in one round trip where the backend can.
    async fn get_with_attempts(&self, id: Uuid) -> Result<Option<(Job, Vec<AttemptRecord>)>, StoreError> {
        let Some(job) = self.get(id).await? else { return Ok(None) };
        let attempts = self.attempts(id).await?;
        Ok(Some((job, attempts)))
    }

    /// Deletes at most `limit` finished jobs (their attempts with them) that
    /// ended before their status's cutoff and that no instance still holds;
    /// returns how many. One short statement: callers loop while it deletes
    /// a full batch, so enqueues and claims are never held up for long.
    async fn prune_jobs(&self, cutoffs: &PruneCutoffs, limit: u32) -> Result<u64, StoreError>;

    /// Pending and processing jobs: the queue's depth.
    async fn count_unfinished(&self) -> Result<i64, StoreError>;

    /// A source of wake-ups for workers.
    async fn wakeups(&self) -> Result<Box<dyn Wakeups>, StoreError>;

    /// A listener for every job's changes (one per process: see
    /// `quern_queue::events`).
    async fn job_changes(&self) -> Result<Box<dyn JobChanges>, StoreError>;
}

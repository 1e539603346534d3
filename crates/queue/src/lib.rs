//! The job lifecycle: what enqueue accepts, when a failed attempt runs again,
//! what a lapsed lease means, what cancel may do, how results are cached and
//! pipelines continue. The rules live here once; the stores only perform the
//! transitions these functions choose.
//!
//! One file over 400 lines on purpose: the lifecycle rules are kept in one
//! place so that no transition is decided twice.

pub mod alerts;
pub mod cache_key;
pub mod completer;
pub mod events;
mod group_commit;
mod hits;
pub mod leader;
pub mod maintenance;
pub mod rollout;
pub mod stats;
pub mod telemetry;
pub mod versions;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use quern_runtime::Outcome;
use quern_runtime::manifest::{CacheScope, validate_job_type};
use quern_store::{
    AttemptEnd, AttemptOutcome, CancelOutcome, EndWritten, Job, JobStatus, NewJob, Requeue, RequeueOutcome, Step,
    Store, StoreError, Transition,
};

/// Queue-wide settings (names from the customer's worker: WORKER_*, CACHE_*).
/// The owner of the jobs service callers enqueue for no named user.
pub const SERVICE_OWNER: &str = "service_role";

#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// First retry delay; doubles per attempt (WORKER_RETRY_DELAY_MS).
    pub retry_base: Duration,
    /// Attempts for jobs whose type sets none (WORKER_MAX_RETRIES).
    pub default_max_attempts: i32,
    /// How long a claim holds a job without a heartbeat (QUERN_LEASE_MS).
    pub lease: Duration,
    /// Unfinished jobs a user may have (QUERN_MAX_ACTIVE_JOBS_PER_USER).
    pub max_unfinished_per_user: Option<u32>,
    /// Unfinished jobs service callers may have of their own, for no named
    /// user (QUERN_MAX_ACTIVE_JOBS_PER_SERVICE).
    pub max_unfinished_per_service: Option<u32>,
    /// ENABLE_CACHE.
    pub cache_enabled: bool,
    /// CACHE_TTL_HOURS.
    pub cache_ttl: Duration,
    /// The most steps a pipeline may carry after its first job
    /// (QUERN_MAX_PIPELINE_STEPS).
    pub max_steps: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_millis(2000),
            default_max_attempts: 3,
            lease: Duration::from_secs(30),
            max_unfinished_per_user: Some(10),
            max_unfinished_per_service: Some(1000),
            cache_enabled: true,
            cache_ttl: Duration::from_secs(24 * 3600),
            max_steps: 16,
        }
    }
}

/// What a caller asks to run.
#[derive(Debug, Clone, Default)]
pub struct EnqueueRequest {
    pub user_id: String,
    pub job_type: String,
    pub input: Value,
    /// 1 (most urgent) to 10; 5 when absent.
    pub priority: Option<i64>,
    /// The type's own setting (its manifest) when absent, else the default.
    pub max_attempts: Option<i32>,
    /// Pipeline steps to run after this job, in order.
    pub next: Vec<Step>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("input must be a JSON object, got {0}")]
    InputNotObject(&'static str),
    #[error(
        "input has the character U+0000 at `{0}`, which the database cannot store: remove it, or send binary data base64-encoded"
    )]
    NulCharacter(String),
    #[error("priority {0} is out of range: use 1 (most urgent) to 10")]
    PriorityOutOfRange(i64),
    #[error("invalid job type `{0}`: use lowercase letters, digits and `_`")]
    InvalidType(String),
    #[error("pipeline step {index}: {problem}")]
    InvalidStep { index: usize, problem: String },
    #[error(
        "a pipeline may have at most {max} steps after its first job, got {count}: split the work, or raise QUERN_MAX_PIPELINE_STEPS"
    )]
    TooManySteps { count: usize, max: usize },
    #[error("too many unfinished jobs: at most {limit} per user; wait for one to finish")]
    TooManyActiveJobs { limit: u32 },
    #[error("job {0} not found")]
    NotFound(Uuid),
    #[error("job {id} already ended as {status}; only pending or processing jobs can be cancelled")]
    AlreadyFinished { id: Uuid, status: JobStatus },
    #[error(
        "job {id} is {status}; only failed or cancelled jobs can be retried (a job cancelled while running can be retried once its instance has stopped, within a second)"
    )]
    NotRetryable { id: Uuid, status: JobStatus },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for QueueError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::TooManyActiveJobs { limit, .. } => Self::TooManyActiveJobs { limit },
            other => Self::Store(other),
        }
    }
}

/// The most jobs one batch enqueue takes.
pub const MAX_BATCH: usize = 1000;

/// Why a batch enqueue wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("a batch takes at most {MAX_BATCH} jobs, got {count}; split it")]
    TooMany { count: usize },
    /// Each invalid job's index and what is wrong with it.
    #[error("{} of the jobs are invalid; nothing was enqueued", .0.len())]
    Invalid(Vec<(usize, QueueError)>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Queue {
    store: Arc<dyn Store>,
    settings: QueueSettings,
    enqueues: group_commit::GroupCommit,
    hits: hits::HitCounter,
}

impl Queue {
    pub fn new(store: Arc<dyn Store>, settings: QueueSettings) -> Self {
        Self {
            enqueues: group_commit::GroupCommit::new(store.clone()),
            hits: hits::HitCounter::new(store.clone()),
            store,
            settings,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Validates and inserts a job; refuses it when the user is at the limit.
    pub async fn enqueue(&self, request: EnqueueRequest) -> Result<Job, QueueError> {
        let limit = self.limit_of(&request.user_id);
        self.enqueue_within(request, limit).await
    }

    /// [`Queue::enqueue`] with the owner's unfinished-jobs `limit` given.
    /// Concurrent enqueues share one commit (group commit); each answers
    /// only once its job is stored.
    pub async fn enqueue_within(&self, request: EnqueueRequest, limit: Option<u32>) -> Result<Job, QueueError> {
        let job = self.new_job(request)?;
        Ok(self.enqueues.enqueue(job, limit).await?)
    }

    /// The unfinished-jobs limit of an owner: the service callers' own
    /// jobs have theirs, every user the per-user one.
    pub fn limit_of(&self, owner: &str) -> Option<u32> {
        if owner == SERVICE_OWNER {
            self.settings.max_unfinished_per_service
        } else {
            self.settings.max_unfinished_per_user
        }
    }

    /// Validates every request, then inserts them all in one transaction, or
    /// none when any is invalid (each problem named with its index). No
    /// per-user limit applies: this is for trusted server-side producers.
    pub async fn enqueue_batch(&self, requests: Vec<EnqueueRequest>) -> Result<Vec<NewJob>, BatchError> {
        if requests.len() > MAX_BATCH {
            return Err(BatchError::TooMany { count: requests.len() });
        }
        let jobs = self.validate_batch(requests)?;
        self.insert_batch(&jobs).await?;
        Ok(jobs)
    }

    /// The jobs `requests` would become, or every problem with its index.
    pub fn validate_batch(&self, requests: Vec<EnqueueRequest>) -> Result<Vec<NewJob>, BatchError> {
        let mut jobs = Vec::with_capacity(requests.len());
        let mut invalid = Vec::new();
        for (index, request) in requests.into_iter().enumerate() {
            match self.new_job(request) {
                Ok(job) => jobs.push(job),
                Err(error) => invalid.push((index, error)),
            }
        }
        if invalid.is_empty() { Ok(jobs) } else { Err(BatchError::Invalid(invalid)) }
    }

    /// Inserts validated jobs in one transaction.
    pub async fn insert_batch(&self, jobs: &[NewJob]) -> Result<(), StoreError> {
        self.store.enqueue_batch(jobs, Utc::now()).await
    }

    fn new_job(&self, request: EnqueueRequest) -> Result<NewJob, QueueError> {
        validate_job_type(&request.job_type).map_err(|_| QueueError::InvalidType(request.job_type.clone()))?;
        if !request.input.is_object() {
            return Err(QueueError::InputNotObject(json_kind(&request.input)));
        }
        if let Some(path) = nul_at(&request.input, "input") {
            return Err(QueueError::NulCharacter(path));
        }
        let priority = request.priority.unwrap_or(5);
        if !(1..=10).contains(&priority) {
            return Err(QueueError::PriorityOutOfRange(priority));
        }
        if request.next.len() > self.settings.max_steps {
            return Err(QueueError::TooManySteps { count: request.next.len(), max: self.settings.max_steps });
        }
        for (index, step) in request.next.iter().enumerate() {
            if validate_job_type(&step.job_type).is_err() {
                return Err(QueueError::InvalidStep {
                    index,
                    problem: format!("invalid job type `{}`", step.job_type),
                });
            }
            if !step.input.is_object() {
                return Err(QueueError::InvalidStep {
                    index,
                    problem: format!("input must be a JSON object, got {}", json_kind(&step.input)),
                });
            }
            if let Some(path) = nul_at(&step.input, "input") {
                return Err(QueueError::InvalidStep { index, problem: QueueError::NulCharacter(path).to_string() });
            }
        }
        Ok(NewJob {
            id: Uuid::now_v7(),
            user_id: request.user_id,
            job_type: request.job_type,
            input: request.input,
            priority: priority as i16,
            max_attempts: request.max_attempts.unwrap_or(self.settings.default_max_attempts).clamp(1, 100),
            run_at: Utc::now(),
            next_steps: request.next,
            parent_id: None,
            root_id: None,
        })
    }

    /// Cancels a pending job at once, or a processing one (its worker
    /// interrupts the instance at its next check, within a second).
    pub async fn cancel(&self, id: Uuid) -> Result<CancelOutcome, QueueError> {
        match self.store.cancel(id, Utc::now()).await? {
            CancelOutcome::NotFound => Err(QueueError::NotFound(id)),
            CancelOutcome::AlreadyFinished(status) => Err(QueueError::AlreadyFinished { id, status }),
            cancelled => Ok(cancelled),
        }
    }

    /// Puts a failed or cancelled job back to `pending` with `attempts` fresh
    /// attempts; the user's unfinished-job limit applies as at enqueue.
    pub async fn requeue(&self, id: Uuid, attempts: i32) -> Result<Job, QueueError> {
        let owner = self.store.get(id).await?.map(|job| job.user_id).ok_or(QueueError::NotFound(id))?;
        let requeue =
            Requeue { id, now: Utc::now(), extra_attempts: attempts, max_unfinished_per_user: self.limit_of(&owner) };
        match self.store.requeue(&requeue).await? {
            RequeueOutcome::Requeued(job) => Ok(*job),
            RequeueOutcome::NotRetryable(status) => Err(QueueError::NotRetryable { id, status }),
            RequeueOutcome::NotFound => Err(QueueError::NotFound(id)),
        }
    }

    /// A live cached result for this input on this handler version, for a
    /// job of `owner` under the type's cache scope. A read: the hit is
    /// counted in the entry soon after, off the caller's path (see `hits`).
    pub async fn cached_result(
        &self,
        job_type: &str,
        version: &str,
        scope: CacheScope,
        owner: &str,
        input: &Value,
    ) -> Result<Option<Value>, StoreError> {
        if !self.settings.cache_enabled {
            return Ok(None);
        }
        let key = cache_key::cache_key(job_type, version, scope, owner, input);
        let now = Utc::now();
        let result = self.store.cache_lookup(&key, now).await?;
        if result.is_some() {
            self.hits.count(key, now);
        }
        Ok(result)
    }

    /// The transition that ends a claimed job's attempt with `outcome`.
    /// `max_attempts_of_next` gives the attempts of a pipeline's next type.
    pub fn transition(&self, job: &Job, outcome: Outcome, elapsed: Duration, now: DateTime<Utc>) -> Transition {
        match outcome {
            Outcome::Completed { output } => match serde_json::from_str::<Value>(&output) {
                Ok(result) if let Some(path) = nul_at(&result, "result") => Transition::Fail {
                    error: format!(
                        "the result has the character U+0000 at `{path}`, which the database cannot store: \
                         the handler must leave it out or encode the data (base64)"
                    ),
                    outcome: AttemptOutcome::Failed,
                },
                Ok(result) => Transition::Complete {
                    next: next_step(job, &result, self.settings.default_max_attempts, now).map(Box::new),
                    cache: None,
                    processing_time_ms: elapsed.as_millis().min(i32::MAX as u128) as i32,
                    result,
                },
                Err(error) => {
                    Transition::Fail { error: format!("result is not JSON: {error}"), outcome: AttemptOutcome::Failed }
                }
            },
            Outcome::Retry { reason, delay } => self.retry_or_fail(job, reason, delay, AttemptOutcome::Retry, now),
            Outcome::Failed { reason } => Transition::Fail { error: reason, outcome: AttemptOutcome::Failed },
            Outcome::Cancelled => Transition::Cancelled,
        }
    }

    /// Back to `pending` after a backoff while attempts remain; `failed` once
    /// they are spent.
    pub fn retry_or_fail(
        &self,
        job: &Job,
        reason: String,
        delay: Option<Duration>,
        outcome: AttemptOutcome,
        now: DateTime<Utc>,
    ) -> Transition {
        if job.attempts >= job.max_attempts {
            let fail_outcome = if outcome == AttemptOutcome::LeaseExpired { outcome } else { AttemptOutcome::Failed };
            return Transition::Fail {
                error: format!("{reason} (attempt {} of {}; no attempts left)", job.attempts, job.max_attempts),
                outcome: fail_outcome,
            };
        }
        let wait = backoff(self.settings.retry_base, job.attempts.max(1) as u32).max(delay.unwrap_or_default());
        Transition::Retry { error: reason, run_at: now + wait, outcome }
    }

    /// Returns jobs whose worker stopped heartbeating to `pending` (or
    /// `failed` when their attempts are spent). Every worker runs this; the
    /// store's conditional updates make concurrent reapers harmless.
    pub async fn reap_expired_leases(&self) -> Result<usize, StoreError> {
        let now = Utc::now();
        let lapsed = self.store.expired_leases(now, 100).await?;
        let ends: Vec<AttemptEnd> = lapsed
            .iter()
            .map(|job| {
                let worker = job.worker_id.clone().unwrap_or_default();
                let reason = format!("lease expired: worker {worker} stopped heartbeating");
                AttemptEnd {
                    job_id: job.id,
                    worker_id: worker,
                    attempt: job.attempts,
                    handler_version: job.handler_version.clone(),
                    started_at: job.started_at.unwrap_or(now),
                    ended_at: now,
                    transition: match self.retry_or_fail(job, reason, None, AttemptOutcome::LeaseExpired, now) {
                        // The job lost its worker through no fault of its own: it
                        // goes back to its place in line, due at once, rather
                        // than wait out a backoff behind every job queued since.
                        Transition::Retry { error, outcome, .. } => {
                            Transition::Retry { error, outcome, run_at: job.run_at.min(now) }
                        }
                        other => other,
                    },
                }
            })
            .collect();
        let written = self.store.finish_attempts(&ends, now).await?;
        let mut reaped = 0;
        for ((job, end), written) in lapsed.iter().zip(&ends).zip(written) {
            if written == EndWritten::Recorded {
                tracing::warn!(job_id = %job.id, job_type = %job.job_type, worker_id = %end.worker_id, "reaped a job whose lease lapsed");
                reaped += 1;
            }
        }
        Ok(reaped)
    }
}

/// `base · 2^(attempt−1)`, ±20 % jitter so retries of many jobs spread out.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let exponential = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let jitter = rand::random_range(0.8..=1.2);
    exponential.mul_f64(jitter).min(Duration::from_secs(24 * 3600))
}

/// The pipeline's next job, if any: its input gets the result under `previous`.
fn next_step(job: &Job, result: &Value, max_attempts: i32, now: DateTime<Utc>) -> Option<NewJob> {
    let (step, rest) = job.next_steps.split_first()?;
    let mut input = step.input.clone();
    if let Value::Object(map) = &mut input {
        map.insert("previous".into(), result.clone());
    }
    Some(NewJob {
        id: Uuid::now_v7(),
        user_id: job.user_id.clone(),
        job_type: step.job_type.clone(),
        input,
        priority: job.priority,
        max_attempts,
        run_at: now,
        next_steps: rest.to_vec(),
        parent_id: Some(job.id),
        root_id: Some(job.root_id.unwrap_or(job.id)),
    })
}

/// Where in `value` a string or key holds U+0000, which PostgreSQL's JSON
/// cannot store (SQLite could, but both databases answer alike).
///
/// Every input and result passes through here, and almost none holds one:
/// the search allocates nothing, and the path is written only when found.
pub fn nul_at(value: &Value, path: &str) -> Option<String> {
    let mut steps = Vec::new();
    if !find_nul(value, &mut steps) {
        return None;
    }
    let mut found = path.to_string();
    for step in steps.iter().rev() {
        match step {
            PathStep::Index(index) => found.push_str(&format!("[{index}]")),
            PathStep::Key(key) => found.push_str(&format!(".{key}")),
            PathStep::InTheKey => found.push_str(" (a key)"),
        }
    }
    Some(found)
}

/// One step on the way to a U+0000.
enum PathStep<'a> {
    Index(usize),
    Key(&'a str),
    /// The key itself holds it (the last step).
    InTheKey,
}

/// Whether `value` holds a U+0000; if so, `steps` has the way to the first
/// one, innermost step first.
fn find_nul<'a>(value: &'a Value, steps: &mut Vec<PathStep<'a>>) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(index, item)| {
            let found = find_nul(item, steps);
            if found {
                steps.push(PathStep::Index(index));
            }
            found
        }),
        Value::Object(map) => map.iter().any(|(key, item)| {
            let (found, step) = if key.contains('\0') {
                (true, PathStep::InTheKey)
            } else {
                (find_nul(item, steps), PathStep::Key(key))
            };
            if found {
                steps.push(step);
            }
            found
        }),
        _ => false,
    }
}

pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_found_with_their_path() {
        let value = serde_json::json!({"a": [1, {"b": "x\0y"}], "c": "fine"});
        assert_eq!(nul_at(&value, "input").as_deref(), Some("input.a[1].b"));
        assert_eq!(nul_at(&serde_json::json!({"k\0": 1}), "input").as_deref(), Some("input (a key)"));
        assert_eq!(nul_at(&serde_json::json!({"a": [{"k\0": 1}]}), "input").as_deref(), Some("input.a[0] (a key)"));
        assert_eq!(nul_at(&serde_json::json!({"a": [[0, ["\0"]]]}), "result").as_deref(), Some("result.a[0][1][0]"));
        assert_eq!(nul_at(&serde_json::json!("\0"), "input").as_deref(), Some("input"));
        assert_eq!(nul_at(&serde_json::json!({"a": [1, {"b": "clean"}], "c": null}), "input"), None);
        assert_eq!(
            nul_at(&serde_json::json!({"a": "\\u0000 is text"}), "input"),
            None,
            "an escaped backslash is not NUL"
        );
    }

    #[test]
    fn backoff_doubles_per_attempt_within_the_jitter() {
        let base = Duration::from_millis(2000);
        for (attempt, nominal) in [(1, 2000.0), (2, 4000.0), (3, 8000.0)] {
            for _ in 0..50 {
                let ms = backoff(base, attempt).as_millis() as f64;
                assert!((nominal * 0.8..=nominal * 1.2).contains(&ms), "attempt {attempt}: {ms} ms");
            }
        }
    }
}

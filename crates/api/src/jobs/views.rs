//! The shapes `/v1/jobs` reads and answers: request bodies and queries, the
//! job as a client sees it, and the URLs an enqueue answers with.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::types::JobTypeName;
use quern_store::{AttemptRecord, Job, JobStatus};

pub const NOTICE_HEADER: &str = "x-quern-notice";

/// What to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBody {
    /// A known job type (see `GET /v1/types`).
    #[serde(rename = "type")]
    #[schema(inline, value_type = JobTypeName)]
    pub job_type: String,
    /// The job's input: a JSON object.
    #[schema(value_type = Object)]
    pub input: Value,
    /// 1 (most urgent) to 10; 5 by default (premium callers: the premium
    /// default, 2 unless set). 1–4 need a premium plan.
    #[schema(minimum = 1, maximum = 10)]
    #[serde(default, deserialize_with = "crate::body::whole_number")]
    pub priority: Option<i64>,
    /// Service callers: the user the job is for (it is theirs, counts
    /// against their limit and is visible to them). Ignored from a user's token.
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    pub user_id: Option<String>,
    /// Jobs to run after this one completes, each getting the previous result
    /// under `previous` in its input.
    #[serde(default)]
    pub next: Vec<StepBody>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepBody {
    #[serde(rename = "type")]
    #[schema(inline, value_type = JobTypeName)]
    pub job_type: String,
    #[schema(value_type = Object)]
    pub input: Value,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Hold the request until the job ends, at most this many seconds; the
    /// server holds it at most its `QUERN_MAX_WAIT_S` (30 by default).
    #[param(minimum = 0.0, maximum = 30.0)]
    pub wait: Option<f64>,
}

/// The answer to an enqueue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnqueueResponse {
    /// The job's id; `null` when the result came from the cache.
    pub id: Option<Uuid>,
    #[schema(value_type = crate::records::JobStatusName)]
    pub status: JobStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_time_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i16>,
    /// Set when the request was changed, e.g. a priority clamped to 5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub cached: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProgressView {
    pub percent: i16,
    pub message: Option<String>,
}

/// One attempt of a job.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker_id: String,
    pub handler_version: Option<String>,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// completed, retry, failed, cancelled, lease_expired or released.
    pub outcome: String,
    pub error: Option<String>,
}

impl From<AttemptRecord> for AttemptView {
    fn from(record: AttemptRecord) -> Self {
        Self {
            attempt: record.attempt,
            worker_id: record.worker_id,
            handler_version: record.handler_version,
            started_at: record.started_at,
            ended_at: record.ended_at,
            outcome: record.outcome.as_str().to_string(),
            error: record.error,
        }
    }
}

/// A job as its owner sees it (never its input).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub user_id: String,
    #[schema(value_type = crate::records::JobStatusName)]
    pub status: JobStatus,
    pub priority: i16,
    pub progress: ProgressView,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<String>,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    /// The handler version of the latest attempt.
    pub handler_version: Option<String>,
    pub processing_time_ms: Option<i32>,
    pub parent_id: Option<Uuid>,
    /// A pipeline step's first job: list the pipeline with `?pipeline=`.
    pub root_id: Option<Uuid>,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// Every attempt that ended, oldest first (on `GET /v1/jobs/{id}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<AttemptView>>,
    pub poll_url: String,
    pub events_url: String,
}

impl JobView {
    pub fn of(job: Job) -> Self {
        Self {
            poll_url: poll_url(job.id),
            events_url: events_url(job.id),
            id: job.id,
            job_type: job.job_type,
            user_id: job.user_id,
            status: job.status,
            priority: job.priority,
            progress: ProgressView { percent: job.progress_percent, message: job.progress_message },
            result: job.result,
            error: job.error,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            handler_version: job.handler_version,
            processing_time_ms: job.processing_time_ms,
            parent_id: job.parent_id,
            root_id: job.root_id,
            run_at: job.run_at,
            created_at: job.created_at,
            updated_at: job.updated_at,
            started_at: job.started_at,
            completed_at: job.completed_at,
            history: None,
        }
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// pending, processing, completed, failed or cancelled.
    #[param(pattern = "^(pending|processing|completed|failed|cancelled)$")]
    pub status: Option<String>,
    #[serde(rename = "type")]
    #[param(rename = "type", inline, value_type = Option<JobTypeName>)]
    pub job_type: Option<String>,
    /// 1 to 100; 20 by default.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Another user's jobs (service role only).
    pub user_id: Option<String>,
    /// Only the jobs of one pipeline: the id of its first job (seed 004's
    /// `by_brief`). Each step's `root_id` names it.
    #[param(value_type = Option<String>, format = Uuid)]
    pub pipeline: Option<String>,
}

pub fn poll_url(id: Uuid) -> String {
    format!("/v1/jobs/{id}")
}

pub fn events_url(id: Uuid) -> String {
    format!("/v1/jobs/{id}/events")
}

//! The store's rows as the API shows them. The store's types carry no API
//! schema: each row the API answers with has its view here, converted at the
//! edge, so a column change does not silently change the document.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use uuid::Uuid;

use quern_store::{DepthRow, FailedJob, JobStatus, Rollout, WorkerRow};

/// A job's status as the document states it: the store's statuses, by name.
pub struct JobStatusName;

impl utoipa::PartialSchema for JobStatusName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(JobStatus::ALL.map(JobStatus::as_str)))
            .description(Some("pending → processing → completed, failed or cancelled"))
            .into()
    }
}

impl ToSchema for JobStatusName {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("JobStatus")
    }
}

/// Unfinished jobs of one type in one status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DepthView {
    #[serde(rename = "type")]
    pub job_type: String,
    #[schema(value_type = JobStatusName)]
    pub status: JobStatus,
    pub count: i64,
}

impl From<DepthRow> for DepthView {
    fn from(row: DepthRow) -> Self {
        Self { job_type: row.job_type, status: row.status, count: row.count }
    }
}

/// A worker process and its last heartbeat.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerRowView {
    pub id: String,
    pub host: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub active_jobs: i32,
    pub concurrency: i32,
    pub version: String,
}

impl From<WorkerRow> for WorkerRowView {
    fn from(row: WorkerRow) -> Self {
        Self {
            id: row.id,
            host: row.host,
            started_at: row.started_at,
            last_heartbeat_at: row.last_heartbeat_at,
            active_jobs: row.active_jobs,
            concurrency: row.concurrency,
            version: row.version,
        }
    }
}

/// A job that failed for good.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FailedJobView {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub error: Option<String>,
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

impl From<FailedJob> for FailedJobView {
    fn from(job: FailedJob) -> Self {
        Self { id: job.id, job_type: job.job_type, error: job.error, attempts: job.attempts, failed_at: job.failed_at }
    }
}

/// A type's rollout: the version serving it, the one before (for a
/// rollback), a canary taking `canary_percent` of new jobs, and the pause flag.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    #[serde(rename = "type")]
    pub job_type: String,
    pub active_version: Option<String>,
    pub previous_version: Option<String>,
    pub canary_version: Option<String>,
    pub canary_percent: i16,
    pub paused: bool,
}

impl From<Rollout> for RolloutView {
    fn from(rollout: Rollout) -> Self {
        Self {
            job_type: rollout.job_type,
            active_version: rollout.active_version,
            previous_version: rollout.previous_version,
            canary_version: rollout.canary_version,
            canary_percent: rollout.canary_percent,
            paused: rollout.paused,
        }
    }
}

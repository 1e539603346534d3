//! `POST /v1/jobs/batch`: many jobs in one request and one transaction, for
//! server-side producers holding a service_role token. Each job is checked
//! on its own and every problem is answered with its index; one bad job
//! refuses the whole batch, so a producer never has to work out which half
//! went in. No per-user limit and no cache lookup: a producer's backlog is
//! work it means to run.

use crate::error::ErrorCode;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::body::JsonBody;
use super::error::{ApiError, ErrorBody, ItemError};
use super::jobs::{EnqueueBody, check_steps, ensure_allowed, ensure_enabled, events_url, known_type, poll_url};
use super::limits::{ClientIp, check_rate};
use quern_queue::telemetry::JOBS_ENQUEUED;
use quern_queue::{BatchError, EnqueueRequest, MAX_BATCH};
use quern_store::{JobStatus, Step};

/// The largest batch body: a thousand jobs of some 16 KiB each.
pub const MAX_BATCH_BODY_BYTES: usize = 16 << 20;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// 1 to 1,000 jobs, each as `POST /v1/jobs` takes one; each one's
    /// `user_id` names whose job it is (the caller's own subject by default).
    #[schema(value_type = Vec<EnqueueBody>, min_items = 1, max_items = 1000)]
    pub jobs: Vec<Value>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// How many jobs were enqueued: all of them.
    pub count: usize,
    /// The jobs in the order they were sent.
    pub jobs: Vec<BatchJobView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchJobView {
    pub id: Uuid,
    #[schema(value_type = crate::records::JobStatusName)]
    pub status: JobStatus,
    pub user_id: String,
    pub priority: i16,
    pub poll_url: String,
    pub events_url: String,
}

/// Enqueue up to 1,000 jobs at once (service_role only).
#[utoipa::path(post, path = "/v1/jobs/batch", tag = "jobs", security(("bearer" = [])),
    request_body = BatchBody,
    responses(
        (status = 202, description = "Every job enqueued, in one transaction", body = BatchResponse),
        (status = 400, description = "Not one job was enqueued: `errors` names each bad job by its index", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "Not a service_role token", body = ErrorBody),
        (status = 413, description = "Body over 16 MiB", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "A type is switched off, or the database is away", body = ErrorBody),
    ))]
pub async fn enqueue_batch(
    State(state): State<AppState>,
    client: ClientIp,
    caller: Result<Caller, ApiError>,
    body: Result<JsonBody<BatchBody>, ApiError>,
) -> Result<(StatusCode, axum::Json<BatchResponse>), ApiError> {
    let caller = caller?;
    if !caller.service {
        return Err(ApiError::forbidden(
            "a batch enqueue needs a service_role token; users enqueue one job at a time with POST /v1/jobs",
        ));
    }
    let JsonBody(body) = body?;
    check_rate(&state, &caller, &client, u32::try_from(body.jobs.len()).unwrap_or(u32::MAX))?;
    if body.jobs.is_empty() || body.jobs.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidBatchSize,
            format!("a batch takes 1 to {MAX_BATCH} jobs, got {}; split larger ones", body.jobs.len()),
        ));
    }

    // Every problem at once: the gateway's checks (type known and enabled,
    // the job's shape), then the queue's rules for the jobs that passed them.
    let mut requests = Vec::with_capacity(body.jobs.len());
    let mut indexes = Vec::with_capacity(body.jobs.len());
    let (mut problems, mut disabled) = (Vec::new(), Vec::new());
    for (index, item) in body.jobs.into_iter().enumerate() {
        match request_of(&state, &caller, item) {
            Ok(request) => {
                requests.push(request);
                indexes.push(index);
            }
            Err(error) if error.code == ErrorCode::TypeDisabled => disabled.push(item_error(index, error)),
            Err(error) => problems.push(item_error(index, error)),
        }
    }
    let jobs = match state.queue.validate_batch(requests) {
        Ok(jobs) => jobs,
        Err(BatchError::Invalid(invalid)) => {
            problems.extend(invalid.into_iter().map(|(at, error)| item_error(indexes[at], ApiError::from(error))));
            Vec::new()
        }
        Err(error) => return Err(batch_error(error)),
    };
    if !problems.is_empty() {
        problems.extend(disabled);
        problems.sort_by_key(|problem| problem.index);
        return Err(refused(StatusCode::BAD_REQUEST, ErrorCode::InvalidBatch, problems));
    }
    if !disabled.is_empty() {
        return Err(refused(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::TypeDisabled, disabled));
    }
    state.queue.insert_batch(&jobs).await?;
    for job in &jobs {
        metrics::counter!(JOBS_ENQUEUED, "type" => job.job_type.clone()).increment(1);
    }
    let views: Vec<BatchJobView> = jobs
        .into_iter()
        .map(|job| BatchJobView {
            poll_url: poll_url(job.id),
            events_url: events_url(job.id),
            id: job.id,
            status: JobStatus::Pending,
            user_id: job.user_id,
            priority: job.priority,
        })
        .collect();
    Ok((StatusCode::ACCEPTED, axum::Json(BatchResponse { count: views.len(), jobs: views })))
}

/// One item as a request to the queue, or what is wrong with it.
fn request_of(state: &AppState, caller: &Caller, item: Value) -> Result<EnqueueRequest, ApiError> {
    let job: EnqueueBody = serde_json::from_value(item)
        .map_err(|error| ApiError::bad_request(ErrorCode::InvalidRequest, format!("invalid job: {error}")))?;
    let handler = known_type(state, &job.job_type)?;
    ensure_allowed(caller, &handler)?;
    check_steps(state, caller, &job.next)?;
    let user_id = match job.user_id {
        None => caller.user_id.clone(),
        Some(user) if !user.trim().is_empty() && user.len() <= 256 => user,
        Some(_) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidUserId,
                "user_id must be 1 to 256 characters, not blank",
            ));
        }
    };
    ensure_enabled(state, &job.job_type)?;
    Ok(EnqueueRequest {
        user_id,
        max_attempts: Some(handler.manifest.max_attempts as i32),
        job_type: job.job_type,
        input: job.input,
        priority: job.priority,
        next: job.next.into_iter().map(|step| Step { job_type: step.job_type, input: step.input }).collect(),
    })
}

fn batch_error(error: BatchError) -> ApiError {
    match error {
        BatchError::Invalid(invalid) => refused(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidBatch,
            invalid.into_iter().map(|(index, error)| item_error(index, ApiError::from(error))).collect(),
        ),
        BatchError::TooMany { count } => ApiError::bad_request(
            ErrorCode::InvalidBatchSize,
            format!("a batch takes 1 to {MAX_BATCH} jobs, got {count}; split larger ones"),
        ),
        BatchError::Store(error) => error.into(),
    }
}

fn item_error(index: usize, error: ApiError) -> ItemError {
    ItemError { index, error: error.message, code: error.code }
}

fn refused(status: StatusCode, code: ErrorCode, items: Vec<ItemError>) -> ApiError {
    let first = items.first().map(|item| format!(" (first: job {}: {})", item.index, item.error)).unwrap_or_default();
    let message = format!("{} of the jobs cannot be enqueued, so none was{first}", items.len());
    ApiError::new(status, code, message).with_items(items)
}

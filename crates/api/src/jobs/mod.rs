//! `/v1/jobs`: enqueue (`submit`), read, list, cancel, retry, and follow a job
//! by SSE (`events`). The request and response shapes are in `views`.

use crate::error::ErrorCode;
pub mod events;
pub mod streams;
pub mod submit;
mod views;

pub(crate) use self::submit::{
    Enqueued, check_steps, ensure_allowed, ensure_enabled, known_type, submit, wait_for_end,
};
pub use self::views::*;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::body::ApiQuery;
use super::error::{ApiError, ErrorBody};
use super::limits::{ClientIp, check_rate};
use quern_queue::telemetry::JOBS_CANCELLED;
use quern_runtime::manifest::validate_job_type;
use quern_store::{Job, JobFilter, JobStatus};

/// The caller's job, or 404 for a missing job and another user's alike.
async fn owned_job(state: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    let uuid = Uuid::parse_str(id).map_err(|_| ApiError::job_not_found(id))?;
    match state.queue.store().get(uuid).await? {
        Some(job) if caller.owns(&job.user_id) => Ok(job),
        _ => Err(ApiError::job_not_found(id)),
    }
}

/// A job: status, progress, result or error, attempts, timestamps, version.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, body = JobView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such job, or not yours", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let uuid = Uuid::parse_str(&id).map_err(|_| ApiError::job_not_found(&id))?;
    let (job, history) = match state.queue.store().get_with_attempts(uuid).await? {
        Some((job, history)) if caller.owns(&job.user_id) => (job, history),
        _ => return Err(ApiError::job_not_found(&id)),
    };
    let mut view = JobView::of(job);
    view.history = Some(history.into_iter().map(AttemptView::from).collect());
    Ok(axum::Json(view))
}

/// The caller's jobs, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, body = JobPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<ApiQuery<ListQuery>, ApiError>,
) -> Result<axum::Json<JobPage>, ApiError> {
    let ApiQuery(query) = query?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidLimit,
            format!("limit={limit} is out of range: use 1 to 100"),
        ));
    }
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(JobStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidStatus,
                format!("status `{text}` is not one of pending, processing, completed, failed, cancelled"),
            )
        })?),
    };
    let user_id = match (query.user_id, caller.service) {
        (Some(user), true) => Some(user),
        (None, true) => None,
        (Some(_), false) => return Err(ApiError::forbidden("listing another user's jobs needs a service_role token")),
        (None, false) => Some(caller.user_id.clone()),
    };
    if let Some(job_type) = &query.job_type {
        validate_job_type(job_type)
            .map_err(|error| ApiError::bad_request(ErrorCode::InvalidType, error.to_string()))?;
    }
    // An empty cursor is the first page, as an absent one.
    let before = query.cursor.as_deref().filter(|cursor| !cursor.is_empty()).map(decode_cursor).transpose()?;
    let pipeline = query
        .pipeline
        .as_deref()
        .map(|id| {
            Uuid::parse_str(id).map_err(|_| {
                ApiError::bad_request(ErrorCode::InvalidQuery, "pipeline is a job id: the first job of the pipeline")
            })
        })
        .transpose()?;
    let filter = JobFilter { user_id, status, job_type: query.job_type, pipeline, before, limit: limit + 1 };
    let mut jobs = state.queue.store().list_jobs(&filter).await?;
    let next_cursor = if jobs.len() > limit as usize {
        jobs.truncate(limit as usize);
        jobs.last().map(|last| encode_cursor(last.created_at, last.id))
    } else {
        None
    };
    Ok(axum::Json(JobPage { jobs: jobs.into_iter().map(JobView::of).collect(), next_cursor }))
}

fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}.{id}", created_at.timestamp_micros()))
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), ApiError> {
    let invalid = || {
        ApiError::bad_request(
            ErrorCode::InvalidCursor,
            "cursor is not one this server gave out: pass `next_cursor` as it came",
        )
    };
    let text =
        URL_SAFE_NO_PAD.decode(cursor).ok().and_then(|bytes| String::from_utf8(bytes).ok()).ok_or_else(invalid)?;
    let (micros, id) = text.split_once('.').ok_or_else(invalid)?;
    let at = micros.parse::<i64>().ok().and_then(|m| Utc.timestamp_micros(m).single()).ok_or_else(invalid)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| invalid())?))
}

/// Cancel a pending or running job (a running one stops within a second),
/// and the steps of its pipeline not yet run. Cancelling a finished step of a
/// pipeline cancels the step that runs now and answers with it.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "Cancelled", body = JobView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The job already ended", body = ErrorBody),
    ))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let job = owned_job(&state, &caller, &id).await?;
    // A finished step of a pipeline stops the steps after it: the answer is
    // then the step that was cancelled.
    let cancelled = match state.queue.cancel(job.id).await? {
        quern_store::CancelOutcome::StepCancelled { step, .. } => step,
        _ => job.id,
    };
    let job = state.queue.store().get(cancelled).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    metrics::counter!(JOBS_CANCELLED, "type" => job.job_type.clone()).increment(1);
    Ok(axum::Json(JobView::of(job)))
}

/// Run a failed or cancelled job again, with fresh attempts.
#[utoipa::path(post, path = "/v1/jobs/{id}/retry", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 202, description = "Back in the queue", body = JobView),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "Not failed or cancelled", body = ErrorBody),
        (status = 429, description = "Too many unfinished jobs", body = ErrorBody),
        (status = 503, description = "Type switched off", body = ErrorBody),
    ))]
pub async fn retry(
    State(state): State<AppState>,
    client: ClientIp,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = owned_job(&state, &caller, &id).await?;
    ensure_enabled(&state, &job.job_type)?;
    if let Some(handler) = state.registry.get(&job.job_type) {
        ensure_allowed(&caller, &handler)?;
    }
    let steps = u32::try_from(job.next_steps.len()).unwrap_or(u32::MAX);
    check_rate(&state, &caller, &client, steps.saturating_add(1))?;
    let attempts = state
        .registry
        .get(&job.job_type)
        .map_or(state.queue.settings().default_max_attempts, |handler| handler.manifest.max_attempts as i32);
    let job = state.queue.requeue(job.id, attempts).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(JobView::of(job))).into_response())
}

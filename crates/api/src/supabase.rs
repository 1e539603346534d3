//! The routes of the customer's Supabase Edge Functions, with their shapes,
//! so their frontend (`useAsyncAnalysis`) works by changing one URL:
//! `POST /functions/v1/enqueue-analysis` and `GET|POST
//! /functions/v1/get-analysis-status`. Unlike the seed, a user's job is the
//! token's `sub`'s, never `input.userId`'s; a service caller (the seed's own
//! server side) may name the user with `user_id`, or `input.userId` as the
//! seed's function read it.

use crate::error::ErrorCode;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::body::{ApiQuery, JsonBody};
use super::error::{ApiError, ErrorBody};
use super::jobs::{EnqueueBody, Enqueued, NOTICE_HEADER, submit};
use super::limits::{ClientIp, check_rate};
use super::types::JobTypeName;
use quern_store::JobStatus;

/// The seed's enqueue body. `type` and `input` are required (JavaScript
/// truthiness, as the seed checks them); `userId` in the input is trusted
/// only from a service caller.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AnalysisRequest {
    #[serde(rename = "type")]
    #[schema(required = true, inline, value_type = JobTypeName)]
    pub job_type: Option<Value>,
    #[schema(required = true, value_type = Object)]
    pub input: Option<Value>,
    /// 1 (most urgent) to 10; 5 by default.
    #[schema(minimum = 1, maximum = 10)]
    #[serde(default, deserialize_with = "crate::body::whole_number")]
    pub priority: Option<i64>,
    /// `false` skips the cache lookup.
    #[serde(rename = "useCache")]
    pub use_cache: Option<bool>,
    /// Service callers: the user the job is for.
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    pub user_id: Option<String>,
}

/// The seed's answer when `type` or `input` is missing or falsy.
pub const MISSING_FIELDS: &str = "Missing required fields: type, input";

/// The seed's own 400 body, to the letter: `{"error": "Missing required fields: type, input"}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MissingFields {
    pub error: String,
}

/// A 400 from `enqueue-analysis`: the seed's body when `type` or `input` is
/// missing, quern's error body for anything else wrong.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AnalysisRefused {
    Missing(MissingFields),
    Invalid(ErrorBody),
}

/// JavaScript's truthiness: what the seed's `!type || !input` refuses.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|n| n != 0.0 && !n.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// 202 `{jobId, status: "pending", estimatedTime, pollUrl}`, or on a cache
/// hit 200 `{jobId: null, status: "completed", result, cached: true}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnalysisEnqueued {
    #[serde(rename = "jobId")]
    pub job_id: Option<Uuid>,
    #[schema(value_type = crate::records::JobStatusName)]
    pub status: JobStatus,
    #[serde(rename = "estimatedTime", skip_serializing_if = "Option::is_none")]
    pub estimated_time: Option<u32>,
    #[serde(rename = "pollUrl", skip_serializing_if = "Option::is_none")]
    pub poll_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
}

/// Enqueue an analysis (the seed's `enqueue-analysis` Edge Function).
#[utoipa::path(post, path = "/functions/v1/enqueue-analysis", tag = "supabase", security(("bearer" = [])),
    request_body = AnalysisRequest,
    responses(
        (status = 202, body = AnalysisEnqueued),
        (status = 200, description = "A cached result", body = AnalysisEnqueued),
        (status = 400, description = "`{\"error\": \"Missing required fields: type, input\"}`, or an invalid request", body = AnalysisRefused),
        (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
        (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub async fn enqueue_analysis(
    State(state): State<AppState>,
    client: ClientIp,
    caller: Result<Caller, ApiError>,
    body: Result<JsonBody<Value>, ApiError>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let JsonBody(body) = body?;
    let request: AnalysisRequest = serde_json::from_value(body)
        .map_err(|error| ApiError::bad_request(ErrorCode::InvalidRequest, format!("invalid body: {error}")))?;
    let (Some(job_type), Some(input)) = (request.job_type.filter(truthy), request.input.filter(truthy)) else {
        // The seed's exact answer.
        return Ok((StatusCode::BAD_REQUEST, axum::Json(json!({ "error": MISSING_FIELDS }))).into_response());
    };
    let Value::String(job_type) = job_type else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidType,
            "type must be a string naming a job type (see GET /v1/types)",
        ));
    };
    // A service caller speaks for the user it names, as the seed's function
    // did with `input.userId`; a user's token always speaks for itself.
    let user_id = request.user_id.or_else(|| input.get("userId").and_then(Value::as_str).map(str::to_string));
    let body = EnqueueBody { job_type, input, priority: request.priority, user_id, next: Vec::new() };
    check_rate(&state, &caller, &client, 1)?;
    let mut notice = None;
    let answer = match submit(&state, &caller, body, request.use_cache.unwrap_or(true)).await? {
        Enqueued::Cached(result) => (
            StatusCode::OK,
            AnalysisEnqueued {
                job_id: None,
                status: JobStatus::Completed,
                estimated_time: None,
                poll_url: None,
                result: Some(result),
                cached: Some(true),
            },
        ),
        Enqueued::Job { job, estimated_time_s, notice: said } => {
            notice = said;
            (
                StatusCode::ACCEPTED,
                AnalysisEnqueued {
                    job_id: Some(job.id),
                    status: JobStatus::Pending,
                    estimated_time: Some(estimated_time_s),
                    poll_url: Some(format!("/functions/v1/get-analysis-status?jobId={}", job.id)),
                    result: None,
                    cached: None,
                },
            )
        }
    };
    let mut response = (answer.0, axum::Json(answer.1)).into_response();
    // The body's shape is the seed's: a notice travels in a header.
    if let Some(value) = notice.and_then(|notice| HeaderValue::from_str(&notice).ok()) {
        response.headers_mut().insert(NOTICE_HEADER, value);
    }
    Ok(response)
}

#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct StatusRequest {
    /// The job id `enqueue-analysis` answered with.
    #[serde(rename = "jobId")]
    #[param(rename = "jobId", required = true, value_type = String, format = Uuid)]
    #[schema(required = true, value_type = String, format = Uuid)]
    pub job_id: Option<String>,
}

/// `{jobId, status, result, error, progress, …}` in the seed's camelCase.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnalysisStatus {
    #[serde(rename = "jobId")]
    pub job_id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    #[schema(value_type = crate::records::JobStatusName)]
    pub status: JobStatus,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<String>,
    /// 0 to 100.
    pub progress: i16,
    #[serde(rename = "progressMessage")]
    pub progress_message: Option<String>,
    pub attempts: i32,
    #[serde(rename = "maxAttempts")]
    pub max_attempts: i32,
    #[serde(rename = "processingTimeMs")]
    pub processing_time_ms: Option<i32>,
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
    #[serde(rename = "startedAt")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(rename = "completedAt")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// A job's status by `?jobId=` (the seed's `get-analysis-status`).
#[utoipa::path(get, path = "/functions/v1/get-analysis-status", tag = "supabase", security(("bearer" = [])),
    params(StatusRequest),
    responses((status = 200, body = AnalysisStatus), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_analysis_status(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<ApiQuery<StatusRequest>, ApiError>,
) -> Result<axum::Json<AnalysisStatus>, ApiError> {
    let ApiQuery(query) = query?;
    status_of(&state, &caller, query.job_id).await
}

/// A job's status by `{"jobId": …}` (how `supabase.functions.invoke` sends it).
#[utoipa::path(post, path = "/functions/v1/get-analysis-status", tag = "supabase", security(("bearer" = [])),
    request_body = StatusRequest,
    responses(
        (status = 200, body = AnalysisStatus),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 415, description = "A body that is not JSON, and no `?jobId=`", body = ErrorBody),
    ))]
pub async fn post_analysis_status(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<ApiQuery<StatusRequest>, ApiError>,
    body: Result<JsonBody<StatusRequest>, ApiError>,
) -> Result<axum::Json<AnalysisStatus>, ApiError> {
    let from_query = query.ok().and_then(|ApiQuery(q)| q.job_id);
    let job_id = match (body, from_query) {
        (Ok(JsonBody(body)), from_query) => body.job_id.or(from_query),
        // No usable body, but the id is in the query: that will do.
        (Err(_), Some(from_query)) => Some(from_query),
        (Err(error), None) => return Err(error),
    };
    status_of(&state, &caller, job_id).await
}

async fn status_of(
    state: &AppState,
    caller: &Caller,
    job_id: Option<String>,
) -> Result<axum::Json<AnalysisStatus>, ApiError> {
    let job_id = job_id.ok_or_else(|| ApiError::bad_request(ErrorCode::InvalidRequest, "jobId is required"))?;
    let id = Uuid::parse_str(&job_id).map_err(|_| ApiError::job_not_found(&job_id))?;
    let job = match state.queue.store().get(id).await? {
        Some(job) if caller.owns(&job.user_id) => job,
        _ => return Err(ApiError::job_not_found(&job_id)),
    };
    Ok(axum::Json(AnalysisStatus {
        job_id: job.id,
        job_type: job.job_type,
        status: job.status,
        result: job.result,
        error: job.error,
        progress: job.progress_percent,
        progress_message: job.progress_message,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        processing_time_ms: job.processing_time_ms,
        created_at: job.created_at,
        started_at: job.started_at,
        completed_at: job.completed_at,
    }))
}

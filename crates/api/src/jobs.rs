//! `/v1/jobs`: enqueue, read, list, cancel, retry, and follow a job by SSE.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::ExtensionRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::body::{ApiQuery, JsonBody};
use super::error::{ApiError, ErrorBody};
use super::limits::check_rate;
use quern_queue::EnqueueRequest;
use quern_queue::telemetry::{CACHE_HITS, CACHE_MISSES, JOBS_CANCELLED, JOBS_ENQUEUED};
use quern_store::{AttemptRecord, Job, JobFilter, JobStatus, Step};

/// The response header that carries an enqueue's notice (e.g. a priority
/// clamped) where the body's shape is fixed (the Supabase-compatible route).
pub const NOTICE_HEADER: &str = "x-quern-notice";

/// What to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBody {
    /// A known job type (see `GET /v1/types`).
    #[serde(rename = "type")]
    pub job_type: String,
    /// The job's input: a JSON object.
    #[schema(value_type = Object)]
    pub input: Value,
    /// 1 (most urgent) to 10; 5 by default (premium callers: the premium
    /// default, 2 unless set). 1–4 need a premium plan.
    pub priority: Option<i64>,
    /// Service callers: the user the job is for (it is theirs, counts
    /// against their limit and is visible to them). Ignored from a user's token.
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
    pub job_type: String,
    #[schema(value_type = Object)]
    pub input: Value,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct WaitQuery {
    /// Hold the request until the job ends, at most this many seconds (≤ 30).
    pub wait: Option<f64>,
}

/// The answer to an enqueue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnqueueResponse {
    /// The job's id; `null` when the result came from the cache.
    pub id: Option<Uuid>,
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
pub struct ListQuery {
    /// pending, processing, completed, failed or cancelled.
    pub status: Option<String>,
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub job_type: Option<String>,
    /// 1 to 100; 20 by default.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Another user's jobs (service role only).
    pub user_id: Option<String>,
}

pub fn poll_url(id: Uuid) -> String {
    format!("/v1/jobs/{id}")
}

pub fn events_url(id: Uuid) -> String {
    format!("/v1/jobs/{id}/events")
}

/// What an accepted enqueue became.
pub enum Enqueued {
    /// Answered from the result cache; no job was created.
    Cached(Value),
    Job {
        job: Box<Job>,
        estimated_time_s: u32,
        notice: Option<String>,
    },
}

/// Validates, applies the caller's rights, looks in the cache, and enqueues.
/// Shared by `/v1/jobs` and the Supabase-compatible route.
/// `use_cache: false` skips the cache lookup (the seed's `useCache`).
pub async fn submit(
    state: &AppState,
    caller: &Caller,
    body: EnqueueBody,
    use_cache: bool,
) -> Result<Enqueued, ApiError> {
    let handler = known_type(state, &body.job_type)?;
    ensure_enabled(state, &body.job_type)?;
    ensure_allowed(caller, &handler)?;
    if !body.input.is_object() {
        return Err(ApiError::bad_request(
            "invalid_input",
            format!("input must be a JSON object, got {}", quern_queue::json_kind(&body.input)),
        ));
    }
    check_steps(state, caller, &body.next)?;
    let (owner, limit) = owner_of(state, caller, body.user_id.as_deref())?;
    let (priority, notice) = match body.priority {
        Some(asked @ 1..=4) if !caller.premium => {
            (Some(5), Some(format!("priority {asked} needs a premium plan; the job runs at priority 5")))
        }
        // Premium jobs have high priority (the seed's plan) unless they ask otherwise.
        None if caller.premium && !caller.service => (Some(state.settings.premium_priority), None),
        other => (other, None),
    };
    let queue = &state.queue;
    let cacheable = use_cache && handler.manifest.cacheable && queue.settings().cache_enabled && body.next.is_empty();
    if cacheable {
        let scope = handler.manifest.cache_scope;
        if let Some(result) = queue.cached_result(&body.job_type, &handler.version, scope, &owner, &body.input).await? {
            metrics::counter!(CACHE_HITS, "type" => body.job_type.clone()).increment(1);
            return Ok(Enqueued::Cached(result));
        }
        metrics::counter!(CACHE_MISSES, "type" => body.job_type.clone()).increment(1);
    }
    let next = body.next.into_iter().map(|step| Step { job_type: step.job_type, input: step.input }).collect();
    let request = EnqueueRequest {
        user_id: owner,
        job_type: body.job_type,
        input: body.input,
        priority,
        max_attempts: Some(handler.manifest.max_attempts as i32),
        next,
    };
    let job = queue.enqueue_within(request, limit).await?;
    metrics::counter!(JOBS_ENQUEUED, "type" => job.job_type.clone()).increment(1);
    Ok(Enqueued::Job { job: Box::new(job), estimated_time_s: handler.manifest.estimated_time_s, notice })
}

/// Whose job it is, and the unfinished-jobs limit that applies: a user's
/// own; the user a service caller names (that user's limit); a service
/// caller's own (the service limit, apart from every user's).
fn owner_of(state: &AppState, caller: &Caller, named: Option<&str>) -> Result<(String, Option<u32>), ApiError> {
    let settings = state.queue.settings();
    match named {
        Some(user) if caller.service && user != super::auth::SERVICE_ROLE => {
            let plain = (1..=128).contains(&user.len()) && !user.chars().any(char::is_control);
            if !plain {
                return Err(ApiError::bad_request(
                    "invalid_user_id",
                    "user_id must be 1 to 128 characters without control characters (the user's id, e.g. their Supabase auth uid)",
                ));
            }
            Ok((user.to_string(), settings.max_unfinished_per_user))
        }
        _ if caller.service => Ok((caller.user_id.clone(), settings.max_unfinished_per_service)),
        _ => Ok((caller.user_id.clone(), settings.max_unfinished_per_user)),
    }
}

/// The jobs an enqueue creates, its pipeline's steps included.
pub(super) fn jobs_of(body: &EnqueueBody) -> u32 {
    u32::try_from(body.next.len()).unwrap_or(u32::MAX).saturating_add(1)
}

/// Refuses a type the caller may not enqueue (`[access] roles` of its manifest).
pub(super) fn ensure_allowed(caller: &Caller, handler: &quern_runtime::HandlerVersion) -> Result<(), ApiError> {
    use quern_runtime::manifest::Role;
    let roles = &handler.manifest.access;
    let has = |role: Role| match role {
        Role::ServiceRole => caller.service,
        Role::Authenticated => !caller.service,
        Role::Premium => !caller.service && caller.premium,
    };
    if roles.is_empty() || roles.iter().any(|role| has(*role)) {
        return Ok(());
    }
    let names: Vec<&str> = roles.iter().map(|role| role.as_str()).collect();
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "type_forbidden",
        format!(
            "job type `{}` may be enqueued only by {} callers (`[access] roles` of its handler.toml)",
            handler.manifest.job_type,
            names.join(" or ")
        ),
    ))
}

/// Refuses work for a type whose feature flag is off.
pub(super) fn ensure_enabled(state: &AppState, job_type: &str) -> Result<(), ApiError> {
    if state.is_disabled(job_type) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "type_disabled",
            format!("job type `{job_type}` is switched off by its feature flag; try again later"),
        ));
    }
    Ok(())
}

/// Checks each pipeline step as a direct enqueue of it: known, switched on,
/// and the caller's to enqueue.
pub(super) fn check_steps(state: &AppState, caller: &Caller, steps: &[StepBody]) -> Result<(), ApiError> {
    for (index, step) in steps.iter().enumerate() {
        let at = |e: ApiError| ApiError { message: format!("next[{index}]: {}", e.message), ..e };
        let handler = known_type(state, &step.job_type).map_err(at)?;
        ensure_enabled(state, &step.job_type).map_err(at)?;
        ensure_allowed(caller, &handler).map_err(at)?;
    }
    Ok(())
}

pub(super) fn known_type(
    state: &AppState,
    job_type: &str,
) -> Result<std::sync::Arc<quern_runtime::HandlerVersion>, ApiError> {
    state.registry.get(job_type).ok_or_else(|| {
        let known = state.registry.job_types();
        let known = if known.is_empty() { "none are loaded".to_string() } else { known.join(", ") };
        ApiError::bad_request("unknown_type", format!("unknown job type `{job_type}`; known types: {known}"))
    })
}

/// Enqueue a job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])), params(WaitQuery),
    request_body = EnqueueBody,
    responses(
        (status = 202, description = "Enqueued (or, with `wait`, still running when the wait ran out)", body = EnqueueResponse),
        (status = 200, description = "A cached result, or with `wait`, the job ended", body = EnqueueResponse),
        (status = 400, description = "Unknown type, input not an object, priority out of range, malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 413, description = "Body over 256 KiB", body = ErrorBody),
        (status = 415, description = "Not `application/json`", body = ErrorBody),
        (status = 429, description = "Rate limited, or too many unfinished jobs", body = ErrorBody),
        (status = 503, description = "Type switched off, or the database is away", body = ErrorBody),
    ))]
pub async fn enqueue(
    State(state): State<AppState>,
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    headers: HeaderMap,
    caller: Result<Caller, ApiError>,
    query: Result<ApiQuery<WaitQuery>, ApiError>,
    body: Result<JsonBody<EnqueueBody>, ApiError>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let ApiQuery(query) = query?;
    let wait = wait_duration(&state, query.wait)?;
    let JsonBody(body) = body?;
    check_rate(&state, &caller, &headers, peer.as_ref().ok(), jobs_of(&body))?;
    match submit(&state, &caller, body, true).await? {
        Enqueued::Cached(result) => Ok((
            StatusCode::OK,
            axum::Json(EnqueueResponse {
                id: None,
                status: JobStatus::Completed,
                result: Some(result),
                cached: true,
                poll_url: None,
                events_url: None,
                estimated_time_s: None,
                priority: None,
                notice: None,
                error: None,
            }),
        )
            .into_response()),
        Enqueued::Job { job, estimated_time_s, notice } => {
            let job = match wait {
                Some(wait) => wait_for_end(&state, *job, wait).await?,
                None => *job,
            };
            let status = if job.status.is_finished() { StatusCode::OK } else { StatusCode::ACCEPTED };
            let location = HeaderValue::from_str(&poll_url(job.id)).ok();
            let body = EnqueueResponse {
                id: Some(job.id),
                status: job.status,
                poll_url: Some(poll_url(job.id)),
                events_url: Some(events_url(job.id)),
                estimated_time_s: Some(estimated_time_s),
                priority: Some(job.priority),
                notice,
                result: job.result,
                error: job.error,
                cached: false,
            };
            let mut response = (status, axum::Json(body)).into_response();
            if let Some(location) = location {
                response.headers_mut().insert(header::LOCATION, location);
            }
            Ok(response)
        }
    }
}

fn wait_duration(state: &AppState, wait: Option<f64>) -> Result<Option<Duration>, ApiError> {
    let max = state.settings.max_wait.as_secs_f64();
    match wait {
        None => Ok(None),
        Some(seconds) if seconds.is_finite() && (0.0..=max).contains(&seconds) => {
            Ok(Some(Duration::from_secs_f64(seconds)))
        }
        Some(seconds) => Err(ApiError::bad_request(
            "invalid_wait",
            format!("wait={seconds} is out of range: use 0 to {max} seconds"),
        )),
    }
}

/// Polls the job until it ends, the wait runs out or the server shuts down.
pub(super) async fn wait_for_end(state: &AppState, job: Job, wait: Duration) -> Result<Job, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(10);
    let mut latest = job;
    while !latest.status.is_finished() && tokio::time::Instant::now() < deadline && !state.shutdown.is_cancelled() {
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_millis(200));
        match state.queue.store().get(latest.id).await? {
            Some(job) => latest = job,
            None => break,
        }
    }
    Ok(latest)
}

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
    let job = owned_job(&state, &caller, &id).await?;
    let history = state.queue.store().attempts(job.id).await?;
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
        return Err(ApiError::bad_request("invalid_limit", format!("limit={limit} is out of range: use 1 to 100")));
    }
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(JobStatus::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
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
    let before = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let filter = JobFilter { user_id, status, job_type: query.job_type, before, limit: limit + 1 };
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
        ApiError::bad_request("invalid_cursor", "cursor is not one this server gave out: pass `next_cursor` as it came")
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
    peer: Result<ConnectInfo<SocketAddr>, ExtensionRejection>,
    headers: HeaderMap,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = owned_job(&state, &caller, &id).await?;
    ensure_enabled(&state, &job.job_type)?;
    if let Some(handler) = state.registry.get(&job.job_type) {
        ensure_allowed(&caller, &handler)?;
    }
    let steps = u32::try_from(job.next_steps.len()).unwrap_or(u32::MAX);
    check_rate(&state, &caller, &headers, peer.as_ref().ok(), steps.saturating_add(1))?;
    let attempts = state
        .registry
        .get(&job.job_type)
        .map_or(state.queue.settings().default_max_attempts, |handler| handler.manifest.max_attempts as i32);
    let job = state.queue.requeue(job.id, attempts).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(JobView::of(job))).into_response())
}

/// Server-Sent Events of a job's status and progress, ending at its end state.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "`event: status` on each status change, `event: progress` on progress; \
            data is a JobEvent; the stream ends after the final status", content_type = "text/event-stream", body = JobEvent),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = owned_job(&state, &caller, &id).await?;
    let stream = futures_util::stream::unfold(
        Follow {
            state,
            id: job.id,
            last: None,
            polled: false,
            done: false,
            until: tokio::time::Instant::now() + FOLLOW_AT_MOST,
        },
        follow_step,
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One SSE event's data.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    pub id: Uuid,
    pub status: JobStatus,
    pub progress: ProgressView,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct Follow {
    state: AppState,
    id: Uuid,
    last: Option<(JobStatus, i16, Option<String>)>,
    /// The first look is immediate (a job that already ended yields its
    /// final event at once); later ones wait an interval.
    polled: bool,
    done: bool,
    /// The stream ends here, job ended or not; a browser's `EventSource`
    /// reconnects by itself.
    until: tokio::time::Instant,
}

const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
/// The longest one event stream stays open (a job can wait longer than that
/// in a backlog: the client follows it again).
const FOLLOW_AT_MOST: Duration = Duration::from_secs(15 * 60);

async fn follow_step(mut follow: Follow) -> Option<(Result<Event, Infallible>, Follow)> {
    if follow.done {
        return None;
    }
    loop {
        if std::mem::replace(&mut follow.polled, true) {
            tokio::select! {
                () = follow.state.shutdown.cancelled() => return None,
                () = tokio::time::sleep_until(follow.until) => return None,
                () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            }
        }
        let job = match follow.state.queue.store().get(follow.id).await {
            Ok(Some(job)) => job,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(job_id = %follow.id, %error, "following a job: the database did not answer; retrying");
                continue;
            }
        };
        let snapshot = (job.status, job.progress_percent, job.progress_message.clone());
        if follow.last.as_ref() == Some(&snapshot) {
            continue;
        }
        let kind = match &follow.last {
            Some((status, ..)) if *status == job.status => "progress",
            _ => "status",
        };
        follow.last = Some(snapshot);
        follow.done = job.status.is_finished();
        let data = JobEvent {
            id: job.id,
            status: job.status,
            progress: ProgressView { percent: job.progress_percent, message: job.progress_message },
            result: job.result,
            error: job.error,
        };
        let event = Event::default().event(kind).json_data(&data).unwrap_or_else(|_| Event::default().event(kind));
        return Some((Ok(event), follow));
    }
}

//! The enqueue path: what a caller may enqueue (known type, switched on, its
//! role, its pipeline), whose job it becomes, the cache lookup, and
//! `POST /v1/jobs` with its optional `?wait=`.

use crate::error::ErrorCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::views::*;
use crate::AppState;
use crate::auth::Caller;
use crate::body::{ApiQuery, JsonBody};
use crate::error::{ApiError, ErrorBody};
use crate::limits::{ClientIp, check_rate};
use quern_queue::EnqueueRequest;
use quern_queue::telemetry::{CACHE_HITS, CACHE_MISSES, JOBS_ENQUEUED};
use quern_store::{Job, JobStatus, Step};

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
            ErrorCode::InvalidInput,
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
        Some(user) if caller.service && user != crate::auth::SERVICE_ROLE => {
            let plain = (1..=128).contains(&user.len()) && !user.chars().any(char::is_control);
            if !plain {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidUserId,
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
pub(crate) fn jobs_of(body: &EnqueueBody) -> u32 {
    u32::try_from(body.next.len()).unwrap_or(u32::MAX).saturating_add(1)
}

/// Refuses a type the caller may not enqueue (`[access] roles` of its manifest).
pub(crate) fn ensure_allowed(caller: &Caller, handler: &quern_runtime::HandlerVersion) -> Result<(), ApiError> {
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
        ErrorCode::TypeForbidden,
        format!(
            "job type `{}` may be enqueued only by {} callers (`[access] roles` of its handler.toml)",
            handler.manifest.job_type,
            names.join(" or ")
        ),
    ))
}

/// Refuses work for a type whose feature flag is off.
pub(crate) fn ensure_enabled(state: &AppState, job_type: &str) -> Result<(), ApiError> {
    if state.is_disabled(job_type) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::TypeDisabled,
            format!("job type `{job_type}` is switched off by its feature flag; try again later"),
        ));
    }
    Ok(())
}

/// Checks each pipeline step as a direct enqueue of it: known, switched on,
/// and the caller's to enqueue.
pub(crate) fn check_steps(state: &AppState, caller: &Caller, steps: &[StepBody]) -> Result<(), ApiError> {
    for (index, step) in steps.iter().enumerate() {
        let at = |e: ApiError| ApiError { message: format!("next[{index}]: {}", e.message), ..e };
        let handler = known_type(state, &step.job_type).map_err(at)?;
        ensure_enabled(state, &step.job_type).map_err(at)?;
        ensure_allowed(caller, &handler).map_err(at)?;
    }
    Ok(())
}

pub(crate) fn known_type(
    state: &AppState,
    job_type: &str,
) -> Result<std::sync::Arc<quern_runtime::HandlerVersion>, ApiError> {
    state.registry.get(job_type).ok_or_else(|| {
        let known = state.registry.job_types();
        let known = if known.is_empty() { "none are loaded".to_string() } else { known.join(", ") };
        ApiError::bad_request(ErrorCode::UnknownType, format!("unknown job type `{job_type}`; known types: {known}"))
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
    client: ClientIp,
    caller: Result<Caller, ApiError>,
    query: Result<ApiQuery<WaitQuery>, ApiError>,
    body: Result<JsonBody<EnqueueBody>, ApiError>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let ApiQuery(query) = query?;
    let wait = wait_duration(&state, query.wait)?;
    let JsonBody(body) = body?;
    check_rate(&state, &caller, &client, jobs_of(&body))?;
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

/// The longest `?wait=` a request may ask for; the server holds it at most
/// its own `max_wait`, which is never longer.
pub const MAX_WAIT_S: f64 = 30.0;

fn wait_duration(state: &AppState, wait: Option<f64>) -> Result<Option<Duration>, ApiError> {
    match wait {
        None => Ok(None),
        Some(seconds) if (0.0..=MAX_WAIT_S).contains(&seconds) => {
            Ok(Some(Duration::from_secs_f64(seconds).min(state.settings.max_wait)))
        }
        Some(seconds) => Err(ApiError::bad_request(
            ErrorCode::InvalidWait,
            format!("wait={seconds} is out of range: use 0 to {MAX_WAIT_S} seconds"),
        )),
    }
}

/// Follows the job until it ends, the wait runs out or the server shuts
/// down: woken by the process's job events, not by polling.
pub(crate) async fn wait_for_end(state: &AppState, job: Job, wait: Duration) -> Result<Job, ApiError> {
    if job.status.is_finished() || wait.is_zero() {
        return Ok(job);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let Some(mut following) = state.events.follow(job.id).await? else { return Ok(job) };
    let mut latest = following.latest();
    while !latest.status.is_finished() {
        tokio::select! {
            () = state.shutdown.cancelled() => break,
            () = tokio::time::sleep_until(deadline) => break,
            changed = following.changed() => match changed {
                Some(job) => latest = job,
                None => break,
            },
        }
    }
    Ok(Arc::unwrap_or_clone(latest))
}

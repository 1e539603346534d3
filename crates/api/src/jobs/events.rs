//! `GET /v1/jobs/{id}/events`: a job followed by Server-Sent Events until it ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use uuid::Uuid;

use super::streams::{OpenStream, StreamLimit};
use super::views::*;
use crate::AppState;
use crate::auth::StreamCaller;
use crate::error::{ApiError, ErrorBody, ErrorCode};
use quern_queue::events::Following;
use quern_store::{Job, JobStatus};
use tokio_util::sync::CancellationToken;

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The job id"),
        ("access_token" = Option<String>, Query, description = "For a browser's `EventSource`, which cannot send \
            headers: the user's session JWT, which must expire within an hour. Ignored when an `Authorization` \
            header is sent."),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received (browsers \
            send it when they reconnect): that state is not sent again."),
    ),
    responses(
        (status = 200, description = "`event: status` on each status change, `event: progress` on progress; \
            data is a JobEvent and `id` names the state; the stream ends after the final status",
            content_type = "text/event-stream", body = JobEventFrame),
        (status = 204, description = "The job has ended and `Last-Event-ID` names its final state: nothing more \
            will come (a browser's `EventSource` stops reconnecting)"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 429, description = "The user already holds `QUERN_MAX_STREAMS_PER_USER` streams open (10 unless \
            set); service callers are not capped", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    StreamCaller(caller): StreamCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let job_id = Uuid::parse_str(&id).map_err(|_| ApiError::job_not_found(&id))?;
    // Counted before the job is read: a refused stream costs the database nothing.
    let place = match &state.streams {
        Some(limit) if !caller.service => Some(limit.open(&caller.user_id).ok_or_else(|| too_many_streams(limit))?),
        _ => None,
    };
    // Following reads the job once (after registering, so no change is
    // missed): that read both checks the owner and is the stream's first event.
    let mut following = state.events.follow(job_id).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    let now = following.latest();
    if !caller.owns(&now.user_id) {
        return Err(ApiError::job_not_found(&id));
    }
    let seen = headers.get("last-event-id").and_then(|value| value.to_str().ok()).map(str::to_owned);
    let last = seen.filter(|seen| *seen == event_id(&now)).map(|_| snapshot(&now));
    if last.is_some() && now.status.is_finished() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let follow = Follow {
        following,
        first: Some(now),
        last,
        done: false,
        shutdown: state.shutdown.clone(),
        until: tokio::time::Instant::now() + FOLLOW_AT_MOST,
        _place: place,
    };
    let stream = futures_util::stream::unfold(follow, follow_step);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// One event as it travels: `event: status` (or `progress`) and a `data:`
/// line holding a [`JobEvent`] as JSON.
pub struct JobEventFrame;

impl utoipa::PartialSchema for JobEventFrame {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property("event", ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["status", "progress"])))
            .required("event")
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/json")
                    .description(Some("A JobEvent (see its schema), as JSON")),
            )
            .required("data")
            .into()
    }
}

impl ToSchema for JobEventFrame {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((JobEvent::name().into(), <JobEvent as utoipa::PartialSchema>::schema()));
        <JobEvent as ToSchema>::schemas(schemas);
    }
}

/// One SSE event's data.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    pub id: Uuid,
    #[schema(value_type = crate::records::JobStatusName)]
    pub status: JobStatus,
    pub progress: ProgressView,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

type Snapshot = (JobStatus, i16, Option<String>);

fn snapshot(job: &Job) -> Snapshot {
    (job.status, job.progress_percent, job.progress_message.clone())
}

/// An event's `id`: the state it reports (a browser hands it back as
/// `Last-Event-ID` when it reconnects).
fn event_id(job: &Job) -> String {
    format!("{}.{}", job.status.as_str(), job.progress_percent)
}

struct Follow {
    following: Following,
    /// The job as read when the stream opened, reported first.
    first: Option<Arc<Job>>,
    last: Option<Snapshot>,
    done: bool,
    shutdown: CancellationToken,
    /// The stream ends here, job ended or not; a browser's `EventSource`
    /// reconnects by itself.
    until: tokio::time::Instant,
    /// The stream's place under the user's cap, given back when it ends or
    /// its client goes away (the stream is dropped either way).
    _place: Option<OpenStream>,
}

fn too_many_streams(limit: &StreamLimit) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyStreams,
        format!(
            "you already follow {} jobs by events, the most open at once; close one, or poll GET /v1/jobs/{{id}}",
            limit.limit()
        ),
    )
    .with_retry_after(Duration::from_secs(5))
}

/// The longest one event stream stays open (a job can wait longer than that
/// in a backlog: the client follows it again).
const FOLLOW_AT_MOST: Duration = Duration::from_secs(15 * 60);

async fn follow_step(mut follow: Follow) -> Option<(Result<Event, Infallible>, Follow)> {
    if follow.done {
        return None;
    }
    let mut job = match follow.first.take() {
        Some(job) => job,
        None => follow.next_change().await?,
    };
    // One event per change of state; a change back to a state already
    // reported is not one.
    loop {
        let now = snapshot(&job);
        if follow.last.as_ref() != Some(&now) {
            let kind = match &follow.last {
                Some((status, ..)) if *status == job.status => "progress",
                _ => "status",
            };
            follow.last = Some(now);
            follow.done = job.status.is_finished();
            return Some((Ok(event(kind, &job)), follow));
        }
        if job.status.is_finished() {
            return None;
        }
        job = follow.next_change().await?;
    }
}

impl Follow {
    /// The job's next snapshot; `None` when the stream should end.
    async fn next_change(&mut self) -> Option<Arc<Job>> {
        tokio::select! {
            () = self.shutdown.cancelled() => None,
            () = tokio::time::sleep_until(self.until) => None,
            changed = self.following.changed() => changed,
        }
    }
}

fn event(kind: &'static str, job: &Job) -> Event {
    let data = JobEvent {
        id: job.id,
        status: job.status,
        progress: ProgressView { percent: job.progress_percent, message: job.progress_message.clone() },
        result: job.result.clone(),
        error: job.error.clone(),
    };
    let event = Event::default().event(kind).id(event_id(job));
    event.json_data(&data).unwrap_or_else(|_| Event::default().event(kind).id(event_id(job)))
}

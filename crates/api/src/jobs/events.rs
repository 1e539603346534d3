//! `GET /v1/jobs/{id}/events`: a job followed by Server-Sent Events until it ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use uuid::Uuid;

use super::owned_job;
use super::views::*;
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody};
use quern_store::JobStatus;

#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "`event: status` on each status change, `event: progress` on progress; \
            data is a JobEvent; the stream ends after the final status", content_type = "text/event-stream", body = JobEventFrame),
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

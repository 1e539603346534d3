//! The one error type of the HTTP API. Every error leaves as
//! `{"error": "<what is wrong and how to fix it>", "code": "<stable_code>"}`
//! with the status that fits; this file is the only place that decides both.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use quern_queue::QueueError;
use quern_store::StoreError;

/// Every `code` an error body can carry. Clients match on these, so they
/// are listed in the OpenAPI document and never renamed; a new failure gets
/// a new code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    AlreadyActive,
    AlreadyFinished,
    BodyTooLarge,
    DatabaseUnavailable,
    DoesNotLoad,
    Forbidden,
    FunctionClaimed,
    FunctionTimeout,
    FunctionUnreachable,
    FunctionUnreadable,
    Internal,
    InvalidBatch,
    InvalidBatchSize,
    InvalidCursor,
    InvalidForm,
    InvalidFunction,
    InvalidInput,
    InvalidJson,
    InvalidLimit,
    InvalidManifest,
    InvalidMethod,
    InvalidMultipart,
    InvalidNext,
    InvalidPercent,
    InvalidPriority,
    InvalidQuery,
    InvalidRequest,
    InvalidStatus,
    InvalidType,
    InvalidUserId,
    InvalidWait,
    InvalidWindow,
    JobNotFound,
    MethodNotAllowed,
    NoActiveVersion,
    NoFunction,
    NoRoute,
    NotAComponent,
    NotRetryable,
    NothingToRollBack,
    RateLimited,
    RequestTimeout,
    RolloutContended,
    TooManyActiveJobs,
    TooManySignIns,
    TooManyStreams,
    TypeDisabled,
    TypeForbidden,
    Unauthorized,
    UndeclaredVariable,
    UnknownType,
    UnreadableBody,
    UnsupportedMediaType,
    VersionNotFound,
    WebhookSecretMissing,
    WrongWorld,
}

/// The body of every error response.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What is wrong, and how to fix it.
    pub error: String,
    /// A stable machine-readable code, e.g. `unknown_type`.
    pub code: ErrorCode,
    /// For a request of many items (`POST /v1/jobs/batch`): what is wrong
    /// with each item, by its index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ItemError>,
}

/// What is wrong with one item of a request.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ItemError {
    /// The item's position in the request, from 0.
    pub index: usize,
    pub error: String,
    pub code: ErrorCode,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Seconds a client should wait before trying again (429, 503).
    pub retry_after: Option<Duration>,
    pub items: Vec<ItemError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None, items: Vec::new() }
    }

    pub fn with_items(mut self, items: Vec<ItemError>) -> Self {
        self.items = items;
        self
    }

    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    /// The one answer for a job that does not exist or is not the caller's:
    /// another user's job is indistinguishable from a missing one.
    pub fn job_not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::JobNotFound, format!("job {id} not found"))
    }

    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.message, code: self.code, errors: self.items };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up: a client that waits this long succeeds.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::TooManyActiveJobs { limit, .. } => too_many_active_jobs(limit),
            other => {
                // The details are for the operator's log, not for callers.
                tracing::error!(error = %other, "database error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::DatabaseUnavailable,
                    "the database did not answer; try again shortly",
                )
                .with_retry_after(Duration::from_secs(1))
            }
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(error: QueueError) -> Self {
        let message = error.to_string();
        match error {
            QueueError::InputNotObject(_) | QueueError::NulCharacter(_) => {
                Self::bad_request(ErrorCode::InvalidInput, message)
            }
            QueueError::PriorityOutOfRange(_) => Self::bad_request(ErrorCode::InvalidPriority, message),
            QueueError::InvalidType(_) => Self::bad_request(ErrorCode::UnknownType, message),
            QueueError::InvalidStep { .. } | QueueError::TooManySteps { .. } => {
                Self::bad_request(ErrorCode::InvalidNext, message)
            }
            QueueError::TooManyActiveJobs { limit } => too_many_active_jobs(limit),
            QueueError::NotFound(id) => Self::job_not_found(&id.to_string()),
            QueueError::AlreadyFinished { .. } => Self::new(StatusCode::CONFLICT, ErrorCode::AlreadyFinished, message),
            QueueError::NotRetryable { .. } => Self::new(StatusCode::CONFLICT, ErrorCode::NotRetryable, message),
            QueueError::Store(error) => error.into(),
        }
    }
}

fn too_many_active_jobs(limit: u32) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyActiveJobs,
        format!("you already have {limit} unfinished jobs, the most allowed; wait for one to finish or cancel one"),
    )
    .with_retry_after(Duration::from_secs(5))
}

//! `/v1/types`: the job types this gateway knows, and their feature flags.

use crate::error::ErrorCode;
use std::borrow::Cow;

use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

use quern_runtime::manifest::JOB_TYPE_PATTERN;

use super::AppState;
use super::auth::{Caller, require_service};
use super::error::{ApiError, ErrorBody};

/// A job type's name as the OpenAPI document states it: the manifest's rule
/// (lowercase letters, digits and `_`, a letter first, at most 64) as a
/// pattern, so a client learns it from the document, not from a 400.
pub struct JobTypeName;

impl utoipa::PartialSchema for JobTypeName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(JOB_TYPE_PATTERN))
            .description(Some("A job type: lowercase letters, digits and `_`, a letter first, at most 64"))
            .into()
    }
}

impl ToSchema for JobTypeName {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("JobType")
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TypeView {
    #[serde(rename = "type")]
    pub job_type: String,
    pub description: String,
    /// Whether enqueues are accepted (the type's feature flag).
    pub enabled: bool,
    pub estimated_time_s: u32,
    pub cacheable: bool,
    pub max_attempts: u32,
    /// The loaded handler version.
    pub version: String,
}

/// Known job types, enabled or not.
#[utoipa::path(get, path = "/v1/types", tag = "types", security(("bearer" = [])),
    responses((status = 200, body = Vec<TypeView>), (status = 401, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> axum::Json<Vec<TypeView>> {
    axum::Json(
        state
            .registry
            .all()
            .into_iter()
            .map(|handler| TypeView {
                enabled: !state.is_disabled(&handler.manifest.job_type),
                job_type: handler.manifest.job_type.clone(),
                description: handler.manifest.description.clone(),
                estimated_time_s: handler.manifest.estimated_time_s,
                cacheable: handler.manifest.cacheable,
                max_attempts: handler.manifest.max_attempts,
                version: handler.version.to_string(),
            })
            .collect(),
    )
}

/// Switch a type's feature flag on: enqueues are accepted again.
#[utoipa::path(post, path = "/v1/types/{type}/enable", tag = "types", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    Path(job_type): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    toggle(&state, &caller, &job_type, true)
}

/// Switch a type's feature flag off: enqueues get 503 `type_disabled` (on
/// this gateway; jobs already queued still run).
#[utoipa::path(post, path = "/v1/types/{type}/disable", tag = "types", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn disable(
    State(state): State<AppState>,
    caller: Caller,
    Path(job_type): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    toggle(&state, &caller, &job_type, false)
}

fn toggle(
    state: &AppState,
    caller: &Caller,
    job_type: &str,
    enabled: bool,
) -> Result<axum::http::StatusCode, ApiError> {
    require_service(caller)?;
    if state.registry.get(job_type).is_none() {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            ErrorCode::UnknownType,
            format!("unknown job type `{job_type}`"),
        ));
    }
    state.set_enabled(job_type, enabled);
    tracing::info!(job_type, enabled, "feature flag changed");
    Ok(axum::http::StatusCode::NO_CONTENT)
}

//! `/v1/handlers`: ops upload handler versions and roll them out across
//! every worker without a redeploy — canary, rollback, pause (service role).
//!
//! An upload is checked the way a worker would load it (a component of the
//! handler world that compiles, with a manifest that parses and names the
//! type) before anything is stored; a refused upload touches nothing. A
//! rollout is one row per type; writing it notifies every worker and
//! gateway, and this gateway applies it before answering.
//!
//! One file over 400 lines on purpose: upload, list, rollout, rollback, pause and
//! resume are one resource's routes with one set of checks; the rollout rules
//! themselves are pure code in `quern_queue::rollout`.

use crate::error::ErrorCode;
use std::collections::{BTreeMap, BTreeSet};

use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::body::JsonBody;
use super::error::{ApiError, ErrorBody};
use super::types::JobTypeName;
use crate::records::RolloutView;
use quern_queue::rollout::{self, ChangeError, Refused, Step};
use quern_queue::stats;
use quern_runtime::LoadError;
use quern_runtime::manifest::{Manifest, validate_job_type};
use quern_store::{Rollout, StoredVersion};

/// How far back per-version counts and times look.
const STATS_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// A caller with a service_role token: 401 without a token, 403 with
/// another role's.
pub struct Ops(pub Caller);

impl FromRequestParts<AppState> for Ops {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.service {
            return Err(ApiError::forbidden(
                "managing handler versions needs a service_role token (quern token --role service_role)",
            ));
        }
        Ok(Self(caller))
    }
}

/// The `{type}` of the path, a valid job type name (400 `invalid_type` if not).
pub struct TypePath(pub String);

impl FromRequestParts<AppState> for TypePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(job_type) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request(ErrorCode::InvalidType, rejection.body_text()))?;
        validate_job_type(&job_type)
            .map_err(|error| ApiError::bad_request(ErrorCode::InvalidType, error.to_string()))?;
        Ok(Self(job_type))
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadedVersion {
    #[serde(rename = "type")]
    pub job_type: String,
    /// The version id: 12 hex digits of the sha256 of the component and its
    /// manifest (the same build under another manifest is another version).
    pub version: String,
    pub sha256: String,
    pub size_bytes: usize,
    /// `false` when this exact build was uploaded before.
    pub created: bool,
}

/// Multipart fields of an upload (for the OpenAPI document).
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The component (`.wasm`), built against the handler world.
    #[schema(format = Binary, value_type = String)]
    pub component: Vec<u8>,
    /// The handler's `handler.toml`.
    pub manifest: String,
}

/// Upload a handler version: validated, compiled, stored; not yet serving.
#[utoipa::path(post, path = "/v1/handlers/{type}/versions", tag = "handlers", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Stored", body = UploadedVersion),
        (status = 200, description = "This build was stored before", body = UploadedVersion),
        (status = 400, description = "Not a component, a manifest that does not parse, names another type or reads a variable this host does not offer, a missing part", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "The manifest claims a legacy function another type claims", body = ErrorBody),
        (status = 413, description = "Over QUERN_MAX_UPLOAD_MB", body = ErrorBody),
        (status = 415, description = "Not `multipart/form-data`", body = ErrorBody),
        (status = 422, description = "A component of another world, or one that does not compile", body = ErrorBody),
    ))]
pub async fn upload(
    State(state): State<AppState>,
    Ops(caller): Ops,
    TypePath(job_type): TypePath,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, axum::Json<UploadedVersion>), ApiError> {
    let mut multipart = multipart.map_err(|rejection| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            format!("{}: send multipart/form-data with parts `component` and `manifest`", rejection.body_text()),
        )
    })?;
    let limit_mb = state.settings.max_upload_bytes >> 20;
    let too_large = |error: axum::extract::multipart::MultipartError| {
        if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BodyTooLarge,
                format!("the upload is over the {limit_mb} MiB limit (QUERN_MAX_UPLOAD_MB)"),
            )
        } else {
            ApiError::bad_request(
                ErrorCode::InvalidMultipart,
                format!("the upload does not read as multipart: {}", error.body_text()),
            )
        }
    };
    let (mut component, mut manifest_text) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(too_large)? {
        match field.name() {
            Some("component") => component = Some(field.bytes().await.map_err(too_large)?),
            Some("manifest") => manifest_text = Some(field.text().await.map_err(too_large)?),
            other => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidMultipart,
                    format!("unexpected part `{}`: send only `component` and `manifest`", other.unwrap_or("")),
                ));
            }
        }
    }
    let missing = |part: &str| {
        ApiError::bad_request(
            ErrorCode::InvalidMultipart,
            format!("missing part `{part}`: send the .wasm as `component` and handler.toml as `manifest`"),
        )
    };
    let component = component.ok_or_else(|| missing("component"))?;
    let manifest_text = manifest_text.ok_or_else(|| missing("manifest"))?;
    let manifest = Manifest::parse(&manifest_text).map_err(|error| {
        ApiError::bad_request(ErrorCode::InvalidManifest, format!("the manifest does not parse: {error}"))
    })?;
    if manifest.job_type != job_type {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidManifest,
            format!("the manifest declares type `{}` but was uploaded for `{job_type}`", manifest.job_type),
        ));
    }
    if let Some(function) = &manifest.function
        && let Some(other) = state.registry.function_claimant(function, &job_type)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::FunctionClaimed,
            format!(
                "function = \"{function}\" is already claimed by type `{other}`: one legacy function, one type \
                 (remove it from one of the manifests)"
            ),
        ));
    }
    let undeclared = state.registry.runtime().settings().config.undeclared(&manifest.config_keys);
    if !undeclared.is_empty() {
        return Err(ApiError::bad_request(
            ErrorCode::UndeclaredVariable,
            format!(
                "the manifest reads {}, which this host does not offer handlers: the operator offers a variable \
                 with QUERN_VAR_<NAME>, the handler config file (QUERN_HANDLER_CONFIG) or QUERN_HANDLER_ENV",
                quern_runtime::config::list(&undeclared)
            ),
        ));
    }
    let runtime = state.registry.runtime().clone();
    let bytes = component.clone();
    let loaded = tokio::task::spawn_blocking(move || runtime.load(&bytes, manifest))
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, error.to_string()))?;
    let handler = loaded.map_err(|error| match error {
        LoadError::NotAComponent(_) => ApiError::bad_request(ErrorCode::NotAComponent, error.to_string()),
        LoadError::WorldMismatch(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::WrongWorld, error.to_string())
        }
        other => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::DoesNotLoad, other.to_string()),
    })?;
    let stored = StoredVersion {
        job_type: job_type.clone(),
        version: handler.version.to_string(),
        sha256: hex::encode(Sha256::digest(&component)),
        component: component.to_vec(),
        manifest: manifest_text,
        uploaded_by: caller.user_id.clone(),
        uploaded_at: Utc::now(),
    };
    let created = state.queue.store().put_version(&stored).await?;
    tracing::info!(job_type = %job_type, version = %stored.version, created, "handler version uploaded");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((
        status,
        axum::Json(UploadedVersion {
            job_type,
            version: stored.version,
            sha256: stored.sha256,
            size_bytes: stored.component.len(),
            created,
        }),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutBody {
    /// A stored version of this type.
    #[schema(min_length = 1)]
    pub version: String,
    /// 100 (default): the version serves every new job. 1–99: a canary
    /// taking that share of new jobs (by a stable hash of the job id).
    /// 0: no canary.
    #[schema(minimum = 0, maximum = 100)]
    #[serde(default, deserialize_with = "crate::body::whole_number")]
    pub percent: Option<i64>,
}

/// Roll a stored version out to every worker: all new jobs, or a canary share.
#[utoipa::path(post, path = "/v1/handlers/{type}/rollout", tag = "handlers", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    request_body = RolloutBody,
    responses(
        (status = 200, body = RolloutView),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such stored version", body = ErrorBody),
        (status = 415, description = "Not `application/json`", body = ErrorBody),
        (status = 409, description = "A canary with no active version to measure it against", body = ErrorBody),
    ))]
pub async fn rollout(
    State(state): State<AppState>,
    _ops: Ops,
    TypePath(job_type): TypePath,
    body: Result<JsonBody<RolloutBody>, ApiError>,
) -> Result<axum::Json<RolloutView>, ApiError> {
    let JsonBody(body) = body?;
    let percent = body.percent.unwrap_or(100);
    let Ok(percent @ 0..=100) = u8::try_from(percent) else {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidPercent,
            format!("percent {percent} is out of range: 0 to 100"),
        ));
    };
    let store = state.queue.store();
    if store.version(&job_type, &body.version).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::VersionNotFound,
            format!(
                "`{job_type}` has no stored version {}: upload it first (GET /v1/handlers lists them)",
                body.version
            ),
        ));
    }
    let step = Step::Push { version: body.version, percent };
    let rollout = change(&state, &job_type, &step).await?;
    applied(&state, &rollout).await?;
    Ok(axum::Json(rollout.into()))
}

/// Undo the last step: drop the canary if there is one, else return to the previous active version.
#[utoipa::path(post, path = "/v1/handlers/{type}/rollback", tag = "handlers", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    responses(
        (status = 200, body = RolloutView),
        (status = 400, description = "Not a job type name", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "Nothing to roll back to", body = ErrorBody),
    ))]
pub async fn rollback(
    State(state): State<AppState>,
    _ops: Ops,
    TypePath(job_type): TypePath,
) -> Result<axum::Json<RolloutView>, ApiError> {
    let rollout = change(&state, &job_type, &Step::Rollback).await?;
    applied(&state, &rollout).await?;
    Ok(axum::Json(rollout.into()))
}

/// Pause a type on every gateway and worker: enqueues get 503 `type_disabled`, queued jobs wait.
#[utoipa::path(post, path = "/v1/handlers/{type}/pause", tag = "handlers", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    responses((status = 200, body = RolloutView), (status = 400, description = "Not a job type name", body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn pause(
    State(state): State<AppState>,
    _ops: Ops,
    TypePath(job_type): TypePath,
) -> Result<axum::Json<RolloutView>, ApiError> {
    set_paused(&state, &job_type, true).await
}

/// Resume a paused type everywhere.
#[utoipa::path(post, path = "/v1/handlers/{type}/resume", tag = "handlers", security(("bearer" = [])),
    params(("type" = inline(JobTypeName), Path, description = "The job type")),
    responses((status = 200, body = RolloutView), (status = 400, description = "Not a job type name", body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn resume(
    State(state): State<AppState>,
    _ops: Ops,
    TypePath(job_type): TypePath,
) -> Result<axum::Json<RolloutView>, ApiError> {
    set_paused(&state, &job_type, false).await
}

async fn set_paused(state: &AppState, job_type: &str, paused: bool) -> Result<axum::Json<RolloutView>, ApiError> {
    let known =
        state.queue.store().rollouts().await?.iter().any(|r| r.job_type == job_type && r.active_version.is_some());
    if !known && state.registry.get(job_type).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownType,
            format!("no handler serves `{job_type}` here or in the database"),
        ));
    }
    let rollout = change(state, job_type, if paused { &Step::Pause } else { &Step::Resume }).await?;
    applied(state, &rollout).await?;
    Ok(axum::Json(rollout.into()))
}

/// Applies `step` to the type's rollout atomically (see [`rollout`]). A
/// type served from the handlers directory is adopted by its first push: its build is
/// stored, so the version the fleet ran before a first push is that push's
/// previous version, to which a rollback returns.
async fn change(state: &AppState, job_type: &str, step: &Step) -> Result<Rollout, ApiError> {
    let store = state.queue.store();
    // Only a push adopts: pausing a directory-served type leaves it to the
    // directory, whose next build still loads.
    let pushing = matches!(step, Step::Push { .. });
    let adopted = match state.registry.directory_build(job_type).filter(|_| pushing) {
        Some((handler, component)) => {
            let stored = StoredVersion {
                job_type: job_type.to_string(),
                version: handler.version.to_string(),
                sha256: handler.sha256.clone(),
                component,
                manifest: handler.manifest.source.clone(),
                uploaded_by: "handlers directory".into(),
                uploaded_at: Utc::now(),
            };
            store.put_version(&stored).await?;
            Some(stored.version)
        }
        None => None,
    };
    rollout::change(store.as_ref(), job_type, step, adopted.as_deref()).await.map_err(|error| match error {
        ChangeError::Store(error) => error.into(),
        ChangeError::Refused(refused) => {
            let (status, code) = match &refused {
                Refused::NoActiveVersion { .. } => (StatusCode::CONFLICT, ErrorCode::NoActiveVersion),
                Refused::AlreadyActive { .. } => (StatusCode::BAD_REQUEST, ErrorCode::AlreadyActive),
                Refused::NothingToRollBack { .. } => (StatusCode::CONFLICT, ErrorCode::NothingToRollBack),
            };
            ApiError::new(status, code, refused.to_string())
        }
        contended @ ChangeError::Contended(_) => {
            ApiError::new(StatusCode::CONFLICT, ErrorCode::RolloutContended, contended.to_string())
        }
    })
}

/// Applies a stored rollout here before answering (every other process
/// hears of it), so this gateway's next enqueue already sees it.
async fn applied(state: &AppState, rollout: &Rollout) -> Result<(), ApiError> {
    state.versions.sync().await?;
    tracing::info!(
        job_type = %rollout.job_type,
        active = rollout.active_version.as_deref().unwrap_or("-"),
        canary = rollout.canary_version.as_deref().unwrap_or("-"),
        percent = rollout.canary_percent,
        paused = rollout.paused,
        "rollout changed"
    );
    Ok(())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HandlerTypeView {
    #[serde(rename = "type")]
    pub job_type: String,
    /// The version serving new jobs on this gateway's host.
    pub active_version: Option<String>,
    pub canary_version: Option<String>,
    pub canary_percent: i16,
    pub paused: bool,
    /// Versions come from the database (`true`) or a handlers directory.
    pub managed: bool,
    /// The hosts the active version may call, those taken from settings
    /// (`{{ GEMINI_BASE_URL }}`) resolved.
    pub allowed_hosts: Vec<String>,
    pub versions: Vec<VersionView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionView {
    pub version: String,
    /// active, canary, previous or stored.
    pub state: String,
    pub size_bytes: Option<i64>,
    pub uploaded_by: Option<String>,
    pub uploaded_at: Option<DateTime<Utc>>,
    /// Attempts in the last 24 hours.
    pub completed: u64,
    pub failed: u64,
    pub p95_ms: Option<f64>,
}

/// Every type: active and canary versions, the split, and per version completed/failed counts and p95 time.
#[utoipa::path(get, path = "/v1/handlers", tag = "handlers", security(("bearer" = [])),
    responses((status = 200, body = Vec<HandlerTypeView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, _ops: Ops) -> Result<axum::Json<Vec<HandlerTypeView>>, ApiError> {
    let store = state.queue.store();
    let rollouts: BTreeMap<String, Rollout> =
        store.rollouts().await?.into_iter().map(|r| (r.job_type.clone(), r)).collect();
    let stored = store.versions().await?;
    let since = Utc::now() - STATS_WINDOW;
    let counts = store.outcome_counts(since).await?;
    let run_times = store.run_times(since, true).await?;
    let mut types: BTreeSet<String> = state.registry.job_types().into_iter().collect();
    types.extend(rollouts.keys().cloned());
    types.extend(stored.iter().map(|v| v.job_type.clone()));
    let views = types
        .into_iter()
        .map(|job_type| {
            let rollout = rollouts.get(&job_type).cloned().unwrap_or_default();
            let active = state.registry.get(&job_type);
            let serving = active.as_ref().map(|h| h.version.to_string());
            let allowed_hosts =
                active.map(|h| h.manifest.allowed_hosts.iter().map(ToString::to_string).collect()).unwrap_or_default();
            let figures = stats::by_version(&counts, &run_times, &job_type);
            let state_of = |version: &str| {
                if serving.as_deref() == Some(version) {
                    "active"
                } else if rollout.canary_version.as_deref() == Some(version) {
                    "canary"
                } else if rollout.previous_version.as_deref() == Some(version) {
                    "previous"
                } else {
                    "stored"
                }
            };
            let mut versions: Vec<VersionView> = stored
                .iter()
                .filter(|v| v.job_type == job_type)
                .map(|v| VersionView {
                    version: v.version.clone(),
                    state: state_of(&v.version).to_string(),
                    size_bytes: Some(v.size_bytes),
                    uploaded_by: Some(v.uploaded_by.clone()),
                    uploaded_at: Some(v.uploaded_at),
                    completed: 0,
                    failed: 0,
                    p95_ms: None,
                })
                .collect();
            // A directory-loaded version is not stored; list it all the same.
            if let Some(serving) = &serving
                && !versions.iter().any(|v| &v.version == serving)
            {
                versions.insert(
                    0,
                    VersionView {
                        version: serving.clone(),
                        state: "active".into(),
                        size_bytes: None,
                        uploaded_by: None,
                        uploaded_at: None,
                        completed: 0,
                        failed: 0,
                        p95_ms: None,
                    },
                );
            }
            for view in &mut versions {
                if let Some(figures) = figures.get(&view.version) {
                    (view.completed, view.failed, view.p95_ms) = (figures.completed, figures.failed, figures.p95_ms);
                }
            }
            HandlerTypeView {
                managed: state.registry.is_managed(&job_type),
                allowed_hosts,
                paused: rollout.paused,
                canary_version: rollout.canary_version.clone(),
                canary_percent: rollout.canary_percent,
                active_version: serving,
                job_type,
                versions,
            }
        })
        .collect();
    Ok(axum::Json(views))
}

//! Every other `/functions/v1/<name>` of the customer's Supabase project, so
//! the app can point its one functions URL at quern:
//! - a name a loaded handler's manifest claims (`function = "…"`, the legacy
//!   synchronous function the type replaces) is the app's way back (seed 001:
//!   "Se worker estiver offline, usa fluxo síncrono antigo (fallback)";
//!   seed 003: "Set all flags to `false` → Instant rollback"). It reaches the
//!   customer's own function at SUPABASE_URL unless ops chose to serve it in
//!   quern (`QUERN_SERVE_LEGACY_FUNCTIONS`), and even then whenever quern
//!   could not answer it now ([`LegacyRoute`]). Served here, the body is the
//!   job's input and the answer the result, as the function answered: never
//!   a job handle, which the app would take for the analysis;
//! - any other name is forwarded to `SUPABASE_URL/functions/v1/<name>` by
//!   the rule every passed-through API follows (passthrough.rs).

use crate::error::ErrorCode;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::body::parse;
use super::error::ApiError;
use super::jobs::{EnqueueBody, Enqueued, submit, wait_for_end};
use super::limits::{ClientIp, check_rate};
use super::passthrough::{Api, forward};
use quern_store::JobStatus;

/// `ANY /functions/v1/{*path}` that no route of quern's own matched.
pub async fn serve(
    State(state): State<AppState>,
    Path(path): Path<String>,
    client: ClientIp,
    caller: Result<Caller, ApiError>,
    request: Request,
) -> Result<Response, ApiError> {
    check_path(&path)?;
    let name = path.split('/').next().unwrap_or_default();
    let mut signature = None;
    if let Some(handler) = state.registry.all().into_iter().find(|h| h.manifest.function.as_deref() == Some(name)) {
        let manifest = &handler.manifest;
        // A webhook's answer never waits for its job: how long one runs is
        // no reason to pass it through.
        let waits = manifest.webhook.is_none();
        match legacy_route(&state, &manifest.job_type, manifest.estimated_time_s, waits).await {
            LegacyRoute::Quern => {
                return match &manifest.webhook {
                    Some(webhook) => Ok(super::webhooks::serve(&state, manifest, webhook, request).await),
                    None => run_sync(&state, client, caller?, manifest.job_type.clone(), request).await,
                };
            }
            LegacyRoute::Customer(why) => {
                tracing::info!(function = name, job_type = %manifest.job_type, why = why.as_str(), "a legacy function goes to the customer's own");
            }
        }
        // The customer's own webhook checks the provider's signature itself.
        signature = manifest.webhook.as_ref().map(|webhook| webhook.header.to_ascii_lowercase());
    }
    forward(&state, Api::Functions, &path, signature.as_deref(), &client, request).await
}

/// Where a legacy function is answered.
enum LegacyRoute {
    /// By a job in quern, waited for.
    Quern,
    /// By the customer's own function at SUPABASE_URL, and why.
    Customer(PassedThrough),
}

/// Why a legacy function goes to the customer's own.
enum PassedThrough {
    /// QUERN_SERVE_LEGACY_FUNCTIONS is off (the default).
    NotServedHere,
    /// The type's flag is off or it is paused: the rollback.
    Disabled,
    /// No worker has been seen within a lease: the job would only wait.
    NoLiveWorker,
    /// The type's estimated run is longer than the wait: the app would get
    /// no answer in time.
    TooSlowForTheWait,
}

impl PassedThrough {
    fn as_str(&self) -> &'static str {
        match self {
            Self::NotServedHere => "QUERN_SERVE_LEGACY_FUNCTIONS is off",
            Self::Disabled => "the type is disabled or paused",
            Self::NoLiveWorker => "no live worker",
            Self::TooSlowForTheWait => "its estimated run is longer than QUERN_MAX_WAIT_S",
        }
    }
}

/// The rule: with no SUPABASE_URL there is nothing to pass to, so quern
/// answers (and says why it cannot, when it cannot); with one, quern answers
/// only when ops asked it to and it can answer now. Checked before a job is
/// made, so a passed-through call never also runs in quern (a WhatsApp reply
/// sent twice, a model paid twice).
async fn legacy_route(state: &AppState, job_type: &str, estimated_time_s: u32, waits: bool) -> LegacyRoute {
    if state.settings.functions_upstream.is_none() {
        return LegacyRoute::Quern;
    }
    let why = if !state.settings.serve_legacy_functions {
        PassedThrough::NotServedHere
    } else if state.is_disabled(job_type) {
        PassedThrough::Disabled
    } else if waits && Duration::from_secs(u64::from(estimated_time_s)) > state.settings.max_wait {
        PassedThrough::TooSlowForTheWait
    } else if !a_worker_is_live(state).await {
        PassedThrough::NoLiveWorker
    } else {
        return LegacyRoute::Quern;
    };
    LegacyRoute::Customer(why)
}

/// Whether a worker has beaten its heart within one lease (it beats three
/// times a lease; one that stops cleanly removes its row at once). A store
/// that cannot say counts as none: the customer's function still answers.
async fn a_worker_is_live(state: &AppState) -> bool {
    let lease = chrono::TimeDelta::from_std(state.queue.settings().lease).unwrap_or(chrono::TimeDelta::seconds(30));
    let since = chrono::Utc::now() - lease;
    match state.queue.store().workers().await {
        Ok(workers) => workers.iter().any(|worker| worker.last_heartbeat_at >= since),
        Err(error) => {
            tracing::warn!(%error, "reading the workers failed; the legacy function goes to the customer's own");
            false
        }
    }
}

/// Each segment a plain name: nothing that could reach another path upstream.
fn check_path(path: &str) -> Result<(), ApiError> {
    let plain = |segment: &str| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if path.split('/').all(plain) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            ErrorCode::InvalidFunction,
            "a function's path is names of letters, digits, `-`, `_` and `.`, separated by `/`",
        ))
    }
}

/// The legacy synchronous function a type replaces: enqueue the body as the
/// job's input, wait up to the wait bound, answer the result as the function
/// did (200 with the result; 500 `{"error"}` when the job failed), or 504
/// `{"error"}` naming the job when it is still running (it goes on and
/// stays readable at `/v1/jobs/{id}`).
async fn run_sync(
    state: &AppState,
    client: ClientIp,
    caller: Caller,
    job_type: String,
    request: Request,
) -> Result<Response, ApiError> {
    if request.method() != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!("{} runs a job: send POST with the input as the JSON body", request.uri().path()),
        ));
    }
    let bytes = axum::body::to_bytes(request.into_body(), super::body::MAX_BODY_BYTES).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BodyTooLarge,
            "the body exceeds 256 KiB: send URLs, not data",
        )
    })?;
    let input: Value = parse(&bytes)?;
    let body = EnqueueBody { job_type, input, priority: None, user_id: None, next: Vec::new() };
    check_rate(state, &caller, &client, 1)?;
    let job = match submit(state, &caller, body, true).await? {
        Enqueued::Cached(result) => return Ok((StatusCode::OK, axum::Json(result)).into_response()),
        Enqueued::Job { job, .. } => wait_for_end(state, *job, state.settings.max_wait).await?,
    };
    Ok(match job.status {
        JobStatus::Completed => (StatusCode::OK, axum::Json(job.result.unwrap_or(Value::Null))).into_response(),
        JobStatus::Failed | JobStatus::Cancelled => {
            let error = job.error.unwrap_or_else(|| format!("the job {}", job.status.as_str()));
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({ "error": error }))).into_response()
        }
        JobStatus::Pending | JobStatus::Processing => {
            let error = format!(
                "the analysis did not finish within {} s; it goes on as job {} (GET /v1/jobs/{})",
                state.settings.max_wait.as_secs(),
                job.id,
                job.id
            );
            (StatusCode::GATEWAY_TIMEOUT, axum::Json(json!({ "error": error }))).into_response()
        }
    })
}

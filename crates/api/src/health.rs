//! `/health` (the process and its database), `/health/live` and
//! `/health/ready` (see [`super::admin`]) for load balancers and container
//! health checks, and `/health/detailed` for operators.

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::admin::{Health, Liveness, Readiness};
use super::error::{ApiError, ErrorBody};
use crate::records::{DepthView, WorkerRowView};

/// Liveness and database reachability: 200, or 503 when the database does not answer.
#[utoipa::path(get, path = "/health", tag = "meta",
    responses((status = 200, body = Health), (status = 503, description = "The database does not answer", body = Health)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let (status, health) = state.probes.health().await;
    (status, axum::Json(health)).into_response()
}

/// Liveness: the process answers. Asks nothing of the database, so a
/// database outage never has a healthy process restarted.
#[utoipa::path(get, path = "/health/live", tag = "meta", responses((status = 200, body = Liveness)))]
pub async fn live(State(state): State<AppState>) -> axum::Json<Liveness> {
    axum::Json(state.probes.live())
}

/// Readiness: the database answers and handlers are loaded (send work here).
#[utoipa::path(get, path = "/health/ready", tag = "meta",
    responses((status = 200, body = Readiness), (status = 503, description = "Not ready: `problems` says why", body = Readiness)))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, axum::Json<Readiness>) {
    let (status, readiness) = state.probes.ready().await;
    (status, axum::Json(readiness))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DetailedHealth {
    #[serde(flatten)]
    pub basic: Health,
    /// The seed's `worker` object: this process's worker (`id` null and
    /// zeros in a gateway alone) and the pending jobs of every type.
    pub worker: SeedWorker,
    pub database: DatabaseHealth,
    /// Unfinished jobs by type and status.
    pub queue: Vec<DepthView>,
    pub workers: Vec<WorkerRowView>,
    pub handlers: Vec<HandlerView>,
    pub cache: CacheView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SeedWorker {
    pub id: Option<String>,
    pub concurrency: usize,
    #[serde(rename = "activeJobs")]
    pub active_jobs: usize,
    #[serde(rename = "queueSize")]
    pub queue_size: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatabaseHealth {
    pub backend: String,
    pub latency_ms: f64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HandlerView {
    #[serde(rename = "type")]
    pub job_type: String,
    pub version: String,
    /// A canary version taking `canary_percent` of new jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    /// Paused on every gateway and worker.
    #[serde(default)]
    pub paused: bool,
}

impl HandlerView {
    /// What this process's registry serves for each type.
    pub fn all(registry: &quern_runtime::registry::Registry) -> Vec<Self> {
        registry
            .all()
            .iter()
            .map(|h| {
                let job_type = h.manifest.job_type.clone();
                let canary = registry.canary(&job_type);
                Self {
                    version: h.version.to_string(),
                    canary_version: canary.as_ref().map(|c| c.version.version.to_string()),
                    canary_percent: canary.map(|c| c.percent),
                    paused: registry.is_paused(&job_type),
                    job_type,
                }
            })
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CacheView {
    pub enabled: bool,
    pub entries: i64,
    pub live: i64,
    pub hits: i64,
}

/// Database latency, queue depth, workers, handler versions, cache: public,
/// as the seed's `/health/detailed` (no secret and no user's data in it).
#[utoipa::path(get, path = "/health/detailed", tag = "meta",
    responses(
        (status = 200, body = DetailedHealth),
        (status = 503, description = "The database does not answer", body = ErrorBody),
    ))]
pub async fn detailed(State(state): State<AppState>) -> Result<axum::Json<DetailedHealth>, ApiError> {
    let store = state.queue.store();
    let started = Instant::now();
    store.ping().await?;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let queue = store.depth_by_type().await?;
    let workers = store.workers().await?;
    let cache = store.cache_stats(Utc::now()).await?;
    let pending = queue.iter().filter(|row| row.status == quern_store::JobStatus::Pending).map(|row| row.count).sum();
    let worker = state.worker.as_ref();
    Ok(axum::Json(DetailedHealth {
        basic: state.probes.health_of(None),
        worker: SeedWorker {
            id: worker.map(|w| w.id().to_string()),
            concurrency: worker.map_or(0, |w| w.concurrency()),
            active_jobs: worker.map_or(0, |w| w.active_jobs()),
            queue_size: pending,
        },
        database: DatabaseHealth { backend: store.backend().to_string(), latency_ms },
        queue: queue.into_iter().map(Into::into).collect(),
        workers: workers.into_iter().map(Into::into).collect(),
        handlers: HandlerView::all(&state.registry),
        cache: CacheView {
            enabled: state.queue.settings().cache_enabled,
            entries: cache.entries,
            live: cache.live,
            hits: cache.hits,
        },
    }))
}

//! What an orchestrator and Prometheus ask every process: `/health/live`
//! (the process answers; nothing else is asked, so a database blip never
//! restarts a healthy container), `/health/ready` (the database answers and
//! handlers are loaded: send work here) and `/metrics`.
//!
//! `quern serve` and `quern gateway` serve these on their main port beside the
//! API; `quern worker`, which has no API, serves them alone on its admin
//! listener (`QUERN_ADMIN_PORT`, else `PORT`), as do the others when
//! `QUERN_ADMIN_PORT` is set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::same_secret;
use super::error::ApiError;
use super::metrics::Metrics;
use quern_queue::worker::WorkerProbe;
use quern_runtime::registry::Registry;
use quern_store::Store;

/// How long readiness waits for the database.
const DB_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probes look at.
pub struct Probes {
    pub store: Arc<dyn Store>,
    pub registry: Arc<Registry>,
    pub metrics: Option<Arc<Metrics>>,
    /// When set, `/metrics` answers only `Authorization: Bearer <token>`
    /// (QUERN_METRICS_TOKEN).
    pub metrics_token: Option<String>,
    pub started: Instant,
    /// The worker in this process, if any.
    pub worker: Option<WorkerProbe>,
}

/// `GET /health` in the seed's shape (its worker's `/health`, which EasyPanel
/// and its Dockerfile probe), with quern's fields beside it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `healthy` (the seed's word), or `unhealthy` when the database does not answer.
    pub status: String,
    /// This process's worker, when it runs one.
    pub worker_id: Option<String>,
    pub active_jobs: usize,
    /// Seconds since the process started (the seed's `process.uptime()`).
    pub uptime: f64,
    pub uptime_s: u64,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    /// Always `ok`: the process answers.
    pub status: String,
    pub uptime_s: u64,
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `not_ready` with the reasons in `problems`.
    pub status: String,
    /// Handler types loaded in this process.
    pub handlers: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl Probes {
    /// 200 `healthy`, or 503 `unhealthy` when the database does not answer
    /// within [`DB_TIMEOUT`].
    pub async fn health(&self) -> (StatusCode, Health) {
        let error = match tokio::time::timeout(DB_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(format!("database: {error}")),
            Err(_) => Some(format!("database: no answer within {} s", DB_TIMEOUT.as_secs())),
        };
        let status = if error.is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
        (status, self.health_of(error))
    }

    /// The health figures, with the database's error if any.
    pub fn health_of(&self, error: Option<String>) -> Health {
        let uptime = self.started.elapsed();
        Health {
            status: if error.is_some() { "unhealthy" } else { "healthy" }.to_string(),
            worker_id: self.worker.as_ref().map(|w| w.id().to_string()),
            active_jobs: self.worker.as_ref().map_or(0, |w| w.active_jobs()),
            uptime: uptime.as_secs_f64(),
            uptime_s: uptime.as_secs(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            error,
        }
    }

    pub fn live(&self) -> Liveness {
        Liveness {
            status: "ok".into(),
            uptime_s: self.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// 200 when the database answers within [`DB_TIMEOUT`] and at least one
    /// handler is loaded; 503 naming what is missing otherwise.
    pub async fn ready(&self) -> (StatusCode, Readiness) {
        let mut problems = Vec::new();
        match tokio::time::timeout(DB_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => problems.push(format!("database: {error}")),
            Err(_) => problems.push(format!("database: no answer within {} s", DB_TIMEOUT.as_secs())),
        }
        let handlers = self.registry.all().len();
        if handlers == 0 {
            problems.push("no handler is loaded: check QUERN_HANDLERS_DIR or push one".into());
        }
        let status = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let state = if problems.is_empty() { "ready" } else { "not_ready" };
        (status, Readiness { status: state.into(), handlers, problems })
    }

    /// The Prometheus exposition, with the queue depth read just now; 401
    /// without the metrics token when one is set.
    pub async fn metrics(&self, headers: &HeaderMap) -> Response {
        if let Some(token) = &self.metrics_token {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .unwrap_or_default();
            if !same_secret(token, given.trim()) {
                let mut response = ApiError::unauthorized(
                    "/metrics needs `Authorization: Bearer <QUERN_METRICS_TOKEN>` (Prometheus: `authorization: {credentials: …}`)",
                )
                .into_response();
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
        match &self.metrics {
            Some(metrics) => metrics.render(self.store.as_ref()).await,
            None => "# no metrics recorder is installed in this process (ENABLE_METRICS=false)\n".into_response(),
        }
    }
}

/// The admin routes alone, for a listener of their own.
pub fn router(probes: Arc<Probes>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|State(probes): State<Arc<Probes>>| async move {
                let (status, health) = probes.health().await;
                (status, axum::Json(health))
            }),
        )
        .route("/health/live", get(|State(probes): State<Arc<Probes>>| async move { axum::Json(probes.live()) }))
        .route(
            "/health/ready",
            get(|State(probes): State<Arc<Probes>>| async move {
                let (status, readiness) = probes.ready().await;
                (status, axum::Json(readiness))
            }),
        )
        .route(
            "/metrics",
            get(|State(probes): State<Arc<Probes>>, headers: HeaderMap| async move { probes.metrics(&headers).await }),
        )
        .with_state(probes)
}

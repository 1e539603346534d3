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

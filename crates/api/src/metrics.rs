//! Prometheus metrics: the recorder, `/metrics`, and the HTTP middleware.
//! The names live in [`crate::telemetry`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Unit, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;
use quern_queue::telemetry::QUEUE_DEPTH;
use quern_store::{JobStatus, Store};

pub const HTTP_DURATION: &str = "quern_http_request_duration_seconds";

const BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The installed recorder, and the queue-depth labels set so far (so a
/// type whose jobs all finished drops to 0 instead of keeping its last value).
pub struct Metrics {
    handle: PrometheusHandle,
    depth_labels: Mutex<BTreeSet<(String, JobStatus)>>,
}

static INSTALLED: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

impl Metrics {
    /// Installs the process-wide recorder (once; later calls share it).
    pub fn install() -> Option<Arc<Self>> {
        let handle = INSTALLED
            .get_or_init(|| {
                let builder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                    .and_then(|b| {
                        b.set_buckets_for_metric(
                            Matcher::Full(quern_queue::telemetry::COMPLETION_BATCH.into()),
                            BATCH_BUCKETS,
                        )
                    });
                match builder.and_then(|b| b.install_recorder()) {
                    Ok(handle) => {
                        quern_queue::telemetry::describe();
                        describe_histogram!(
                            HTTP_DURATION,
                            Unit::Seconds,
                            "HTTP request duration, by route, method and status."
                        );
                        let upkeep = handle.clone();
                        // Histograms are drained into their buckets by upkeep.
                        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                            loop {
                                std::thread::sleep(Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        });
                        if let Err(error) = spawned {
                            tracing::warn!(%error, "cannot start the metrics upkeep thread");
                        }
                        Some(handle)
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot install the metrics recorder; /metrics will be empty");
                        None
                    }
                }
            })
            .clone()?;
        Some(Arc::new(Self { handle, depth_labels: Mutex::default() }))
    }
}

/// Prometheus text exposition of every metric.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn render(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    state.probes.metrics(&headers).await
}

impl Metrics {
    /// Every metric in the Prometheus text format, with the queue depth read
    /// from the database just now (left at its last value when the database
    /// does not answer: the rest is still worth scraping).
    pub async fn render(&self, store: &dyn Store) -> Response {
        match store.depth_by_type().await {
            Ok(depth) => {
                let mut labels = self.depth_labels.lock().unwrap_or_else(|e| e.into_inner());
                for (job_type, status) in labels.iter() {
                    if !depth.iter().any(|row| &row.job_type == job_type && row.status == *status) {
                        gauge!(QUEUE_DEPTH, "type" => job_type.clone(), "status" => status.as_str()).set(0.0);
                    }
                }
                for row in &depth {
                    gauge!(QUEUE_DEPTH, "type" => row.job_type.clone(), "status" => row.status.as_str())
                        .set(row.count as f64);
                    labels.insert((row.job_type.clone(), row.status));
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the queue depth for /metrics"),
        }
        let mut response = self.handle.render().into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
        response
    }
}

/// Records every request's duration by route (the matched pattern, not the
/// path: ids would make the label set unbounded), method and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().as_str().to_string();
    let response = next.run(request).await;
    // SSE streams are measured until their headers leave, which is what a
    // client waits for before the first event.
    metrics::histogram!(HTTP_DURATION, "route" => route, "method" => method, "status" => response.status().as_u16().to_string())
        .record(started.elapsed().as_secs_f64());
    response
}

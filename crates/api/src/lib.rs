//! The HTTP gateway (axum): the job API under `/v1`, the Supabase-compatible
//! routes under `/functions/v1`, health, metrics and the OpenAPI document.
//!
//! [`router`] lists every route in one place. Handlers are small functions
//! over extractors; errors leave through [`error::ApiError`] in one shape.
//! This module calls the queue and the store; it knows nothing of wasm
//! beyond the registry's list of loaded types.
//!
//! One file over 400 lines on purpose: the route table and the state every
//! route shares are read at a glance here, in one place.

use crate::error::ErrorCode;
pub mod admin;
pub mod auth;
mod batch;
mod body;
mod dashboard;
pub mod error;
mod functions;
mod handlers;
mod health;
mod jobs;
pub mod limits;
pub mod metrics;
mod passthrough;
mod records;
pub mod server;
mod stats;
mod supabase;
mod types;
mod webhooks;

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, header};
use tokio_util::sync::CancellationToken;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use self::auth::Auth;
use self::dashboard::Sessions;
use self::limits::IpLimiter;
use quern_queue::Queue;
use quern_queue::alerts::{AlertSettings, Alerts};
use quern_queue::events::JobEvents;
use quern_queue::leader::Leader;
use quern_queue::versions::VersionSync;
use quern_queue::worker::WorkerProbe;
use quern_runtime::registry::Registry;

pub use self::body::MAX_BODY_BYTES;
pub use self::jobs::streams::DEFAULT_PER_USER as DEFAULT_MAX_STREAMS_PER_USER;

/// Gateway settings (names from the seeds where they have one: PORT).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Enqueues per minute per client IP; `None` for no limit.
    pub rate_limit_per_min: Option<u32>,
    /// Proxies believed about the client's address in `X-Forwarded-For`.
    pub trust_proxy: limits::TrustProxy,
    /// Origins allowed by CORS; `*` for any.
    pub cors_origins: Vec<String>,
    /// Types refused at enqueue from the start (QUERN_DISABLED_TYPES).
    pub disabled_types: Vec<String>,
    /// The longest `?wait=` a caller may ask for.
    pub max_wait: Duration,
    /// A password that opens the dashboard (besides a service_role token).
    pub dashboard_password: Option<String>,
    pub alerts: AlertSettings,
    /// The largest handler upload (QUERN_MAX_UPLOAD_MB).
    pub max_upload_bytes: usize,
    /// Mark the dashboard's session cookie `Secure` (the public URL is https).
    pub secure_cookies: bool,
    /// How connections and requests are bounded.
    pub server: server::ServerSettings,
    /// SUPABASE_URL: where the /functions/v1 routes quern does not serve go.
    pub functions_upstream: Option<url::Url>,
    /// How long a passed-through function may take.
    pub functions_timeout: Duration,
    /// Serve a legacy function a manifest claims in quern, rather than pass
    /// it through to `functions_upstream` (QUERN_SERVE_LEGACY_FUNCTIONS).
    pub serve_legacy_functions: bool,
    /// The priority of a premium caller's job that asks for none.
    pub premium_priority: i64,
    /// Event streams one user may hold open at once; `None` for no cap.
    pub max_streams_per_user: Option<u32>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            rate_limit_per_min: Some(50),
            trust_proxy: limits::TrustProxy::Off,
            cors_origins: vec!["*".to_string()],
            disabled_types: Vec::new(),
            max_wait: Duration::from_secs(30),
            dashboard_password: None,
            alerts: AlertSettings::default(),
            max_upload_bytes: 50 << 20,
            secure_cookies: false,
            server: server::ServerSettings::default(),
            functions_upstream: None,
            functions_timeout: Duration::from_secs(55),
            serve_legacy_functions: false,
            premium_priority: 2,
            max_streams_per_user: Some(jobs::streams::DEFAULT_PER_USER),
        }
    }
}

/// What else runs in the gateway's process.
pub struct InProcess {
    /// The worker in this process, if any (`quern serve`), for health.
    pub worker: Option<WorkerProbe>,
    /// The metrics recorder, when one is installed.
    pub metrics: Option<Arc<metrics::Metrics>>,
    /// The token `/metrics` asks for, if any (QUERN_METRICS_TOKEN).
    pub metrics_token: Option<String>,
    /// Whether this process leads maintenance (only the leader posts alerts).
    pub leader: Leader,
}

impl InProcess {
    /// A gateway alone in its process that leads (benches, tests).
    pub fn alone() -> Self {
        Self { worker: None, metrics: None, metrics_token: None, leader: Leader::always() }
    }
}

/// Everything a request handler may reach.
pub struct Gateway {
    pub queue: Arc<Queue>,
    pub registry: Arc<Registry>,
    pub auth: Auth,
    pub settings: GatewaySettings,
    /// The worker in this process, if any (`quern serve`), for health.
    pub worker: Option<WorkerProbe>,
    /// Liveness, readiness and `/metrics` (also served on an admin listener).
    pub probes: Arc<admin::Probes>,
    /// Cancelled on shutdown: long requests (`?wait=`, SSE) end early.
    pub shutdown: CancellationToken,
    /// Judged from the database while the gateway runs.
    pub alerts: Arc<Alerts>,
    /// Applies rollouts this gateway writes before it answers.
    pub versions: Arc<VersionSync>,
    /// Job changes pushed to SSE streams and `?wait=` callers.
    pub events: JobEvents,
    /// Reaches the customer's Supabase functions (the pass-through).
    pub functions: reqwest::Client,
    /// Event streams open per user (`None`: no cap).
    pub streams: Option<Arc<jobs::streams::StreamLimit>>,
    sessions: Sessions,
    sign_ins: dashboard::SignInThrottle,
    disabled: RwLock<BTreeSet<String>>,
    limiter: Option<IpLimiter>,
    started: Instant,
}

pub type AppState = Arc<Gateway>;

impl Gateway {
    pub fn new(
        queue: Arc<Queue>,
        registry: Arc<Registry>,
        auth: Auth,
        settings: GatewaySettings,
        process: InProcess,
        shutdown: CancellationToken,
    ) -> AppState {
        let InProcess { worker, metrics, metrics_token, leader } = process;
        let started = Instant::now();
        let store = queue.store().clone();
        let probes = Arc::new(admin::Probes {
            store,
            registry: registry.clone(),
            metrics,
            metrics_token,
            started,
            worker: worker.clone(),
        });
        let disabled = settings.disabled_types.iter().cloned().collect();
        let limiter = settings.rate_limit_per_min.and_then(IpLimiter::per_minute);
        let alerts = Alerts::start(settings.alerts.clone(), queue.store().clone(), leader, shutdown.clone());
        let versions = VersionSync::new(queue.store().clone(), registry.clone());
        let events = JobEvents::start(queue.store().clone(), shutdown.clone());
        let functions = passthrough::client(settings.functions_timeout);
        let streams = settings.max_streams_per_user.and_then(jobs::streams::StreamLimit::per_user);
        Arc::new(Self {
            functions,
            streams,
            queue,
            registry,
            auth,
            settings,
            worker,
            probes,
            shutdown,
            alerts,
            versions,
            events,
            sessions: Sessions::default(),
            sign_ins: dashboard::SignInThrottle::default(),
            disabled: RwLock::new(disabled),
            limiter,
            started,
        })
    }

    /// Whether a type's feature flag is off: on this gateway, or paused for
    /// every gateway and worker through the handler API.
    pub fn is_disabled(&self, job_type: &str) -> bool {
        self.registry.is_paused(job_type) || self.disabled.read().unwrap_or_else(|e| e.into_inner()).contains(job_type)
    }

    pub fn set_enabled(&self, job_type: &str, enabled: bool) {
        let mut disabled = self.disabled.write().unwrap_or_else(|e| e.into_inner());
        if enabled {
            disabled.remove(job_type);
        } else {
            disabled.insert(job_type.to_string());
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Every documented route, one a line, with its methods and path beside it
/// (a unit test holds those comments to the document). Components are larger
/// than job requests, so their upload alone takes up to `max_upload_bytes`.
fn route_table(max_upload_bytes: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi_base())
        .routes(routes!(jobs::submit::enqueue, jobs::list)) // POST, GET /v1/jobs
        .routes(routes!(jobs::get)) // GET /v1/jobs/{id}
        .routes(routes!(jobs::cancel)) // POST /v1/jobs/{id}/cancel
        .routes(routes!(jobs::retry)) // POST /v1/jobs/{id}/retry
        .routes(routes!(jobs::events::events)) // GET /v1/jobs/{id}/events
        .routes(routes!(types::list)) // GET /v1/types
        .routes(routes!(types::enable)) // POST /v1/types/{type}/enable
        .routes(routes!(types::disable)) // POST /v1/types/{type}/disable
        .routes(routes!(supabase::enqueue_analysis)) // POST /functions/v1/enqueue-analysis
        .routes(routes!(supabase::get_analysis_status, supabase::post_analysis_status)) // GET, POST /functions/v1/get-analysis-status
        .routes(routes!(health::health)) // GET /health
        .routes(routes!(health::live)) // GET /health/live
        .routes(routes!(health::ready)) // GET /health/ready
        .routes(routes!(health::detailed)) // GET /health/detailed
        .routes(routes!(metrics::render)) // GET /metrics
        .routes(routes!(stats::stats)) // GET /v1/stats
        .routes(routes!(dashboard::page)) // GET /dashboard
        .routes(routes!(dashboard::login)) // POST /dashboard/login
        .routes(routes!(dashboard::logout)) // POST /dashboard/logout
        .routes(routes!(dashboard::job)) // GET /dashboard/jobs/{id}
        .routes(routes!(handlers::list)) // GET /v1/handlers
        .routes(routes!(handlers::rollout)) // POST /v1/handlers/{type}/rollout
        .routes(routes!(handlers::rollback)) // POST /v1/handlers/{type}/rollback
        .routes(routes!(handlers::pause)) // POST /v1/handlers/{type}/pause
        .routes(routes!(handlers::resume)) // POST /v1/handlers/{type}/resume
        .routes(routes!(openapi_json)) // GET /openapi.json
        // The innermost body limit wins: these two take more than the rest.
        .merge(
            OpenApiRouter::new()
                .routes(routes!(handlers::upload)) // POST /v1/handlers/{type}/versions
                .layer(DefaultBodyLimit::max(max_upload_bytes)),
        )
        .merge(
            OpenApiRouter::new()
                .routes(routes!(batch::enqueue_batch)) // POST /v1/jobs/batch
                .layer(DefaultBodyLimit::max(batch::MAX_BATCH_BODY_BYTES)),
        )
}

/// Every route, and the OpenAPI document describing exactly those routes.
pub fn router(state: AppState) -> (Router, OpenApi) {
    let (api, openapi) = route_table(state.settings.max_upload_bytes).split_for_parts();
    // Serialized once; each request patches a copy with what only the running server knows.
    let document = Arc::new(serde_json::to_value(&openapi).expect("the OpenAPI document is plain JSON"));
    let request_id = HeaderName::from_static("x-request-id");
    let cors_layer = cors(&state.settings.cors_origins);
    let router = api
        .route("/functions/v1/{*path}", axum::routing::any(functions::serve))
        // The rest of the customer's Supabase project, for one URL (passthrough.rs).
        .route("/rest/v1/{*path}", axum::routing::any(passthrough::serve))
        .route("/auth/v1/{*path}", axum::routing::any(passthrough::serve))
        .route("/storage/v1/{*path}", axum::routing::any(passthrough::serve))
        .route("/realtime/v1/{*path}", axum::routing::any(passthrough::serve))
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_time))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(axum::Extension(document))
        .layer(axum::middleware::from_fn(metrics::track_http))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(move |request: Request<axum::body::Body>, next: axum::middleware::Next| {
            api_cors(cors_layer.clone(), request, next)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    // The id, method and route only: never the query, headers or body.
                    let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
                    let route = request
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or("unmatched", |path| path.as_str());
                    tracing::info_span!("request", request_id = %id, method = %request.method(), route)
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                .on_failure(log_failure),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(axum::middleware::map_request(keep_safe_request_id))
        .with_state(state);
    (router, openapi)
}

/// Logs a request that failed. A 503 is the service saying "not now" (a
/// type switched off, the database away): a warning, not an error page for
/// the operator; every other 5xx, and a failure to answer at all, is an error.
fn log_failure(class: ServerErrorsFailureClass, latency: std::time::Duration, _span: &tracing::Span) {
    let latency_ms = latency.as_millis();
    match class {
        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => {
            tracing::warn!(status = 503, latency_ms, "request refused: service unavailable");
        }
        ServerErrorsFailureClass::StatusCode(status) => {
            tracing::error!(status = status.as_u16(), latency_ms, "request failed");
        }
        ServerErrorsFailureClass::Error(error) => tracing::error!(%error, latency_ms, "request failed"),
    }
}

/// Serves `router` on `listener` until `shutdown` (see [`server`]), with
/// client addresses available to the per-IP limit.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    settings: server::ServerSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    server::serve(listener, router, settings, shutdown).await
}

/// Bounds how long a handler may take to answer: the request timeout, or for
/// `?wait=` the longest wait plus a margin. (A stream's body is not bounded
/// here: SSE has its own limit.)
async fn limit_time(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let waits = request.uri().query().is_some_and(|query| query.split('&').any(|pair| pair.starts_with("wait=")));
    let settings = &state.settings;
    let limit = if passthrough::is_supabase_path(request.uri().path()) {
        // A legacy function waits for its job; a passed-through call has its own timeout.
        settings.functions_timeout.max(settings.max_wait) + Duration::from_secs(5)
    } else if waits {
        settings.max_wait + Duration::from_secs(5)
    } else {
        settings.server.request_timeout
    };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => axum::response::IntoResponse::into_response(error::ApiError::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            format!("the request took longer than {} s (QUERN_HTTP_REQUEST_TIMEOUT_S); try again", limit.as_secs()),
        )),
    }
}

/// A panic in a handler answers 500 in the usual shape; the process goes on.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    tracing::error!("a request handler panicked");
    axum::response::IntoResponse::into_response(error::ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        "the server failed while handling this request; it has been logged",
    ))
}

/// A client's `X-Request-Id` is kept only when it is short and safe to log
/// (at most 64 letters, digits, `-`, `_`, `.`); any other is replaced by a
/// fresh one, so a client cannot write into the log through it.
async fn keep_safe_request_id<B>(mut request: Request<B>) -> Request<B> {
    let safe = |value: &HeaderValue| {
        let bytes = value.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= 64
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if request.headers().get("x-request-id").is_some_and(|value| !safe(value)) {
        request.headers_mut().remove("x-request-id");
    }
    request
}

fn openapi_base() -> OpenApi {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    let mut openapi = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("quern")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A job host: enqueue jobs, follow them to their end, cancel and retry them. \
                     Every error is `{\"error\": \"…\", \"code\": \"…\"}`.",
                ))
                .build(),
        )
        .build();
    let components = openapi.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
    );
    openapi
}

/// The OpenAPI document of this server, with what only the running server
/// knows filled in: the job types it serves (so a request the document calls
/// valid names one) and how many steps a pipeline may have.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses((status = 200, description = "This document")))]
async fn openapi_json(
    State(state): State<AppState>,
    axum::Extension(document): axum::Extension<Arc<serde_json::Value>>,
) -> axum::Json<serde_json::Value> {
    let mut document = serde_json::Value::clone(&document);
    let types: Vec<serde_json::Value> = state.registry.job_types().into_iter().map(serde_json::Value::from).collect();
    if !types.is_empty() {
        for schema in ["EnqueueBody", "StepBody", "AnalysisRequest"] {
            if let Some(name) = document.pointer_mut(&format!("/components/schemas/{schema}/properties/type")) {
                name["enum"] = serde_json::Value::Array(types.clone());
            }
        }
    }
    if let Some(next) = document.pointer_mut("/components/schemas/EnqueueBody/properties/next") {
        next["maxItems"] = state.queue.settings().max_steps.into();
    }
    axum::Json(document)
}

async fn no_route(method: Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        ErrorCode::NoRoute,
        format!("no route {method} {}: see /openapi.json for the routes", uri.path()),
    )
}

/// CORS on the APIs only (`/v1`, and Supabase's, `/functions/v1`, `/rest/v1`, …): the dashboard, which
/// signs in with a cookie, never answers another origin.
async fn api_cors(
    cors: CorsLayer,
    request: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tower::{Layer, ServiceExt};
    if !(request.uri().path().starts_with("/v1/") || passthrough::is_supabase_path(request.uri().path())) {
        return next.run(request).await;
    }
    match cors.layer(next).oneshot(request).await {
        Ok(response) => axum::response::IntoResponse::into_response(response),
        Err(never) => match never {},
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS])
        // The seed's functions allow exactly the first four; the rest are
        // what supabase-js sends to the APIs passed through.
        .allow_headers(
            [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT]
                .into_iter()
                .chain(
                    ["apikey", "x-client-info"]
                        .into_iter()
                        .chain(passthrough::Api::browser_headers())
                        .map(HeaderName::from_static),
                )
                .collect::<Vec<_>>(),
        )
        // supabase-js reads a count from PostgREST's `Content-Range`.
        .expose_headers([
            HeaderName::from_static(jobs::NOTICE_HEADER),
            HeaderName::from_static("x-request-id"),
            header::CONTENT_RANGE,
        ])
        .max_age(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn boom() -> &'static str {
        panic!("boom")
    }

    #[tokio::test]
    async fn a_handler_that_panics_answers_500_in_the_usual_shape() {
        use tower::ServiceExt;
        let router: Router = Router::new()
            .route("/boom", axum::routing::get(boom))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked));
        let request = axum::http::Request::get("/boom").body(axum::body::Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "internal", "{body}");
    }

    #[test]
    fn the_route_table_names_each_documented_route_beside_it() {
        let mut listed = std::collections::BTreeSet::new();
        for line in include_str!("lib.rs").lines().filter(|line| line.trim_start().starts_with(".routes(routes!(")) {
            let (_, said) = line.split_once("// ").expect("each route line names its methods and path");
            let (methods, path) = said.trim().rsplit_once(' ').expect("methods, then the path");
            for method in methods.split(',') {
                listed.insert((method.trim().to_lowercase(), path.to_string()));
            }
        }
        let (_, document) = route_table(1).split_for_parts();
        let document = serde_json::to_value(&document).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys().filter(|key| *key != "parameters") {
                documented.insert((method.clone(), path.clone()));
            }
        }
        assert_eq!(listed, documented);
    }
}

//! quern's settings, from flags or the environment (flag names mirror the
//! variables: `--data-dir` / `QUERN_DATA_DIR`). Later commands extend this
//! with the seed's names (PORT, WORKER_*, CACHE_*).
//!
//! One file over 400 lines on purpose: every setting's flag, variable and
//! default stand in this one place, so no default is said twice.

use std::path::PathBuf;
use std::time::Duration;

use quern_runtime::RuntimeSettings;
use quern_runtime::config::{ConfigSource, ConfigSourceError};
use quern_runtime::manifest::{Limits, MAX_DEADLINE_S, MAX_MEMORY_MB, MAX_OUTPUT_KB};

/// Settings of the WebAssembly runtime, shared by every command that runs handlers.
#[derive(clap::Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Where quern keeps its data: the embedded database and compiled handlers.
    #[arg(long, env = "QUERN_DATA_DIR", default_value = "quern-data")]
    pub data_dir: PathBuf,
    /// Where compiled handlers are cached [default: <data-dir>/compiled].
    #[arg(long, env = "QUERN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A TOML file of `KEY = "value"` lines: variables offered to the handlers
    /// whose manifests list them. `QUERN_VAR_<KEY>` in the environment offers
    /// one too, and wins over the file.
    #[arg(long, env = "QUERN_HANDLER_CONFIG")]
    pub handler_config: Option<PathBuf>,
    /// Plain environment variables offered to the handlers whose manifests
    /// list them (comma-separated, e.g. `OLLAMA_URL,GEMINI_API_KEY`). No other
    /// variable of the process environment ever reaches a handler.
    #[arg(long, env = "QUERN_HANDLER_ENV", value_name = "NAMES", value_delimiter = ',')]
    pub handler_env: Vec<String>,
    /// Default linear-memory limit per job, for handlers that set none.
    #[arg(long, env = "QUERN_MEMORY_LIMIT_MB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=MAX_MEMORY_MB as i64))]
    pub memory_limit_mb: u32,
    /// Default wall-clock deadline per job, for handlers that set none.
    #[arg(long, env = "QUERN_DEADLINE_S", default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=MAX_DEADLINE_S as i64))]
    pub deadline_s: u32,
    /// Default result-size limit per job, for handlers that set none.
    #[arg(long, env = "QUERN_OUTPUT_LIMIT_KB", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=MAX_OUTPUT_KB as i64))]
    pub output_limit_kb: u32,
}

impl RuntimeArgs {
    pub fn settings(&self) -> Result<RuntimeSettings, ConfigSourceError> {
        let mut config = ConfigSource::environment()?.with_environment_names(&self.handler_env)?;
        if let Some(path) = &self.handler_config {
            config = config.with_file(path)?;
        }
        Ok(RuntimeSettings {
            default_limits: Limits {
                memory_bytes: (self.memory_limit_mb as usize) << 20,
                deadline: Duration::from_secs(self.deadline_s.into()),
                output_bytes: (self.output_limit_kb as usize) << 10,
            },
            config,
            cache_dir: Some(self.cache_dir.clone().unwrap_or_else(|| self.data_dir.join("compiled"))),
            ..RuntimeSettings::default()
        })
    }
}

/// Which database: `DATABASE_URL`, or the embedded SQLite file in the data dir.
#[derive(clap::Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// `postgres://…` (plain or Supabase) or `sqlite://path` [default: sqlite in <data-dir>/quern.db].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Do not apply migrations at start (run `quern migrate` yourself).
    #[arg(long, env = "QUERN_NO_MIGRATE")]
    pub no_migrate: bool,
    /// The most PostgreSQL connections this process opens for jobs and
    /// requests (a few more write what need not wait for the disk).
    #[arg(long, env = "QUERN_DB_POOL_SIZE", default_value_t = quern_store::DEFAULT_POOL_SIZE, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub pool_size: u32,
}

impl DatabaseArgs {
    pub fn url(&self, data_dir: &std::path::Path) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", data_dir.join("quern.db").display()))
    }

    /// Opens the database, with the pool size asked for.
    pub async fn connect(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<std::sync::Arc<dyn quern_store::Store>, quern_store::StoreError> {
        quern_store::connect_pooled(&self.url(data_dir), self.pool_size).await
    }
}

/// A share between 0 (excluded) and 1: a rate above 1 could never be reached,
/// and 0 would fire on the first failure.
fn share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 1.0 => Ok(value),
        Ok(value) => Err(format!("{value} is not a share: give a number above 0 and at most 1 (0.05 is 5 %)")),
        Err(_) => Err(format!("`{text}` is not a number: give a share above 0 and at most 1 (0.05 is 5 %)")),
    }
}

/// Queue and worker settings; the names are the customer's (seed 000, §6).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// This worker's id [default: <hostname>-<pid>].
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Jobs run at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub concurrency: u32,
    /// How often to look for jobs when no wake-up arrives.
    #[arg(long, env = "WORKER_POLL_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub poll_interval_ms: u64,
    /// First retry delay; doubles per attempt, ±20 % jitter.
    #[arg(long, env = "WORKER_RETRY_DELAY_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
    pub retry_delay_ms: u64,
    /// Attempts per job, for types whose manifest sets none.
    #[arg(long, env = "WORKER_MAX_RETRIES", default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub max_attempts: i32,
    /// A job running longer is interrupted and failed.
    #[arg(long, env = "WORKER_STUCK_JOB_TIMEOUT_MS", default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub stuck_job_timeout_ms: u64,
    /// How long a claim holds a job without a heartbeat.
    #[arg(long, env = "QUERN_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(300..=86_400_000))]
    pub lease_ms: u64,
    /// How long running jobs may finish after SIGTERM before they are released.
    #[arg(long, env = "QUERN_SHUTDOWN_GRACE_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub shutdown_grace_s: u64,
    /// Unfinished jobs a user may have at once (0 = no limit).
    #[arg(long, env = "QUERN_MAX_ACTIVE_JOBS_PER_USER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_active_jobs_per_user: u32,
    /// Unfinished jobs service callers may have of their own, for no named
    /// user (0 = no limit); a job for a named user counts against that user's.
    #[arg(long, env = "QUERN_MAX_ACTIVE_JOBS_PER_SERVICE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub max_active_jobs_per_service: u32,
    /// The most steps a pipeline (`next`) may carry after its first job.
    #[arg(long, env = "QUERN_MAX_PIPELINE_STEPS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub max_pipeline_steps: u32,
    /// Cache results of cacheable job types.
    #[arg(long, env = "ENABLE_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_cache: bool,
    /// How long a cached result lives, for types whose manifest sets none.
    #[arg(long, env = "CACHE_TTL_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    pub cache_ttl_hours: u64,
    /// The most claimed jobs a worker holds beyond its running ones; it holds
    /// about 20 ms of work at its jobs' recent speed, up to this (0: claim
    /// only for free slots).
    #[arg(long, env = "QUERN_WORKER_LOCAL_QUEUE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub local_queue: u32,
    /// The most attempt ends a worker writes with one statement and one commit.
    #[arg(long, env = "QUERN_COMPLETION_BATCH_MAX", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub completion_batch_max: u64,
    /// How long a worker's next commit of attempt ends may wait for the ends
    /// of its jobs still running (never when none are running).
    #[arg(long, env = "QUERN_COMPLETION_BATCH_DELAY_MS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub completion_batch_delay_ms: u64,
    /// The handlers directory (`<type>.wasm` + `<type>.toml`), watched for new builds.
    #[arg(long, env = "QUERN_HANDLERS_DIR", default_value = "handlers-dist")]
    pub handlers_dir: PathBuf,
}

impl WorkerArgs {
    pub fn queue_settings(&self) -> quern_queue::QueueSettings {
        quern_queue::QueueSettings {
            retry_base: Duration::from_millis(self.retry_delay_ms),
            default_max_attempts: self.max_attempts,
            lease: Duration::from_millis(self.lease_ms),
            max_unfinished_per_user: (self.max_active_jobs_per_user > 0).then_some(self.max_active_jobs_per_user),
            max_unfinished_per_service: (self.max_active_jobs_per_service > 0)
                .then_some(self.max_active_jobs_per_service),
            cache_enabled: self.enable_cache,
            cache_ttl: Duration::from_secs(self.cache_ttl_hours * 3600),
            max_steps: self.max_pipeline_steps as usize,
        }
    }

    pub fn worker_settings(&self) -> quern_queue::worker::WorkerSettings {
        let defaults = quern_queue::worker::WorkerSettings::default();
        quern_queue::worker::WorkerSettings {
            id: self.worker_id.clone().unwrap_or(defaults.id),
            concurrency: self.concurrency,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            stuck_timeout: Duration::from_millis(self.stuck_job_timeout_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            local_queue: self.local_queue,
            completion: quern_queue::completer::CompletionSettings {
                max_batch: self.completion_batch_max as usize,
                delay: Duration::from_millis(self.completion_batch_delay_ms),
            },
            ..defaults
        }
    }
}

/// The fleet's upkeep, run by whichever process leads it.
#[derive(clap::Args, Debug, Clone)]
pub struct MaintenanceArgs {
    /// How long completed jobs are kept (with their attempts), e.g. `7d`, `12h`, `30s`.
    #[arg(long, env = "QUERN_RETAIN_COMPLETED", default_value = "7d", value_parser = retention_period)]
    pub retain_completed: Duration,
    /// How long cancelled jobs are kept.
    #[arg(long, env = "QUERN_RETAIN_CANCELLED", default_value = "7d", value_parser = retention_period)]
    pub retain_cancelled: Duration,
    /// How long failed jobs are kept.
    #[arg(long, env = "QUERN_RETAIN_FAILED", default_value = "30d", value_parser = retention_period)]
    pub retain_failed: Duration,
    /// How often old jobs and handler versions are pruned and the cache purged.
    #[arg(long, env = "QUERN_UPKEEP_EVERY", default_value = "1m", value_parser = upkeep_period)]
    pub upkeep_every: Duration,
    /// Jobs deleted per statement while pruning.
    #[arg(long, env = "QUERN_PRUNE_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub prune_batch: u32,
    /// Stored handler versions kept per type besides the active, canary and previous ones.
    #[arg(long, env = "QUERN_KEEP_HANDLER_VERSIONS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub keep_handler_versions: u32,
}

impl MaintenanceArgs {
    /// `reap_every` is the worker poll interval: a lapsed lease waits at most that long.
    pub fn settings(&self, reap_every: Duration) -> quern_queue::maintenance::MaintenanceSettings {
        quern_queue::maintenance::MaintenanceSettings {
            reap_every,
            upkeep_every: self.upkeep_every,
            retention: quern_queue::maintenance::Retention {
                completed: self.retain_completed,
                cancelled: self.retain_cancelled,
                failed: self.retain_failed,
            },
            prune_batch: self.prune_batch,
            keep_versions: self.keep_handler_versions,
        }
    }
}

/// A duration like `7d`, `12h` or `30s`, between `bounds`.
fn period(text: &str, bounds: std::ops::RangeInclusive<Duration>) -> Result<Duration, String> {
    let value = humantime::parse_duration(text.trim())
        .map_err(|error| format!("`{text}` is not a duration ({error}): write e.g. 7d, 12h, 30m or 45s"))?;
    if bounds.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{} is out of range: give between {} and {}",
            humantime::format_duration(value),
            humantime::format_duration(*bounds.start()),
            humantime::format_duration(*bounds.end())
        ))
    }
}

fn retention_period(text: &str) -> Result<Duration, String> {
    period(text, Duration::from_secs(1)..=Duration::from_secs(10 * 365 * 24 * 3600))
}

fn upkeep_period(text: &str) -> Result<Duration, String> {
    period(text, Duration::from_millis(100)..=Duration::from_secs(24 * 3600))
}

/// The admin listener: `/health/live`, `/health/ready` and `/metrics` alone.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminArgs {
    /// Serve /health/live, /health/ready and /metrics on this port too
    /// (`quern worker` serves them on PORT without it; 0 picks a free port).
    #[arg(long, env = "QUERN_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// When set, /metrics answers only `Authorization: Bearer <this>`.
    #[arg(long, env = "QUERN_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
}

impl AdminArgs {
    /// The metrics token; an empty one is no token.
    pub fn metrics_token(&self) -> Option<String> {
        self.metrics_token.clone().filter(|token| !token.trim().is_empty())
    }
}

/// The HTTP gateway's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// The port to listen on (0 picks a free one; the log says which).
    #[arg(long, env = "PORT", default_value_t = 3001)]
    pub port: u16,
    /// The address to listen on.
    #[arg(long, env = "QUERN_BIND", default_value = "0.0.0.0")]
    pub bind: std::net::IpAddr,
    /// Verifies HS256 tokens (Supabase's JWT secret). Without it and without
    /// QUERN_JWKS_URL, a development secret is kept in <data-dir>/jwt-secret.
    #[arg(long, env = "QUERN_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The same secret under the name Supabase gives it (QUERN_JWT_SECRET wins).
    #[arg(long, env = "SUPABASE_JWT_SECRET", hide_env_values = true)]
    pub supabase_jwt_secret: Option<String>,
    /// The customer's Supabase project (`https://<ref>.supabase.co`): every
    /// /functions/v1/<name> quern does not serve is passed through to it.
    #[arg(long, env = "SUPABASE_URL")]
    pub supabase_url: Option<url::Url>,
    /// How long a passed-through function may take to answer, in seconds
    /// (for more than 55, raise QUERN_HTTP_IDLE_TIMEOUT_S above it too: an
    /// idle connection is closed after that).
    #[arg(long, env = "QUERN_FUNCTIONS_TIMEOUT_S", default_value_t = 55, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub functions_timeout_s: u64,
    /// Serve the legacy functions that handlers' manifests claim
    /// (`function = "…"`) in quern. Off, they go to SUPABASE_URL, the
    /// customer's own functions; on, they still go there whenever quern
    /// could not answer them in time (no live worker, the type disabled or
    /// paused, or an estimated run longer than QUERN_MAX_WAIT_S).
    #[arg(long, env = "QUERN_SERVE_LEGACY_FUNCTIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub serve_legacy_functions: bool,
    /// The longest a request waits for its job: `?wait=` at most, and a
    /// legacy function served by quern before it answers 202 with the job
    /// (at most 30 s: less than the idle timeout, which would cut a wait).
    #[arg(long, env = "QUERN_MAX_WAIT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=30))]
    pub max_wait_s: u64,
    /// The priority of a premium caller's job that asks for none (1 most urgent … 10).
    #[arg(long, env = "QUERN_PREMIUM_PRIORITY", default_value_t = 2, value_parser = clap::value_parser!(i64).range(1..=10))]
    pub premium_priority: i64,
    /// Event streams (`GET /v1/jobs/{id}/events`) one user may hold open at
    /// once (0 = no cap); service callers are not capped.
    #[arg(long, env = "QUERN_MAX_STREAMS_PER_USER", default_value_t = quern_api::DEFAULT_MAX_STREAMS_PER_USER, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_streams_per_user: u32,
    /// A JWKS URL whose keys verify asymmetric tokens (RS256, ES256, …).
    #[arg(long, env = "QUERN_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "QUERN_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The claim that marks a premium caller, as path=value.
    #[arg(long, env = "QUERN_PREMIUM_CLAIM", default_value = "app_metadata.plan=premium")]
    pub premium_claim: quern_api::auth::PremiumRule,
    /// Enqueues per minute per client IP (0: no limit).
    #[arg(long, env = "QUERN_RATE_LIMIT_PER_MIN", default_value_t = 50)]
    pub rate_limit_per_min: u32,
    /// Proxies in front whose X-Forwarded-For entries are believed: `true`
    /// (one), a count, or their addresses as comma-separated CIDRs.
    #[arg(long, env = "QUERN_TRUST_PROXY", default_value = "false")]
    pub trust_proxy: quern_api::limits::TrustProxy,
    /// Origins allowed by CORS on /v1 and /functions/v1, comma-separated;
    /// `*` (the default, as the seed's functions answer) for any. Requests
    /// carry bearer tokens, never cookies; the dashboard never answers CORS.
    #[arg(long, env = "QUERN_CORS_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub cors_origins: Vec<String>,
    /// Job types whose enqueues are refused (503 type_disabled), comma-separated.
    #[arg(long, env = "QUERN_DISABLED_TYPES", value_delimiter = ',')]
    pub disabled_types: Vec<String>,
    /// Record metrics and serve them at /metrics.
    #[arg(long, env = "ENABLE_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_metrics: bool,
    /// A password that opens /dashboard (a service_role token always does).
    #[arg(long, env = "QUERN_DASHBOARD_PASSWORD", hide_env_values = true)]
    pub dashboard_password: Option<String>,
    /// Alert when more jobs than this are pending.
    #[arg(long, env = "QUERN_ALERT_QUEUE_PENDING", default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    pub alert_queue_pending: i64,
    /// Alert when a worker's last heartbeat is older than this many seconds.
    #[arg(long, env = "QUERN_ALERT_WORKER_OFFLINE_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub alert_worker_offline_s: u64,
    /// Alert when a type's share of failed jobs over the window is above this (0–1).
    #[arg(long, env = "QUERN_ALERT_FAILURE_RATE", default_value_t = 0.05, value_parser = share)]
    pub alert_failure_rate: f64,
    /// The failure-rate window, in seconds.
    #[arg(long, env = "QUERN_ALERT_FAILURE_WINDOW_S", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub alert_failure_window_s: u64,
    /// Jobs of a type that must have ended in the window before its failure rate counts.
    #[arg(long, env = "QUERN_ALERT_FAILURE_MIN_JOBS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub alert_failure_min_jobs: u64,
    /// Alert when a type's completed jobs took longer than this many seconds
    /// at the 95th percentile over the failure-rate window.
    #[arg(long, env = "QUERN_ALERT_P95_LATENCY_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub alert_p95_latency_s: u64,
    /// How often alerts are judged, in milliseconds.
    #[arg(long, env = "QUERN_ALERT_CHECK_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    pub alert_check_ms: u64,
    /// The largest handler upload, in MiB.
    #[arg(long, env = "QUERN_MAX_UPLOAD_MB", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_upload_mb: u32,
    /// Where alert starts and resolves are POSTed as JSON.
    #[arg(long, env = "QUERN_ALERT_WEBHOOK_URL", hide_env_values = true)]
    pub alert_webhook_url: Option<url::Url>,
    /// The URL clients reach this gateway at; when it is https, the
    /// dashboard's session cookie is marked `Secure`.
    #[arg(long, env = "QUERN_PUBLIC_URL")]
    pub public_url: Option<url::Url>,
    /// How long a connection may take to send a request's headers, counted
    /// from its opening for its first request and from the first byte of
    /// each later one.
    #[arg(long, env = "QUERN_HTTP_HEADER_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_header_timeout_s: u64,
    /// How long a kept-alive connection may wait for its next request,
    /// announced to clients in `Keep-Alive: timeout=N` (keep it above the
    /// idle time of clients' pools, and below a load balancer's in front).
    #[arg(long, env = "QUERN_HTTP_KEEP_ALIVE_S", default_value_t = quern_api::server::DEFAULT_KEEP_ALIVE.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_keep_alive_s: u64,
    /// While a request is served, a connection with no bytes moving either
    /// way this long is closed (more than the longest `?wait=`, 30 s; SSE
    /// sends a comment every 15 s).
    #[arg(long, env = "QUERN_HTTP_IDLE_TIMEOUT_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(31..=86_400))]
    pub http_idle_timeout_s: u64,
    /// How long a handler has to answer (a `?wait=` request: its wait plus 5 s).
    #[arg(long, env = "QUERN_HTTP_REQUEST_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_request_timeout_s: u64,
    /// Connections served at once; lowered to what the descriptor limit
    /// leaves room for. Past it, new connections wait until one closes.
    #[arg(long, env = "QUERN_HTTP_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub http_max_connections: u64,
    /// Mark the dashboard's session cookie `Secure` whatever the public URL.
    #[arg(long, env = "QUERN_SECURE_COOKIES", default_value_t = false, action = clap::ArgAction::Set)]
    pub secure_cookies: bool,
}

impl GatewayArgs {
    pub fn settings(&self) -> quern_api::GatewaySettings {
        quern_api::GatewaySettings {
            rate_limit_per_min: (self.rate_limit_per_min > 0).then_some(self.rate_limit_per_min),
            trust_proxy: self.trust_proxy.clone(),
            cors_origins: self.cors_origins.iter().map(|o| o.trim().to_string()).filter(|o| !o.is_empty()).collect(),
            disabled_types: self
                .disabled_types
                .iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            dashboard_password: self.dashboard_password.clone().filter(|p| !p.is_empty()),
            max_upload_bytes: (self.max_upload_mb as usize) << 20,
            secure_cookies: self.secure_cookies || self.public_url.as_ref().is_some_and(|url| url.scheme() == "https"),
            server: quern_api::server::ServerSettings {
                header_timeout: std::time::Duration::from_secs(self.http_header_timeout_s),
                keep_alive: std::time::Duration::from_secs(self.http_keep_alive_s),
                idle_timeout: std::time::Duration::from_secs(self.http_idle_timeout_s),
                request_timeout: std::time::Duration::from_secs(self.http_request_timeout_s),
                max_connections: self.http_max_connections as usize,
            },
            alerts: quern_queue::alerts::AlertSettings {
                queue_pending: self.alert_queue_pending,
                worker_offline: std::time::Duration::from_secs(self.alert_worker_offline_s),
                failure_rate: self.alert_failure_rate,
                failure_window: std::time::Duration::from_secs(self.alert_failure_window_s),
                failure_min_jobs: self.alert_failure_min_jobs,
                p95_latency: std::time::Duration::from_secs(self.alert_p95_latency_s),
                check_every: std::time::Duration::from_millis(self.alert_check_ms),
                webhook: self.alert_webhook_url.as_ref().map(url::Url::to_string),
            },
            functions_upstream: self.supabase_url.clone(),
            functions_timeout: std::time::Duration::from_secs(self.functions_timeout_s),
            serve_legacy_functions: self.serve_legacy_functions,
            premium_priority: self.premium_priority,
            max_streams_per_user: (self.max_streams_per_user > 0).then_some(self.max_streams_per_user),
            max_wait: std::time::Duration::from_secs(self.max_wait_s),
        }
    }

    /// The token settings, and whether a development secret was created just
    /// now (a first start: worth telling the user how to call in).
    pub fn auth_settings(
        &self,
        data_dir: &std::path::Path,
    ) -> std::io::Result<(quern_api::auth::AuthSettings, DevSecret)> {
        let (secret, dev) = match (self.jwt_secret.as_ref().or(self.supabase_jwt_secret.as_ref()), &self.jwks_url) {
            (Some(secret), _) => (Some(secret.as_bytes().to_vec()), DevSecret::None),
            (None, Some(_)) => (None, DevSecret::None),
            (None, None) => {
                let (secret, created) = dev_secret(data_dir)?;
                (Some(secret), if created { DevSecret::Created } else { DevSecret::Existing })
            }
        };
        let settings = quern_api::auth::AuthSettings {
            hs256_secret: secret,
            jwks_url: self.jwks_url.clone(),
            audience: self.jwt_audience.clone(),
            premium: self.premium_claim.clone(),
        };
        Ok((settings, dev))
    }
}

/// Whether tokens are checked against the development secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevSecret {
    None,
    Existing,
    /// Created at this start.
    Created,
}

/// The development HS256 secret in `<data-dir>/jwt-secret`, created (mode
/// 0600) when missing. Returns it and whether it was created now.
pub fn dev_secret(data_dir: &std::path::Path) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("jwt-secret");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok((text.trim().as_bytes().to_vec(), false)),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    quern_runtime::engine::create_private_dir(data_dir)?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    file.write_all(secret.as_bytes())?;
    Ok((secret.into_bytes(), true))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Gateway {
        #[command(flatten)]
        gateway: GatewayArgs,
    }

    #[test]
    fn supabase_s_name_for_the_jwt_secret_is_read_and_quern_s_wins() {
        let data = std::env::temp_dir();
        let args = Gateway::try_parse_from(["quern", "--supabase-jwt-secret", "from-supabase"]).unwrap().gateway;
        let (settings, dev) = args.auth_settings(&data).unwrap();
        assert_eq!((settings.hs256_secret.as_deref(), dev), (Some(&b"from-supabase"[..]), DevSecret::None));
        let both = ["quern", "--supabase-jwt-secret", "from-supabase", "--jwt-secret", "from-quern"];
        let (settings, _) = Gateway::try_parse_from(both).unwrap().gateway.auth_settings(&data).unwrap();
        assert_eq!(settings.hs256_secret.as_deref(), Some(&b"from-quern"[..]));
    }
}

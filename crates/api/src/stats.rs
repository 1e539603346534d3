//! `/v1/stats`: the figures behind the dashboard, for scripts too. Ids,
//! types, timings and errors only: never a job's input or result.

use crate::error::ErrorCode;
use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::body::ApiQuery;
use super::dashboard::Operator;
use super::error::{ApiError, ErrorBody};
use super::health::HandlerView;
use crate::records::FailedJobView;
use quern_queue::alerts::Alert;
use quern_queue::stats::{self, Bucket, TypeStats};

const FAILURES_SHOWN: u32 = 10;
const MIN_WINDOW: Duration = Duration::from_secs(60);
const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// How far back the rates, times and throughput look: whole minutes,
    /// hours or days (`15m`, `1h` (default), `1d`), from 1 minute to 7 days.
    #[param(pattern = r"^(([1-9][0-9]{0,3}|100[0-7][0-9]|10080)m|([1-9][0-9]?|1[0-5][0-9]|16[0-8])h|[1-7]d)$")]
    pub window: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    pub generated_at: DateTime<Utc>,
    pub window_s: u64,
    /// Jobs in each status, all time.
    pub jobs: BTreeMap<String, i64>,
    pub throughput: Throughput,
    /// Per type, over the window.
    pub types: Vec<TypeStats>,
    pub workers: Vec<WorkerView>,
    /// Handler versions loaded by this gateway.
    pub handlers: Vec<HandlerView>,
    /// The latest jobs that failed for good.
    pub failures: Vec<FailedJobView>,
    pub cache: CacheStatsView,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Throughput {
    /// The width of one bucket (60 s for the default hour).
    pub bucket_s: f64,
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    pub id: String,
    pub host: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub heartbeat_age_s: f64,
    pub active_jobs: i32,
    pub concurrency: i32,
    /// Silent longer than the offline alert's threshold.
    pub offline: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CacheStatsView {
    pub enabled: bool,
    pub entries: i64,
    pub hits: i64,
    /// hits / (hits + entries): every entry was written by one job that
    /// missed, so this is the share of cacheable requests the cache answered.
    pub hit_rate: Option<f64>,
}

/// Counts, throughput, per-type times and rates, workers, failures, cache and alerts (service role).
#[utoipa::path(get, path = "/v1/stats", tag = "meta", security(("bearer" = [])), params(StatsQuery),
    responses(
        (status = 200, body = Stats),
        (status = 400, description = "A window that does not parse or is out of range", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    ))]
pub async fn stats(
    State(state): State<AppState>,
    _operator: Operator,
    query: Result<ApiQuery<StatsQuery>, ApiError>,
) -> Result<axum::Json<Stats>, ApiError> {
    let ApiQuery(query) = query?;
    let window = parse_window(query.window.as_deref())?;
    Ok(axum::Json(collect(&state, window).await?))
}

fn parse_window(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text else { return Ok(Duration::from_secs(3600)) };
    let unparsed = || {
        ApiError::bad_request(
            ErrorCode::InvalidWindow,
            format!("window `{text}` is not a whole number of minutes, hours or days: write e.g. 15m, 1h, 1d"),
        )
    };
    let (count, unit) = text.split_at(text.char_indices().last().map_or(0, |(at, _)| at));
    let unit_s = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(unparsed()),
    };
    if count.is_empty() || count.starts_with('0') || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(unparsed());
    }
    let window = count.parse::<u64>().ok().and_then(|n| n.checked_mul(unit_s)).map(Duration::from_secs);
    let window = window.ok_or_else(unparsed)?;
    if !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidWindow,
            format!("window `{text}` is out of range: 1m to 7d"),
        ));
    }
    Ok(window)
}

pub async fn collect(state: &AppState, window: Duration) -> Result<Stats, ApiError> {
    let store = state.queue.store();
    let now = Utc::now();
    let since = now - chrono::TimeDelta::from_std(window).unwrap_or(chrono::TimeDelta::hours(1));
    let counts = store.outcome_counts(since).await?;
    let run_times = store.run_times(since, false).await?;
    let slices = store.ended_per_slice(since, now, stats::bucket_width(since, now)).await?;
    let by_status = store.count_by_status().await?;
    let cache = store.cache_stats(now).await?;
    let offline_after = state.alerts.settings().worker_offline;
    let workers = store
        .workers()
        .await?
        .into_iter()
        .map(|w| {
            let age = (now - w.last_heartbeat_at).to_std().unwrap_or_default();
            WorkerView {
                heartbeat_age_s: age.as_secs_f64(),
                offline: age > offline_after,
                id: w.id,
                host: w.host,
                version: w.version,
                started_at: w.started_at,
                last_heartbeat_at: w.last_heartbeat_at,
                active_jobs: w.active_jobs,
                concurrency: w.concurrency,
            }
        })
        .collect();
    let mut jobs: BTreeMap<String, i64> =
        ["pending", "processing", "completed", "failed", "cancelled"].into_iter().map(|s| (s.to_string(), 0)).collect();
    for (status, count) in by_status {
        jobs.insert(status.as_str().to_string(), count);
    }
    Ok(Stats {
        generated_at: now,
        window_s: window.as_secs(),
        jobs,
        throughput: Throughput {
            bucket_s: stats::bucket_width(since, now).num_milliseconds() as f64 / 1e3,
            buckets: stats::throughput(&slices, since, now),
        },
        types: stats::by_type(&counts, &run_times),
        workers,
        handlers: HandlerView::all(&state.registry),
        failures: store.recent_failures(FAILURES_SHOWN).await?.into_iter().map(Into::into).collect(),
        cache: CacheStatsView {
            enabled: state.queue.settings().cache_enabled,
            entries: cache.entries,
            hits: cache.hits,
            hit_rate: (cache.hits + cache.entries > 0).then(|| cache.hits as f64 / (cache.hits + cache.entries) as f64),
        },
        alerts: state.alerts.active(),
    })
}

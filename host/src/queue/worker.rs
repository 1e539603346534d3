//! A worker: claims jobs up to its concurrency, runs each on the active
//! handler version, and ends each attempt in the store. Alongside, it checks
//! whether running jobs were cancelled (also by a direct database update),
//! flushes their progress, renews their leases, heartbeats its `quern_workers`
//! row, reaps lapsed leases of dead workers and purges the expired cache.
//!
//! On shutdown it stops claiming, lets running jobs finish within the grace
//! period, then interrupts the rest and releases them to `pending` unharmed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Queue;
use super::cache_key::cache_key;
use crate::runtime::registry::Registry;
use crate::runtime::{JobSpec, Outcome, RunOptions};
use crate::store::{AttemptEnd, CacheWrite, Job, StoreError, Transition, WorkerRow};
use crate::telemetry::{JOB_DURATION, JOB_PICKUP, JOBS_COMPLETED, JOBS_FAILED, JOBS_RETRIED};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// WORKER_ID.
    pub id: String,
    /// WORKER_CONCURRENCY: jobs run at once.
    pub concurrency: u32,
    /// WORKER_POLL_INTERVAL_MS: how often to look for jobs without a wake-up.
    pub poll_interval: Duration,
    /// How often running jobs are checked for cancellation.
    pub cancel_check_interval: Duration,
    /// WORKER_STUCK_JOB_TIMEOUT_MS: a job running longer is interrupted and failed.
    pub stuck_timeout: Duration,
    /// QUERN_SHUTDOWN_GRACE_S: how long running jobs may finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            id: default_worker_id(),
            concurrency: 5,
            poll_interval: Duration::from_millis(1000),
            cancel_check_interval: Duration::from_millis(250),
            stuck_timeout: Duration::from_millis(300_000),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// `<hostname>-<pid>`: unique per process on a machine.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "worker".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

/// Why a running job's instance was interrupted.
const STOP_NONE: u8 = 0;
const STOP_CANCELLED: u8 = 1;
const STOP_SHUTDOWN: u8 = 2;

/// The latest progress of a job, not yet written.
type ProgressSlot = Arc<Mutex<Option<(u8, String)>>>;

/// What the worker holds of a running job; cheap to clone.
#[derive(Clone)]
struct Running {
    cancel: CancellationToken,
    stop: Arc<AtomicU8>,
    progress: ProgressSlot,
}

struct Shared {
    queue: Arc<Queue>,
    registry: Arc<Registry>,
    settings: WorkerSettings,
    running: Mutex<HashMap<Uuid, Running>>,
    started_at: chrono::DateTime<Utc>,
}

pub struct Worker {
    shared: Arc<Shared>,
}

/// A read-only view of a running worker, for health checks.
#[derive(Clone)]
pub struct WorkerProbe(Arc<Shared>);

impl WorkerProbe {
    pub fn id(&self) -> &str {
        &self.0.settings.id
    }

    /// Jobs running right now.
    pub fn active_jobs(&self) -> usize {
        self.0.lock_running().len()
    }
}

impl Worker {
    pub fn new(queue: Arc<Queue>, registry: Arc<Registry>, settings: WorkerSettings) -> Self {
        let shared = Shared { queue, registry, settings, running: Mutex::default(), started_at: Utc::now() };
        Self { shared: Arc::new(shared) }
    }

    pub fn probe(&self) -> WorkerProbe {
        WorkerProbe(self.shared.clone())
    }

    /// Runs until `shutdown` is cancelled, then drains.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let shared = self.shared;
        let store = shared.queue.store().clone();
        let settings = &shared.settings;
        // The database answered at start-up; if it blinks now, keep trying
        // rather than take the whole process down with it.
        let mut wakeups = loop {
            let ready = match shared.heartbeat().await {
                Ok(()) => store.wakeups().await,
                Err(error) => Err(error),
            };
            match ready {
                Ok(wakeups) => break wakeups,
                Err(error) if !shutdown.is_cancelled() => {
                    tracing::warn!(%error, "worker cannot reach the database yet; trying again");
                    tokio::time::sleep(settings.poll_interval.max(Duration::from_millis(500))).await;
                }
                Err(error) => return Err(error),
            }
        };
        let maintenance_stop = CancellationToken::new();
        let maintenance = tokio::spawn(maintain(shared.clone(), maintenance_stop.clone()));
        tracing::info!(worker_id = %settings.id, concurrency = settings.concurrency, backend = store.backend(), "worker started");

        let mut tasks = JoinSet::new();
        while !shutdown.is_cancelled() {
            // Reap every finished task first, so one claim fills every free
            // slot: claiming a job at a time would cost a round trip per job.
            while tasks.try_join_next().is_some() {}
            let free = settings.concurrency.saturating_sub(tasks.len() as u32);
            let mut claimed = 0;
            if free > 0 {
                let now = Utc::now();
                let lease_until = now + shared.queue.settings().lease;
                // Only types this worker can run: another worker (or a later
                // deploy) takes the rest, instead of attempts being burnt here.
                let types = shared.registry.claimable_types();
                match store.claim(&settings.id, free, now, lease_until, Some(&types)).await {
                    Ok(jobs) => {
                        claimed = jobs.len() as u32;
                        for job in jobs {
                            let waited = (now - job.run_at.max(job.created_at)).to_std().unwrap_or_default();
                            metrics::histogram!(JOB_PICKUP, "type" => job.job_type.clone())
                                .record(waited.as_secs_f64());
                            let running = shared.track(job.id);
                            tasks.spawn(run_job(shared.clone(), job, running));
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming jobs failed; trying again after the poll interval"),
                }
            }
            if free > 0 && claimed == free {
                continue; // there may be more waiting
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = wakeups.wait(), if free > claimed => {}
                () = tokio::time::sleep(settings.poll_interval) => {}
            }
        }

        tracing::info!(worker_id = %settings.id, running = tasks.len(), "shutting down: no new claims");
        let drained =
            tokio::time::timeout(settings.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(running = tasks.len(), "grace period over: releasing the remaining jobs to pending");
            for running in shared.lock_running().values() {
                running.stop.store(STOP_SHUTDOWN, Ordering::SeqCst);
                running.cancel.cancel();
            }
            while tasks.join_next().await.is_some() {}
        }
        maintenance_stop.cancel();
        let _ = maintenance.await;
        // A worker that stops cleanly leaves no row: only one that vanished
        // (killed, its machine gone) stays behind, silent, for the offline alert.
        if let Err(error) = shared.queue.store().remove_worker(&settings.id).await {
            tracing::warn!(%error, "could not remove the worker's row; it reads as offline until forgotten");
        }
        tracing::info!(worker_id = %settings.id, "worker stopped");
        Ok(())
    }
}

impl Shared {
    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Running>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn track(&self, id: Uuid) -> Running {
        let running = Running {
            cancel: CancellationToken::new(),
            stop: Arc::new(AtomicU8::new(STOP_NONE)),
            progress: Arc::default(),
        };
        self.lock_running().insert(id, running.clone());
        running
    }

    fn running_ids(&self) -> Vec<Uuid> {
        self.lock_running().keys().copied().collect()
    }

    fn stop(&self, ids: &[Uuid], why: u8) {
        let running = self.lock_running();
        for id in ids {
            if let Some(job) = running.get(id)
                && job.stop.compare_exchange(STOP_NONE, why, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            {
                job.cancel.cancel();
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let row = WorkerRow {
            id: self.settings.id.clone(),
            host: std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default(),
            started_at: self.started_at,
            last_heartbeat_at: Utc::now(),
            active_jobs: self.lock_running().len() as i32,
            concurrency: self.settings.concurrency as i32,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        self.queue.store().upsert_worker(&row).await
    }
}

async fn run_job(shared: Arc<Shared>, job: Job, running: Running) {
    let Running { cancel, stop, progress } = running;
    // Forgets the job when this task ends, even by a panic: its lease then
    // lapses and the reaper runs it again instead of it being renewed forever.
    let _untrack = Untrack(shared.clone(), job.id);
    let started = Instant::now();
    let handler = shared.registry.pick(&job.job_type, &job.id);
    let outcome = match &handler {
        None => Outcome::Retry { reason: format!("no handler is loaded for job type `{}`", job.job_type), delay: None },
        Some(handler) => {
            let spec = JobSpec {
                id: job.id.to_string(),
                input: job.input.to_string(),
                attempt: job.attempts.max(1) as u32,
                max_attempts: job.max_attempts.max(1) as u32,
            };
            let options = RunOptions {
                cancel,
                progress: Some(Arc::new(move |p| {
                    *progress.lock().unwrap_or_else(|e| e.into_inner()) = Some((p.percent, p.message));
                })),
                transport: None,
            };
            let stuck = shared.settings.stuck_timeout;
            match tokio::time::timeout(stuck, shared.registry.runtime().run(handler, &spec, options)).await {
                Ok(report) => report.outcome,
                Err(_) => Outcome::Failed {
                    reason: format!(
                        "interrupted: ran longer than WORKER_STUCK_JOB_TIMEOUT_MS ({} ms)",
                        stuck.as_millis()
                    ),
                },
            }
        }
    };

    let now = Utc::now();
    let queue = &shared.queue;
    let mut transition = match (outcome, stop.load(Ordering::SeqCst)) {
        (Outcome::Cancelled, STOP_SHUTDOWN) => Transition::Release,
        (Outcome::Cancelled, _) => Transition::Cancelled,
        (outcome, _) => queue.transition(&job, outcome, started.elapsed(), now),
    };
    if let Transition::Complete { next: Some(next), .. } = &mut transition
        && let Some(next_handler) = shared.registry.get(&next.job_type)
    {
        next.max_attempts = next_handler.manifest.max_attempts as i32;
    }
    if let (Transition::Complete { cache, .. }, Some(handler)) = (&mut transition, &handler)
        && handler.manifest.cacheable
        && queue.settings().cache_enabled
    {
        let ttl = handler
            .manifest
            .cache_ttl_hours
            .map_or(queue.settings().cache_ttl, |h| Duration::from_secs(u64::from(h) * 3600));
        *cache = Some(CacheWrite {
            key: cache_key(&job.job_type, &handler.version, &job.input),
            job_type: job.job_type.clone(),
            expires_at: now + ttl,
        });
    }
    let end = AttemptEnd {
        job_id: job.id,
        worker_id: shared.settings.id.clone(),
        attempt: job.attempts,
        handler_version: handler.as_ref().map(|h| h.version.to_string()),
        started_at: job.started_at.unwrap_or(now),
        transition,
    };
    if finish_with_retries(&shared, &end).await {
        record_outcome(&job.job_type, &end.transition, started.elapsed());
    }
}

/// Counts a recorded attempt end in the metrics.
fn record_outcome(job_type: &str, transition: &Transition, elapsed: Duration) {
    let name = match transition {
        Transition::Complete { .. } => JOBS_COMPLETED,
        Transition::Retry { .. } => JOBS_RETRIED,
        Transition::Fail { .. } => JOBS_FAILED,
        // Counted where the cancel was asked for; a release is not an outcome.
        Transition::Cancelled | Transition::Release => return,
    };
    metrics::counter!(name, "type" => job_type.to_string()).increment(1);
    metrics::histogram!(JOB_DURATION, "type" => job_type.to_string()).record(elapsed.as_secs_f64());
}

struct Untrack(Arc<Shared>, Uuid);

impl Drop for Untrack {
    fn drop(&mut self) {
        self.0.lock_running().remove(&self.1);
    }
}

/// Ends the attempt, retrying while the database is unavailable for as long
/// as a lease lasts: until then no other worker runs the job, so a result
/// recorded late is still the only one. Past that the reaper may have handed
/// the job on; the store refuses a stale end, so trying longer gains nothing.
async fn finish_with_retries(shared: &Shared, end: &AttemptEnd) -> bool {
    let give_up = Instant::now() + shared.queue.settings().lease;
    let mut delay = Duration::from_millis(100);
    loop {
        match shared.queue.store().finish_attempt(end, Utc::now()).await {
            Ok(recorded) => {
                if !recorded {
                    tracing::info!(job_id = %end.job_id, "the job was cancelled or reclaimed meanwhile; its result is not written");
                }
                return recorded;
            }
            Err(error) if Instant::now() + delay < give_up => {
                tracing::warn!(job_id = %end.job_id, %error, "could not record the end of an attempt; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => {
                tracing::error!(job_id = %end.job_id, %error, "gave up recording the end of an attempt; the job runs again when its lease lapses");
                return false;
            }
        }
    }
}

/// A worker row silent this long is dropped: whatever alert it raised has
/// been seen, and the dashboard should not list it forever.
const FORGET_SILENT_WORKERS_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(24);

async fn maintain(shared: Arc<Shared>, stop: CancellationToken) {
    let settings = &shared.settings;
    let queue = &shared.queue;
    let store = queue.store().clone();
    let renew_every = queue.settings().lease / 3;
    let (mut last_renew, mut last_reap, mut last_purge) = (Instant::now(), Instant::now(), Instant::now());
    let mut tick = tokio::time::interval(settings.cancel_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids = shared.running_ids();
        match store.released(&settings.id, &ids).await {
            Ok(gone) => shared.stop(&gone, STOP_CANCELLED),
            Err(error) => tracing::warn!(%error, "checking running jobs for cancellation failed"),
        }
        flush_progress(&shared).await;
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            let lease_until = Utc::now() + queue.settings().lease;
            match store.renew_leases(&settings.id, &shared.running_ids(), lease_until).await {
                Ok(gone) => shared.stop(&gone, STOP_CANCELLED),
                Err(error) => tracing::warn!(%error, "renewing leases failed"),
            }
            if let Err(error) = shared.heartbeat().await {
                tracing::warn!(%error, "worker heartbeat failed");
            }
        }
        if last_reap.elapsed() >= settings.poll_interval {
            last_reap = Instant::now();
            if let Err(error) = queue.reap_expired_leases().await {
                tracing::warn!(%error, "reaping lapsed leases failed");
            }
        }
        if last_purge.elapsed() >= Duration::from_secs(60) {
            last_purge = Instant::now();
            match store.purge_cache(Utc::now()).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "purged expired cache entries"),
                Err(error) => tracing::warn!(%error, "purging the cache failed"),
            }
            match store.forget_workers(Utc::now() - FORGET_SILENT_WORKERS_AFTER).await {
                Ok(0) => {}
                Ok(forgotten) => tracing::info!(forgotten, "forgot workers silent for a day"),
                Err(error) => tracing::warn!(%error, "forgetting long-silent workers failed"),
            }
        }
    }
}

async fn flush_progress(shared: &Shared) {
    let pending: Vec<(Uuid, (u8, String))> = shared
        .lock_running()
        .iter()
        .filter_map(|(id, running)| Some((*id, running.progress.lock().unwrap_or_else(|e| e.into_inner()).take()?)))
        .collect();
    for (id, (percent, message)) in pending {
        if let Err(error) =
            shared.queue.store().set_progress(id, &shared.settings.id, i16::from(percent), &message).await
        {
            tracing::warn!(job_id = %id, %error, "could not save progress");
        }
    }
}

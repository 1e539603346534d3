//! A worker: claims jobs in batches, keeps them in a small local queue,
//! runs up to its concurrency at once on the active handler version, and
//! hands each attempt's end to its [`Completer`], which writes many ends
//! with one commit. Alongside, it checks whether held jobs were cancelled
//! (also by a direct database update), flushes their progress, renews their
//! leases (one statement for all of them) and heartbeats its `quern_workers`
//! row. (Reaping the leases of dead workers is the fleet's, in
//! [`super::maintenance`].)
//!
//! The local queue is sized by what the worker observes: it holds about
//! [`LOCAL_QUEUE_HORIZON`] of work at the recent speed of its jobs, at most
//! `local_queue` jobs. Jobs of a few microseconds are claimed hundreds at a
//! time; jobs of seconds only as slots free up, so no worker hoards work
//! another could start.
//!
//! On shutdown it stops claiming, releases the jobs it has not started,
//! lets running jobs finish within the grace period, then interrupts the
//! rest and releases them to `pending` unharmed.
//!
//! One file over 400 lines on purpose: the claim loop, the local queue, the cancel
//! watch and the lease renewal share one worker's state and are read together;
//! the batched writes already live apart in `completer`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::future::{BoxFuture, OptionFuture};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Queue;
use super::cache_key::cache_key;
use super::completer::{Completer, Completion, CompletionSettings};
use crate::telemetry::{JOB_DURATION, JOB_LATENCY, JOB_PICKUP, JOBS_COMPLETED, JOBS_FAILED, JOBS_RETRIED};
use quern_runtime::registry::Registry;
use quern_runtime::{JobSpec, Outcome, RunOptions};
use quern_store::{AttemptEnd, CacheWrite, Claim, EndWritten, Job, Progress, StoreError, Transition, WorkerRow};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// WORKER_ID.
    pub id: String,
    /// WORKER_CONCURRENCY: jobs run at once.
    pub concurrency: u32,
    /// WORKER_POLL_INTERVAL_MS: how often to look for jobs without a wake-up.
    pub poll_interval: Duration,
    /// How often held jobs are checked for cancellation.
    pub cancel_check_interval: Duration,
    /// WORKER_STUCK_JOB_TIMEOUT_MS: a job running longer is interrupted and failed.
    pub stuck_timeout: Duration,
    /// QUERN_SHUTDOWN_GRACE_S: how long running jobs may finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// QUERN_WORKER_LOCAL_QUEUE: the most claimed jobs held beyond the
    /// running ones (0: claim only for free slots).
    pub local_queue: u32,
    pub completion: CompletionSettings,
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
            local_queue: 500,
            completion: CompletionSettings::default(),
        }
    }
}

/// `<hostname>-<pid>`: unique per process on a machine.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let host = if host.is_empty() { "worker".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

/// How much work, at the recent speed of its jobs, a worker keeps claimed
/// beyond its running jobs: enough to never wait on a claim between jobs of
/// a few microseconds, and nothing for jobs that run for seconds.
pub const LOCAL_QUEUE_HORIZON: Duration = Duration::from_millis(20);

/// The jobs a claim returned, and how many it asked for.
type Claimed = Result<(Vec<Job>, u32), StoreError>;

/// Why a held job's instance was interrupted.
const STOP_NONE: u8 = 0;
const STOP_CANCELLED: u8 = 1;
const STOP_SHUTDOWN: u8 = 2;

/// The latest progress of a job, not yet written.
type ProgressSlot = Arc<Mutex<Option<(u8, String)>>>;

/// What the worker holds of a claimed job, queued or running; cheap to clone.
#[derive(Clone)]
struct Held {
    cancel: CancellationToken,
    stop: Arc<AtomicU8>,
    progress: ProgressSlot,
}

struct Shared {
    queue: Arc<Queue>,
    registry: Arc<Registry>,
    settings: WorkerSettings,
    /// Every claimed job whose end is not committed yet: its lease is renewed
    /// and its cancellation watched.
    held: Mutex<HashMap<Uuid, Held>>,
    /// One permit per running job.
    slots: Arc<Semaphore>,
    /// When each running job started (at most `concurrency` of them).
    running_since: Mutex<HashMap<Uuid, Instant>>,
    /// Signalled when a job gives its slot back.
    slot_freed: Notify,
    completer: Completer,
    /// Recent mean time from a job's start to its end being handed in, in
    /// microseconds (0 until the first job ends).
    mean_run_micros: AtomicU64,
    /// Attempt ends committed since the worker started.
    ended: AtomicU64,
    /// Claim statements made, and the jobs they returned.
    claims: AtomicU64,
    claimed: AtomicU64,
    started_at: chrono::DateTime<Utc>,
    /// The types last recorded as served (quern_job_types), so the heartbeat
    /// writes them only when they change.
    types_noted: Mutex<Vec<String>>,
}

pub struct Worker {
    shared: Arc<Shared>,
}

/// Counts of a worker's claim and completion statements, for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStatements {
    pub claims: u64,
    pub claimed: u64,
    pub completion_commits: u64,
    pub ended: u64,
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
        self.0.running()
    }

    /// Jobs it runs at once at most.
    pub fn concurrency(&self) -> usize {
        self.0.settings.concurrency as usize
    }

    /// Attempt ends handed to the completer and not yet committed.
    pub fn ends_waiting(&self) -> usize {
        self.0.completer.waiting()
    }

    /// Attempt ends this worker has committed since it started.
    pub fn ended(&self) -> u64 {
        self.0.ended.load(Ordering::Relaxed)
    }

    /// What the worker asked of the database so far.
    pub fn statements(&self) -> WorkerStatements {
        WorkerStatements {
            claims: self.0.claims.load(Ordering::Relaxed),
            claimed: self.0.claimed.load(Ordering::Relaxed),
            completion_commits: self.0.completer.flushes(),
            ended: self.ended(),
        }
    }
}

impl Worker {
    pub fn new(queue: Arc<Queue>, registry: Arc<Registry>, settings: WorkerSettings) -> Self {
        let completer = Completer::start(queue.store().clone(), settings.completion.clone(), queue.settings().lease);
        let shared = Shared {
            slots: Arc::new(Semaphore::new(settings.concurrency as usize)),
            running_since: Mutex::default(),
            slot_freed: Notify::new(),
            held: Mutex::default(),
            mean_run_micros: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            started_at: Utc::now(),
            types_noted: Mutex::default(),
            completer,
            queue,
            registry,
            settings,
        };
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
        let mut local: VecDeque<Job> = VecDeque::new();
        // At most one claim in flight, polled here beside the jobs (not a
        // task of its own: an idle worker's claim starts the moment it wakes).
        let mut claim: Option<BoxFuture<'static, Claimed>> = None;
        // Set when a claim came back short: look again only when woken or polled.
        let mut drained = false;
        // The local queue's size, looked at again at most once a millisecond.
        let mut target = (Instant::now(), 0);
        let mut poll = tokio::time::interval(settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !shutdown.is_cancelled() {
            while tasks.try_join_next().is_some() {}
            // Start queued jobs while slots are free.
            while !local.is_empty() {
                let Ok(slot) = shared.slots.clone().try_acquire_owned() else { break };
                if let Some(job) = local.pop_front() {
                    tasks.spawn(run_job(shared.clone(), job, slot));
                }
            }
            if claim.is_none() && !drained {
                if target.0.elapsed() >= Duration::from_millis(1) {
                    target = (Instant::now(), shared.local_queue_target());
                }
                let wanted = (settings.concurrency as usize + target.1).saturating_sub(local.len() + shared.running());
                if wanted > 0 && local.len() <= target.1 / 2 {
                    claim = Some(Box::pin(shared.clone().claim(wanted as u32)));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                Some(claimed) = OptionFuture::from(claim.as_mut()) => {
                    claim = None;
                    match claimed {
                        Ok((jobs, asked)) => {
                            drained = jobs.len() < asked as usize;
                            local.extend(jobs);
                        }
                        Err(error) => {
                            drained = true;
                            tracing::warn!(%error, "claiming jobs failed; trying again after the poll interval");
                        }
                    }
                }
                () = shared.slot_freed.notified() => {}
                () = wakeups.wait() => drained = false,
                _ = poll.tick() => drained = false,
            }
        }

        tracing::info!(worker_id = %settings.id, running = shared.running(), queued = local.len(), "shutting down: no new claims");
        if let Some(claim) = claim.take()
            && let Ok((jobs, _)) = claim.await
        {
            local.extend(jobs);
        }
        // Jobs not started go back at once, for another worker to take.
        for job in local.drain(..) {
            tasks.spawn(release_unstarted(shared.clone(), job));
        }
        let drained =
            tokio::time::timeout(settings.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(running = tasks.len(), "grace period over: releasing the remaining jobs to pending");
            for held in shared.lock_held().values() {
                held.stop.store(STOP_SHUTDOWN, Ordering::SeqCst);
                held.cancel.cancel();
            }
            while tasks.join_next().await.is_some() {}
        }
        shared.completer.close().await;
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
    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
        lock(&self.held)
    }

    /// Jobs running right now (holding a slot).
    fn running(&self) -> usize {
        (self.settings.concurrency as usize).saturating_sub(self.slots.available_permits())
    }

    /// How many claimed jobs to keep queued beyond the running ones: what
    /// the slots that will turn over within the horizon get through in it at
    /// the recent speed. A slot turns over soon if it is free or its job has
    /// run less than twice the recent mean: a slot held by a longer job
    /// counts for nothing, so a worker busy with slow jobs claims only for
    /// its free slots and hoards nothing another worker could start.
    fn local_queue_target(&self) -> usize {
        let mean = Duration::from_micros(self.mean_run_micros.load(Ordering::Relaxed));
        if mean.is_zero() || self.settings.local_queue == 0 || mean >= LOCAL_QUEUE_HORIZON {
            return 0; // unknown speed, or jobs too slow to be worth claiming ahead
        }
        let soon = (mean * 2).min(LOCAL_QUEUE_HORIZON);
        let turning = lock(&self.running_since).values().filter(|started| started.elapsed() < soon).count();
        let slots = (turning + self.slots.available_permits()) as u128;
        let per_slot = LOCAL_QUEUE_HORIZON.as_micros() / mean.as_micros().max(1);
        (per_slot.saturating_mul(slots) as usize).min(self.settings.local_queue as usize)
    }

    /// Folds one job's run time into the recent mean (weight 1/16).
    fn observe_run(&self, took: Duration) {
        let sample = (took.as_micros() as u64).max(1);
        let _ = self.mean_run_micros.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mean| {
            Some(if mean == 0 { sample } else { mean - mean / 16 + sample / 16 })
        });
    }

    /// Claims up to `wanted` jobs (only of types this worker can run: another
    /// worker, or a later deploy, takes the rest instead of attempts being
    /// burnt here) and holds them.
    async fn claim(self: Arc<Self>, wanted: u32) -> Claimed {
        let now = Utc::now();
        let lease_until = now + self.queue.settings().lease;
        let types = self.registry.claimable_types();
        let jobs = self
            .queue
            .store()
            .claim(&Claim { worker_id: &self.settings.id, limit: wanted, now, lease_until, types: &types })
            .await?;
        self.completer.expect(jobs.len());
        self.claims.fetch_add(1, Ordering::Relaxed);
        self.claimed.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let mut held = self.lock_held();
        for job in &jobs {
            let waited = (now - job.run_at.max(job.created_at)).to_std().unwrap_or_default();
            metrics::histogram!(JOB_PICKUP, "type" => job.job_type.clone()).record(waited.as_secs_f64());
            held.insert(
                job.id,
                Held {
                    cancel: CancellationToken::new(),
                    stop: Arc::new(AtomicU8::new(STOP_NONE)),
                    progress: Arc::default(),
                },
            );
        }
        Ok((jobs, wanted))
    }

    fn held_ids(&self) -> Vec<Uuid> {
        self.lock_held().keys().copied().collect()
    }

    fn held(&self, id: &Uuid) -> Option<Held> {
        self.lock_held().get(id).cloned()
    }

    fn stop(&self, ids: &[Uuid], why: u8) {
        let held = self.lock_held();
        for id in ids {
            if let Some(job) = held.get(id)
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
            active_jobs: self.running() as i32,
            concurrency: self.settings.concurrency as i32,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        self.queue.store().upsert_worker(&row).await?;
        let mut types = self.registry.job_types();
        types.sort();
        let noted = self.types_noted.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if types != noted {
            self.queue.store().note_types(&types, row.last_heartbeat_at).await?;
            *self.types_noted.lock().unwrap_or_else(|e| e.into_inner()) = types;
        }
        Ok(())
    }

    /// Hands an end to the completer and waits for its commit; the job stays
    /// held (its lease renewed) until then.
    async fn finish(&self, end: AttemptEnd, job_type: &str, elapsed: Duration, created_at: chrono::DateTime<Utc>) {
        let (job_id, counted) = (end.job_id, outcome_metric(&end.transition));
        let completes = matches!(end.transition, Transition::Complete { .. });
        let completion = self.completer.finish(end).await;
        if let Completion::Written(EndWritten::Recorded | EndWritten::Cancelled) = completion {
            self.ended.fetch_add(1, Ordering::Relaxed);
        }
        match completion {
            Completion::Written(EndWritten::Recorded) => {
                if let Some(name) = counted {
                    metrics::counter!(name, "type" => job_type.to_string()).increment(1);
                    metrics::histogram!(JOB_DURATION, "type" => job_type.to_string()).record(elapsed.as_secs_f64());
                }
                if completes {
                    let latency = (Utc::now() - created_at).to_std().unwrap_or_default();
                    metrics::histogram!(JOB_LATENCY, "type" => job_type.to_string()).record(latency.as_secs_f64());
                }
            }
            Completion::Written(EndWritten::Cancelled) => {
                tracing::info!(%job_id, "the job was cancelled meanwhile; its result is not written");
            }
            Completion::Written(EndWritten::Stale) => {
                tracing::info!(%job_id, "the job was reclaimed meanwhile; its result is not written");
            }
            Completion::GaveUp => {}
        }
    }
}

/// Runs one claimed job inside a span naming it, so every line logged while
/// it runs (the host's, outbound HTTP, the store's) says which job it was.
async fn run_job(shared: Arc<Shared>, job: Job, slot: OwnedSemaphorePermit) {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "job",
        job_id = %job.id,
        job_type = %job.job_type,
        attempt = job.attempts,
        handler_version = tracing::field::Empty,
    );
    run_job_in_span(shared, job, slot).instrument(span).await;
}

async fn run_job_in_span(shared: Arc<Shared>, job: Job, slot: OwnedSemaphorePermit) {
    // Forgets the job when this task ends, even by a panic: its lease then
    // lapses and the reaper runs it again instead of it being renewed forever.
    let _unhold = Unhold(shared.clone(), job.id);
    let Some(Held { cancel, stop, progress }) = shared.held(&job.id) else { return };
    let progress_slot = progress.clone();
    let started = Instant::now();
    lock(&shared.running_since).insert(job.id, started);
    let handler = shared.registry.pick(&job.job_type, &job.id);
    if let Some(handler) = &handler {
        tracing::Span::current().record("handler_version", handler.version.as_ref());
    }
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

    // The end supersedes any progress not yet saved.
    progress_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
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
            key: cache_key(&job.job_type, &handler.version, handler.manifest.cache_scope, &job.user_id, &job.input),
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
        ended_at: now,
        transition,
    };
    // The slot is free as soon as the handler is done: the next job starts
    // while this end waits for its commit.
    let elapsed = started.elapsed();
    shared.observe_run(elapsed);
    lock(&shared.running_since).remove(&job.id);
    drop(slot);
    shared.slot_freed.notify_one();
    shared.finish(end, &job.job_type, elapsed, job.created_at).await;
}

/// Gives a claimed job that never started back to `pending` (shutdown).
async fn release_unstarted(shared: Arc<Shared>, job: Job) {
    let _unhold = Unhold(shared.clone(), job.id);
    let now = Utc::now();
    let end = AttemptEnd {
        job_id: job.id,
        worker_id: shared.settings.id.clone(),
        attempt: job.attempts,
        handler_version: None,
        started_at: job.started_at.unwrap_or(now),
        ended_at: now,
        transition: Transition::Release,
    };
    shared.finish(end, &job.job_type, Duration::ZERO, job.created_at).await;
}

/// The counter a recorded attempt end adds to.
fn outcome_metric(transition: &Transition) -> Option<&'static str> {
    match transition {
        Transition::Complete { .. } => Some(JOBS_COMPLETED),
        Transition::Retry { .. } => Some(JOBS_RETRIED),
        Transition::Fail { .. } => Some(JOBS_FAILED),
        // Counted where the cancel was asked for; a release is not an outcome.
        Transition::Cancelled | Transition::Release => None,
    }
}

/// A poisoned lock still holds consistent maps: every critical section here
/// is a single insert, remove or read.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Unhold(Arc<Shared>, Uuid);

impl Drop for Unhold {
    fn drop(&mut self) {
        self.0.lock_held().remove(&self.1);
        // A job whose task panicked mid-run frees its start time too.
        lock(&self.0.running_since).remove(&self.1);
    }
}

async fn maintain(shared: Arc<Shared>, stop: CancellationToken) {
    let settings = &shared.settings;
    let queue = &shared.queue;
    let store = queue.store().clone();
    let renew_every = queue.settings().lease / 3;
    let mut last_renew = Instant::now();
    let mut tick = tokio::time::interval(settings.cancel_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ids = shared.held_ids();
        match store.released(&settings.id, &ids).await {
            Ok(gone) => shared.stop(&gone, STOP_CANCELLED),
            Err(error) => tracing::warn!(%error, "checking running jobs for cancellation failed"),
        }
        flush_progress(&shared).await;
        if last_renew.elapsed() >= renew_every {
            last_renew = Instant::now();
            let lease_until = Utc::now() + queue.settings().lease;
            match store.renew_leases(&settings.id, &shared.held_ids(), lease_until).await {
                Ok(gone) => shared.stop(&gone, STOP_CANCELLED),
                Err(error) => tracing::warn!(%error, "renewing leases failed"),
            }
            if let Err(error) = shared.heartbeat().await {
                tracing::warn!(%error, "worker heartbeat failed");
            }
        }
    }
}

async fn flush_progress(shared: &Shared) {
    let pending: Vec<Progress> = shared
        .lock_held()
        .iter()
        .filter_map(|(id, held)| {
            let (percent, message) = held.progress.lock().unwrap_or_else(|e| e.into_inner()).take()?;
            Some(Progress { job_id: *id, percent: i16::from(percent), message })
        })
        .collect();
    if let Err(error) = shared.queue.store().set_progress(&shared.settings.id, &pending).await {
        tracing::warn!(jobs = pending.len(), %error, "could not save progress");
    }
}

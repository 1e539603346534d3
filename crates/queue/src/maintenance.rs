//! The fleet's upkeep, done by the [`Leader`] alone: lapsed leases reaped
//! (every reap interval), and once per upkeep interval the expired cache
//! purged, long-silent workers forgotten, finished jobs past their retention
//! deleted and stored handler versions nothing can return to deleted.
//!
//! Jobs are deleted a bounded batch per statement with a pause between
//! batches, so a prune of a million rows never holds up an enqueue or a
//! claim for longer than one batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Queue;
use super::leader::Leader;
use quern_store::{PruneCutoffs, StoreError};

#[derive(Debug, Clone)]
pub struct MaintenanceSettings {
    /// How often lapsed leases are looked for (WORKER_POLL_INTERVAL_MS).
    pub reap_every: Duration,
    /// How often the rest runs (QUERN_UPKEEP_EVERY).
    pub upkeep_every: Duration,
    pub retention: Retention,
    /// Jobs deleted per statement (QUERN_PRUNE_BATCH).
    pub prune_batch: u32,
    /// Stored versions kept per type beyond those a rollout names
    /// (QUERN_KEEP_HANDLER_VERSIONS).
    pub keep_versions: u32,
}

/// How long finished jobs are kept, by how they finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub completed: Duration,
    pub cancelled: Duration,
    pub failed: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        Self { completed: 7 * DAY, cancelled: 7 * DAY, failed: 30 * DAY }
    }
}

impl Default for MaintenanceSettings {
    fn default() -> Self {
        Self {
            reap_every: Duration::from_secs(1),
            upkeep_every: Duration::from_secs(60),
            retention: Retention::default(),
            prune_batch: 1000,
            keep_versions: 5,
        }
    }
}

/// A worker row silent this long is dropped: whatever alert it raised has
/// been seen, and the dashboard should not list it forever.
const FORGET_SILENT_WORKERS_AFTER: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// The pause between two prune batches, in which enqueues and claims run.
const BETWEEN_BATCHES: Duration = Duration::from_millis(5);

pub struct Maintenance {
    queue: Arc<Queue>,
    settings: MaintenanceSettings,
}

impl Maintenance {
    pub fn new(queue: Arc<Queue>, settings: MaintenanceSettings) -> Self {
        Self { queue, settings }
    }

    /// Runs until `stop`, acting only while `leader` leads.
    pub fn spawn(self, leader: Leader, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.settings.reap_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first upkeep runs soon after start, not an interval later.
            let mut last_upkeep: Option<Instant> = None;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !leader.is_leader() {
                    continue;
                }
                if let Err(error) = self.queue.reap_expired_leases().await {
                    tracing::warn!(%error, "reaping lapsed leases failed");
                }
                if last_upkeep.is_none_or(|last| last.elapsed() >= self.settings.upkeep_every) {
                    last_upkeep = Some(Instant::now());
                    self.upkeep(&stop).await;
                }
            }
        })
    }

    /// Purges, forgets and prunes once; each part logs its own failure.
    pub async fn upkeep(&self, stop: &CancellationToken) {
        let store = self.queue.store();
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
        match self.prune_jobs(stop).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "deleted finished jobs past their retention"),
            Err(error) => tracing::warn!(%error, "deleting old jobs failed; trying again next upkeep"),
        }
        match store.prune_handler_versions(self.settings.keep_versions).await {
            Ok(deleted) => {
                for (job_type, version) in deleted {
                    tracing::info!(%job_type, %version, "deleted a stored handler version no rollout can return to");
                }
            }
            Err(error) => tracing::warn!(%error, "deleting old handler versions failed"),
        }
    }

    /// Deletes every finished job past its retention, a batch at a time, and
    /// returns how many.
    pub async fn prune_jobs(&self, stop: &CancellationToken) -> Result<u64, StoreError> {
        let retention = self.settings.retention;
        let now = Utc::now();
        let before = |keep: Duration| {
            chrono::TimeDelta::from_std(keep)
                .ok()
                .and_then(|keep| now.checked_sub_signed(keep))
                .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
        };
        let cutoffs = PruneCutoffs {
            completed: before(retention.completed),
            cancelled: before(retention.cancelled),
            failed: before(retention.failed),
        };
        let mut deleted = 0;
        loop {
            let batch = self.queue.store().prune_jobs(&cutoffs, self.settings.prune_batch).await?;
            deleted += batch;
            if batch < u64::from(self.settings.prune_batch) || stop.is_cancelled() {
                return Ok(deleted);
            }
            tokio::time::sleep(BETWEEN_BATCHES).await;
        }
    }
}

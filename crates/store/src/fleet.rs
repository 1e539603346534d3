//! Workers and the maintenance lead: [`FleetStore`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A worker's row in `quern_workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub active_jobs: i32,
    pub concurrency: i32,
    pub version: String,
}

/// The maintenance lead, held while this lives (see [`quern_queue::leader`]).
#[async_trait]
pub trait LeaderLock: Send {
    /// Fails when the lock may have been lost (its connection broke).
    async fn check(&mut self) -> Result<(), StoreError>;
}

/// SQLite's lead: the one process serving the file always holds it.
pub struct SoleProcess;

#[async_trait]
impl LeaderLock for SoleProcess {
    async fn check(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The fleet: worker rows and the maintenance lead.
#[async_trait]
pub trait FleetStore: Send + Sync {
    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError>;

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError>;

    /// Records that a worker serves these job types, as of `now`.
    async fn note_types(&self, types: &[String], now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Removes a worker's row: it stopped cleanly and is not missed.
    async fn remove_worker(&self, id: &str) -> Result<(), StoreError>;

    /// Removes rows of workers silent since before `before` (long dead:
    /// killed, never stopped); returns how many.
    async fn forget_workers(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Takes the maintenance lead if no other process holds it.
    async fn try_lead(&self) -> Result<Option<Box<dyn LeaderLock>>, StoreError>;
}

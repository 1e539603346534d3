//! Stored handler versions and rollouts: [`VersionStore`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{StoreError, Wakeups};

/// A handler version as uploaded: the component and its manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub job_type: String,
    pub version: String,
    pub sha256: String,
    pub component: Vec<u8>,
    /// `handler.toml`, as uploaded.
    pub manifest: String,
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
}

/// A stored version without its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    #[serde(rename = "type")]
    pub job_type: String,
    pub version: String,
    /// The sha256 of the component alone.
    pub sha256: String,
    pub size_bytes: i64,
    pub uploaded_by: String,
    pub uploaded_at: DateTime<Utc>,
}

/// A type's rollout: the version serving it, the one before (for a
/// rollback), a canary taking `canary_percent` of jobs, and the pause flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    #[serde(rename = "type")]
    pub job_type: String,
    pub active_version: Option<String>,
    pub previous_version: Option<String>,
    pub canary_version: Option<String>,
    pub canary_percent: i16,
    pub paused: bool,
}

/// Handler versions and their rollouts.
#[async_trait]
pub trait VersionStore: Send + Sync {
    /// Deletes the stored handler versions no rollout names (active,
    /// canary, previous) that are not among the `keep_newest` uploads of
    /// their type; returns each as (type, version).
    async fn prune_handler_versions(&self, keep_newest: u32) -> Result<Vec<(String, String)>, StoreError>;

    /// Stores an uploaded version; `false` when that version was there already.
    async fn put_version(&self, version: &StoredVersion) -> Result<bool, StoreError>;

    /// One stored version with its bytes.
    async fn version(&self, job_type: &str, version: &str) -> Result<Option<StoredVersion>, StoreError>;

    /// Every stored version, without bytes, newest first.
    async fn versions(&self) -> Result<Vec<VersionInfo>, StoreError>;

    /// Every type's rollout.
    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;

    /// Writes a type's rollout and tells every worker and gateway.
    async fn put_rollout(&self, rollout: &Rollout, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Writes `next` only if the stored rollout of its type is still
    /// `expected` (`None`: none is stored); false when it changed meanwhile.
    /// Every process hears of a write, as with [`Store::put_rollout`].
    async fn swap_rollout(
        &self,
        expected: Option<&Rollout>,
        next: &Rollout,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Wakes when any rollout changes (may be spurious; poll as well).
    async fn rollout_changes(&self) -> Result<Box<dyn Wakeups>, StoreError>;
}

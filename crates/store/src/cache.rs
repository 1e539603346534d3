//! The result cache: [`CacheStore`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::{CacheWrite, StoreError};

/// A cached result.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub response: Value,
    pub hit_count: i64,
    pub last_hit_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
}

/// The result cache at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CacheStats {
    /// Rows, live or expired but not yet purged.
    pub entries: i64,
    /// Rows still live.
    pub live: i64,
    /// Hits counted across all rows.
    pub hits: i64,
}

/// Hits on one cache entry, counted in memory and written together.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheHits {
    pub key: String,
    pub count: i64,
    pub last_hit_at: DateTime<Utc>,
}

/// The result cache.
#[async_trait]
pub trait CacheStore: Send + Sync {
    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError>;

    /// A live cached result. A read: the hit is counted apart, with
    /// [`CacheStore::count_cache_hits`], so serving a cached result takes no
    /// write (on SQLite, not the single writer).
    async fn cache_lookup(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError>;

    /// Adds hits to their entries (an entry purged meanwhile is skipped);
    /// concurrent counts add up. Relaxed: a count lost in a database crash
    /// is harmless.
    async fn count_cache_hits(&self, hits: &[CacheHits]) -> Result<(), StoreError>;

    /// A cache row as it is, without counting a hit.
    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError>;

    /// Keeps `response` under `entry.key` until `entry.expires_at`,
    /// replacing what was there.
    async fn cache_put(&self, entry: &CacheWrite, response: &Value, now: DateTime<Utc>) -> Result<(), StoreError>;

    /// Deletes expired cache rows; returns how many.
    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

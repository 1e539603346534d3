//! The result cache: [`CacheStore`].

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::StoreError;

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

/// The result cache.
#[async_trait]
pub trait CacheStore: Send + Sync {
    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError>;

    /// A live cached result; counts the hit atomically.
    async fn cache_hit(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError>;

    /// A cache row as it is, without counting a hit.
    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError>;

    async fn cache_put(
        &self,
        key: &str,
        job_type: &str,
        response: &Value,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Deletes expired cache rows; returns how many.
    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

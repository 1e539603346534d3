//! The result cache, on either backend.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{Backend, Role};
use crate::rows::{Columns, FromColumns};
use crate::{CacheEntry, CacheHits, CacheStats, CacheStore, CacheWrite, StoreError};

#[async_trait]
impl<B: Backend> CacheStore for B {
    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT count(*) AS entries, count(*) FILTER (WHERE expires_at > $1) AS live, \
                 CAST(coalesce(sum(hit_count), 0) AS bigint) AS hits FROM quern_cache",
                &[now.into()],
            )
            .await?;
        let Some(row) = rows.first() else { return Ok(CacheStats::default()) };
        Ok(CacheStats { entries: row.plain("entries")?, live: row.plain("live")?, hits: row.plain("hits")? })
    }

    async fn cache_lookup(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError> {
        let rows = self
            .fetch(
                Role::Lookup,
                "SELECT response FROM quern_cache WHERE cache_key = $1 AND expires_at > $2",
                &[key.into(), now.into()],
            )
            .await?;
        rows.first().map(|row| row.json("response")).transpose()
    }

    async fn count_cache_hits(&self, hits: &[CacheHits]) -> Result<(), StoreError> {
        // One statement per entry: hits concentrate on few entries, and the
        // caller has already folded each entry's hits into one count.
        for hit in hits {
            self.execute(
                Role::Relaxed,
                "UPDATE quern_cache SET hit_count = hit_count + $2, \
                 last_hit_at = CASE WHEN last_hit_at > $3 THEN last_hit_at ELSE $3 END WHERE cache_key = $1",
                &[hit.key.as_str().into(), hit.count.into(), hit.last_hit_at.into()],
            )
            .await?;
        }
        Ok(())
    }

    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT response, hit_count, last_hit_at, expires_at FROM quern_cache WHERE cache_key = $1",
                &[key.into()],
            )
            .await?;
        rows.first().map(CacheEntry::from_columns).transpose()
    }

    async fn cache_put(&self, entry: &CacheWrite, response: &Value, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.execute(
            Role::Write,
            "INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (cache_key) DO UPDATE SET response = excluded.response, expires_at = excluded.expires_at",
            &[(&entry.key).into(), (&entry.job_type).into(), response.into(), entry.expires_at.into(), now.into()],
        )
        .await?;
        Ok(())
    }

    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(Role::Write, "DELETE FROM quern_cache WHERE expires_at <= $1", &[now.into()]).await
    }
}

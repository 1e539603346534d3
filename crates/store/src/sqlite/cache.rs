//! The result cache, on SQLite.

use super::*;
use crate::CacheStore;

#[async_trait]
impl CacheStore for SqliteStore {
    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS entries, count(*) FILTER (WHERE expires_at > ?1) AS live, \
             coalesce(sum(hit_count), 0) AS hits FROM quern_cache",
        )
        .bind(micros(now))
        .fetch_one(&self.reader)
        .await?;
        Ok(CacheStats { entries: row.try_get("entries")?, live: row.try_get("live")?, hits: row.try_get("hits")? })
    }

    async fn cache_hit(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError> {
        let response: Option<String> = sqlx::query_scalar(
            "UPDATE quern_cache SET hit_count = hit_count + 1, last_hit_at = ?2 \
             WHERE cache_key = ?1 AND expires_at > ?2 RETURNING response",
        )
        .bind(key)
        .bind(micros(now))
        .fetch_optional(&self.writer)
        .await?;
        response.as_deref().map(json).transpose()
    }

    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let row =
            sqlx::query("SELECT response, hit_count, last_hit_at, expires_at FROM quern_cache WHERE cache_key = ?1")
                .bind(key)
                .fetch_optional(&self.reader)
                .await?;
        row.as_ref().map(CacheEntry::from_columns).transpose()
    }

    async fn cache_put(
        &self,
        key: &str,
        job_type: &str,
        response: &Value,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (cache_key) DO UPDATE SET response = excluded.response, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(job_type)
        .bind(response.to_string())
        .bind(micros(expires_at))
        .bind(micros(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM quern_cache WHERE expires_at <= ?1")
            .bind(micros(now))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

//! The result cache, on PostgreSQL.

use super::*;
use crate::CacheStore;

#[async_trait]
impl CacheStore for PostgresStore {
    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS entries, count(*) FILTER (WHERE expires_at > $1) AS live, \
             coalesce(sum(hit_count), 0)::bigint AS hits FROM quern_cache",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(CacheStats { entries: row.try_get("entries")?, live: row.try_get("live")?, hits: row.try_get("hits")? })
    }

    async fn cache_hit(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError> {
        Ok(sqlx::query_scalar(
            "UPDATE quern_cache SET hit_count = hit_count + 1, last_hit_at = $2 \
             WHERE cache_key = $1 AND expires_at > $2 RETURNING response",
        )
        .bind(key)
        .bind(now)
        .fetch_optional(&self.relaxed)
        .await?)
    }

    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let row =
            sqlx::query("SELECT response, hit_count, last_hit_at, expires_at FROM quern_cache WHERE cache_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
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
            "INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (cache_key) DO UPDATE SET response = EXCLUDED.response, expires_at = EXCLUDED.expires_at",
        )
        .bind(key)
        .bind(job_type)
        .bind(response)
        .bind(expires_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM quern_cache WHERE expires_at <= $1").bind(now).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }
}

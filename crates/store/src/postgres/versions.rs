//! Handler versions and their rollouts, on PostgreSQL.

use super::*;
use crate::VersionStore;

#[async_trait]
impl VersionStore for PostgresStore {
    async fn prune_handler_versions(&self, keep_newest: u32) -> Result<Vec<(String, String)>, StoreError> {
        // A version is among the newest `keep_newest` of its type when fewer
        // than that many others were uploaded at or after it.
        let rows: Vec<(String, String)> = sqlx::query_as(
            "DELETE FROM quern_handler_versions AS v \
             WHERE NOT EXISTS (SELECT 1 FROM quern_handler_rollouts AS r WHERE r.type = v.type \
                               AND v.version IN (r.active_version, r.canary_version, r.previous_version)) \
               AND (SELECT count(*) FROM quern_handler_versions AS newer WHERE newer.type = v.type \
                    AND newer.uploaded_at >= v.uploaded_at AND newer.version <> v.version) >= $1 \
             RETURNING v.type, v.version",
        )
        .bind(i64::from(keep_newest))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn put_version(&self, version: &StoredVersion) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO quern_handler_versions (type, version, sha256, component, manifest, size_bytes, uploaded_by, \
             uploaded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (type, version) DO NOTHING",
        )
        .bind(&version.job_type)
        .bind(&version.version)
        .bind(&version.sha256)
        .bind(&version.component)
        .bind(&version.manifest)
        .bind(version.component.len() as i64)
        .bind(&version.uploaded_by)
        .bind(version.uploaded_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn version(&self, job_type: &str, version: &str) -> Result<Option<StoredVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT type, version, sha256, component, manifest, uploaded_by, uploaded_at FROM quern_handler_versions \
             WHERE type = $1 AND version = $2",
        )
        .bind(job_type)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(StoredVersion::from_columns).transpose()
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT type, version, sha256, size_bytes, uploaded_by, uploaded_at FROM quern_handler_versions \
             ORDER BY uploaded_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(VersionInfo::from_columns).collect()
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let rows = sqlx::query(
            "SELECT type, active_version, previous_version, canary_version, canary_percent, paused \
             FROM quern_handler_rollouts ORDER BY type",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Rollout::from_columns).collect()
    }

    async fn put_rollout(&self, rollout: &Rollout, now: DateTime<Utc>) -> Result<(), StoreError> {
        // The write and the NOTIFY commit together: whoever hears of the
        // change reads it.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO quern_handler_rollouts (type, active_version, previous_version, canary_version, \
             canary_percent, paused, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (type) DO UPDATE SET \
             active_version = EXCLUDED.active_version, previous_version = EXCLUDED.previous_version, \
             canary_version = EXCLUDED.canary_version, canary_percent = EXCLUDED.canary_percent, \
             paused = EXCLUDED.paused, updated_at = EXCLUDED.updated_at",
        )
        .bind(&rollout.job_type)
        .bind(&rollout.active_version)
        .bind(&rollout.previous_version)
        .bind(&rollout.canary_version)
        .bind(rollout.canary_percent)
        .bind(rollout.paused)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(ROLLOUTS_CHANNEL)
            .bind(&rollout.job_type)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn swap_rollout(
        &self,
        expected: Option<&Rollout>,
        next: &Rollout,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let query = match expected {
            None => sqlx::query(
                "INSERT INTO quern_handler_rollouts (type, active_version, previous_version, canary_version, \
                 canary_percent, paused, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (type) DO NOTHING",
            ),
            // The row as it was read: every column a step changes.
            Some(_) => sqlx::query(
                "UPDATE quern_handler_rollouts SET active_version = $2, previous_version = $3, canary_version = $4, \
                 canary_percent = $5, paused = $6, updated_at = $7 \
                 WHERE type = $1 AND active_version IS NOT DISTINCT FROM $8 \
                   AND previous_version IS NOT DISTINCT FROM $9 AND canary_version IS NOT DISTINCT FROM $10 \
                   AND canary_percent = $11 AND paused = $12",
            ),
        };
        let query = query
            .bind(&next.job_type)
            .bind(&next.active_version)
            .bind(&next.previous_version)
            .bind(&next.canary_version)
            .bind(next.canary_percent)
            .bind(next.paused)
            .bind(now);
        let query = match expected {
            None => query,
            Some(expected) => query
                .bind(&expected.active_version)
                .bind(&expected.previous_version)
                .bind(&expected.canary_version)
                .bind(expected.canary_percent)
                .bind(expected.paused),
        };
        let written = query.execute(&mut *tx).await?.rows_affected() == 1;
        if !written {
            return Ok(false);
        }
        sqlx::query("SELECT pg_notify($1, $2)").bind(ROLLOUTS_CHANNEL).bind(&next.job_type).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn rollout_changes(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(ROLLOUTS_CHANNEL).await?;
        Ok(Box::new(PgWakeups { listener }))
    }
}

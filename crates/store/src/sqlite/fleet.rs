//! The fleet: worker rows and the maintenance lead, on SQLite.

use super::*;
use crate::FleetStore;

#[async_trait]
impl FleetStore for SqliteStore {
    async fn try_lead(&self) -> Result<Option<Box<dyn crate::LeaderLock>>, StoreError> {
        Ok(Some(Box::new(crate::SoleProcess)))
    }

    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO quern_workers (id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO UPDATE SET host = excluded.host, \
             started_at = excluded.started_at, last_heartbeat_at = excluded.last_heartbeat_at, \
             active_jobs = excluded.active_jobs, concurrency = excluded.concurrency, version = excluded.version",
        )
        .bind(&worker.id)
        .bind(&worker.host)
        .bind(micros(worker.started_at))
        .bind(micros(worker.last_heartbeat_at))
        .bind(worker.active_jobs)
        .bind(worker.concurrency)
        .bind(&worker.version)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version FROM quern_workers ORDER BY id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(WorkerRow::from_columns).collect()
    }

    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM quern_workers WHERE id = ?1").bind(id).execute(&self.writer).await?;
        Ok(())
    }

    async fn forget_workers(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM quern_workers WHERE last_heartbeat_at < ?1")
            .bind(micros(before))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

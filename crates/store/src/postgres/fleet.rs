//! The fleet: worker rows and the maintenance lead, on PostgreSQL.

use super::*;
use crate::FleetStore;

#[async_trait]
impl FleetStore for PostgresStore {
    async fn try_lead(&self) -> Result<Option<Box<dyn crate::LeaderLock>>, StoreError> {
        // A connection of its own: the lock lives exactly as long as it. The
        // key names the schema, so fleets on other schemas of the same
        // database do not compete.
        let mut candidate = self.candidate.lock().await;
        let mut connection = match candidate.take() {
            Some(connection) => connection,
            None => PgConnection::connect_with(&self.pool.connect_options()).await?,
        };
        // A broken connection is dropped here (the `?`); the next try opens another.
        let took: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext(current_schema() || '.quern_maintenance'))")
                .fetch_one(&mut connection)
                .await?;
        if took {
            Ok(Some(Box::new(AdvisoryLock(connection))))
        } else {
            *candidate = Some(connection);
            Ok(None)
        }
    }

    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO quern_workers (id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, \
             started_at = EXCLUDED.started_at, last_heartbeat_at = EXCLUDED.last_heartbeat_at, \
             active_jobs = EXCLUDED.active_jobs, concurrency = EXCLUDED.concurrency, version = EXCLUDED.version",
        )
        .bind(&worker.id)
        .bind(&worker.host)
        .bind(worker.started_at)
        .bind(worker.last_heartbeat_at)
        .bind(worker.active_jobs)
        .bind(worker.concurrency)
        .bind(&worker.version)
        .execute(&self.relaxed)
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version FROM quern_workers ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(WorkerRow::from_columns).collect()
    }

    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM quern_workers WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    async fn forget_workers(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM quern_workers WHERE last_heartbeat_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

//! Worker rows, on either backend (the maintenance lead is each backend's).

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Backend, Role, mapped};
use crate::{FleetStore, LeaderLock, StoreError, WorkerRow};

#[async_trait]
impl<B: Backend> FleetStore for B {
    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError> {
        // A heartbeat lost in a database crash is harmless: relaxed.
        self.execute(
            Role::Relaxed,
            "INSERT INTO quern_workers (id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET host = excluded.host, \
             started_at = excluded.started_at, last_heartbeat_at = excluded.last_heartbeat_at, \
             active_jobs = excluded.active_jobs, concurrency = excluded.concurrency, version = excluded.version",
            &[
                (&worker.id).into(),
                (&worker.host).into(),
                worker.started_at.into(),
                worker.last_heartbeat_at.into(),
                worker.active_jobs.into(),
                worker.concurrency.into(),
                (&worker.version).into(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn note_types(&self, types: &[String], now: DateTime<Utc>) -> Result<(), StoreError> {
        for job_type in types {
            self.execute(
                Role::Relaxed,
                "INSERT INTO quern_job_types (type, last_seen_at) VALUES ($1, $2) \
                 ON CONFLICT (type) DO UPDATE SET last_seen_at = excluded.last_seen_at",
                &[job_type.into(), now.into()],
            )
            .await?;
        }
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version FROM quern_workers \
                 ORDER BY id",
                &[],
            )
            .await?;
        mapped(&rows)
    }

    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        self.execute(Role::Write, "DELETE FROM quern_workers WHERE id = $1", &[id.into()]).await?;
        Ok(())
    }

    async fn forget_workers(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.execute(Role::Write, "DELETE FROM quern_workers WHERE last_heartbeat_at < $1", &[before.into()]).await
    }

    async fn try_lead(&self) -> Result<Option<Box<dyn LeaderLock>>, StoreError> {
        self.take_lead().await
    }
}

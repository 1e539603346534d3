//! Counts and times read for health, metrics and the dashboard, on PostgreSQL.

use super::*;
use crate::StatsStore;

#[async_trait]
impl StatsStore for PostgresStore {
    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError> {
        let rows = sqlx::query("SELECT type, status, count(*) AS n FROM quern_jobs WHERE status IN ('pending', 'processing') GROUP BY type, status ORDER BY type, status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(DepthRow::from_columns).collect()
    }

    async fn outcome_counts(&self, since: DateTime<Utc>) -> Result<Vec<OutcomeCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT j.type, a.handler_version, a.outcome, count(*) AS n FROM quern_job_attempts a \
             JOIN quern_jobs j ON j.id = a.job_id WHERE a.ended_at >= $1 \
             GROUP BY j.type, a.handler_version, a.outcome",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(OutcomeCount::from_columns).collect()
    }

    async fn run_times(&self, since: DateTime<Utc>, per_version: bool) -> Result<Vec<RunTimes>, StoreError> {
        // percentile_disc is the nearest-rank percentile.
        let rows = sqlx::query(
            "SELECT j.type, CASE WHEN $2 THEN a.handler_version END AS handler_version, \
             avg(EXTRACT(EPOCH FROM a.ended_at - a.started_at) * 1000)::float8 AS avg_ms, \
             (percentile_disc(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM a.ended_at - a.started_at) * 1000))::float8 \
             AS p95_ms FROM quern_job_attempts a JOIN quern_jobs j ON j.id = a.job_id \
             WHERE a.ended_at >= $1 AND a.outcome = 'completed' GROUP BY 1, 2",
        )
        .bind(since)
        .bind(per_version)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(RunTimes::from_columns).collect()
    }

    async fn ended_per_slice(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        slice: TimeDelta,
    ) -> Result<Vec<EndedInSlice>, StoreError> {
        let rows = sqlx::query(
            "SELECT floor(EXTRACT(EPOCH FROM a.ended_at - $1) * 1000000 / $3)::int8 AS slice, \
             count(*) FILTER (WHERE a.outcome = 'completed') AS completed, \
             count(*) FILTER (WHERE a.outcome = 'failed') AS failed FROM quern_job_attempts a \
             WHERE a.ended_at >= $1 AND a.ended_at <= $2 AND a.outcome IN ('completed', 'failed') GROUP BY 1",
        )
        .bind(since)
        .bind(until)
        .bind(slice.num_microseconds().unwrap_or(i64::MAX).max(1))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(EndedInSlice::from_columns).collect()
    }

    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailedJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, type, error, attempts, completed_at FROM quern_jobs \
             WHERE status = 'failed' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(FailedJob::from_columns).collect()
    }

    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows =
            sqlx::query("SELECT status, count(*) AS n FROM quern_jobs GROUP BY status").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                let status = parse_status(&status)?;
                Ok((status, row.try_get("n")?))
            })
            .collect()
    }
}

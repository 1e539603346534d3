//! Counts and times read for health, metrics and the dashboard, on SQLite.

use super::*;
use crate::StatsStore;

#[async_trait]
impl StatsStore for SqliteStore {
    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError> {
        let rows = sqlx::query("SELECT type, status, count(*) AS n FROM quern_jobs WHERE status IN ('pending', 'processing') GROUP BY type, status ORDER BY type, status")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(DepthRow::from_columns).collect()
    }

    async fn outcome_counts(&self, since: DateTime<Utc>) -> Result<Vec<OutcomeCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT j.type, a.handler_version, a.outcome, count(*) AS n FROM quern_job_attempts a \
             JOIN quern_jobs j ON j.id = a.job_id WHERE a.ended_at >= ?1 \
             GROUP BY j.type, a.handler_version, a.outcome",
        )
        .bind(micros(since))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(OutcomeCount::from_columns).collect()
    }

    async fn run_times(&self, since: DateTime<Utc>, per_version: bool) -> Result<Vec<RunTimes>, StoreError> {
        // SQLite has no percentile function: rank each group's run times and
        // take the nearest rank, ceil(0.95 n), as PostgreSQL's percentile_disc.
        let rows = sqlx::query(
            "WITH completed AS (SELECT j.type AS type, CASE WHEN ?2 THEN a.handler_version END AS handler_version, \
             a.ended_at - a.started_at AS us FROM quern_job_attempts a JOIN quern_jobs j ON j.id = a.job_id \
             WHERE a.ended_at >= ?1 AND a.outcome = 'completed'), \
             ranked AS (SELECT type, handler_version, us, \
             row_number() OVER (PARTITION BY type, handler_version ORDER BY us) AS rank, \
             count(*) OVER (PARTITION BY type, handler_version) AS n FROM completed) \
             SELECT type, handler_version, avg(us) / 1000.0 AS avg_ms, \
             max(CASE WHEN rank = (95 * n + 99) / 100 THEN us END) / 1000.0 AS p95_ms \
             FROM ranked GROUP BY type, handler_version",
        )
        .bind(micros(since))
        .bind(per_version)
        .fetch_all(&self.reader)
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
            "SELECT (a.ended_at - ?1) / ?3 AS slice, sum(a.outcome = 'completed') AS completed, \
             sum(a.outcome = 'failed') AS failed FROM quern_job_attempts a \
             WHERE a.ended_at >= ?1 AND a.ended_at <= ?2 AND a.outcome IN ('completed', 'failed') GROUP BY 1",
        )
        .bind(micros(since))
        .bind(micros(until))
        .bind(slice.num_microseconds().unwrap_or(i64::MAX).max(1))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(EndedInSlice::from_columns).collect()
    }

    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailedJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, type, error, attempts, completed_at FROM quern_jobs \
             WHERE status = 'failed' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(FailedJob::from_columns).collect()
    }

    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows =
            sqlx::query("SELECT status, count(*) AS n FROM quern_jobs GROUP BY status").fetch_all(&self.reader).await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                let status = parse_status(&status)?;
                Ok((status, row.try_get("n")?))
            })
            .collect()
    }
}

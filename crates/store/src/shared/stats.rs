//! Counts and times for health, metrics and the dashboard, on either backend.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};

use super::{Backend, Role, mapped};
use crate::rows::Columns;
use crate::{
    DepthRow, EndedInSlice, FailedJob, JobStatus, OutcomeCount, RunTimes, StatsStore, StoreError, parse_status,
};

#[async_trait]
impl<B: Backend> StatsStore for B {
    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT type, status, count(*) AS n FROM quern_jobs WHERE status IN ('pending', 'processing') \
                 GROUP BY type, status ORDER BY type, status",
                &[],
            )
            .await?;
        mapped(&rows)
    }

    async fn outcome_counts(&self, since: DateTime<Utc>) -> Result<Vec<OutcomeCount>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT j.type, a.handler_version, a.outcome, count(*) AS n FROM quern_job_attempts a \
                 JOIN quern_jobs j ON j.id = a.job_id WHERE a.ended_at >= $1 \
                 GROUP BY j.type, a.handler_version, a.outcome",
                &[since.into()],
            )
            .await?;
        mapped(&rows)
    }

    async fn run_times(&self, since: DateTime<Utc>, per_version: bool) -> Result<Vec<RunTimes>, StoreError> {
        let rows = self.fetch(Role::Read, B::RUN_TIMES, &[since.into(), per_version.into()]).await?;
        mapped(&rows)
    }

    async fn latencies(&self, since: DateTime<Utc>) -> Result<Vec<RunTimes>, StoreError> {
        let rows = self.fetch(Role::Read, B::LATENCIES, &[since.into()]).await?;
        mapped(&rows)
    }

    async fn ended_per_slice(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        slice: TimeDelta,
    ) -> Result<Vec<EndedInSlice>, StoreError> {
        let slice_us = slice.num_microseconds().unwrap_or(i64::MAX).max(1);
        let rows = self.fetch(Role::Read, B::ENDED_PER_SLICE, &[since.into(), until.into(), slice_us.into()]).await?;
        mapped(&rows)
    }

    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailedJob>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT id, type, error, attempts, completed_at FROM quern_jobs \
                 WHERE status = 'failed' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT $1",
                &[limit.into()],
            )
            .await?;
        mapped(&rows)
    }

    async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows = self.fetch(Role::Read, "SELECT status, count(*) AS n FROM quern_jobs GROUP BY status", &[]).await?;
        rows.iter().map(|row| Ok((parse_status(&row.plain::<String>("status")?)?, row.plain("n")?))).collect()
    }
}

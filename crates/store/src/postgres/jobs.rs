//! Jobs: enqueue, claim, the ends of attempts, leases, cancel and retry, pruning, on PostgreSQL.
//!
//! One file over 400 lines on purpose: the whole of [`JobStore`] on PostgreSQL,
//! in the trait's order, so it reads method by method beside `sqlite/jobs.rs`.

use std::collections::HashMap;

use super::*;
use crate::{Claim, JobStore, LimitedJob, Requeue, limited_owners, within_limits};

#[async_trait]
impl JobStore for PostgresStore {
    async fn enqueue(&self, job: &LimitedJob, now: DateTime<Utc>) -> Result<Job, StoreError> {
        let LimitedJob { job, max_unfinished_per_user } = job;
        let max_unfinished_per_user = *max_unfinished_per_user;
        let Some(limit) = max_unfinished_per_user else {
            // One statement, one round trip: the insert and its NOTIFY.
            insert_query(job, now).execute(&self.pool).await?;
            return Ok(Job::pending(job, now));
        };
        let mut tx = self.pool.begin().await?;
        lock_user(&mut tx, &job.user_id).await?;
        if unfinished_of(&mut tx, &job.user_id).await? >= i64::from(limit) {
            return Err(StoreError::TooManyActiveJobs { user_id: job.user_id.clone(), limit });
        }
        let inserted = insert_job(&mut tx, job, now).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let rows = self.lookups.fetch_all(|| sqlx::query(sqlx::AssertSqlSafe(GET.as_str())).bind(id)).await?;
        rows.first().map(Job::from_columns).transpose()
    }

    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Job>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.lookups.fetch_all(|| sqlx::query(sqlx::AssertSqlSafe(GET_MANY.as_str())).bind(ids)).await?;
        rows.iter().map(Job::from_columns).collect()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        crate::shared::list_jobs(self, filter).await
    }

    async fn requeue(&self, requeue: &Requeue) -> Result<RequeueOutcome, StoreError> {
        let Requeue { id, now, extra_attempts, max_unfinished_per_user } = *requeue;
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT user_id, status, lease_expires_at FROM quern_jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(RequeueOutcome::NotFound) };
        let status = parse_status(&row.try_get::<String, _>("status")?)?;
        let lease: Option<DateTime<Utc>> = row.try_get("lease_expires_at")?;
        if !requeueable(status, lease, now) {
            return Ok(RequeueOutcome::NotRetryable(status));
        }
        let user_id: String = row.try_get("user_id")?;
        if let Some(limit) = max_unfinished_per_user {
            lock_user(&mut tx, &user_id).await?;
            if unfinished_of(&mut tx, &user_id).await? >= i64::from(limit) {
                return Err(StoreError::TooManyActiveJobs { user_id, limit });
            }
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE quern_jobs SET status = 'pending', run_at = $2, updated_at = $2, max_attempts = attempts + $3, \
             result = NULL, error = NULL, completed_at = NULL, worker_id = NULL, lease_expires_at = NULL, \
             progress_percent = 0, progress_message = NULL WHERE id = $1 \
             RETURNING {JOB_COLUMNS}, pg_notify('{CHANNEL}', '')::text AS notified, \
             pg_notify('{EVENTS_CHANNEL}', id::text)::text AS announced"
        )))
        .bind(id)
        .bind(now)
        .bind(extra_attempts.max(1))
        .fetch_one(&mut *tx)
        .await?;
        let job = Job::from_columns(&row)?;
        tx.commit().await?;
        Ok(RequeueOutcome::Requeued(Box::new(job)))
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Vec<Job>, StoreError> {
        let Claim { worker_id, limit, now, lease_until, types } = *claim;
        let sql = match types.len() {
            0 => return Ok(Vec::new()),
            1 => &*CLAIM_ONE_TYPE,
            _ => &*CLAIM_TYPES,
        };
        let query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(now)
            .bind(i64::from(limit))
            .bind(worker_id)
            .bind(lease_until)
            .bind(types);
        let rows = self.worker.fetch_all_once(query).await?;
        let mut jobs = rows.iter().map(Job::from_columns).collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|job| (job.priority, job.run_at, job.created_at));
        Ok(jobs)
    }

    async fn enqueue_batch(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut columns = JobColumns::default();
        for job in jobs {
            columns.push(job);
        }
        columns.bind(sqlx::query(INSERT_JOBS).bind(now)).execute(&self.pool).await?;
        Ok(())
    }

    async fn enqueue_each(
        &self,
        jobs: &[LimitedJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Job, StoreError>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owners = limited_owners(jobs);
        let mut unfinished = HashMap::new();
        if !owners.is_empty() {
            // The same per-user locks a lone enqueue takes, all in one
            // statement, in the order of their keys: two batches that share
            // users take them in the same order and cannot deadlock.
            sqlx::query(
                "SELECT pg_advisory_xact_lock(key) FROM \
                 (SELECT DISTINCT hashtextextended(owner, 7919) AS key FROM unnest($1::text[]) AS owner ORDER BY key) AS keys",
            )
            .bind(&owners)
            .execute(&mut *tx)
            .await?;
            let counts = sqlx::query(
                "SELECT user_id, count(*) FROM quern_jobs \
                 WHERE user_id = ANY($1) AND status IN ('pending', 'processing') GROUP BY user_id",
            )
            .bind(&owners)
            .fetch_all(&mut *tx)
            .await?;
            for row in &counts {
                unfinished.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
        }
        let (answers, admitted) = within_limits(jobs, unfinished, now);
        if !admitted.is_empty() {
            let mut columns = JobColumns::default();
            for job in admitted {
                columns.push(job);
            }
            columns.bind(sqlx::query(INSERT_JOBS).bind(now)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(answers)
    }

    async fn finish_attempts(&self, ends: &[AttemptEnd], now: DateTime<Utc>) -> Result<Vec<EndWritten>, StoreError> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let mut query = sqlx::query(FINISH_ATTEMPTS)
            .bind(now)
            .bind(ends.iter().map(|end| end.job_id).collect::<Vec<_>>())
            .bind(ends.iter().map(|end| end.worker_id.as_str()).collect::<Vec<_>>())
            .bind(ends.iter().map(|end| end.attempt).collect::<Vec<_>>())
            .bind(ends.iter().map(|end| end.handler_version.as_deref()).collect::<Vec<_>>())
            .bind(ends.iter().map(|end| end.transition.kind()).collect::<Vec<_>>());
        let (mut result, mut processing_time_ms, mut run_at) = (Vec::new(), Vec::new(), Vec::new());
        let (mut cache_job, mut cache_key, mut cache_type, mut cache_expires) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut next = JobColumns::default();
        for end in ends {
            let (done, took, due) = match &end.transition {
                Transition::Complete { result, processing_time_ms, next: step, cache } => {
                    if let Some(cache) = cache {
                        cache_job.push(end.job_id);
                        cache_key.push(cache.key.as_str());
                        cache_type.push(cache.job_type.as_str());
                        cache_expires.push(cache.expires_at);
                    }
                    if let Some(step) = step {
                        next.push(step);
                    }
                    (Some(Json(result)), Some(*processing_time_ms), None)
                }
                Transition::Retry { run_at, .. } => (None, None, Some(*run_at)),
                _ => (None, None, None),
            };
            result.push(done);
            processing_time_ms.push(took);
            run_at.push(due);
        }
        query = query
            .bind(result)
            .bind(processing_time_ms)
            .bind(ends.iter().map(|end| end.transition.error()).collect::<Vec<_>>())
            .bind(run_at)
            .bind(ends.iter().map(|end| end.started_at).collect::<Vec<_>>())
            .bind(ends.iter().map(|end| end.transition.outcome().as_str()).collect::<Vec<_>>())
            .bind(cache_job)
            .bind(cache_key)
            .bind(cache_type)
            .bind(cache_expires);
        let rows = self
            .worker
            .fetch_all_once(next.bind(query).bind(ends.iter().map(|end| end.ended_at).collect::<Vec<_>>()))
            .await?;
        let mut written = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let status: String = row.try_get("status")?;
            written.insert(row.try_get::<Uuid, _>("id")?, status == "cancelled");
        }
        Ok(ends
            .iter()
            .map(|end| match written.get(&end.job_id) {
                None => EndWritten::Stale,
                Some(true) if !matches!(end.transition, Transition::Cancelled) => EndWritten::Cancelled,
                Some(_) => EndWritten::Recorded,
            })
            .collect())
    }

    async fn renew_leases(
        &self,
        worker_id: &str,
        ids: &[Uuid],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let renewed: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE quern_jobs SET lease_expires_at = $3 \
             WHERE id = ANY($1) AND status = 'processing' AND worker_id = $2 RETURNING id",
        )
        .bind(ids)
        .bind(worker_id)
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.iter().filter(|id| !renewed.contains(id)).copied().collect())
    }

    async fn released(&self, worker_id: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let held: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM quern_jobs WHERE id = ANY($1) AND status = 'processing' AND worker_id = $2",
        )
        .bind(ids)
        .bind(worker_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.iter().filter(|id| !held.contains(id)).copied().collect())
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM quern_jobs WHERE status = 'processing' AND lease_expires_at < $1 \
             ORDER BY lease_expires_at LIMIT $2"
        )))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Job::from_columns).collect()
    }

    async fn cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT status, coalesce(root_id, id) AS root FROM quern_jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(CancelOutcome::NotFound) };
        let status = parse_status(&row.try_get::<String, _>("status")?)?;
        let root: Uuid = row.try_get("root")?;
        let rows = sqlx::query(
            "WITH chain AS (SELECT id, status FROM quern_jobs \
                 WHERE (id = $1 OR root_id = $1) AND status IN ('pending', 'processing') FOR UPDATE) \
             UPDATE quern_jobs AS j SET status = 'cancelled', completed_at = $2, updated_at = $2, error = 'cancelled' \
             FROM chain WHERE j.id = chain.id RETURNING chain.id, chain.status",
        )
        .bind(root)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let unfinished = rows
            .iter()
            .map(|row| Ok((row.try_get("id")?, parse_status(&row.try_get::<String, _>("status")?)?)))
            .collect::<Result<Vec<(Uuid, JobStatus)>, StoreError>>()?;
        if !unfinished.is_empty() {
            // A pipeline's steps are few: one notice names them all.
            let ids = unfinished.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(",");
            sqlx::query("SELECT pg_notify($1, $2)").bind(EVENTS_CHANNEL).bind(ids).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(cancel_outcome(id, status, &unfinished))
    }

    async fn set_progress(&self, worker_id: &str, progress: &[Progress]) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        sqlx::query(sqlx::AssertSqlSafe(&**SET_PROGRESS))
            .bind(worker_id)
            .bind(progress.iter().map(|p| p.job_id).collect::<Vec<_>>())
            .bind(progress.iter().map(|p| p.percent).collect::<Vec<_>>())
            .bind(progress.iter().map(|p| p.message.as_str()).collect::<Vec<_>>())
            .execute(&self.relaxed)
            .await?;
        Ok(())
    }

    async fn attempts(&self, id: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = self
            .lookups
            .fetch_all(|| {
                sqlx::query(
                    "SELECT attempt, worker_id, handler_version, started_at, ended_at, outcome, error \
                     FROM quern_job_attempts WHERE job_id = $1 ORDER BY attempt",
                )
                .bind(id)
            })
            .await?;
        rows.iter().map(AttemptRecord::from_columns).collect()
    }

    async fn get_with_attempts(&self, id: Uuid) -> Result<Option<(Job, Vec<AttemptRecord>)>, StoreError> {
        let rows =
            self.lookups.fetch_all(|| sqlx::query(sqlx::AssertSqlSafe(GET_WITH_ATTEMPTS.as_str())).bind(id)).await?;
        let Some(row) = rows.first() else { return Ok(None) };
        let job = Job::from_columns(row)?;
        let attempts: sqlx::types::Json<Vec<AttemptRecord>> =
            row.try_get("attempt_history").map_err(|e| corrupt("quern_job_attempts", e))?;
        Ok(Some((job, attempts.0)))
    }

    async fn prune_jobs(&self, cutoffs: &PruneCutoffs, limit: u32) -> Result<u64, StoreError> {
        // SKIP LOCKED: a row a cancel or a retry is touching right now is
        // left for the next pass rather than waited for.
        let done = sqlx::query(
            "DELETE FROM quern_jobs WHERE id IN ( \
               SELECT id FROM quern_jobs \
               WHERE lease_expires_at IS NULL AND completed_at IS NOT NULL \
                 AND ((status = 'completed' AND completed_at < $1) \
                   OR (status = 'cancelled' AND completed_at < $2) \
                   OR (status = 'failed' AND completed_at < $3)) \
               LIMIT $4 FOR UPDATE SKIP LOCKED)",
        )
        .bind(cutoffs.completed)
        .bind(cutoffs.cancelled)
        .bind(cutoffs.failed)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn count_unfinished(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM quern_jobs WHERE status IN ('pending', 'processing')")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn wakeups(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Box::new(PgWakeups { listener }))
    }

    async fn job_changes(&self) -> Result<Box<dyn JobChanges>, StoreError> {
        Ok(Box::new(PgJobChanges { listener: listen_for_changes(&self.pool).await?, pool: self.pool.clone() }))
    }
}

/// The latest progress of held jobs, saved in one statement that announces
/// the jobs it moved.
/// The job and its attempts in one statement: one round trip for
/// `GET /v1/jobs/{id}` instead of two.
static GET: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE id = $1"));

static GET_MANY: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE id = ANY($1)"));

static GET_WITH_ATTEMPTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {JOB_COLUMNS}, (SELECT coalesce(json_agg(json_build_object('attempt', a.attempt, \
         'worker_id', a.worker_id, 'handler_version', a.handler_version, 'started_at', a.started_at, \
         'ended_at', a.ended_at, 'outcome', a.outcome, 'error', a.error) ORDER BY a.attempt), '[]'::json) \
         FROM quern_job_attempts a WHERE a.job_id = $1) AS attempt_history FROM quern_jobs WHERE id = $1"
    )
});

static SET_PROGRESS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH moved AS (UPDATE quern_jobs AS j SET progress_percent = p.percent, progress_message = p.message \
             FROM unnest($2::uuid[], $3::int2[], $4::text[]) AS p(id, percent, message) \
             WHERE j.id = p.id AND j.worker_id = $1 AND j.status = 'processing' RETURNING j.id) \
         SELECT {} AS notified",
        notify_changed("moved")
    )
});

async fn listen_for_changes(pool: &PgPool) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(EVENTS_CHANNEL).await?;
    Ok(listener)
}

struct PgJobChanges {
    listener: PgListener,
    pool: PgPool,
}

#[async_trait]
impl JobChanges for PgJobChanges {
    async fn next(&mut self) -> JobChange {
        loop {
            match self.listener.try_recv().await {
                Ok(Some(notice)) => {
                    let ids = notice.payload().split(',').filter_map(|id| Uuid::parse_str(id).ok()).collect();
                    return JobChange::Jobs(ids);
                }
                // The connection dropped and is back (sqlx reconnects before
                // answering `None`): what was sent meanwhile is lost.
                Ok(None) => return JobChange::Missed,
                Err(error) => {
                    tracing::warn!(%error, "listening for job changes failed; reconnecting");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    // A fresh listener, listening before anything is re-read.
                    if let Ok(listener) = listen_for_changes(&self.pool).await {
                        self.listener = listener;
                        return JobChange::Missed;
                    }
                }
            }
        }
    }

    fn reread_every(&self) -> Option<std::time::Duration> {
        None
    }
}

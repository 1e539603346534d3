//! Jobs: enqueue, claim, the ends of attempts, leases, cancel and retry, pruning, on SQLite.
//!
//! One file over 400 lines on purpose: the whole of [`JobStore`] on SQLite, in
//! the trait's order, so it reads method by method beside `postgres/jobs.rs`.

use std::collections::HashMap;

use super::*;
use crate::{Claim, JobStore, LimitedJob, Requeue, limited_owners, within_limits};

#[async_trait]
impl JobStore for SqliteStore {
    async fn enqueue(&self, job: &LimitedJob, now: DateTime<Utc>) -> Result<Job, StoreError> {
        let LimitedJob { job, max_unfinished_per_user } = job;
        let max_unfinished_per_user = *max_unfinished_per_user;
        let inserted = insert_job(&self.writer, job, now, max_unfinished_per_user).await?;
        match (inserted, max_unfinished_per_user) {
            (true, _) => {
                self.wake_workers();
                Ok(Job::pending(job, now))
            }
            (false, Some(limit)) => Err(StoreError::TooManyActiveJobs { user_id: job.user_id.clone(), limit }),
            (false, None) => Err(corrupt("quern_jobs", "an unconditional insert inserted nothing")),
        }
    }

    async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE id = ?1")))
            .bind(id.to_string())
            .fetch_optional(&mut *self.readers.get().await?)
            .await?;
        row.as_ref().map(Job::from_columns).transpose()
    }

    async fn get_many(&self, ids: &[Uuid]) -> Result<Vec<Job>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM quern_jobs WHERE id IN (SELECT value FROM json_each(?1))"
        )))
        .bind(to_json(&ids)?)
        .fetch_all(&mut *self.readers.get().await?)
        .await?;
        rows.iter().map(Job::from_columns).collect()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        crate::shared::list_jobs(self, filter).await
    }

    async fn requeue(&self, requeue: &Requeue) -> Result<RequeueOutcome, StoreError> {
        let Requeue { id, now, extra_attempts, max_unfinished_per_user } = *requeue;
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT user_id, status, lease_expires_at FROM quern_jobs WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(RequeueOutcome::NotFound) };
        let status = parse_status(&row.try_get::<String, _>("status")?)?;
        if !requeueable(status, at_opt(row.try_get("lease_expires_at")?)?, now) {
            return Ok(RequeueOutcome::NotRetryable(status));
        }
        let user_id: String = row.try_get("user_id")?;
        if let Some(limit) = max_unfinished_per_user
            && unfinished_of(&mut tx, &user_id).await? >= i64::from(limit)
        {
            return Err(StoreError::TooManyActiveJobs { user_id, limit });
        }
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE quern_jobs SET status = 'pending', run_at = ?2, updated_at = ?2, max_attempts = attempts + ?3, \
             result = NULL, error = NULL, completed_at = NULL, worker_id = NULL, lease_expires_at = NULL, \
             progress_percent = 0, progress_message = NULL WHERE id = ?1 RETURNING {JOB_COLUMNS}"
        )))
        .bind(id.to_string())
        .bind(micros(now))
        .bind(extra_attempts.max(1))
        .fetch_one(&mut *tx)
        .await?;
        let job = Job::from_columns(&row)?;
        tx.commit().await?;
        self.wake_workers();
        self.announce([job.id]);
        Ok(RequeueOutcome::Requeued(Box::new(job)))
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Vec<Job>, StoreError> {
        let Claim { worker_id, limit, now, lease_until, types } = *claim;
        if types.is_empty() {
            return Ok(Vec::new());
        }
        // The top of each type's part of the claim index `(type, priority,
        // run_at, created_at)`, then the most urgent of those: pending jobs
        // of other types are never scanned. One statement, so one write
        // lock: atomic against every other claimer.
        let per_type: Vec<String> = (0..types.len())
            .map(|i| {
                format!(
                    "SELECT * FROM (SELECT id, priority, run_at, created_at FROM quern_jobs \
                     WHERE status = 'pending' AND type = ?{} AND run_at <= ?1 \
                     ORDER BY priority, run_at, created_at LIMIT ?2)",
                    i + 5
                )
            })
            .collect();
        let sql = format!(
            "UPDATE quern_jobs
             SET status = 'processing', worker_id = ?3, attempts = attempts + 1, started_at = ?1,
                 lease_expires_at = ?4, updated_at = ?1, progress_percent = 0, progress_message = NULL
             WHERE id IN (SELECT id FROM ({}) ORDER BY priority, run_at, created_at LIMIT ?2)
             RETURNING {JOB_COLUMNS}",
            per_type.join(" UNION ALL ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(micros(now))
            .bind(i64::from(limit))
            .bind(worker_id)
            .bind(micros(lease_until));
        for job_type in types {
            query = query.bind(job_type);
        }
        let rows = query.fetch_all(&self.writer).await?;
        let mut jobs = rows.iter().map(Job::from_columns).collect::<Result<Vec<_>, _>>()?;
        self.announce(jobs.iter().map(|job| job.id));
        jobs.sort_by_key(|job| (job.priority, job.run_at, job.created_at));
        Ok(jobs)
    }

    async fn enqueue_batch(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let rows: Vec<JobRow> = jobs.iter().map(JobRow::of).collect();
        let mut tx = self.begin().await?;
        insert_jobs(&mut tx, &rows, now).await?;
        tx.commit().await?;
        self.wake_workers();
        Ok(())
    }

    async fn enqueue_each(
        &self,
        jobs: &[LimitedJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<Result<Job, StoreError>>, StoreError> {
        // The write lock, taken up front, keeps every count exact until commit.
        let mut tx = self.begin().await?;
        let owners = limited_owners(jobs);
        let mut unfinished = HashMap::new();
        if !owners.is_empty() {
            let counts = sqlx::query(
                "SELECT user_id, count(*) FROM quern_jobs \
                 WHERE user_id IN (SELECT value FROM json_each(?1)) AND status IN ('pending', 'processing') \
                 GROUP BY user_id",
            )
            .bind(to_json(&owners)?)
            .fetch_all(&mut *tx)
            .await?;
            for row in &counts {
                unfinished.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
            }
        }
        let (answers, admitted) = within_limits(jobs, unfinished, now);
        if !admitted.is_empty() {
            let rows: Vec<JobRow> = admitted.into_iter().map(JobRow::of).collect();
            insert_jobs(&mut tx, &rows, now).await?;
        }
        tx.commit().await?;
        self.wake_workers();
        Ok(answers)
    }

    async fn finish_attempts(&self, ends: &[AttemptEnd], now: DateTime<Utc>) -> Result<Vec<EndWritten>, StoreError> {
        if ends.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Vec<EndRow> = ends.iter().map(EndRow::of).collect();
        let mut tx = self.begin().await?;
        // SQLite's RETURNING sees only the updated table: which ends were
        // written is matched back by job id.
        let rows = sqlx::query(FINISH_ATTEMPTS).bind(micros(now)).bind(to_json(&batch)?).fetch_all(&mut *tx).await?;
        let mut written = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let status: String = row.try_get("status")?;
            written.insert(row.try_get::<String, _>("id")?, status == "cancelled");
        }
        let mut results = Vec::with_capacity(ends.len());
        let (mut attempts, mut cache, mut next) = (Vec::new(), Vec::new(), Vec::new());
        for (end, row) in ends.iter().zip(&batch) {
            let Some(&cancelled) = written.get(&row.job_id) else {
                results.push(EndWritten::Stale);
                continue;
            };
            let cut_short = cancelled && !matches!(end.transition, Transition::Cancelled);
            results.push(if cut_short { EndWritten::Cancelled } else { EndWritten::Recorded });
            if cancelled || !matches!(end.transition, Transition::Release) {
                attempts.push(AttemptRow {
                    job_id: &row.job_id,
                    attempt: end.attempt,
                    worker_id: &end.worker_id,
                    handler_version: end.handler_version.as_deref(),
                    started_at: micros(end.started_at),
                    ended_at: micros(end.ended_at),
                    outcome: if cancelled {
                        AttemptOutcome::Cancelled.as_str()
                    } else {
                        end.transition.outcome().as_str()
                    },
                    error: if cancelled { Some(CANCELLED_WHILE_RUNNING) } else { end.transition.error() },
                });
            }
            if let (false, Transition::Complete { result, next: step, cache: entry, .. }) = (cancelled, &end.transition)
            {
                if let Some(entry) = entry {
                    cache.push(CacheRow {
                        key: &entry.key,
                        job_type: &entry.job_type,
                        response: result,
                        expires_at: micros(entry.expires_at),
                    });
                }
                if let Some(step) = step {
                    next.push(JobRow::of(step));
                }
            }
        }
        if !attempts.is_empty() {
            sqlx::query(INSERT_ATTEMPTS).bind(to_json(&attempts)?).execute(&mut *tx).await?;
        }
        if !cache.is_empty() {
            sqlx::query(UPSERT_CACHE).bind(to_json(&cache)?).bind(micros(now)).execute(&mut *tx).await?;
        }
        if !next.is_empty() {
            insert_jobs(&mut tx, &next, now).await?;
        }
        tx.commit().await?;
        self.announce(
            ends.iter().zip(&results).filter(|(_, written)| **written != EndWritten::Stale).map(|(end, _)| end.job_id),
        );
        // Jobs back to pending (retries, releases) and pipelines' next steps
        // are work for the workers.
        if !next.is_empty()
            || ends.iter().any(|end| matches!(end.transition, Transition::Retry { .. } | Transition::Release))
        {
            self.wake_workers();
        }
        Ok(results)
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
        let sql = format!(
            "UPDATE quern_jobs SET lease_expires_at = ?1 \
             WHERE status = 'processing' AND worker_id = ?2 AND id IN ({}) RETURNING id",
            placeholders(ids.len(), 3)
        );
        let mut query =
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(micros(lease_until)).bind(worker_id);
        for id in ids {
            query = query.bind(id.to_string());
        }
        let renewed = query.fetch_all(&self.writer).await?;
        Ok(ids.iter().filter(|id| !renewed.contains(&id.to_string())).copied().collect())
    }

    async fn released(&self, worker_id: &str, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT id FROM quern_jobs WHERE status = 'processing' AND worker_id = ?1 AND id IN ({})",
            placeholders(ids.len(), 2)
        );
        let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(worker_id);
        for id in ids {
            query = query.bind(id.to_string());
        }
        let held = query.fetch_all(&mut *self.readers.get().await?).await?;
        Ok(ids.iter().filter(|id| !held.contains(&id.to_string())).copied().collect())
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM quern_jobs WHERE status = 'processing' AND lease_expires_at < ?1 \
             ORDER BY lease_expires_at LIMIT ?2"
        )))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *self.readers.get().await?)
        .await?;
        rows.iter().map(Job::from_columns).collect()
    }

    async fn cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT status, coalesce(root_id, id) AS root FROM quern_jobs WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(CancelOutcome::NotFound) };
        let status = parse_status(&row.try_get::<String, _>("status")?)?;
        let root: String = row.try_get("root")?;
        let rows = sqlx::query(
            "SELECT id, status FROM quern_jobs WHERE (id = ?1 OR root_id = ?1) AND status IN ('pending', 'processing')",
        )
        .bind(&root)
        .fetch_all(&mut *tx)
        .await?;
        let unfinished = rows
            .iter()
            .map(|row| {
                Ok((uuid(&row.try_get::<String, _>("id")?)?, parse_status(&row.try_get::<String, _>("status")?)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        sqlx::query(
            "UPDATE quern_jobs SET status = 'cancelled', completed_at = ?2, updated_at = ?2, error = 'cancelled' \
             WHERE (id = ?1 OR root_id = ?1) AND status IN ('pending', 'processing')",
        )
        .bind(&root)
        .bind(micros(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.announce(unfinished.iter().map(|(id, _)| *id));
        Ok(cancel_outcome(id, status, &unfinished))
    }

    async fn set_progress(&self, worker_id: &str, progress: &[Progress]) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        let moved: Vec<String> = sqlx::query_scalar(
            "UPDATE quern_jobs SET progress_percent = p.percent, progress_message = p.message \
             FROM (SELECT value ->> 'job_id' AS job, value ->> 'percent' AS percent, value ->> 'message' AS message \
                   FROM json_each(?2)) AS p \
             WHERE id = p.job AND worker_id = ?1 AND status = 'processing' RETURNING id",
        )
        .bind(worker_id)
        .bind(to_json(progress)?)
        .fetch_all(&self.writer)
        .await?;
        self.announce(moved.iter().filter_map(|id| Uuid::parse_str(id).ok()));
        Ok(())
    }

    async fn attempts(&self, id: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, worker_id, handler_version, started_at, ended_at, outcome, error \
             FROM quern_job_attempts WHERE job_id = ?1 ORDER BY attempt",
        )
        .bind(id.to_string())
        .fetch_all(&mut *self.readers.get().await?)
        .await?;
        rows.iter().map(AttemptRecord::from_columns).collect()
    }

    async fn get_with_attempts(&self, id: Uuid) -> Result<Option<(Job, Vec<AttemptRecord>)>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(GET_WITH_ATTEMPTS.as_str()))
            .bind(id.to_string())
            .fetch_optional(&mut *self.readers.get().await?)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let job = Job::from_columns(&row)?;
        let history: String = row.try_get("attempt_history")?;
        let attempts: Vec<AttemptJson> =
            serde_json::from_str(&history).map_err(|e| corrupt("quern_job_attempts", e))?;
        let attempts = attempts.into_iter().map(AttemptJson::into_record).collect::<Result<_, _>>()?;
        Ok(Some((job, attempts)))
    }

    async fn prune_jobs(&self, cutoffs: &PruneCutoffs, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM quern_jobs WHERE id IN ( \
               SELECT id FROM quern_jobs \
               WHERE lease_expires_at IS NULL AND completed_at IS NOT NULL \
                 AND ((status = 'completed' AND completed_at < ?1) \
                   OR (status = 'cancelled' AND completed_at < ?2) \
                   OR (status = 'failed' AND completed_at < ?3)) \
               LIMIT ?4)",
        )
        .bind(micros(cutoffs.completed))
        .bind(micros(cutoffs.cancelled))
        .bind(micros(cutoffs.failed))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn count_unfinished(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM quern_jobs WHERE status IN ('pending', 'processing')")
            .fetch_one(&mut *self.readers.get().await?)
            .await?)
    }

    async fn wakeups(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        Ok(Box::new(SqliteWakeups { receiver: self.enqueued.subscribe() }))
    }

    async fn job_changes(&self) -> Result<Box<dyn JobChanges>, StoreError> {
        Ok(Box::new(SqliteJobChanges { receiver: self.jobs_changed.subscribe() }))
    }
}

/// The job and its attempts in one statement: one trip to the reader's thread
/// for `GET /v1/jobs/{id}` instead of two. The attempts come as a JSON array
/// with times in microseconds, as they are stored.
static GET_WITH_ATTEMPTS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {JOB_COLUMNS}, (SELECT json_group_array(json_object('attempt', a.attempt, \
         'worker_id', a.worker_id, 'handler_version', a.handler_version, 'started_at', a.started_at, \
         'ended_at', a.ended_at, 'outcome', a.outcome, 'error', a.error) ORDER BY a.attempt) \
         FROM quern_job_attempts a WHERE a.job_id = ?1) AS attempt_history FROM quern_jobs WHERE id = ?1"
    )
});

/// An attempt as [`GET_WITH_ATTEMPTS`] writes it.
#[derive(serde::Deserialize)]
struct AttemptJson {
    attempt: i32,
    worker_id: String,
    handler_version: Option<String>,
    started_at: i64,
    ended_at: i64,
    outcome: AttemptOutcome,
    error: Option<String>,
}

impl AttemptJson {
    fn into_record(self) -> Result<AttemptRecord, StoreError> {
        Ok(AttemptRecord {
            attempt: self.attempt,
            worker_id: self.worker_id,
            handler_version: self.handler_version,
            started_at: at(self.started_at)?,
            ended_at: at(self.ended_at)?,
            outcome: self.outcome,
            error: self.error,
        })
    }
}

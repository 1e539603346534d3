//! [`Store`] on PostgreSQL (plain or Supabase): many workers on many machines
//! coordinate through it alone, with `FOR UPDATE SKIP LOCKED` claims and
//! LISTEN/NOTIFY wake-ups.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    AttemptEnd, AttemptOutcome, AttemptRecord, AttemptSample, CacheEntry, CacheStats, CancelOutcome, DepthRow,
    FailedJob, Job, JobFilter, JobStatus, NewJob, RequeueOutcome, Rollout, Store, StoreError, StoredVersion,
    Transition, VersionInfo, Wakeups, WorkerRow, corrupt, parse_status, requeueable,
};

/// The channel enqueues notify and workers listen on.
const CHANNEL: &str = "quern_jobs";
/// The channel rollout changes notify; workers and gateways listen on it.
const ROLLOUTS_CHANNEL: &str = "quern_handlers";

pub struct PostgresStore {
    pool: PgPool,
    /// Connections with `synchronous_commit = off`, for writes whose loss in
    /// a database crash is harmless (cache-hit counts, progress, heartbeats):
    /// they commit without waiting for the WAL to reach the disk. Every job
    /// state change goes through `pool`, durably.
    relaxed: PgPool,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        Self::connect_with(options).await
    }

    /// Connects with explicit options (tests set a private `search_path`).
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self, StoreError> {
        let options = options.application_name("quern");
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let relaxed = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        Ok(Self { pool, relaxed })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `migrations/supabase/`: the seed's `analysis_jobs` view with
    /// its row-level security. Refuses, naming what is missing, on a
    /// database without Supabase's `auth.uid()` and roles.
    pub async fn apply_supabase_compat(&self) -> Result<(), StoreError> {
        let missing: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM (VALUES ('role authenticated', (SELECT count(*) FROM pg_roles WHERE rolname = 'authenticated')), \
                                      ('role service_role', (SELECT count(*) FROM pg_roles WHERE rolname = 'service_role')), \
                                      ('function auth.uid()', (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                                                               WHERE n.nspname = 'auth' AND p.proname = 'uid'))) AS needs(name, found) \
             WHERE found = 0",
        )
        .fetch_all(&self.pool)
        .await?;
        if !missing.is_empty() {
            return Err(StoreError::NotSupabase(missing.join(", ")));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(include_str!("../../../migrations/supabase/analysis_jobs.sql")).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

const JOB_COLUMNS: &str = "id, user_id, type, input, result, error, status, priority, attempts, max_attempts, run_at, \
     lease_expires_at, worker_id, handler_version, progress_percent, progress_message, processing_time_ms, parent_id, \
     root_id, next_steps, created_at, updated_at, started_at, completed_at";

fn job_from_row(row: &PgRow) -> Result<Job, StoreError> {
    let status: String = row.try_get("status")?;
    let next_steps: Value = row.try_get("next_steps")?;
    Ok(Job {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        job_type: row.try_get("type")?,
        input: row.try_get("input")?,
        result: row.try_get("result")?,
        error: row.try_get("error")?,
        status: parse_status(&status)?,
        priority: row.try_get("priority")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        run_at: row.try_get("run_at")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        worker_id: row.try_get("worker_id")?,
        handler_version: row.try_get("handler_version")?,
        progress_percent: row.try_get("progress_percent")?,
        progress_message: row.try_get("progress_message")?,
        processing_time_ms: row.try_get("processing_time_ms")?,
        parent_id: row.try_get("parent_id")?,
        root_id: row.try_get("root_id")?,
        next_steps: serde_json::from_value(next_steps).map_err(|e| corrupt("quern_jobs", e))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
    })
}

/// The insert of a job and the NOTIFY that wakes workers (delivered at commit).
fn insert_query(
    job: &NewJob,
    now: DateTime<Utc>,
) -> Result<sqlx::query::Query<'static, Postgres, PgArguments>, StoreError> {
    let next_steps = serde_json::to_value(&job.next_steps).map_err(|e| corrupt("quern_jobs", e))?;
    Ok(sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         RETURNING {JOB_COLUMNS}, pg_notify('{CHANNEL}', '')::text AS notified"
    )))
    .bind(job.id)
    .bind(job.user_id.clone())
    .bind(job.job_type.clone())
    .bind(job.input.clone())
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(job.run_at)
    .bind(next_steps)
    .bind(job.parent_id)
    .bind(job.root_id)
    .bind(now))
}

async fn insert_job(tx: &mut Transaction<'_, Postgres>, job: &NewJob, now: DateTime<Utc>) -> Result<Job, StoreError> {
    let row = insert_query(job, now)?.fetch_one(&mut **tx).await?;
    job_from_row(&row)
}

/// Serialises the transactions that count a user's unfinished jobs (enqueue,
/// requeue), so two cannot both slip under the limit; other users are not held up.
async fn lock_user(tx: &mut Transaction<'_, Postgres>, user_id: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7919))").bind(user_id).execute(&mut **tx).await?;
    Ok(())
}

async fn unfinished_of(tx: &mut Transaction<'_, Postgres>, user_id: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM quern_jobs WHERE user_id = $1 AND status IN ('pending', 'processing')")
        .bind(user_id)
        .fetch_one(&mut **tx)
        .await?)
}

/// Ends an attempt in one statement: the job's transition, guarded by who
/// holds it, and the attempt's record, written only if the transition was.
/// Returns the query counting the jobs changed (0 or 1).
fn finish_query(end: &AttemptEnd, now: DateTime<Utc>) -> sqlx::query::QueryScalar<'static, Postgres, i64, PgArguments> {
    const HELD: &str = "id = $1 AND status = 'processing' AND worker_id = $2 AND attempts = $3";
    let (set, filter, outcome, error) = match &end.transition {
        Transition::Complete { .. } => (
            "status = 'completed', result = $9, error = NULL, processing_time_ms = $10, handler_version = $4, \
             progress_percent = 100, completed_at = $5, updated_at = $5, lease_expires_at = NULL",
            HELD,
            AttemptOutcome::Completed,
            None,
        ),
        Transition::Retry { error, outcome, .. } => (
            "status = 'pending', error = $8, run_at = $9, handler_version = $4, worker_id = NULL, \
             lease_expires_at = NULL, updated_at = $5",
            HELD,
            *outcome,
            Some(error.clone()),
        ),
        Transition::Fail { error, outcome } => (
            "status = 'failed', error = $8, handler_version = $4, completed_at = $5, updated_at = $5, lease_expires_at = NULL",
            HELD,
            *outcome,
            Some(error.clone()),
        ),
        Transition::Cancelled => (
            "lease_expires_at = NULL, handler_version = $4, updated_at = $5",
            "id = $1 AND status = 'cancelled' AND worker_id = $2 AND attempts = $3",
            AttemptOutcome::Cancelled,
            Some("cancelled while running".to_string()),
        ),
        Transition::Release => (
            "status = 'pending', attempts = attempts - 1, worker_id = NULL, lease_expires_at = NULL, run_at = $5, \
             updated_at = $5",
            HELD,
            AttemptOutcome::Released,
            None,
        ),
    };
    // A released attempt is not an attempt: nothing is recorded for it.
    let record = if matches!(end.transition, Transition::Release) { "WHERE false" } else { "" };
    let cache = match &end.transition {
        Transition::Complete { cache: Some(_), .. } => {
            ", cached AS (INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at) \
             SELECT $11, $12, $9, $13, $5 FROM done \
             ON CONFLICT (cache_key) DO UPDATE SET response = EXCLUDED.response, expires_at = EXCLUDED.expires_at)"
        }
        _ => "",
    };
    let sql = format!(
        "WITH done AS (UPDATE quern_jobs SET {set} WHERE {filter} RETURNING id), \
         recorded AS (INSERT INTO quern_job_attempts \
             (job_id, attempt, worker_id, handler_version, started_at, ended_at, outcome, error) \
             SELECT id, $3, $2, $4, $6, $5, $7, $8::text FROM done {record} ON CONFLICT (job_id, attempt) DO NOTHING) \
         {cache} SELECT count(*) FROM done"
    );
    let query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(end.job_id)
        .bind(end.worker_id.clone())
        .bind(end.attempt)
        .bind(end.handler_version.clone())
        .bind(now)
        .bind(end.started_at)
        .bind(outcome.as_str())
        .bind(error);
    match &end.transition {
        Transition::Complete { result, processing_time_ms, cache, .. } => {
            let query = query.bind(result.clone()).bind(*processing_time_ms);
            match cache {
                Some(cache) => query.bind(cache.key.clone()).bind(cache.job_type.clone()).bind(cache.expires_at),
                None => query,
            }
        }
        Transition::Retry { run_at, .. } => query.bind(*run_at),
        _ => query,
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    async fn enqueue(
        &self,
        job: &NewJob,
        now: DateTime<Utc>,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<Job, StoreError> {
        let Some(limit) = max_unfinished_per_user else {
            // One statement, one round trip: the insert and its NOTIFY.
            let row = insert_query(job, now)?.fetch_one(&self.pool).await?;
            return job_from_row(&row);
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let mut query = sqlx::QueryBuilder::<Postgres>::new(format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE true"));
        if let Some(user_id) = &filter.user_id {
            query.push(" AND user_id = ").push_bind(user_id.clone());
        }
        if let Some(status) = filter.status {
            query.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(job_type) = &filter.job_type {
            query.push(" AND type = ").push_bind(job_type.clone());
        }
        if let Some((created_at, id)) = filter.before {
            query.push(" AND (created_at, id) < (").push_bind(created_at).push(", ").push_bind(id).push(")");
        }
        query.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(filter.limit));
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn requeue(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        extra_attempts: i32,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<RequeueOutcome, StoreError> {
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
             RETURNING {JOB_COLUMNS}, pg_notify('{CHANNEL}', '')::text AS notified"
        )))
        .bind(id)
        .bind(now)
        .bind(extra_attempts.max(1))
        .fetch_one(&mut *tx)
        .await?;
        let job = job_from_row(&row)?;
        tx.commit().await?;
        Ok(RequeueOutcome::Requeued(Box::new(job)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError> {
        let rows = sqlx::query("SELECT type, status, count(*) AS n FROM quern_jobs WHERE status IN ('pending', 'processing') GROUP BY type, status ORDER BY type, status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DepthRow {
                    job_type: row.try_get("type")?,
                    status: parse_status(&row.try_get::<String, _>("status")?)?,
                    count: row.try_get("n")?,
                })
            })
            .collect()
    }

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

    async fn claim(
        &self,
        worker_id: &str,
        limit: u32,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        types: Option<&[String]>,
    ) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH next AS (
                 SELECT id FROM quern_jobs
                 WHERE status = 'pending' AND run_at <= $1 AND ($5::text[] IS NULL OR type = ANY($5))
                 ORDER BY priority, run_at, created_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE quern_jobs AS j
             SET status = 'processing', worker_id = $3, attempts = j.attempts + 1, started_at = $1,
                 lease_expires_at = $4, updated_at = $1, progress_percent = 0, progress_message = NULL
             FROM next WHERE j.id = next.id
             RETURNING {}",
            JOB_COLUMNS.split(", ").map(|c| format!("j.{c}")).collect::<Vec<_>>().join(", ")
        )))
        .bind(now)
        .bind(i64::from(limit))
        .bind(worker_id)
        .bind(lease_until)
        .bind(types)
        .fetch_all(&self.pool)
        .await?;
        let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|job| (job.priority, job.run_at, job.created_at));
        Ok(jobs)
    }

    async fn finish_attempt(&self, end: &AttemptEnd, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let Transition::Complete { next: Some(next), .. } = &end.transition else {
            return Ok(finish_query(end, now).fetch_one(&self.pool).await? == 1);
        };
        // A pipeline's next job is inserted with the completion, or not at all.
        let mut tx = self.pool.begin().await?;
        if finish_query(end, now).fetch_one(&mut *tx).await? != 1 {
            return Ok(false);
        }
        insert_job(&mut tx, next, now).await?;
        tx.commit().await?;
        Ok(true)
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
        rows.iter().map(job_from_row).collect()
    }

    async fn cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM quern_jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(status) = status else { return Ok(CancelOutcome::NotFound) };
        let status = parse_status(&status)?;
        if status.is_finished() {
            return Ok(CancelOutcome::AlreadyFinished(status));
        }
        sqlx::query(
            "UPDATE quern_jobs SET status = 'cancelled', completed_at = $2, updated_at = $2, error = 'cancelled' WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled { was_running: status == JobStatus::Processing })
    }

    async fn set_progress(&self, id: Uuid, worker_id: &str, percent: i16, message: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE quern_jobs SET progress_percent = $3, progress_message = $4 \
             WHERE id = $1 AND worker_id = $2 AND status = 'processing'",
        )
        .bind(id)
        .bind(worker_id)
        .bind(percent)
        .bind(message)
        .execute(&self.relaxed)
        .await?;
        Ok(())
    }

    async fn attempts(&self, id: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, worker_id, handler_version, started_at, ended_at, outcome, error \
             FROM quern_job_attempts WHERE job_id = $1 ORDER BY attempt",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let outcome: String = row.try_get("outcome")?;
                Ok(AttemptRecord {
                    attempt: row.try_get("attempt")?,
                    worker_id: row.try_get("worker_id")?,
                    handler_version: row.try_get("handler_version")?,
                    started_at: row.try_get("started_at")?,
                    ended_at: row.try_get("ended_at")?,
                    outcome: AttemptOutcome::parse(&outcome)
                        .ok_or_else(|| corrupt("quern_job_attempts", format!("outcome `{outcome}`")))?,
                    error: row.try_get("error")?,
                })
            })
            .collect()
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
        row.map(|row| {
            Ok(CacheEntry {
                response: row.try_get("response")?,
                hit_count: row.try_get("hit_count")?,
                last_hit_at: row.try_get("last_hit_at")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .transpose()
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
        rows.iter()
            .map(|row| {
                Ok(WorkerRow {
                    id: row.try_get("id")?,
                    host: row.try_get("host")?,
                    started_at: row.try_get("started_at")?,
                    last_heartbeat_at: row.try_get("last_heartbeat_at")?,
                    active_jobs: row.try_get("active_jobs")?,
                    concurrency: row.try_get("concurrency")?,
                    version: row.try_get("version")?,
                })
            })
            .collect()
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

    async fn attempts_since(&self, since: DateTime<Utc>, limit: u32) -> Result<Vec<AttemptSample>, StoreError> {
        let rows = sqlx::query(
            "SELECT j.type, a.handler_version, a.outcome, a.started_at, a.ended_at FROM quern_job_attempts a \
             JOIN quern_jobs j ON j.id = a.job_id WHERE a.ended_at >= $1 ORDER BY a.ended_at DESC LIMIT $2",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let outcome: String = row.try_get("outcome")?;
                Ok(AttemptSample {
                    job_type: row.try_get("type")?,
                    handler_version: row.try_get("handler_version")?,
                    outcome: AttemptOutcome::parse(&outcome)
                        .ok_or_else(|| corrupt("quern_job_attempts", format!("outcome `{outcome}`")))?,
                    started_at: row.try_get("started_at")?,
                    ended_at: row.try_get("ended_at")?,
                })
            })
            .collect()
    }

    async fn recent_failures(&self, limit: u32) -> Result<Vec<FailedJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, type, error, attempts, completed_at FROM quern_jobs \
             WHERE status = 'failed' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(FailedJob {
                    id: row.try_get("id")?,
                    job_type: row.try_get("type")?,
                    error: row.try_get("error")?,
                    attempts: row.try_get("attempts")?,
                    failed_at: row.try_get("completed_at")?,
                })
            })
            .collect()
    }

    async fn count_unfinished(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM quern_jobs WHERE status IN ('pending', 'processing')")
            .fetch_one(&self.pool)
            .await?)
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

    async fn wakeups(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Box::new(PgWakeups { listener }))
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
        row.map(|row| {
            Ok(StoredVersion {
                job_type: row.try_get("type")?,
                version: row.try_get("version")?,
                sha256: row.try_get("sha256")?,
                component: row.try_get("component")?,
                manifest: row.try_get("manifest")?,
                uploaded_by: row.try_get("uploaded_by")?,
                uploaded_at: row.try_get("uploaded_at")?,
            })
        })
        .transpose()
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT type, version, size_bytes, uploaded_by, uploaded_at FROM quern_handler_versions \
             ORDER BY uploaded_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(VersionInfo {
                    job_type: row.try_get("type")?,
                    version: row.try_get("version")?,
                    size_bytes: row.try_get("size_bytes")?,
                    uploaded_by: row.try_get("uploaded_by")?,
                    uploaded_at: row.try_get("uploaded_at")?,
                })
            })
            .collect()
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let rows = sqlx::query(
            "SELECT type, active_version, previous_version, canary_version, canary_percent, paused \
             FROM quern_handler_rollouts ORDER BY type",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Rollout {
                    job_type: row.try_get("type")?,
                    active_version: row.try_get("active_version")?,
                    previous_version: row.try_get("previous_version")?,
                    canary_version: row.try_get("canary_version")?,
                    canary_percent: row.try_get("canary_percent")?,
                    paused: row.try_get("paused")?,
                })
            })
            .collect()
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

    async fn rollout_changes(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(ROLLOUTS_CHANNEL).await?;
        Ok(Box::new(PgWakeups { listener }))
    }
}

struct PgWakeups {
    listener: PgListener,
}

#[async_trait]
impl Wakeups for PgWakeups {
    async fn wait(&mut self) {
        // `recv` reconnects by itself after a dropped connection; an error
        // here means the database is away, and the worker's poll carries on.
        if let Err(error) = self.listener.recv().await {
            tracing::warn!(%error, "listening for new jobs failed; relying on polling until it recovers");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

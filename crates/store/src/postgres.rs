//! [`Store`] on PostgreSQL (plain or Supabase): many workers on many machines
//! coordinate through it alone, with `FOR UPDATE SKIP LOCKED` claims and
//! LISTEN/NOTIFY wake-ups.

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use super::nodelay;
use super::rows::{FromColumns, JOB_COLUMNS};
use super::{
    AttemptEnd, AttemptRecord, CacheEntry, CacheStats, CancelOutcome, DepthRow, EndWritten, FailedJob, Job, JobFilter,
    JobStatus, NewJob, OutcomeCount, Progress, PruneCutoffs, RequeueOutcome, Rollout, Store, StoreError, StoredVersion,
    Transition, VersionInfo, Wakeups, WorkerRow, cancel_outcome, corrupt, parse_status, requeueable,
};
use super::{EndedInSlice, RunTimes};

/// The maintenance lead: a session advisory lock on this connection.
struct AdvisoryLock(PgConnection);

#[async_trait::async_trait]
impl super::LeaderLock for AdvisoryLock {
    async fn check(&mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&mut self.0).await?;
        Ok(())
    }
}

/// The channel enqueues notify and workers listen on.
/// (The static statements below spell it out: `pg_notify('quern_jobs', '')`.)
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
    /// The connection this process competes for the maintenance lead on,
    /// kept between tries (one per process, not one per try).
    candidate: tokio::sync::Mutex<Option<PgConnection>>,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        Self::connect_with(options).await
    }

    /// Connects with explicit options (tests set a private `search_path`).
    pub async fn connect_with(options: PgConnectOptions) -> Result<Self, StoreError> {
        Self::connect_pooled(options, super::DEFAULT_POOL_SIZE).await
    }

    /// Connects with at most `pool_size` connections for jobs and requests
    /// (and a few more for writes that need not wait for the disk).
    pub async fn connect_pooled(options: PgConnectOptions, pool_size: u32) -> Result<Self, StoreError> {
        let options = options.application_name("quern");
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(|connection, _| Box::pin(nodelay::disable_nagle(connection)))
            .connect_with(options.clone())
            .await?;
        let relaxed = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(|connection, _| Box::pin(nodelay::disable_nagle(connection)))
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        Ok(Self { pool, relaxed, candidate: tokio::sync::Mutex::default() })
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
                                                               WHERE n.nspname = 'auth' AND p.proname = 'uid')), \
                                      ('table auth.users', (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                                                            WHERE n.nspname = 'auth' AND c.relname = 'users'))) AS needs(name, found) \
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

/// The insert of a job and the NOTIFY that wakes workers (delivered at commit).
fn insert_query(
    job: &NewJob,
    now: DateTime<Utc>,
) -> Result<sqlx::query::Query<'static, Postgres, PgArguments>, StoreError> {
    let next_steps = serde_json::to_value(&job.next_steps).map_err(|e| corrupt("quern_jobs", e))?;
    Ok(sqlx::query(
        "INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         RETURNING pg_notify('quern_jobs', '')::text AS notified",
    )
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
    insert_query(job, now)?.execute(&mut **tx).await?;
    Ok(Job::pending(job, now))
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

/// Claims of one type read the claim index `(type, priority, run_at,
/// created_at)` in order from the top, locking as they go; rows another
/// claimer holds are skipped, so concurrent claimers never wait on each other.
static CLAIM_ONE_TYPE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    claim_sql(
        "SELECT id FROM quern_jobs WHERE status = 'pending' AND type = ($5::text[])[1] AND run_at <= $1 \
         ORDER BY priority, run_at, created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
});

/// Claims of several types take the top of each type's part of the index
/// (locking up to `limit` rows of each), then the most urgent of those; the
/// rows not taken are unlocked when the statement commits.
static CLAIM_TYPES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    claim_sql(
        "SELECT c.id FROM unnest($5::text[]) AS t(type) CROSS JOIN LATERAL ( \
             SELECT id, priority, run_at, created_at FROM quern_jobs \
             WHERE status = 'pending' AND type = t.type AND run_at <= $1 \
             ORDER BY priority, run_at, created_at LIMIT $2 FOR UPDATE SKIP LOCKED) AS c \
         ORDER BY c.priority, c.run_at, c.created_at LIMIT $2",
    )
});

/// The claim around a choice of job ids: `$1` now, `$2` the limit, `$3` the
/// worker, `$4` the lease's end, `$5` the types.
fn claim_sql(choose: &str) -> String {
    let returned = JOB_COLUMNS.split(", ").map(|c| format!("j.{c}")).collect::<Vec<_>>().join(", ");
    format!(
        "WITH next AS ({choose}) \
         UPDATE quern_jobs AS j \
         SET status = 'processing', worker_id = $3, attempts = j.attempts + 1, started_at = $1, \
             lease_expires_at = $4, updated_at = $1, progress_percent = 0, progress_message = NULL \
         FROM next WHERE j.id = next.id \
         RETURNING {returned}"
    )
}

/// Ends a batch of attempts in one statement (so one commit): the jobs'
/// transitions, each guarded by who holds it, then for the ends written the
/// attempt records, the cache entries and the pipelines' next jobs. The ends
/// arrive as parallel arrays (`unnest`), so the statement is the same for any
/// batch and stays prepared. A job cancelled while its attempt ran keeps its
/// status: only its lease is cleared and the attempt recorded as cancelled.
const FINISH_ATTEMPTS: &str = "
WITH ends AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::jsonb[], $8::int4[],
                         $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[])
        AS e(job_id, worker_id, attempt, handler_version, kind, result, processing_time_ms, error, run_at,
             started_at, outcome)
),
done AS (
    UPDATE quern_jobs AS j SET
        status = CASE WHEN j.status = 'cancelled' THEN 'cancelled'
                      WHEN e.kind = 'complete' THEN 'completed'
                      WHEN e.kind = 'fail' THEN 'failed'
                      ELSE 'pending' END,
        result = CASE WHEN j.status = 'processing' AND e.kind = 'complete' THEN e.result ELSE j.result END,
        error = CASE WHEN j.status = 'processing' AND e.kind IN ('complete', 'retry', 'fail') THEN e.error
                     ELSE j.error END,
        processing_time_ms = CASE WHEN j.status = 'processing' AND e.kind = 'complete' THEN e.processing_time_ms
                                  ELSE j.processing_time_ms END,
        handler_version = CASE WHEN j.status = 'processing' AND e.kind = 'release' THEN j.handler_version
                               ELSE e.handler_version END,
        progress_percent = CASE WHEN j.status = 'processing' AND e.kind = 'complete' THEN 100
                                ELSE j.progress_percent END,
        completed_at = CASE WHEN j.status = 'processing' AND e.kind IN ('complete', 'fail') THEN $1
                            ELSE j.completed_at END,
        run_at = CASE WHEN j.status = 'processing' AND e.kind = 'retry' THEN e.run_at
                      WHEN j.status = 'processing' AND e.kind = 'release' THEN $1
                      ELSE j.run_at END,
        worker_id = CASE WHEN j.status = 'processing' AND e.kind IN ('retry', 'release') THEN NULL
                         ELSE j.worker_id END,
        attempts = CASE WHEN j.status = 'processing' AND e.kind = 'release' THEN j.attempts - 1
                        ELSE j.attempts END,
        lease_expires_at = NULL,
        updated_at = $1
    FROM ends AS e
    WHERE j.id = e.job_id AND j.worker_id = e.worker_id AND j.attempts = e.attempt
      AND ((j.status = 'processing' AND e.kind <> 'cancelled')
           OR (j.status = 'cancelled' AND j.lease_expires_at IS NOT NULL))
    RETURNING j.id, j.status, j.result, e.attempt, e.worker_id, e.handler_version, e.started_at, e.kind,
              e.outcome, e.error
),
recorded AS (
    INSERT INTO quern_job_attempts (job_id, attempt, worker_id, handler_version, started_at, ended_at, outcome, error)
    SELECT id, attempt, worker_id, handler_version, started_at, $1,
           CASE WHEN status = 'cancelled' THEN 'cancelled' ELSE outcome END,
           CASE WHEN status = 'cancelled' THEN 'cancelled while running' ELSE error END
    FROM done WHERE status = 'cancelled' OR kind <> 'release'
    ON CONFLICT (job_id, attempt) DO NOTHING
),
cached AS (
    INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at)
    SELECT DISTINCT ON (c.cache_key) c.cache_key, c.type, d.result, c.expires_at, $1
    FROM unnest($13::uuid[], $14::text[], $15::text[], $16::timestamptz[]) AS c(job_id, cache_key, type, expires_at)
    JOIN done AS d ON d.id = c.job_id AND d.status = 'completed'
    ORDER BY c.cache_key
    ON CONFLICT (cache_key) DO UPDATE SET response = EXCLUDED.response, expires_at = EXCLUDED.expires_at
),
next_jobs AS (
    INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id,
                            created_at, updated_at)
    SELECT n.id, n.user_id, n.type, n.input, n.priority, n.max_attempts, n.run_at, n.next_steps, n.parent_id,
           n.root_id, $1, $1
    FROM unnest($17::uuid[], $18::text[], $19::text[], $20::jsonb[], $21::int2[], $22::int4[], $23::timestamptz[],
                $24::jsonb[], $25::uuid[], $26::uuid[])
        AS n(id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id)
    JOIN done AS d ON d.id = n.parent_id AND d.status = 'completed'
    RETURNING pg_notify('quern_jobs', '')::text AS notified
)
SELECT id, status, (SELECT count(notified) FROM next_jobs) AS next_jobs FROM done";

/// New jobs as parallel arrays, for `unnest`.
#[derive(Default)]
struct JobColumns {
    id: Vec<Uuid>,
    user_id: Vec<String>,
    job_type: Vec<String>,
    input: Vec<Value>,
    priority: Vec<i16>,
    max_attempts: Vec<i32>,
    run_at: Vec<DateTime<Utc>>,
    next_steps: Vec<Value>,
    parent_id: Vec<Option<Uuid>>,
    root_id: Vec<Option<Uuid>>,
}

impl JobColumns {
    fn push(&mut self, job: &NewJob) -> Result<(), StoreError> {
        self.id.push(job.id);
        self.user_id.push(job.user_id.clone());
        self.job_type.push(job.job_type.clone());
        self.input.push(job.input.clone());
        self.priority.push(job.priority);
        self.max_attempts.push(job.max_attempts);
        self.run_at.push(job.run_at);
        self.next_steps.push(serde_json::to_value(&job.next_steps).map_err(|e| corrupt("quern_jobs", e))?);
        self.parent_id.push(job.parent_id);
        self.root_id.push(job.root_id);
        Ok(())
    }

    fn bind<'q>(
        self,
        query: sqlx::query::Query<'q, Postgres, PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, PgArguments> {
        query
            .bind(self.id)
            .bind(self.user_id)
            .bind(self.job_type)
            .bind(self.input)
            .bind(self.priority)
            .bind(self.max_attempts)
            .bind(self.run_at)
            .bind(self.next_steps)
            .bind(self.parent_id)
            .bind(self.root_id)
    }
}

/// Many jobs inserted by one statement, waking workers once at commit.
const INSERT_JOBS: &str = "
WITH inserted AS (
    INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id,
                            created_at, updated_at)
    SELECT n.id, n.user_id, n.type, n.input, n.priority, n.max_attempts, n.run_at, n.next_steps, n.parent_id,
           n.root_id, $1, $1
    FROM unnest($2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::int2[], $7::int4[], $8::timestamptz[],
                $9::jsonb[], $10::uuid[], $11::uuid[])
        AS n(id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted) AS inserted, pg_notify('quern_jobs', '')::text AS notified";

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    async fn check_migrated(&self) -> Result<(), StoreError> {
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(&self.pool).await?;
        let applied: Option<Vec<i64>> = if exists {
            Some(sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success").fetch_all(&self.pool).await?)
        } else {
            None
        };
        super::first_missing(&sqlx::migrate!("../../migrations/postgres"), applied.as_deref())
    }

    async fn enqueue(
        &self,
        job: &NewJob,
        now: DateTime<Utc>,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<Job, StoreError> {
        let Some(limit) = max_unfinished_per_user else {
            // One statement, one round trip: the insert and its NOTIFY.
            insert_query(job, now)?.execute(&self.pool).await?;
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Job::from_columns).transpose()
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
        rows.iter().map(Job::from_columns).collect()
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
        let job = Job::from_columns(&row)?;
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
        rows.iter().map(DepthRow::from_columns).collect()
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
        types: &[String],
    ) -> Result<Vec<Job>, StoreError> {
        let sql = match types.len() {
            0 => return Ok(Vec::new()),
            1 => &*CLAIM_ONE_TYPE,
            _ => &*CLAIM_TYPES,
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(now)
            .bind(i64::from(limit))
            .bind(worker_id)
            .bind(lease_until)
            .bind(types)
            .fetch_all(&self.pool)
            .await?;
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
            columns.push(job)?;
        }
        columns.bind(sqlx::query(INSERT_JOBS).bind(now)).execute(&self.pool).await?;
        Ok(())
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
                        next.push(step)?;
                    }
                    (Some(result.clone()), Some(*processing_time_ms), None)
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
        let rows = next.bind(query).fetch_all(&self.pool).await?;
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
            .collect::<Result<Vec<_>, StoreError>>()?;
        tx.commit().await?;
        Ok(cancel_outcome(id, status, &unfinished))
    }

    async fn set_progress(&self, worker_id: &str, progress: &[Progress]) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE quern_jobs AS j SET progress_percent = p.percent, progress_message = p.message \
             FROM unnest($2::uuid[], $3::int2[], $4::text[]) AS p(id, percent, message) \
             WHERE j.id = p.id AND j.worker_id = $1 AND j.status = 'processing'",
        )
        .bind(worker_id)
        .bind(progress.iter().map(|p| p.job_id).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.percent).collect::<Vec<_>>())
        .bind(progress.iter().map(|p| p.message.as_str()).collect::<Vec<_>>())
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
        rows.iter().map(AttemptRecord::from_columns).collect()
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
        row.as_ref().map(CacheEntry::from_columns).transpose()
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

    async fn try_lead(&self) -> Result<Option<Box<dyn super::LeaderLock>>, StoreError> {
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

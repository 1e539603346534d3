//! [`Store`] on PostgreSQL (plain or Supabase): many workers on many machines
//! coordinate through it alone, with `FOR UPDATE SKIP LOCKED` claims and
//! LISTEN/NOTIFY wake-ups.
//!
//! Over 400 lines on purpose: the connection (pools, pings, migrations) and the
//! long statements the jobs share (insert, claim, the ends of attempts), each
//! with the comment that says why it is written so.

mod backend;
mod jobs;
mod lent;
mod seed_schema;

pub use self::seed_schema::{RevertPlan, SeedRows, SeedSchema};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use super::rows::{FromColumns, JOB_COLUMNS};
use super::{
    AttemptEnd, AttemptRecord, CancelOutcome, EndWritten, Job, JobChange, JobChanges, JobFilter, JobStatus, NewJob,
    Progress, PruneCutoffs, RequeueOutcome, Step, Store, StoreError, Transition, Wakeups, cancel_outcome, corrupt,
    parse_status, requeueable,
};

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
/// The channel job changes notify (status and progress), sent by the
/// statement that makes them: the payload is the changed jobs' ids, comma
/// separated, at most [`IDS_PER_NOTICE`] per notice (a payload holds 8000
/// bytes). Each process's one listener fans them out (`quern_queue::events`).
const EVENTS_CHANNEL: &str = "quern_job_events";
const IDS_PER_NOTICE: usize = 200;

/// A scalar subquery that notifies [`EVENTS_CHANNEL`] of the ids in `rows`
/// (a CTE with an `id` column), [`IDS_PER_NOTICE`] per notice; its value is
/// the number of notices. Uncorrelated, so it runs once per statement.
fn notify_changed(rows: &str) -> String {
    format!(
        "(SELECT count(pg_notify('{EVENTS_CHANNEL}', ids)) FROM (SELECT string_agg(id::text, ',') AS ids          FROM (SELECT id, (row_number() OVER () - 1) / {IDS_PER_NOTICE} AS chunk FROM {rows}) AS numbered          GROUP BY chunk) AS notices)"
    )
}

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
    /// Connections for key lookups, lent without the pool's ping on
    /// release (see `lent`).
    lookups: lent::LentConnections,
    /// Connections for the worker's claims and attempt ends, lent the same
    /// way: one round trip per statement on the queue's hottest path.
    worker: lent::LentConnections,
}

/// A connection idle this long is pinged before it is handed out.
const PING_WHEN_IDLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest a statement waits for a connection (a free one, or a new one
/// opened) before it fails as the database being away.
const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// sqlx pings every connection before handing it out (and again when it comes
/// back): a round trip before each statement. A busy connection has just
/// proved itself, so only one idle for a while is pinged, as pgx's pool does;
/// a connection that breaks in use fails its release ping and is replaced.
fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE_FOR {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
}

/// How many connections the worker's claims and attempt ends may hold: one
/// claim loop and one completion flush are in flight at a time, and a
/// maintenance pass may requeue beside them.
const WORKER_CONNECTIONS: usize = 4;

/// How many connections key lookups may hold beside a pool of `pool_size`:
/// a quarter as many, opened only as concurrent lookups need them. A lookup
/// holds its connection for one round trip.
fn lookup_connections(pool_size: u32) -> usize {
    pool_size.div_ceil(4) as usize
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
        let pool = pool_options(pool_size).connect_with(options.clone()).await?;
        let lookups = lent::LentConnections::new(options.clone(), lookup_connections(pool_size), ACQUIRE_TIMEOUT);
        let worker = lent::LentConnections::new(options.clone(), WORKER_CONNECTIONS, ACQUIRE_TIMEOUT);
        let relaxed = pool_options(4).connect_lazy_with(options.options([("synchronous_commit", "off")]));
        Ok(Self { pool, relaxed, candidate: tokio::sync::Mutex::default(), lookups, worker })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies `migrations/supabase/`: the seed's `analysis_jobs` view with
    /// its row-level security, and seed 004's job views. Refuses, naming what is missing, on a
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
        apply_compat_sql(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The compatibility set's statements, in `tx`.
async fn apply_compat_sql(tx: &mut Transaction<'_, Postgres>) -> Result<(), StoreError> {
    sqlx::raw_sql(include_str!("../../../../migrations/supabase/analysis_jobs.sql")).execute(&mut **tx).await?;
    sqlx::raw_sql(include_str!("../../../../migrations/supabase/job_views.sql")).execute(&mut **tx).await?;
    Ok(())
}

/// The insert of a job and the NOTIFY that wakes workers (delivered at commit).
fn insert_query(job: &NewJob, now: DateTime<Utc>) -> sqlx::query::Query<'static, Postgres, PgArguments> {
    sqlx::query(
        "INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         RETURNING pg_notify('quern_jobs', '')::text AS notified",
    )
    .bind(job.id)
    .bind(job.user_id.as_str())
    .bind(job.job_type.as_str())
    .bind(Json(&job.input))
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(job.run_at)
    .bind(Json(&job.next_steps))
    .bind(job.parent_id)
    .bind(job.root_id)
    .bind(now)
}

async fn insert_job(tx: &mut Transaction<'_, Postgres>, job: &NewJob, now: DateTime<Utc>) -> Result<Job, StoreError> {
    insert_query(job, now).execute(&mut **tx).await?;
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
    let notify = notify_changed("claimed");
    format!(
        "WITH next AS ({choose}), \
         claimed AS (UPDATE quern_jobs AS j \
             SET status = 'processing', worker_id = $3, attempts = j.attempts + 1, started_at = $1, \
                 lease_expires_at = $4, updated_at = $1, progress_percent = 0, progress_message = NULL \
             FROM next WHERE j.id = next.id \
             RETURNING {returned}) \
         SELECT *, {notify} AS notified FROM claimed"
    )
}

/// Ends a batch of attempts in one statement (so one commit): the jobs'
/// transitions, each guarded by who holds it, then for the ends written the
/// attempt records, the cache entries and the pipelines' next jobs. The ends
/// arrive as parallel arrays (`unnest`), so the statement is the same for any
/// batch and stays prepared. A job cancelled while its attempt ran keeps its
/// status: only its lease is cleared and the attempt recorded as cancelled.
/// The jobs changed are announced on `quern_job_events` as by
/// [`notify_changed`] (spelt out: this statement is a constant).
const FINISH_ATTEMPTS: &str = "
WITH ends AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::jsonb[], $8::int4[],
                         $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[], $27::timestamptz[])
        AS e(job_id, worker_id, attempt, handler_version, kind, result, processing_time_ms, error, run_at,
             started_at, outcome, ended_at)
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
    RETURNING j.id, j.status, j.result, e.attempt, e.worker_id, e.handler_version, e.started_at, e.ended_at,
              e.kind, e.outcome, e.error
),
recorded AS (
    INSERT INTO quern_job_attempts (job_id, attempt, worker_id, handler_version, started_at, ended_at, outcome, error)
    SELECT id, attempt, worker_id, handler_version, started_at, ended_at,
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
SELECT id, status, (SELECT count(notified) FROM next_jobs) AS next_jobs,
       (SELECT count(pg_notify('quern_job_events', ids)) FROM (SELECT string_agg(id::text, ',') AS ids
        FROM (SELECT id, (row_number() OVER () - 1) / 200 AS chunk FROM done) AS numbered
        GROUP BY chunk) AS notices) AS notified
FROM done";

/// New jobs as parallel arrays, for `unnest`, borrowed from the jobs (each
/// value is encoded once, as it is bound).
#[derive(Default)]
struct JobColumns<'a> {
    id: Vec<Uuid>,
    user_id: Vec<&'a str>,
    job_type: Vec<&'a str>,
    input: Vec<Json<&'a Value>>,
    priority: Vec<i16>,
    max_attempts: Vec<i32>,
    run_at: Vec<DateTime<Utc>>,
    next_steps: Vec<Json<&'a [Step]>>,
    parent_id: Vec<Option<Uuid>>,
    root_id: Vec<Option<Uuid>>,
}

impl<'a> JobColumns<'a> {
    fn push(&mut self, job: &'a NewJob) {
        self.id.push(job.id);
        self.user_id.push(&job.user_id);
        self.job_type.push(&job.job_type);
        self.input.push(Json(&job.input));
        self.priority.push(job.priority);
        self.max_attempts.push(job.max_attempts);
        self.run_at.push(job.run_at);
        self.next_steps.push(Json(&job.next_steps));
        self.parent_id.push(job.parent_id);
        self.root_id.push(job.root_id);
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

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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

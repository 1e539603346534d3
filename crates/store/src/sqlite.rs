//! [`Store`] on an embedded SQLite file: the zero-setup default. WAL mode, a
//! busy timeout, and one writer connection (SQLite allows one writer at a time;
//! queueing writers in-process beats retrying on `SQLITE_BUSY`). Readers use
//! their own pool. Wake-ups are an in-process signal.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::watch;

use super::rows::{FromColumns, JOB_COLUMNS};
use uuid::Uuid;

use super::{
    AttemptEnd, AttemptOutcome, AttemptRecord, CANCELLED_WHILE_RUNNING, CacheEntry, CacheStats, CancelOutcome,
    DepthRow, EndWritten, FailedJob, Job, JobFilter, JobStatus, NewJob, Progress, RequeueOutcome, Rollout, Store,
    StoreError, StoredVersion, Transition, VersionInfo, Wakeups, WorkerRow, cancel_outcome, corrupt, parse_status,
    requeueable,
};
use super::{EndedInSlice, OutcomeCount, PruneCutoffs, RunTimes};

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    enqueued: watch::Sender<u64>,
    /// Rollout changes, for this process (SQLite has one).
    rollouts_changed: watch::Sender<u64>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        private_file(path).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // A file does not hang up: no ping before each acquire (sqlx's
        // default), which cost a round trip to the connection's thread.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let (enqueued, _) = watch::channel(0);
        let (rollouts_changed, _) = watch::channel(0);
        Ok(Self { writer, reader, enqueued, rollouts_changed })
    }

    fn wake_workers(&self) {
        self.enqueued.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        // IMMEDIATE takes the write lock up front, so a transaction that reads
        // then writes never fails to upgrade when another process writes.
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Makes sure the database file exists readable by its owner alone (0600):
/// it holds every input and result. SQLite gives its `-wal` and `-shm` files
/// the database file's mode. A directory created here is 0700; one that
/// exists keeps its mode.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let beside = |suffix: &str| {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                std::path::PathBuf::from(name)
            };
            for file in [path.to_path_buf(), beside("-wal"), beside("-shm")] {
                let Ok(metadata) = std::fs::metadata(&file) else { continue };
                if metadata.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %file.display(), "the database file was readable by others; it is now 0600");
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Timestamps are stored as microseconds since the Unix epoch.
fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn at(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_micros(micros).single().ok_or_else(|| corrupt("quern_jobs", format!("timestamp {micros}")))
}

fn at_opt(micros: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    micros.map(at).transpose()
}

fn uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| corrupt("quern_jobs", e))
}

fn json(text: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt("quern_jobs", e))
}

/// Inserts a job in one statement that also checks its user's unfinished
/// jobs against `limit`: SQLite runs one write statement at a time, so the
/// count cannot go stale between the check and the insert, and the enqueue
/// costs one round trip. `false` when the user is at the limit.
async fn insert_job<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    job: &NewJob,
    now: DateTime<Utc>,
    limit: Option<u32>,
) -> Result<bool, StoreError> {
    let next_steps = serde_json::to_string(&job.next_steps).map_err(|e| corrupt("quern_jobs", e))?;
    let done = sqlx::query(
        "INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id, \
         created_at, updated_at) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11 \
         WHERE ?12 IS NULL OR (SELECT count(*) FROM quern_jobs WHERE user_id = ?2 AND status IN ('pending', 'processing')) < ?12",
    )
    .bind(job.id.to_string())
    .bind(&job.user_id)
    .bind(&job.job_type)
    .bind(job.input.to_string())
    .bind(job.priority)
    .bind(job.max_attempts)
    .bind(micros(job.run_at))
    .bind(next_steps)
    .bind(job.parent_id.map(|id| id.to_string()))
    .bind(job.root_id.map(|id| id.to_string()))
    .bind(micros(now))
    .bind(limit.map(i64::from))
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Pending and processing jobs of a user, inside the writer's transaction
/// (which holds SQLite's one write lock, so the count cannot go stale).
async fn unfinished_of(tx: &mut Transaction<'_, Sqlite>, user_id: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM quern_jobs WHERE user_id = ?1 AND status IN ('pending', 'processing')")
        .bind(user_id)
        .fetch_one(&mut **tx)
        .await?)
}

/// `?, ?, ?` for an `IN (…)` list of `n` values.
fn placeholders(n: usize, first: usize) -> String {
    (first..first + n).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
}

/// Ends a batch of attempts in one statement: the jobs' transitions, each
/// guarded by who holds it. The ends arrive as one JSON array (`json_each`),
/// so the statement is the same for any batch and stays prepared. A job
/// cancelled while its attempt ran keeps its status: only its lease is
/// cleared. The attempt records, cache entries and next jobs follow in the
/// same transaction, for the ends that were written.
const FINISH_ATTEMPTS: &str = "
UPDATE quern_jobs SET
    status = CASE WHEN status = 'cancelled' THEN 'cancelled'
                  WHEN e.kind = 'complete' THEN 'completed'
                  WHEN e.kind = 'fail' THEN 'failed'
                  ELSE 'pending' END,
    result = CASE WHEN status = 'processing' AND e.kind = 'complete' THEN e.end_result ELSE result END,
    error = CASE WHEN status = 'processing' AND e.kind IN ('complete', 'retry', 'fail') THEN e.end_error ELSE error END,
    processing_time_ms = CASE WHEN status = 'processing' AND e.kind = 'complete' THEN e.took_ms
                              ELSE processing_time_ms END,
    handler_version = CASE WHEN status = 'processing' AND e.kind = 'release' THEN handler_version
                           ELSE e.end_version END,
    progress_percent = CASE WHEN status = 'processing' AND e.kind = 'complete' THEN 100 ELSE progress_percent END,
    completed_at = CASE WHEN status = 'processing' AND e.kind IN ('complete', 'fail') THEN ?1 ELSE completed_at END,
    run_at = CASE WHEN status = 'processing' AND e.kind = 'retry' THEN e.end_run_at
                  WHEN status = 'processing' AND e.kind = 'release' THEN ?1
                  ELSE run_at END,
    worker_id = CASE WHEN status = 'processing' AND e.kind IN ('retry', 'release') THEN NULL ELSE worker_id END,
    attempts = CASE WHEN status = 'processing' AND e.kind = 'release' THEN attempts - 1 ELSE attempts END,
    lease_expires_at = NULL,
    updated_at = ?1
FROM (SELECT value ->> 'job_id' AS end_job, value ->> 'worker_id' AS end_worker, value ->> 'attempt' AS end_attempt,
             value ->> 'handler_version' AS end_version, value ->> 'kind' AS kind, value -> 'result' AS end_result,
             value ->> 'processing_time_ms' AS took_ms, value ->> 'error' AS end_error, value ->> 'run_at' AS end_run_at
      FROM json_each(?2)) AS e
WHERE id = e.end_job AND worker_id = e.end_worker AND attempts = e.end_attempt
  AND ((status = 'processing' AND e.kind <> 'cancelled') OR (status = 'cancelled' AND lease_expires_at IS NOT NULL))
RETURNING id, status";

const INSERT_ATTEMPTS: &str = "
INSERT INTO quern_job_attempts (job_id, attempt, worker_id, handler_version, started_at, ended_at, outcome, error)
SELECT value ->> 'job_id', value ->> 'attempt', value ->> 'worker_id', value ->> 'handler_version',
       value ->> 'started_at', ?2, value ->> 'outcome', value ->> 'error'
FROM json_each(?1) WHERE true
ON CONFLICT (job_id, attempt) DO NOTHING";

const UPSERT_CACHE: &str = "
INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at)
SELECT value ->> 'key', value ->> 'type', value -> 'response', value ->> 'expires_at', ?2
FROM json_each(?1) WHERE true
ON CONFLICT (cache_key) DO UPDATE SET response = excluded.response, expires_at = excluded.expires_at";

const INSERT_JOBS: &str = "
INSERT INTO quern_jobs (id, user_id, type, input, priority, max_attempts, run_at, next_steps, parent_id, root_id,
                        created_at, updated_at)
SELECT value ->> 'id', value ->> 'user_id', value ->> 'type', value -> 'input', value ->> 'priority',
       value ->> 'max_attempts', value ->> 'run_at', value -> 'next_steps', value ->> 'parent_id',
       value ->> 'root_id', ?2, ?2
FROM json_each(?1)";

/// One attempt's end as an element of [`FINISH_ATTEMPTS`]'s JSON array.
#[derive(serde::Serialize)]
struct EndRow<'a> {
    job_id: String,
    worker_id: &'a str,
    attempt: i32,
    handler_version: Option<&'a str>,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    processing_time_ms: Option<i32>,
    error: Option<&'a str>,
    run_at: Option<i64>,
}

impl<'a> EndRow<'a> {
    fn of(end: &'a AttemptEnd) -> Self {
        let (result, processing_time_ms, run_at) = match &end.transition {
            Transition::Complete { result, processing_time_ms, .. } => (Some(result), Some(*processing_time_ms), None),
            Transition::Retry { run_at, .. } => (None, None, Some(micros(*run_at))),
            _ => (None, None, None),
        };
        Self {
            job_id: end.job_id.to_string(),
            worker_id: &end.worker_id,
            attempt: end.attempt,
            handler_version: end.handler_version.as_deref(),
            kind: end.transition.kind(),
            result,
            processing_time_ms,
            error: end.transition.error(),
            run_at,
        }
    }
}

#[derive(serde::Serialize)]
struct AttemptRow<'a> {
    job_id: &'a str,
    attempt: i32,
    worker_id: &'a str,
    handler_version: Option<&'a str>,
    started_at: i64,
    outcome: &'static str,
    error: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct CacheRow<'a> {
    key: &'a str,
    #[serde(rename = "type")]
    job_type: &'a str,
    response: &'a Value,
    expires_at: i64,
}

/// A new job as an element of [`INSERT_JOBS`]'s JSON array.
#[derive(serde::Serialize)]
struct JobRow<'a> {
    id: String,
    user_id: &'a str,
    #[serde(rename = "type")]
    job_type: &'a str,
    input: &'a Value,
    priority: i16,
    max_attempts: i32,
    run_at: i64,
    next_steps: &'a [super::Step],
    parent_id: Option<String>,
    root_id: Option<String>,
}

impl<'a> JobRow<'a> {
    fn of(job: &'a NewJob) -> Self {
        Self {
            id: job.id.to_string(),
            user_id: &job.user_id,
            job_type: &job.job_type,
            input: &job.input,
            priority: job.priority,
            max_attempts: job.max_attempts,
            run_at: micros(job.run_at),
            next_steps: &job.next_steps,
            parent_id: job.parent_id.map(|id| id.to_string()),
            root_id: job.root_id.map(|id| id.to_string()),
        }
    }
}

async fn insert_jobs(
    tx: &mut Transaction<'_, Sqlite>,
    rows: &[JobRow<'_>],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(INSERT_JOBS).bind(to_json(rows)?).bind(micros(now)).execute(&mut **tx).await?;
    Ok(())
}

fn to_json<T: serde::Serialize + ?Sized>(rows: &T) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| corrupt("quern_jobs", e))
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations/sqlite").run(&self.writer).await?;
        Ok(())
    }

    async fn check_migrated(&self) -> Result<(), StoreError> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&self.reader)
        .await?;
        let applied: Option<Vec<i64>> = if exists {
            Some(
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&self.reader)
                    .await?,
            )
        } else {
            None
        };
        super::first_missing(&sqlx::migrate!("../../migrations/sqlite"), applied.as_deref())
    }

    async fn enqueue(
        &self,
        job: &NewJob,
        now: DateTime<Utc>,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<Job, StoreError> {
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
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(Job::from_columns).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let mut query = sqlx::QueryBuilder::<Sqlite>::new(format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE 1"));
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
            query.push(" AND (created_at, id) < (").push_bind(micros(created_at)).push(", ");
            query.push_bind(id.to_string()).push(")");
        }
        query.push(" ORDER BY created_at DESC, id DESC LIMIT ").push_bind(i64::from(filter.limit));
        let rows = query.build().fetch_all(&self.reader).await?;
        rows.iter().map(Job::from_columns).collect()
    }

    async fn requeue(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        extra_attempts: i32,
        max_unfinished_per_user: Option<u32>,
    ) -> Result<RequeueOutcome, StoreError> {
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
        Ok(RequeueOutcome::Requeued(Box::new(job)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn depth_by_type(&self) -> Result<Vec<DepthRow>, StoreError> {
        let rows = sqlx::query("SELECT type, status, count(*) AS n FROM quern_jobs WHERE status IN ('pending', 'processing') GROUP BY type, status ORDER BY type, status")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(DepthRow::from_columns).collect()
    }

    async fn cache_stats(&self, now: DateTime<Utc>) -> Result<CacheStats, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS entries, count(*) FILTER (WHERE expires_at > ?1) AS live, \
             coalesce(sum(hit_count), 0) AS hits FROM quern_cache",
        )
        .bind(micros(now))
        .fetch_one(&self.reader)
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
            sqlx::query(INSERT_ATTEMPTS).bind(to_json(&attempts)?).bind(micros(now)).execute(&mut *tx).await?;
        }
        if !cache.is_empty() {
            sqlx::query(UPSERT_CACHE).bind(to_json(&cache)?).bind(micros(now)).execute(&mut *tx).await?;
        }
        if !next.is_empty() {
            insert_jobs(&mut tx, &next, now).await?;
        }
        tx.commit().await?;
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
        let held = query.fetch_all(&self.reader).await?;
        Ok(ids.iter().filter(|id| !held.contains(&id.to_string())).copied().collect())
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM quern_jobs WHERE status = 'processing' AND lease_expires_at < ?1 \
             ORDER BY lease_expires_at LIMIT ?2"
        )))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
        Ok(cancel_outcome(id, status, &unfinished))
    }

    async fn set_progress(&self, worker_id: &str, progress: &[Progress]) -> Result<(), StoreError> {
        if progress.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE quern_jobs SET progress_percent = p.percent, progress_message = p.message \
             FROM (SELECT value ->> 'job_id' AS job, value ->> 'percent' AS percent, value ->> 'message' AS message \
                   FROM json_each(?2)) AS p \
             WHERE id = p.job AND worker_id = ?1 AND status = 'processing'",
        )
        .bind(worker_id)
        .bind(to_json(progress)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn attempts(&self, id: Uuid) -> Result<Vec<AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, worker_id, handler_version, started_at, ended_at, outcome, error \
             FROM quern_job_attempts WHERE job_id = ?1 ORDER BY attempt",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(AttemptRecord::from_columns).collect()
    }

    async fn cache_hit(&self, key: &str, now: DateTime<Utc>) -> Result<Option<Value>, StoreError> {
        let response: Option<String> = sqlx::query_scalar(
            "UPDATE quern_cache SET hit_count = hit_count + 1, last_hit_at = ?2 \
             WHERE cache_key = ?1 AND expires_at > ?2 RETURNING response",
        )
        .bind(key)
        .bind(micros(now))
        .fetch_optional(&self.writer)
        .await?;
        response.as_deref().map(json).transpose()
    }

    async fn cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let row =
            sqlx::query("SELECT response, hit_count, last_hit_at, expires_at FROM quern_cache WHERE cache_key = ?1")
                .bind(key)
                .fetch_optional(&self.reader)
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
            "INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (cache_key) DO UPDATE SET response = excluded.response, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(job_type)
        .bind(response.to_string())
        .bind(micros(expires_at))
        .bind(micros(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn purge_cache(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM quern_cache WHERE expires_at <= ?1")
            .bind(micros(now))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn try_lead(&self) -> Result<Option<Box<dyn super::LeaderLock>>, StoreError> {
        Ok(Some(Box::new(super::SoleProcess)))
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

    async fn prune_handler_versions(&self, keep_newest: u32) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "DELETE FROM quern_handler_versions AS v \
             WHERE NOT EXISTS (SELECT 1 FROM quern_handler_rollouts AS r WHERE r.type = v.type \
                               AND v.version IN (r.active_version, r.canary_version, r.previous_version)) \
               AND (SELECT count(*) FROM quern_handler_versions AS newer WHERE newer.type = v.type \
                    AND newer.uploaded_at >= v.uploaded_at AND newer.version <> v.version) >= ?1 \
             RETURNING type, version",
        )
        .bind(i64::from(keep_newest))
        .fetch_all(&self.writer)
        .await?;
        Ok(rows)
    }

    async fn upsert_worker(&self, worker: &WorkerRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO quern_workers (id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO UPDATE SET host = excluded.host, \
             started_at = excluded.started_at, last_heartbeat_at = excluded.last_heartbeat_at, \
             active_jobs = excluded.active_jobs, concurrency = excluded.concurrency, version = excluded.version",
        )
        .bind(&worker.id)
        .bind(&worker.host)
        .bind(micros(worker.started_at))
        .bind(micros(worker.last_heartbeat_at))
        .bind(worker.active_jobs)
        .bind(worker.concurrency)
        .bind(&worker.version)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, host, started_at, last_heartbeat_at, active_jobs, concurrency, version FROM quern_workers ORDER BY id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(WorkerRow::from_columns).collect()
    }

    async fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM quern_workers WHERE id = ?1").bind(id).execute(&self.writer).await?;
        Ok(())
    }

    async fn forget_workers(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM quern_workers WHERE last_heartbeat_at < ?1")
            .bind(micros(before))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
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

    async fn count_unfinished(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM quern_jobs WHERE status IN ('pending', 'processing')")
            .fetch_one(&self.reader)
            .await?)
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

    async fn wakeups(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        Ok(Box::new(SqliteWakeups { receiver: self.enqueued.subscribe() }))
    }

    async fn put_version(&self, version: &StoredVersion) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO quern_handler_versions (type, version, sha256, component, manifest, size_bytes, uploaded_by, \
             uploaded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (type, version) DO NOTHING",
        )
        .bind(&version.job_type)
        .bind(&version.version)
        .bind(&version.sha256)
        .bind(&version.component)
        .bind(&version.manifest)
        .bind(version.component.len() as i64)
        .bind(&version.uploaded_by)
        .bind(micros(version.uploaded_at))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn version(&self, job_type: &str, version: &str) -> Result<Option<StoredVersion>, StoreError> {
        let row = sqlx::query(
            "SELECT type, version, sha256, component, manifest, uploaded_by, uploaded_at FROM quern_handler_versions \
             WHERE type = ?1 AND version = ?2",
        )
        .bind(job_type)
        .bind(version)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(StoredVersion::from_columns).transpose()
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT type, version, sha256, size_bytes, uploaded_by, uploaded_at FROM quern_handler_versions \
             ORDER BY uploaded_at DESC",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(VersionInfo::from_columns).collect()
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let rows = sqlx::query(
            "SELECT type, active_version, previous_version, canary_version, canary_percent, paused \
             FROM quern_handler_rollouts ORDER BY type",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(Rollout::from_columns).collect()
    }

    async fn put_rollout(&self, rollout: &Rollout, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO quern_handler_rollouts (type, active_version, previous_version, canary_version, \
             canary_percent, paused, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (type) DO UPDATE SET \
             active_version = excluded.active_version, previous_version = excluded.previous_version, \
             canary_version = excluded.canary_version, canary_percent = excluded.canary_percent, \
             paused = excluded.paused, updated_at = excluded.updated_at",
        )
        .bind(&rollout.job_type)
        .bind(&rollout.active_version)
        .bind(&rollout.previous_version)
        .bind(&rollout.canary_version)
        .bind(rollout.canary_percent)
        .bind(rollout.paused)
        .bind(micros(now))
        .execute(&self.writer)
        .await?;
        self.rollouts_changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    async fn swap_rollout(
        &self,
        expected: Option<&Rollout>,
        next: &Rollout,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let query = match expected {
            None => sqlx::query(
                "INSERT INTO quern_handler_rollouts (type, active_version, previous_version, canary_version, \
                 canary_percent, paused, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (type) DO NOTHING",
            ),
            // The row as it was read: every column a step changes.
            Some(_) => sqlx::query(
                "UPDATE quern_handler_rollouts SET active_version = ?2, previous_version = ?3, canary_version = ?4, \
                 canary_percent = ?5, paused = ?6, updated_at = ?7 \
                 WHERE type = ?1 AND active_version IS ?8 AND previous_version IS ?9 AND canary_version IS ?10 \
                   AND canary_percent = ?11 AND paused = ?12",
            ),
        };
        let query = query
            .bind(&next.job_type)
            .bind(&next.active_version)
            .bind(&next.previous_version)
            .bind(&next.canary_version)
            .bind(next.canary_percent)
            .bind(next.paused)
            .bind(micros(now));
        let query = match expected {
            None => query,
            Some(expected) => query
                .bind(&expected.active_version)
                .bind(&expected.previous_version)
                .bind(&expected.canary_version)
                .bind(expected.canary_percent)
                .bind(expected.paused),
        };
        let written = query.execute(&self.writer).await?.rows_affected() == 1;
        if written {
            self.rollouts_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(written)
    }

    async fn rollout_changes(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        Ok(Box::new(SqliteWakeups { receiver: self.rollouts_changed.subscribe() }))
    }
}

struct SqliteWakeups {
    receiver: watch::Receiver<u64>,
}

#[async_trait]
impl Wakeups for SqliteWakeups {
    async fn wait(&mut self) {
        if self.receiver.changed().await.is_err() {
            // The store is gone; nothing will ever wake us. Let the poll decide.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_database_is_readable_by_its_owner_alone() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("data").join("quern.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        let dir = path.parent().unwrap();
        assert_eq!(mode(dir), 0o700, "the directory it created");
        for name in ["quern.db", "quern.db-wal", "quern.db-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        drop(store);

        // A database left readable by others is tightened when opened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}

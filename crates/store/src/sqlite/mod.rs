//! [`Store`] on an embedded SQLite file: the zero-setup default. WAL mode, a
//! busy timeout, and one writer connection (SQLite allows one writer at a time;
//! queueing writers in-process beats retrying on `SQLITE_BUSY`). Readers have
//! read-only connections of their own (`readers`). Wake-ups are an in-process
//! signal.
//!
//! One file over 400 lines on purpose: opening the file, its pragmas, the single
//! writer and its wake-ups are one concern; the queries by concern live in the
//! sibling modules.

mod backend;
mod jobs;
mod readers;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, Transaction};

use tokio::sync::{broadcast, watch};

use super::rows::{FromColumns, JOB_COLUMNS};
use uuid::Uuid;

use super::{
    AttemptEnd, AttemptOutcome, AttemptRecord, CANCELLED_WHILE_RUNNING, CancelOutcome, EndWritten, Job, JobChange,
    JobChanges, JobFilter, NewJob, Progress, PruneCutoffs, RequeueOutcome, Store, StoreError, Transition, Wakeups,
    cancel_outcome, corrupt, parse_status, requeueable,
};

pub struct SqliteStore {
    writer: SqlitePool,
    /// Read-only connections, lent without sqlx's pool (see `readers`).
    readers: readers::Readers,
    enqueued: watch::Sender<u64>,
    /// Rollout changes, for this process (SQLite has one).
    rollouts_changed: watch::Sender<u64>,
    /// Jobs whose status or progress changed, announced after each commit.
    jobs_changed: broadcast::Sender<Arc<[Uuid]>>,
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
        let readers = readers::Readers::open(&options.read_only(true), READERS).await?;
        let (enqueued, _) = watch::channel(0);
        let (rollouts_changed, _) = watch::channel(0);
        let (jobs_changed, _) = broadcast::channel(JOB_CHANGES_BUFFERED);
        Ok(Self { writer, readers, enqueued, rollouts_changed, jobs_changed })
    }

    fn wake_workers(&self) {
        self.enqueued.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tells this process's listener that `ids` changed (after their commit).
    fn announce(&self, ids: impl IntoIterator<Item = Uuid>) {
        let ids: Arc<[Uuid]> = ids.into_iter().collect();
        if !ids.is_empty() {
            // No receiver is not an error: nobody follows a job yet.
            let _ = self.jobs_changed.send(ids);
        }
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

/// Read-only connections: reads run beside the writer and each other (WAL).
const READERS: usize = 4;

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
       value ->> 'started_at', value ->> 'ended_at', value ->> 'outcome', value ->> 'error'
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
    ended_at: i64,
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
        .fetch_one(&mut *self.readers.get().await?)
        .await?;
        let applied: Option<Vec<i64>> = if exists {
            Some(
                sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&mut *self.readers.get().await?)
                    .await?,
            )
        } else {
            None
        };
        super::first_missing(&sqlx::migrate!("../../migrations/sqlite"), applied.as_deref())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&mut *self.readers.get().await?).await?;
        Ok(())
    }
}

/// Batches of changes a slow listener may fall behind by before it is told
/// it missed some (and re-reads what it follows).
const JOB_CHANGES_BUFFERED: usize = 1024;

/// How often a listener re-reads followed jobs regardless: another process
/// writing the same file is not heard.
const REREAD_EVERY: Duration = Duration::from_secs(1);

struct SqliteJobChanges {
    receiver: broadcast::Receiver<Arc<[Uuid]>>,
}

#[async_trait]
impl JobChanges for SqliteJobChanges {
    async fn next(&mut self) -> JobChange {
        match self.receiver.recv().await {
            Ok(ids) => JobChange::Jobs(ids.to_vec()),
            Err(broadcast::error::RecvError::Lagged(_)) => JobChange::Missed,
            // The store is gone: nothing more will change.
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    fn reread_every(&self) -> Option<Duration> {
        Some(REREAD_EVERY)
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

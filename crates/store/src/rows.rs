//! Each row type mapped once, for both backends.
//!
//! The backends store the same columns in different forms: PostgreSQL has
//! native uuid, timestamptz and jsonb; SQLite keeps a uuid as text, a time as
//! microseconds since the Unix epoch and JSON as text. [`Columns`] is the
//! small part that differs (how a backend reads those three kinds); every
//! other column decodes the same on both, and [`FromColumns`] maps a row to
//! its type once.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{Decode, Postgres, Row, Sqlite, Type};
use uuid::Uuid;

use super::{
    AttemptRecord, CacheEntry, DepthRow, EndedInSlice, FailedJob, Job, OutcomeCount, Rollout, RunTimes, StoreError,
    StoredVersion, VersionInfo, WorkerRow, corrupt, parse_outcome, parse_status,
};

/// A column type both backends decode alike (text, integers, floats, bytes, booleans).
pub(crate) trait Plain:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}
impl<T> Plain for T where T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres> {}

/// A row of either backend, read by column name.
pub(crate) trait Columns {
    fn plain<T: Plain>(&self, name: &str) -> Result<T, StoreError>;
    fn uuid_opt(&self, name: &str) -> Result<Option<Uuid>, StoreError>;
    fn time_opt(&self, name: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    fn json_opt(&self, name: &str) -> Result<Option<Value>, StoreError>;

    fn uuid(&self, name: &str) -> Result<Uuid, StoreError> {
        self.uuid_opt(name)?.ok_or_else(|| corrupt("quern", format!("{name} is NULL")))
    }
    fn time(&self, name: &str) -> Result<DateTime<Utc>, StoreError> {
        self.time_opt(name)?.ok_or_else(|| corrupt("quern", format!("{name} is NULL")))
    }
    fn json(&self, name: &str) -> Result<Value, StoreError> {
        self.json_opt(name)?.ok_or_else(|| corrupt("quern", format!("{name} is NULL")))
    }
    /// A non-negative count (SQL counts come back as signed integers).
    fn count(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.plain::<i64>(name)?.max(0) as u64)
    }
}

impl Columns for PgRow {
    fn plain<T: Plain>(&self, name: &str) -> Result<T, StoreError> {
        Ok(self.try_get(name)?)
    }
    fn uuid_opt(&self, name: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(self.try_get(name)?)
    }
    fn time_opt(&self, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.try_get(name)?)
    }
    fn json_opt(&self, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.try_get(name)?)
    }
}

impl Columns for SqliteRow {
    fn plain<T: Plain>(&self, name: &str) -> Result<T, StoreError> {
        Ok(self.try_get(name)?)
    }
    fn uuid_opt(&self, name: &str) -> Result<Option<Uuid>, StoreError> {
        let text: Option<String> = self.try_get(name)?;
        text.map(|text| Uuid::parse_str(&text).map_err(|e| corrupt("quern", format!("{name}: {e}")))).transpose()
    }
    fn time_opt(&self, name: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let micros: Option<i64> = self.try_get(name)?;
        micros
            .map(|micros| {
                Utc.timestamp_micros(micros)
                    .single()
                    .ok_or_else(|| corrupt("quern", format!("{name}: timestamp {micros}")))
            })
            .transpose()
    }
    fn json_opt(&self, name: &str) -> Result<Option<Value>, StoreError> {
        let text: Option<String> = self.try_get(name)?;
        text.map(|text| serde_json::from_str(&text).map_err(|e| corrupt("quern", format!("{name}: {e}")))).transpose()
    }
}

/// A row type read from a row of either backend.
pub(crate) trait FromColumns: Sized {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError>;
}

/// The columns [`Job`] is read from.
pub(crate) const JOB_COLUMNS: &str = "id, user_id, type, input, result, error, status, priority, attempts, \
     max_attempts, run_at, lease_expires_at, worker_id, handler_version, progress_percent, progress_message, \
     processing_time_ms, parent_id, root_id, next_steps, created_at, updated_at, started_at, completed_at";

impl FromColumns for Job {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Job {
            id: row.uuid("id")?,
            user_id: row.plain("user_id")?,
            job_type: row.plain("type")?,
            input: row.json("input")?,
            result: row.json_opt("result")?,
            error: row.plain("error")?,
            status: parse_status(&row.plain::<String>("status")?)?,
            priority: row.plain("priority")?,
            attempts: row.plain("attempts")?,
            max_attempts: row.plain("max_attempts")?,
            run_at: row.time("run_at")?,
            lease_expires_at: row.time_opt("lease_expires_at")?,
            worker_id: row.plain("worker_id")?,
            handler_version: row.plain("handler_version")?,
            progress_percent: row.plain("progress_percent")?,
            progress_message: row.plain("progress_message")?,
            processing_time_ms: row.plain("processing_time_ms")?,
            parent_id: row.uuid_opt("parent_id")?,
            root_id: row.uuid_opt("root_id")?,
            next_steps: serde_json::from_value(row.json("next_steps")?).map_err(|e| corrupt("quern_jobs", e))?,
            created_at: row.time("created_at")?,
            updated_at: row.time("updated_at")?,
            started_at: row.time_opt("started_at")?,
            completed_at: row.time_opt("completed_at")?,
        })
    }
}

impl FromColumns for DepthRow {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(DepthRow {
            job_type: row.plain("type")?,
            status: parse_status(&row.plain::<String>("status")?)?,
            count: row.plain("n")?,
        })
    }
}

impl FromColumns for AttemptRecord {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(AttemptRecord {
            attempt: row.plain("attempt")?,
            worker_id: row.plain("worker_id")?,
            handler_version: row.plain("handler_version")?,
            started_at: row.time("started_at")?,
            ended_at: row.time("ended_at")?,
            outcome: parse_outcome(&row.plain::<String>("outcome")?)?,
            error: row.plain("error")?,
        })
    }
}

impl FromColumns for CacheEntry {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(CacheEntry {
            response: row.json("response")?,
            hit_count: row.plain("hit_count")?,
            last_hit_at: row.time_opt("last_hit_at")?,
            expires_at: row.time("expires_at")?,
        })
    }
}

impl FromColumns for WorkerRow {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(WorkerRow {
            id: row.plain("id")?,
            host: row.plain("host")?,
            started_at: row.time("started_at")?,
            last_heartbeat_at: row.time("last_heartbeat_at")?,
            active_jobs: row.plain("active_jobs")?,
            concurrency: row.plain("concurrency")?,
            version: row.plain("version")?,
        })
    }
}

impl FromColumns for OutcomeCount {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(OutcomeCount {
            job_type: row.plain("type")?,
            handler_version: row.plain("handler_version")?,
            outcome: parse_outcome(&row.plain::<String>("outcome")?)?,
            count: row.count("n")?,
        })
    }
}

impl FromColumns for RunTimes {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(RunTimes {
            job_type: row.plain("type")?,
            handler_version: row.plain("handler_version")?,
            avg_ms: row.plain("avg_ms")?,
            p95_ms: row.plain("p95_ms")?,
        })
    }
}

impl FromColumns for EndedInSlice {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(EndedInSlice {
            slice: row.plain("slice")?,
            completed: row.count("completed")?,
            failed: row.count("failed")?,
        })
    }
}

impl FromColumns for FailedJob {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(FailedJob {
            id: row.uuid("id")?,
            job_type: row.plain("type")?,
            error: row.plain("error")?,
            attempts: row.plain("attempts")?,
            failed_at: row.time("completed_at")?,
        })
    }
}

impl FromColumns for StoredVersion {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(StoredVersion {
            job_type: row.plain("type")?,
            version: row.plain("version")?,
            sha256: row.plain("sha256")?,
            component: row.plain("component")?,
            manifest: row.plain("manifest")?,
            uploaded_by: row.plain("uploaded_by")?,
            uploaded_at: row.time("uploaded_at")?,
        })
    }
}

impl FromColumns for VersionInfo {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(VersionInfo {
            job_type: row.plain("type")?,
            version: row.plain("version")?,
            sha256: row.plain("sha256")?,
            size_bytes: row.plain("size_bytes")?,
            uploaded_by: row.plain("uploaded_by")?,
            uploaded_at: row.time("uploaded_at")?,
        })
    }
}

impl FromColumns for Rollout {
    fn from_columns(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Rollout {
            job_type: row.plain("type")?,
            active_version: row.plain("active_version")?,
            previous_version: row.plain("previous_version")?,
            canary_version: row.plain("canary_version")?,
            canary_percent: row.plain("canary_percent")?,
            paused: row.plain("paused")?,
        })
    }
}

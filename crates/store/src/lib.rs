//! The only place that speaks SQL. [`Store`] is the seam between the queue's
//! rules (the `quern-queue` crate) and a database. It is split by concern:
//! [`JobStore`] (jobs and their attempts), [`CacheStore`], [`FleetStore`]
//! (workers, the leader lock), [`VersionStore`] (handler builds and
//! rollouts) and [`StatsStore`]; `use quern_store::prelude::*` brings them
//! all into scope. What both backends run alike is written once (`shared/`:
//! cache, fleet, stats, versions, listing jobs); the rest of jobs is each
//! backend's own (`sqlite/jobs.rs`, `postgres/jobs.rs`); rows are mapped once for both
//! (`rows.rs`), and one conformance suite (the `quern-conformance` crate, run
//! by `tests/queue_conformance.rs`) runs against both.
//!
//! A store performs state transitions atomically and checks who holds a job;
//! it does not decide anything (when to retry, what a lapsed lease means):
//! that is the queue's.

mod attempts;
mod cache;
mod fleet;
mod jobs;
mod postgres;
mod rows;
mod shared;
mod sqlite;
mod stats;
mod versions;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub(crate) use self::attempts::CANCELLED_WHILE_RUNNING;
pub use self::attempts::{AttemptEnd, AttemptOutcome, AttemptRecord, CacheWrite, EndWritten, Transition};
pub use self::cache::{CacheEntry, CacheHits, CacheStats, CacheStore};
pub use self::fleet::{FleetStore, LeaderLock, SoleProcess, WorkerRow};
pub use self::jobs::{
    CancelOutcome, Claim, Job, JobChange, JobChanges, JobFilter, JobStatus, JobStore, LimitedJob, NewJob, Progress,
    PruneCutoffs, Requeue, RequeueOutcome, Step, Wakeups,
};
pub(crate) use self::jobs::{cancel_outcome, limited_owners, within_limits};
pub use self::postgres::{PostgresStore, RevertPlan, SeedRows, SeedSchema};
pub use self::sqlite::SqliteStore;
pub use self::stats::{DepthRow, EndedInSlice, FailedJob, OutcomeCount, RunTimes, StatsStore};
pub use self::versions::{Rollout, StoredVersion, VersionInfo, VersionStore};

/// Every store trait, for callers that hold a `dyn Store` and call its
/// methods (a trait's methods are callable only where the trait is in scope).
pub mod prelude {
    pub use crate::{CacheStore, FleetStore, JobStore, StatsStore, Store, VersionStore};
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("user {user_id} already has {limit} unfinished jobs, the most allowed; wait for one to finish")]
    TooManyActiveJobs { user_id: String, limit: u32 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row in {table}: {message}")]
    Corrupt { table: &'static str, message: String },
    #[error("unsupported DATABASE_URL `{0}`: use sqlite://path/to/file.db or postgres://user@host/db")]
    UnsupportedUrl(String),
    #[error("this database lacks Supabase's {0}: --supabase is for a Supabase project's database")]
    NotSupabase(String),
    #[error(
        "the database is not migrated ({0}): run `quern migrate` with the same DATABASE_URL, or start `quern serve`, which migrates"
    )]
    NotMigrated(String),
}

#[async_trait]
pub trait Store: JobStore + CacheStore + FleetStore + VersionStore + StatsStore + Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;

    /// Applies pending migrations.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks, changing nothing, that every migration this build knows is
    /// applied: [`StoreError::NotMigrated`] names the first one missing.
    async fn check_migrated(&self) -> Result<(), StoreError>;

    /// A trivial round trip: does the database answer?
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Opens the store a `DATABASE_URL` names: `sqlite://…` (or a plain path) or
/// `postgres://…`.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    connect_pooled(url, DEFAULT_POOL_SIZE).await
}

/// The PostgreSQL connections a process keeps by default (QUERN_DB_POOL_SIZE).
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// [`connect`], with at most `pool_size` PostgreSQL connections (SQLite keeps
/// its one writer and few readers whatever is asked).
pub async fn connect_pooled(url: &str, pool_size: u32) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PostgresStore::connect_pooled(url.parse()?, pool_size).await?))
    } else if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(path)).await?))
    } else if !url.contains("://") {
        Ok(Arc::new(SqliteStore::open(std::path::Path::new(url)).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.split('@').next_back().unwrap_or(url).to_string()))
    }
}

/// The first migration `migrator` knows that `applied` lacks, as
/// [`StoreError::NotMigrated`]. `applied` is `None` when the migrations table
/// itself is missing (a database quern never touched).
fn first_missing(migrator: &sqlx::migrate::Migrator, applied: Option<&[i64]>) -> Result<(), StoreError> {
    let Some(applied) = applied else {
        return Err(StoreError::NotMigrated("it has no quern tables".into()));
    };
    match migrator.iter().find(|migration| !applied.contains(&migration.version)) {
        None => Ok(()),
        Some(missing) => Err(StoreError::NotMigrated(format!(
            "migration {} ({}) is not applied",
            missing.version, missing.description
        ))),
    }
}

/// Whether a job in `status` may be put back to `pending` by hand: failed, or
/// cancelled and no longer held by an instance that is still stopping.
pub(crate) fn requeueable(status: JobStatus, lease_expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    match status {
        JobStatus::Failed => true,
        JobStatus::Cancelled => lease_expires_at.is_none_or(|lease| lease <= now),
        _ => false,
    }
}

/// A status read from the database.
pub(crate) fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    JobStatus::parse(text).ok_or_else(|| corrupt("quern_jobs", format!("status `{text}`")))
}

pub(crate) fn parse_outcome(text: &str) -> Result<AttemptOutcome, StoreError> {
    AttemptOutcome::parse(text).ok_or_else(|| corrupt("quern_job_attempts", format!("outcome `{text}`")))
}

pub(crate) fn corrupt(table: &'static str, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { table, message: message.to_string() }
}

//! The SQL both backends run alike, written once.
//!
//! Most of quern's statements read the same on SQLite and PostgreSQL once the
//! three kinds of value they store differently (uuid, time, JSON) are bound
//! each backend's way: this is the write side of `rows.rs`. A statement's
//! values are [`Param`]s; a backend's [`Backend`] binds them and runs the
//! statement on the connections its [`Role`] calls for. The concerns written
//! wholly in shared SQL (the cache, the fleet's rows, the stats, handler
//! versions and rollouts) are implemented here once, for every backend; what
//! truly differs (a percentile, a time slice, how a rollout change reaches
//! other processes, the maintenance lead) is a [`Backend`] item each backend
//! states.
//! Jobs (claims, the ends of attempts, enqueues) differ in their SQL and their
//! cost and stay in each backend's `jobs.rs`; listing them does not, and is
//! here.

mod cache;
mod fleet;
mod jobs;
mod stats;
mod versions;

pub(crate) use jobs::list_jobs;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::SqlSafeStr;
use uuid::Uuid;

use crate::rows::Columns;
use crate::{LeaderLock, StoreError, Wakeups};

/// A value bound to a statement, by kind.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Param<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
    SmallInt(i16),
    Int(i32),
    BigInt(i64),
    Bool(bool),
    Uuid(Uuid),
    Time(DateTime<Utc>),
    Json(&'a Value),
}

/// `From` each kind of value for its [`Param`] variant: owned, or borrowed
/// for as long as the statement's parameters.
macro_rules! param_from {
    ($($kind:ty => $variant:ident),* $(,)?) => {$(
        impl From<$kind> for Param<'_> {
            fn from(value: $kind) -> Self {
                Param::$variant(value)
            }
        }
    )*};
    (borrowed $($kind:ty => $variant:ident),* $(,)?) => {$(
        impl<'a> From<&'a $kind> for Param<'a> {
            fn from(value: &'a $kind) -> Self {
                Param::$variant(value)
            }
        }
    )*};
}
param_from!(i16 => SmallInt, i32 => Int, i64 => BigInt, bool => Bool, Uuid => Uuid, DateTime<Utc> => Time);
param_from!(borrowed str => Text, String => Text, [u8] => Bytes, Value => Json);

impl<'a> From<&'a Option<String>> for Param<'a> {
    fn from(value: &'a Option<String>) -> Self {
        Param::OptText(value.as_deref())
    }
}

impl From<u32> for Param<'_> {
    fn from(value: u32) -> Self {
        Param::BigInt(i64::from(value))
    }
}

/// A statement's text: a constant, or assembled from constant pieces (values
/// are bound, never written into it).
pub(crate) trait Sql: SqlSafeStr + Send {}
impl<T: SqlSafeStr + Send> Sql for T {}

/// Which connections a statement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// A read.
    Read,
    /// A read of one key on the request path (a cached result): on
    /// PostgreSQL it runs on the connections kept for lookups (`lookups`).
    Lookup,
    /// A write that must survive a crash once it returns.
    Write,
    /// A write whose loss in a database crash is harmless (a hit count, a
    /// heartbeat): PostgreSQL commits it without waiting for the disk.
    Relaxed,
}

/// One backend: how it runs a statement, and the few statements and notices
/// that differ between backends.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    type Row: Columns + Send + Sync;

    /// Runs `sql` with `params` bound in order; returns the rows it yields.
    async fn fetch(&self, role: Role, sql: impl Sql, params: &[Param<'_>]) -> Result<Vec<Self::Row>, StoreError>;

    /// Runs `sql` with `params` bound in order; returns how many rows it changed.
    async fn execute(&self, role: Role, sql: impl Sql, params: &[Param<'_>]) -> Result<u64, StoreError>;

    /// Mean and nearest-rank 95th percentile run time (ms) of completed
    /// attempts ended at or after `$1`, by type and, when `$2`, version:
    /// columns `type`, `handler_version`, `avg_ms`, `p95_ms`.
    const RUN_TIMES: &'static str;

    /// The same figures for the time from enqueue to end (`completed_at -
    /// created_at`) of jobs completed at or after `$1`, by type (what the
    /// seeds mean by latency): columns `type`, `handler_version` (null),
    /// `avg_ms`, `p95_ms`.
    const LATENCIES: &'static str;

    /// Completed and failed attempts ended within `$1..=$2`, counted per
    /// slice `$3` microseconds wide: columns `slice`, `completed`, `failed`.
    const ENDED_PER_SLICE: &'static str;

    /// Tells every process that `job_type`'s rollout changed, once the
    /// change has committed (whoever hears of it reads it). Listeners poll
    /// as well, so a notice that cannot be sent is logged, not an error: the
    /// change itself is stored.
    async fn rollout_written(&self, job_type: &str);

    /// Wakes when any rollout changes.
    async fn listen_for_rollouts(&self) -> Result<Box<dyn Wakeups>, StoreError>;

    /// Takes the maintenance lead if no other process holds it.
    async fn take_lead(&self) -> Result<Option<Box<dyn LeaderLock>>, StoreError>;
}

/// Rows read into their types.
pub(crate) fn mapped<T: crate::rows::FromColumns>(rows: &[impl Columns]) -> Result<Vec<T>, StoreError> {
    rows.iter().map(T::from_columns).collect()
}

//! How SQLite runs the shared statements (`shared/`), and the few that
//! differ on it: percentiles and time slices over microsecond integers,
//! rollout changes as an in-process signal, the lead always this process's.

use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};

use super::*;
use crate::shared::{Backend, Param, Role, Sql};
use crate::{LeaderLock, SoleProcess};

type SqliteQuery<'q> = Query<'q, Sqlite, SqliteArguments>;

/// Binds each value as SQLite stores it: a uuid as text, a time as
/// microseconds since the epoch, JSON as text.
fn bound<'q>(sql: impl Sql, params: &[Param<'q>]) -> SqliteQuery<'q> {
    params.iter().fold(sqlx::query(sql), |query, param| match *param {
        Param::Text(text) => query.bind(text),
        Param::OptText(text) => query.bind(text),
        Param::Bytes(bytes) => query.bind(bytes),
        Param::SmallInt(n) => query.bind(n),
        Param::Int(n) => query.bind(n),
        Param::BigInt(n) => query.bind(n),
        Param::Bool(flag) => query.bind(flag),
        Param::Uuid(id) => query.bind(id.to_string()),
        Param::Time(at) => query.bind(micros(at)),
        Param::Json(value) => query.bind(value.to_string()),
    })
}

#[async_trait]
impl Backend for SqliteStore {
    type Row = SqliteRow;

    async fn fetch(&self, role: Role, sql: impl Sql, params: &[Param<'_>]) -> Result<Vec<SqliteRow>, StoreError> {
        let query = bound(sql, params);
        Ok(match role {
            Role::Read | Role::Lookup => query.fetch_all(&mut *self.readers.get().await?).await?,
            Role::Write | Role::Relaxed => query.fetch_all(&self.writer).await?,
        })
    }

    async fn execute(&self, role: Role, sql: impl Sql, params: &[Param<'_>]) -> Result<u64, StoreError> {
        let query = bound(sql, params);
        let done = match role {
            Role::Read | Role::Lookup => query.execute(&mut *self.readers.get().await?).await?,
            Role::Write | Role::Relaxed => query.execute(&self.writer).await?,
        };
        Ok(done.rows_affected())
    }

    // SQLite has no percentile function: rank each group's run times and
    // take the nearest rank, ceil(0.95 n), as PostgreSQL's percentile_disc.
    const RUN_TIMES: &'static str = "WITH completed AS (SELECT j.type AS type, \
         CASE WHEN $2 THEN a.handler_version END AS handler_version, a.ended_at - a.started_at AS us \
         FROM quern_job_attempts a JOIN quern_jobs j ON j.id = a.job_id \
         WHERE a.ended_at >= $1 AND a.outcome = 'completed'), \
         ranked AS (SELECT type, handler_version, us, \
         row_number() OVER (PARTITION BY type, handler_version ORDER BY us) AS rank, \
         count(*) OVER (PARTITION BY type, handler_version) AS n FROM completed) \
         SELECT type, handler_version, avg(us) / 1000.0 AS avg_ms, \
         max(CASE WHEN rank = (95 * n + 99) / 100 THEN us END) / 1000.0 AS p95_ms \
         FROM ranked GROUP BY type, handler_version";

    const LATENCIES: &'static str = "WITH completed AS (SELECT type, completed_at - created_at AS us \
         FROM quern_jobs WHERE status = 'completed' AND completed_at >= $1), \
         ranked AS (SELECT type, us, row_number() OVER (PARTITION BY type ORDER BY us) AS rank, \
         count(*) OVER (PARTITION BY type) AS n FROM completed) \
         SELECT type, NULL AS handler_version, avg(us) / 1000.0 AS avg_ms, \
         max(CASE WHEN rank = (95 * n + 99) / 100 THEN us END) / 1000.0 AS p95_ms FROM ranked GROUP BY type";

    // Times are microseconds already: a slice is an integer division.
    const ENDED_PER_SLICE: &'static str = "SELECT (a.ended_at - $1) / $3 AS slice, \
         sum(a.outcome = 'completed') AS completed, sum(a.outcome = 'failed') AS failed \
         FROM quern_job_attempts a \
         WHERE a.ended_at >= $1 AND a.ended_at <= $2 AND a.outcome IN ('completed', 'failed') GROUP BY 1";

    async fn rollout_written(&self, _job_type: &str) {
        self.rollouts_changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    async fn listen_for_rollouts(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        Ok(Box::new(SqliteWakeups { receiver: self.rollouts_changed.subscribe() }))
    }

    async fn take_lead(&self) -> Result<Option<Box<dyn LeaderLock>>, StoreError> {
        // One process serves the file: it always leads.
        Ok(Some(Box::new(SoleProcess)))
    }
}

//! How PostgreSQL runs the shared statements (`shared/`), and the few that
//! differ on it: percentiles and time slices in its own functions, rollout
//! changes announced by NOTIFY, the maintenance lead as an advisory lock.

use sqlx::postgres::PgRow;
use sqlx::query::Query;

use super::*;
use crate::LeaderLock;
use crate::shared::{Backend, Param, Role, Sql};

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

impl PostgresStore {
    fn pool_for(&self, role: Role) -> &PgPool {
        match role {
            // A lookup that writes nothing runs on `lookups` (see `fetch`).
            Role::Read | Role::Lookup | Role::Write => &self.pool,
            Role::Relaxed => &self.relaxed,
        }
    }
}

fn bound<'q>(sql: impl Sql, params: &[Param<'q>]) -> PgQuery<'q> {
    params.iter().fold(sqlx::query(sql), |query, param| match *param {
        Param::Text(text) => query.bind(text),
        Param::OptText(text) => query.bind(text),
        Param::Bytes(bytes) => query.bind(bytes),
        Param::SmallInt(n) => query.bind(n),
        Param::Int(n) => query.bind(n),
        Param::BigInt(n) => query.bind(n),
        Param::Bool(flag) => query.bind(flag),
        Param::Uuid(id) => query.bind(id),
        Param::Time(at) => query.bind(at),
        Param::Json(value) => query.bind(value),
    })
}

#[async_trait]
impl Backend for PostgresStore {
    type Row = PgRow;

    async fn fetch(&self, role: Role, sql: impl Sql, params: &[Param<'_>]) -> Result<Vec<PgRow>, StoreError> {
        if role == Role::Lookup {
            // A static statement's text clones for free, should the lookup run again.
            let sql = sql.into_sql_str();
            return self.lookups.fetch_all(|| bound(sql.clone(), params)).await;
        }
        Ok(bound(sql, params).fetch_all(self.pool_for(role)).await?)
    }

    async fn execute(&self, role: Role, sql: impl Sql, params: &[Param<'_>]) -> Result<u64, StoreError> {
        Ok(bound(sql, params).execute(self.pool_for(role)).await?.rows_affected())
    }

    // percentile_disc is the nearest-rank percentile.
    const RUN_TIMES: &'static str = "SELECT j.type, CASE WHEN $2 THEN a.handler_version END AS handler_version, \
         avg(EXTRACT(EPOCH FROM a.ended_at - a.started_at) * 1000)::float8 AS avg_ms, \
         (percentile_disc(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM a.ended_at - a.started_at) * 1000))::float8 \
         AS p95_ms FROM quern_job_attempts a JOIN quern_jobs j ON j.id = a.job_id \
         WHERE a.ended_at >= $1 AND a.outcome = 'completed' GROUP BY 1, 2";

    const LATENCIES: &'static str = "SELECT type, NULL::text AS handler_version, \
         avg(EXTRACT(EPOCH FROM completed_at - created_at) * 1000)::float8 AS avg_ms, \
         (percentile_disc(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM completed_at - created_at) * 1000))::float8 \
         AS p95_ms FROM quern_jobs WHERE status = 'completed' AND completed_at >= $1 GROUP BY 1";

    const ENDED_PER_SLICE: &'static str = "SELECT floor(EXTRACT(EPOCH FROM a.ended_at - $1) * 1000000 / $3)::int8 AS slice, \
         count(*) FILTER (WHERE a.outcome = 'completed') AS completed, \
         count(*) FILTER (WHERE a.outcome = 'failed') AS failed FROM quern_job_attempts a \
         WHERE a.ended_at >= $1 AND a.ended_at <= $2 AND a.outcome IN ('completed', 'failed') GROUP BY 1";

    async fn rollout_written(&self, job_type: &str) {
        let notified =
            sqlx::query("SELECT pg_notify($1, $2)").bind(ROLLOUTS_CHANNEL).bind(job_type).execute(&self.pool);
        if let Err(error) = notified.await {
            tracing::warn!(%error, job_type, "announcing a rollout change failed; other processes see it at their next poll");
        }
    }

    async fn listen_for_rollouts(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(ROLLOUTS_CHANNEL).await?;
        Ok(Box::new(PgWakeups { listener }))
    }

    async fn take_lead(&self) -> Result<Option<Box<dyn LeaderLock>>, StoreError> {
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
}

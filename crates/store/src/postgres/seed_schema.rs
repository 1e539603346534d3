//! The customer's own tables, moved in place: on a database where seed 000's
//! migration made `analysis_jobs` and `analysis_cache` tables, `quern migrate
//! --supabase --apply` sets them aside as `*_seed`, imports their rows into
//! quern and puts the compatibility views in their place
//! (migrations/supabase/seed_move.sql); `--revert --apply` brings them back
//! with what quern did meanwhile (seed_revert.sql). Each runs in one
//! transaction: it happens whole or not at all.

use sqlx::Row;

use super::PostgresStore;
use crate::StoreError;

/// Where the database stands with the seed's own tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeedSchema {
    /// No table of the seed's: `analysis_jobs` is quern's view, or absent.
    Absent,
    /// `analysis_jobs` is the seed's table, with these rows.
    InPlace(SeedRows),
    /// Moved aside earlier (`analysis_jobs_seed`), with these rows.
    Moved(SeedRows),
}

/// The rows of the seed's tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedRows {
    pub pending: i64,
    pub processing: i64,
    /// Completed, failed or cancelled.
    pub finished: i64,
    /// `None` when there is no `analysis_cache` table of the seed's.
    pub cache: Option<i64>,
}

/// What a revert would write back: jobs quern holds that the seed's table
/// can hold, of which unfinished (to cancel in quern), and those it cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevertPlan {
    pub back: i64,
    pub unfinished: i64,
    pub staying: i64,
}

/// The condition, over `quern_jobs q`, of a job the seed's table can hold
/// (its CHECK on the type, its uuid foreign key to auth.users); the same in
/// seed_revert.sql. No cast that could fail: the conditions are not
/// evaluated in a set order.
const FITS_THE_SEED: &str = "q.type IN ('sofia_image', 'sofia_text', 'medical_exam', 'unified_assistant', \
     'meal_plan', 'whatsapp_message') \
     AND q.user_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' \
     AND EXISTS (SELECT 1 FROM auth.users u WHERE u.id::text = lower(q.user_id))";

impl PostgresStore {
    /// Whether the seed's tables are here, moved aside, or absent.
    pub async fn seed_schema(&self) -> Result<SeedSchema, StoreError> {
        let kind = |name: &str| {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(format('%I.%I', current_schema(), $1)))",
            )
            .bind(name.to_string())
            .fetch_one(&self.pool)
        };
        let table = Some("r".to_string());
        if kind("analysis_jobs_seed").await? == table {
            let cache = kind("analysis_cache_seed").await? == table;
            return Ok(SeedSchema::Moved(
                self.seed_rows("analysis_jobs_seed", cache.then_some("analysis_cache_seed")).await?,
            ));
        }
        if kind("analysis_jobs").await? == table {
            let cache = kind("analysis_cache").await? == table;
            return Ok(SeedSchema::InPlace(self.seed_rows("analysis_jobs", cache.then_some("analysis_cache")).await?));
        }
        Ok(SeedSchema::Absent)
    }

    async fn seed_rows(&self, jobs: &'static str, cache: Option<&'static str>) -> Result<SeedRows, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE status = 'pending') AS pending, \
                    count(*) FILTER (WHERE status = 'processing') AS processing, \
                    count(*) FILTER (WHERE status NOT IN ('pending', 'processing')) AS finished FROM {jobs}"
        )))
        .fetch_one(&self.pool)
        .await?;
        let cache = match cache {
            Some(table) => Some(
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                    .fetch_one(&self.pool)
                    .await?,
            ),
            None => None,
        };
        Ok(SeedRows {
            pending: row.try_get("pending")?,
            processing: row.try_get("processing")?,
            finished: row.try_get("finished")?,
            cache,
        })
    }

    /// Moves the seed's tables aside, imports their rows and puts the views
    /// in their place, in one transaction.
    pub async fn move_seed_schema(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(include_str!("../../../../migrations/supabase/seed_move.sql")).execute(&mut *tx).await?;
        super::apply_compat_sql(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// What [`PostgresStore::revert_seed_schema`] would write back.
    pub async fn revert_plan(&self) -> Result<RevertPlan, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE {FITS_THE_SEED}) AS back, \
                    count(*) FILTER (WHERE {FITS_THE_SEED} AND q.status IN ('pending', 'processing')) AS unfinished, \
                    count(*) FILTER (WHERE NOT ({FITS_THE_SEED})) AS staying FROM quern_jobs q"
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(RevertPlan {
            back: row.try_get("back")?,
            unfinished: row.try_get("unfinished")?,
            staying: row.try_get("staying")?,
        })
    }

    /// Brings the seed's tables back with what quern did meanwhile, in one
    /// transaction.
    pub async fn revert_seed_schema(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(include_str!("../../../../migrations/supabase/seed_revert.sql")).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

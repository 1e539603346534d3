//! A fresh database per test: a new SQLite file, or a new PostgreSQL schema
//! (`QUERN_TEST_POSTGRES_URL`, default the local `test` database).

use std::str::FromStr;
use std::sync::Arc;

use quern_store::{PostgresStore, SqliteStore, Store};
use sqlx::postgres::PgConnectOptions;

pub fn postgres_url() -> String {
    std::env::var("QUERN_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Raw access for what only tests do (e.g. the customer's direct status update).
pub enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

pub struct Db {
    pub store: Arc<dyn Store>,
    pub raw: Raw,
    /// `DATABASE_URL` for a child process on the same database.
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Db {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quern.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
        Self {
            store: Arc::new(store),
            raw: Raw::Sqlite(raw),
            url: format!("sqlite://{}", path.display()),
            schema: None,
            _dir: Some(dir),
        }
    }

    pub async fn postgres() -> Self {
        let url = postgres_url();
        let schema = format!("quern_test_{}", uuid::Uuid::now_v7().simple());
        let admin = sqlx::PgPool::connect(&url).await.unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
        let options = PgConnectOptions::from_str(&url).unwrap().options([("search_path", schema.as_str())]);
        let store = PostgresStore::connect_with(options).await.unwrap();
        store.migrate().await.unwrap();
        let separator = if url.contains('?') { '&' } else { '?' };
        let child_url = format!("{url}{separator}options=-csearch_path%3D{schema}");
        Self { store: Arc::new(store), raw: Raw::Postgres(admin), url: child_url, schema: Some(schema), _dir: None }
    }

    /// Runs SQL that names tables with their schema-less names.
    pub async fn execute(&self, sql: &str) -> u64 {
        match &self.raw {
            Raw::Sqlite(pool) => {
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(pool).await.unwrap().rows_affected()
            }
            Raw::Postgres(pool) => {
                let schema = self.schema.as_deref().unwrap_or("public");
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL search_path TO {schema}")))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut *tx).await.unwrap();
                tx.commit().await.unwrap();
                done.rows_affected()
            }
        }
    }

    /// Drops the test's schema (PostgreSQL); the SQLite file goes with its directory.
    pub async fn cleanup(self) {
        if let (Raw::Postgres(pool), Some(schema)) = (&self.raw, &self.schema) {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(pool).await;
        }
    }
}

/// Supabase's roles, `auth.uid()`, `auth.role()` and `auth.users` (roles are cluster-wide:
/// created once).
pub async fn stand_in_for_supabase(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        "DO $$ BEGIN
             CREATE ROLE anon NOLOGIN;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             CREATE ROLE authenticated NOLOGIN;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         DO $$ BEGIN
             CREATE ROLE service_role NOLOGIN BYPASSRLS;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         CREATE SCHEMA IF NOT EXISTS auth;
         CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
             SELECT nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'sub', '')::uuid
         $$;
         CREATE OR REPLACE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
             SELECT nullif(current_setting('request.jwt.claims', true)::jsonb ->> 'role', '')::text
         $$;
         DO $$ BEGIN
             CREATE TABLE IF NOT EXISTS auth.users (id uuid PRIMARY KEY, email text);
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;",
    )
    .execute(pool)
    .await
    .unwrap();
}

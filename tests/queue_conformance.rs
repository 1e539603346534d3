//! The queue's contract (the `quern-conformance` library), run against SQLite
//! and PostgreSQL, each case on a fresh database file or schema.

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use quern_runtime::Runtime;
use quern_store::Store;
use support::db::Db;

impl quern_conformance::Subject for Db {
    fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn execute(&self, sql: &str) -> impl Future<Output = u64> {
        Db::execute(self, sql)
    }

    fn runtime(&self) -> Arc<Runtime> {
        support::runtime()
    }

    fn component(&self, relative: &str) -> PathBuf {
        support::dist(relative)
    }

    fn cleanup(self) -> impl Future<Output = ()> {
        Db::cleanup(self)
    }
}

quern_conformance::suite!(sqlite, Db::sqlite);
quern_conformance::suite!(postgres, Db::postgres);

/// A pooled PostgreSQL connection is pinged before use only after it has been
/// idle a second or more (not before every statement); one the server closed
/// meanwhile is then replaced, and the caller never sees the dead one.
#[tokio::test]
async fn postgres_a_pooled_connection_closed_while_idle_is_replaced_before_the_next_statement() {
    use std::str::FromStr;
    use std::time::Duration;

    let url = support::db::postgres_url();
    let admin = sqlx::PgPool::connect(&url).await.unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    let options = sqlx::postgres::PgConnectOptions::from_str(&url).unwrap();
    let store = quern_store::PostgresStore::connect_pooled(options, 1).await.unwrap();
    let backend_pid =
        || async { sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(store.pool()).await };
    let first = backend_pid().await.unwrap();
    let ended: bool =
        sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(first).fetch_one(&admin).await.unwrap();
    assert!(ended);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let gone: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
            .bind(first)
            .fetch_one(&admin)
            .await
            .unwrap();
        if gone {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "backend {first} still there 10 s after its termination");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Idle past the threshold: the next acquire pings, finds it dead, and
    // opens another.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = backend_pid().await.expect("a fresh connection, not the dead one's error");
    assert_ne!(second, first);
}

//! The read-only connections, handed out without sqlx's pool. sqlx pings a
//! connection each time it goes back to its pool; on SQLite a ping is a trip
//! to the connection's thread and back, as long as the read itself. A file
//! does not hang up, so these connections are simply lent and returned.
//!
//! A read dropped midway (its HTTP client hung up) leaves its connection
//! usable: the connection's thread finishes or abandons that statement before
//! it takes the next.

use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::{Mutex, MutexGuard, Semaphore, SemaphorePermit};

use crate::StoreError;

pub(super) struct Readers {
    connections: Vec<Mutex<SqliteConnection>>,
    /// One permit per connection not lent: whoever holds a permit finds one
    /// connection unlocked.
    available: Semaphore,
}

impl Readers {
    pub(super) async fn open(options: &SqliteConnectOptions, count: usize) -> Result<Self, StoreError> {
        let mut connections = Vec::with_capacity(count);
        for _ in 0..count {
            connections.push(Mutex::new(options.connect().await?));
        }
        Ok(Self { connections, available: Semaphore::new(count) })
    }

    /// A connection, waiting for one to come back when all are lent.
    pub(super) async fn get(&self) -> Result<Reader<'_>, StoreError> {
        let closed = || StoreError::Database(sqlx::Error::PoolClosed);
        let permit = self.available.acquire().await.map_err(|_| closed())?;
        let connection =
            self.connections.iter().find_map(|connection| connection.try_lock().ok()).ok_or_else(closed)?;
        Ok(Reader { connection, _permit: permit })
    }
}

/// A lent connection; it goes back when dropped.
pub(super) struct Reader<'a> {
    // Declared first, so dropped first: the connection is unlocked before
    // its permit is given back.
    connection: MutexGuard<'a, SqliteConnection>,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.connection
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.connection
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;

    async fn readers(count: usize) -> (tempfile::TempDir, Readers) {
        let root = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::from_str("sqlite:")
            .unwrap()
            .filename(root.path().join("r.db"))
            .create_if_missing(true);
        let readers = Readers::open(&options, count).await.unwrap();
        (root, readers)
    }

    /// Rows enough that a read of them is still streaming when dropped.
    const MANY_ROWS: &str =
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) SELECT i FROM n";

    #[tokio::test]
    async fn a_read_dropped_midway_leaves_its_connection_usable() {
        let (_root, readers) = readers(1).await;
        {
            let mut reader = readers.get().await.unwrap();
            let mut rows = sqlx::query(MANY_ROWS).fetch(&mut *reader);
            assert!(rows.next().await.unwrap().is_ok(), "the first row arrives");
            // Dropped here with most of its rows unread.
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 UNION ALL SELECT 2)")
            .fetch_one(&mut *readers.get().await.unwrap())
            .await
            .unwrap();
        assert_eq!(count, 2);
    }

    #[tokio::test]
    async fn with_every_connection_lent_a_reader_waits_for_one_to_come_back() {
        let (_root, readers) = readers(2).await;
        let first = readers.get().await.unwrap();
        let second = readers.get().await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(50), readers.get()).await;
        assert!(waiting.is_err(), "no third connection is made");
        drop(first);
        let mut third = tokio::time::timeout(Duration::from_secs(5), readers.get()).await.unwrap().unwrap();
        let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *third).await.unwrap();
        assert_eq!(one, 1);
        drop(second);
    }
}

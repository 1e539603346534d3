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

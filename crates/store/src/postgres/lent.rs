//! Connections lent without sqlx's pool, for the statements that run most:
//! key lookups (a job by its id, with or without its attempts; a cached
//! result: the app's polling and its repeated requests) and the worker's
//! claims and attempt ends. sqlx pings a pooled connection every time it
//! goes back (a `Sync` and its answer): a second round trip for each
//! one-statement use, on both sides' CPU.
//!
//! Without that ping, this module does what the ping was for:
//! - a connection is opened when first needed, so a process that serves no
//!   lookups (or runs no worker) holds none; waiting for one (free or new)
//!   gives up after the pool's acquire timeout, as the pool does;
//! - one idle for a while is pinged before it is lent (as the pool's
//!   `before_acquire` does), and replaced if the ping fails;
//! - one that fails in use (the server restarted, an operator terminated its
//!   backend) is dropped; a lookup, which changes nothing, then runs once
//!   more on a new connection, a write never (its caller decides, as with
//!   any database error);
//! - a statement dropped midway (its HTTP client hung up, its task was
//!   cancelled) takes its connection with it: the protocol state of a
//!   connection left mid-statement is not worth reasoning about for the
//!   price of one reconnect.
//!
//! Dashboard and stats reads stay on the pool: a slow aggregate never holds
//! up the lookups.

use std::time::{Duration, Instant};

use sqlx::postgres::{PgArguments, PgConnectOptions, PgRow};
use sqlx::query::Query;
use sqlx::{ConnectOptions, Connection, PgConnection, Postgres};
use tokio::sync::{Mutex, MutexGuard, Semaphore, SemaphorePermit};

use super::PING_WHEN_IDLE_FOR;
use crate::StoreError;

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

pub(super) struct LentConnections {
    options: PgConnectOptions,
    /// The longest a statement waits for a connection, free or new.
    acquire_timeout: Duration,
    slots: Vec<Mutex<Slot>>,
    /// One permit per slot not lent: whoever holds a permit finds one slot
    /// unlocked.
    available: Semaphore,
}

#[derive(Default)]
struct Slot {
    connection: Option<PgConnection>,
    last_used: Option<Instant>,
}

impl LentConnections {
    /// Up to `count` connections, none opened yet.
    pub(super) fn new(options: PgConnectOptions, count: usize, acquire_timeout: Duration) -> Self {
        let slots = (0..count).map(|_| Mutex::default()).collect();
        Self { options, acquire_timeout, slots, available: Semaphore::new(count) }
    }

    /// The rows `query` reads, on a lent connection. A read that fails
    /// because its connection broke runs once more on a new one, unless the
    /// broken connection was itself new (then the database is away, and
    /// saying so is the answer).
    pub(super) async fn fetch_all<'q>(&self, query: impl Fn() -> PgQuery<'q>) -> Result<Vec<PgRow>, StoreError> {
        let (mut lent, (mut connection, fresh)) = self.acquire().await?;
        let mut answer = query().fetch_all(&mut connection).await;
        if !fresh && answer.as_ref().is_err_and(connection_broke) {
            connection =
                tokio::time::timeout(self.acquire_timeout, self.options.connect()).await.map_err(|_| timed_out())??;
            answer = query().fetch_all(&mut connection).await;
        }
        lent.give_back(connection, &answer);
        Ok(answer?)
    }

    /// The rows a statement that writes returns, run once on a lent
    /// connection: never again, whatever happens.
    pub(super) async fn fetch_all_once<'q>(&self, query: PgQuery<'q>) -> Result<Vec<PgRow>, StoreError> {
        let (mut lent, (mut connection, _)) = self.acquire().await?;
        let answer = query.fetch_all(&mut connection).await;
        lent.give_back(connection, &answer);
        Ok(answer?)
    }

    /// A slot and its connection, taken out of it while in use (a statement
    /// dropped midway drops it too); true when the connection is new.
    async fn acquire(&self) -> Result<(Lent<'_>, (PgConnection, bool)), StoreError> {
        let acquired = tokio::time::timeout(self.acquire_timeout, async {
            let mut lent = self.lend().await?;
            let ready = lent.take_ready(&self.options).await?;
            Ok::<_, StoreError>((lent, ready))
        });
        acquired.await.map_err(|_| timed_out())?
    }

    async fn lend(&self) -> Result<Lent<'_>, StoreError> {
        let closed = || StoreError::Database(sqlx::Error::PoolClosed);
        let permit = self.available.acquire().await.map_err(|_| closed())?;
        let slot = self.slots.iter().find_map(|slot| slot.try_lock().ok()).ok_or_else(closed)?;
        Ok(Lent { slot, _permit: permit })
    }
}

/// A lent slot; it goes back when dropped, with or without a connection.
struct Lent<'a> {
    // Declared first, so dropped first: the slot is unlocked before its
    // permit is given back.
    slot: MutexGuard<'a, Slot>,
    _permit: SemaphorePermit<'a>,
}

impl Lent<'_> {
    /// Puts `connection` back in the slot, unless `answer` says it broke.
    fn give_back<T>(&mut self, connection: PgConnection, answer: &Result<T, sqlx::Error>) {
        if !answer.as_ref().is_err_and(connection_broke) {
            self.slot.connection = Some(connection);
            self.slot.last_used = Some(Instant::now());
        }
    }

    /// The slot's connection, taken out of it: the one there if it answers
    /// (pinged first when idle for a while), else a new one. True when new.
    async fn take_ready(&mut self, options: &PgConnectOptions) -> Result<(PgConnection, bool), StoreError> {
        let idle = self.slot.last_used.is_none_or(|used| used.elapsed() >= PING_WHEN_IDLE_FOR);
        if let Some(mut connection) = self.slot.connection.take()
            && (!idle || connection.ping().await.is_ok())
        {
            return Ok((connection, false));
        }
        Ok((options.connect().await?, true))
    }
}

/// Waiting for a connection took too long: the database is away (or every
/// lookup connection is stuck behind it), as the pool says in the same case.
fn timed_out() -> StoreError {
    StoreError::Database(sqlx::Error::PoolTimedOut)
}

/// Whether `error` says the connection itself is gone (rather than the
/// statement failing on a working connection): an I/O or protocol failure,
/// or the server ending the session (SQLSTATE class 08, connection
/// exception; 57P01–57P03, shutdown or termination).
fn connection_broke(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(error) => {
            error.code().is_some_and(|code| code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use sqlx::Row;

    use super::*;

    /// LentConnections on the test database under an application name of their own
    /// (so the test can find their backends), or `None` where PostgreSQL is
    /// not there and this is not CI.
    async fn lookups(count: usize) -> Option<(LentConnections, PgConnection, String)> {
        let url = std::env::var("QUERN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("quern-lookups-{}", uuid::Uuid::now_v7().simple());
        let options = PgConnectOptions::from_str(&url).unwrap().application_name(&name);
        match PgConnection::connect(&url).await {
            Ok(admin) => Some((LentConnections::new(options, count, Duration::from_secs(10)), admin, name)),
            Err(error) if std::env::var_os("CI").is_some() => panic!("PostgreSQL at {url}: {error}"),
            Err(error) => {
                eprintln!("skipped: no PostgreSQL at {url} ({error})");
                None
            }
        }
    }

    async fn backend_pid(lookups: &LentConnections) -> i32 {
        let rows = lookups.fetch_all(|| sqlx::query("SELECT pg_backend_pid()")).await.unwrap();
        rows[0].get(0)
    }

    async fn backends_named(admin: &mut PgConnection, name: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(name)
            .fetch_one(admin)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_lookup_whose_backend_was_terminated_runs_again_on_a_new_connection() {
        let Some((lookups, mut admin, name)) = lookups(1).await else { return };
        let first = backend_pid(&lookups).await;
        let terminated: bool =
            sqlx::query_scalar("SELECT pg_terminate_backend($1)").bind(first).fetch_one(&mut admin).await.unwrap();
        assert!(terminated);
        let deadline = Instant::now() + Duration::from_secs(10);
        while backends_named(&mut admin, &name).await > 0 {
            assert!(Instant::now() < deadline, "the terminated backend is gone within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Lent at once (not idle long enough to be pinged): the read meets
        // the dead connection, and runs again on a new one.
        let second = backend_pid(&lookups).await;
        assert_ne!(first, second, "a new backend answered");
        assert_eq!(backend_pid(&lookups).await, second, "and its connection went back to the slot");
    }

    #[tokio::test]
    async fn a_failed_statement_keeps_its_connection_and_a_dropped_read_takes_its_connection_along() {
        let Some((lookups, _admin, _name)) = lookups(1).await else { return };
        let first = backend_pid(&lookups).await;
        let refused = lookups.fetch_all(|| sqlx::query("SELECT 1 / 0")).await;
        assert!(refused.is_err(), "division by zero is an error");
        assert_eq!(backend_pid(&lookups).await, first, "a statement's error leaves the connection usable");

        let slow = lookups.fetch_all(|| sqlx::query("SELECT pg_sleep(30)"));
        assert!(tokio::time::timeout(Duration::from_millis(100), slow).await.is_err(), "dropped midway");
        let after = tokio::time::timeout(Duration::from_secs(5), backend_pid(&lookups)).await;
        let after = after.expect("the next lookup does not wait behind the abandoned one");
        assert_ne!(after, first, "the abandoned connection went with its read");
    }

    #[tokio::test]
    async fn a_database_that_never_answers_fails_the_lookup_after_the_acquire_timeout() {
        // A listener that accepts and then says nothing, as a hung server would.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let options = PgConnectOptions::new().host("127.0.0.1").port(port).username("quern");
        let lookups = LentConnections::new(options, 1, Duration::from_millis(200));
        let started = Instant::now();
        let answer = lookups.fetch_all(|| sqlx::query("SELECT 1")).await;
        assert!(matches!(answer, Err(StoreError::Database(sqlx::Error::PoolTimedOut))), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "gave up at the timeout, not later");
        drop(silent);
    }

    #[test]
    fn only_a_lost_session_counts_as_a_broken_connection() {
        assert!(connection_broke(&sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))));
        assert!(connection_broke(&sqlx::Error::Protocol("unexpected message".into())));
        assert!(!connection_broke(&sqlx::Error::RowNotFound));
    }
}

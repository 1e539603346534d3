//! Group commit of enqueues. Callers that enqueue at about the same time
//! (concurrent `POST /v1/jobs` requests) share one transaction: each hands
//! its job in and waits for the commit that stores it.
//!
//! One flush is in flight at a time; the jobs handed in meanwhile are written
//! together by the next one, so nobody picks a batch size and nobody waits
//! for a timer: a lone enqueue is written at once, as it would be alone. Each
//! job is checked against its owner's limit as if the batch had been enqueued
//! one job after another, so limits stay exact.
//!
//! The flush runs in a task of its own, started when a job arrives and none
//! is running, and ending when nothing waits: a caller that goes away (its
//! HTTP client hung up) abandons its answer, never the others' commit.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use tokio::sync::oneshot;

use quern_store::{Job, LimitedJob, NewJob, Store, StoreError};

/// The most jobs one transaction takes.
const MAX_BATCH: usize = 500;

/// A job handed in, and whom to answer.
struct Waiting {
    job: LimitedJob,
    reply: oneshot::Sender<Result<Job, StoreError>>,
}

#[derive(Default)]
struct State {
    waiting: Vec<Waiting>,
    flushing: bool,
}

pub(crate) struct GroupCommit {
    store: Arc<dyn Store>,
    state: Arc<Mutex<State>>,
}

impl GroupCommit {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store, state: Arc::default() }
    }

    /// Inserts `job` (refused when its owner is at `limit`) in the next
    /// commit, and answers once that commit is done.
    pub(crate) async fn enqueue(&self, job: NewJob, limit: Option<u32>) -> Result<Job, StoreError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = lock(&self.state);
            state.waiting.push(Waiting { job: LimitedJob { job, max_unfinished_per_user: limit }, reply });
            !std::mem::replace(&mut state.flushing, true)
        };
        if start {
            tokio::spawn(flush_until_idle(self.store.clone(), self.state.clone()));
        }
        // Dropped unanswered only when the flushing task itself was dropped
        // (its runtime shutting down): the job's fate is then unknown.
        answer.await.unwrap_or(Err(StoreError::Database(sqlx::Error::PoolClosed)))
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes what waits, batch after batch, until nothing does.
async fn flush_until_idle(store: Arc<dyn Store>, state: Arc<Mutex<State>>) {
    let mut abandoned = Abandoned(Some(state.clone()));
    loop {
        let batch: Vec<Waiting> = {
            let mut state = lock(&state);
            if state.waiting.is_empty() {
                // In the same critical section as the look: a job handed in
                // after it starts a flusher of its own.
                state.flushing = false;
                abandoned.0 = None;
                return;
            }
            let taken = state.waiting.len().min(MAX_BATCH);
            state.waiting.drain(..taken).collect()
        };
        flush(store.as_ref(), batch).await;
    }
}

/// Writes one batch and answers each job in it.
async fn flush(store: &dyn Store, batch: Vec<Waiting>) {
    let now = Utc::now();
    let batch = match <[Waiting; 1]>::try_from(batch) {
        // Nothing to share: the single-job path is the cheapest there is
        // (on PostgreSQL without a limit, one statement).
        Ok([Waiting { job, reply }]) => {
            let _ = reply.send(store.enqueue(&job, now).await);
            return;
        }
        Err(batch) => batch,
    };
    let (jobs, replies): (Vec<LimitedJob>, Vec<_>) =
        batch.into_iter().map(|waiting| (waiting.job, waiting.reply)).unzip();
    match store.enqueue_each(&jobs, now).await {
        Ok(answers) => {
            metrics::histogram!(crate::telemetry::ENQUEUE_BATCH).record(jobs.len() as f64);
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        // The database refused the transaction, so nothing was written: one
        // job's problem must not become the others', so each is tried alone
        // and gets its own answer.
        Err(error) if crate::completer::refused_by_database(&error) => {
            tracing::warn!(%error, jobs = jobs.len(), "the database refused a batch of enqueues; writing them one by one");
            for (limited, reply) in jobs.into_iter().zip(replies) {
                let _ = reply.send(store.enqueue(&limited, now).await);
            }
        }
        // The database is away: every job of the batch fails alike, at once,
        // rather than each waiting out the same connection error in turn.
        Err(error) => {
            let message = error.to_string();
            for reply in replies {
                let _ = reply.send(Err(StoreError::Database(sqlx::Error::Io(std::io::Error::other(message.clone())))));
            }
        }
    }
}

/// When the flushing task is dropped before it is done (its runtime shutting
/// down, a panic), the jobs still waiting are dropped with their replies, so
/// their callers hear an error instead of waiting forever, and a later job
/// starts a flusher again.
struct Abandoned(Option<Arc<Mutex<State>>>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            let mut state = lock(&state);
            state.flushing = false;
            state.waiting.clear();
        }
    }
}

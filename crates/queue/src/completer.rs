//! Group commit of attempt ends. Every job of a worker hands its end to the
//! worker's [`Completer`] and waits for the commit that records it; one
//! statement and one commit then record many ends.
//!
//! One flush is in flight at a time, and the ends that arrive meanwhile are
//! written together by the next one, so a busy worker commits in batches
//! without anyone choosing a batch size. A flush waits up to `delay` for more
//! ends only while other claimed jobs of the worker are still running; when
//! none are, a lone end is written at once, as fast as a single write.
//!
//! Nothing is acknowledged before its commit: a worker killed with ends still
//! waiting here loses them, and those jobs run again once their leases lapse.
//! When the database is away, a batch is retried while the leases of its
//! jobs last; past that, another worker may already have the job, and the
//! store would refuse the stale end anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use quern_store::{AttemptEnd, AttemptOutcome, EndWritten, Store, StoreError, Transition};

/// How a worker batches its attempt ends.
#[derive(Debug, Clone)]
pub struct CompletionSettings {
    /// The most ends one statement writes (QUERN_COMPLETION_BATCH_MAX).
    pub max_batch: usize,
    /// How long a flush may wait for the ends of jobs still running
    /// (QUERN_COMPLETION_BATCH_DELAY_MS). It never waits when none are.
    pub delay: Duration,
}

impl Default for CompletionSettings {
    fn default() -> Self {
        Self { max_batch: 1000, delay: Duration::from_millis(1) }
    }
}

/// What became of a handed-in end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    Written(EndWritten),
    /// The database stayed away for as long as the lease lasted: nothing was
    /// written, and the job runs again once its lease lapses.
    GaveUp,
}

/// An end handed in, with when to stop retrying it and whom to answer.
struct Handed {
    end: AttemptEnd,
    give_up: Instant,
    reply: oneshot::Sender<Completion>,
}

/// The sending side, shared by the worker's jobs.
pub struct Completer {
    sender: mpsc::Sender<Handed>,
    /// Claimed jobs whose end has not been handed in yet.
    outstanding: Arc<AtomicUsize>,
    lease: Duration,
    closing: CancellationToken,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Statements written so far (each one commit).
    flushes: Arc<AtomicU64>,
    /// Ends handed in and not yet answered.
    waiting: AtomicUsize,
}

impl Completer {
    pub fn start(store: Arc<dyn Store>, settings: CompletionSettings, lease: Duration) -> Self {
        let max_batch = settings.max_batch.max(1);
        // Bounded: when the database falls behind, jobs wait to hand in
        // their ends, hold their slots, and the worker stops claiming.
        let (sender, receiver) = mpsc::channel(max_batch);
        let outstanding = Arc::new(AtomicUsize::new(0));
        let closing = CancellationToken::new();
        let flushes = Arc::new(AtomicU64::new(0));
        let flusher = Flusher {
            store,
            settings: CompletionSettings { max_batch, ..settings },
            outstanding: outstanding.clone(),
            flushes: flushes.clone(),
        };
        let task = tokio::spawn(flusher.run(receiver, closing.clone()));
        Self {
            sender,
            outstanding,
            lease,
            closing,
            task: tokio::sync::Mutex::new(Some(task)),
            flushes,
            waiting: AtomicUsize::new(0),
        }
    }

    /// Counts a claimed job, whose end will come.
    pub fn expect(&self, jobs: usize) {
        self.outstanding.fetch_add(jobs, Ordering::SeqCst);
    }

    /// Hands in a claimed job's end and waits for its commit.
    pub async fn finish(&self, end: AttemptEnd) -> Completion {
        let (reply, answer) = oneshot::channel();
        tracing::debug!(job_id = %end.job_id, "attempt ended; its end waits for the next commit");
        let handed = Handed { end, give_up: Instant::now() + self.lease, reply };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // No longer outstanding before it is sent: a flusher that receives
        // the last end then sees nothing left to wait for.
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        let sent = self.sender.send(handed).await;
        let completion = match sent {
            Ok(()) => answer.await.unwrap_or(Completion::GaveUp),
            Err(_) => Completion::GaveUp,
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        completion
    }

    /// Ends handed in whose commit has not been answered yet.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Commits of attempt ends so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Writes what was handed in and stops. Call once every job has ended.
    pub async fn close(&self) {
        self.closing.cancel();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

struct Flusher {
    store: Arc<dyn Store>,
    settings: CompletionSettings,
    outstanding: Arc<AtomicUsize>,
    flushes: Arc<AtomicU64>,
}

/// Ends gathered for one flush, and who waits on each.
#[derive(Default)]
struct Batch {
    ends: Vec<AttemptEnd>,
    waiting: Vec<(Instant, oneshot::Sender<Completion>)>,
}

impl Batch {
    fn push(&mut self, handed: Handed) {
        self.ends.push(handed.end);
        self.waiting.push((handed.give_up, handed.reply));
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

impl Flusher {
    async fn run(self, mut receiver: mpsc::Receiver<Handed>, closing: CancellationToken) {
        let mut batch = Batch::default();
        let mut retry_after = RETRY_FIRST;
        loop {
            if batch.len() == 0 {
                tokio::select! {
                    handed = receiver.recv() => match handed {
                        Some(handed) => batch.push(handed),
                        None => return,
                    },
                    () = closing.cancelled() => {
                        while let Ok(handed) = receiver.try_recv() {
                            batch.push(handed);
                        }
                        if batch.len() == 0 {
                            return;
                        }
                    }
                }
            }
            self.gather(&mut receiver, &mut batch, &closing).await;
            match self.flush(&mut batch).await {
                Ok(()) => retry_after = RETRY_FIRST,
                Err(()) => {
                    tokio::time::sleep(retry_after).await;
                    retry_after = (retry_after * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Adds the ends already waiting, then, while other claimed jobs are
    /// still running, those that arrive within the delay.
    async fn gather(&self, receiver: &mut mpsc::Receiver<Handed>, batch: &mut Batch, closing: &CancellationToken) {
        let deadline = Instant::now() + self.settings.delay;
        loop {
            while batch.len() < self.settings.max_batch {
                match receiver.try_recv() {
                    Ok(handed) => batch.push(handed),
                    Err(_) => break,
                }
            }
            let others_running = self.outstanding.load(Ordering::SeqCst) > 0;
            if batch.len() >= self.settings.max_batch || !others_running || closing.is_cancelled() {
                return;
            }
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(handed)) => batch.push(handed),
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Writes the batch and answers each end. When the database refuses
    /// the statement itself (not a lost connection), the batch is written
    /// end by end so one end that can never be stored holds up no other.
    /// On a connection error, answers the ends whose lease has run out and
    /// keeps the rest for another try.
    async fn flush(&self, batch: &mut Batch) -> Result<(), ()> {
        match self.store.finish_attempts(&batch.ends, Utc::now()).await {
            Ok(written) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                metrics::histogram!(crate::telemetry::COMPLETION_BATCH).record(batch.len() as f64);
                batch.ends.clear();
                for ((_, reply), written) in batch.waiting.drain(..).zip(written) {
                    let _ = reply.send(Completion::Written(written));
                }
                Ok(())
            }
            Err(error) if refused_by_database(&error) => {
                tracing::warn!(%error, ends = batch.len(), "the database refused a batch of attempt ends; writing them one by one");
                for (end, (_, reply)) in batch.ends.drain(..).zip(batch.waiting.drain(..)) {
                    let _ = reply.send(self.flush_alone(end).await);
                }
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, ends = batch.len(), "could not record the end of attempts; retrying");
                let now = Instant::now();
                let mut kept = Batch::default();
                for (end, (give_up, reply)) in batch.ends.drain(..).zip(batch.waiting.drain(..)) {
                    if give_up <= now {
                        tracing::error!(job_id = %end.job_id, "gave up recording the end of an attempt; the job runs again when its lease lapses");
                        let _ = reply.send(Completion::GaveUp);
                    } else {
                        kept.ends.push(end);
                        kept.waiting.push((give_up, reply));
                    }
                }
                *batch = kept;
                Err(())
            }
        }
    }

    /// Writes one end; if the database refuses it, fails the job instead
    /// with the reason, since running it again would only end the same way.
    async fn flush_alone(&self, end: AttemptEnd) -> Completion {
        let refused = match self.store.finish_attempt_written(&end, Utc::now()).await {
            Ok(written) => return Completion::Written(written),
            Err(error) if refused_by_database(&error) => error,
            Err(error) => {
                tracing::error!(job_id = %end.job_id, %error, "could not record the end of an attempt; the job runs again when its lease lapses");
                return Completion::GaveUp;
            }
        };
        tracing::error!(job_id = %end.job_id, error = %refused, "the database refused this attempt's end; failing the job");
        let failed = AttemptEnd {
            transition: Transition::Fail {
                error: format!("the attempt's end could not be stored, so the job fails: {refused}"),
                outcome: AttemptOutcome::Failed,
            },
            ..end
        };
        match self.store.finish_attempt_written(&failed, Utc::now()).await {
            Ok(written) => Completion::Written(written),
            Err(error) => {
                tracing::error!(job_id = %failed.job_id, %error, "could not record the job's failure either; it runs again when its lease lapses");
                Completion::GaveUp
            }
        }
    }
}

/// The database answered and refused the statement (bad data, a broken
/// constraint): trying it again cannot succeed, unlike a lost connection.
pub(crate) fn refused_by_database(error: &StoreError) -> bool {
    matches!(error, StoreError::Database(sqlx::Error::Database(_)))
}

const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

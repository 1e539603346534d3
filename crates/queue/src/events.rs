//! Job events, pushed: one listener per process for every job's changes
//! ([`quern_store::JobChanges`]: a NOTIFY on PostgreSQL, an in-process
//! channel on SQLite), fanned out to whoever follows a job (SSE streams,
//! `?wait=` callers). A follower costs one read when it starts; after that the
//! listener reads only the followed jobs a notice names, each once however
//! many follow it, so open streams on idle jobs cost the database nothing.
//!
//! Nothing final is missed: a follower is registered before its first read,
//! the listener reads after every notice and re-reads every followed job
//! when it (re)connects or hears it lost notices, so its last read of a job
//! follows the job's last change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quern_store::{Job, JobChange, Store, StoreError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The process's job events; cheap to clone.
#[derive(Clone)]
pub struct JobEvents {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    followed: Mutex<HashMap<Uuid, watch::Sender<Option<Arc<Job>>>>>,
}

impl Shared {
    fn followed(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, watch::Sender<Option<Arc<Job>>>>> {
        self.followed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `job` to its followers (unless it is what they hold). With
    /// `first`, only when they hold nothing yet: a follower's own first read
    /// may be older than what the listener read meanwhile. The listener's
    /// reads are never stale: it reads after each notice, in order, so its
    /// last read follows the last change.
    fn publish(&self, job: Job, first: bool) {
        let followed = self.followed();
        let Some(sender) = followed.get(&job.id) else { return };
        sender.send_if_modified(|held| {
            if held.as_deref() == Some(&job) || (first && held.is_some()) {
                return false;
            }
            *held = Some(Arc::new(job));
            true
        });
    }

    /// Reads `ids` (the followed ones) and publishes them.
    async fn reread(&self, ids: Vec<Uuid>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        for job in self.store.get_many(&ids).await? {
            self.publish(job, false);
        }
        Ok(())
    }

    fn followed_among(&self, mut ids: Vec<Uuid>) -> Vec<Uuid> {
        let followed = self.followed();
        if followed.is_empty() {
            return Vec::new();
        }
        ids.retain(|id| followed.contains_key(id));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn all_followed(&self) -> Vec<Uuid> {
        self.followed().keys().copied().collect()
    }
}

impl JobEvents {
    /// Starts the process's listener; it stops with `shutdown`.
    pub fn start(store: Arc<dyn Store>, shutdown: CancellationToken) -> Self {
        let shared = Arc::new(Shared { store, followed: Mutex::default() });
        tokio::spawn(listen(shared.clone(), shutdown));
        Self { shared }
    }

    /// Follows job `id`: registers, then reads it once. `None` when there is
    /// no such job.
    pub async fn follow(&self, id: Uuid) -> Result<Option<Following>, StoreError> {
        let receiver = {
            let mut followed = self.shared.followed();
            followed.entry(id).or_insert_with(|| watch::channel(None).0).subscribe()
        };
        let following = Following { id, receiver, shared: self.shared.clone() };
        // Registered first: a change committed from here on is heard.
        match self.shared.store.get(id).await? {
            Some(job) => {
                self.shared.publish(job, true);
                Ok(Some(following))
            }
            None => Ok(None),
        }
    }

    /// How many jobs this process follows (for tests and metrics).
    pub fn followed_jobs(&self) -> usize {
        self.shared.followed().len()
    }
}

/// One follower of one job. Dropping it stops following.
pub struct Following {
    id: Uuid,
    receiver: watch::Receiver<Option<Arc<Job>>>,
    shared: Arc<Shared>,
}

impl Following {
    /// The latest snapshot (marks it seen).
    pub fn latest(&mut self) -> Arc<Job> {
        let job = self.receiver.borrow_and_update().clone();
        job.expect("a follower is handed out only after its first read")
    }

    /// Waits for a snapshot newer than the last one seen. `None` when the
    /// process's events have stopped.
    pub async fn changed(&mut self) -> Option<Arc<Job>> {
        self.receiver.changed().await.ok()?;
        self.receiver.borrow_and_update().clone()
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut followed = self.shared.followed();
        // This follower's receiver is still alive here: it is the last when
        // it is the only one.
        if followed.get(&self.id).is_some_and(|sender| sender.receiver_count() <= 1) {
            followed.remove(&self.id);
        }
    }
}

/// The listener: connects, re-reads everything followed (changes made before
/// it listened were not heard), then reads what each notice names.
async fn listen(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut changes = loop {
        match shared.store.job_changes().await {
            Ok(changes) => break changes,
            Err(error) => {
                tracing::warn!(%error, "listening for job changes failed; retrying in a second");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let reread_every = changes.reread_every();
    let mut pending_reread = true;
    loop {
        if std::mem::take(&mut pending_reread)
            && let Err(error) = shared.reread(shared.all_followed()).await
        {
            tracing::warn!(%error, "re-reading followed jobs failed; retrying in a second");
            pending_reread = true;
        }
        let retry = pending_reread.then_some(Duration::from_secs(1)).or(reread_every);
        let change = tokio::select! {
            () = shutdown.cancelled() => return,
            change = changes.next() => change,
            () = sleep_or_forever(retry) => JobChange::Missed,
        };
        match change {
            JobChange::Jobs(ids) => {
                let ids = shared.followed_among(ids);
                if let Err(error) = shared.reread(ids).await {
                    tracing::warn!(%error, "reading changed jobs failed; re-reading every followed job");
                    pending_reread = true;
                }
            }
            JobChange::Missed => pending_reread = true,
        }
    }
}

async fn sleep_or_forever(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}

//! Cache hits, counted off the request's path. Serving a cached result is a
//! read; its hit is handed to a counter and written by a task of its own,
//! together with the hits that arrive while a write is in flight (folded into
//! one count per entry). As with group commit, nobody waits on a timer: a lone
//! hit is written at once, and under load one write per entry carries many.
//! Hit counts are relaxed (the host's metrics count every hit as it happens),
//! so counts still pending when the process stops are not written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};

use quern_store::{CacheHits, Store};

#[derive(Default)]
struct State {
    /// Per entry: hits not yet written, and the latest of them.
    pending: HashMap<String, (i64, DateTime<Utc>)>,
    writing: bool,
}

pub(crate) struct HitCounter {
    store: Arc<dyn Store>,
    state: Arc<Mutex<State>>,
}

impl HitCounter {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store, state: Arc::default() }
    }

    /// Counts a hit on `key`; returns at once.
    pub(crate) fn count(&self, key: String, at: DateTime<Utc>) {
        let start = {
            let mut state = lock(&self.state);
            let entry = state.pending.entry(key).or_insert((0, at));
            entry.0 += 1;
            entry.1 = entry.1.max(at);
            !std::mem::replace(&mut state.writing, true)
        };
        if start {
            tokio::spawn(write_until_idle(self.store.clone(), self.state.clone()));
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes what is pending, again and again, until nothing is.
async fn write_until_idle(store: Arc<dyn Store>, state: Arc<Mutex<State>>) {
    let mut stopped = Stopped(Some(state.clone()));
    loop {
        let hits: Vec<CacheHits> = {
            let mut state = lock(&state);
            if state.pending.is_empty() {
                // In the same critical section as the look: a hit counted
                // after it starts a writer of its own.
                state.writing = false;
                // Disarmed: a writer started after this one must keep its flag.
                stopped.0 = None;
                return;
            }
            state.pending.drain().map(|(key, (count, last_hit_at))| CacheHits { key, count, last_hit_at }).collect()
        };
        if let Err(error) = store.count_cache_hits(&hits).await {
            tracing::warn!(%error, entries = hits.len(), "could not write cache hit counts; they are dropped");
        }
    }
}

/// When the writer is dropped unfinished (its runtime shutting down), a later
/// hit starts another.
struct Stopped(Option<Arc<Mutex<State>>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            lock(&state).writing = false;
        }
    }
}

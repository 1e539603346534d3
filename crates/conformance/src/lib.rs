//! The queue's contract, stated once as a library: every case runs on a fresh
//! database behind a [`Subject`], and a store backend proves itself by running
//! them all, as quern's SQLite and PostgreSQL backends do in
//! `tests/queue_conformance.rs`:
//!
//! ```ignore
//! struct MyDb { /* a fresh database */ }
//! impl quern_conformance::Subject for MyDb { /* … */ }
//! quern_conformance::suite!(my_backend, MyDb::fresh);
//! ```
//!
//! `suite!` expands to one `#[tokio::test]` per case, named after it, in a
//! module of the name given; the caller depends on `tokio` (macros, rt-multi-thread).
//! The worker cases load the built `echo` and `fixtures/hostile` components.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use quern_queue::worker::{Worker, WorkerSettings};
use quern_queue::{EnqueueRequest, Queue, QueueError, QueueSettings};
use quern_runtime::manifest::{CacheScope, Manifest};
use quern_runtime::registry::{Registry, read_component};
use quern_runtime::{Outcome, Runtime};
use quern_store::{
    AttemptEnd, AttemptOutcome, CacheHits, CacheWrite, CancelOutcome, Claim, JobStatus, LimitedJob, Step, Store,
    StoreError, Transition,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod attempts;
mod claims;
mod enqueue;
mod events;
mod fleet;
mod worker;

pub use attempts::{
    a_lapsed_lease_is_reaped_back_to_pending, a_lapsed_lease_on_the_last_attempt_fails_the_job,
    a_stale_attempt_end_writes_nothing, attempts_exhausted_fail_the_job_keeping_every_error,
    cancel_of_a_finished_job_is_refused, cancel_pending_is_immediate, retry_returns_the_job_to_pending_after_a_backoff,
};
pub use claims::{
    claim_marks_jobs_processing_with_a_lease, claim_skips_jobs_that_are_not_due, claim_takes_only_the_types_asked_for,
    claim_takes_the_most_urgent_across_its_types, claim_takes_the_most_urgent_and_oldest_first,
    concurrent_claimers_never_share_a_job,
};
pub use enqueue::{
    cache_hits_are_counted_atomically, concurrent_enqueues_share_commits_and_each_answer_is_what_was_stored,
    enqueue_each_checks_each_owner_limit_in_order, enqueue_each_that_fails_inserts_none,
    enqueue_refuses_bad_requests_with_clear_errors, expired_cache_entries_miss_and_are_purged,
    per_user_limit_holds_under_concurrent_enqueues, pipeline_runs_the_next_step_with_the_previous_result,
    pipeline_stops_when_a_step_fails,
};
pub use events::{a_follower_sees_each_status_until_the_end, every_change_of_a_job_is_heard_by_the_changes_listener};
pub use fleet::{
    handler_versions_and_rollouts_are_stored_and_announced, recent_attempts_and_failures_are_read_for_stats,
    workers_that_stop_leave_and_long_silent_ones_are_forgotten,
};
pub use worker::{
    worker_cancels_a_running_job_within_a_second, worker_completes_a_job_recording_result_and_version,
    worker_retries_a_job_no_sooner_than_the_delay_it_asked_for, worker_stops_a_job_cancelled_by_a_direct_status_update,
    worker_writes_cacheable_results_and_hits_are_counted,
};

use attempts::end_of;
use worker::{start_worker, wait_for_status};

/// A store under test on a fresh database, and what the cases need beside it.
pub trait Subject: Sync {
    /// The store under test, migrated, holding nothing.
    fn store(&self) -> &Arc<dyn Store>;
    /// Runs SQL directly, as a client other than quern would (the customer's
    /// app updating a job's status, for one); returns the rows it affected.
    fn execute(&self, sql: &str) -> impl Future<Output = u64>;
    /// A runtime for the worker cases (share a compile cache between tests).
    fn runtime(&self) -> Arc<Runtime>;
    /// A built component by its path under `handlers-dist/`, e.g. `echo.wasm`.
    fn component(&self, relative: &str) -> PathBuf;
    /// Drops the database (a schema, a file) once the case is over.
    fn cleanup(self) -> impl Future<Output = ()>;
}

/// One `#[tokio::test]` per case, in `mod $module`, each on a database from
/// `$open()` (an async constructor of a [`Subject`], in scope where the macro is used).
#[macro_export]
macro_rules! suite {
    ($module:ident, $open:expr) => {
        $crate::__cases!(
            $module,
            $open,
            claim_marks_jobs_processing_with_a_lease,
            claim_takes_the_most_urgent_and_oldest_first,
            claim_skips_jobs_that_are_not_due,
            claim_takes_only_the_types_asked_for,
            claim_takes_the_most_urgent_across_its_types,
            concurrent_claimers_never_share_a_job,
            retry_returns_the_job_to_pending_after_a_backoff,
            attempts_exhausted_fail_the_job_keeping_every_error,
            a_lapsed_lease_is_reaped_back_to_pending,
            a_lapsed_lease_on_the_last_attempt_fails_the_job,
            a_stale_attempt_end_writes_nothing,
            cancel_pending_is_immediate,
            cancel_of_a_finished_job_is_refused,
            worker_completes_a_job_recording_result_and_version,
            worker_cancels_a_running_job_within_a_second,
            worker_stops_a_job_cancelled_by_a_direct_status_update,
            worker_retries_a_job_no_sooner_than_the_delay_it_asked_for,
            worker_writes_cacheable_results_and_hits_are_counted,
            cache_hits_are_counted_atomically,
            expired_cache_entries_miss_and_are_purged,
            per_user_limit_holds_under_concurrent_enqueues,
            concurrent_enqueues_share_commits_and_each_answer_is_what_was_stored,
            enqueue_each_checks_each_owner_limit_in_order,
            enqueue_each_that_fails_inserts_none,
            pipeline_runs_the_next_step_with_the_previous_result,
            pipeline_stops_when_a_step_fails,
            enqueue_refuses_bad_requests_with_clear_errors,
            recent_attempts_and_failures_are_read_for_stats,
            workers_that_stop_leave_and_long_silent_ones_are_forgotten,
            handler_versions_and_rollouts_are_stored_and_announced,
            every_change_of_a_job_is_heard_by_the_changes_listener,
            a_follower_sees_each_status_until_the_end,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cases {
    ($module:ident, $open:expr, $($name:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $open().await;
                    $crate::$name(&db).await;
                    $crate::Subject::cleanup(db).await;
                }
            )*
        }
    };
}

fn queue<S: Subject>(db: &S, settings: QueueSettings) -> Arc<Queue> {
    Arc::new(Queue::new(db.store().clone(), settings))
}

fn request(user: &str, job_type: &str, input: Value) -> EnqueueRequest {
    EnqueueRequest { user_id: user.into(), job_type: job_type.into(), input, ..EnqueueRequest::default() }
}

/// Every type these tests enqueue: a claim names the types it takes.
fn any_type() -> Vec<String> {
    ["echo", "echo_cached", "hostile", "slow"].map(String::from).to_vec()
}

fn lease() -> chrono::Duration {
    chrono::Duration::seconds(30)
}

/// Claims up to `limit` due jobs of any type for `worker_id` at `now`, each
/// leased for [`lease`].
async fn claim_any(db: &impl Subject, worker_id: &str, limit: u32, now: DateTime<Utc>) -> Vec<quern_store::Job> {
    let types = any_type();
    db.store().claim(&Claim { worker_id, limit, now, lease_until: now + lease(), types: &types }).await.unwrap()
}

//! The queue's contract, stated once and run against SQLite and PostgreSQL
//! (each test on a fresh database file or schema).

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use quern::manifest::{CacheScope, Manifest};
use quern::queue::worker::{Worker, WorkerSettings};
use quern::queue::{EnqueueRequest, Queue, QueueError, QueueSettings};
use quern::runtime::Outcome;
use quern::runtime::registry::{Registry, read_component};
use quern::store::{AttemptEnd, AttemptOutcome, CancelOutcome, JobStatus, Step, Transition};
use serde_json::{Value, json};
use support::db::Db;
use support::dist;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::sqlite().await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = super::Db::postgres().await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

conformance!(
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
    pipeline_runs_the_next_step_with_the_previous_result,
    pipeline_stops_when_a_step_fails,
    enqueue_refuses_bad_requests_with_clear_errors,
    recent_attempts_and_failures_are_read_for_stats,
    workers_that_stop_leave_and_long_silent_ones_are_forgotten,
    handler_versions_and_rollouts_are_stored_and_announced,
);

fn queue(db: &Db, settings: QueueSettings) -> Arc<Queue> {
    Arc::new(Queue::new(db.store.clone(), settings))
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

async fn claim_marks_jobs_processing_with_a_lease(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({"a": 1}))).await.unwrap();
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!((job.priority, job.attempts, job.max_attempts), (5, 0, 3));

    let now = Utc::now();
    let claimed = db.store.claim("w1", 10, now, now + lease(), &any_type()).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let claimed = &claimed[0];
    assert_eq!((claimed.id, claimed.status, claimed.attempts), (job.id, JobStatus::Processing, 1));
    assert_eq!(claimed.worker_id.as_deref(), Some("w1"));
    assert!(claimed.lease_expires_at.unwrap() > now);
    assert!(
        db.store.claim("w2", 10, now, now + lease(), &any_type()).await.unwrap().is_empty(),
        "a claimed job is not claimed again"
    );
}

async fn claim_takes_the_most_urgent_and_oldest_first(db: &Db) {
    let queue = queue(db, QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    let mut ids = Vec::new();
    for priority in [5, 9, 1, 5, 3] {
        let job = queue
            .enqueue(EnqueueRequest { priority: Some(priority), ..request("u1", "echo", json!({})) })
            .await
            .unwrap();
        ids.push(job.id);
    }
    let now = Utc::now();
    let claimed: Vec<Uuid> =
        db.store.claim("w1", 3, now, now + lease(), &any_type()).await.unwrap().iter().map(|j| j.id).collect();
    assert_eq!(claimed, vec![ids[2], ids[4], ids[0]], "priority 1, then 3, then the older of the two 5s");
    let rest: Vec<Uuid> =
        db.store.claim("w1", 10, now, now + lease(), &any_type()).await.unwrap().iter().map(|j| j.id).collect();
    assert_eq!(rest, vec![ids[3], ids[1]]);
}

async fn claim_skips_jobs_that_are_not_due(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let claimed = db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap();
    let later = now + chrono::Duration::seconds(60);
    let end = end_of(
        &claimed[0],
        "w1",
        Transition::Retry { error: "busy".into(), run_at: later, outcome: AttemptOutcome::Retry },
    );
    assert!(db.store.finish_attempt(&end, now).await.unwrap());
    assert!(db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap().is_empty(), "not due yet");
    let due = db.store.claim("w1", 1, later, later + lease(), &any_type()).await.unwrap();
    assert_eq!(due[0].id, job.id);
}

async fn claim_takes_the_most_urgent_across_its_types(db: &Db) {
    let queue = queue(db, QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    let mut ids = std::collections::HashMap::new();
    for (name, job_type, priority) in [
        ("alpha-3", "alpha", 3),
        ("beta-2", "beta", 2),
        ("alpha-4", "alpha", 4),
        ("beta-9", "beta", 9),
        ("gamma-1", "gamma", 1),
    ] {
        let job = queue
            .enqueue(EnqueueRequest { priority: Some(priority), ..request("u1", job_type, json!({})) })
            .await
            .unwrap();
        ids.insert(job.id, name);
    }
    let now = Utc::now();
    let types = vec!["alpha".to_string(), "beta".to_string()];
    let names = |jobs: Vec<quern::store::Job>| jobs.iter().map(|job| ids[&job.id]).collect::<Vec<_>>();
    let first = db.store.claim("w1", 3, now, now + lease(), &types).await.unwrap();
    assert_eq!(names(first), vec!["beta-2", "alpha-3", "alpha-4"], "gamma is not this worker's");
    let rest = db.store.claim("w1", 3, now, now + lease(), &types).await.unwrap();
    assert_eq!(names(rest), vec!["beta-9"], "the rows looked at but not taken were left for later claims");
}

async fn claim_takes_only_the_types_asked_for(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let echo = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let other =
        queue.enqueue(EnqueueRequest { priority: Some(1), ..request("u1", "not_deployed", json!({})) }).await.unwrap();
    let now = Utc::now();
    let types = vec!["echo".to_string()];
    let claimed = db.store.claim("w1", 10, now, now + lease(), &types).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![echo.id]);
    assert_eq!(
        db.store.get(other.id).await.unwrap().unwrap().status,
        JobStatus::Pending,
        "left for a worker that has it"
    );
}

async fn concurrent_claimers_never_share_a_job(db: &Db) {
    const JOBS: usize = 5_000;
    const CLAIMERS: usize = 20;
    let queue = queue(db, QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    let mut enqueued = HashSet::new();
    for n in 0..JOBS {
        enqueued.insert(queue.enqueue(request(&format!("u{}", n % 50), "echo", json!({"n": n}))).await.unwrap().id);
    }
    let mut claimers = tokio::task::JoinSet::new();
    for c in 0..CLAIMERS {
        let store = db.store.clone();
        claimers.spawn(async move {
            let worker = format!("w{c}");
            let mut mine = Vec::new();
            loop {
                let now = Utc::now();
                let batch =
                    store.claim(&worker, 25, now, now + chrono::Duration::seconds(30), &any_type()).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                for job in batch {
                    assert_eq!(job.attempts, 1, "each job is claimed once, on its first attempt");
                    let end = end_of(
                        &job,
                        &worker,
                        Transition::Complete { result: json!({}), processing_time_ms: 0, next: None, cache: None },
                    );
                    assert!(store.finish_attempt(&end, Utc::now()).await.unwrap());
                    mine.push(job.id);
                }
            }
        });
    }
    let mut processed = Vec::new();
    while let Some(result) = claimers.join_next().await {
        processed.extend(result.unwrap());
    }
    let unique: HashSet<Uuid> = processed.iter().copied().collect();
    assert_eq!(processed.len(), JOBS, "every job processed exactly once");
    assert_eq!(unique, enqueued, "none skipped, none invented");
    let counts = db.store.count_by_status().await.unwrap();
    assert_eq!(counts, vec![(JobStatus::Completed, JOBS as i64)]);
}

async fn retry_returns_the_job_to_pending_after_a_backoff(db: &Db) {
    let queue = queue(db, QueueSettings { retry_base: Duration::from_millis(2000), ..QueueSettings::default() });
    queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let job = db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap().remove(0);
    let transition =
        queue.transition(&job, Outcome::Retry { reason: "upstream 503".into(), delay: None }, Duration::ZERO, now);
    let Transition::Retry { run_at, .. } = transition.clone() else { panic!("expected a retry, got {transition:?}") };
    let wait = (run_at - now).num_milliseconds();
    assert!((1600..=2400).contains(&wait), "first retry after 2 s ± 20 %, got {wait} ms");
    assert!(db.store.finish_attempt(&end_of(&job, "w1", transition), now).await.unwrap());

    let stored = db.store.get(job.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts), (JobStatus::Pending, 1));
    assert_eq!(stored.error.as_deref(), Some("upstream 503"));
    let attempts = db.store.attempts(job.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!((attempts[0].outcome, attempts[0].error.as_deref()), (AttemptOutcome::Retry, Some("upstream 503")));

    // The second retry waits twice as long.
    let again = db.store.claim("w1", 1, run_at, run_at + lease(), &any_type()).await.unwrap().remove(0);
    assert_eq!(again.attempts, 2);
    let Transition::Retry { run_at: second, .. } =
        queue.transition(&again, Outcome::Retry { reason: "x".into(), delay: None }, Duration::ZERO, run_at)
    else {
        panic!("expected a second retry")
    };
    let wait = (second - run_at).num_milliseconds();
    assert!((3200..=4800).contains(&wait), "second retry after 4 s ± 20 %, got {wait} ms");
}

async fn attempts_exhausted_fail_the_job_keeping_every_error(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job =
        queue.enqueue(EnqueueRequest { max_attempts: Some(2), ..request("u1", "echo", json!({})) }).await.unwrap();
    let mut now = Utc::now();
    for attempt in 1..=2 {
        let claimed = db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap().remove(0);
        assert_eq!(claimed.attempts, attempt);
        let reason = format!("timeout {attempt}");
        let transition = queue.transition(&claimed, Outcome::Retry { reason, delay: None }, Duration::ZERO, now);
        if let Transition::Retry { run_at, .. } = &transition {
            now = *run_at;
        }
        assert!(db.store.finish_attempt(&end_of(&claimed, "w1", transition), now).await.unwrap());
    }
    let failed = db.store.get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("timeout 2 (attempt 2 of 2; no attempts left)"));
    let errors: Vec<Option<String>> = db.store.attempts(job.id).await.unwrap().into_iter().map(|a| a.error).collect();
    assert_eq!(errors, vec![Some("timeout 1".into()), Some("timeout 2 (attempt 2 of 2; no attempts left)".into())]);
}

async fn a_lapsed_lease_is_reaped_back_to_pending(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let lapsed = now - chrono::Duration::seconds(1);
    assert_eq!(db.store.claim("dead-worker", 1, now, lapsed, &any_type()).await.unwrap().len(), 1);
    assert_eq!(queue.reap_expired_leases().await.unwrap(), 1);
    let reaped = db.store.get(job.id).await.unwrap().unwrap();
    assert_eq!(reaped.status, JobStatus::Pending);
    assert_eq!(reaped.run_at, job.run_at, "back in its place in line, due at once");
    assert!(reaped.error.as_deref().unwrap().contains("worker dead-worker stopped heartbeating"));
    assert_eq!(db.store.attempts(job.id).await.unwrap()[0].outcome, AttemptOutcome::LeaseExpired);
    assert_eq!(queue.reap_expired_leases().await.unwrap(), 0, "reaping twice changes nothing");
}

async fn a_lapsed_lease_on_the_last_attempt_fails_the_job(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job =
        queue.enqueue(EnqueueRequest { max_attempts: Some(1), ..request("u1", "echo", json!({})) }).await.unwrap();
    let now = Utc::now();
    let lapsed = now - chrono::Duration::seconds(1);
    assert_eq!(db.store.claim("dead-worker", 1, now, lapsed, &any_type()).await.unwrap().len(), 1);
    queue.reap_expired_leases().await.unwrap();
    let failed = db.store.get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(failed.error.as_deref().unwrap().contains("no attempts left"));
}

async fn a_stale_attempt_end_writes_nothing(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let claimed = db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap().remove(0);
    let complete =
        || Transition::Complete { result: json!({"late": true}), processing_time_ms: 1, next: None, cache: None };
    assert!(!db.store.finish_attempt(&end_of(&claimed, "w2", complete()), now).await.unwrap(), "another worker's end");
    let mut stale = end_of(&claimed, "w1", complete());
    stale.attempt = 7;
    assert!(!db.store.finish_attempt(&stale, now).await.unwrap(), "another attempt's end");
    assert_eq!(db.store.get(job.id).await.unwrap().unwrap().status, JobStatus::Processing);
}

async fn cancel_pending_is_immediate(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    assert_eq!(queue.cancel(job.id).await.unwrap(), CancelOutcome::Cancelled { was_running: false });
    assert_eq!(db.store.get(job.id).await.unwrap().unwrap().status, JobStatus::Cancelled);
    let now = Utc::now();
    assert!(db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap().is_empty());
}

async fn cancel_of_a_finished_job_is_refused(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let claimed = db.store.claim("w1", 1, now, now + lease(), &any_type()).await.unwrap().remove(0);
    let done = Transition::Complete { result: json!({}), processing_time_ms: 1, next: None, cache: None };
    db.store.finish_attempt(&end_of(&claimed, "w1", done), now).await.unwrap();
    let error = queue.cancel(job.id).await.unwrap_err();
    assert!(matches!(error, QueueError::AlreadyFinished { status: JobStatus::Completed, .. }));
    assert!(error.to_string().contains("already ended as completed"), "{error}");
    assert!(matches!(queue.cancel(Uuid::now_v7()).await, Err(QueueError::NotFound(_))));
}

async fn worker_completes_a_job_recording_result_and_version(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let job = running.queue.enqueue(request("u1", "echo", json!({"a": 1}))).await.unwrap();
    let done = wait_for_status(db, job.id, JobStatus::Completed).await;
    assert_eq!(done.result.as_ref().unwrap()["echo"], json!({"a": 1}));
    assert_eq!(done.handler_version.as_deref(), Some(&*running.registry.get("echo").unwrap().version));
    assert!(done.processing_time_ms.is_some());
    assert_eq!(done.progress_percent, 100);
    let attempts = db.store.attempts(job.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    let workers = db.store.workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].concurrency, 4);
    running.stop().await;
}

async fn worker_cancels_a_running_job_within_a_second(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let job = running.queue.enqueue(request("u1", "hostile", json!({"mode": "spin"}))).await.unwrap();
    wait_for_status(db, job.id, JobStatus::Processing).await;
    let cancelled_at = Instant::now();
    assert_eq!(running.queue.cancel(job.id).await.unwrap(), CancelOutcome::Cancelled { was_running: true });
    let attempt = wait_for_attempt(db, job.id).await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(1), "interrupted after {:?}", cancelled_at.elapsed());
    assert_eq!(attempt.outcome, AttemptOutcome::Cancelled);
    let job = db.store.get(job.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.result), (JobStatus::Cancelled, None));
    running.stop().await;
}

async fn worker_stops_a_job_cancelled_by_a_direct_status_update(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let job = running.queue.enqueue(request("u1", "hostile", json!({"mode": "spin"}))).await.unwrap();
    wait_for_status(db, job.id, JobStatus::Processing).await;
    // What the customer's React hook does through Supabase.
    let cancelled_at = Instant::now();
    let updated = db.execute(&format!("UPDATE quern_jobs SET status = 'cancelled' WHERE id = '{}'", job.id)).await;
    assert_eq!(updated, 1);
    let attempt = wait_for_attempt(db, job.id).await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(1), "interrupted after {:?}", cancelled_at.elapsed());
    assert_eq!(attempt.outcome, AttemptOutcome::Cancelled);
    assert_eq!(db.store.get(job.id).await.unwrap().unwrap().result, None);
    running.stop().await;
}

async fn worker_retries_a_job_no_sooner_than_the_delay_it_asked_for(db: &Db) {
    let settings = QueueSettings { retry_base: Duration::from_millis(50), ..QueueSettings::default() };
    let running = start_worker(db, settings).await;
    let input = json!({"mode": "retry", "reason": "rate limited", "delay_ms": 1500});
    let job = running
        .queue
        .enqueue(EnqueueRequest { max_attempts: Some(2), ..request("u1", "hostile", input) })
        .await
        .unwrap();
    let failed = wait_for_status(db, job.id, JobStatus::Failed).await;
    let attempts = db.store.attempts(job.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    let gap = attempts[1].started_at - attempts[0].ended_at;
    assert!(gap >= chrono::Duration::milliseconds(1500), "retried after {gap}, before the 1.5 s asked for");
    assert!(failed.error.unwrap().starts_with("rate limited (attempt 2 of 2"));
    running.stop().await;
}

async fn worker_writes_cacheable_results_and_hits_are_counted(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let input = json!({"b": [1, 2], "a": "x"});
    let job = running.queue.enqueue(request("u1", "echo_cached", input.clone())).await.unwrap();
    let done = wait_for_status(db, job.id, JobStatus::Completed).await;
    let version = running.registry.get("echo_cached").unwrap().version.clone();
    // Written with the completion: whoever sees the job completed finds it cached.
    let user = CacheScope::User;
    let key = quern::queue::cache_key::cache_key("echo_cached", &version, user, "u1", &input);
    assert_eq!(db.store.cache_entry(&key).await.unwrap().unwrap().hit_count, 0);
    let reordered = json!({"a": "x", "b": [1, 2]});
    for expected_hits in 1..=2 {
        let hit = running.queue.cached_result("echo_cached", &version, user, "u1", &reordered).await.unwrap();
        assert_eq!(hit.as_ref(), done.result.as_ref());
        assert_eq!(db.store.cache_entry(&key).await.unwrap().unwrap().hit_count, expected_hits);
    }
    assert_eq!(
        running.queue.cached_result("echo_cached", &version, user, "u2", &input).await.unwrap(),
        None,
        "another user's result is not served (the type's cache is per user)"
    );
    assert_eq!(running.queue.cached_result("echo_cached", "another-version", user, "u1", &input).await.unwrap(), None);
    assert_eq!(
        running.queue.cached_result("echo", &version, user, "u1", &input).await.unwrap(),
        None,
        "echo itself is not cacheable"
    );
    running.stop().await;
}

async fn cache_hits_are_counted_atomically(db: &Db) {
    let now = Utc::now();
    db.store.cache_put("t:v:k", "t", &json!({"r": 1}), now, now + chrono::Duration::hours(1)).await.unwrap();
    let mut hits = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let store = db.store.clone();
        hits.spawn(async move { store.cache_hit("t:v:k", Utc::now()).await.unwrap() });
    }
    while let Some(hit) = hits.join_next().await {
        assert_eq!(hit.unwrap(), Some(json!({"r": 1})));
    }
    let entry = db.store.cache_entry("t:v:k").await.unwrap().unwrap();
    assert_eq!(entry.hit_count, 20);
    assert!(entry.last_hit_at.is_some());
}

async fn expired_cache_entries_miss_and_are_purged(db: &Db) {
    let now = Utc::now();
    db.store
        .cache_put("old", "t", &json!(1), now - chrono::Duration::hours(2), now - chrono::Duration::hours(1))
        .await
        .unwrap();
    db.store.cache_put("new", "t", &json!(2), now, now + chrono::Duration::hours(1)).await.unwrap();
    assert_eq!(db.store.cache_hit("old", now).await.unwrap(), None);
    assert_eq!(db.store.purge_cache(now).await.unwrap(), 1);
    assert!(db.store.cache_entry("old").await.unwrap().is_none());
    assert!(db.store.cache_entry("new").await.unwrap().is_some());
}

async fn per_user_limit_holds_under_concurrent_enqueues(db: &Db) {
    let queue = queue(db, QueueSettings { max_unfinished_per_user: Some(5), ..QueueSettings::default() });
    let mut enqueues = tokio::task::JoinSet::new();
    for n in 0..20 {
        let queue = queue.clone();
        enqueues.spawn(async move { queue.enqueue(request("greedy", "echo", json!({"n": n}))).await });
    }
    let (mut accepted, mut refused) = (0, 0);
    while let Some(result) = enqueues.join_next().await {
        match result.unwrap() {
            Ok(_) => accepted += 1,
            Err(QueueError::TooManyActiveJobs { limit: 5 }) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((accepted, refused), (5, 15));
    assert!(queue.enqueue(request("someone-else", "echo", json!({}))).await.is_ok(), "the limit is per user");
}

async fn pipeline_runs_the_next_step_with_the_previous_result(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let next = vec![
        Step { job_type: "echo".into(), input: json!({"step": 2}) },
        Step { job_type: "echo".into(), input: json!({"step": 3}) },
    ];
    let first =
        running.queue.enqueue(EnqueueRequest { next, ..request("u9", "echo", json!({"step": 1})) }).await.unwrap();
    let mut ids = vec![first.id];
    let mut step_input = json!({"step": 1});
    for step in 2..=3 {
        let parent = wait_for_status(db, *ids.last().unwrap(), JobStatus::Completed).await;
        let child = poll_children(db, &parent).await;
        assert_eq!(child.user_id, "u9");
        assert_eq!(child.root_id, Some(first.id));
        assert_eq!(child.input["step"], step);
        assert_eq!(child.input["previous"]["echo"], step_input, "the previous result rides along");
        step_input = child.input.clone();
        ids.push(child.id);
    }
    let last = wait_for_status(db, ids[2], JobStatus::Completed).await;
    assert!(last.next_steps.is_empty());
    running.stop().await;
}

async fn pipeline_stops_when_a_step_fails(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let next = vec![Step { job_type: "echo".into(), input: json!({"never": true}) }];
    let input = json!({"mode": "panic", "message": "step one broke"});
    let first = running.queue.enqueue(EnqueueRequest { next, ..request("u1", "hostile", input) }).await.unwrap();
    wait_for_status(db, first.id, JobStatus::Failed).await;
    let counts = db.store.count_by_status().await.unwrap();
    assert_eq!(counts, vec![(JobStatus::Failed, 1)], "no next step was enqueued");
    running.stop().await;
}

async fn enqueue_refuses_bad_requests_with_clear_errors(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let error = queue.enqueue(request("u1", "echo", json!([1]))).await.unwrap_err();
    assert_eq!(error.to_string(), "input must be a JSON object, got an array");
    let error =
        queue.enqueue(EnqueueRequest { priority: Some(11), ..request("u1", "echo", json!({})) }).await.unwrap_err();
    assert_eq!(error.to_string(), "priority 11 is out of range: use 1 (most urgent) to 10");
    let next = vec![Step { job_type: "echo".into(), input: json!("text") }];
    let error = queue.enqueue(EnqueueRequest { next, ..request("u1", "echo", json!({})) }).await.unwrap_err();
    assert_eq!(error.to_string(), "pipeline step 0: input must be a JSON object, got a string");
    assert!(db.store.count_by_status().await.unwrap().is_empty(), "nothing was inserted");
}

// --- helpers ---

fn end_of(job: &quern::store::Job, worker: &str, transition: Transition) -> AttemptEnd {
    AttemptEnd {
        job_id: job.id,
        worker_id: worker.into(),
        attempt: job.attempts,
        handler_version: None,
        started_at: job.started_at.unwrap_or_else(Utc::now),
        transition,
    }
}

struct RunningWorker {
    queue: Arc<Queue>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), quern::store::StoreError>>,
}

impl RunningWorker {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A worker with `echo`, `echo_cached` (echo, cacheable) and `hostile` loaded.
async fn start_worker(db: &Db, settings: QueueSettings) -> RunningWorker {
    let registry = Registry::new(support::runtime());
    let runtime = registry.runtime().clone();
    let (echo, manifest) = read_component(&dist("echo.wasm")).unwrap();
    registry.install(runtime.load(&echo, manifest).unwrap());
    let cached = Manifest { job_type: "echo_cached".into(), cacheable: true, ..Manifest::bare("echo_cached") };
    registry.install(runtime.load(&echo, cached).unwrap());
    let (hostile, manifest) = read_component(&dist("fixtures/hostile.wasm")).unwrap();
    registry.install(runtime.load(&hostile, manifest).unwrap());

    let queue = Arc::new(Queue::new(db.store.clone(), settings));
    let worker_settings = WorkerSettings {
        id: format!("test-worker-{}", Uuid::now_v7().simple()),
        concurrency: 4,
        poll_interval: Duration::from_millis(100),
        cancel_check_interval: Duration::from_millis(50),
        ..WorkerSettings::default()
    };
    let worker = Worker::new(queue.clone(), registry.clone(), worker_settings);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    RunningWorker { queue, registry, shutdown, task }
}

async fn wait_for_status(db: &Db, id: Uuid, status: JobStatus) -> quern::store::Job {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let job = db.store.get(id).await.unwrap().unwrap();
        if job.status == status {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} is {} (error {:?}), waited for {status}", job.status, job.error);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_attempt(db: &Db, id: Uuid) -> quern::store::AttemptRecord {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(attempt) = db.store.attempts(id).await.unwrap().pop() {
            return attempt;
        }
        assert!(Instant::now() < deadline, "no attempt of {id} was recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn poll_children(db: &Db, parent: &quern::store::Job) -> quern::store::Job {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jobs = db.store.jobs_of_user(&parent.user_id, 100).await.unwrap();
        if let Some(child) = jobs.into_iter().find(|job| job.parent_id == Some(parent.id)) {
            return child;
        }
        assert!(Instant::now() < deadline, "no child of {} appeared", parent.id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn recent_attempts_and_failures_are_read_for_stats(db: &Db) {
    let queue = queue(db, QueueSettings::default());
    let before = Utc::now() - chrono::Duration::seconds(1);
    let bad = queue.enqueue(request("u1", "slow", json!({"n": 0}))).await.unwrap();
    for n in 1..=20 {
        // One user each: a user may have only so many unfinished jobs.
        queue.enqueue(request(&format!("u{n}"), "echo", json!({"n": n}))).await.unwrap();
    }
    let now = Utc::now();
    let claimed = db.store.claim("w1", 30, now, now + lease(), &any_type()).await.unwrap();
    assert_eq!(claimed.len(), 21);
    // Echo jobs ran 10, 20, … 200 ms, alternating between two versions.
    let mut ran_ms = 0;
    for job in claimed {
        let (transition, version) = if job.id == bad.id {
            (Transition::Fail { error: "upstream said no".into(), outcome: AttemptOutcome::Failed }, "v-slow".into())
        } else {
            ran_ms += 10;
            let result =
                Transition::Complete { result: json!({}), processing_time_ms: ran_ms, next: None, cache: None };
            (result, format!("v{}", ran_ms / 10 % 2))
        };
        let end = AttemptEnd {
            handler_version: Some(version),
            started_at: now - chrono::Duration::milliseconds(ran_ms as i64),
            ..end_of(&job, "w1", transition)
        };
        assert!(db.store.finish_attempt(&end, now).await.unwrap());
    }

    // Counted by the database, as the alerts and the canary judge read them.
    let mut counts = db.store.outcome_counts(before).await.unwrap();
    counts.sort_by(|a, b| (&a.job_type, &a.handler_version).cmp(&(&b.job_type, &b.handler_version)));
    let counted: Vec<(&str, Option<&str>, AttemptOutcome, u64)> =
        counts.iter().map(|c| (c.job_type.as_str(), c.handler_version.as_deref(), c.outcome, c.count)).collect();
    assert_eq!(
        counted,
        [
            ("echo", Some("v0"), AttemptOutcome::Completed, 10),
            ("echo", Some("v1"), AttemptOutcome::Completed, 10),
            ("slow", Some("v-slow"), AttemptOutcome::Failed, 1)
        ]
    );
    assert!(db.store.outcome_counts(Utc::now() + chrono::Duration::seconds(1)).await.unwrap().is_empty());

    // Run times, ranked by the database: the nearest-rank p95 of 10..=200 ms is 190 ms.
    let close = |a: f64, b: f64| (a - b).abs() < 0.01;
    let per_type = db.store.run_times(before, false).await.unwrap();
    assert_eq!(per_type.len(), 1, "only completed attempts have run times: {per_type:?}");
    let echo = &per_type[0];
    assert_eq!((echo.job_type.as_str(), echo.handler_version.as_deref()), ("echo", None));
    assert!(close(echo.avg_ms, 105.0) && close(echo.p95_ms, 190.0), "{echo:?}");
    let mut per_version = db.store.run_times(before, true).await.unwrap();
    per_version.sort_by(|a, b| a.handler_version.cmp(&b.handler_version));
    let figures: Vec<(Option<&str>, f64, f64)> =
        per_version.iter().map(|t| (t.handler_version.as_deref(), t.avg_ms, t.p95_ms)).collect();
    // v1 ran 10, 30, … 190 ms; v0 ran 20, 40, … 200 ms.
    assert_eq!(figures.len(), 2, "{figures:?}");
    assert!(figures[0].0 == Some("v0") && close(figures[0].1, 110.0) && close(figures[0].2, 200.0), "{figures:?}");
    assert!(figures[1].0 == Some("v1") && close(figures[1].1, 100.0) && close(figures[1].2, 190.0), "{figures:?}");
    assert!(db.store.run_times(Utc::now() + chrono::Duration::seconds(1), true).await.unwrap().is_empty());

    // Throughput: every end falls in the slice of its end time.
    let slice = chrono::Duration::milliseconds(100);
    let slices = db.store.ended_per_slice(before, now, slice).await.unwrap();
    let expected = (now - before).num_microseconds().unwrap() / slice.num_microseconds().unwrap();
    assert_eq!(slices.len(), 1, "{slices:?}");
    assert_eq!((slices[0].slice, slices[0].completed, slices[0].failed), (expected, 20, 1));
    assert!(db.store.ended_per_slice(before, now - chrono::Duration::milliseconds(1), slice).await.unwrap().is_empty());

    let failures = db.store.recent_failures(10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].id, failures[0].job_type.as_str()), (bad.id, "slow"));
    assert_eq!(failures[0].error.as_deref(), Some("upstream said no"));
    assert_eq!(failures[0].attempts, 1);
}

async fn workers_that_stop_leave_and_long_silent_ones_are_forgotten(db: &Db) {
    let running = start_worker(db, QueueSettings::default()).await;
    let now = Utc::now();
    let silent = quern::store::WorkerRow {
        id: "vanished".into(),
        host: "gone".into(),
        started_at: now - chrono::Duration::days(3),
        last_heartbeat_at: now - chrono::Duration::days(2),
        active_jobs: 1,
        concurrency: 4,
        version: "0.1.0".into(),
    };
    db.store.upsert_worker(&silent).await.unwrap();
    // The worker writes its row at its first heartbeat, just after it starts.
    let started = Instant::now();
    while db.store.workers().await.unwrap().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "the running worker never wrote its row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop().await;
    let left: Vec<String> = db.store.workers().await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(left, ["vanished"], "a worker that stopped cleanly removed its row");
    assert_eq!(db.store.forget_workers(now - chrono::Duration::days(1)).await.unwrap(), 1);
    assert!(db.store.workers().await.unwrap().is_empty());
}

async fn handler_versions_and_rollouts_are_stored_and_announced(db: &Db) {
    use quern::store::{Rollout, StoredVersion};
    let stored = StoredVersion {
        job_type: "probe".into(),
        version: "0123456789ab".into(),
        sha256: "0123456789ab".repeat(5) + "0123",
        component: vec![0, 97, 115, 109, 13, 0, 1, 0, 255],
        manifest: "type = \"probe\"\n".into(),
        uploaded_by: "ops".into(),
        uploaded_at: Utc::now(),
    };
    assert!(db.store.put_version(&stored).await.unwrap());
    assert!(!db.store.put_version(&stored).await.unwrap(), "the same version twice is stored once");
    let read = db.store.version("probe", "0123456789ab").await.unwrap().unwrap();
    assert_eq!((read.component, read.manifest), (stored.component.clone(), stored.manifest.clone()));
    assert!(db.store.version("probe", "ffffffffffff").await.unwrap().is_none());
    let listed = db.store.versions().await.unwrap();
    assert_eq!((listed.len(), listed[0].size_bytes), (1, 9));

    let mut changes = db.store.rollout_changes().await.unwrap();
    let rollout = Rollout {
        job_type: "probe".into(),
        active_version: Some("0123456789ab".into()),
        canary_version: Some("ba9876543210".into()),
        canary_percent: 10,
        ..Rollout::default()
    };
    db.store.put_rollout(&rollout, Utc::now()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.wait()).await.expect("a change notice");
    assert_eq!(db.store.rollouts().await.unwrap(), std::slice::from_ref(&rollout));
    let paused = Rollout { paused: true, canary_version: None, canary_percent: 0, ..rollout };
    db.store.put_rollout(&paused, Utc::now()).await.unwrap();
    assert_eq!(db.store.rollouts().await.unwrap(), [paused]);
}

//! Attempt ends: retries with backoff, exhausted attempts, lapsed leases, stale ends, cancels.

use super::*;

pub async fn retry_returns_the_job_to_pending_after_a_backoff<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings { retry_base: Duration::from_millis(2000), ..QueueSettings::default() });
    queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let job = claim_any(db, "w1", 1, now).await.remove(0);
    let transition =
        queue.transition(&job, Outcome::Retry { reason: "upstream 503".into(), delay: None }, Duration::ZERO, now);
    let Transition::Retry { run_at, .. } = transition.clone() else { panic!("expected a retry, got {transition:?}") };
    let wait = (run_at - now).num_milliseconds();
    assert!((1600..=2400).contains(&wait), "first retry after 2 s ± 20 %, got {wait} ms");
    // Written a moment after it ended (as a batched end is): the attempt
    // records when it ended, the time its retry's delay counts from.
    let ended_at = now - chrono::Duration::milliseconds(5);
    assert!(db.store().finish_attempt(&AttemptEnd { ended_at, ..end_of(&job, "w1", transition) }, now).await.unwrap());

    let stored = db.store().get(job.id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.attempts), (JobStatus::Pending, 1));
    assert_eq!(stored.error.as_deref(), Some("upstream 503"));
    let attempts = db.store().attempts(job.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!((attempts[0].outcome, attempts[0].error.as_deref()), (AttemptOutcome::Retry, Some("upstream 503")));
    assert_eq!(attempts[0].ended_at.timestamp_micros(), ended_at.timestamp_micros(), "stored to the microsecond");

    // The second retry waits twice as long.
    let again = claim_any(db, "w1", 1, run_at).await.remove(0);
    assert_eq!(again.attempts, 2);
    let Transition::Retry { run_at: second, .. } =
        queue.transition(&again, Outcome::Retry { reason: "x".into(), delay: None }, Duration::ZERO, run_at)
    else {
        panic!("expected a second retry")
    };
    let wait = (second - run_at).num_milliseconds();
    assert!((3200..=4800).contains(&wait), "second retry after 4 s ± 20 %, got {wait} ms");
}

pub async fn attempts_exhausted_fail_the_job_keeping_every_error<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job =
        queue.enqueue(EnqueueRequest { max_attempts: Some(2), ..request("u1", "echo", json!({})) }).await.unwrap();
    let mut now = Utc::now();
    for attempt in 1..=2 {
        let claimed = claim_any(db, "w1", 1, now).await.remove(0);
        assert_eq!(claimed.attempts, attempt);
        let reason = format!("timeout {attempt}");
        let transition = queue.transition(&claimed, Outcome::Retry { reason, delay: None }, Duration::ZERO, now);
        if let Transition::Retry { run_at, .. } = &transition {
            now = *run_at;
        }
        assert!(db.store().finish_attempt(&end_of(&claimed, "w1", transition), now).await.unwrap());
    }
    let failed = db.store().get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error.as_deref(), Some("timeout 2 (attempt 2 of 2; no attempts left)"));
    let errors: Vec<Option<String>> = db.store().attempts(job.id).await.unwrap().into_iter().map(|a| a.error).collect();
    assert_eq!(errors, vec![Some("timeout 1".into()), Some("timeout 2 (attempt 2 of 2; no attempts left)".into())]);
    // Read together (one round trip where the backend can), the job and its
    // attempts are what the two reads give, to the microsecond.
    let (together, attempts) = db.store().get_with_attempts(job.id).await.unwrap().unwrap();
    assert_eq!(together, failed);
    assert_eq!(attempts, db.store().attempts(job.id).await.unwrap());
    assert_eq!(db.store().get_with_attempts(Uuid::now_v7()).await.unwrap(), None);
}

/// The one due job, claimed by `dead-worker` with a lease that has lapsed.
async fn claim_by_a_dead_worker(db: &impl Subject) {
    let now = Utc::now();
    let lapsed = now - chrono::Duration::seconds(1);
    let claim = Claim { worker_id: "dead-worker", limit: 1, now, lease_until: lapsed, types: &any_type() };
    assert_eq!(db.store().claim(&claim).await.unwrap().len(), 1);
}

pub async fn a_lapsed_lease_is_reaped_back_to_pending<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    claim_by_a_dead_worker(db).await;
    assert_eq!(queue.reap_expired_leases().await.unwrap(), 1);
    let reaped = db.store().get(job.id).await.unwrap().unwrap();
    assert_eq!(reaped.status, JobStatus::Pending);
    assert_eq!(reaped.run_at, job.run_at, "back in its place in line, due at once");
    assert!(reaped.error.as_deref().unwrap().contains("worker dead-worker stopped heartbeating"));
    assert_eq!(db.store().attempts(job.id).await.unwrap()[0].outcome, AttemptOutcome::LeaseExpired);
    assert_eq!(queue.reap_expired_leases().await.unwrap(), 0, "reaping twice changes nothing");
}

pub async fn a_lapsed_lease_on_the_last_attempt_fails_the_job<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job =
        queue.enqueue(EnqueueRequest { max_attempts: Some(1), ..request("u1", "echo", json!({})) }).await.unwrap();
    claim_by_a_dead_worker(db).await;
    queue.reap_expired_leases().await.unwrap();
    let failed = db.store().get(job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert!(failed.error.as_deref().unwrap().contains("no attempts left"));
}

pub async fn a_stale_attempt_end_writes_nothing<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let claimed = claim_any(db, "w1", 1, now).await.remove(0);
    let complete =
        || Transition::Complete { result: json!({"late": true}), processing_time_ms: 1, next: None, cache: None };
    assert!(
        !db.store().finish_attempt(&end_of(&claimed, "w2", complete()), now).await.unwrap(),
        "another worker's end"
    );
    let mut stale = end_of(&claimed, "w1", complete());
    stale.attempt = 7;
    assert!(!db.store().finish_attempt(&stale, now).await.unwrap(), "another attempt's end");
    assert_eq!(db.store().get(job.id).await.unwrap().unwrap().status, JobStatus::Processing);
}

pub async fn cancel_pending_is_immediate<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    assert_eq!(queue.cancel(job.id).await.unwrap(), CancelOutcome::Cancelled { was_running: false });
    assert_eq!(db.store().get(job.id).await.unwrap().unwrap().status, JobStatus::Cancelled);
    let now = Utc::now();
    assert!(claim_any(db, "w1", 1, now).await.is_empty());
}

pub async fn cancel_of_a_finished_job_is_refused<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let claimed = claim_any(db, "w1", 1, now).await.remove(0);
    let done = Transition::Complete { result: json!({}), processing_time_ms: 1, next: None, cache: None };
    db.store().finish_attempt(&end_of(&claimed, "w1", done), now).await.unwrap();
    let error = queue.cancel(job.id).await.unwrap_err();
    assert!(matches!(error, QueueError::AlreadyFinished { status: JobStatus::Completed, .. }));
    assert!(error.to_string().contains("already ended as completed"), "{error}");
    assert!(matches!(queue.cancel(Uuid::now_v7()).await, Err(QueueError::NotFound(_))));
}

pub(crate) fn end_of(job: &quern_store::Job, worker: &str, transition: Transition) -> AttemptEnd {
    AttemptEnd {
        job_id: job.id,
        worker_id: worker.into(),
        attempt: job.attempts,
        handler_version: None,
        started_at: job.started_at.unwrap_or_else(Utc::now),
        ended_at: Utc::now(),
        transition,
    }
}

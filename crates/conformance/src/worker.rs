//! The worker on this store: results, cancels, retry delays, cached results.

use super::*;

pub async fn worker_completes_a_job_recording_result_and_version<S: Subject>(db: &S) {
    let running = start_worker(db, QueueSettings::default()).await;
    let job = running.queue.enqueue(request("u1", "echo", json!({"a": 1}))).await.unwrap();
    let done = wait_for_status(db, job.id, JobStatus::Completed).await;
    assert_eq!(done.result.as_ref().unwrap()["echo"], json!({"a": 1}));
    assert_eq!(done.handler_version.as_deref(), Some(&*running.registry.get("echo").unwrap().version));
    assert!(done.processing_time_ms.is_some());
    assert_eq!(done.progress_percent, 100);
    let attempts = db.store().attempts(job.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::Completed);
    let workers = db.store().workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].concurrency, 4);
    running.stop().await;
}

pub async fn worker_cancels_a_running_job_within_a_second<S: Subject>(db: &S) {
    let running = start_worker(db, QueueSettings::default()).await;
    let job = running.queue.enqueue(request("u1", "hostile", json!({"mode": "spin"}))).await.unwrap();
    wait_for_status(db, job.id, JobStatus::Processing).await;
    let cancelled_at = Instant::now();
    assert_eq!(running.queue.cancel(job.id).await.unwrap(), CancelOutcome::Cancelled { was_running: true });
    let attempt = wait_for_attempt(db, job.id).await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(1), "interrupted after {:?}", cancelled_at.elapsed());
    assert_eq!(attempt.outcome, AttemptOutcome::Cancelled);
    let job = db.store().get(job.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.result), (JobStatus::Cancelled, None));
    running.stop().await;
}

pub async fn worker_stops_a_job_cancelled_by_a_direct_status_update<S: Subject>(db: &S) {
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
    assert_eq!(db.store().get(job.id).await.unwrap().unwrap().result, None);
    running.stop().await;
}

pub async fn worker_retries_a_job_no_sooner_than_the_delay_it_asked_for<S: Subject>(db: &S) {
    let settings = QueueSettings { retry_base: Duration::from_millis(50), ..QueueSettings::default() };
    let running = start_worker(db, settings).await;
    let input = json!({"mode": "retry", "reason": "rate limited", "delay_ms": 1500});
    let job = running
        .queue
        .enqueue(EnqueueRequest { max_attempts: Some(2), ..request("u1", "hostile", input) })
        .await
        .unwrap();
    let failed = wait_for_status(db, job.id, JobStatus::Failed).await;
    let attempts = db.store().attempts(job.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    let gap = attempts[1].started_at - attempts[0].ended_at;
    assert!(gap >= chrono::Duration::milliseconds(1500), "retried after {gap}, before the 1.5 s asked for");
    assert!(failed.error.unwrap().starts_with("rate limited (attempt 2 of 2"));
    running.stop().await;
}

pub async fn worker_writes_cacheable_results_and_hits_are_counted<S: Subject>(db: &S) {
    let running = start_worker(db, QueueSettings::default()).await;
    let input = json!({"b": [1, 2], "a": "x"});
    let job = running.queue.enqueue(request("u1", "echo_cached", input.clone())).await.unwrap();
    let done = wait_for_status(db, job.id, JobStatus::Completed).await;
    let version = running.registry.get("echo_cached").unwrap().version.clone();
    // Written with the completion: whoever sees the job completed finds it cached.
    let user = CacheScope::User;
    let key = quern_queue::cache_key::cache_key("echo_cached", &version, user, "u1", &input);
    assert_eq!(db.store().cache_entry(&key).await.unwrap().unwrap().hit_count, 0);
    let reordered = json!({"a": "x", "b": [1, 2]});
    for expected_hits in 1..=2 {
        let hit = running.queue.cached_result("echo_cached", &version, user, "u1", &reordered).await.unwrap();
        assert_eq!(hit.as_ref(), done.result.as_ref());
        // Counted off the caller's path: written soon after.
        let deadline = Instant::now() + Duration::from_secs(5);
        while db.store().cache_entry(&key).await.unwrap().unwrap().hit_count != expected_hits {
            assert!(Instant::now() < deadline, "hit {expected_hits} was not counted within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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

pub(crate) struct RunningWorker {
    pub(crate) queue: Arc<Queue>,
    pub(crate) registry: Arc<Registry>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), quern_store::StoreError>>,
}

impl RunningWorker {
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A worker with `echo`, `echo_cached` (echo, cacheable) and `hostile` loaded.
pub(crate) async fn start_worker<S: Subject>(db: &S, settings: QueueSettings) -> RunningWorker {
    let registry = Registry::new(db.runtime());
    let runtime = registry.runtime().clone();
    let (echo, manifest) = read_component(&db.component("echo.wasm")).unwrap();
    registry.install(runtime.load(&echo, manifest).unwrap());
    let cached = Manifest { job_type: "echo_cached".into(), cacheable: true, ..Manifest::bare("echo_cached") };
    registry.install(runtime.load(&echo, cached).unwrap());
    let (hostile, manifest) = read_component(&db.component("fixtures/hostile.wasm")).unwrap();
    registry.install(runtime.load(&hostile, manifest).unwrap());

    let queue = Arc::new(Queue::new(db.store().clone(), settings));
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

pub(crate) async fn wait_for_status<S: Subject>(db: &S, id: Uuid, status: JobStatus) -> quern_store::Job {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let job = db.store().get(id).await.unwrap().unwrap();
        if job.status == status {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} is {} (error {:?}), waited for {status}", job.status, job.error);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn wait_for_attempt<S: Subject>(db: &S, id: Uuid) -> quern_store::AttemptRecord {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(attempt) = db.store().attempts(id).await.unwrap().pop() {
            return attempt;
        }
        assert!(Instant::now() < deadline, "no attempt of {id} was recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

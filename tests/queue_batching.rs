//! The queue's batched paths, on SQLite and PostgreSQL: many attempt ends in
//! one commit (each still guarded on its own), the worker's group commit and
//! local queue, bulk enqueue, and a worker killed with ends not yet written.
//!
//! One file over 400 lines on purpose: every batched path is tested on both
//! databases with one shared harness.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use quern_queue::completer::CompletionSettings;
use quern_queue::worker::{Worker, WorkerProbe, WorkerSettings};
use quern_queue::{BatchError, EnqueueRequest, MAX_BATCH, Queue, QueueError, QueueSettings};
use quern_runtime::manifest::Manifest;
use quern_runtime::registry::{Registry, read_component};
use quern_store::{
    AttemptEnd, AttemptOutcome, CacheWrite, Claim, EndWritten, Job, JobStatus, NewJob, Step, Transition,
};
use serde_json::{Value, json};
use support::db::Db;
use support::dist;
use support::workers::{handlers_dir, start_worker as start_worker_process, statuses, wait_until};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

on_both_databases!(
    a_batch_of_attempt_ends_is_written_each_by_its_own_guard,
    an_end_the_database_refuses_fails_its_job_and_holds_up_no_other,
    a_lone_completion_is_written_at_once_whatever_the_batch_delay,
    a_job_cancelled_while_its_completion_waits_in_a_batch_stays_cancelled,
    a_fast_backlog_is_claimed_ahead_of_the_slots_in_batches,
    a_worker_busy_with_a_long_job_claims_nothing_ahead,
    a_batch_enqueue_inserts_every_job_or_none,
    a_worker_killed_between_a_batch_fill_and_its_flush_loses_nothing,
);

fn queue(db: &Db) -> Arc<Queue> {
    Arc::new(Queue::new(db.store.clone(), QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() }))
}

fn request(job_type: &str, input: Value) -> EnqueueRequest {
    EnqueueRequest { user_id: "u1".into(), job_type: job_type.into(), input, ..EnqueueRequest::default() }
}

/// Claims up to `limit` due jobs of any type for worker `w1`.
async fn claim(db: &Db, limit: u32) -> Vec<Job> {
    let now = Utc::now();
    let lease_until = now + chrono::Duration::seconds(30);
    db.store.claim(&Claim { worker_id: "w1", limit, now, lease_until, types: &any_type() }).await.unwrap()
}

fn any_type() -> Vec<String> {
    vec!["echo".into()]
}

fn end(job: &Job, transition: Transition) -> AttemptEnd {
    AttemptEnd {
        job_id: job.id,
        worker_id: "w1".into(),
        attempt: job.attempts,
        handler_version: Some("v1".into()),
        started_at: job.started_at.unwrap(),
        ended_at: chrono::Utc::now(),
        transition,
    }
}

fn complete(result: Value, cache_key: Option<&str>, next: Option<NewJob>) -> Transition {
    Transition::Complete {
        result,
        processing_time_ms: 3,
        next: next.map(Box::new),
        cache: cache_key.map(|key| CacheWrite {
            key: key.into(),
            job_type: "echo".into(),
            expires_at: Utc::now() + chrono::Duration::hours(1),
        }),
    }
}

async fn a_batch_of_attempt_ends_is_written_each_by_its_own_guard(db: &Db) {
    let queue = queue(db);
    for n in 0..6 {
        queue.enqueue(request("echo", json!({ "n": n }))).await.unwrap();
    }
    let claimed = claim(db, 10).await;
    let now = Utc::now();
    let [done, retried, cancelled, stale, same_a, same_b] = <[Job; 6]>::try_from(claimed).unwrap();
    queue.cancel(cancelled.id).await.unwrap();
    let child = NewJob {
        id: Uuid::now_v7(),
        user_id: "u1".into(),
        job_type: "echo".into(),
        input: json!({"previous": {"a": 1}}),
        priority: 5,
        max_attempts: 3,
        run_at: now,
        next_steps: Vec::new(),
        parent_id: Some(done.id),
        root_id: Some(done.id),
    };
    let later = now + chrono::Duration::hours(1);
    let mut stale_end = end(&stale, complete(json!({"stale": true}), None, None));
    stale_end.attempt = 7;
    let ends = vec![
        end(&done, complete(json!({"a": 1}), Some("k:done"), Some(child.clone()))),
        end(&retried, Transition::Retry { error: "busy".into(), run_at: later, outcome: AttemptOutcome::Retry }),
        end(&cancelled, complete(json!({"too": "late"}), Some("k:cancelled"), None)),
        stale_end,
        // Two completions of one input in one batch: one cache entry.
        end(&same_a, complete(json!({"same": "a"}), Some("k:same"), None)),
        end(&same_b, complete(json!({"same": "b"}), Some("k:same"), None)),
    ];

    let written = db.store.finish_attempts(&ends, Utc::now()).await.unwrap();
    use EndWritten::{Cancelled, Recorded, Stale};
    assert_eq!(written, vec![Recorded, Recorded, Cancelled, Stale, Recorded, Recorded]);

    let job = |id| async move { db.store.get(id).await.unwrap().unwrap() };
    let finished = job(done.id).await;
    assert_eq!((finished.status, finished.result), (JobStatus::Completed, Some(json!({"a": 1}))));
    assert_eq!(db.store.cache_entry("k:done").await.unwrap().unwrap().response, json!({"a": 1}));
    let next = job(child.id).await;
    assert_eq!((next.status, next.parent_id), (JobStatus::Pending, Some(done.id)), "the pipeline's next step");

    let again = job(retried.id).await;
    assert_eq!((again.status, again.attempts, again.worker_id), (JobStatus::Pending, 1, None));
    assert_eq!(again.run_at.timestamp_millis(), later.timestamp_millis());

    let kept = job(cancelled.id).await;
    assert_eq!((kept.status, kept.result, kept.lease_expires_at), (JobStatus::Cancelled, None, None));
    assert!(db.store.cache_entry("k:cancelled").await.unwrap().is_none(), "a cancelled job's result is not cached");
    let attempt = db.store.attempts(cancelled.id).await.unwrap();
    assert_eq!(
        (attempt[0].outcome, attempt[0].error.as_deref()),
        (AttemptOutcome::Cancelled, Some("cancelled while running"))
    );
    queue.requeue(cancelled.id, 1).await.expect("its lease is cleared, so it can be retried at once");

    let untouched = job(stale.id).await;
    assert_eq!((untouched.status, untouched.worker_id.as_deref()), (JobStatus::Processing, Some("w1")));
    assert!(db.store.attempts(stale.id).await.unwrap().is_empty(), "a stale end writes nothing");

    let cached = db.store.cache_entry("k:same").await.unwrap().unwrap().response;
    assert!(cached == json!({"same": "a"}) || cached == json!({"same": "b"}), "{cached}");
}

async fn an_end_the_database_refuses_fails_its_job_and_holds_up_no_other(db: &Db) {
    use quern_queue::completer::{Completer, Completion};
    let queue = queue(db);
    for n in 0..3 {
        queue.enqueue(request("echo", json!({ "n": n }))).await.unwrap();
    }
    let claimed = claim(db, 3).await;
    let now = Utc::now();
    let [good, poisoned, other] = <[Job; 3]>::try_from(claimed).unwrap();
    // A pipeline step no database accepts (priority 0 breaks the table's check).
    let impossible = NewJob {
        id: Uuid::now_v7(),
        user_id: "u1".into(),
        job_type: "echo".into(),
        input: json!({}),
        priority: 0,
        max_attempts: 3,
        run_at: now,
        next_steps: Vec::new(),
        parent_id: Some(poisoned.id),
        root_id: Some(poisoned.id),
    };
    // A long delay: the three ends go out in one batch, once all are in.
    let settings = CompletionSettings { delay: Duration::from_secs(30), ..CompletionSettings::default() };
    let completer = Completer::start(db.store.clone(), settings, Duration::from_secs(30));
    completer.expect(3);
    let (a, b, c) = tokio::join!(
        completer.finish(end(&good, complete(json!({"ok": 1}), None, None))),
        completer.finish(end(&poisoned, complete(json!({"ok": 2}), None, Some(impossible)))),
        completer.finish(end(&other, complete(json!({"ok": 3}), None, None))),
    );
    let recorded = Completion::Written(EndWritten::Recorded);
    assert_eq!((a, b, c), (recorded, recorded, recorded), "each end is answered");
    for (job, status) in [(&good, JobStatus::Completed), (&poisoned, JobStatus::Failed), (&other, JobStatus::Completed)]
    {
        assert_eq!(status_of(db, job.id).await, status, "job {}", job.id);
    }
    let failed = db.store.get(poisoned.id).await.unwrap().unwrap();
    assert!(
        failed.error.as_deref().unwrap_or("").starts_with("the attempt's end could not be stored, so the job fails: "),
        "{:?}",
        failed.error
    );
    completer.close().await;
}

/// A worker with `echo` and `hostile` loaded.
struct Running {
    queue: Arc<Queue>,
    probe: WorkerProbe,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), quern_store::StoreError>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start_worker(db: &Db, concurrency: u32, completion_delay: Duration) -> Running {
    let registry = Registry::new(support::runtime());
    let runtime = registry.runtime().clone();
    for component in ["echo.wasm", "fixtures/hostile.wasm"] {
        let (bytes, manifest): (Vec<u8>, Manifest) = read_component(&dist(component)).unwrap();
        registry.install(runtime.load(&bytes, manifest).unwrap());
    }
    let queue = queue(db);
    let settings = WorkerSettings {
        id: format!("w-{}", Uuid::now_v7().simple()),
        concurrency,
        poll_interval: Duration::from_millis(100),
        cancel_check_interval: Duration::from_millis(50),
        completion: CompletionSettings { delay: completion_delay, ..CompletionSettings::default() },
        ..WorkerSettings::default()
    };
    let worker = Worker::new(queue.clone(), registry, settings);
    let probe = worker.probe();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Running { queue, probe, shutdown, task }
}

async fn wait_for<T>(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status_of(db: &Db, id: Uuid) -> JobStatus {
    db.store.get(id).await.unwrap().unwrap().status
}

async fn a_lone_completion_is_written_at_once_whatever_the_batch_delay(db: &Db) {
    // Were the delay applied to a lone end, it would wait a minute.
    let running = start_worker(db, 4, Duration::from_secs(60)).await;
    let job = running.queue.enqueue(request("echo", json!({"alone": true}))).await.unwrap();
    wait_for("the lone job to complete", Duration::from_secs(10), async || {
        (status_of(db, job.id).await == JobStatus::Completed).then_some(())
    })
    .await;
    running.stop().await;
}

async fn a_job_cancelled_while_its_completion_waits_in_a_batch_stays_cancelled(db: &Db) {
    // A sleeping job keeps the worker busy, so the quick job's end waits in
    // the batch for up to the (long) delay.
    let running = start_worker(db, 2, Duration::from_secs(60)).await;
    let sleeper = running.queue.enqueue(request("hostile", json!({"mode": "sleep", "ms": 1500}))).await.unwrap();
    wait_for("the sleeper to run", Duration::from_secs(10), async || {
        (status_of(db, sleeper.id).await == JobStatus::Processing).then_some(())
    })
    .await;
    let quick = running.queue.enqueue(request("echo", json!({"quick": true}))).await.unwrap();
    wait_for("the quick job's end to wait in the batch", Duration::from_secs(10), async || {
        (running.probe.ends_waiting() == 1).then_some(())
    })
    .await;
    assert_eq!(status_of(db, quick.id).await, JobStatus::Processing, "nothing is written before the batch's commit");

    running.queue.cancel(quick.id).await.unwrap();
    wait_for("the sleeper to complete, flushing the batch", Duration::from_secs(10), async || {
        (status_of(db, sleeper.id).await == JobStatus::Completed).then_some(())
    })
    .await;
    let job = wait_for("the quick job's attempt", Duration::from_secs(5), async || {
        let job = db.store.get(quick.id).await.unwrap().unwrap();
        job.lease_expires_at.is_none().then_some(job)
    })
    .await;
    assert_eq!((job.status, job.result), (JobStatus::Cancelled, None), "the cancel wins over the waiting result");
    let attempts = db.store.attempts(quick.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, AttemptOutcome::Cancelled);
    running.stop().await;
}

async fn a_fast_backlog_is_claimed_ahead_of_the_slots_in_batches(db: &Db) {
    let queue = queue(db);
    let requests = (0..400).map(|n| request("echo", json!({ "n": n }))).collect();
    let jobs = queue.enqueue_batch(requests).await.unwrap();
    let running = start_worker(db, 2, Duration::from_millis(1)).await;
    wait_for("the backlog to drain", Duration::from_secs(60), async || {
        (running.probe.ended() >= jobs.len() as u64).then_some(())
    })
    .await;
    let statements = running.probe.statements();
    assert_eq!(statements.claimed, 400);
    assert!(
        statements.claims * 4 < 400,
        "a fast backlog is claimed ahead of the two slots, several jobs a claim: {statements:?}"
    );
    assert!(statements.completion_commits < 400, "ends are committed several at a time: {statements:?}");
    for job in &jobs {
        assert_eq!(status_of(db, job.id).await, JobStatus::Completed);
    }
    running.stop().await;
}

async fn a_worker_busy_with_a_long_job_claims_nothing_ahead(db: &Db) {
    let running = start_worker(db, 1, Duration::from_millis(1)).await;
    // Fast jobs first, so the worker knows its jobs to be quick.
    let warmup = running.queue.enqueue_batch((0..20).map(|n| request("echo", json!({ "n": n }))).collect()).await;
    wait_for("the quick jobs to complete", Duration::from_secs(30), async || {
        (running.probe.ended() >= warmup.as_ref().unwrap().len() as u64).then_some(())
    })
    .await;
    let sleeper = running.queue.enqueue(request("hostile", json!({"mode": "sleep", "ms": 1500}))).await.unwrap();
    wait_for("the sleeper to have run a while", Duration::from_secs(10), async || {
        let job = db.store.get(sleeper.id).await.unwrap().unwrap();
        job.started_at.filter(|at| Utc::now() - *at > chrono::Duration::milliseconds(100)).map(|_| ())
    })
    .await;
    let waiting: Vec<Uuid> = running
        .queue
        .enqueue_batch((0..5).map(|n| request("echo", json!({ "after": n }))).collect())
        .await
        .unwrap()
        .iter()
        .map(|job| job.id)
        .collect();
    // Several wake-ups and polls later, the jobs behind the sleeper are still
    // in the database for any worker to take, not hoarded by this one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(status_of(db, sleeper.id).await, JobStatus::Processing, "the sleeper still runs");
    for id in &waiting {
        assert_eq!(status_of(db, *id).await, JobStatus::Pending);
    }
    wait_for("every job to complete", Duration::from_secs(15), async || {
        for id in &waiting {
            if status_of(db, *id).await != JobStatus::Completed {
                return None;
            }
        }
        Some(())
    })
    .await;
    running.stop().await;
}

async fn a_batch_enqueue_inserts_every_job_or_none(db: &Db) {
    let queue = queue(db);
    let mixed = vec![
        request("echo", json!({"ok": 1})),
        request("echo", json!({"ok": 2})),
        EnqueueRequest { priority: Some(11), ..request("echo", json!({"bad": "priority"})) },
        request("echo", json!("not an object")),
        EnqueueRequest {
            next: vec![Step { job_type: "echo".into(), input: json!({"then": true}) }],
            ..request("echo", json!({"ok": 3}))
        },
    ];
    match queue.enqueue_batch(mixed).await {
        Err(BatchError::Invalid(invalid)) => {
            let indexes: Vec<usize> = invalid.iter().map(|(index, _)| *index).collect();
            assert_eq!(indexes, vec![2, 3]);
            assert!(matches!(invalid[0].1, QueueError::PriorityOutOfRange(11)));
            assert!(matches!(invalid[1].1, QueueError::InputNotObject("a string")));
        }
        other => panic!("expected the invalid jobs named by index, got {other:?}"),
    }
    assert_eq!(db.store.count_unfinished().await.unwrap(), 0, "nothing of a refused batch is enqueued");

    let too_many = (0..=MAX_BATCH).map(|n| request("echo", json!({ "n": n }))).collect();
    assert!(
        matches!(queue.enqueue_batch(too_many).await, Err(BatchError::TooMany { count }) if count == MAX_BATCH + 1)
    );

    let full: Vec<_> = (0..MAX_BATCH).map(|n| request("echo", json!({ "n": n }))).collect();
    let jobs = queue.enqueue_batch(full).await.unwrap();
    assert_eq!(jobs.len(), MAX_BATCH);
    assert_eq!(db.store.count_unfinished().await.unwrap(), MAX_BATCH as i64);
    let stored = db.store.get(jobs[999].id).await.unwrap().unwrap();
    assert_eq!((stored.status, stored.input, stored.user_id.as_str()), (JobStatus::Pending, json!({"n": 999}), "u1"));
}

/// A real `quern worker` whose completions wait in a batch (a long delay, a
/// job still running) is killed with SIGKILL: nothing it ran is written,
/// and another worker runs every job again once the leases lapse, each
/// completed exactly once.
async fn a_worker_killed_between_a_batch_fill_and_its_flush_loses_nothing(db: &Db) {
    let handlers = handlers_dir();
    let env = [
        ("QUERN_LEASE_MS", "1500"),
        ("WORKER_CONCURRENCY", "4"),
        ("QUERN_COMPLETION_BATCH_DELAY_MS", "60000"),
        ("QUERN_LOG", "quern=debug"),
    ];
    let queue = queue(db);
    let sleeper = queue.enqueue(request("slow", json!({"mode": "sleep", "ms": 30_000}))).await.unwrap();
    let quick: Vec<Uuid> = queue
        .enqueue_batch(
            (0..3).map(|n| request("slow", json!({"mode": "sleep", "ms": 0, "tag": n.to_string()}))).collect(),
        )
        .await
        .unwrap()
        .iter()
        .map(|job| job.id)
        .collect();
    let mut doomed = start_worker_process(db, handlers.path(), "doomed", &env);
    let log = handlers.path().join("doomed.log");
    wait_until(Duration::from_secs(20), "the quick jobs' ends to wait in the doomed worker's batch", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        quick.iter().all(|id| {
            text.lines().any(|line| line.contains(&id.to_string()) && line.contains("waits for the next commit"))
        })
    })
    .await;
    for (id, status, worker) in statuses(db, &quick).await {
        assert_eq!((status, worker.as_deref()), (JobStatus::Processing, Some("doomed")), "job {id}: not yet written");
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();

    let _survivor = start_worker_process(db, handlers.path(), "survivor", &[("QUERN_LEASE_MS", "1500")]);
    wait_until(Duration::from_secs(30), "the quick jobs to complete elsewhere", || async {
        statuses(db, &quick).await.iter().all(|(_, status, _)| *status == JobStatus::Completed)
    })
    .await;
    for id in &quick {
        let attempts = db.store.attempts(*id).await.unwrap();
        let outcomes: Vec<_> = attempts.iter().map(|a| (a.outcome, a.worker_id.as_str())).collect();
        assert_eq!(
            outcomes,
            vec![(AttemptOutcome::LeaseExpired, "doomed"), (AttemptOutcome::Completed, "survivor")],
            "job {id} ran again after its unwritten end was lost, and completed once"
        );
    }
    let _ = sleeper;
}

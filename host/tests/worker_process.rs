//! Real `quern worker` processes on a real database: a worker killed with
//! SIGKILL loses nothing, and SIGTERM drains or releases every running job.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quern::queue::{EnqueueRequest, Queue, QueueSettings};
use quern::store::{AttemptOutcome, JobStatus};
use serde_json::json;
use support::db::Db;
use support::{cache_dir, dist};
use uuid::Uuid;

/// A handlers directory serving `slow`: the fixture component, which sleeps on request.
fn handlers_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(dist("fixtures/hostile.wasm"), dir.path().join("slow.wasm")).unwrap();
    std::fs::write(dir.path().join("slow.toml"), "type = \"slow\"\nmax_attempts = 3\n[limits]\ndeadline_s = 30\n")
        .unwrap();
    dir
}

fn start_worker(db: &Db, handlers: &Path, id: &str, env: &[(&str, &str)]) -> Child {
    let data = handlers.join(format!("data-{id}"));
    let log = std::fs::File::create(handlers.join(format!("{id}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_quern"))
        .arg("worker")
        .env("DATABASE_URL", &db.url)
        .env("QUERN_HANDLERS_DIR", handlers)
        .env("QUERN_DATA_DIR", &data)
        .env("QUERN_CACHE_DIR", cache_dir())
        .env("WORKER_ID", id)
        .env("WORKER_POLL_INTERVAL_MS", "100")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn enqueue_slow(db: &Db, count: usize, sleep_ms: u64) -> Vec<Uuid> {
    let queue =
        Queue::new(db.store.clone(), QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    let mut ids = Vec::new();
    for n in 0..count {
        let input = json!({"mode": "sleep", "ms": sleep_ms, "tag": n.to_string()});
        let request =
            EnqueueRequest { user_id: "u1".into(), job_type: "slow".into(), input, ..EnqueueRequest::default() };
        ids.push(queue.enqueue(request).await.unwrap().id);
    }
    ids
}

async fn statuses(db: &Db, ids: &[Uuid]) -> Vec<(Uuid, JobStatus, Option<String>)> {
    let mut out = Vec::new();
    for id in ids {
        let job = db.store.get(*id).await.unwrap().unwrap();
        out.push((*id, job.status, job.worker_id));
    }
    out
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for the process to exit, at most `deadline`.
async fn exit_code(child: &mut Child, deadline: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("the worker did not exit within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_jobs_run_again_elsewhere_and_all_complete() {
    let db = Db::postgres().await;
    let handlers = handlers_dir();
    let lease = [("QUERN_LEASE_MS", "1500"), ("WORKER_CONCURRENCY", "4")];
    let mut doomed = start_worker(&db, handlers.path(), "doomed", &lease);
    let ids = enqueue_slow(&db, 12, 400).await;

    wait_until(Duration::from_secs(20), "the doomed worker to hold jobs", || async {
        statuses(&db, &ids)
            .await
            .iter()
            .any(|(_, status, worker)| *status == JobStatus::Processing && worker.as_deref() == Some("doomed"))
    })
    .await;
    let mut survivor = start_worker(&db, handlers.path(), "survivor", &lease);
    doomed.kill().unwrap(); // SIGKILL: no chance to release anything
    doomed.wait().unwrap();
    let killed_at = Instant::now();

    wait_until(Duration::from_secs(30), "every job to complete", || async {
        statuses(&db, &ids).await.iter().all(|(_, status, _)| *status == JobStatus::Completed)
    })
    .await;
    eprintln!("all completed {:?} after the kill", killed_at.elapsed());

    let mut rerun = 0;
    for id in &ids {
        let attempts = db.store.attempts(*id).await.unwrap();
        let completed: Vec<_> = attempts.iter().filter(|a| a.outcome == AttemptOutcome::Completed).collect();
        assert_eq!(completed.len(), 1, "job {id} completed exactly once: {attempts:?}");
        if attempts.iter().any(|a| a.outcome == AttemptOutcome::LeaseExpired && a.worker_id == "doomed") {
            rerun += 1;
            assert_eq!(completed[0].worker_id, "survivor");
        }
    }
    assert!(rerun > 0, "at least one job was taken from the killed worker and run again");
    signal(&survivor, "TERM");
    assert_eq!(exit_code(&mut survivor, Duration::from_secs(10)).await, Some(0));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_jobs_finish_within_the_grace_period() {
    let db = Db::sqlite().await;
    let handlers = handlers_dir();
    let mut worker =
        start_worker(&db, handlers.path(), "w", &[("WORKER_CONCURRENCY", "2"), ("QUERN_SHUTDOWN_GRACE_S", "20")]);
    let ids = enqueue_slow(&db, 4, 1000).await;
    wait_until(Duration::from_secs(20), "two jobs running", || async {
        statuses(&db, &ids).await.iter().filter(|(_, s, _)| *s == JobStatus::Processing).count() == 2
    })
    .await;
    signal(&worker, "TERM");
    assert_eq!(exit_code(&mut worker, Duration::from_secs(15)).await, Some(0));

    let after = statuses(&db, &ids).await;
    let count = |status| after.iter().filter(|(_, s, _)| *s == status).count();
    assert_eq!(count(JobStatus::Processing), 0, "nothing left processing: {after:?}");
    assert_eq!(count(JobStatus::Completed), 2, "the two running jobs finished: {after:?}");
    assert_eq!(count(JobStatus::Pending), 2, "the two waiting jobs were never claimed: {after:?}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_grace_period_releases_running_jobs_to_pending() {
    let db = Db::postgres().await;
    let handlers = handlers_dir();
    let mut worker =
        start_worker(&db, handlers.path(), "w", &[("WORKER_CONCURRENCY", "2"), ("QUERN_SHUTDOWN_GRACE_S", "0")]);
    let ids = enqueue_slow(&db, 3, 20_000).await;
    wait_until(Duration::from_secs(20), "two jobs running", || async {
        statuses(&db, &ids).await.iter().filter(|(_, s, _)| *s == JobStatus::Processing).count() == 2
    })
    .await;
    signal(&worker, "TERM");
    assert_eq!(exit_code(&mut worker, Duration::from_secs(10)).await, Some(0));

    for (id, status, worker_id) in statuses(&db, &ids).await {
        assert_eq!((status, worker_id), (JobStatus::Pending, None), "job {id} is back in the queue");
        let job = db.store.get(id).await.unwrap().unwrap();
        assert_eq!(job.attempts, 0, "a released attempt does not count against the job");
    }
    db.cleanup().await;
}

//! Real `quern worker` processes on a real database: a worker killed with
//! SIGKILL loses nothing, and SIGTERM drains or releases every running job.

mod support;

use std::time::{Duration, Instant};

use quern_store::{AttemptOutcome, JobStatus};
use support::db::Db;
use support::workers::{enqueue_slow, exit_code, handlers_dir, signal, start_worker, statuses, wait_until};

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

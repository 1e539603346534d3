//! Job events: every change of a job is heard by the process's listener,
//! and a follower sees each status until the end.

use quern_queue::events::JobEvents;
use quern_store::{JobChange, JobChanges, Progress};

use super::*;

/// Waits (up to 5 s) until the listener names `id`. Nothing here cuts the
/// listener, so a lost-notices report is not hearing it.
async fn hears(changes: &mut Box<dyn JobChanges>, id: Uuid, what: &str) {
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let JobChange::Jobs(ids) = changes.next().await
                && ids.contains(&id)
            {
                return;
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "the job-changes listener did not hear {what} within 5 s");
}

pub async fn every_change_of_a_job_is_heard_by_the_changes_listener<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let mut changes = db.store().job_changes().await.unwrap();
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let other = queue.enqueue(request("u1", "slow", json!({}))).await.unwrap();
    let now = Utc::now();

    let claimed = db
        .store()
        .claim(&Claim { worker_id: "w1", limit: 1, now, lease_until: now + lease(), types: &["echo".to_string()] })
        .await
        .unwrap()
        .remove(0);
    hears(&mut changes, job.id, "a claim").await;
    let progress = Progress { job_id: job.id, percent: 40, message: "halfway".into() };
    db.store().set_progress("w1", &[progress]).await.unwrap();
    hears(&mut changes, job.id, "a progress report").await;
    let failed = Transition::Fail { error: "bad input".into(), outcome: AttemptOutcome::Failed };
    assert!(db.store().finish_attempt(&end_of(&claimed, "w1", failed), now).await.unwrap());
    hears(&mut changes, job.id, "the end of an attempt").await;
    queue.requeue(job.id, 1).await.unwrap();
    hears(&mut changes, job.id, "a retry by hand").await;
    queue.cancel(other.id).await.unwrap();
    hears(&mut changes, other.id, "a cancel").await;

    let read = db.store().get_many(&[job.id, Uuid::now_v7(), other.id]).await.unwrap();
    let mut ids: Vec<Uuid> = read.iter().map(|job| job.id).collect();
    ids.sort();
    let mut expected = vec![job.id, other.id];
    expected.sort();
    assert_eq!(ids, expected, "get_many reads the jobs that exist and skips the rest");
}

pub async fn a_follower_sees_each_status_until_the_end<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let shutdown = CancellationToken::new();
    let events = JobEvents::start(db.store().clone(), shutdown.clone());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let mut following = events.follow(job.id).await.unwrap().expect("the job exists");
    assert_eq!(following.latest().status, JobStatus::Pending);
    assert!(events.follow(Uuid::now_v7()).await.unwrap().is_none(), "no such job: nothing to follow");

    let now = Utc::now();
    let claimed = claim_any(db, "w1", 1, now).await.remove(0);
    let done = Transition::Complete { result: json!({"ok": true}), processing_time_ms: 1, next: None, cache: None };
    assert!(db.store().finish_attempt(&end_of(&claimed, "w1", done), now).await.unwrap());

    // Each change is pushed; the last one seen is the end, with its result.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let job = following.changed().await.expect("events run until shutdown");
            if job.status.is_finished() {
                return job;
            }
        }
    })
    .await
    .expect("the completion reached the follower within 5 s");
    assert_eq!((end.status, end.result.clone()), (JobStatus::Completed, Some(json!({"ok": true}))));

    drop(following);
    assert_eq!(events.followed_jobs(), 0, "a job nobody follows is forgotten");
    shutdown.cancel();
}

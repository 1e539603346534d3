//! Claims: order, due time, types, and no job claimed twice.

use super::*;

pub async fn claim_marks_jobs_processing_with_a_lease<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({"a": 1}))).await.unwrap();
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!((job.priority, job.attempts, job.max_attempts), (5, 0, 3));

    let now = Utc::now();
    let claimed = claim_any(db, "w1", 10, now).await;
    assert_eq!(claimed.len(), 1);
    let claimed = &claimed[0];
    assert_eq!((claimed.id, claimed.status, claimed.attempts), (job.id, JobStatus::Processing, 1));
    assert_eq!(claimed.worker_id.as_deref(), Some("w1"));
    assert!(claimed.lease_expires_at.unwrap() > now);
    assert!(claim_any(db, "w2", 10, now).await.is_empty(), "a claimed job is not claimed again");
}

pub async fn claim_takes_the_most_urgent_and_oldest_first<S: Subject>(db: &S) {
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
    let claimed: Vec<Uuid> = claim_any(db, "w1", 3, now).await.iter().map(|j| j.id).collect();
    assert_eq!(claimed, vec![ids[2], ids[4], ids[0]], "priority 1, then 3, then the older of the two 5s");
    let rest: Vec<Uuid> = claim_any(db, "w1", 10, now).await.iter().map(|j| j.id).collect();
    assert_eq!(rest, vec![ids[3], ids[1]]);
}

pub async fn claim_skips_jobs_that_are_not_due<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let job = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let now = Utc::now();
    let claimed = claim_any(db, "w1", 1, now).await;
    let later = now + chrono::Duration::seconds(60);
    let end = end_of(
        &claimed[0],
        "w1",
        Transition::Retry { error: "busy".into(), run_at: later, outcome: AttemptOutcome::Retry },
    );
    assert!(db.store().finish_attempt(&end, now).await.unwrap());
    assert!(claim_any(db, "w1", 1, now).await.is_empty(), "not due yet");
    let due = claim_any(db, "w1", 1, later).await;
    assert_eq!(due[0].id, job.id);
}

pub async fn claim_takes_the_most_urgent_across_its_types<S: Subject>(db: &S) {
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
    let names = |jobs: Vec<quern_store::Job>| jobs.iter().map(|job| ids[&job.id]).collect::<Vec<_>>();
    let first = db
        .store()
        .claim(&Claim { worker_id: "w1", limit: 3, now, lease_until: now + lease(), types: &types })
        .await
        .unwrap();
    assert_eq!(names(first), vec!["beta-2", "alpha-3", "alpha-4"], "gamma is not this worker's");
    let rest = db
        .store()
        .claim(&Claim { worker_id: "w1", limit: 3, now, lease_until: now + lease(), types: &types })
        .await
        .unwrap();
    assert_eq!(names(rest), vec!["beta-9"], "the rows looked at but not taken were left for later claims");
}

pub async fn claim_takes_only_the_types_asked_for<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let echo = queue.enqueue(request("u1", "echo", json!({}))).await.unwrap();
    let other =
        queue.enqueue(EnqueueRequest { priority: Some(1), ..request("u1", "not_deployed", json!({})) }).await.unwrap();
    let now = Utc::now();
    let types = vec!["echo".to_string()];
    let claimed = db
        .store()
        .claim(&Claim { worker_id: "w1", limit: 10, now, lease_until: now + lease(), types: &types })
        .await
        .unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![echo.id]);
    assert_eq!(
        db.store().get(other.id).await.unwrap().unwrap().status,
        JobStatus::Pending,
        "left for a worker that has it"
    );
}

pub async fn concurrent_claimers_never_share_a_job<S: Subject>(db: &S) {
    const JOBS: usize = 5_000;
    const CLAIMERS: usize = 20;
    let queue = queue(db, QueueSettings { max_unfinished_per_user: None, ..QueueSettings::default() });
    let mut enqueued = HashSet::new();
    for n in 0..JOBS {
        enqueued.insert(queue.enqueue(request(&format!("u{}", n % 50), "echo", json!({"n": n}))).await.unwrap().id);
    }
    let mut claimers = tokio::task::JoinSet::new();
    for c in 0..CLAIMERS {
        let store = db.store().clone();
        claimers.spawn(async move {
            let worker = format!("w{c}");
            let mut mine = Vec::new();
            loop {
                let now = Utc::now();
                let batch = store
                    .claim(&Claim {
                        worker_id: &worker,
                        limit: 25,
                        now,
                        lease_until: now + chrono::Duration::seconds(30),
                        types: &any_type(),
                    })
                    .await
                    .unwrap();
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
    let counts = db.store().count_by_status().await.unwrap();
    assert_eq!(counts, vec![(JobStatus::Completed, JOBS as i64)]);
}

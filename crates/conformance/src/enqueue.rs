//! Enqueue: the result cache, per-user limits, refusals, pipelines.

use super::*;

/// A cache entry of type `t` under `key`, kept until `expires_at`.
fn cached(key: &str, expires_at: DateTime<Utc>) -> CacheWrite {
    CacheWrite { key: key.into(), job_type: "t".into(), expires_at }
}

pub async fn cache_hits_are_counted_atomically<S: Subject>(db: &S) {
    let now = Utc::now();
    db.store().cache_put(&cached("t:v:k", now + chrono::Duration::hours(1)), &json!({"r": 1}), now).await.unwrap();
    // Twenty writers count hits at once, some folded (2 per write): all add up.
    let mut writers = tokio::task::JoinSet::new();
    for n in 0..20 {
        let store = db.store().clone();
        writers.spawn(async move {
            let hits = CacheHits { key: "t:v:k".into(), count: 1 + (n % 2), last_hit_at: Utc::now() };
            store.count_cache_hits(&[hits]).await.unwrap();
            store.cache_lookup("t:v:k", Utc::now()).await.unwrap()
        });
    }
    while let Some(read) = writers.join_next().await {
        assert_eq!(read.unwrap(), Some(json!({"r": 1})));
    }
    let entry = db.store().cache_entry("t:v:k").await.unwrap().unwrap();
    assert_eq!(entry.hit_count, 30);
    assert!(entry.last_hit_at.is_some_and(|at| at >= now));
    // Counting a hit on an entry purged meanwhile writes nothing, and is no error.
    let gone = CacheHits { key: "t:v:gone".into(), count: 1, last_hit_at: now };
    db.store().count_cache_hits(&[gone]).await.unwrap();
    assert!(db.store().cache_entry("t:v:gone").await.unwrap().is_none());
}

pub async fn expired_cache_entries_miss_and_are_purged<S: Subject>(db: &S) {
    let now = Utc::now();
    let an_hour = chrono::Duration::hours(1);
    db.store().cache_put(&cached("old", now - an_hour), &json!(1), now - an_hour * 2).await.unwrap();
    db.store().cache_put(&cached("new", now + an_hour), &json!(2), now).await.unwrap();
    assert_eq!(db.store().cache_lookup("old", now).await.unwrap(), None);
    assert_eq!(db.store().purge_cache(now).await.unwrap(), 1);
    assert!(db.store().cache_entry("old").await.unwrap().is_none());
    assert!(db.store().cache_entry("new").await.unwrap().is_some());
}

pub async fn per_user_limit_holds_under_concurrent_enqueues<S: Subject>(db: &S) {
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

pub async fn concurrent_enqueues_share_commits_and_each_answer_is_what_was_stored<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings { max_unfinished_per_user: Some(100), ..QueueSettings::default() });
    let mut enqueues = tokio::task::JoinSet::new();
    for n in 0..200 {
        let queue = queue.clone();
        enqueues.spawn(async move { queue.enqueue(request(&format!("u{}", n % 20), "echo", json!({"n": n}))).await });
    }
    let mut ids = HashSet::new();
    while let Some(answer) = enqueues.join_next().await {
        let job = answer.unwrap().expect("every user is under the limit");
        let stored = db.store().get(job.id).await.unwrap().expect("an answered enqueue is stored");
        assert_eq!(stored, job, "the answer is the job as stored");
        ids.insert(job.id);
    }
    assert_eq!(ids.len(), 200);
}

pub async fn enqueue_each_checks_each_owner_limit_in_order<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    queue.enqueue(request("a", "echo", json!({"before": true}))).await.unwrap();
    let requests = ["a", "a", "b", "a", "c", "c"].map(|user| request(user, "echo", json!({"user": user})));
    let jobs = queue.validate_batch(requests.to_vec()).unwrap();
    let limits = [Some(2), Some(2), None, Some(2), Some(1), Some(1)];
    let limited: Vec<LimitedJob> = jobs
        .iter()
        .zip(limits)
        .map(|(job, limit)| LimitedJob { job: job.clone(), max_unfinished_per_user: limit })
        .collect();
    let answers = db.store().enqueue_each(&limited, Utc::now()).await.unwrap();
    let admitted: Vec<bool> = answers.iter().map(Result::is_ok).collect();
    // `a` had one: its first fits under 2, the later two do not; `c`'s second is over 1.
    assert_eq!(admitted, [true, false, true, false, true, false]);
    assert!(matches!(&answers[1], Err(StoreError::TooManyActiveJobs { user_id, limit: 2 }) if user_id == "a"));
    for (job, admitted) in jobs.iter().zip(admitted) {
        assert_eq!(db.store().get(job.id).await.unwrap().is_some(), admitted, "only admitted jobs are stored");
    }
}

pub async fn enqueue_each_that_fails_inserts_none<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let existing = queue.enqueue(request("a", "echo", json!({}))).await.unwrap();
    let mut jobs =
        queue.validate_batch(vec![request("b", "echo", json!({})), request("c", "echo", json!({}))]).unwrap();
    jobs[1].id = existing.id;
    let limited: Vec<LimitedJob> =
        jobs.iter().map(|job| LimitedJob { job: job.clone(), max_unfinished_per_user: None }).collect();
    assert!(db.store().enqueue_each(&limited, Utc::now()).await.is_err(), "a duplicate id fails the transaction");
    assert!(db.store().get(jobs[0].id).await.unwrap().is_none(), "nothing of a failed batch is stored");
}

pub async fn pipeline_runs_the_next_step_with_the_previous_result<S: Subject>(db: &S) {
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

pub async fn pipeline_stops_when_a_step_fails<S: Subject>(db: &S) {
    let running = start_worker(db, QueueSettings::default()).await;
    let next = vec![Step { job_type: "echo".into(), input: json!({"never": true}) }];
    let input = json!({"mode": "panic", "message": "step one broke"});
    let first = running.queue.enqueue(EnqueueRequest { next, ..request("u1", "hostile", input) }).await.unwrap();
    wait_for_status(db, first.id, JobStatus::Failed).await;
    let counts = db.store().count_by_status().await.unwrap();
    assert_eq!(counts, vec![(JobStatus::Failed, 1)], "no next step was enqueued");
    running.stop().await;
}

pub async fn enqueue_refuses_bad_requests_with_clear_errors<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let error = queue.enqueue(request("u1", "echo", json!([1]))).await.unwrap_err();
    assert_eq!(error.to_string(), "input must be a JSON object, got an array");
    let error =
        queue.enqueue(EnqueueRequest { priority: Some(11), ..request("u1", "echo", json!({})) }).await.unwrap_err();
    assert_eq!(error.to_string(), "priority 11 is out of range: use 1 (most urgent) to 10");
    let next = vec![Step { job_type: "echo".into(), input: json!("text") }];
    let error = queue.enqueue(EnqueueRequest { next, ..request("u1", "echo", json!({})) }).await.unwrap_err();
    assert_eq!(error.to_string(), "pipeline step 0: input must be a JSON object, got a string");
    assert!(db.store().count_by_status().await.unwrap().is_empty(), "nothing was inserted");
}

pub(crate) async fn poll_children<S: Subject>(db: &S, parent: &quern_store::Job) -> quern_store::Job {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let jobs = db.store().jobs_of_user(&parent.user_id, 100).await.unwrap();
        if let Some(child) = jobs.into_iter().find(|job| job.parent_id == Some(parent.id)) {
            return child;
        }
        assert!(Instant::now() < deadline, "no child of {} appeared", parent.id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

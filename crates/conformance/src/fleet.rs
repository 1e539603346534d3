//! Statistics, the workers table, handler versions and rollouts.

use super::*;

pub async fn recent_attempts_and_failures_are_read_for_stats<S: Subject>(db: &S) {
    let queue = queue(db, QueueSettings::default());
    let before = Utc::now() - chrono::Duration::seconds(1);
    let bad = queue.enqueue(request("u1", "slow", json!({"n": 0}))).await.unwrap();
    for n in 1..=20 {
        // One user each: a user may have only so many unfinished jobs.
        queue.enqueue(request(&format!("u{n}"), "echo", json!({"n": n}))).await.unwrap();
    }
    let now = Utc::now();
    let claimed = claim_any(db, "w1", 30, now).await;
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
            ended_at: now,
            ..end_of(&job, "w1", transition)
        };
        assert!(db.store().finish_attempt(&end, now).await.unwrap());
    }

    // Counted by the database, as the alerts and the canary judge read them.
    let mut counts = db.store().outcome_counts(before).await.unwrap();
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
    assert!(db.store().outcome_counts(Utc::now() + chrono::Duration::seconds(1)).await.unwrap().is_empty());

    // Run times, ranked by the database: the nearest-rank p95 of 10..=200 ms is 190 ms.
    let close = |a: f64, b: f64| (a - b).abs() < 0.01;
    let per_type = db.store().run_times(before, false).await.unwrap();
    assert_eq!(per_type.len(), 1, "only completed attempts have run times: {per_type:?}");
    let echo = &per_type[0];
    assert_eq!((echo.job_type.as_str(), echo.handler_version.as_deref()), ("echo", None));
    assert!(close(echo.avg_ms, 105.0) && close(echo.p95_ms, 190.0), "{echo:?}");
    let mut per_version = db.store().run_times(before, true).await.unwrap();
    per_version.sort_by(|a, b| a.handler_version.cmp(&b.handler_version));
    let figures: Vec<(Option<&str>, f64, f64)> =
        per_version.iter().map(|t| (t.handler_version.as_deref(), t.avg_ms, t.p95_ms)).collect();
    // v1 ran 10, 30, … 190 ms; v0 ran 20, 40, … 200 ms.
    assert_eq!(figures.len(), 2, "{figures:?}");
    assert!(figures[0].0 == Some("v0") && close(figures[0].1, 110.0) && close(figures[0].2, 200.0), "{figures:?}");
    assert!(figures[1].0 == Some("v1") && close(figures[1].1, 100.0) && close(figures[1].2, 190.0), "{figures:?}");
    assert!(db.store().run_times(Utc::now() + chrono::Duration::seconds(1), true).await.unwrap().is_empty());

    // Throughput: every end falls in the slice of its end time.
    let slice = chrono::Duration::milliseconds(100);
    let slices = db.store().ended_per_slice(before, now, slice).await.unwrap();
    let expected = (now - before).num_microseconds().unwrap() / slice.num_microseconds().unwrap();
    assert_eq!(slices.len(), 1, "{slices:?}");
    assert_eq!((slices[0].slice, slices[0].completed, slices[0].failed), (expected, 20, 1));
    assert!(
        db.store().ended_per_slice(before, now - chrono::Duration::milliseconds(1), slice).await.unwrap().is_empty()
    );

    let failures = db.store().recent_failures(10).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].id, failures[0].job_type.as_str()), (bad.id, "slow"));
    assert_eq!(failures[0].error.as_deref(), Some("upstream said no"));
    assert_eq!(failures[0].attempts, 1);
}

pub async fn workers_that_stop_leave_and_long_silent_ones_are_forgotten<S: Subject>(db: &S) {
    let running = start_worker(db, QueueSettings::default()).await;
    let now = Utc::now();
    let silent = quern_store::WorkerRow {
        id: "vanished".into(),
        host: "gone".into(),
        started_at: now - chrono::Duration::days(3),
        last_heartbeat_at: now - chrono::Duration::days(2),
        active_jobs: 1,
        concurrency: 4,
        version: "0.1.0".into(),
    };
    db.store().upsert_worker(&silent).await.unwrap();
    // The worker writes its row at its first heartbeat, just after it starts.
    let started = Instant::now();
    while db.store().workers().await.unwrap().len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(10), "the running worker never wrote its row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop().await;
    let left: Vec<String> = db.store().workers().await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(left, ["vanished"], "a worker that stopped cleanly removed its row");
    assert_eq!(db.store().forget_workers(now - chrono::Duration::days(1)).await.unwrap(), 1);
    assert!(db.store().workers().await.unwrap().is_empty());
}

pub async fn handler_versions_and_rollouts_are_stored_and_announced<S: Subject>(db: &S) {
    use quern_store::{Rollout, StoredVersion};
    let stored = StoredVersion {
        job_type: "probe".into(),
        version: "0123456789ab".into(),
        sha256: "0123456789ab".repeat(5) + "0123",
        component: vec![0, 97, 115, 109, 13, 0, 1, 0, 255],
        manifest: "type = \"probe\"\n".into(),
        uploaded_by: "ops".into(),
        uploaded_at: Utc::now(),
    };
    assert!(db.store().put_version(&stored).await.unwrap());
    assert!(!db.store().put_version(&stored).await.unwrap(), "the same version twice is stored once");
    let read = db.store().version("probe", "0123456789ab").await.unwrap().unwrap();
    assert_eq!((read.component, read.manifest), (stored.component.clone(), stored.manifest.clone()));
    assert!(db.store().version("probe", "ffffffffffff").await.unwrap().is_none());
    let listed = db.store().versions().await.unwrap();
    assert_eq!((listed.len(), listed[0].size_bytes), (1, 9));

    let mut changes = db.store().rollout_changes().await.unwrap();
    let rollout = Rollout {
        job_type: "probe".into(),
        active_version: Some("0123456789ab".into()),
        canary_version: Some("ba9876543210".into()),
        canary_percent: 10,
        ..Rollout::default()
    };
    db.store().put_rollout(&rollout, Utc::now()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.wait()).await.expect("a change notice");
    assert_eq!(db.store().rollouts().await.unwrap(), std::slice::from_ref(&rollout));
    let paused = Rollout { paused: true, canary_version: None, canary_percent: 0, ..rollout };
    db.store().put_rollout(&paused, Utc::now()).await.unwrap();
    assert_eq!(db.store().rollouts().await.unwrap(), [paused]);
}

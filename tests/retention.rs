//! Storage stays bounded: finished jobs past their retention are deleted in
//! bounded batches while enqueues go on, on both databases; stored handler
//! versions no rollout can return to are deleted.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use quern_queue::maintenance::{Maintenance, MaintenanceSettings};
use quern_queue::{EnqueueRequest, Queue, QueueSettings};
use quern_store::Rollout;
use serde_json::json;
use support::db::{Db, Raw};
use tokio_util::sync::CancellationToken;

/// Inserts `count` jobs of `user` that finished with `status` `age_days` ago,
/// each with one attempt row, straight in SQL (as a month of traffic left them).
async fn seed_finished(db: &Db, user: &str, status: &str, count: u32, age_days: u32) {
    match db.raw {
        Raw::Postgres(_) => {
            db.execute(&format!(
                "INSERT INTO quern_jobs (id, user_id, type, input, result, status, attempts, run_at, created_at, \
                 updated_at, started_at, completed_at) \
                 SELECT gen_random_uuid(), '{user}', 'echo', '{{\"n\": 1}}', '{{\"ok\": true}}', '{status}', 1, t, t, t, t, t \
                 FROM (SELECT now() - interval '{age_days} days' - n * interval '1 ms' AS t \
                       FROM generate_series(1, {count}) AS n) AS times"
            ))
            .await;
        }
        Raw::Sqlite(_) => {
            let age_us = u64::from(age_days) * 86_400 * 1_000_000;
            db.execute(&format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) \
                 INSERT INTO quern_jobs (id, user_id, type, input, result, status, attempts, run_at, created_at, \
                 updated_at, started_at, completed_at) \
                 SELECT lower(hex(randomblob(16))), '{user}', 'echo', '{{\"n\": 1}}', '{{\"ok\": true}}', '{status}', 1, \
                 t, t, t, t, t FROM (SELECT (unixepoch('subsec') * 1000000 - {age_us} - i * 1000) AS t FROM n)"
            ))
            .await;
        }
    }
    db.execute(&format!(
        "INSERT INTO quern_job_attempts (job_id, attempt, worker_id, started_at, ended_at, outcome) \
         SELECT id, 1, 'w', started_at, completed_at, '{}' FROM quern_jobs WHERE user_id = '{user}'",
        if status == "cancelled" { "cancelled" } else { status }
    ))
    .await;
}

async fn count(db: &Db, sql: &str) -> i64 {
    match &db.raw {
        Raw::Sqlite(pool) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(pool).await.unwrap(),
        Raw::Postgres(_) => {
            // Through the store's schema: one row back from a CTE-free count.
            let url = db.url.clone();
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(&pool).await.unwrap();
            pool.close().await;
            n
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn old_jobs_are_pruned_in_batches_while_enqueues_go_on(db: Db) {
    const OLD: u32 = 100_000;
    seed_finished(&db, "old", "completed", OLD, 10).await;
    seed_finished(&db, "old-cancelled", "cancelled", 50, 10).await;
    seed_finished(&db, "failed-recently", "failed", 50, 10).await; // kept 30 days
    seed_finished(&db, "done-yesterday", "completed", 50, 1).await; // kept 7 days

    let queue =
        Arc::new(Queue::new(db.store.clone(), QueueSettings { max_unfinished_per_user: None, ..Default::default() }));
    let maintenance = Maintenance::new(queue.clone(), MaintenanceSettings::default());
    let stop = CancellationToken::new();
    let enqueuer = {
        let (queue, stop) = (queue.clone(), stop.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.is_cancelled() {
                let started = Instant::now();
                let request = EnqueueRequest {
                    user_id: "live".into(),
                    job_type: "echo".into(),
                    input: json!({"n": latencies.len()}),
                    ..EnqueueRequest::default()
                };
                queue.enqueue(request).await.unwrap();
                latencies.push(started.elapsed());
            }
            latencies
        })
    };
    let started = Instant::now();
    let deleted = maintenance.prune_jobs(&CancellationToken::new()).await.unwrap();
    let took = started.elapsed();
    stop.cancel();
    let mut latencies = enqueuer.await.unwrap();
    latencies.sort();

    assert_eq!(deleted, u64::from(OLD) + 50, "every old completed and cancelled job");
    let remaining = |user: &str| format!("SELECT count(*) FROM quern_jobs WHERE user_id = '{user}'");
    assert_eq!(count(&db, &remaining("old")).await, 0);
    assert_eq!(count(&db, &remaining("old-cancelled")).await, 0);
    assert_eq!(count(&db, &remaining("failed-recently")).await, 50, "failed jobs are kept 30 days");
    assert_eq!(count(&db, &remaining("done-yesterday")).await, 50, "completed jobs are kept 7 days");
    assert_eq!(count(&db, &remaining("live")).await, latencies.len() as i64, "no enqueue was lost");
    let orphans = "SELECT count(*) FROM quern_job_attempts a WHERE NOT EXISTS \
                   (SELECT 1 FROM quern_jobs j WHERE j.id = a.job_id)";
    assert_eq!(count(&db, orphans).await, 0, "attempts go with their job");
    assert_eq!(count(&db, "SELECT count(*) FROM quern_job_attempts").await, 100, "the kept jobs' attempts stay");
    assert!(latencies.len() > 10, "enqueues went on during the prune: {}", latencies.len());
    eprintln!(
        "{}: pruned {deleted} jobs in {took:.2?}; {} enqueues meanwhile, p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        db.store.backend(),
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_jobs_are_pruned_in_batches_while_enqueues_go_on_sqlite() {
    old_jobs_are_pruned_in_batches_while_enqueues_go_on(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_jobs_are_pruned_in_batches_while_enqueues_go_on_postgres() {
    old_jobs_are_pruned_in_batches_while_enqueues_go_on(Db::postgres().await).await;
}

async fn versions_no_rollout_names_are_pruned_beyond_the_newest(db: Db) {
    let component = std::fs::read(support::dist("echo.wasm")).unwrap();
    let start = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    for n in 0..8 {
        let stored = quern_store::StoredVersion {
            job_type: "echo".into(),
            version: format!("v{n}"),
            sha256: format!("{n:064}"),
            component: component.clone(),
            manifest: "type = \"echo\"\n".into(),
            uploaded_by: "ops".into(),
            uploaded_at: start + chrono::TimeDelta::minutes(n),
        };
        assert!(db.store.put_version(&stored).await.unwrap());
    }
    // v0 serves, v1 was the one before, v2 is on canary: none may go.
    let rollout = Rollout {
        job_type: "echo".into(),
        active_version: Some("v0".into()),
        previous_version: Some("v1".into()),
        canary_version: Some("v2".into()),
        canary_percent: 10,
        paused: false,
    };
    db.store.put_rollout(&rollout, chrono::Utc::now()).await.unwrap();
    let mut deleted = db.store.prune_handler_versions(2).await.unwrap();
    deleted.sort();
    let names: Vec<&str> = deleted.iter().map(|(_, version)| version.as_str()).collect();
    assert_eq!(names, ["v3", "v4", "v5"], "kept: the three a rollout names and the two newest (v6, v7)");
    assert!(db.store.prune_handler_versions(2).await.unwrap().is_empty(), "a second pass finds nothing");
    db.cleanup().await;
}

#[tokio::test]
async fn versions_no_rollout_names_are_pruned_beyond_the_newest_sqlite() {
    versions_no_rollout_names_are_pruned_beyond_the_newest(Db::sqlite().await).await;
}

#[tokio::test]
async fn versions_no_rollout_names_are_pruned_beyond_the_newest_postgres() {
    versions_no_rollout_names_are_pruned_beyond_the_newest(Db::postgres().await).await;
}

/// Dates every artifact in a compile cache two hours back, past the grace
/// eviction gives what another process may have just compiled.
fn age_artifacts(dir: &std::path::Path) {
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
    for name in compiled_files(dir) {
        std::fs::File::options().write(true).open(dir.join(name)).unwrap().set_modified(then).unwrap();
    }
}

/// The files in a compile cache, by name.
fn compiled_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".cwasm"))
        .collect();
    names.sort();
    names
}

async fn compiled_artifacts_of_versions_no_longer_stored_are_evicted(db: Db) {
    let cache = tempfile::tempdir().unwrap();
    let settings =
        quern_runtime::RuntimeSettings { cache_dir: Some(cache.path().to_path_buf()), ..support::settings() };
    let registry = quern_runtime::registry::Registry::new(Arc::new(quern_runtime::Runtime::new(settings).unwrap()));
    let sync = quern_queue::versions::VersionSync::new(db.store.clone(), registry.clone());
    // Two builds of one type: the echo component, and another component under echo's name.
    let builds = [("v1", "echo.wasm"), ("v2", "sofia_text.wasm")];
    let mut sha256s = Vec::new();
    for (version, file) in builds {
        let component = std::fs::read(support::dist(file)).unwrap();
        let sha256 = quern_runtime::sha256_hex(&component);
        sha256s.push(sha256.clone());
        let stored = quern_store::StoredVersion {
            job_type: "echo".into(),
            version: version.into(),
            sha256,
            component,
            manifest: "type = \"echo\"\n".into(),
            uploaded_by: "ops".into(),
            uploaded_at: chrono::Utc::now(),
        };
        assert!(db.store.put_version(&stored).await.unwrap());
    }
    let mut rollout = Rollout {
        job_type: "echo".into(),
        active_version: Some("v1".into()),
        canary_version: Some("v2".into()),
        canary_percent: 10,
        ..Rollout::default()
    };
    db.store.put_rollout(&rollout, chrono::Utc::now()).await.unwrap();
    sync.sync().await.unwrap();
    assert_eq!(compiled_files(cache.path()).len(), 2, "both versions were compiled into the cache");
    // An artifact an older build of quern left behind.
    std::fs::write(cache.path().join(format!("{}-0000000000000000.cwasm", sha256s[0])), b"old").unwrap();
    assert_eq!(sync.evict_compiled().await.unwrap(), 0, "nothing just written goes");
    age_artifacts(cache.path());

    assert_eq!(sync.evict_compiled().await.unwrap(), 1, "only the older build's artifact goes");
    assert_eq!(compiled_files(cache.path()).len(), 2);

    // The canary is dropped: still stored, so its artifact stays (a rollout may name it again).
    rollout.canary_version = None;
    rollout.canary_percent = 0;
    db.store.put_rollout(&rollout, chrono::Utc::now()).await.unwrap();
    sync.sync().await.unwrap();
    assert_eq!(sync.evict_compiled().await.unwrap(), 0);

    // Pruned from the store: its artifact goes, the serving version's stays.
    let pruned = db.store.prune_handler_versions(0).await.unwrap();
    assert_eq!(pruned, [("echo".to_string(), "v2".to_string())]);
    assert_eq!(sync.evict_compiled().await.unwrap(), 1);
    let left = compiled_files(cache.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(&sha256s[0]), "the serving version's artifact is kept: {left:?}");
    db.cleanup().await;
}

#[tokio::test]
async fn compiled_artifacts_of_versions_no_longer_stored_are_evicted_sqlite() {
    compiled_artifacts_of_versions_no_longer_stored_are_evicted(Db::sqlite().await).await;
}

#[tokio::test]
async fn compiled_artifacts_of_versions_no_longer_stored_are_evicted_postgres() {
    compiled_artifacts_of_versions_no_longer_stored_are_evicted(Db::postgres().await).await;
}

/// Every foreign key of quern's schema has an index leading with its
/// columns (so deleting a referenced row never scans the referencing
/// table), and so has `root_id`, by which a chain is found.
#[tokio::test]
async fn every_foreign_key_and_root_id_has_its_index_on_postgres() {
    let db = Db::postgres().await;
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };
    let schema = db.url.split("search_path%3D").nth(1).unwrap().to_string();
    let unindexed: Vec<String> = sqlx::query_scalar(
        "SELECT c.conrelid::regclass::text || '(' || a.attname || ')' FROM pg_constraint c \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] \
         WHERE c.contype = 'f' AND c.connamespace = $1::regnamespace \
         AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid AND i.indkey[0] = c.conkey[1])",
    )
    .bind(&schema)
    .fetch_all(admin)
    .await
    .unwrap();
    assert!(unindexed.is_empty(), "foreign keys without an index: {unindexed:?}");
    let root_indexed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
         WHERE i.indrelid = ($1 || '.quern_jobs')::regclass AND a.attname = 'root_id')",
    )
    .bind(&schema)
    .fetch_one(admin)
    .await
    .unwrap();
    assert!(root_indexed, "quern_jobs(root_id) has an index");
    let foreign_keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = $1::regnamespace",
    )
    .bind(&schema)
    .fetch_one(admin)
    .await
    .unwrap();
    assert!(foreign_keys >= 1, "the check saw the schema's foreign keys ({foreign_keys})");
    db.cleanup().await;
}

/// Attempts carry no foreign key on PostgreSQL (each is written by the
/// statement that ends it, joined to its job): a trigger deletes them with
/// their job, whoever deletes it and however many at once.
#[tokio::test]
async fn a_job_deleted_by_any_statement_takes_its_attempts_along_on_postgres() {
    let db = Db::postgres().await;
    seed_finished(&db, "gone", "completed", 30, 1).await;
    seed_finished(&db, "kept", "failed", 20, 1).await;
    db.execute("DELETE FROM quern_jobs WHERE user_id = 'gone'").await;
    let orphans = "SELECT count(*) FROM quern_job_attempts a WHERE NOT EXISTS \
                   (SELECT 1 FROM quern_jobs j WHERE j.id = a.job_id)";
    assert_eq!(count(&db, orphans).await, 0, "the deleted jobs' attempts went with them");
    assert_eq!(count(&db, "SELECT count(*) FROM quern_job_attempts").await, 20, "the other jobs' attempts stay");
    db.cleanup().await;
}

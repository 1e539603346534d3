//! `quern migrate --supabase` on PostgreSQL: the seed's `analysis_jobs` view
//! with row-level security, so the frontend's direct reads and cancel work
//! through PostgREST as the signed-in user. Supabase's `auth.uid()` and
//! roles are stood in for here exactly as Supabase defines them.

mod support;

use std::process::Command;

use quern_queue::{EnqueueRequest, Queue, QueueSettings};
use quern_store::{Claim, JobStatus};
use serde_json::json;
use support::db::{Db, Raw, stand_in_for_supabase};
use uuid::Uuid;

/// A fresh schema with Supabase stood in for and `quern migrate --supabase` applied.
async fn migrated() -> Db {
    let db = Db::postgres().await;
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };
    stand_in_for_supabase(admin).await;
    let output = migrate_supabase(&db.url);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    db
}

fn migrate_supabase(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_quern")).args(["migrate", "--supabase"]).env("DATABASE_URL", url).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_read_and_cancel_their_own_jobs_through_analysis_jobs() {
    let db = migrated().await;
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };
    let again = migrate_supabase(&db.url);
    assert!(again.status.success(), "applying it twice is harmless: {}", String::from_utf8_lossy(&again.stderr));

    let queue = Queue::new(db.store.clone(), QueueSettings::default());
    let (alice, bob) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let enqueue = |user: &str, n: i64| {
        let request = EnqueueRequest {
            user_id: user.to_string(),
            job_type: "sofia_image".into(),
            input: json!({"imageUrl": format!("https://media.example/{n}.jpg")}),
            ..Default::default()
        };
        let queue = &queue;
        async move { queue.enqueue(request).await.unwrap().id }
    };
    let (mine, mine_too, theirs) = (enqueue(&alice, 1).await, enqueue(&alice, 2).await, enqueue(&bob, 3).await);

    let schema = db.url.split("search_path%3D").nth(1).unwrap().to_string();
    let mut tx = admin.begin().await.unwrap();
    for statement in [
        "SET LOCAL ROLE authenticated".to_string(),
        format!("SET LOCAL search_path TO {schema}"),
        format!(
            "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{alice}\", \"role\": \"authenticated\"}}', true)"
        ),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await.unwrap();
    }
    let visible: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM analysis_jobs ORDER BY created_at").fetch_all(&mut *tx).await.unwrap();
    assert_eq!(visible, vec![mine, mine_too], "alice sees her jobs only");

    // The hook's cancel: `update({status: 'cancelled'}).eq('id', jobId)`.
    let cancel = "UPDATE analysis_jobs SET status = 'cancelled' WHERE id = $1";
    assert_eq!(sqlx::query(cancel).bind(mine).execute(&mut *tx).await.unwrap().rows_affected(), 1);
    assert_eq!(sqlx::query(cancel).bind(theirs).execute(&mut *tx).await.unwrap().rows_affected(), 0, "not bob's");

    sqlx::query("SAVEPOINT s").execute(&mut *tx).await.unwrap();
    let complete = sqlx::query("UPDATE analysis_jobs SET status = 'completed' WHERE id = $1")
        .bind(mine_too)
        .execute(&mut *tx)
        .await;
    assert!(complete.unwrap_err().to_string().contains("row-level security"), "only a cancel is allowed");
    sqlx::query("ROLLBACK TO SAVEPOINT s").execute(&mut *tx).await.unwrap();
    let result =
        sqlx::query("UPDATE analysis_jobs SET result = '{}' WHERE id = $1").bind(mine_too).execute(&mut *tx).await;
    assert!(result.unwrap_err().to_string().contains("permission denied"), "only the status column");
    tx.rollback().await.unwrap();

    // Commit the cancel for real and see quern's view of it.
    let mut tx = admin.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE authenticated").execute(&mut *tx).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL search_path TO {schema}"))).execute(&mut *tx).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT set_config('request.jwt.claims', '{{\"sub\": \"{alice}\"}}', true)"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(cancel).bind(mine).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let job = db.store.get(mine).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(job.completed_at.is_some(), "the trigger stamps a direct cancel like quern's own");
    assert_eq!(db.store.get(theirs).await.unwrap().unwrap().status, JobStatus::Pending);
    db.cleanup().await;
}

#[tokio::test]
async fn supabase_migrations_are_refused_where_supabase_is_not() {
    let sqlite = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["migrate", "--supabase"])
        .env("DATABASE_URL", "sqlite:///tmp/quern-not-supabase.db")
        .output()
        .unwrap();
    assert!(!sqlite.status.success());
    assert!(String::from_utf8_lossy(&sqlite.stderr).contains("--supabase needs DATABASE_URL=postgres://"));

    // The `postgres` database has no auth schema (the test above adds one to `test` only).
    let url = support::db::postgres_url().rsplit_once('/').map(|(base, _)| format!("{base}/postgres")).unwrap();
    let schema = format!("quern_test_{}", Uuid::now_v7().simple());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    let output = migrate_supabase(&format!("{url}?options=-csearch_path%3D{schema}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lacks Supabase's") && stderr.contains("auth.uid()"), "{stderr}");
}

/// Runs `statements` in one transaction as the service role, in the test's schema.
async fn as_service_role(db: &Db, statements: &[&str]) -> Vec<sqlx::postgres::PgRow> {
    try_as_service_role(db, statements).await.unwrap()
}

/// [`as_service_role`], the transaction rolled back when a statement fails.
async fn try_as_service_role(db: &Db, statements: &[&str]) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };
    let schema = db.url.split("search_path%3D").nth(1).unwrap().to_string();
    let mut tx = admin.begin().await?;
    sqlx::query("SET LOCAL ROLE service_role").execute(&mut *tx).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL search_path TO {schema}"))).execute(&mut *tx).await?;
    let mut rows = Vec::new();
    for statement in statements {
        rows = sqlx::query(sqlx::AssertSqlSafe(statement.to_string())).fetch_all(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_role_enqueues_through_analysis_jobs_reads_the_cache_and_deleted_users_take_their_jobs() {
    use sqlx::Row;
    let db = migrated().await;
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };

    // A worker has served sofia_text (its heartbeat records the types).
    db.store.note_types(&["sofia_text".to_string()], chrono::Utc::now()).await.unwrap();
    // The seed's enqueue-analysis: insert({type, input, priority, user_id}).select().single().
    let mut wakeups = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    wakeups.listen("quern_jobs").await.unwrap();
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let insert = format!(
        "INSERT INTO analysis_jobs (type, input, priority, user_id) \
         VALUES ('sofia_text', '{{\"text\": \"arroz e feijão\"}}', 5, '{alice}') RETURNING *"
    );
    let rows = as_service_role(&db, &[&insert]).await;
    let id: Uuid = rows[0].get("id");
    assert_eq!(rows[0].get::<String, _>("status"), "pending");
    assert_eq!((rows[0].get::<i32, _>("attempts"), rows[0].get::<i32, _>("max_attempts")), (0, 3));
    let woken = tokio::time::timeout(std::time::Duration::from_secs(5), wakeups.recv()).await;
    assert!(woken.is_ok_and(|n| n.is_ok()), "the insert wakes the workers");
    let job = db.store.get(id).await.unwrap().expect("the job is quern's");
    assert_eq!(
        (job.status, job.user_id.as_str(), job.job_type.as_str()),
        (JobStatus::Pending, &*alice.to_string(), "sofia_text")
    );
    let now = chrono::Utc::now();
    let claimed = db
        .store
        .claim(&Claim {
            worker_id: "w1",
            limit: 10,
            now,
            lease_until: now + chrono::TimeDelta::seconds(30),
            types: &["sofia_text".to_string()],
        })
        .await;
    assert_eq!(claimed.unwrap().len(), 1, "a worker claims it");

    // The seed's analysis_cache and cleanup_expired_cache().
    db.execute(
        "INSERT INTO quern_cache (cache_key, type, response, expires_at, created_at) VALUES \
         ('fresh', 'sofia_text', '{\"ok\": 1}', now() + interval '1 hour', now()), \
         ('stale', 'sofia_text', '{\"ok\": 2}', now() - interval '1 hour', now() - interval '2 hours')",
    )
    .await;
    let rows = as_service_role(&db, &["SELECT cache_key, hit_count, id FROM analysis_cache ORDER BY cache_key"]).await;
    assert_eq!(rows.iter().map(|r| r.get::<String, _>("cache_key")).collect::<Vec<_>>(), ["fresh", "stale"]);
    as_service_role(&db, &["SELECT cleanup_expired_cache()::text"]).await;
    let rows = as_service_role(&db, &["SELECT cache_key FROM analysis_cache"]).await;
    assert_eq!(rows.iter().map(|r| r.get::<String, _>("cache_key")).collect::<Vec<_>>(), ["fresh"]);

    // Deleting a user from auth.users deletes their jobs, and only theirs.
    let queue = Queue::new(db.store.clone(), QueueSettings::default());
    let request = |user: Uuid| EnqueueRequest {
        user_id: user.to_string(),
        job_type: "sofia_text".into(),
        input: json!({"text": "ovo"}),
        ..Default::default()
    };
    let bobs = queue.enqueue(request(bob)).await.unwrap().id;
    sqlx::query("INSERT INTO auth.users (id) VALUES ($1), ($2)").bind(alice).bind(bob).execute(admin).await.unwrap();
    sqlx::query("DELETE FROM auth.users WHERE id = $1").bind(alice).execute(admin).await.unwrap();
    assert!(db.store.get(id).await.unwrap().is_none(), "alice's job went with her");
    assert!(db.store.get(bobs).await.unwrap().is_some(), "bob's stays");
    sqlx::query("DELETE FROM auth.users WHERE id = $1").bind(bob).execute(admin).await.unwrap();

    // The service role may delete a job outright; its attempts go with it,
    // though the role has no rights on the attempts table.
    let carols = queue.enqueue(request(Uuid::new_v4())).await.unwrap().id;
    db.execute(&format!(
        "INSERT INTO quern_job_attempts (job_id, attempt, worker_id, started_at, ended_at, outcome) \
         VALUES ('{carols}', 1, 'w1', now(), now(), 'retry')"
    ))
    .await;
    as_service_role(&db, &[&format!("DELETE FROM quern_jobs WHERE id = '{carols}'")]).await;
    assert!(db.store.attempts(carols).await.unwrap().is_empty(), "carol's job took its attempt along");
    db.cleanup().await;
}

/// Seed 004's job-system views (`job_stats`, `active_jobs`,
/// `pending_jobs_queue`: "Check that the following objects were created")
/// over quern's jobs, and its monitoring queries as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_004_s_job_views_and_monitoring_queries_run_over_quern_s_jobs() {
    let db = migrated().await;
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };
    assert!(migrate_supabase(&db.url).status.success(), "applying it twice is harmless");
    let queue = Queue::new(db.store.clone(), QueueSettings::default());
    let mut ids = Vec::new();
    for (job_type, priority) in [("sofia_image", 5), ("sofia_image", 1), ("sofia_text", 5)] {
        let request = EnqueueRequest {
            user_id: Uuid::new_v4().to_string(),
            job_type: job_type.into(),
            input: json!({"text": "arroz"}),
            priority: Some(priority),
            ..Default::default()
        };
        ids.push(queue.enqueue(request).await.unwrap().id);
    }
    let schema = db.url.split("search_path%3D").nth(1).unwrap().to_string();
    let mut conn = admin.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}"))).execute(&mut *conn).await.unwrap();
    // One has been running for eleven minutes (a stuck job, in 004's words).
    sqlx::query(
        "UPDATE quern_jobs SET status = 'processing', worker_id = 'w1', started_at = now() - interval '11 minutes' \
         WHERE id = $1",
    )
    .bind(ids[0])
    .execute(&mut *conn)
    .await
    .unwrap();

    let stats: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT type, status, count FROM job_stats ORDER BY count DESC, type, status")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(
        stats,
        [
            ("sofia_image".to_string(), "pending".to_string(), 1),
            ("sofia_image".into(), "processing".into(), 1),
            ("sofia_text".into(), "pending".into(), 1)
        ]
    );
    let by_type: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT type, status, COUNT(*) FROM jobs GROUP BY type, status ORDER BY 1, 2")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(by_type, stats, "004's `jobs` query counts the same");
    let stuck: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE status = 'processing' AND started_at < NOW() - INTERVAL '10 minutes'",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(stuck, [ids[0]]);
    let active: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, worker_id FROM active_jobs").fetch_all(&mut *conn).await.unwrap();
    assert_eq!(active, [(ids[0], "w1".to_string())]);
    let queued: Vec<(i64, Uuid)> =
        sqlx::query_as("SELECT position, id FROM pending_jobs_queue").fetch_all(&mut *conn).await.unwrap();
    assert_eq!(queued, [(1, ids[1]), (2, ids[2])], "in the order workers claim them: priority 1 first");
    drop(conn);
    db.cleanup().await;
}

/// The view behaves like the seed's table (seed 000's
/// 20260117_create_async_jobs_system.sql): an unknown type is refused as its
/// `CHECK (type IN (…))` refused it, `updated_at` moves on every update as
/// its `update_analysis_jobs_updated_at` trigger moved it, `user_id` is a
/// uuid, and the service role writes `analysis_cache` (upserts, hit counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_behaves_like_the_seed_s_table() {
    use sqlx::Row;
    let db = migrated().await;
    db.store.note_types(&["sofia_text".to_string()], chrono::Utc::now()).await.unwrap();
    let alice = Uuid::new_v4();
    let shared = &db;
    let as_service = |statement: String| async move { try_as_service_role(shared, &[&statement]).await };
    let refused = as_service(format!(
        "INSERT INTO analysis_jobs (type, input, user_id) VALUES ('sofia_videos', '{{}}', '{alice}')"
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("'sofia_videos' is not a job type any worker serves"), "{refused}");
    let rows = as_service(format!(
        "INSERT INTO analysis_jobs (type, input, user_id) VALUES ('sofia_text', '{{\"text\": \"ovo\"}}', '{alice}') \
         RETURNING id, user_id, updated_at"
    ))
    .await
    .unwrap();
    let (id, user, created): (Uuid, Uuid, chrono::DateTime<chrono::Utc>) =
        (rows[0].get("id"), rows[0].get("user_id"), rows[0].get("updated_at"));
    assert_eq!(user, alice, "user_id reads as the seed's uuid");
    let rows = as_service(format!("UPDATE analysis_jobs SET priority = 2 WHERE id = '{id}' RETURNING updated_at"))
        .await
        .unwrap();
    let updated: chrono::DateTime<chrono::Utc> = rows[0].get("updated_at");
    assert!(updated > created, "updated_at moved: {created} → {updated}");

    // The seed's worker, as a canary, upserts its cache and counts a hit.
    let upsert = "INSERT INTO analysis_cache (cache_key, type, response, expires_at) \
                  VALUES ('sofia_text:k', 'sofia_text', '{\"foods\": \"ovo\"}', now() + interval '1 day') \
                  ON CONFLICT (cache_key) DO UPDATE SET hit_count = analysis_cache.hit_count + 1, last_hit_at = now()";
    as_service(upsert.to_string()).await.unwrap();
    as_service(upsert.to_string()).await.unwrap();
    let rows =
        as_service("SELECT hit_count FROM analysis_cache WHERE cache_key = 'sofia_text:k'".to_string()).await.unwrap();
    assert_eq!(rows[0].get::<i64, _>("hit_count"), 1);
    db.cleanup().await;
}

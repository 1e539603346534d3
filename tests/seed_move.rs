//! An existing seed schema, moved in place: seed 000's migration
//! `20260117_create_async_jobs_system.sql` applied verbatim (a copy beside
//! this file) with jobs in every state and cache rows; `quern migrate
//! --supabase` prints the plan and changes nothing, `--apply` moves the
//! tables aside and imports every row, quern runs the pending jobs, and
//! `--revert --apply` gives the seed's tables back with what quern did.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use quern_queue::{EnqueueRequest, Queue, QueueSettings};
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};
use support::db::{Db, Raw, stand_in_for_supabase};
use support::server::{Options, Server};
use uuid::Uuid;

const SEED_MIGRATION: &str = include_str!("supabase_seed/20260117_create_async_jobs_system.sql");

fn migrate(url: &str, flags: &[&str]) -> (Output, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(["migrate", "--supabase"])
        .args(flags)
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "quern migrate --supabase {flags:?}: {stderr}");
    (output, stderr)
}

async fn relkind(conn: &mut PgConnection, name: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT (SELECT relkind::text FROM pg_class WHERE oid = to_regclass(format('%I.%I', current_schema(), $1)))",
    )
    .bind(name)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Every column of a job the seed's table and quern's share, by id.
async fn seed_jobs(
    conn: &mut PgConnection,
    table: &str,
) -> Vec<(Uuid, String, String, Value, Option<Value>, String, i32)> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, user_id::text AS user_id, type, input, result, status, attempts FROM {table} ORDER BY id"
    )))
    .fetch_all(conn)
    .await
    .unwrap()
    .into_iter()
    .map(|row| {
        (
            row.get("id"),
            row.get("user_id"),
            row.get("type"),
            row.get("input"),
            row.get("result"),
            row.get("status"),
            row.get("attempts"),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_s_own_tables_are_moved_in_place_run_and_moved_back() {
    let db = Db::postgres().await;
    let Raw::Postgres(admin) = &db.raw else { unreachable!() };
    stand_in_for_supabase(admin).await;
    let schema = db.url.split("search_path%3D").nth(1).unwrap().to_string();
    let mut conn = admin.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SET search_path TO {schema}"))).execute(&mut *conn).await.unwrap();
    sqlx::raw_sql(SEED_MIGRATION).execute(&mut *conn).await.expect("seed 000's migration, verbatim");

    // The customer's data: users, jobs in every state, cache entries.
    let (ana, bia) = (Uuid::new_v4(), Uuid::new_v4());
    for user in [ana, bia] {
        sqlx::query("INSERT INTO auth.users (id) VALUES ($1)").bind(user).execute(&mut *conn).await.unwrap();
    }
    let rows = [
        (ana, "sofia_text", "completed", json!({"text": "arroz"}), Some(json!({"foods": "arroz"})), 1),
        (ana, "meal_plan", "failed", json!({"profile": {}}), None, 3),
        (bia, "sofia_image", "cancelled", json!({"imageUrl": "https://x/1.jpg"}), None, 0),
        (ana, "sofia_text", "pending", json!({"text": "feijão"}), None, 0),
        (bia, "sofia_text", "pending", json!({"text": "ovo"}), None, 0),
        (bia, "sofia_text", "processing", json!({"text": "pão"}), None, 1),
    ];
    let mut ids = Vec::new();
    for (user, job_type, status, input, result, attempts) in &rows {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO analysis_jobs (user_id, type, status, input, result, attempts, worker_id, started_at) \
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $3 = 'processing' THEN 'old-worker' END, \
                     CASE WHEN $3 <> 'pending' THEN now() END) RETURNING id",
        )
        .bind(user)
        .bind(job_type)
        .bind(status)
        .bind(input)
        .bind(result)
        .bind(attempts)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        ids.push(id);
    }
    sqlx::query(
        "INSERT INTO analysis_cache (cache_key, type, response, hit_count, expires_at) VALUES \
         ('sofia_text:abc', 'sofia_text', '{\"foods\": \"arroz\"}', 4, now() + interval '1 day'), \
         ('sofia_text:old', 'sofia_text', '{\"foods\": \"velho\"}', 1, now() - interval '1 day')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let before = seed_jobs(&mut conn, "analysis_jobs").await;

    // Today's call, without --apply: the plan, and nothing of the seed's changed.
    let (_, plan) = migrate(&db.url, &[]);
    assert!(plan.contains("with 6 jobs") && plan.contains("3 finished jobs as history"), "{plan}");
    assert!(plan.contains("2 pending jobs as jobs that run") && plan.contains("1 processing jobs"), "{plan}");
    assert!(plan.contains("dry run") && plan.contains("--apply"), "{plan}");
    assert_eq!(relkind(&mut conn, "analysis_jobs").await.as_deref(), Some("r"));
    let quern_jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM quern_jobs").fetch_one(&mut *conn).await.unwrap();
    assert_eq!(quern_jobs, 0);

    // --apply: the tables aside, every row imported, the views in place.
    let (_, moved) = migrate(&db.url, &["--apply"]);
    assert!(moved.contains("moved"), "{moved}");
    assert_eq!(relkind(&mut conn, "analysis_jobs").await.as_deref(), Some("v"));
    assert_eq!(relkind(&mut conn, "analysis_jobs_seed").await.as_deref(), Some("r"));
    assert_eq!(relkind(&mut conn, "analysis_cache").await.as_deref(), Some("v"));
    assert_eq!(seed_jobs(&mut conn, "analysis_jobs_seed").await, before, "the seed's rows kept as they were");
    let imported = seed_jobs(&mut conn, "quern_jobs").await;
    assert_eq!(imported.len(), 6);
    for (seed, quern) in before.iter().zip(&imported) {
        assert_eq!(
            (&seed.0, &seed.1, &seed.2, &seed.3, &seed.4, &seed.6),
            (&quern.0, &quern.1, &quern.2, &quern.3, &quern.4, &quern.6)
        );
        let expected = if seed.5 == "processing" { "pending" } else { seed.5.as_str() };
        assert_eq!(quern.5, expected, "a job of the stopped worker runs again");
    }
    let cache: Vec<(String, i64)> = sqlx::query_as("SELECT cache_key, hit_count FROM quern_cache ORDER BY cache_key")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(cache, [("sofia_text:abc".to_string(), 4), ("sofia_text:old".to_string(), 1)]);
    let through_view: i64 =
        sqlx::query_scalar("SELECT count(*) FROM analysis_jobs").fetch_one(&mut *conn).await.unwrap();
    assert_eq!(through_view, 6, "the seed's name now reads quern's jobs");
    let (_, again) = migrate(&db.url, &["--apply"]);
    assert!(again.contains("migrations applied"), "a second --apply finds the move done: {again}");

    // quern runs the imported pending jobs (sofia_text served here by echo).
    let options = Options {
        components: vec![("sofia_text", "echo.wasm", "type = \"sofia_text\"\n".to_string())],
        ..Options::default()
    };
    let server = Server::start_with(&db, options).await;
    let ops = server.service_token();
    for id in [ids[3], ids[4], ids[5]] {
        let job =
            server.poll_job(&ops, &id.to_string(), Duration::from_secs(30), |job| job["status"] == "completed").await;
        assert!(job["result"]["echo"]["text"].is_string(), "{job}");
    }
    // A job made in quern after the move, and one the seed's table cannot hold.
    let made = server.enqueue(&server.token(&ana.to_string()), "sofia_text", json!({"text": "maçã"})).await;
    let made = made.body["id"].as_str().unwrap().to_string();
    server.poll_job(&ops, &made, Duration::from_secs(30), |job| job["status"] == "completed").await;
    server.enqueue(&server.token("not-a-uuid"), "echo", json!({"n": 1})).await;
    server.finish().await;
    // One more, enqueued with no worker running: unfinished at the revert.
    let queue = Queue::new(db.store.clone(), QueueSettings::default());
    let request = EnqueueRequest {
        user_id: bia.to_string(),
        job_type: "sofia_text".into(),
        input: json!({"text": "uva"}),
        ..Default::default()
    };
    let waiting = queue.enqueue(request).await.unwrap().id;

    // --revert: the plan, then the seed's tables back with what quern did.
    let (_, plan) = migrate(&db.url, &["--revert"]);
    assert!(plan.contains("write into it the 8 jobs") && plan.contains("1 jobs it cannot hold"), "{plan}");
    assert!(plan.contains("cancel in quern the 1 of those not yet finished") && plan.contains("dry run"), "{plan}");
    assert_eq!(relkind(&mut conn, "analysis_jobs").await.as_deref(), Some("v"), "a dry run changes nothing");
    migrate(&db.url, &["--revert", "--apply"]);
    assert_eq!(relkind(&mut conn, "analysis_jobs").await.as_deref(), Some("r"));
    assert_eq!(relkind(&mut conn, "analysis_cache").await.as_deref(), Some("r"));
    assert_eq!(relkind(&mut conn, "analysis_jobs_seed").await, None);
    let back = seed_jobs(&mut conn, "analysis_jobs").await;
    assert_eq!(back.len(), 8, "six of the seed's, the one made in quern, the one waiting");
    let status_of = |id: Uuid| back.iter().find(|job| job.0 == id).map(|job| job.5.clone()).unwrap();
    for id in [ids[3], ids[4], ids[5]] {
        assert_eq!(status_of(id), "completed", "what quern ran is finished in the seed's table too");
    }
    assert_eq!(status_of(Uuid::parse_str(&made).unwrap()), "completed");
    assert_eq!(status_of(waiting), "pending", "the seed's worker takes it");
    assert_eq!(db.store.get(waiting).await.unwrap().unwrap().status, quern_store::JobStatus::Cancelled, "not both");
    sqlx::query("SELECT cleanup_expired_cache()").execute(&mut *conn).await.unwrap();
    let cache: Vec<String> =
        sqlx::query_scalar("SELECT cache_key FROM analysis_cache").fetch_all(&mut *conn).await.unwrap();
    assert_eq!(cache, ["sofia_text:abc"], "the seed's cleanup works on the seed's table again");
    drop(conn);
    db.cleanup().await;
}

//! Bulk enqueue for server-side producers: `POST /v1/jobs/batch` against the
//! real binary on both databases, and `quern jobs enqueue --file`.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::db::Db;
use support::server::Server;

on_both_databases!(
    a_service_batch_enqueues_every_job_in_order_and_they_run,
    a_batch_with_bad_jobs_enqueues_none_and_names_each_by_index,
    only_a_service_token_may_enqueue_a_batch,
    the_cli_enqueues_a_file_of_jobs_or_none_of_them,
);

/// A batch body whose inputs the server must never log.
fn batch(server: &Server, jobs: Vec<Value>) -> Value {
    for job in &jobs {
        if let Some(input) = job.get("input").map(Value::to_string).filter(|input| input.len() >= 6) {
            server.remember(input);
        }
    }
    json!({ "jobs": jobs })
}

async fn a_service_batch_enqueues_every_job_in_order_and_they_run(db: &Db) {
    let server = Server::start(db).await;
    let service = server.service_token();
    let jobs = (0..50)
        .map(|n| json!({"type": "echo", "input": {"meal": format!("prato {n}")}, "user_id": format!("user-{}", n % 2)}))
        .collect();
    let answer = server.post("/v1/jobs/batch", &service, batch(&server, jobs)).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    assert_eq!(answer.body["count"], 50);
    let listed = answer.body["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 50);
    assert_eq!(listed[7]["user_id"], "user-1", "each job belongs to the user named for it");
    assert_eq!(listed[0]["status"], "pending");

    // Each user sees their own jobs, and they run to completion.
    let alice = server.token("user-0");
    let first = listed[0]["id"].as_str().unwrap();
    let done = server.poll_job(&alice, first, Duration::from_secs(30), |job| job["status"] == "completed").await;
    assert_eq!(done["result"]["echo"]["meal"], "prato 0");
    let other = server.get(&format!("/v1/jobs/{}", listed[1]["id"].as_str().unwrap()), &alice).await;
    assert_eq!(other.status, 404, "user-1's job is not user-0's");
    server.finish().await;
}

async fn a_batch_with_bad_jobs_enqueues_none_and_names_each_by_index(db: &Db) {
    let server = Server::start(db).await;
    let service = server.service_token();
    let jobs = vec![
        json!({"type": "echo", "input": {"ok": "first"}}),
        json!({"type": "no_such_type", "input": {}}),
        json!({"type": "echo", "input": ["not", "an", "object"]}),
        json!({"type": "echo", "input": {"ok": "fourth"}, "priority": 42}),
        json!({"type": "echo"}),
    ];
    let answer = server.post("/v1/jobs/batch", &service, batch(&server, jobs)).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.code(), "invalid_batch");
    assert!(answer.error().contains("4 of the jobs cannot be enqueued, so none was"), "{}", answer.text);
    let errors: Vec<(u64, &str)> = answer.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errors,
        vec![(1, "unknown_type"), (2, "invalid_input"), (3, "invalid_priority"), (4, "invalid_request")],
        "{}",
        answer.text
    );
    assert!(answer.body["errors"][0]["error"].as_str().unwrap().contains("known types: "), "{}", answer.text);
    assert!(answer.body["errors"][3]["error"].as_str().unwrap().contains("missing field `input`"), "{}", answer.text);
    let listed = server.get("/v1/jobs", &service).await;
    assert_eq!(listed.body["jobs"], json!([]), "nothing of a refused batch is enqueued");

    let too_many = (0..1001).map(|n| json!({"type": "echo", "input": {"n": n}})).collect();
    let answer = server.post("/v1/jobs/batch", &service, batch(&server, too_many)).await;
    assert_eq!((answer.status.as_u16(), answer.code()), (400, "invalid_batch_size"), "{}", answer.text);
    assert!(answer.error().contains("1 to 1000 jobs, got 1001"), "{}", answer.text);
    let empty = server.post("/v1/jobs/batch", &service, json!({"jobs": []})).await;
    assert_eq!(empty.code(), "invalid_batch_size");
    server.finish().await;
}

async fn only_a_service_token_may_enqueue_a_batch(db: &Db) {
    let server = Server::start(db).await;
    let user = server.token("alice");
    let body = batch(&server, vec![json!({"type": "echo", "input": {"meal": "cuscuz"}})]);
    let answer = server.post("/v1/jobs/batch", &user, body).await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert!(answer.error().contains("service_role"), "{}", answer.text);
    let none = server.call(reqwest::Method::POST, "/v1/jobs/batch", None, Some(json!({"jobs": []}))).await;
    assert_eq!(none.status, 401);
    server.finish().await;
}

async fn the_cli_enqueues_a_file_of_jobs_or_none_of_them(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let quern = |file: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_quern"))
            .args(["jobs", "enqueue", "--file"])
            .arg(file)
            .env("DATABASE_URL", &db.url)
            .env("QUERN_DATA_DIR", dir.path())
            .output()
            .unwrap()
    };
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"type\": \"echo\", \"input\": {\"n\": 1}}\n\n{\"type\": \"echo\", \"input\": 7}\n")
        .unwrap();
    let refused = quern(&bad);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("job 2 (from 1): input must be a JSON object, got a number"), "{stderr}");
    assert!(stderr.contains("nothing was enqueued"), "{stderr}");
    assert_eq!(db.store.count_unfinished().await.unwrap(), 0);

    let good = dir.path().join("good.json");
    let jobs: Vec<Value> = (0..1500).map(|n| json!({"type": "echo", "input": {"n": n}, "user_id": "bulk"})).collect();
    std::fs::write(&good, serde_json::to_string(&jobs).unwrap()).unwrap();
    let enqueued = quern(&good);
    assert!(enqueued.status.success(), "{}", String::from_utf8_lossy(&enqueued.stderr));
    let ids: Vec<uuid::Uuid> =
        String::from_utf8_lossy(&enqueued.stdout).lines().map(|line| line.parse().unwrap()).collect();
    assert_eq!(ids.len(), 1500, "one id per job, in two batches");
    let last = db.store.get(ids[1499]).await.unwrap().unwrap();
    assert_eq!((last.user_id.as_str(), last.input.clone()), ("bulk", json!({"n": 1499})));
    assert_eq!(db.store.count_unfinished().await.unwrap(), 1500);
}

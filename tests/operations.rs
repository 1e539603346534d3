//! What an operator runs into: every process observable (liveness apart
//! from readiness, a worker's own /metrics), settings refused at start when
//! out of range, and inspection that never changes a database.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::db::{Db, postgres_url};
use support::server::{Options, Server};
use support::workers::{enqueue_slow, handlers_dir, start_worker, statuses, wait_until};
use support::{Proxy, Reply, Upstream, cache_dir};

/// The address a process logged for `message` (JSON log lines), within 30 s.
async fn logged_addr(log: &std::path::Path, message: &str) -> String {
    let mut found = None;
    wait_until(Duration::from_secs(30), message, || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        found = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["message"] == message)
            .and_then(|line| line["addr"].as_str().map(str::to_string));
        std::future::ready(found.is_some())
    })
    .await;
    found.unwrap()
}

async fn status_of(client: &reqwest::Client, url: &str) -> u16 {
    client.get(url).send().await.map_or(0, |response| response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_is_observable_and_a_database_outage_fails_readiness_not_liveness() {
    let db = Db::postgres().await;
    let gateway = Server::start_with(&db, Options { command: "gateway", ..Options::default() }).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    assert_eq!(status_of(&client, &format!("{}/health/live", gateway.base)).await, 200);
    assert_eq!(status_of(&client, &format!("{}/health/ready", gateway.base)).await, 200);

    // The worker reaches the database through a proxy that can be cut.
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let through_proxy = db.url.replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
    assert_ne!(through_proxy, db.url, "the test database is on 127.0.0.1:5432 ({})", postgres_url());
    let handlers = handlers_dir();
    let _worker = start_worker(&db, handlers.path(), "observed", &[("DATABASE_URL", &through_proxy)]);
    let admin = format!("http://{}", logged_addr(&handlers.path().join("observed.log"), "admin listening").await);

    let ids = enqueue_slow(&db, 3, 10).await;
    wait_until(Duration::from_secs(30), "the worker to run the jobs", || async {
        statuses(&db, &ids).await.iter().all(|(_, status, _)| status.is_finished())
    })
    .await;
    let metrics = client.get(format!("{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    let completed = metrics
        .lines()
        .find(|line| line.starts_with("quern_jobs_completed_total{") && line.contains("type=\"slow\""))
        .unwrap_or_else(|| panic!("the worker counts the jobs it ran:\n{metrics}"));
    assert!(completed.ends_with(" 3"), "{completed}");
    assert_eq!(status_of(&client, &format!("{admin}/health/live")).await, 200);
    assert_eq!(status_of(&client, &format!("{admin}/health/ready")).await, 200);
    // The seed's worker answers `GET /health` (its Dockerfile's HEALTHCHECK,
    // EasyPanel's probe): `{status: "healthy", uptime, version}`, this
    // worker's id and load beside it.
    let health: serde_json::Value =
        serde_json::from_slice(&client.get(format!("{admin}/health")).send().await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["worker_id"], "observed", "{health}");
    assert!(health["uptime"].is_f64() && health["version"].is_string(), "{health}");

    // The container's own health check, as the image runs it.
    let port = admin.rsplit(':').next().unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_quern")).arg("healthcheck").env("QUERN_ADMIN_PORT", port).output();
    assert!(check.unwrap().status.success(), "quern healthcheck against the worker's admin listener");

    proxy.cut();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let not_ready = loop {
        if let Ok(response) = client.get(format!("{admin}/health/ready")).send().await
            && response.status() == 503
        {
            break serde_json::from_str::<Value>(&response.text().await.unwrap()).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "readiness still passes with the database away");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(not_ready["problems"][0].as_str().unwrap().starts_with("database"), "{not_ready}");
    assert_eq!(status_of(&client, &format!("{admin}/health/live")).await, 200, "alive while the database is away");

    proxy.restore();
    wait_until(Duration::from_secs(20), "readiness to return with the database", || {
        let (client, url) = (client.clone(), format!("{admin}/health/ready"));
        async move { status_of(&client, &url).await == 200 }
    })
    .await;
    gateway.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_metrics_token_metrics_answer_only_its_bearer_and_health_stays_open() {
    let db = Db::sqlite().await;
    let handlers = handlers_dir();
    let _worker = start_worker(&db, handlers.path(), "guarded", &[("QUERN_METRICS_TOKEN", "scrape-s3cret")]);
    let admin = format!("http://{}", logged_addr(&handlers.path().join("guarded.log"), "admin listening").await);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let metrics = |token: Option<&'static str>| {
        let mut request = client.get(format!("{admin}/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let refused = metrics(None).await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["www-authenticate"], "Bearer");
    let body: Value = serde_json::from_str(&refused.text().await.unwrap()).unwrap();
    assert!(body["error"].as_str().unwrap().contains("QUERN_METRICS_TOKEN"), "{body}");
    assert_eq!(metrics(Some("scrape-s3cre")).await.unwrap().status(), 401, "a wrong token is refused");
    let allowed = metrics(Some("scrape-s3cret")).await.unwrap();
    assert_eq!(allowed.status(), 200);
    let served = allowed.headers()["content-type"].to_str().unwrap();
    assert!(
        served.starts_with("text/plain; version=0.0.4"),
        "the exposition is served to the token's bearer: {served}"
    );
    assert_eq!(status_of(&client, &format!("{admin}/health/live")).await, 200, "probes need no token");
    db.cleanup().await;
}

/// Runs `quern <args>` with `env`, returning (success, stderr).
fn quern(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(args)
        .env("QUERN_DATA_DIR", data.path())
        .env("QUERN_CACHE_DIR", cache_dir())
        .env("QUERN_HANDLERS_DIR", data.path().join("none"))
        .env("QUERN_ADMIN_PORT", "0")
        .env("PORT", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_setting_out_of_range_is_refused_at_start_naming_its_variable() {
    let cases: &[(&str, &str, &str)] = &[
        ("worker", "WORKER_STUCK_JOB_TIMEOUT_MS", "0"),
        ("serve", "QUERN_ALERT_FAILURE_RATE", "1.5"),
        ("serve", "QUERN_ALERT_FAILURE_RATE", "0"),
        ("serve", "CACHE_TTL_HOURS", "0"),
        ("worker", "QUERN_DB_POOL_SIZE", "0"),
        ("worker", "QUERN_LEASE_MS", "100"),
        ("gateway", "QUERN_ALERT_FAILURE_WINDOW_S", "0"),
    ];
    for (command, variable, value) in cases {
        let (ok, stderr) = quern(&[command], &[(variable, value)]);
        assert!(!ok, "quern {command} started with {variable}={value}");
        assert!(stderr.contains(&format!("{variable}={value}")), "{variable}={value} is not named:\n{stderr}");
    }
}

#[tokio::test]
async fn inspecting_jobs_never_migrates_a_database() {
    // SQLite: a data dir quern never started in.
    let data = tempfile::tempdir().unwrap();
    let path = data.path().join("quern.db");
    let url = format!("sqlite://{}", path.display());
    let id = uuid::Uuid::nil().to_string();
    let (ok, stderr) = quern(&["jobs", "get", &id], &[("DATABASE_URL", &url)]);
    assert!(!ok);
    assert!(stderr.contains("not migrated") && stderr.contains("quern migrate"), "{stderr}");
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetch_one(&pool).await.unwrap();
    assert_eq!(tables, 0, "no table was created");

    // PostgreSQL: an empty schema.
    let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
    let schema = format!("quern_bare_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    let bare = format!("{}?options=-csearch_path%3D{schema}", postgres_url());
    let (ok, stderr) = quern(&["jobs", "cancel", &id], &[("DATABASE_URL", &bare)]);
    assert!(!ok);
    assert!(stderr.contains("not migrated"), "{stderr}");
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = $1")
        .bind(&schema)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(tables, 0, "no table was created in {schema}");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();

    // A database one migration behind: the missing one is named.
    for db in [Db::sqlite().await, Db::postgres().await] {
        db.execute("DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)").await;
        let (ok, stderr) = quern(&["jobs", "get", &id], &[("DATABASE_URL", &db.url)]);
        assert!(!ok);
        assert!(stderr.contains("is not applied") && stderr.contains("quern migrate"), "{stderr}");
        db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_logged_while_a_job_runs_names_the_job() {
    let db = Db::sqlite().await;
    let upstream = Upstream::start(Vec::new(), Reply::new(200, "{}")).await;
    let manifest = format!("type = \"fetch\"\nmax_attempts = 1\n[http]\nallowed_hosts = [\"{}\"]\n", upstream.addr);
    let options = Options {
        env: vec![("QUERN_LOG", "info,quern=debug".into())],
        components: vec![("fetch", "fixtures/hostile.wasm", manifest)],
        ..Options::default()
    };
    let server = Server::start_with(&db, options).await;
    let token = server.token("alice");
    let input = serde_json::json!({"mode": "http", "url": upstream.url("/ping"), "method": "GET"});
    let id = server.enqueue(&token, "fetch", input).await.body["id"].as_str().unwrap().to_string();
    let job = server.poll_job(&token, &id, Duration::from_secs(20), |job| job["status"] == "completed").await;
    let version = job["handler_version"].as_str().unwrap_or_default().to_string();

    let log = server.log();
    let outbound: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == "outbound request")
        .collect();
    assert_eq!(outbound.len(), 1, "one outbound request was logged:\n{log}");
    let span = &outbound[0]["span"];
    assert_eq!(span["name"], "job", "{}", outbound[0]);
    assert_eq!(span["job_id"], id.as_str(), "{}", outbound[0]);
    assert_eq!(span["job_type"], "fetch", "{}", outbound[0]);
    assert_eq!(span["attempt"], 1, "{}", outbound[0]);
    assert!(!version.is_empty() && version.starts_with(span["handler_version"].as_str().unwrap()), "{}", outbound[0]);
    server.finish().await;
    db.cleanup().await;
}

/// How many lines of a process's JSON log carry `message`.
fn logged(server: &Server, message: &str) -> usize {
    server
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .count()
}

/// The webhook's posts with `status`.
fn posts(hook: &Upstream, status: &str) -> usize {
    hook.received()
        .iter()
        .filter_map(|request| serde_json::from_str::<Value>(&request.body).ok())
        .filter(|body| body["status"] == status)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_processes_leads_and_another_takes_over_when_it_is_killed() {
    let db = Db::postgres().await;
    let hook = Upstream::start(Vec::new(), Reply::new(200, "")).await;
    let env = vec![
        ("QUERN_ALERT_WEBHOOK_URL", hook.url("/hooks/quern")),
        ("QUERN_ALERT_QUEUE_PENDING", "1".to_string()),
        ("QUERN_ALERT_CHECK_MS", "100".to_string()),
    ];
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(
            Server::start_with(&db, Options { command: "gateway", env: env.clone(), ..Options::default() }).await,
        );
    }
    let leaders =
        |gateways: &[Server]| gateways.iter().filter(|g| logged(g, "this process leads maintenance") > 0).count();
    wait_until(Duration::from_secs(10), "a gateway to lead", || std::future::ready(leaders(&gateways) == 1)).await;

    // A backlog every gateway sees (no worker runs): one page, not three.
    let queue = quern_queue::Queue::new(db.store.clone(), quern_queue::QueueSettings::default());
    let mut ids = Vec::new();
    for n in 0..2 {
        let request = quern_queue::EnqueueRequest {
            user_id: "u1".into(),
            job_type: "echo".into(),
            input: serde_json::json!({"n": n}),
            ..Default::default()
        };
        ids.push(queue.enqueue(request).await.unwrap().id);
    }
    wait_until(Duration::from_secs(10), "every gateway to judge the backlog firing", || {
        std::future::ready(gateways.iter().all(|g| logged(g, "alert firing") == 1) && posts(&hook, "firing") >= 1)
    })
    .await;
    assert_eq!(posts(&hook, "firing"), 1, "three gateways judged the alert; the leader alone paged");
    assert_eq!(leaders(&gateways), 1, "still one leader");

    // SIGKILL the leader: another takes the lead within a few seconds.
    let leader = gateways.iter().position(|g| logged(g, "this process leads maintenance") > 0).unwrap();
    let killed = gateways.remove(leader);
    let status = Command::new("kill").args(["-KILL", &killed.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let killed_at = std::time::Instant::now();
    wait_until(Duration::from_secs(5), "another gateway to take the lead", || {
        std::future::ready(leaders(&gateways) == 1)
    })
    .await;
    eprintln!("the lead was taken {:?} after the leader was killed", killed_at.elapsed());
    drop(killed);

    // The new leader pages the resolution, once.
    for id in &ids {
        queue.cancel(*id).await.unwrap();
    }
    wait_until(Duration::from_secs(10), "both gateways to judge the backlog resolved", || {
        std::future::ready(gateways.iter().all(|g| logged(g, "alert resolved") == 1) && posts(&hook, "resolved") >= 1)
    })
    .await;
    assert_eq!((posts(&hook, "firing"), posts(&hook, "resolved")), (1, 1), "one page per change, whoever leads");
    for gateway in gateways {
        gateway.finish().await;
    }
    db.cleanup().await;
}

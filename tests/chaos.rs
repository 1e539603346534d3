//! Chaos: real processes, real PostgreSQL, things taken away under load.
//! Sizes are set for CI on two cores; `QUERN_CHAOS_SCALE=10` multiplies the
//! loads (`QUERN_CHAOS_SCALE=10 cargo test -p quern --test chaos`).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use quern::bench::Latencies;
use quern_fakes::{Fake, Kind, Mode, closed_url};
use quern_store::{AttemptOutcome, JobFilter, JobStatus};
use reqwest::Method;
use serde_json::json;
use support::Proxy;
use support::db::Db;
use support::server::{Options, Server};
use support::workers::{enqueue_slow, exit_code, handlers_dir, signal, start_worker, wait_until};

/// Each case takes the machine to itself: their timings (a rerun within the
/// lease plus a second, the hostile report) mean nothing while another case's
/// spinning handlers or killed workers share the two cores.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn scale() -> usize {
    std::env::var("QUERN_CHAOS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// A server whose one client may have any number of unfinished jobs: these
/// cases load the machine, and a worker falling behind must not turn into 429s.
fn unlimited() -> Options {
    Options { env: vec![("QUERN_MAX_ACTIVE_JOBS_PER_USER", "0".into())], ..Options::default() }
}

/// Points `db.url` at a proxy in front of the real database; returns the
/// proxy and the real URL (for cleanup).
async fn behind_proxy(db: &mut Db, latency: Duration) -> (Proxy, String) {
    let mut url = url::Url::parse(&db.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let target = tokio::net::lookup_host(&target).await.unwrap().next().unwrap();
    let proxy = Proxy::with_latency(target, latency).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let real = std::mem::replace(&mut db.url, url.to_string());
    (proxy, real)
}

/// 1,000 jobs, two workers, one killed with SIGKILL mid-load: nothing is
/// lost, nothing completes twice, and the killed worker's jobs run again
/// within the lease plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_loses_nothing_and_runs_nothing_twice() {
    let _alone = ALONE.lock().await;
    killed_under_load(Db::postgres().await).await;
}

/// The same on SQLite: two worker processes sharing one database file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_under_load_on_sqlite_loses_nothing_and_runs_nothing_twice() {
    let _alone = ALONE.lock().await;
    killed_under_load(Db::sqlite().await).await;
}

async fn killed_under_load(db: Db) {
    let handlers = handlers_dir();
    let lease_ms = 1500;
    let env = [("QUERN_LEASE_MS", "1500"), ("WORKER_CONCURRENCY", "8")];
    let ids = enqueue_slow(&db, 1000 * scale(), 100).await;
    let mut doomed = start_worker(&db, handlers.path(), "doomed", &env);
    let mut survivor = start_worker(&db, handlers.path(), "survivor", &env);
    wait_until(Duration::from_secs(60), "a tenth of the jobs done, and the doomed worker holding some", || async {
        let counts = db.store.count_by_status().await.unwrap();
        let done = counts.iter().find(|(s, _)| *s == JobStatus::Completed).map_or(0, |(_, n)| *n) as usize;
        let running = JobFilter { status: Some(JobStatus::Processing), limit: 100, ..JobFilter::default() };
        let held = db.store.list_jobs(&running).await.unwrap().iter().any(|j| j.worker_id.as_deref() == Some("doomed"));
        done >= ids.len() / 10 && held
    })
    .await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let killed_at = chrono::Utc::now();

    wait_until(Duration::from_secs(180), "every job to complete", || async {
        db.store.count_unfinished().await.unwrap() == 0
    })
    .await;
    let (mut rerun, mut slowest) = (0, Duration::ZERO);
    for id in &ids {
        let job = db.store.get(*id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Completed, "job {id} was lost");
        let attempts = db.store.attempts(*id).await.unwrap();
        let completed = attempts.iter().filter(|a| a.outcome == AttemptOutcome::Completed).count();
        assert_eq!(completed, 1, "job {id} completed {completed} times: {attempts:?}");
        if let Some(lapsed) = attempts.iter().find(|a| a.outcome == AttemptOutcome::LeaseExpired) {
            rerun += 1;
            let next = attempts.iter().find(|a| a.attempt == lapsed.attempt + 1).expect("a next attempt");
            let waited = (next.started_at - killed_at).to_std().unwrap_or_default();
            slowest = slowest.max(waited);
            assert!(waited <= Duration::from_millis(lease_ms + 1000), "job {id} ran again {waited:?} after the kill");
            assert_eq!(next.worker_id, "survivor");
        }
    }
    assert!(rerun > 0, "the killed worker held jobs that ran again");
    eprintln!(
        "{} jobs, {rerun} taken from the killed worker and run again, the last {slowest:?} after the kill",
        ids.len()
    );
    signal(&survivor, "TERM");
    assert_eq!(exit_code(&mut survivor, Duration::from_secs(15)).await, Some(0));
    db.cleanup().await;
}

/// PostgreSQL goes away for two seconds while clients enqueue: the gateway
/// answers 503 meanwhile, the worker reconnects, and every job it accepted
/// completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_under_load_answers_503_and_loses_nothing() {
    let _alone = ALONE.lock().await;
    let mut db = Db::postgres().await;
    let (proxy, real_url) = behind_proxy(&mut db, Duration::ZERO).await;
    let mut options = unlimited();
    options.env.push(("QUERN_LEASE_MS", "5000".into()));
    let server = Server::start_with(&db, options).await;
    let token = server.token("alice");
    let mut accepted = Vec::new();
    let mut unavailable = 0;
    let enqueue = |n: usize| server.post("/v1/jobs", &token, json!({"type": "echo", "input": {"n": n}}));
    let load = 50 * scale();
    // Before: every enqueue accepted.
    for n in 0..load {
        let answer = enqueue(n).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        accepted.push(answer.body["id"].as_str().unwrap().to_string());
    }
    // Two seconds away, whatever the requests meanwhile cost: 503s, and
    // /health says so.
    proxy.cut();
    let cut_at = Instant::now();
    let mut n = load;
    while cut_at.elapsed() < Duration::from_secs(2) {
        let answer = enqueue(n).await;
        assert_eq!((answer.status.as_u16(), answer.code()), (503, "database_unavailable"), "{}", answer.text);
        unavailable += 1;
        let health = server.call(Method::GET, "/health", None, None).await;
        assert_eq!(health.status, 503, "health while the database is away: {}", health.text);
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.restore();
    // After: the gateway reconnects (the first tries may still meet the
    // outage's broken connections) and accepts again.
    let restored_at = Instant::now();
    for m in n..n + load {
        let answer = loop {
            let answer = enqueue(m).await;
            if answer.status == 202 || restored_at.elapsed() > Duration::from_secs(30) {
                break answer;
            }
            assert_eq!(answer.code(), "database_unavailable", "{}", answer.text);
            unavailable += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(answer.status, 202, "enqueue {m} after the outage: {}", answer.text);
        accepted.push(answer.body["id"].as_str().unwrap().to_string());
    }
    proxy.restore();
    assert!(unavailable > 0, "some enqueues met the outage");
    for id in &accepted {
        let job = server.poll_job(&token, id, Duration::from_secs(60), |job| job["status"] == "completed").await;
        // A claim whose answer the cut swallowed ran nowhere: its lease
        // lapses and the job runs again. Completed once, all the same.
        let outcomes: Vec<&str> =
            job["history"].as_array().unwrap().iter().map(|a| a["outcome"].as_str().unwrap()).collect();
        assert_eq!(outcomes.iter().filter(|o| **o == "completed").count(), 1, "{job}");
        assert!(outcomes.iter().all(|o| *o == "completed" || *o == "lease_expired"), "{job}");
    }
    eprintln!("{} accepted and completed, {unavailable} answered 503 during the outage", accepted.len());
    server.finish().await;
    db.url = real_url;
    db.cleanup().await;
}

/// Every packet to and from PostgreSQL held 20 ms: enqueues stay correct
/// and `/health/detailed` reports the latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_stays_correct_and_health_reports_it() {
    let _alone = ALONE.lock().await;
    let mut db = Db::postgres().await;
    let (_proxy, real_url) = behind_proxy(&mut db, Duration::from_millis(20)).await;
    let server = Server::start_with(&db, unlimited()).await;
    let token = server.token("alice");
    let mut ids = Vec::new();
    for n in 0..(20 * scale()) {
        let answer = server.enqueue(&token, "echo", json!({"slow": n})).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        ids.push(answer.body["id"].as_str().unwrap().to_string());
    }
    for (n, id) in ids.iter().enumerate() {
        let job = server.poll_job(&token, id, Duration::from_secs(60), |job| job["status"] == "completed").await;
        assert_eq!(job["result"]["echo"], json!({"slow": n}));
    }
    let detailed = server.get("/health/detailed", &server.service_token()).await;
    let latency = detailed.body["database"]["latency_ms"].as_f64().unwrap();
    assert!(latency >= 40.0, "a round trip through a 20 ms-each-way proxy: {latency} ms");
    server.finish().await;
    db.url = real_url;
    db.cleanup().await;
}

/// Ollama down and Gemini rate-limiting every request: each job makes a
/// bounded number of requests (three tries per attempt, three attempts),
/// each after its `Retry-After`, then fails naming the rate limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_down_and_rate_limited_cause_no_retry_storm() {
    let _alone = ALONE.lock().await;
    let db = Db::sqlite().await;
    let gemini = Fake::start(Kind::Chat).await;
    gemini.set(Mode::RateLimited(1));
    let manifest = std::fs::read_to_string(support::dist("sofia_text.toml"))
        .unwrap()
        .replace("allowed_hosts = [", "allowed_hosts = [\"127.0.0.1\", ");
    let options = Options {
        handlers: vec![("sofia_text", manifest)],
        env: vec![
            ("OLLAMA_URL", closed_url()),
            ("GEMINI_API_KEY", "k".into()),
            ("GEMINI_BASE_URL", gemini.url()),
            ("QUERN_HANDLER_ENV", "OLLAMA_URL,GEMINI_API_KEY,GEMINI_BASE_URL".into()),
            ("WORKER_RETRY_DELAY_MS", "100".into()),
            ("QUERN_MAX_ACTIVE_JOBS_PER_USER", "0".into()),
        ],
        ..Options::default()
    };
    let server = Server::start_with(&db, options).await;
    let token = server.token("alice");
    let jobs = 4 * scale();
    let mut ids = Vec::new();
    for n in 0..jobs {
        ids.push(
            server.enqueue(&token, "sofia_text", json!({"text": format!("prato {n}")})).await.body["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    for id in &ids {
        let job = server.poll_job(&token, id, Duration::from_secs(90), |job| job["status"] == "failed").await;
        assert_eq!(job["attempts"], 3, "{job}");
        assert!(job["error"].as_str().unwrap().contains("429"), "{job}");
    }
    let seen = gemini.seen();
    assert_eq!(seen.len(), jobs * 3 * 3, "three tries in each of three attempts, no more");
    let mut by_job: HashMap<String, Vec<Instant>> = HashMap::new();
    for request in &seen {
        by_job.entry(request.body["messages"][1]["content"].to_string()).or_default().push(request.at);
    }
    for times in by_job.values() {
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_secs(1), "a request came sooner than Retry-After: 1");
        }
    }
    server.finish().await;
    db.cleanup().await;
}

/// Hostile jobs (spinning to their deadline, hoarding memory) mixed into a
/// steady load of echo jobs: how much slower do the others finish? A
/// report, not an assertion; the sandbox tests assert the isolation itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handlers_in_a_steady_load_report_the_others_latency() {
    let _alone = ALONE.lock().await;
    let db = Db::sqlite().await;
    let env = vec![
        ("WORKER_CONCURRENCY", "8".into()),
        ("QUERN_SHUTDOWN_GRACE_S", "1".into()),
        ("QUERN_MAX_ACTIVE_JOBS_PER_USER", "0".into()),
    ];
    let server = Server::start_with(&db, Options { env, ..Options::default() }).await;
    let token = server.token("alice");
    let mut report = Vec::new();
    for hostile in [false, true] {
        let mut ids = Vec::new();
        for n in 0..(60 * scale()) {
            if hostile && n % 10 == 0 {
                let mode = if n % 20 == 0 { json!({"mode": "spin"}) } else { json!({"mode": "memory"}) };
                server.enqueue(&token, "hostile", mode).await;
            }
            ids.push(
                server.enqueue(&token, "echo", json!({"n": n, "hostile": hostile})).await.body["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut latencies = Vec::new();
        for id in &ids {
            let job = server.poll_job(&token, id, Duration::from_secs(120), |job| job["status"] == "completed").await;
            let created = chrono::DateTime::parse_from_rfc3339(job["created_at"].as_str().unwrap()).unwrap();
            let completed = chrono::DateTime::parse_from_rfc3339(job["completed_at"].as_str().unwrap()).unwrap();
            latencies.push((completed - created).to_std().unwrap_or_default());
        }
        report.push((hostile, Latencies::of(&mut latencies)));
    }
    for (hostile, l) in report.iter().filter_map(|(h, l)| Some((h, l.as_ref()?))) {
        eprintln!(
            "echo jobs {} hostile ones: p50 {:?}, p99 {:?}",
            if *hostile { "among" } else { "without" },
            l.p50,
            l.p99
        );
    }
    server.finish().await;
    db.cleanup().await;
}

//! The operators' dashboard and alerts: a real `quern serve`, a real
//! headless Chromium driven through chromedriver, a loopback webhook.
//!
//! One file over 400 lines on purpose: one browser session setup (chromedriver,
//! server, webhook) serves every test here.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use reqwest::Method;
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Options, Server};
use support::workers::{handlers_dir, start_worker, wait_until};
use support::{Reply, Upstream};

const DEADLINE: Duration = Duration::from_secs(30);

/// A job's id from an enqueue answer.
fn id_of(answer: &support::server::Answer) -> String {
    assert_eq!(answer.status, 202, "{}", answer.text);
    answer.body["id"].as_str().unwrap().to_string()
}

/// Jobs in every state on a server with one worker slot: one completed, one
/// failed (its panic message is the error), one cancelled, one processing
/// (asleep, holding the slot), two pending behind it. Returns the
/// processing job's id and the inputs sent.
async fn jobs_in_every_state(server: &Server, token: &str) -> (String, Vec<String>) {
    let marker = "input-never-shown-7f3a";
    let done = id_of(&server.enqueue(token, "echo", json!({"secret": marker})).await);
    server.poll_job(token, &done, DEADLINE, |job| job["status"] == "completed").await;
    let failed = id_of(
        &server.enqueue(token, "hostile", json!({"mode": "panic", "message": "the model returned nonsense"})).await,
    );
    server.poll_job(token, &failed, DEADLINE, |job| job["status"] == "failed").await;
    let asleep = id_of(&server.enqueue(token, "hostile", json!({"mode": "sleep", "ms": 60_000})).await);
    server.poll_job(token, &asleep, DEADLINE, |job| job["status"] == "processing").await;
    for n in 0..3 {
        id_of(&server.enqueue(token, "echo", json!({"secret": marker, "n": n})).await);
    }
    let list = server.get("/v1/jobs?status=pending&limit=1", token).await;
    let newest_pending = list.body["jobs"][0]["id"].as_str().unwrap().to_string();
    let cancelled = server.post(&format!("/v1/jobs/{newest_pending}/cancel"), token, json!({})).await;
    assert_eq!(cancelled.body["status"], "cancelled", "{}", cancelled.text);
    (asleep, vec![marker.to_string()])
}

/// A chromedriver process on a free loopback port, killed when dropped.
struct Chromedriver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts chromedriver, or says why not: without Chromium the browser test
/// is skipped on a developer's machine and fails in CI.
async fn chromedriver() -> Option<Chromedriver> {
    let found = ["/usr/bin/chromedriver", "/usr/bin/chromium"].iter().all(|p| std::path::Path::new(p).exists());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium and chromedriver are missing: apt-get install chromium chromium-driver"
        );
        eprintln!("skipped: no /usr/bin/chromium or /usr/bin/chromedriver (apt-get install chromium chromium-driver)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver =
        Chromedriver { child, url: format!("http://127.0.0.1:{port}"), _profile: tempfile::tempdir().unwrap() };
    let client = reqwest::Client::new();
    wait_until(DEADLINE, "chromedriver to answer", || {
        let status = client.get(format!("{}/status", driver.url)).send();
        async move { status.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    Some(driver)
}

async fn browser(driver: &Chromedriver) -> fantoccini::Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,2000",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// The text of the element `css`, once `check` holds for it.
async fn text_when(page: &fantoccini::Client, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        if let Ok(element) = page.find(Locator::Css(css)).await
            && let Ok(text) = element.text().await
            && check(&text)
        {
            return text;
        }
        if started.elapsed() > DEADLINE {
            let body = page.source().await.unwrap_or_default();
            panic!("timed out waiting for {what} in `{css}`; the page:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_counts_a_worker_and_a_failure_in_a_real_browser() {
    let Some(driver) = chromedriver().await else { return };
    let db = Db::sqlite().await;
    let env = vec![
        ("WORKER_CONCURRENCY", "1".into()),
        // Jobs behind the sleeping one stay pending: nothing claimed ahead.
        ("QUERN_WORKER_LOCAL_QUEUE", "0".into()),
        ("WORKER_ID", "dash-worker".into()),
        // Heartbeats (and so the worker row's active count) every half second.
        ("QUERN_LEASE_MS", "1500".into()),
        ("QUERN_SHUTDOWN_GRACE_S", "1".into()),
    ];
    let server = Server::start_with(&db, Options { env, ..Options::default() }).await;
    let token = server.token("alice");
    let (_asleep, inputs) = jobs_in_every_state(&server, &token).await;

    let page = browser(&driver).await;
    page.goto(&format!("{}/dashboard", server.base)).await.unwrap();
    // Not signed in: the sign-in form. A user's token is refused…
    page.find(Locator::Css("#secret")).await.unwrap().send_keys(&server.token("mallory")).await.unwrap();
    page.find(Locator::Css("#sign-in")).await.unwrap().click().await.unwrap();
    text_when(&page, "#message", "the refusal", |t| t.contains("not a service_role token")).await;
    // …a service token opens the dashboard.
    page.find(Locator::Css("#secret")).await.unwrap().send_keys(&server.service_token()).await.unwrap();
    page.find(Locator::Css("#sign-in")).await.unwrap().click().await.unwrap();

    for (status, count) in
        [("pending", "2"), ("processing", "1"), ("completed", "1"), ("failed", "1"), ("cancelled", "1")]
    {
        let css = format!(".count[data-status={status}] b");
        text_when(&page, &css, &format!("{count} {status}"), |t| t == count).await;
    }
    // The worker runs one job in its one slot.
    text_when(&page, "#workers tbody", "the worker row", |t| t.contains("dash-worker") && t.contains("1 / 1")).await;
    let failures =
        text_when(&page, "#failures tbody", "the failure", |t| t.contains("the model returned nonsense")).await;
    assert!(failures.contains("hostile"), "{failures}");
    let types = text_when(&page, "#types tbody", "per-type rows", |t| t.contains("echo")).await;
    assert!(types.contains("hostile"), "{types}");
    text_when(&page, "#handlers tbody", "the handler versions", |t| t.contains("echo") && t.contains("hostile")).await;

    // The failure's link shows its attempts and error, not its input.
    page.find(Locator::Css("#failures tbody a")).await.unwrap().click().await.unwrap();
    let job = text_when(&page, "#job", "the job's details", |t| t.contains("history")).await;
    assert!(job.contains("the model returned nonsense"), "{job}");

    let source = page.source().await.unwrap();
    for input in &inputs {
        assert!(!source.contains(input.as_str()), "the page shows a job input");
    }
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&screenshot, page.screenshot().await.unwrap()).unwrap();
    // And as a phone shows it: one column, nothing cut off sideways.
    page.set_window_size(390, 1800).await.unwrap();
    let overflow =
        page.execute("return document.documentElement.scrollWidth - window.innerWidth;", vec![]).await.unwrap();
    assert!(overflow.as_i64().is_some_and(|px| px <= 0), "the page is wider than a phone by {overflow} px");
    std::fs::write(screenshot.with_file_name("dashboard-phone.png"), page.screenshot().await.unwrap()).unwrap();
    eprintln!("screenshots: {} and dashboard-phone.png beside it", screenshot.display());
    page.close().await.unwrap();
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_the_dashboard_and_stats_answer_401_and_never_show_inputs() {
    let db = Db::sqlite().await;
    let env = vec![
        ("WORKER_CONCURRENCY", "1".into()),
        ("QUERN_WORKER_LOCAL_QUEUE", "0".into()),
        ("QUERN_SHUTDOWN_GRACE_S", "1".into()),
        ("QUERN_DASHBOARD_PASSWORD", "correct horse".into()),
    ];
    let server = Server::start_with(&db, Options { env, ..Options::default() }).await;
    let token = server.token("alice");
    let (asleep, inputs) = jobs_in_every_state(&server, &token).await;

    let page = server.call(Method::GET, "/dashboard", None, None).await;
    assert_eq!(page.status, 401);
    assert!(page.text.contains("<form") && page.text.contains("/dashboard/login"), "{}", page.text);
    let stats = server.call(Method::GET, "/v1/stats", None, None).await;
    assert_eq!((stats.status.as_u16(), stats.code()), (401, "unauthorized"), "{}", stats.text);
    assert!(stats.error().contains("sign in at /dashboard"), "{}", stats.text);
    let job = server.call(Method::GET, &format!("/dashboard/jobs/{asleep}"), None, None).await;
    assert_eq!(job.status, 401);
    assert_eq!(server.get("/v1/stats", &token).await.status, 403, "a user's token is not an operator's");

    // Redirects not followed, so the session cookie can be read.
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let refused = client
        .post(format!("{}/dashboard/login", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_secret("wrong horse"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().get("set-cookie").is_none());
    let signed_in = client
        .post(format!("{}/dashboard/login", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_secret("correct horse"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed_in.status(), 303);
    assert_eq!(signed_in.headers()["location"], "/dashboard");
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();

    let with_session = |path: &str| client.get(format!("{}{path}", server.base)).header("cookie", &session).send();
    let page = with_session("/dashboard").await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    let stats: Value = serde_json::from_str(&with_session("/v1/stats").await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(stats["jobs"]["pending"], 2, "{stats}");
    assert_eq!(stats["jobs"]["processing"], 1, "{stats}");
    let job = with_session(&format!("/dashboard/jobs/{asleep}")).await.unwrap().text().await.unwrap();
    assert!(job.contains("\"status\":\"processing\""), "{job}");
    let by_token = server.get("/v1/stats?window=15m", &server.service_token()).await;
    assert_eq!((by_token.status.as_u16(), by_token.body["window_s"].as_u64()), (200, Some(900)), "{}", by_token.text);
    for text in [&page, &stats.to_string(), &job, &by_token.text] {
        for input in &inputs {
            assert!(!text.contains(input.as_str()), "a job input is shown to operators");
        }
        assert!(!text.contains("60000"), "the sleeping job's input is shown: {text}");
    }
    let bad = server.get("/v1/stats?window=soon", &server.service_token()).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "invalid_window"), "{}", bad.text);
    let bad = server.get("/v1/stats?window=30d", &server.service_token()).await;
    assert!(bad.error().contains("1m to 7d"), "{}", bad.text);

    let signed_out =
        client.post(format!("{}/dashboard/logout", server.base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(signed_out.status(), 303);
    assert_eq!(with_session("/v1/stats").await.unwrap().status(), 401, "the session ended");
    server.finish().await;
    db.cleanup().await;
}

fn form_secret(secret: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new()).append_pair("secret", secret).finish()
}

/// The webhook's notices, parsed.
fn notices(webhook: &Upstream) -> Vec<Value> {
    webhook.received().iter().map(|r| serde_json::from_str(&r.body).unwrap()).collect()
}

/// Polls `/v1/stats` until `check` holds for it.
async fn stats_until(server: &Server, token: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let stats = server.get("/v1/stats", token).await;
        assert_eq!(stats.status, 200, "{}", stats.text);
        if check(&stats.body) {
            return stats.body;
        }
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}; last: {}", stats.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn seconds_between(from: &Value, to: &Value) -> f64 {
    let parse = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    (parse(to) - parse(from)).num_milliseconds() as f64 / 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_51_fires_once_and_resolves_once_when_it_drains() {
    let db = Db::postgres().await;
    let webhook = Upstream::start(vec![], Reply::new(204, "")).await;
    let env = vec![
        ("WORKER_CONCURRENCY", "1".into()),
        ("QUERN_MAX_ACTIVE_JOBS_PER_USER", "0".into()),
        ("QUERN_ALERT_CHECK_MS", "100".into()),
        ("QUERN_ALERT_WEBHOOK_URL", webhook.url("/hooks/quern")),
    ];
    let server = Server::start_with(&db, Options { env, ..Options::default() }).await;
    let (token, ops) = (server.token("alice"), server.service_token());
    let blocker = id_of(&server.enqueue(&token, "hostile", json!({"mode": "sleep", "ms": 60_000})).await);
    server.poll_job(&token, &blocker, DEADLINE, |job| job["status"] == "processing").await;
    for n in 0..50 {
        id_of(&server.enqueue(&token, "echo", json!({"queued": n})).await);
    }
    // Fifty pending is not more than the threshold: nothing fires.
    let calm = stats_until(&server, &ops, "fifty pending", |s| s["jobs"]["pending"] == 50).await;
    let first_look = calm["generated_at"].clone();
    stats_until(&server, &ops, "a few judgements of fifty", |s| seconds_between(&first_look, &s["generated_at"]) > 0.5)
        .await;
    assert!(notices(&webhook).is_empty(), "50 pending fired an alert: {:?}", notices(&webhook));

    id_of(&server.enqueue(&token, "echo", json!({"queued": 50})).await);
    let firing = stats_until(&server, &ops, "the queue alert", |s| {
        s["alerts"].as_array().unwrap().iter().any(|a| a["kind"] == "queue_backlog")
    })
    .await;
    let alert = firing["alerts"].as_array().unwrap().iter().find(|a| a["kind"] == "queue_backlog").unwrap().clone();
    assert!(alert["message"].as_str().unwrap().contains("51 jobs pending"), "{alert}");
    // Let it last a second (ten judgements) before draining the queue.
    stats_until(&server, &ops, "the alert to last a second", |s| {
        seconds_between(&alert["since"], &s["generated_at"]) > 1.0
    })
    .await;
    let metrics = server.call(Method::GET, "/metrics", None, None).await.text;
    assert!(metrics.contains(r#"quern_alerts_active{alert="queue_backlog"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"quern_alerts_fired_total{alert="queue_backlog"} 1"#), "{metrics}");

    server.post(&format!("/v1/jobs/{blocker}/cancel"), &token, json!({})).await;
    let drained = stats_until(&server, &ops, "the queue to drain and the alert to resolve", |s| {
        s["jobs"]["pending"] == 0 && s["alerts"].as_array().unwrap().is_empty()
    })
    .await;
    // A second more of judgements: no repeat of either notice.
    stats_until(&server, &ops, "a second after the drain", |s| {
        seconds_between(&drained["generated_at"], &s["generated_at"]) > 1.0
    })
    .await;
    let posted = notices(&webhook);
    let statuses: Vec<&str> = posted.iter().map(|n| n["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["firing", "resolved"], "{posted:?}");
    for notice in &posted {
        assert_eq!(notice["kind"], "queue_backlog");
        assert_eq!(notice["since"], alert["since"]);
    }
    assert!(posted[1]["resolved_at"].is_string(), "{posted:?}");
    assert!(webhook.received().iter().all(|r| r.method == "POST" && r.path == "/hooks/quern"));
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_without_a_goodbye_fires_the_offline_alert() {
    let db = Db::postgres().await;
    let webhook = Upstream::start(vec![], Reply::new(200, "ok")).await;
    let env = vec![
        ("QUERN_LEASE_MS", "1500".into()),
        ("QUERN_ALERT_WORKER_OFFLINE_S", "2".into()),
        ("QUERN_ALERT_CHECK_MS", "100".into()),
        ("QUERN_ALERT_WEBHOOK_URL", webhook.url("/")),
    ];
    let server = Server::start_with(&db, Options { env, ..Options::default() }).await;
    let ops = server.service_token();
    let handlers = handlers_dir();
    let lease = [("QUERN_LEASE_MS", "1500")];
    let mut doomed = start_worker(&db, handlers.path(), "doomed", &lease);
    let mut polite = start_worker(&db, handlers.path(), "polite", &lease);
    stats_until(&server, &ops, "both workers' heartbeats", |s| {
        let ids: Vec<&str> = s["workers"].as_array().unwrap().iter().filter_map(|w| w["id"].as_str()).collect();
        ids.contains(&"doomed") && ids.contains(&"polite")
    })
    .await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    support::workers::signal(&polite, "TERM");
    assert_eq!(support::workers::exit_code(&mut polite, DEADLINE).await, Some(0));

    let stats = stats_until(&server, &ops, "the offline alert", |s| {
        s["alerts"].as_array().unwrap().iter().any(|a| a["kind"] == "worker_offline" && a["subject"] == "doomed")
    })
    .await;
    let workers = stats["workers"].as_array().unwrap();
    let row = workers.iter().find(|w| w["id"] == "doomed").unwrap();
    assert_eq!(row["offline"], true, "{row}");
    assert!(!workers.iter().any(|w| w["id"] == "polite"), "a worker that stopped cleanly is not listed: {workers:?}");
    let alerts = stats["alerts"].as_array().unwrap();
    assert!(!alerts.iter().any(|a| a["subject"] == "polite"), "{alerts:?}");
    wait_until(DEADLINE, "the webhook to hear of it", || {
        let heard = notices(&webhook).iter().any(|n| n["status"] == "firing" && n["subject"] == "doomed");
        async move { heard }
    })
    .await;
    let doomed_notices = notices(&webhook).into_iter().filter(|n| n["subject"] == "doomed").count();
    assert_eq!(doomed_notices, 1, "{:?}", notices(&webhook));
    let metrics = server.call(Method::GET, "/metrics", None, None).await.text;
    assert!(metrics.contains("quern_workers_offline 1"), "{metrics}");
    server.finish().await;
    db.cleanup().await;
}

#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/quern-alerts.yml");
    match Command::new("promtool").args(["check", "rules", rules]).output() {
        Ok(output) => assert!(
            output.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(_) if std::env::var_os("CI").is_some() => panic!("promtool is missing: apt-get install prometheus"),
        Err(_) => {
            eprintln!("promtool not installed (apt-get install prometheus): rules not checked here; CI checks them")
        }
    }
}

//! Defects found by probing quern as an attacker or a careless client would,
//! each kept fixed here against the real binary on both databases.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::db::Db;
use support::dist;
use support::server::{Options, Server};

on_both_databases!(
    pipeline_steps_and_retries_count_against_the_rate_limit,
    a_pipeline_has_at_most_its_configured_steps,
    cancelling_a_finished_step_stops_the_rest_of_its_pipeline,
    every_pipeline_step_is_checked_like_a_direct_enqueue,
    a_type_restricted_to_service_callers_refuses_users,
    a_cached_result_answers_only_its_owner,
    a_nul_character_is_refused_in_inputs_and_fails_a_result,
    only_a_short_safe_request_id_is_kept,
    behind_a_trusted_proxy_the_client_cannot_pick_its_address,
    the_same_build_under_a_changed_manifest_is_another_version,
);

const DEADLINE: Duration = Duration::from_secs(30);

fn with_env(env: &[(&'static str, &str)]) -> Options {
    Options { env: env.iter().map(|(k, v)| (*k, v.to_string())).collect(), ..Options::default() }
}

fn id_of(answer: &support::server::Answer) -> String {
    answer.body["id"].as_str().unwrap_or_else(|| panic!("no id in {}", answer.text)).to_string()
}

async fn pipeline_steps_and_retries_count_against_the_rate_limit(db: &Db) {
    let server = Server::start_with(db, with_env(&[("QUERN_RATE_LIMIT_PER_MIN", "4")])).await;
    let token = server.token("alice");
    // One request, three jobs: the job and its two steps.
    let body = json!({"type": "echo", "input": {"n": 1},
                      "next": [{"type": "echo", "input": {"n": 2}}, {"type": "echo", "input": {"n": 3}}]});
    assert_eq!(server.post("/v1/jobs", &token, body).await.status, 202);
    let failing = server.enqueue(&token, "hostile", json!({"mode": "panic", "message": "always"})).await;
    assert_eq!(failing.status, 202, "{}", failing.text);
    let id = id_of(&failing);
    server.poll_job(&token, &id, DEADLINE, |job| job["status"] == "failed").await;
    // The allowance is spent: a retry creates work and is refused like an enqueue.
    let retry = server.post(&format!("/v1/jobs/{id}/retry"), &token, json!({})).await;
    assert_eq!((retry.status.as_u16(), retry.code()), (429, "rate_limited"), "{}", retry.text);
    assert!(retry.headers.contains_key("retry-after"));
    let too_big = json!({"type": "echo", "input": {"n": 4}, "next": [
        {"type": "echo", "input": {}}, {"type": "echo", "input": {}}, {"type": "echo", "input": {}},
        {"type": "echo", "input": {}}, {"type": "echo", "input": {}}]});
    let answer = server.post("/v1/jobs", &server.token("bob"), too_big).await;
    assert_eq!(answer.status, 429, "six jobs in one request, four a minute: {}", answer.text);
    assert!(answer.error().contains("would create 6 jobs"), "{}", answer.text);
    // Service callers are trusted backends, not limited per address.
    let service = server.service_token();
    for n in 0..6 {
        assert_eq!(server.enqueue(&service, "echo", json!({"backend": n})).await.status, 202);
    }
    server.finish().await;
}

async fn a_pipeline_has_at_most_its_configured_steps(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let steps: Vec<Value> = (0..17).map(|n| json!({"type": "echo", "input": {"step": n}})).collect();
    let answer = server.post("/v1/jobs", &token, json!({"type": "echo", "input": {"n": 0}, "next": steps})).await;
    assert_eq!((answer.status.as_u16(), answer.code()), (400, "invalid_next"), "{}", answer.text);
    assert!(answer.error().contains("at most 16 steps"), "{}", answer.text);
    assert!(answer.error().contains("QUERN_MAX_PIPELINE_STEPS"), "{}", answer.text);
    let steps: Vec<Value> = (0..16).map(|n| json!({"type": "echo", "input": {"step": n}})).collect();
    let answer = server.post("/v1/jobs", &token, json!({"type": "echo", "input": {"n": 0}, "next": steps})).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    server.finish().await;
}

async fn cancelling_a_finished_step_stops_the_rest_of_its_pipeline(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let body = json!({"type": "echo", "input": {"first": true}, "next": [
        {"type": "hostile", "input": {"mode": "sleep", "ms": 20_000}},
        {"type": "echo", "input": {"never": true}}]});
    let first = id_of(&server.post("/v1/jobs", &token, body).await);
    server.poll_job(&token, &first, DEADLINE, |job| job["status"] == "completed").await;
    let started = std::time::Instant::now();
    let step = loop {
        let jobs = server.get("/v1/jobs", &token).await.body["jobs"].as_array().cloned().unwrap_or_default();
        if let Some(step) = jobs.iter().find(|job| job["parent_id"] == first.as_str() && job["status"] == "processing")
        {
            break step["id"].as_str().unwrap().to_string();
        }
        assert!(started.elapsed() < DEADLINE, "the second step never ran: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    // The first job ended long ago; cancelling it stops what runs after it.
    let answer = server.post(&format!("/v1/jobs/{first}/cancel"), &token, json!({})).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!((answer.body["id"].as_str(), &answer.body["status"]), (Some(step.as_str()), &json!("cancelled")));
    let stopped =
        server.poll_job(&token, &step, DEADLINE, |job| job["history"].as_array().is_some_and(|h| !h.is_empty())).await;
    assert_eq!(stopped["history"][0]["outcome"], "cancelled", "{stopped}");
    let jobs = server.get("/v1/jobs", &token).await.body["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 2, "the third step never ran: {jobs:?}");
    let again = server.post(&format!("/v1/jobs/{first}/cancel"), &token, json!({})).await;
    assert_eq!(
        (again.status.as_u16(), again.code()),
        (409, "already_finished"),
        "nothing left to cancel: {}",
        again.text
    );
    server.finish().await;
}

async fn every_pipeline_step_is_checked_like_a_direct_enqueue(db: &Db) {
    let whatsapp = std::fs::read_to_string(dist("whatsapp_message.toml")).unwrap();
    let options = Options {
        env: vec![("QUERN_DISABLED_TYPES", "cached".into())],
        handlers: vec![("whatsapp_message", whatsapp)],
        ..Options::default()
    };
    let server = Server::start_with(db, options).await;
    let token = server.token("alice");
    let disabled = json!({"type": "echo", "input": {}, "next": [{"type": "cached", "input": {}}]});
    let answer = server.post("/v1/jobs", &token, disabled).await;
    assert_eq!((answer.status.as_u16(), answer.code()), (503, "type_disabled"), "{}", answer.text);
    assert!(answer.error().starts_with("next[0]: "), "{}", answer.text);
    let forbidden = json!({"type": "echo", "input": {},
                           "next": [{"type": "whatsapp_message", "input": {"to": "+5511999998888", "text": "oi"}}]});
    let answer = server.post("/v1/jobs", &token, forbidden).await;
    assert_eq!((answer.status.as_u16(), answer.code()), (403, "type_forbidden"), "{}", answer.text);
    assert!(answer.error().starts_with("next[0]: "), "{}", answer.text);
    let listed = server.get("/v1/jobs", &token).await;
    assert_eq!(listed.body["jobs"], json!([]), "nothing was enqueued");
    server.finish().await;
}

async fn a_type_restricted_to_service_callers_refuses_users(db: &Db) {
    let whatsapp = std::fs::read_to_string(dist("whatsapp_message.toml")).unwrap();
    let server =
        Server::start_with(db, Options { handlers: vec![("whatsapp_message", whatsapp)], ..Options::default() }).await;
    let input = json!({"to": "+5511999998888", "text": "qualquer coisa"});
    let answer = server.enqueue(&server.token("alice"), "whatsapp_message", input.clone()).await;
    assert_eq!((answer.status.as_u16(), answer.code()), (403, "type_forbidden"), "{}", answer.text);
    assert_eq!(
        answer.error(),
        "job type `whatsapp_message` may be enqueued only by service_role callers (`[access] roles` of its handler.toml)"
    );
    let answer = server.enqueue(&server.service_token(), "whatsapp_message", input).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    server.finish().await;
}

async fn a_cached_result_answers_only_its_owner(db: &Db) {
    let server = Server::start(db).await;
    let (alice, bob) = (server.token("alice"), server.token("bob"));
    let input = json!({"exam": "glicose 110 mg/dL", "private": true});
    let first = server.enqueue(&alice, "cached", input.clone()).await;
    server.poll_job(&alice, &id_of(&first), DEADLINE, |job| job["status"] == "completed").await;
    let guessed = server.enqueue(&bob, "cached", input.clone()).await;
    assert_eq!(guessed.status, 202, "bob's guess runs as his own job: {}", guessed.text);
    assert_eq!(guessed.body["cached"], false);
    let again = server.enqueue(&alice, "cached", input).await;
    assert_eq!((again.status.as_u16(), &again.body["cached"]), (200, &json!(true)), "{}", again.text);
    assert_eq!(again.body["id"], Value::Null, "a hit carries no job id");
    server.finish().await;
}

async fn a_nul_character_is_refused_in_inputs_and_fails_a_result(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "echo", json!({"text": "before\u{0}after"})).await;
    assert_eq!((answer.status.as_u16(), answer.code()), (400, "invalid_input"), "{}", answer.text);
    assert!(answer.error().contains("U+0000 at `input.text`"), "{}", answer.text);
    let job = id_of(&server.enqueue(&token, "hostile", json!({"mode": "nul"})).await);
    let failed = server.poll_job(&token, &job, DEADLINE, |job| job["status"] == "failed").await;
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("U+0000 at `result.text`"), "{failed}");
    assert_eq!(failed["attempts"], 1, "failed at once, not after its lease");
    server.finish().await;
}

async fn only_a_short_safe_request_id_is_kept(db: &Db) {
    let server = Server::start(db).await;
    let hostile_id = "x\" injected=\"true ".repeat(10);
    let response = server
        .client
        .get(format!("{}/health", server.base))
        .header("x-request-id", hostile_id.trim())
        .send()
        .await
        .unwrap();
    let given = response.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(given, hostile_id.trim());
    assert!(uuid::Uuid::parse_str(&given).is_ok(), "a fresh id replaces it: {given}");
    let response =
        server.client.get(format!("{}/health", server.base)).header("x-request-id", "req-42.a_b").send().await;
    assert_eq!(response.unwrap().headers()["x-request-id"], "req-42.a_b", "a safe id is kept");
    assert!(!server.log().contains("injected"), "the unsafe id never reached the log");
    server.finish().await;
}

async fn behind_a_trusted_proxy_the_client_cannot_pick_its_address(db: &Db) {
    let server =
        Server::start_with(db, with_env(&[("QUERN_RATE_LIMIT_PER_MIN", "3"), ("QUERN_TRUST_PROXY", "true")])).await;
    let token = server.token("alice");
    let mut statuses = Vec::new();
    for n in 0..6 {
        // The client wrote the first entry; the proxy appended the address it saw.
        let forwarded = format!("10.9.9.{n}, 198.51.100.1");
        let response = server
            .client
            .post(format!("{}/v1/jobs", server.base))
            .bearer_auth(&token)
            .header("x-forwarded-for", forwarded)
            .header("content-type", "application/json")
            .body(json!({"type": "echo", "input": {"spoof": n}}).to_string())
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![202, 202, 202, 429, 429, 429], "one client, whatever it writes on the left");
    server.finish().await;
}

async fn the_same_build_under_a_changed_manifest_is_another_version(db: &Db) {
    let server = Server::start(db).await;
    let ops = server.service_token();
    let component = std::fs::read(dist("echo.wasm")).unwrap();
    let upload = |manifest: &'static str| {
        let form = reqwest::multipart::Form::new()
            .part("component", reqwest::multipart::Part::bytes(component.clone()).file_name("echo.wasm"))
            .text("manifest", manifest);
        let request = server.client.post(format!("{}/v1/handlers/probe/versions", server.base)).bearer_auth(&ops);
        async move { support::server::read(request.multipart(form).send().await.unwrap()).await }
    };
    let open = "type = \"probe\"\n[http]\nallowed_hosts = [\"api.example.com\", \"*.example.org\"]\n";
    let strict = "type = \"probe\"\n[http]\nallowed_hosts = [\"api.example.com\"]\n";
    let first = upload(open).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let stricter = upload(strict).await;
    assert_eq!(stricter.status, 201, "a stricter manifest is a new version, not ignored: {}", stricter.text);
    assert_ne!(stricter.body["version"], first.body["version"]);
    assert_eq!(stricter.body["sha256"], first.body["sha256"], "the same component");
    let again = upload(strict).await;
    assert_eq!((again.status.as_u16(), &again.body["created"]), (200, &json!(false)), "{}", again.text);
    assert_eq!(again.body["version"], stricter.body["version"]);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sign_in_is_throttled_and_its_pages_guarded() {
    let db = Db::sqlite().await;
    let env = [
        ("QUERN_DASHBOARD_PASSWORD", "correct horse battery"),
        ("QUERN_PUBLIC_URL", "https://quern.example.com"),
        ("QUERN_TRUST_PROXY", "127.0.0.1"),
    ];
    let server = Server::start_with(&db, with_env(&env)).await;
    let sign_in = |secret: &str| {
        let request = server
            .client
            .post(format!("{}/dashboard/login", server.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("secret={}", secret.replace(' ', "+")));
        async move { request.send().await.unwrap() }
    };
    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for n in 0..7 {
            statuses.push(sign_in(&format!("guess {n}")).await.status().as_u16());
        }
        statuses
    };
    assert_eq!(statuses, vec![401, 401, 401, 401, 401, 401, 429], "five free failures, then a wait");
    let locked = sign_in("correct horse battery").await;
    assert_eq!(locked.status(), 429, "while it waits, even the right password is refused");
    assert!(locked.headers().contains_key("retry-after"));

    // Another address (a trusted proxy names it) is not held up.
    let other = other_address_sign_in(&server).await;
    assert_eq!(other.status(), 303, "signed in");
    let cookie = other.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );

    let page = server.client.get(format!("{}/dashboard", server.base)).send().await.unwrap();
    let headers = page.headers();
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("frame-ancestors 'none'") && !policy.contains("unsafe-inline"), "{policy}");
    server.finish().await;
}

/// Signs in with the right password from a client a trusted proxy names
/// (and does not follow the redirect, to read the cookie).
async fn other_address_sign_in(server: &Server) -> reqwest::Response {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    client
        .post(format!("{}/dashboard/login", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", "198.51.100.23")
        .body("secret=correct+horse+battery")
        .send()
        .await
        .unwrap()
}

/// Handlers run on threads of their own, apart from those serving HTTP: a
/// guest spinning in every slot cannot hold up the gateway (`quern bench
/// isolation` measures it: /health p99 444 ms before, under 10 ms since).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_threads_apart_from_the_gateway() {
    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    assert!(threads.iter().any(|name| name == "quern-job"), "job threads: {threads:?}");
    assert!(threads.iter().any(|name| name == "tokio-rt-worker"), "HTTP threads: {threads:?}");
    server.finish().await;
}

//! The HTTP API end to end: a real `quern serve` on a loopback port, on
//! SQLite and on PostgreSQL, driven over HTTP as a client would.
//!
//! One file over 400 lines on purpose: the API's end-to-end story on both
//! databases over one shared server setup.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Options, Server};

on_both_databases!(
    an_enqueued_job_is_polled_to_completion,
    a_cached_result_answers_200_without_a_job,
    wait_holds_the_request_until_the_job_ends,
    events_stream_status_and_progress_to_the_end_state,
    a_browser_follows_a_job_by_sse_with_the_token_in_the_url,
    a_running_job_is_cancelled,
    a_failed_job_is_retried,
    the_list_pages_newest_first_with_a_cursor,
    a_pipeline_s_jobs_are_listed_by_its_first_job,
    bad_requests_get_400s_that_say_what_is_wrong,
    bad_tokens_get_401_and_other_users_jobs_404,
    limits_answer_429,
    feature_flags_switch_a_type_off_and_on,
    priority_1_to_4_needs_a_premium_plan,
);

async fn an_enqueued_job_is_polled_to_completion(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "echo", json!({"meal": "arroz e feijão"})).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    assert_eq!(answer.body["status"], "pending");
    assert_eq!(answer.body["estimated_time_s"], 1);
    let id = answer.body["id"].as_str().unwrap().to_string();
    assert_eq!(answer.body["poll_url"], format!("/v1/jobs/{id}"));
    assert_eq!(answer.body["events_url"], format!("/v1/jobs/{id}/events"));
    assert_eq!(answer.headers["location"], format!("/v1/jobs/{id}").as_str());

    let job = server.poll_job(&token, &id, Duration::from_secs(20), |job| job["status"] == "completed").await;
    assert_eq!(job["result"]["echo"], json!({"meal": "arroz e feijão"}));
    assert_eq!(job["user_id"], "alice");
    assert_eq!(job["progress"]["percent"], 100);
    assert_eq!(job["attempts"], 1);
    assert_eq!(job["history"][0]["outcome"], "completed");
    assert!(job["handler_version"].as_str().is_some_and(|v| v.len() == 12), "{job}");
    assert!(job["completed_at"].is_string() && job["started_at"].is_string());
    assert!(job.get("input").is_none(), "a job view never carries the input");
    server.finish().await;
}

async fn a_cached_result_answers_200_without_a_job(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let input = json!({"text": "pão com manteiga", "n": 1});
    let first = server.enqueue(&token, "cached", input.clone()).await;
    assert_eq!(first.status, 202, "{}", first.text);
    let id = first.body["id"].as_str().unwrap();
    let done = server.poll_job(&token, id, Duration::from_secs(20), |job| job["status"] == "completed").await;

    // The same input, keys in another order: the cached result, no new job.
    let again = server.enqueue(&token, "cached", json!({"n": 1, "text": "pão com manteiga"})).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.body["id"], Value::Null);
    assert_eq!(again.body["status"], "completed");
    assert_eq!(again.body["cached"], true);
    assert_eq!(again.body["result"], done["result"]);
    let page = server.get("/v1/jobs?type=cached", &token).await;
    assert_eq!(page.body["jobs"].as_array().unwrap().len(), 1, "a cache hit creates no job");

    // Another input misses.
    let other = server.enqueue(&token, "cached", json!({"text": "pão", "n": 2})).await;
    assert_eq!(other.status, 202);
    let metrics = server.client.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"quern_cache_hits_total{type="cached"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"quern_cache_misses_total{type="cached"} 2"#), "{metrics}");
    server.finish().await;
}

async fn wait_holds_the_request_until_the_job_ends(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let input = json!({"mode": "sleep", "ms": 300, "tag": "waited"});
    let answer = server.post("/v1/jobs?wait=20", &token, json!({"type": "hostile", "input": input})).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["status"], "completed");
    assert_eq!(answer.body["result"]["tag"], "waited");

    // A wait that runs out answers 202 with the job still unfinished.
    let input = json!({"mode": "sleep", "ms": 3000});
    let answer = server.post("/v1/jobs?wait=0.2", &token, json!({"type": "hostile", "input": input})).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    assert!(["pending", "processing"].contains(&answer.body["status"].as_str().unwrap()), "{}", answer.text);

    let too_long = server.post("/v1/jobs?wait=31", &token, json!({"type": "echo", "input": {}})).await;
    assert_eq!((too_long.status.as_u16(), too_long.code()), (400, "invalid_wait"), "{}", too_long.text);
    server.finish().await;
}

/// Reads an SSE stream to its end: `(event, data)` pairs.
async fn read_events(server: &Server, token: &str, id: &str) -> Vec<(String, Value)> {
    let request = server.client.get(format!("{}/v1/jobs/{id}/events", server.base)).bearer_auth(token);
    read_stream(request).await.into_iter().map(|(event, _, data)| (event, data)).collect()
}

/// Sends `request` and reads the SSE stream it opens to its end:
/// `(event, id, data)` triples.
async fn read_stream(request: reqwest::RequestBuilder) -> Vec<(String, String, Value)> {
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let started = Instant::now();
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("an event in time")
    {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    text.split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let id = block.lines().find_map(|l| l.strip_prefix("id: ")).unwrap_or_default();
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), id.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

async fn a_browser_follows_a_job_by_sse_with_the_token_in_the_url(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "hostile", json!({"mode": "sleep", "ms": 500, "tag": "browser"})).await;
    let id = answer.body["id"].as_str().unwrap().to_string();
    let url = format!("{}/v1/jobs/{id}/events", server.base);
    // A JWT is URL-safe as it is (base64url and dots).
    let with_token = |token: &str| format!("{url}?access_token={token}");

    // As `EventSource` does: no Authorization header, the token in the URL.
    let events = read_stream(server.client.get(with_token(&token))).await;
    let (_, last_id, last) = events.last().expect("at least the final event");
    assert_eq!((last["status"].as_str(), last["result"]["tag"].as_str()), (Some("completed"), Some("browser")));
    assert!(events.iter().all(|(_, id, _)| !id.is_empty()), "every event has an id: {events:?}");

    // Reconnecting after the final event (as `EventSource` does when the
    // stream closes): 204, which stops it retrying.
    let again = server.client.get(with_token(&token)).header("last-event-id", last_id).send().await;
    assert_eq!(again.unwrap().status(), 204);

    // A token good for hours does not belong in a URL; nor does no token.
    let long_lived = server.remember(
        quern_api::auth::mint(support::server::SECRET.as_bytes(), "alice", false, None, Duration::from_secs(6 * 3600))
            .unwrap(),
    );
    let refused = server.client.get(with_token(&long_lived)).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.text().await.unwrap().contains("must expire within"), "the refusal says why");
    // Another user's token opens nothing: the job is not theirs.
    let bob = server.token("bob");
    assert_eq!(server.client.get(with_token(&bob)).send().await.unwrap().status(), 404);
    let anonymous = server.client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.text().await.unwrap().contains("access_token"), "the refusal names both ways in");
    server.finish().await;
}

async fn events_stream_status_and_progress_to_the_end_state(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "hostile", json!({"mode": "sleep", "ms": 800, "tag": "sse"})).await;
    let id = answer.body["id"].as_str().unwrap().to_string();
    let events = read_events(&server, &token, &id).await;
    let statuses: Vec<&str> = events.iter().map(|(_, data)| data["status"].as_str().unwrap()).collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{events:?}");
    assert!(statuses.contains(&"processing"), "the stream saw the job run: {events:?}");
    assert_eq!(events.last().unwrap().1["result"]["tag"], "sse");
    assert!(events.iter().all(|(kind, _)| kind == "status" || kind == "progress"), "{events:?}");

    // A job that already ended yields its final event at once, then the stream ends.
    let started = Instant::now();
    let again = read_events(&server, &token, &id).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].1["status"], "completed");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.finish().await;
}

async fn a_running_job_is_cancelled(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "hostile", json!({"mode": "sleep", "ms": 30000})).await;
    let id = answer.body["id"].as_str().unwrap().to_string();
    server.poll_job(&token, &id, Duration::from_secs(20), |job| job["status"] == "processing").await;

    let cancelled = server.post(&format!("/v1/jobs/{id}/cancel"), &token, json!({})).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    assert_eq!(cancelled.body["status"], "cancelled");
    // The instance stops and its attempt is recorded as cancelled.
    let job = server
        .poll_job(&token, &id, Duration::from_secs(5), |job| {
            job["history"].as_array().is_some_and(|h| h.iter().any(|a| a["outcome"] == "cancelled"))
        })
        .await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["result"], Value::Null);

    let twice = server.post(&format!("/v1/jobs/{id}/cancel"), &token, json!({})).await;
    assert_eq!((twice.status.as_u16(), twice.code()), (409, "already_finished"), "{}", twice.text);
    server.finish().await;
}

async fn a_failed_job_is_retried(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "hostile", json!({"mode": "panic", "message": "boom"})).await;
    let id = answer.body["id"].as_str().unwrap().to_string();
    let failed = server.poll_job(&token, &id, Duration::from_secs(20), |job| job["status"] == "failed").await;
    assert!(failed["error"].as_str().unwrap().contains("boom"), "{failed}");

    let retried = server.post(&format!("/v1/jobs/{id}/retry"), &token, json!({})).await;
    assert_eq!(retried.status, 202, "{}", retried.text);
    assert!(["pending", "processing"].contains(&retried.body["status"].as_str().unwrap()));
    assert_eq!(retried.body["max_attempts"], 2, "one fresh attempt (the type's max_attempts)");
    let again = server.poll_job(&token, &id, Duration::from_secs(20), |job| job["status"] == "failed").await;
    assert_eq!(again["attempts"], 2);
    assert_eq!(again["history"].as_array().unwrap().len(), 2, "{again}");

    let completed = server.enqueue(&token, "echo", json!({"k": 1})).await;
    let done_id = completed.body["id"].as_str().unwrap().to_string();
    server.poll_job(&token, &done_id, Duration::from_secs(20), |job| job["status"] == "completed").await;
    let refused = server.post(&format!("/v1/jobs/{done_id}/retry"), &token, json!({})).await;
    assert_eq!((refused.status.as_u16(), refused.code()), (409, "not_retryable"), "{}", refused.text);
    server.finish().await;
}

async fn the_list_pages_newest_first_with_a_cursor(db: &Db) {
    let server = Server::start_with(db, Options { command: "gateway", ..Options::default() }).await;
    let token = server.token("alice");
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(server.enqueue(&token, "echo", json!({"n": n})).await.body["id"].as_str().unwrap().to_string());
    }
    server.enqueue(&server.token("bob"), "echo", json!({"n": "bob"})).await;

    let mut seen = Vec::new();
    let mut path = "/v1/jobs?limit=2".to_string();
    let mut pages = 0;
    loop {
        let page = server.get(&path, &token).await;
        assert_eq!(page.status, 200, "{}", page.text);
        pages += 1;
        for job in page.body["jobs"].as_array().unwrap() {
            assert_eq!(job["user_id"], "alice");
            seen.push(job["id"].as_str().unwrap().to_string());
        }
        match page.body["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/jobs?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "every job once, newest first");
    assert_eq!(pages, 3);

    let filtered = server.get("/v1/jobs?status=completed", &token).await;
    assert_eq!(filtered.body["jobs"].as_array().unwrap().len(), 0, "no worker runs in `quern gateway`");
    let all = server.get("/v1/jobs?limit=100", &server.service_token()).await;
    assert_eq!(all.body["jobs"].as_array().unwrap().len(), 6, "the service role sees every user's jobs");
    let bad = server.get("/v1/jobs?cursor=nonsense", &token).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "invalid_cursor"));
    let bad = server.get("/v1/jobs?limit=0", &token).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "invalid_limit"));
    let bad = server.get("/v1/jobs?status=done", &token).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "invalid_status"));
    server.finish().await;
}

/// Seed 004's `GET /api/jobs?action=by_brief&brief_id=…`: a pipeline's jobs
/// by its first job.
async fn a_pipeline_s_jobs_are_listed_by_its_first_job(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");
    let body = json!({"type": "echo", "input": {"n": 1},
                      "next": [{"type": "echo", "input": {"n": 2}}, {"type": "echo", "input": {"n": 3}}]});
    let root = server.post("/v1/jobs", &token, body).await.body["id"].as_str().unwrap().to_string();
    server.enqueue(&token, "echo", json!({"n": "elsewhere"})).await;
    let path = format!("/v1/jobs?pipeline={root}");
    let started = std::time::Instant::now();
    let jobs = loop {
        let jobs = server.get(&path, &token).await.body["jobs"].as_array().cloned().unwrap_or_default();
        if jobs.len() == 3 && jobs.iter().all(|job| job["status"] == "completed") {
            break jobs;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the pipeline did not complete: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ns: Vec<&Value> = jobs.iter().map(|job| &job["result"]["echo"]["n"]).collect();
    assert_eq!(ns, [&json!(3), &json!(2), &json!(1)], "newest first");
    assert!(jobs[..2].iter().all(|job| job["root_id"] == root.as_str()), "each step names its first job");
    assert_eq!(jobs[2]["id"], root.as_str());
    let bad = server.get("/v1/jobs?pipeline=nonsense", &token).await;
    assert_eq!((bad.status.as_u16(), bad.code()), (400, "invalid_query"));
    let theirs = server.get(&path, &server.token("bob")).await;
    assert_eq!(theirs.body["jobs"].as_array().map(Vec::len), Some(0), "another user's pipeline is not listed");
    server.finish().await;
}

async fn bad_requests_get_400s_that_say_what_is_wrong(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("alice");

    let unknown = server.enqueue(&token, "sofia_imag", json!({})).await;
    assert_eq!((unknown.status.as_u16(), unknown.code()), (400, "unknown_type"));
    assert!(unknown.error().contains("cached, echo, hostile"), "lists the known types: {}", unknown.error());

    let not_object = server.post("/v1/jobs", &token, json!({"type": "echo", "input": [1, 2]})).await;
    assert_eq!((not_object.status.as_u16(), not_object.code()), (400, "invalid_input"));
    assert!(not_object.error().contains("an array"), "{}", not_object.error());

    let request = server
        .client
        .post(format!("{}/v1/jobs", server.base))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{\"type\": \"echo\",\n \"input\": {\"a\": }}");
    let malformed = support::server::read(request.send().await.unwrap()).await;
    assert_eq!((malformed.status.as_u16(), malformed.code()), (400, "invalid_json"));
    assert!(malformed.error().contains("line 2 column 17"), "{}", malformed.error());

    let missing = server.post("/v1/jobs", &token, json!({"input": {}})).await;
    assert_eq!((missing.status.as_u16(), missing.code()), (400, "invalid_request"));
    assert!(missing.error().contains("missing field `type`"), "{}", missing.error());

    for priority in [0, 11] {
        let answer = server.post("/v1/jobs", &token, json!({"type": "echo", "input": {}, "priority": priority})).await;
        assert_eq!((answer.status.as_u16(), answer.code()), (400, "invalid_priority"), "{}", answer.text);
        assert!(answer.error().contains("1 (most urgent) to 10"));
    }

    let huge = json!({"type": "echo", "input": {"blob": "x".repeat(300 << 10)}});
    let too_large = server.post("/v1/jobs", &token, huge).await;
    assert_eq!((too_large.status.as_u16(), too_large.code()), (413, "body_too_large"), "{}", too_large.text);

    let request = server.client.post(format!("{}/v1/jobs", server.base)).bearer_auth(&token).body("type=echo");
    let wrong_type = support::server::read(request.send().await.unwrap()).await;
    assert_eq!((wrong_type.status.as_u16(), wrong_type.code()), (415, "unsupported_media_type"));
    assert!(wrong_type.error().contains("application/json"));

    let unknown_id = server.get("/v1/jobs/0193a0b0-0000-7000-8000-000000000000", &token).await;
    assert_eq!((unknown_id.status.as_u16(), unknown_id.code()), (404, "job_not_found"));
    let not_an_id = server.get("/v1/jobs/not-an-id", &token).await;
    assert_eq!((not_an_id.status.as_u16(), not_an_id.code()), (404, "job_not_found"));
    let no_route = server.get("/v2/jobs", &token).await;
    assert_eq!((no_route.status.as_u16(), no_route.code()), (404, "no_route"));
    server.finish().await;
}

async fn bad_tokens_get_401_and_other_users_jobs_404(db: &Db) {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let server = Server::start(db).await;
    let alice = server.token("alice");
    let path = "/v1/jobs";
    let now = chrono::Utc::now().timestamp();
    let sign = |claims: Value, secret: &[u8]| {
        server.remember(encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap())
    };
    let forged = {
        // alice's token with the payload changed to bob: the signature no longer fits.
        let parts: Vec<&str> = alice.split('.').collect();
        use base64::Engine;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"sub": "bob", "role": "service_role", "exp": now + 3600}).to_string());
        server.remember(format!("{}.{payload}.{}", parts[0], parts[2]))
    };
    let expired = sign(json!({"sub": "alice", "exp": now - 3600}), support::server::SECRET.as_bytes());
    let wrong_key = sign(json!({"sub": "alice", "exp": now + 3600}), b"not-the-server-secret");
    let no_exp = sign(json!({"sub": "alice"}), support::server::SECRET.as_bytes());
    let alg_none = {
        use base64::Engine;
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        server.remember(format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT"})),
            b64(json!({"sub": "alice", "exp": now + 3600}))
        ))
    };
    let hs512 = {
        let claims = json!({"sub": "alice", "exp": now + 3600});
        let key = EncodingKey::from_secret(support::server::SECRET.as_bytes());
        server.remember(encode(&Header::new(Algorithm::HS512), &claims, &key).unwrap())
    };
    for (name, token, needle) in [
        ("forged", forged.as_str(), "signature"),
        ("expired", expired.as_str(), "expired"),
        ("wrong key", wrong_key.as_str(), "signature"),
        ("no exp", no_exp.as_str(), "exp"),
        ("alg none", alg_none.as_str(), "malformed"),
        ("mismatched algorithm", hs512.as_str(), "HS512"),
        ("garbage", "not.a.jwt", "malformed"),
    ] {
        let answer = server.get(path, token).await;
        assert_eq!((answer.status.as_u16(), answer.code()), (401, "unauthorized"), "{name}: {}", answer.text);
        assert!(answer.error().contains(needle), "{name}: {}", answer.error());
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
    }
    let anonymous = server.call(Method::GET, path, None, None).await;
    assert_eq!(anonymous.status, 401);
    assert!(anonymous.error().contains("Authorization: Bearer"), "{}", anonymous.error());

    // Another user's job is a 404 on every route, exactly like a missing one.
    let job = server.enqueue(&alice, "echo", json!({"private": "alice's"})).await;
    let id = job.body["id"].as_str().unwrap();
    let bob = server.token("bob");
    for (method, route) in [
        (Method::GET, format!("/v1/jobs/{id}")),
        (Method::POST, format!("/v1/jobs/{id}/cancel")),
        (Method::POST, format!("/v1/jobs/{id}/retry")),
        (Method::GET, format!("/v1/jobs/{id}/events")),
        (Method::GET, format!("/functions/v1/get-analysis-status?jobId={id}")),
    ] {
        let answer = server.call(method.clone(), &route, Some(&bob), None).await;
        assert_eq!(
            (answer.status.as_u16(), answer.code()),
            (404, "job_not_found"),
            "{method} {route}: {}",
            answer.text
        );
        assert_eq!(answer.error(), format!("job {id} not found"));
    }
    let mine = server.get("/v1/jobs", &bob).await;
    assert_eq!(mine.body["jobs"].as_array().unwrap().len(), 0);
    let ops = server.get(&format!("/v1/jobs/{id}"), &server.service_token()).await;
    assert_eq!(ops.status, 200, "the service role sees every job");
    server.finish().await;
}

async fn limits_answer_429(db: &Db) {
    let options = Options {
        command: "gateway",
        env: vec![("QUERN_RATE_LIMIT_PER_MIN", "3".into()), ("QUERN_MAX_ACTIVE_JOBS_PER_USER", "2".into())],
        ..Options::default()
    };
    let server = Server::start_with(db, options).await;
    let alice = server.token("alice");
    assert_eq!(server.enqueue(&alice, "echo", json!({"n": 1})).await.status, 202);
    assert_eq!(server.enqueue(&alice, "echo", json!({"n": 2})).await.status, 202);
    let third = server.enqueue(&alice, "echo", json!({"n": 3})).await;
    assert_eq!((third.status.as_u16(), third.code()), (429, "too_many_active_jobs"), "{}", third.text);
    assert!(third.error().contains("2 unfinished jobs"), "{}", third.error());

    // Three requests from this address spent the per-minute rate; a spoofed
    // X-Forwarded-For does not help without QUERN_TRUST_PROXY.
    let request = server
        .client
        .post(format!("{}/v1/jobs", server.base))
        .bearer_auth(server.token("bob"))
        .header("content-type", "application/json")
        .header("x-forwarded-for", "203.0.113.9")
        .body(json!({"type": "echo", "input": {}}).to_string());
    let limited = support::server::read(request.send().await.unwrap()).await;
    assert_eq!((limited.status.as_u16(), limited.code()), (429, "rate_limited"), "{}", limited.text);
    let retry_after: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "Retry-After {retry_after}");
    // Reads are not rate limited.
    assert_eq!(server.get("/v1/jobs", &alice).await.status, 200);
    server.finish().await;
}

async fn feature_flags_switch_a_type_off_and_on(db: &Db) {
    let options = Options { env: vec![("QUERN_DISABLED_TYPES", "cached".into())], ..Options::default() };
    let server = Server::start_with(db, options).await;
    let alice = server.token("alice");
    let ops = server.service_token();
    let off = server.enqueue(&alice, "cached", json!({"a": 1})).await;
    assert_eq!((off.status.as_u16(), off.code()), (503, "type_disabled"), "{}", off.text);
    let types = server.get("/v1/types", &alice).await;
    let cached = types.body.as_array().unwrap().iter().find(|t| t["type"] == "cached").unwrap().clone();
    assert_eq!(
        (cached["enabled"].clone(), cached["cacheable"].clone(), cached["estimated_time_s"].clone()),
        (json!(false), json!(true), json!(3))
    );

    let forbidden = server.post("/v1/types/cached/enable", &alice, json!({})).await;
    assert_eq!((forbidden.status.as_u16(), forbidden.code()), (403, "forbidden"));
    assert_eq!(server.post("/v1/types/cached/enable", &ops, json!({})).await.status, 204);
    assert_eq!(server.enqueue(&alice, "cached", json!({"a": 1})).await.status, 202);
    assert_eq!(server.post("/v1/types/echo/disable", &ops, json!({})).await.status, 204);
    let off = server.enqueue(&alice, "echo", json!({"a": 1})).await;
    assert_eq!((off.status.as_u16(), off.code()), (503, "type_disabled"));
    let unknown = server.post("/v1/types/nope/disable", &ops, json!({})).await;
    assert_eq!(unknown.status, 404);
    server.finish().await;
}

async fn priority_1_to_4_needs_a_premium_plan(db: &Db) {
    let server = Server::start_with(db, Options { command: "gateway", ..Options::default() }).await;
    let body = json!({"type": "echo", "input": {"p": 2}, "priority": 2});
    let plain = server.post("/v1/jobs", &server.token("alice"), body.clone()).await;
    assert_eq!(plain.status, 202, "{}", plain.text);
    assert_eq!(plain.body["priority"], 5);
    assert!(plain.body["notice"].as_str().unwrap().contains("premium"), "{}", plain.text);
    let premium = server.post("/v1/jobs", &server.premium_token("carol"), body.clone()).await;
    assert_eq!((premium.body["priority"].clone(), premium.body.get("notice")), (json!(2), None));
    let ops = server.post("/v1/jobs", &server.service_token(), body).await;
    assert_eq!(ops.body["priority"], 2);
    let low =
        server.post("/v1/jobs", &server.token("alice"), json!({"type": "echo", "input": {}, "priority": 9})).await;
    assert_eq!(low.body["priority"], 9);
    server.finish().await;
}

/// The gateway's one listener for job changes loses its connection while a
/// followed job runs: the listener reconnects and re-reads, and the stream
/// still ends with the job's final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_event_arrives_after_the_event_listener_is_cut_on_postgres() {
    let db = Db::postgres().await;
    let server = Server::start(&db).await;
    let token = server.token("alice");
    let answer = server.enqueue(&token, "hostile", json!({"mode": "sleep", "ms": 2000, "tag": "cut"})).await;
    let id = answer.body["id"].as_str().unwrap().to_string();
    let response =
        server.client.get(format!("{}/v1/jobs/{id}/events", server.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a first event");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream is open").unwrap()));
    }
    assert!(!text.contains("\"completed\""), "the job is still running when the listener is cut: {text}");

    // Every listener for job changes on this database is cut (other tests'
    // gateways re-read and carry on, as this one must).
    let deadline = Instant::now() + Duration::from_secs(10);
    while db
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE 'LISTEN%quern_job_events%' AND pid <> pg_backend_pid()",
        )
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the gateway's listener was never seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("events in time")
    {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let last = text.split("\n\n").filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data: "))).last();
    let last: Value = serde_json::from_str(last.expect("events were sent")).unwrap();
    assert_eq!((last["status"].as_str(), last["result"]["tag"].as_str()), (Some("completed"), Some("cut")), "{text}");
    server.finish().await;
    db.cleanup().await;
}

/// One token cannot hold every connection the gateway has: a user's open
/// event streams are capped, a closed one frees its place, and neither
/// another user nor a service caller is counted against it. (The cap lives
/// in the gateway's memory, so one database shows it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_holds_at_most_so_many_event_streams_open() {
    let db = Db::sqlite().await;
    let options = Options { env: vec![("QUERN_MAX_STREAMS_PER_USER", "2".into())], ..Options::default() };
    let server = Server::start_with(&db, options).await;
    let (alice, bob, service) = (server.token("alice"), server.token("bob"), server.service_token());
    let job_of = |answer: support::server::Answer| answer.body["id"].as_str().unwrap().to_string();
    let long = json!({"mode": "sleep", "ms": 50_000, "tag": "streams"});
    let alices = job_of(server.enqueue(&alice, "hostile", long.clone()).await);
    let bobs = job_of(server.enqueue(&bob, "hostile", long).await);
    let open = |token: &str, id: &str| {
        server.client.get(format!("{}/v1/jobs/{id}/events", server.base)).bearer_auth(token.to_string()).send()
    };

    let first = open(&alice, &alices).await.unwrap();
    let second = open(&alice, &alices).await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let refused = support::server::read(open(&alice, &alices).await.unwrap()).await;
    assert_eq!((refused.status.as_u16(), refused.code()), (429, "too_many_streams"), "{}", refused.text);
    assert!(refused.error().contains("2 jobs by events"), "{}", refused.error());
    assert!(refused.headers.contains_key("retry-after"), "{:?}", refused.headers);

    let bobs_stream = open(&bob, &bobs).await.unwrap();
    assert_eq!(bobs_stream.status(), 200, "bob is not counted against alice");
    let mut services = Vec::new();
    for _ in 0..3 {
        let stream = open(&service, &alices).await.unwrap();
        assert_eq!(stream.status(), 200, "service callers are not capped");
        services.push(stream);
    }

    // The gateway notices the closed connection on its own; polled, since
    // it does so asynchronously.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    let _third = loop {
        let answer = open(&alice, &alices).await.unwrap();
        if answer.status() == 200 {
            break answer;
        }
        assert_eq!(answer.status(), 429);
        assert!(Instant::now() < deadline, "the closed stream's place was not freed within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop((second, bobs_stream, services));
    for (token, id) in [(&alice, &alices), (&bob, &bobs)] {
        let cancelled = server.post(&format!("/v1/jobs/{id}/cancel"), token, json!({})).await;
        assert_eq!(cancelled.status, 200, "{}", cancelled.text);
    }
    server.finish().await;
}

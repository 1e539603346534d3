//! What the gateway promises to other software: the customer's Supabase
//! routes with their exact shapes, CORS, the OpenAPI document, Prometheus
//! metrics, tokens from a JWKS, and the first start's ready-made token.
//!
//! One file over 400 lines on purpose: each test pins one promise the gateway
//! makes to other software, over one shared server setup.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Options, Server};
use support::{Reply, Upstream};

on_both_databases!(supabase_routes_answer_with_the_seed_shapes);

fn keys(value: &Value) -> BTreeSet<&str> {
    value.as_object().unwrap().keys().map(String::as_str).collect()
}

/// `useAsyncAnalysis` (seed 000) as it calls the routes through
/// `supabase.functions.invoke`: a POST with a JSON body, the user's access
/// token as Bearer and the anon key as `apikey`.
async fn supabase_routes_answer_with_the_seed_shapes(db: &Db) {
    let server = Server::start(db).await;
    let token = server.token("9b2f3c1e-user");
    let invoke = |name: &str, token: Option<&str>, body: Value| {
        let mut request = server
            .client
            .post(format!("{}/functions/v1/{name}", server.base))
            .header("apikey", "anon-key-is-not-a-user")
            .header("x-client-info", "supabase-js/2.55.0")
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { support::server::read(request.send().await.unwrap()).await }
    };

    let input = json!({"imageUrl": "https://media.example/prato.jpg", "mealType": "lunch", "userId": "someone-else"});
    server.remember(input.to_string());
    let enqueued = invoke("enqueue-analysis", Some(&token), json!({"type": "cached", "input": input})).await;
    assert_eq!(enqueued.status, 202, "{}", enqueued.text);
    assert_eq!(keys(&enqueued.body), BTreeSet::from(["jobId", "status", "estimatedTime", "pollUrl"]));
    let job_id = enqueued.body["jobId"].as_str().unwrap().to_string();
    assert_eq!(enqueued.body["status"], "pending");
    assert_eq!(enqueued.body["estimatedTime"], 3);
    assert_eq!(enqueued.body["pollUrl"], format!("/functions/v1/get-analysis-status?jobId={job_id}"));

    // The hook polls with `{jobId}` in a POST body until the job completes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = invoke("get-analysis-status", Some(&token), json!({"jobId": job_id})).await;
        assert_eq!(status.status, 200, "{}", status.text);
        if status.body["status"] == "completed" {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{}", status.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for key in ["jobId", "status", "result", "error", "progress"] {
        assert!(status.body.get(key).is_some(), "`{key}` is in {}", status.text);
    }
    assert_eq!(status.body["jobId"], job_id.as_str());
    assert_eq!(status.body["progress"], 100);
    assert_eq!(status.body["error"], Value::Null);
    assert_eq!(status.body["result"]["echo"]["mealType"], "lunch");
    // GET with ?jobId= answers the same; the owner is the token's sub, not input.userId.
    let by_query = server.get(&format!("/functions/v1/get-analysis-status?jobId={job_id}"), &token).await;
    assert_eq!(by_query.body["status"], "completed");
    let owner = server.get(&format!("/v1/jobs/{job_id}"), &token).await;
    assert_eq!(owner.body["user_id"], "9b2f3c1e-user");

    // The same input again: the cached result, as the seed's gateway answers it.
    let cached = invoke("enqueue-analysis", Some(&token), json!({"type": "cached", "input": input})).await;
    assert_eq!(cached.status, 200, "{}", cached.text);
    assert_eq!(keys(&cached.body), BTreeSet::from(["jobId", "status", "result", "cached"]));
    assert_eq!(
        (cached.body["jobId"].clone(), cached.body["status"].clone(), cached.body["cached"].clone()),
        (Value::Null, json!("completed"), json!(true))
    );
    assert_eq!(cached.body["result"], status.body["result"]);

    // The seed's `!type || !input`: JavaScript truthiness, and its exact words.
    for body in [
        json!({"input": {"a": 1}}),
        json!({"type": "cached"}),
        json!({"type": "cached", "input": null}),
        json!({"type": "cached", "input": false}),
        json!({"type": "cached", "input": 0}),
        json!({"type": "cached", "input": ""}),
        json!({"type": "", "input": {"a": 1}}),
        json!({}),
    ] {
        let missing = invoke("enqueue-analysis", Some(&token), body.clone()).await;
        assert_eq!(missing.status, 400, "{body}");
        assert_eq!(missing.body, json!({"error": "Missing required fields: type, input"}), "{body}");
    }
    let empty_object = invoke("enqueue-analysis", Some(&token), json!({"type": "echo", "input": {}})).await;
    assert_eq!(empty_object.status, 202, "`{{}}` is truthy, as in JavaScript: {}", empty_object.text);
    let no_id = invoke("get-analysis-status", Some(&token), json!({})).await;
    assert_eq!((no_id.status.as_u16(), no_id.error()), (400, "jobId is required"));

    // Without Authorization the `apikey` header is the token, as on Supabase:
    // an anon key has no user, so it cannot own jobs.
    let anon = invoke("enqueue-analysis", None, json!({"type": "echo", "input": {}})).await;
    assert_eq!(anon.status, 401, "{}", anon.text);
    let request = server
        .client
        .post(format!("{}/functions/v1/get-analysis-status", server.base))
        .header("apikey", &token)
        .header("content-type", "application/json")
        .body(json!({"jobId": job_id}).to_string());
    let by_apikey = support::server::read(request.send().await.unwrap()).await;
    assert_eq!(by_apikey.status, 200, "{}", by_apikey.text);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_is_answered_for_configured_origins() {
    let db = Db::sqlite().await;
    let options = Options { env: vec![("QUERN_CORS_ORIGINS", "https://app.example".into())], ..Options::default() };
    let server = Server::start_with(&db, options).await;
    let preflight = |origin: &'static str| {
        server
            .client
            .request(Method::OPTIONS, format!("{}/functions/v1/enqueue-analysis", server.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, x-client-info, apikey, content-type")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.example");
    let allowed_headers = allowed.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for header in ["authorization", "x-client-info", "apikey", "content-type"] {
        assert!(allowed_headers.contains(header), "{allowed_headers}");
    }
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    server.finish().await;
    db.cleanup().await;
}

/// Every route the server answers is in `/openapi.json`, and every path there is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route() {
    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    let document: Value =
        server.client.get(format!("{}/openapi.json", server.base)).send().await.unwrap().json_value().await;
    let mut listed = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            listed.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    let expected: BTreeSet<String> = [
        "POST /v1/jobs",
        "POST /v1/jobs/batch",
        "GET /v1/jobs",
        "GET /v1/jobs/{id}",
        "POST /v1/jobs/{id}/cancel",
        "POST /v1/jobs/{id}/retry",
        "GET /v1/jobs/{id}/events",
        "GET /v1/types",
        "POST /v1/types/{type}/enable",
        "POST /v1/types/{type}/disable",
        "POST /functions/v1/enqueue-analysis",
        "GET /functions/v1/get-analysis-status",
        "POST /functions/v1/get-analysis-status",
        "GET /health",
        "GET /health/detailed",
        "GET /health/live",
        "GET /health/ready",
        "GET /metrics",
        "GET /openapi.json",
        "GET /v1/stats",
        "GET /dashboard",
        "POST /dashboard/login",
        "POST /dashboard/logout",
        "GET /dashboard/jobs/{id}",
        "GET /v1/handlers",
        "POST /v1/handlers/{type}/versions",
        "POST /v1/handlers/{type}/rollout",
        "POST /v1/handlers/{type}/rollback",
        "POST /v1/handlers/{type}/pause",
        "POST /v1/handlers/{type}/resume",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(listed, expected);
    assert!(document["components"]["schemas"]["ErrorBody"].is_object(), "the error shape is documented");

    // Each listed route is served (answers anything but the router's `no_route`).
    for route in &listed {
        let (method, path) = route.split_once(' ').unwrap();
        let path = path.replace("{id}", "0193a0b0-0000-7000-8000-000000000000").replace("{type}", "echo");
        let answer = server.call(Method::from_bytes(method.as_bytes()).unwrap(), &path, None, None).await;
        assert_ne!(answer.code(), "no_route", "{route} is documented but not served");
    }
    server.finish().await;
    db.cleanup().await;
}

trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        serde_json::from_str(&self.text().await.unwrap()).unwrap()
    }
}

/// `/metrics` after jobs of every outcome; `promtool check metrics` must be
/// clean (required in CI, where `.ci/run` installs it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_the_job_lifecycle_and_pass_promtool() {
    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    let token = server.token("alice");
    let ok = server.enqueue(&token, "echo", json!({"m": 1})).await;
    let bad = server.enqueue(&token, "hostile", json!({"mode": "panic", "message": "no"})).await;
    for answer in [&ok, &bad] {
        let id = answer.body["id"].as_str().unwrap();
        server
            .poll_job(&token, id, Duration::from_secs(20), |job| {
                job["status"] == "completed" || job["status"] == "failed"
            })
            .await;
    }
    let running = server.enqueue(&token, "hostile", json!({"mode": "sleep", "ms": 20000})).await;
    let id = running.body["id"].as_str().unwrap().to_string();
    server.poll_job(&token, &id, Duration::from_secs(20), |job| job["status"] == "processing").await;
    // The depth gauge counts the running job.
    let started = std::time::Instant::now();
    let text = loop {
        let text = server.client.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
        // Histograms reach the exposition at the recorder's upkeep.
        if text.contains("quern_job_duration_seconds_bucket") {
            break text;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no job duration histogram in /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for needle in [
        r#"quern_jobs_enqueued_total{type="echo"} 1"#,
        r#"quern_jobs_completed_total{type="echo"} 1"#,
        r#"quern_jobs_failed_total{type="hostile"} 1"#,
        r#"quern_queue_jobs{type="hostile",status="processing"} 1"#,
        "quern_job_pickup_latency_seconds_bucket",
        "quern_instance_seconds_bucket",
        r#"quern_http_request_duration_seconds_bucket{route="/v1/jobs",method="POST",status="202""#,
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }
    server.post(&format!("/v1/jobs/{id}/cancel"), &token, json!({})).await;
    let text = server.client.get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"quern_jobs_cancelled_total{type="hostile"} 1"#), "{text}");

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let output = child.wait_with_output().unwrap();
            let said =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            assert!(output.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
        }
        Err(_) if std::env::var_os("CI").is_some() => panic!("promtool is missing: apt-get install prometheus"),
        Err(_) => {
            eprintln!("promtool not installed (apt-get install prometheus): exposition not linted here; CI lints it")
        }
    }
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_detailed_health_answer_in_the_seed_s_shape_without_a_token() {
    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    let health = server.call(Method::GET, "/health", None, None).await;
    assert_eq!(health.status, 200);
    assert_eq!(
        keys(&health.body),
        BTreeSet::from(["status", "worker_id", "active_jobs", "uptime", "uptime_s", "version"])
    );
    assert_eq!(health.body["status"], "healthy");
    // Public, as the seed's: no token needed, and no secret or user's data in it.
    let detailed = server.call(Method::GET, "/health/detailed", None, None).await;
    assert_eq!(detailed.status, 200, "{}", detailed.text);
    assert_eq!(detailed.body["database"]["backend"], "sqlite");
    assert!(detailed.body["database"]["latency_ms"].as_f64().is_some());
    let handlers: BTreeSet<&str> =
        detailed.body["handlers"].as_array().unwrap().iter().map(|h| h["type"].as_str().unwrap()).collect();
    assert_eq!(handlers, BTreeSet::from(["cached", "echo", "hostile"]));
    assert_eq!(detailed.body["workers"][0]["id"], health.body["worker_id"]);
    assert!(detailed.body["cache"]["enabled"].as_bool().unwrap());

    // The container's health probe.
    let probe = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_quern")).args(["healthcheck", "--url", &url]).output().unwrap()
    };
    assert!(probe(format!("{}/health", server.base)).status.success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let down = probe(format!("http://{closed}/health"));
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
    server.finish().await;
    db.cleanup().await;
}

/// PostgreSQL goes away under a running server: `/health` and enqueues
/// answer 503 while it is gone, and everything works again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_the_database_is_away_and_recovers() {
    let mut db = Db::postgres().await;
    let mut url = url::Url::parse(&db.url).unwrap();
    let target = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = support::Proxy::start(tokio::net::lookup_host(&target).await.unwrap().next().unwrap()).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.addr.port())).unwrap();
    let real_url = std::mem::replace(&mut db.url, url.to_string());
    let server = Server::start(&db).await;
    let token = server.token("alice");
    assert_eq!(server.call(Method::GET, "/health", None, None).await.status, 200);

    proxy.cut();
    let health = server.call(Method::GET, "/health", None, None).await;
    assert_eq!(health.status, 503, "{}", health.text);
    assert_eq!(health.body["status"], "unhealthy");
    let enqueue = server.enqueue(&token, "echo", json!({"during": "outage"})).await;
    assert_eq!((enqueue.status.as_u16(), enqueue.code()), (503, "database_unavailable"), "{}", enqueue.text);
    assert!(enqueue.headers.contains_key("retry-after"));

    proxy.restore();
    let started = std::time::Instant::now();
    while server.call(Method::GET, "/health", None, None).await.status != 200 {
        assert!(started.elapsed() < Duration::from_secs(30), "the server did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = server.enqueue(&token, "echo", json!({"after": "outage"})).await;
    assert_eq!(after.status, 202, "{}", after.text);
    let id = after.body["id"].as_str().unwrap();
    server.poll_job(&token, id, Duration::from_secs(30), |job| job["status"] == "completed").await;
    server.finish().await;
    db.url = real_url;
    db.cleanup().await;
}

/// Asymmetric tokens verified with keys from `QUERN_JWKS_URL`, fetched
/// again when a token names a key not seen yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_against_the_jwks() {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref(); // 0x04 ‖ x ‖ y
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": b64(&point[1..33]), "y": b64(&point[33..65])}]});
    let upstream = Upstream::start(Vec::new(), Reply::new(200, &jwks.to_string())).await;

    let db = Db::sqlite().await;
    let options =
        Options { env: vec![("QUERN_JWKS_URL", upstream.url("/.well-known/jwks.json"))], ..Options::default() };
    let server = Server::start_with(&db, options).await;
    let now = chrono::Utc::now().timestamp();
    let key = EncodingKey::from_ec_der(pkcs8.as_ref());
    let sign = |kid: &str| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_string());
        server.remember(encode(&header, &json!({"sub": "erin", "exp": now + 600}), &key).unwrap())
    };
    let good = server.get("/v1/jobs", &sign("k1")).await;
    assert_eq!(good.status, 200, "{}", good.text);
    let unknown = server.get("/v1/jobs", &sign("k2")).await;
    assert_eq!(unknown.status, 401);
    assert!(unknown.error().contains("unknown signing key `k2`"), "{}", unknown.error());
    // An unknown kid may fetch the JWKS again, but at most every 10 s: bad
    // tokens cannot make the server hammer it.
    assert_eq!(upstream.received().len(), 1, "{:?}", upstream.received());
    // The HS256 secret still verifies its own tokens alongside.
    assert_eq!(server.get("/v1/jobs", &server.token("alice")).await.status, 200);
    server.finish().await;
    db.cleanup().await;
}

/// The first `quern serve` on an empty data dir prints a token that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_prints_a_working_token_and_a_curl_example() {
    let data = tempfile::tempdir().unwrap();
    let out = data.path().join("stdout");
    let err = data.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_quern"))
        .arg("serve")
        .env_remove("QUERN_JWT_SECRET")
        .env_remove("QUERN_JWKS_URL")
        .env("QUERN_DATA_DIR", data.path().join("data"))
        .env("QUERN_CACHE_DIR", support::cache_dir())
        .env("QUERN_HANDLERS_DIR", support::dist("echo.wasm").parent().unwrap())
        .env("PORT", "0")
        .env("QUERN_BIND", "127.0.0.1")
        .env_remove("DATABASE_URL")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let banner = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("Set QUERN_JWT_SECRET") {
            break text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no banner; stderr:\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let token =
        banner.lines().find_map(|l| l.trim().strip_prefix("export QUERN_TOKEN=")).expect("a token line").to_string();
    let base =
        banner.lines().find_map(|l| l.strip_prefix("quern is ready on ")).expect("the address").trim().to_string();
    assert!(banner.contains(&format!("curl -s '{base}/v1/jobs?wait=10'")), "{banner}");
    let secret = std::fs::read_to_string(data.path().join("data/jwt-secret")).unwrap();
    let auth = quern_api::auth::Auth::new(quern_api::auth::AuthSettings {
        hs256_secret: Some(secret.trim().as_bytes().to_vec()),
        jwks_url: None,
        audience: None,
        premium: quern_api::auth::PremiumRule::parse("app_metadata.plan=premium").unwrap(),
    })
    .unwrap();
    let caller = auth.verify(&token).await.unwrap();
    assert_eq!(caller.user_id, "dev");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.path().join("data/jwt-secret")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the secret is private to its owner");
}

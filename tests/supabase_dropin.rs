//! quern as a drop-in for the customer's Supabase functions URL: every other
//! function passed through to their project, a legacy function a manifest
//! claims reaching the customer's own function (or served by quern when ops
//! ask and it can answer), CORS as the seed's functions answer it, service
//! callers speaking for a user, premium priority, and health in the seed's shape.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Answer, Options, Server, read};
use support::{Reply, Upstream};

fn with_env(env: Vec<(&'static str, String)>) -> Options {
    Options { env, ..Options::default() }
}

/// A request as supabase-js's `functions.invoke` sends it, plus headers that must not travel on.
async fn invoke(server: &Server, method: Method, path: &str, token: &str, body: Option<Value>) -> Answer {
    let mut request = server
        .client
        .request(method, format!("{}{path}", server.base))
        .bearer_auth(token)
        .header("apikey", "anon-key")
        .header("x-client-info", "supabase-js/2.55.0")
        .header("cookie", "sb-session=must-not-travel")
        .header("x-internal", "must-not-travel")
        .header("origin", "http://localhost:5173");
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    read(request.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_quern_does_not_serve_are_passed_through_to_the_supabase_project() {
    let db = Db::sqlite().await;
    let reply = Reply::new(200, r#"{"plan": "arroz, feijão", "from": "supabase"}"#)
        .header("content-type", "application/json")
        .header("x-function-version", "7")
        .header("access-control-allow-origin", "https://elsewhere.example");
    let functions = Upstream::start(Vec::new(), reply).await;
    let server = Server::start_with(&db, with_env(vec![("SUPABASE_URL", functions.url(""))])).await;
    let token = server.token("alice");

    let body = json!({"userId": "alice", "days": 7});
    let answer =
        invoke(&server, Method::POST, "/functions/v1/generate-meal-plan-taco?lang=pt", &token, Some(body.clone()))
            .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body, json!({"plan": "arroz, feijão", "from": "supabase"}));
    assert_eq!(answer.headers["x-function-version"], "7", "the function's own headers come back");
    assert_eq!(answer.headers["access-control-allow-origin"], "*", "CORS is quern's, not the upstream's");

    let received = functions.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/functions/v1/generate-meal-plan-taco"));
    assert_eq!(request.query.as_deref(), Some("lang=pt"));
    assert_eq!(serde_json::from_str::<Value>(&request.body).unwrap(), body, "the body is passed as sent");
    let header = |name: &str| request.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(header("authorization"), Some(format!("Bearer {token}").as_str()));
    assert_eq!(header("apikey"), Some("anon-key"));
    assert_eq!(header("x-client-info"), Some("supabase-js/2.55.0"));
    assert_eq!(header("content-type"), Some("application/json"));
    // Seed 000's functions read `await req.json()`: a body sent with its
    // length keeps it, rather than arriving chunked.
    assert_eq!(header("content-length"), Some(body.to_string().len().to_string().as_str()));
    assert_eq!(header("transfer-encoding"), None, "re-sent chunked");
    for withheld in ["cookie", "x-internal", "origin"] {
        assert_eq!(header(withheld), None, "{withheld} is not passed on");
    }

    // Sub-paths and other methods travel too; a path that could climb out is refused.
    let answer = invoke(&server, Method::GET, "/functions/v1/google-fit-ai-analysis/summary", &token, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(functions.received()[1].path, "/functions/v1/google-fit-ai-analysis/summary");
    // (An encoded slash survives the client; decoded, it would climb to /functions/admin.)
    let climbing = invoke(&server, Method::GET, "/functions/v1/a%2F..%2F..%2Fadmin", &token, None).await;
    assert_eq!((climbing.status.as_u16(), climbing.code()), (400, "invalid_function"), "{}", climbing.text);
    assert_eq!(functions.received().len(), 2, "a refused path reaches no one");
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pass_through_names_its_setting_and_contacts_only_its_upstream() {
    let db = Db::sqlite().await;
    let unset = Server::start(&db).await;
    let answer =
        invoke(&unset, Method::POST, "/functions/v1/dr-vital-enhanced", &unset.token("alice"), Some(json!({}))).await;
    assert_eq!(answer.status, 404);
    assert!(answer.error().contains("SUPABASE_URL"), "{}", answer.text);
    unset.finish().await;

    // A redirect is answered as it is, never followed to another host.
    let elsewhere = Upstream::start(Vec::new(), Reply::new(200, "{}")).await;
    let redirecting = Reply::new(302, "").header("location", &elsewhere.url("/steal"));
    let slow = Reply::new(200, "{}").after(Duration::from_secs(5));
    let functions = Upstream::start(vec![redirecting], slow).await;
    let server = Server::start_with(
        &db,
        with_env(vec![("SUPABASE_URL", functions.url("")), ("QUERN_FUNCTIONS_TIMEOUT_S", "1".into())]),
    )
    .await;
    let token = server.token("alice");
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = no_redirects
        .post(format!("{}/functions/v1/whatsapp-nutrition-webhook", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert!(elsewhere.received().is_empty(), "quern followed no redirect");

    let timed_out = invoke(&server, Method::POST, "/functions/v1/dr-vital-enhanced", &token, Some(json!({}))).await;
    assert_eq!((timed_out.status.as_u16(), timed_out.code()), (504, "function_timeout"), "{}", timed_out.text);
    server.finish().await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = Server::start_with(&db, with_env(vec![("SUPABASE_URL", format!("http://{closed}"))])).await;
    let down =
        invoke(&server, Method::POST, "/functions/v1/dr-vital-enhanced", &server.token("a"), Some(json!({}))).await;
    assert_eq!((down.status.as_u16(), down.code()), (502, "function_unreachable"), "{}", down.text);
    server.finish().await;
    db.cleanup().await;
}

/// With no SUPABASE_URL there is no old function to reach: quern answers a
/// legacy function a manifest claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_function_a_manifest_claims_is_served_by_quern() {
    let db = Db::sqlite().await;
    let options = Options {
        components: vec![
            ("echo_sync", "echo.wasm", "type = \"echo_sync\"\nfunction = \"echo-sync\"\n".into()),
            (
                "slow_sync",
                "fixtures/hostile.wasm",
                "type = \"slow_sync\"\nfunction = \"slow-sync\"\nmax_attempts = 1\n".into(),
            ),
        ],
        env: vec![("QUERN_MAX_WAIT_S", "2".into())],
        ..Options::default()
    };
    let server = Server::start_with(&db, options).await;
    let token = server.token("alice");

    let answer = invoke(&server, Method::POST, "/functions/v1/echo-sync", &token, Some(json!({"imageUrl": "x"}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.body["echo"]["imageUrl"], "x",
        "the result itself, as the sync function answered: {}",
        answer.text
    );

    let failed = invoke(
        &server,
        Method::POST,
        "/functions/v1/slow-sync",
        &token,
        Some(json!({"mode": "panic", "message": "the model returned nonsense"})),
    )
    .await;
    assert_eq!(failed.status, 500, "{}", failed.text);
    assert!(failed.error().contains("the model returned nonsense"), "{}", failed.text);

    let slow =
        invoke(&server, Method::POST, "/functions/v1/slow-sync", &token, Some(json!({"mode": "sleep", "ms": 8000})))
            .await;
    // Never a job handle, which the hook would take for the analysis: an
    // error that names the job, which goes on.
    assert_eq!(slow.status, 504, "past the wait bound: {}", slow.text);
    assert!(slow.body.get("jobId").is_none() && slow.body.get("pollUrl").is_none(), "{}", slow.text);
    let job_id = slow.error().split_whitespace().find(|word| word.len() == 36).expect("the job's id");
    let status = server.get(&format!("/v1/jobs/{job_id}"), &token).await;
    assert_eq!((status.status.as_u16(), status.body["status"].as_str()), (200, Some("processing")), "{}", status.text);

    let get = invoke(&server, Method::GET, "/functions/v1/echo-sync", &token, None).await;
    assert_eq!(get.status, 405, "{}", get.text);
    server.finish().await;
    db.cleanup().await;
}

/// Seed 001, AC-1.6: "Se worker estiver offline, usa fluxo síncrono antigo
/// (fallback)"; AC-2.3: "Rollback instantâneo desligando flags"; seed 003:
/// "Set all flags to `false` → Instant rollback". A legacy function a
/// manifest claims reaches the customer's own function unless ops serve it in
/// quern, and even then whenever quern could not answer it now: workers
/// stopped, the type's flag off, a run longer than the wait. No job is made
/// for a call passed through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_s_fallback_and_rollback_reach_the_customer_s_functions() {
    let functions = Upstream::start(
        Vec::new(),
        Reply::new(200, r#"{"from": "customer-functions"}"#).header("content-type", "application/json"),
    )
    .await;
    let legacy = |extra: &str| {
        vec![
            ("echo_sync", "echo.wasm", "type = \"echo_sync\"\nfunction = \"echo-sync\"\n".to_string()),
            ("slow_sync", "echo.wasm", format!("type = \"slow_sync\"\nfunction = \"slow-sync\"\n{extra}")),
        ]
    };
    let options = |serve_here: bool, command: &'static str| Options {
        command,
        components: legacy("estimated_time_s = 45\n"),
        env: vec![("SUPABASE_URL", functions.url("")), ("QUERN_SERVE_LEGACY_FUNCTIONS", serve_here.to_string())],
        ..Options::default()
    };
    let call = async |server: &Server, name: &str| {
        let token = server.token("3f1c2a9e-0000-4000-8000-00000000a11c");
        invoke(server, Method::POST, &format!("/functions/v1/{name}"), &token, Some(json!({"imageUrl": "x"}))).await
    };
    let from_customer = |answer: &Answer| answer.status == 200 && answer.body["from"] == "customer-functions";
    let from_quern = |answer: &Answer| answer.status == 200 && answer.body["echo"]["imageUrl"] == "x";

    // The default: the customer's function answers, quern makes no job.
    let db = Db::sqlite().await;
    let server = Server::start_with(&db, options(false, "serve")).await;
    let answer = call(&server, "echo-sync").await;
    assert!(from_customer(&answer), "{}", answer.text);
    let jobs = server.get("/v1/jobs", &server.service_token()).await;
    assert_eq!(jobs.body["jobs"].as_array().map(Vec::len), Some(0), "no job for a passed-through call: {}", jobs.text);
    server.finish().await;
    db.cleanup().await;

    // Served in quern while it can answer; the type's flag off is the rollback.
    let db = Db::sqlite().await;
    let server = Server::start_with(&db, options(true, "serve")).await;
    let answer = call(&server, "echo-sync").await;
    assert!(from_quern(&answer), "served by quern with a live worker: {}", answer.text);
    let slow = call(&server, "slow-sync").await;
    assert!(from_customer(&slow), "an estimated 45 s is past the 30 s wait: {}", slow.text);
    let ops = server.service_token();
    assert_eq!(server.post("/v1/types/echo_sync/disable", &ops, json!({})).await.status, 204);
    let answer = call(&server, "echo-sync").await;
    assert!(from_customer(&answer), "flags off: {}", answer.text);
    assert_eq!(server.post("/v1/types/echo_sync/enable", &ops, json!({})).await.status, 204);
    assert!(from_quern(&call(&server, "echo-sync").await), "flags on again");
    server.finish().await;

    // The workers stopped (a gateway alone: the serve process's worker row
    // went with its clean stop): the customer's function answers at once.
    let gateway = Server::start_with(&db, options(true, "gateway")).await;
    let started = std::time::Instant::now();
    let answer = call(&gateway, "echo-sync").await;
    assert!(from_customer(&answer), "worker offline: {}", answer.text);
    assert!(started.elapsed() < Duration::from_secs(25), "it did not wait for a job: {:?}", started.elapsed());
    gateway.finish().await;
    db.cleanup().await;

    let paths: Vec<String> = functions.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["echo-sync", "slow-sync", "echo-sync", "echo-sync"].map(|name| format!("/functions/v1/{name}")),
        "each passed-through call reached the customer's function once"
    );
}

async fn preflight(server: &Server, path: &str, origin: &str) -> reqwest::Response {
    server
        .client
        .request(Method::OPTIONS, format!("{}{path}", server.base))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, x-client-info, apikey, content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_as_the_seed_s_functions_on_the_apis_and_never_on_the_dashboard() {
    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    for path in ["/functions/v1/enqueue-analysis", "/functions/v1/sofia-image-analysis", "/v1/jobs"] {
        let answer = preflight(&server, path, "http://localhost:5173").await;
        assert!(answer.status().is_success(), "{path}: {}", answer.status());
        assert_eq!(answer.headers()["access-control-allow-origin"], "*", "{path}");
        let allowed = answer.headers()["access-control-allow-headers"].to_str().unwrap().to_string();
        for name in ["authorization", "x-client-info", "apikey", "content-type"] {
            assert!(allowed.contains(name), "{path} allows {name}: {allowed}");
        }
        assert!(answer.headers().get("access-control-allow-credentials").is_none(), "bearer tokens, no cookies");
    }
    let dashboard = preflight(&server, "/dashboard", "http://localhost:5173").await;
    assert!(dashboard.headers().get("access-control-allow-origin").is_none(), "the dashboard answers no other origin");
    server.finish().await;

    let narrowed = Server::start_with(&db, with_env(vec![("QUERN_CORS_ORIGINS", "https://app.example".into())])).await;
    let allowed = preflight(&narrowed, "/functions/v1/enqueue-analysis", "https://app.example").await;
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://app.example");
    let refused = preflight(&narrowed, "/functions/v1/enqueue-analysis", "https://evil.example").await;
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    narrowed.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_callers_enqueue_for_a_user_and_have_a_limit_of_their_own() {
    let db = Db::sqlite().await;
    // A gateway alone: jobs stay pending, so limits are reached.
    let server = Server::start_with(&db, Options { command: "gateway", ..Options::default() }).await;
    let service = server.service_token();

    for n in 0..11 {
        let answer = server.post("/v1/jobs", &service, json!({"type": "echo", "input": {"n": n}})).await;
        assert_eq!(answer.status, 202, "a service caller is not held to one user's 10 jobs: {}", answer.text);
    }
    let mut for_alice = Vec::new();
    for n in 0..10 {
        let answer =
            server.post("/v1/jobs", &service, json!({"type": "echo", "input": {"n": n}, "user_id": "alice"})).await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        for_alice.push(answer.body["id"].as_str().unwrap().to_string());
    }
    let eleventh = server.post("/v1/jobs", &service, json!({"type": "echo", "input": {}, "user_id": "alice"})).await;
    assert_eq!(eleventh.status, 429, "alice's own limit: {}", eleventh.text);
    let alice = server.token("alice");
    let hers = server.get(&format!("/v1/jobs/{}", for_alice[0]), &alice).await;
    assert_eq!((hers.status.as_u16(), hers.body["user_id"].clone()), (200, json!("alice")), "{}", hers.text);

    // The seed's own server side: `input.userId` names the user, from a service caller only.
    let body = json!({"type": "echo", "input": {"userId": "bob", "text": "oi"}});
    let answer = server.post("/functions/v1/enqueue-analysis", &service, body.clone()).await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let bob = server.token("bob");
    let status = server
        .get(&format!("/functions/v1/get-analysis-status?jobId={}", answer.body["jobId"].as_str().unwrap()), &bob)
        .await;
    assert_eq!(status.status, 200, "bob sees the job made for him: {}", status.text);
    let from_mallory = server.post("/functions/v1/enqueue-analysis", &server.token("mallory"), body).await;
    let id = from_mallory.body["jobId"].as_str().unwrap();
    assert_eq!(server.get(&format!("/v1/jobs/{id}"), &bob).await.status, 404, "a user cannot enqueue as another");
    let named =
        server.post("/v1/jobs", &server.token("mallory"), json!({"type": "echo", "input": {}, "user_id": "bob"})).await;
    assert_eq!(named.body["status"], "pending", "{}", named.text);
    let id = named.body["id"].as_str().unwrap();
    assert_eq!(server.get(&format!("/v1/jobs/{id}"), &server.token("mallory")).await.body["user_id"], "mallory");
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_jobs_run_at_high_priority_and_a_clamp_is_said_in_a_header() {
    let db = Db::sqlite().await;
    let server = Server::start_with(&db, Options { command: "gateway", ..Options::default() }).await;
    let premium = server.post("/v1/jobs", &server.premium_token("paula"), json!({"type": "echo", "input": {}})).await;
    assert_eq!(premium.body["priority"], 2, "{}", premium.text);
    let plain = server.post("/v1/jobs", &server.token("pedro"), json!({"type": "echo", "input": {}})).await;
    assert_eq!(plain.body["priority"], 5, "{}", plain.text);

    let asked = json!({"type": "echo", "input": {"x": 1}, "priority": 1});
    let clamped = server.post("/functions/v1/enqueue-analysis", &server.token("pedro"), asked).await;
    assert_eq!(clamped.status, 202, "{}", clamped.text);
    let notice = clamped.headers["x-quern-notice"].to_str().unwrap();
    assert!(notice.contains("premium"), "{notice}");
    assert!(clamped.body.get("notice").is_none(), "the body keeps the seed's shape");
    server.finish().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_in_the_seed_s_shape() {
    let db = Db::sqlite().await;
    let server = Server::start(&db).await;
    let health = read(server.client.get(format!("{}/health", server.base)).send().await.unwrap()).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "healthy");
    assert!(health.body["uptime"].is_number() && health.body["version"].is_string(), "{}", health.text);
    assert!(health.body["worker_id"].is_string() && health.body["active_jobs"].is_number(), "{}", health.text);

    let detailed = server.get("/health/detailed", &server.service_token()).await;
    let worker = &detailed.body["worker"];
    assert_eq!(worker["id"], health.body["worker_id"], "{}", detailed.text);
    assert_eq!(worker["concurrency"], 4, "{}", detailed.text);
    assert!(worker["activeJobs"].is_number() && worker["queueSize"].is_number(), "{}", detailed.text);
    assert!(detailed.body["queue"].is_array(), "quern's own fields stay: {}", detailed.text);
    server.finish().await;
    db.cleanup().await;
}
